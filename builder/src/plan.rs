//! Planning: turns the flags and the config into the immutable `Context` the stages share. The role is resolved
//! here, once, into its components, and everything the components declare (packages, layer hooks, host tools,
//! per-instance files, ports) is gathered into the plan.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use crate::components::Component;
use crate::config::ImageConfig;
use crate::context::{Context, Ids, Layer, Layout, Port, SiteTree};
use crate::process::Tool;
use crate::roles;
use crate::util::{sha256_file, sha256_hex, tree_digest};

/// The timestamp when neither the flag, `SOURCE_DATE_EPOCH` nor a git checkout gives one (2023-11-14).
pub const FALLBACK_EPOCH: u64 = 1_700_000_000;

pub struct Flags {
    pub out: PathBuf,
    pub config: Option<PathBuf>,
    pub formats: Vec<String>,
    pub ssh_keys: Vec<PathBuf>,
    pub agent_bin: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
    pub no_cache: bool,
    pub source_date_epoch: Option<u64>,
}

/// The commit time of the checkout this builder was compiled from, when it is still a git checkout.
fn last_commit_time() -> Option<u64> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let out = crate::process::cmd("git")
        .arg("-C")
        .arg(repo)
        .args(["log", "-1", "--format=%ct"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out).trim().parse().ok()
}

/// How a layer is made beyond its inputs; a change makes the layers cached before it unused. 2: the bootstrap's
/// times settled to `normalize::LAYER_EPOCH`.
const LAYER_FORMAT: u32 = 2;

/// The package layer the components ask for. The cache key covers the suite, the mirror, the package list, the dpkg
/// rules, each component's bootstrap step and this builder's version.
pub fn layer(config: &ImageConfig, components: &[&Component]) -> Layer {
    let mut packages: Vec<String> = Vec::new();
    let mut dpkg_rules = Vec::new();
    let mut late_excludes = Vec::new();
    let mut hooks = Vec::new();
    for c in components {
        packages.extend(c.packages.iter().map(|p| p.to_string()));
        packages.extend((c.config_packages)(config));
        dpkg_rules.extend_from_slice(c.dpkg_rules);
        late_excludes.extend_from_slice(c.late_excludes);
        hooks.extend_from_slice(c.layer_hooks);
    }
    packages.sort();
    packages.dedup();
    let hook_keys: String = hooks
        .iter()
        .map(|h| format!("{}={}\n", h.key, sha256_hex(h.file.as_bytes())))
        .collect();
    let text = format!(
        "suite={}\nmirror={}\npackages={}\nexcludes={}|{}\n{hook_keys}builder={} layer-format={LAYER_FORMAT}",
        config.debian.suite,
        config.debian.mirror,
        packages.join(","),
        dpkg_rules.join(","),
        late_excludes.join(","),
        env!("CARGO_PKG_VERSION")
    );
    Layer {
        key: sha256_hex(text.as_bytes())[..16].to_string(),
        packages,
        dpkg_rules,
        late_excludes,
        hooks,
    }
}

/// Host programs the components' install steps need, added to the stages' own.
pub fn host_tools(stage_tools: &[&[Tool]], components: &[&Component]) -> Vec<Tool> {
    let mut tools: Vec<Tool> = stage_tools.iter().flat_map(|t| t.iter().copied()).collect();
    for c in components {
        tools.extend_from_slice(c.host_tools);
    }
    let mut seen = std::collections::BTreeSet::new();
    tools.retain(|t| seen.insert(t.program));
    tools
}

/// A digest of the site's files: each path with its hash (directories with none).
pub fn site_digest(tree: &SiteTree) -> String {
    let text: String = tree
        .entries
        .iter()
        .map(|e| format!("{} {}\n", e.path, e.sha256))
        .collect();
    sha256_hex(text.as_bytes())
}

/// What answers from outside: every port of the components, sorted.
pub fn ports(components: &[&Component]) -> Vec<Port> {
    let mut ports: Vec<Port> = components.iter().flat_map(|c| c.ports.iter().copied()).collect();
    ports.sort();
    ports.dedup();
    ports
}

