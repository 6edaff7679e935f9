//! The parts a machine is assembled from. Each component is one module that declares, in one `COMPONENT`, what it
//! needs and does: its Debian packages, its steps in the package layer's bootstrap, the host tools its install
//! step runs, the files an instance makes for itself at first boot (which the secret check keeps out of the image),
//! the ports it opens, and `install(plan, root)`, which writes its files into the root file system. Components never
//! import each other or a stage; what they share comes from the plan (`Context`) and `util`.
//!
//! To add a component: a module here with its `COMPONENT`, one line in `ALL`, and its name in the roles that need it.

use std::os::unix::fs::{symlink, PermissionsExt as _};
use std::path::Path;

use anyhow::Context as _;

use crate::config::ImageConfig;
use crate::context::{Context, LayerHook, Port};
use crate::process::Tool;

pub mod access;
pub mod agent;
pub mod balancer;
pub mod base;
pub mod boot;
pub mod cluster;
pub mod database;
pub mod firewall;
pub mod galera;
pub mod web;

pub struct Component {
    pub name: &'static str,
    /// Debian packages it needs in every image that holds it.
    pub packages: &'static [&'static str],
    /// Debian packages the config asks for through this component (`debian.packages`, `app.packages`).
    pub config_packages: fn(&ImageConfig) -> Vec<String>,
    /// dpkg path rules while installing, and paths removed after the bootstrap (kept out from then on).
    pub dpkg_rules: &'static [&'static str],
    pub late_excludes: &'static [&'static str],
    /// Its steps in the package layer's bootstrap (their inputs join the layer's cache key).
    pub layer_hooks: &'static [LayerHook],
    /// Host programs its install step runs.
    pub host_tools: &'static [Tool],
    /// Files (relative to the root) an instance makes for itself at first boot; never in an image.
    pub instance_files: &'static [&'static str],
    /// Ports it opens to the outside.
    pub ports: &'static [Port],
    /// Writes its files into the root file system `root`.
    pub install: fn(&Context, &Path) -> anyhow::Result<()>,
}

/// A component that declares nothing: the others take from it what they leave out (`..NOTHING`).
pub const NOTHING: Component = Component {
    name: "",
    packages: &[],
    config_packages: no_config_packages,
    dpkg_rules: &[],
    late_excludes: &[],
    layer_hooks: &[],
    host_tools: &[],
    instance_files: &[],
    ports: &[],
    install: install_nothing,
};

fn install_nothing(_: &Context, _: &Path) -> anyhow::Result<()> {
    Ok(())
}

/// Every component there is.
pub const ALL: &[&Component] = &[
    &base::COMPONENT,
    &boot::COMPONENT,
    &access::COMPONENT,
    &firewall::COMPONENT,
    &web::COMPONENT,
    &database::COMPONENT,
    &agent::COMPONENT,
    &balancer::COMPONENT,
    &galera::COMPONENT,
    &cluster::COMPONENT,
];

pub fn by_name(name: &str) -> Option<&'static Component> {
    ALL.iter().copied().find(|c| c.name == name)
}

fn no_config_packages(_: &ImageConfig) -> Vec<String> {
    Vec::new()
}

/// Writes `contents` to `path` under `root` with `mode`, making its directories.
fn write(root: &Path, path: &str, contents: impl AsRef<[u8]>, mode: u32) -> anyhow::Result<()> {
    let full = root.join(path);
    if let Some(dir) = full.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&full, contents).with_context(|| format!("cannot write {}", full.display()))?;
    std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// `systemctl enable` done by hand: a symlink in the target's `.wants` directory.
fn enable(root: &Path, unit: &str, unit_path: &str, target: &str) -> anyhow::Result<()> {
    let dir = root.join(format!("etc/systemd/system/{target}.wants"));
    std::fs::create_dir_all(&dir)?;
    let link = dir.join(unit);
    let _ = std::fs::remove_file(&link);
    symlink(unit_path, &link).with_context(|| format!("cannot enable {unit}"))
}

/// Masks `name` in `dir` of the image (a unit, a generator) with a symlink to /dev/null.
fn mask_in(root: &Path, dir: &str, name: &str) -> anyhow::Result<()> {
    let link = root.join(dir).join(name);
    std::fs::create_dir_all(root.join(dir))?;
    let _ = std::fs::remove_file(&link);
    symlink("/dev/null", &link).with_context(|| format!("cannot mask {name}"))
}

/// Copies a tree: directories 0755, files 0644 (0755 when executable), symbolic links as they are.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755))?;
    for entry in crate::util::sorted_entries(from)? {
        let (src, dest) = (entry.path(), to.join(entry.file_name()));
        let meta = src.symlink_metadata()?;
        if meta.is_dir() {
            copy_tree(&src, &dest)?;
        } else if meta.file_type().is_symlink() {
            symlink(std::fs::read_link(&src)?, &dest).with_context(|| format!("cannot copy {}", src.display()))?;
        } else if meta.is_file() {
            std::fs::copy(&src, &dest).with_context(|| format!("cannot copy {}", src.display()))?;
            let mode = if meta.mode() & 0o111 != 0 { 0o755 } else { 0o644 };
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}
