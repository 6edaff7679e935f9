//! `/init` of the image's initramfs (written by imagebuild, see `builder/src/initrd.rs`; a package of its own): loads the drivers the
//! hardware present asks for from the few the initramfs carries, finds the root file system by its UUID, mounts it
//! and hands over to systemd. It replaces initramfs-tools' shell scripts and udev, which took seconds under emulation.
//!
//! The initramfs holds `/modules/deps` (`NAME FILE...`: a driver and the modules it needs, in load order; root-disk
//! drivers in order of preference), `/modules/network` (the same for network drivers, each loaded when its hardware
//! is there, after the root is mounted) and
//! `/modules/aliases` (`PATTERN NAME`: the hardware each driver serves, from modules.alias). Messages go to the
//! kernel log (`dmesg`, the journal) as `foobar-init: ...`.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long to wait for the root device before saying so again.
const REPORT_EVERY: Duration = Duration::from_secs(10);

fn log(message: &str) {
    // Priority 5 (notice); /dev/kmsg takes one record per write.
    if let Ok(mut kmsg) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = kmsg.write_all(format!("<5>foobar-init: {message}\n").as_bytes());
    }
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> std::io::Result<()> {
    let c = |s: &str| CString::new(s).expect("no NUL in mount arguments");
    let (source, target, fstype) = (c(source), c(target), c(fstype));
    // SAFETY: valid NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The kernel command line's `root=`, `ro`/`rw`, `rootfstype=` and `init=`.
struct Cmdline {
    root: String,
    read_only: bool,
    fstype: String,
    init: String,
}

fn parse_cmdline(text: &str) -> Cmdline {
    let mut cmdline = Cmdline {
        root: String::new(),
        read_only: true,
        fstype: "ext4".to_string(),
        init: "/sbin/init".to_string(),
    };
    for word in text.split_whitespace() {
        match word.split_once('=') {
            Some(("root", value)) => cmdline.root = value.to_string(),
            Some(("rootfstype", value)) => cmdline.fstype = value.to_string(),
            Some(("init", value)) => cmdline.init = value.to_string(),
            None if word == "rw" => cmdline.read_only = false,
            None if word == "ro" => cmdline.read_only = true,
            _ => {}
        }
    }
    cmdline
}

/// A modules.alias pattern: `*` (any run), `?` (one character) and `[...]` (one of a set) as fnmatch(3) has them.
fn matches(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.first() {
        None => text.is_empty(),
        Some(b'*') => (0..=text.len()).any(|skip| matches(&pattern[1..], &text[skip..])),
        Some(b'?') => !text.is_empty() && matches(&pattern[1..], &text[1..]),
        Some(b'[') => {
            let Some(end) = pattern.iter().position(|&b| b == b']') else {
                return text.first() == Some(&b'[') && matches(&pattern[1..], &text[1..]);
            };
            let Some(&c) = text.first() else { return false };
            let set = &pattern[1..end];
            let mut hit = false;
            let mut i = 0;
            while i < set.len() {
                if i + 2 < set.len() && set[i + 1] == b'-' {
                    hit |= set[i] <= c && c <= set[i + 2];
                    i += 3;
                } else {
                    hit |= set[i] == c;
                    i += 1;
                }
            }
            hit && matches(&pattern[end + 1..], &text[1..])
        }
        Some(&p) => text.first() == Some(&p) && matches(&pattern[1..], &text[1..]),
    }
}

struct Drivers {
    /// Root-disk drivers, in order of preference.
    deps: Vec<(String, Vec<String>)>,
    /// Network drivers.
    network: Vec<(String, Vec<String>)>,
    aliases: Vec<(String, String)>,
    inserted: BTreeSet<String>,
    loaded: BTreeSet<String>,
}

impl Drivers {
    fn read() -> Drivers {
        let text = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let deps = |path: &str| {
            text(path)
                .lines()
                .filter_map(|line| {
                    let mut words = line.split_whitespace().map(String::from);
                    Some((words.next()?, words.collect()))
                })
                .collect()
        };
        let aliases = text("/modules/aliases")
            .lines()
            .filter_map(|line| {
                let (pattern, name) = line.split_once(' ')?;
                Some((pattern.to_string(), name.trim().to_string()))
            })
            .collect();
        Drivers {
            deps: deps("/modules/deps"),
            network: deps("/modules/network"),
            aliases,
            inserted: BTreeSet::new(),
            loaded: BTreeSet::new(),
        }
    }

    /// Loads the driver `name` and what it needs; a driver for hardware that is not there fails, which is no error.
    fn load(&mut self, name: &str) {
        if !self.loaded.insert(name.to_string()) {
            return;
        }
        let files = self
            .deps
            .iter()
            .chain(&self.network)
            .find(|(driver, _)| driver == name)
            .map(|(_, files)| files.clone());
        for file in files.unwrap_or_default() {
            if !self.inserted.insert(file.clone()) {
                continue;
            }
            let Ok(module) = File::open(&file) else {
                log(&format!("{file} is missing"));
                continue;
            };
            let params = CString::new("").expect("empty");
            // SAFETY: a valid open file descriptor and an empty parameter string.
            let rc = unsafe { libc::syscall(libc::SYS_finit_module, module.as_raw_fd(), params.as_ptr(), 0) };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EEXIST) {
                    log(&format!("{file}: {err}"));
                }
            }
        }
    }

    /// Loads the most preferred root-disk driver not loaded yet whose alias matches a device's modalias; true if it
    /// loaded one.
    fn load_for_devices(&mut self) -> bool {
        let wanted = self.wanted();
        let next = self
            .deps
            .iter()
            .map(|(name, _)| name.clone())
            .find(|name| wanted.contains(name));
        match next {
            Some(name) => {
                self.load(&name);
                true
            }
            None => false,
        }
    }

    /// Loads every network driver whose alias matches a device's modalias; the names of those it loaded.
    fn load_network(&mut self) -> Vec<String> {
        let wanted = self.wanted();
        let names: Vec<String> = self
            .network
            .iter()
            .map(|(name, _)| name.clone())
            .filter(|name| wanted.contains(name))
            .collect();
        for name in &names {
            self.load(name);
        }
        names
    }

    /// The drivers not loaded yet whose alias matches the modalias of a device present.
    fn wanted(&self) -> BTreeSet<String> {
        let mut wanted = BTreeSet::new();
        for bus in read_dir_names("/sys/bus") {
            for device in read_dir_names(&format!("/sys/bus/{bus}/devices")) {
                let Ok(modalias) = std::fs::read_to_string(format!("/sys/bus/{bus}/devices/{device}/modalias")) else {
                    continue;
                };
                let modalias = modalias.trim();
                for (pattern, name) in &self.aliases {
                    if !self.loaded.contains(name) && matches(pattern.as_bytes(), modalias.as_bytes()) {
                        wanted.insert(name.clone());
                    }
                }
            }
        }
        wanted
    }
}

