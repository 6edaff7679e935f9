//! The build plan: everything the stages and components need, resolved and validated once (by `plan.rs`) from the
//! flags, the config and the role's components. Plain data: this module imports no stage and no component.

use std::path::PathBuf;

use crate::config::ImageConfig;
use crate::formats::Format;
use crate::process::Tool;
use crate::util::{derive, hex, uuid_text};

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

impl Ids {
    pub fn from_seed(seed: &str) -> Ids {
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

pub const SECTOR: u64 = 512;
const MIB_SECTORS: u64 = 2048;

/// Where each partition lives, in sectors.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub total_sectors: u64,
    pub bios: (u64, u64),
    pub esp: (u64, u64),
    pub root: (u64, u64),
}

impl Layout {
    pub fn for_size(size_mib: u64) -> Layout {
        let total_sectors = size_mib * MIB_SECTORS;
        let bios = (MIB_SECTORS, 2 * MIB_SECTORS - 1);
        let esp = (2 * MIB_SECTORS, 66 * MIB_SECTORS - 1);
        // The last MiB holds the backup GPT.
        let root = (66 * MIB_SECTORS, total_sectors - MIB_SECTORS - 1);
        Layout {
            total_sectors,
            bios,
            esp,
            root,
        }
    }

    pub fn bytes(range: (u64, u64)) -> u64 {
        (range.1 - range.0 + 1) * SECTOR
    }
}

/// A port a component opens to the outside (the firewall lets exactly these in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Port {
    pub number: u16,
    pub what: &'static str,
}

/// A step a component adds to the package layer's bootstrap (an mmdebstrap customize hook). `file` is written
/// beside the layer and its hash joins the layer's cache key under `key`; `command` is the hook's shell text, with
/// `{file}` for that file's path and `"$1"` for the new root.
#[derive(Debug, Clone, Copy)]
pub struct LayerHook {
    pub key: &'static str,
    pub file: &'static str,
    pub command: &'static str,
}

/// The package layer as the role's components ask for it.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Every Debian package, sorted and without duplicates.
    pub packages: Vec<String>,
    /// dpkg `path-exclude`/`path-include` rules applied while installing.
    pub dpkg_rules: Vec<&'static str>,
    /// Paths removed after the bootstrap and kept out from then on.
    pub late_excludes: Vec<&'static str>,
    /// The components' bootstrap steps, in component order.
    pub hooks: Vec<LayerHook>,
    /// The cache key: everything that decides the layer's contents.
    pub key: String,
}

/// The site's own static files (`site.root`), as checked when the build was planned: every directory and file to
/// copy, in name order, with each file's hash and size.
#[derive(Debug, Clone)]
pub struct SiteTree {
    pub root: PathBuf,
    pub entries: Vec<SiteEntry>,
}

#[derive(Debug, Clone)]
pub struct SiteEntry {
    /// The path under the web root, `/`-separated, without a leading `/`.
    pub path: String,
    /// `None` for a directory; for a file, where its bytes are read from (a symbolic link's target).
    pub source: Option<PathBuf>,
    pub sha256: String,
    pub bytes: u64,
}

impl SiteTree {
    pub fn has_file(&self, path: &str) -> bool {
        self.entries.iter().any(|e| e.source.is_some() && e.path == path)
    }

    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }
}

#[derive(Debug)]
pub struct Context {
    pub config: ImageConfig,
    /// sha256 of the config text, for the manifest.
    pub config_sha256: String,
    pub config_origin: String,
    /// The role this image is built for, and its components in install order.
    pub role: String,
    pub components: Vec<&'static str>,
    pub layer: Layer,
    /// The host programs the stages and the components need.
    pub host_tools: Vec<Tool>,
    /// Files each instance makes for itself at first boot: never in the image (the secret check).
    pub instance_files: Vec<&'static str>,
    /// What answers from outside, sorted.
    pub ports: Vec<Port>,
    /// The site's own static files, when the config names them (`site.root`).
    pub site: Option<SiteTree>,
    pub out: PathBuf,
    pub formats: Vec<(Format, PathBuf)>,
    pub ssh_keys: Vec<String>,
    pub agent_bin: PathBuf,
    pub agent_sha256: String,
    /// The initramfs's `/init` (`foobar-init`), built beside imagebuild.
    pub init_bin: PathBuf,
    /// `foobar-power-button`, built beside imagebuild (the `agent` component installs it).
    pub power_button_bin: PathBuf,
    pub cache_dir: Option<PathBuf>,
    pub work: PathBuf,
    pub seed: String,
    pub ids: Ids,
    pub layout: Layout,
    pub source_date_epoch: u64,
}
