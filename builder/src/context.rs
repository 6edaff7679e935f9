//! The build plan: everything the stages need, resolved and validated once from the flags and the config.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use sha2::{Digest as _, Sha256};

use crate::config::ImageConfig;
use crate::formats::Format;

/// Identifiers derived from the build's inputs, so the same inputs give the same disk.
#[derive(Debug, Clone)]
pub struct Ids {
    pub disk_guid: [u8; 16],
    pub bios_part_guid: [u8; 16],
    pub esp_part_guid: [u8; 16],
    pub root_part_guid: [u8; 16],
    pub root_fs_uuid: String,
    pub root_hash_seed: String,
    pub esp_volume_id: String,
}

#[derive(Debug)]
pub struct Context {
    pub config: ImageConfig,
    /// sha256 of the config text, for the manifest.
    pub config_sha256: String,
    pub config_origin: String,
    pub out: PathBuf,
    pub formats: Vec<(Format, PathBuf)>,
    pub ssh_keys: Vec<String>,
    pub agent_bin: PathBuf,
    pub agent_sha256: String,
    /// The initramfs's `/init` (`foobar-init`), built beside imagebuild.
    pub init_bin: PathBuf,
    pub cache_dir: Option<PathBuf>,
    pub work: PathBuf,
    pub seed: String,
    pub ids: Ids,
    pub source_date_epoch: u64,
}

/// The timestamp when neither the flag, `SOURCE_DATE_EPOCH` nor a git checkout gives one (2023-11-14).
pub const FALLBACK_EPOCH: u64 = 1_700_000_000;

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

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

/// 16 bytes for `label`, derived from the seed, marked as a version-4-style UUID.
pub fn derive(seed: &str, label: &str) -> [u8; 16] {
    let digest = Sha256::digest(format!("{seed}:{label}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

pub fn uuid_text(b: &[u8; 16]) -> String {
    let h = hex(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Ids {
    fn from_seed(seed: &str) -> Ids {
        let esp = derive(seed, "esp-volume-id");
        Ids {
            disk_guid: derive(seed, "disk"),
            bios_part_guid: derive(seed, "part-bios"),
            esp_part_guid: derive(seed, "part-esp"),
            root_part_guid: derive(seed, "part-root"),
            root_fs_uuid: uuid_text(&derive(seed, "root-fs")),
            root_hash_seed: uuid_text(&derive(seed, "root-hash-seed")),
            esp_volume_id: hex(&esp[..4]),
        }
    }
}

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

impl Context {
    pub fn plan(flags: Flags) -> anyhow::Result<Context> {
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
                "the initramfs program {} does not exist: build it with `cargo build --release -p foobar-builder`",
                init_bin.display()
            );
        }
        let init_sha256 = sha256_file(&init_bin)?;

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
        let seed = sha256_hex(
            format!(
                "foobar-image-v1\nconfig:{}\napp:{app_sha256}\nagent:{agent_sha256}\ninit:{init_sha256}\nkeys:{}\nepoch:{source_date_epoch}\nbuilder:{}",
                sha256_hex(&config_text),
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
            config_sha256: sha256_hex(&config_text),
            config,
            config_origin,
            out,
            formats,
            ssh_keys,
            agent_bin,
            agent_sha256,
            init_bin,
            cache_dir,
            work,
            seed,
            source_date_epoch,
        })
    }
}

/// A program cargo builds next to imagebuild (same profile directory).
fn beside_imagebuild(name: &str) -> anyhow::Result<PathBuf> {
    std::env::current_exe()?
        .parent()
        .map(|dir| dir.join(name))
        .context("cannot locate imagebuild's own directory")
}

/// One line per entry of a tree, in name order: relative path, kind, executable or not, and content hash.
fn tree_digest(dir: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt as _;
    fn walk(root: &Path, dir: &Path, out: &mut String) -> anyhow::Result<()> {
        for entry in crate::normalize::sorted_entries(dir)? {
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap_or(&path).display().to_string();
            let meta = path.symlink_metadata()?;
            if meta.is_dir() {
                out.push_str(&format!("{rel}/\n"));
                walk(root, &path, out)?;
            } else if meta.file_type().is_symlink() {
                out.push_str(&format!("{rel} -> {}\n", std::fs::read_link(&path)?.display()));
            } else {
                let exec = meta.mode() & 0o111 != 0;
                out.push_str(&format!("{rel} {exec} {}\n", sha256_file(&path)?));
            }
        }
        Ok(())
    }
    let mut out = String::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
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