fn read_dir_names(dir: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// The ext2/3/4 UUID of a block device, read from its superblock (1024 bytes in; magic at 0x38, UUID at 0x68).
fn ext_uuid(device: &Path) -> Option<String> {
    let mut block = [0u8; 2048];
    File::open(device).ok()?.read_exact(&mut block).ok()?;
    let sb = &block[1024..];
    if sb[0x38..0x3a] != [0x53, 0xef] {
        return None;
    }
    let u = &sb[0x68..0x78];
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    Some(format!(
        "{}-{}-{}-{}-{}",
        hex(&u[0..4]),
        hex(&u[4..6]),
        hex(&u[6..8]),
        hex(&u[8..10]),
        hex(&u[10..16])
    ))
}

/// The device named by `root=` (`UUID=...` or `/dev/...`), if it is there yet.
fn find_root(root: &str) -> Option<String> {
    if let Some(uuid) = root.strip_prefix("UUID=") {
        let uuid = uuid.to_ascii_lowercase();
        read_dir_names("/sys/class/block")
            .into_iter()
            .map(|name| format!("/dev/{name}"))
            .find(|dev| ext_uuid(Path::new(dev)).as_deref() == Some(uuid.as_str()))
    } else {
        Path::new(root).exists().then(|| root.to_string())
    }
}

fn fail_forever(message: &str) -> ! {
    log(message);
    eprintln!("foobar-init: {message}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn main() {
    let _ = mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID);
    let _ = mount(
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    );
    let _ = mount(
        "sysfs",
        "/sys",
        "sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    );
    let cmdline = parse_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if cmdline.root.is_empty() {
        fail_forever("no root= on the kernel command line");
    }

    let started = Instant::now();
    let mut drivers = Drivers::read();
    let mut reported = started;
    let device = loop {
        // Drivers create devices (a PCI controller its disks, a SCSI host its LUNs), whose drivers load next round.
        let loaded_any = drivers.load_for_devices();
        if let Some(device) = find_root(&cmdline.root) {
            break device;
        }
        if reported.elapsed() >= REPORT_EVERY {
            reported = Instant::now();
            let loaded: Vec<&str> = drivers.loaded.iter().map(String::as_str).collect();
            let message = format!(
                "still waiting for the root file system {} after {} s (drivers loaded: {}; block devices: {})",
                cmdline.root,
                started.elapsed().as_secs(),
                loaded.join(" "),
                read_dir_names("/sys/class/block").join(" ")
            );
            log(&message);
            eprintln!("foobar-init: {message}");
        }
        if !loaded_any {
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    let mut flags = 0;
    if cmdline.read_only {
        flags |= libc::MS_RDONLY;
    }
    if let Err(err) = mount(&device, "/root", &cmdline.fstype, flags) {
        fail_forever(&format!("cannot mount {device} ({}) on /root: {err}", cmdline.fstype));
    }
    log(&format!(
        "root file system {device} mounted after {} ms (drivers: {})",
        started.elapsed().as_millis(),
        drivers.loaded.iter().map(String::as_str).collect::<Vec<_>>().join(" ")
    ));

    // The network interfaces exist before udev starts, so udev names them among its first events.
    let network = drivers.load_network();
    if !network.is_empty() {
        log(&format!(
            "network drivers loaded after {} ms: {}",
            started.elapsed().as_millis(),
            network.join(" ")
        ));
    }

    // The kernel file systems move with the new root; then it becomes "/" and its init takes over as PID 1.
    for dir in ["/dev", "/proc", "/sys"] {
        if let Err(err) = mount(dir, &format!("/root{dir}"), "", libc::MS_MOVE) {
            log(&format!("cannot move {dir} into the root file system: {err}"));
        }
    }
    if let Err(err) = std::env::set_current_dir("/root") {
        fail_forever(&format!("cannot enter /root: {err}"));
    }
    if let Err(err) = mount(".", "/", "", libc::MS_MOVE) {
        fail_forever(&format!("cannot move the root file system to /: {err}"));
    }
    let dot = CString::new(".").expect("no NUL");
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        fail_forever(&format!("cannot chroot: {}", std::io::Error::last_os_error()));
    }
    let _ = std::env::set_current_dir("/");
    let init = CString::new(cmdline.init.as_str()).unwrap_or_default();
    let argv = [init.as_ptr(), std::ptr::null()];
    // SAFETY: a NUL-terminated path and a NULL-terminated argument vector that outlive the call; on success the
    // call does not return.
    unsafe { libc::execv(init.as_ptr(), argv.as_ptr()) };
    fail_forever(&format!(
        "cannot start {}: {}",
        cmdline.init,
        std::io::Error::last_os_error()
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_modules_alias_writes_them() {
        assert!(matches(b"virtio:d00000002v*", b"virtio:d00000002v00001AF4"));
        assert!(!matches(b"virtio:d00000002v*", b"virtio:d00000001v00001AF4"));
        assert!(matches(
            b"pci:v000015ADd000007C0sv*sd*bc*sc*i*",
            b"pci:v000015ADd000007C0sv000015ADsd000007C0bc01sc07i00"
        ));
        assert!(matches(b"acpi*:VMBUS:*", b"acpi:VMBUS:"));
        assert!(matches(b"scsi:t-0x0[0-7]*", b"scsi:t-0x05"));
        assert!(!matches(b"scsi:t-0x0[0-4]*", b"scsi:t-0x05"));
    }

    #[test]
    fn the_command_line_names_root_mode_and_init() {
        let c = parse_cmdline("BOOT_IMAGE=/boot/vmlinuz root=UUID=AB-CD rw quiet init=/bin/sh");
        assert_eq!(
            (c.root.as_str(), c.read_only, c.init.as_str()),
            ("UUID=AB-CD", false, "/bin/sh")
        );
        assert!(parse_cmdline("root=/dev/vda1").read_only);
    }
}