pub fn plan(flags: Flags, stage_tools: &[&[Tool]]) -> anyhow::Result<Context> {
    let config = ImageConfig::load(flags.config.as_deref())?;
    let config_text = match &flags.config {
        Some(path) => std::fs::read(path)?,
        None => crate::config::DEFAULT_CONFIG.as_bytes().to_vec(),
    };
    let config_origin = flags
        .config
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "image/foobar.toml (built in)".to_string());
    let components = roles::resolve(&config.roles(), roles::ROLES)
        .with_context(|| format!("invalid config file {config_origin}"))?;
    let site =
        crate::components::web::scan_site(&config).with_context(|| format!("invalid config file {config_origin}"))?;

    let out = absolute(&flags.out)?;
    let formats = crate::formats::plan(&out, &flags.formats)?;

    let mut ssh_keys = config.access.ssh_authorized_keys.clone();
    for path in &flags.ssh_keys {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--ssh-key {}: cannot read the public key file", path.display()))?;
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            if line.contains("PRIVATE KEY") || !(line.starts_with("ssh-") || line.starts_with("ecdsa-")) {
                bail!(
                    "--ssh-key {}: expected an OpenSSH public key (the .pub file), not this",
                    path.display()
                );
            }
            ssh_keys.push(line.to_string());
        }
    }

    let agent_bin = match flags.agent_bin {
        Some(path) => path,
        None => beside_imagebuild("foobar-agent")?,
    };
    if !agent_bin.is_file() {
        bail!(
            "the agent binary {} does not exist: build it with `cargo build --release -p foobar-agent` or pass --agent-bin",
            agent_bin.display()
        );
    }
    let agent_sha256 = sha256_file(&agent_bin)?;
    let init_bin = beside_imagebuild("foobar-init")?;
    if !init_bin.is_file() {
        bail!(
            "the initramfs program {} does not exist: build it with `cargo build --release -p foobar-init`",
            init_bin.display()
        );
    }
    let init_sha256 = sha256_file(&init_bin)?;
    let power_button_bin = beside_imagebuild("foobar-power-button")?;
    if !power_button_bin.is_file() {
        bail!(
            "the power button's early watcher {} does not exist: build it with `cargo build --release -p foobar-init`",
            power_button_bin.display()
        );
    }
    let init_sha256 = format!("{init_sha256}+{}", sha256_file(&power_button_bin)?);

    let source_date_epoch = match flags.source_date_epoch {
        Some(t) => t,
        None => std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .and_then(|v| v.parse().ok())
            .or_else(last_commit_time)
            .unwrap_or(FALLBACK_EPOCH),
    };
    // The app's files and migrations decide the image as much as the config text that names them.
    let mut app_sha256 = String::new();
    if let Some(app) = &config.app {
        let mut text = tree_digest(&app.files)?;
        if let Some(dir) = &app.migrations {
            text.push_str(&tree_digest(dir)?);
        }
        app_sha256 = sha256_hex(text.as_bytes());
    }
    // So are the site's own files: a changed file changes the seed (and the image), never the package layer.
    let site_sha256 = site.as_ref().map(site_digest).unwrap_or_default();
    let seed = sha256_hex(
        format!(
            "foobar-image-v1\nconfig:{}\napp:{app_sha256}{}\nagent:{agent_sha256}\ninit:{init_sha256}\nkeys:{}\nepoch:{source_date_epoch}\nbuilder:{}",
            sha256_hex(&config_text),
            // Only with a site of its own, so the default image's seed is what it was.
            if site_sha256.is_empty() { String::new() } else { format!("\nsite:{site_sha256}") },
            ssh_keys.join(","),
            env!("CARGO_PKG_VERSION")
        )
        .as_bytes(),
    );

    let cache_dir = if flags.no_cache {
        None
    } else {
        Some(match flags.cache_dir {
            Some(dir) => absolute(&dir)?,
            None => default_cache_dir(),
        })
    };
    let parent = out.parent().context("--out has no directory")?;
    if !parent.is_dir() {
        bail!(
            "--out {}: the directory {} does not exist",
            out.display(),
            parent.display()
        );
    }
    let work = std::env::temp_dir().join(format!("imagebuild-{}", std::process::id()));

    Ok(Context {
        ids: Ids::from_seed(&seed),
        layout: Layout::for_size(config.disk.size_mib),
        config_sha256: sha256_hex(&config_text),
        layer: layer(&config, &components),
        host_tools: host_tools(stage_tools, &components),
        instance_files: components
            .iter()
            .flat_map(|c| c.instance_files.iter().copied())
            .collect(),
        ports: ports(&components),
        site,
        role: config.roles().join("+"),
        components: components.iter().map(|c| c.name).collect(),
        config,
        config_origin,
        out,
        formats,
        ssh_keys,
        agent_bin,
        agent_sha256,
        init_bin,
        power_button_bin,
        cache_dir,
        work,
        seed,
        source_date_epoch,
    })
}

/// A program cargo builds next to imagebuild (same profile directory).
fn beside_imagebuild(name: &str) -> anyhow::Result<PathBuf> {
    std::env::current_exe()?
        .parent()
        .map(|dir| dir.join(name))
        .context("cannot locate imagebuild's own directory")
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    Ok(if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    })
}

fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("foobar");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/foobar"),
        None => PathBuf::from("/var/cache/foobar"),
    }
}
