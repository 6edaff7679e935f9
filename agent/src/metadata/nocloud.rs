//! NoCloud: a volume labelled `cidata` (FAT or ISO 9660) holding `meta-data` and `user-data`, mounted read-only.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use super::{userdata, Fetch, InstanceConfig, Platform, Probe, Source};

pub struct NoCloud;

impl Source for NoCloud {
    fn platform(&self) -> Platform {
        Platform::NoCloud
    }

    fn detect(&self, probe: &Probe) -> bool {
        probe.seed
    }

    fn fetch(&self, at: &Fetch) -> anyhow::Result<InstanceConfig> {
        match &at.seed_dir {
            Some(dir) => read_seed(dir),
            None => with_seed(read_seed),
        }
    }
}

/// The block device of a NoCloud seed: udev's label link, or, when udev has not got to it yet, the first device
/// whose FAT or ISO 9660 label reads `cidata` (a few sectors read per device; no probing tool to start).
pub fn seed_device() -> Option<(PathBuf, &'static str)> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/block")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with("loop") && !n.starts_with("ram") && !n.starts_with("zram"))
        .collect();
    names.sort();
    let candidates = ["cidata", "CIDATA"]
        .iter()
        .map(|label| Path::new("/dev/disk/by-label").join(label))
        .filter(|link| link.exists())
        .chain(names.into_iter().map(|n| PathBuf::from("/dev").join(n)));
    for device in candidates {
        if let Some(fstype) = seed_label(&device) {
            return Some((device, fstype));
        }
    }
    None
}

/// The file system type of a `cidata`-labelled volume, by its label: `vfat` or `iso9660`.
fn seed_label(device: &Path) -> Option<&'static str> {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::File::open(device).ok()?;
    let mut boot = [0u8; 512];
    let mut iso = [0u8; 72];
    let is_label = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().eq_ignore_ascii_case("cidata");
    if file.read_exact_at(&mut boot, 0).is_ok() && boot[510..512] == [0x55, 0xAA] {
        // FAT12/16 keep the volume label at 0x2B, FAT32 at 0x47.
        if is_label(&boot[0x2B..0x36]) || is_label(&boot[0x47..0x52]) {
            return Some("vfat");
        }
    }
    // ISO 9660: the primary volume descriptor in sector 16, its volume id at byte 40.
    (file.read_exact_at(&mut iso, 16 * 2048).is_ok() && &iso[1..6] == b"CD001" && is_label(&iso[40..72]))
        .then_some("iso9660")
}

/// The seed's `meta-data` (YAML: `local-hostname`, `public-keys`) and `user-data`.
fn read_seed(dir: &Path) -> anyhow::Result<InstanceConfig> {
    use yaml_rust2::{Yaml, YamlLoader};
    let mut config = InstanceConfig::empty(Platform::NoCloud);
    let meta = std::fs::read_to_string(dir.join("meta-data")).unwrap_or_default();
    let docs =
        YamlLoader::load_from_str(&meta).map_err(|e| anyhow::anyhow!("NoCloud meta-data is not valid YAML: {e}"))?;
    if let Some(Yaml::Hash(map)) = docs.first() {
        let get = |key: &str| map.get(&Yaml::String(key.into()));
        if let Some(Yaml::String(name)) = get("local-hostname") {
            config.hostname = Some(name.trim().to_string());
        }
        match get("public-keys") {
            Some(Yaml::String(key)) => config.ssh_keys.push(key.trim().to_string()),
            Some(Yaml::Array(keys)) => config
                .ssh_keys
                .extend(keys.iter().filter_map(Yaml::as_str).map(|k| k.trim().to_string())),
            _ => {}
        }
    }
    if let Ok(user_data) = std::fs::read(dir.join("user-data")) {
        userdata::read(&user_data, &mut config);
    }
    Ok(config)
}

/// Mounts the `cidata` volume read-only (mount(2) itself: no program to start) for the duration of `f`.
fn with_seed<T>(f: impl FnOnce(&Path) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let (device, fstype) = seed_device().context("no cidata volume")?;
    let mount_point = Path::new("/run/foobar/seed");
    std::fs::create_dir_all(mount_point)?;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).context("a path with a NUL byte");
    let (source, target) = (c(&device)?, c(mount_point)?);
    let fstype_c = std::ffi::CString::new(fstype)?;
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: valid NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype_c.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "cannot mount the NoCloud seed {} ({fstype}): {}",
            device.display(),
            std::io::Error::last_os_error()
        );
    }
    let result = f(mount_point);
    // SAFETY: as above.
    unsafe { libc::umount(target.as_ptr()) };
    result
}
