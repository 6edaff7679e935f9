//! The image's initramfs: `foobar-init` as `/init`, the C library it runs on, and the drivers that find the root
//! disk on every platform the image imports into, with their dependencies and hardware aliases from the image's own
//! kernel. It replaces the one initramfs-tools made in the package layer (udev and shell scripts, 16 MB unpacked),
//! which took several seconds of a boot under emulation. initramfs-tools stays installed: a later
//! `update-initramfs` in an instance writes its usual initramfs, which boots too, only slower.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::Path;

use anyhow::{bail, Context as _};
use flate2::{Compression, GzBuilder};

use crate::context::Context;

/// The drivers for the root disk: QEMU/KVM and GCE (virtio), AWS (Xen blkfront; Nitro's NVMe is built in), Azure
/// (Hyper-V VMBus and storage), VMware (PVSCSI), SATA/IDE controllers and SCSI disks. The same list as
/// `image/files/initramfs-hook`, which initramfs-tools uses when an instance regenerates its initramfs.
/// In order of preference: when the hardware asks for several, `foobar-init` loads one at a time in this order and
/// looks for the root file system after each, so a virtio disk is found before an unused IDE controller is probed.
pub const ROOT_DISK_DRIVERS: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "nvme",
    "ahci",
    "ata_piix",
    "xen_blkfront",
    "hv_vmbus",
    "hv_storvsc",
    "vmw_pvscsi",
    "mptspi",
];

/// The network drivers of the same platforms: virtio (QEMU/KVM, GCE), gVNIC (GCE), ENA (AWS Nitro), Xen netfront
/// (older AWS), Hyper-V (Azure), VMXNET3 (VMware). `foobar-init` loads each one the hardware asks for once the root is
/// mounted, so the network interface exists when udev's coldplug starts and is named and configured among its first
/// events, instead of after udev has worked through every other device to find its driver.
pub const NETWORK_DRIVERS: &[&str] = &["virtio_net", "gve", "ena", "xen_netfront", "hv_netvsc", "vmxnet3"];

/// The libraries `foobar-init` (a Rust program linked against glibc) needs, and the dynamic loader.
const LIBRARIES: &[&str] = &[
    "lib/x86_64-linux-gnu/libc.so.6",
    "lib/x86_64-linux-gnu/libm.so.6",
    "lib/x86_64-linux-gnu/libgcc_s.so.1",
];
const LOADER: &str = "lib64/ld-linux-x86-64.so.2";

/// A module's name as modules.alias and modprobe write it: the file's stem with `-` as `_`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.trim_end_matches(".ko").replace('-', "_")
}

/// For each driver the kernel has as a module, in the order given: the module files to load, dependencies first
/// (modules.dep lists them nearest first, so they load in reverse).
pub fn driver_files(modules_dep: &str, drivers: &[&str]) -> Vec<(String, Vec<String>)> {
    let deps: BTreeMap<String, (String, Vec<String>)> = modules_dep
        .lines()
        .filter_map(|line| {
            let (module, needs) = line.split_once(':')?;
            let needs = needs.split_whitespace().map(String::from).collect();
            Some((module_name(module), (module.to_string(), needs)))
        })
        .collect();
    drivers
        .iter()
        .filter_map(|driver| {
            let (file, needs) = deps.get(*driver)?;
            let mut files: Vec<String> = needs.iter().rev().cloned().collect();
            files.push(file.clone());
            Some((driver.to_string(), files))
        })
        .collect()
}

/// One newc ("070701") cpio archive, written in order with fixed owners and times.
struct Cpio {
    out: Vec<u8>,
    inode: u32,
    mtime: u64,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.inode += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0,
            0,
            1,
            self.mtime,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[], (0, 0));
    }

    fn file(&mut self, name: &str, data: &[u8], perm: u32) {
        self.entry(name, 0o100000 | perm, data, (0, 0));
    }

    fn finish(mut self) -> Vec<u8> {
        self.inode = 0;
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.out
    }
}

/// Writes `/boot/initrd.img-VERSION` for the image's kernel in place of initramfs-tools' one.
pub fn make_initrd(ctx: &Context, root: &Path) -> anyhow::Result<()> {
    let kernel = crate::util::kernel_version(root)?;
    let modules = root.join("lib/modules").join(&kernel);
    let read = |name: &str| {
        std::fs::read_to_string(modules.join(name)).with_context(|| format!("cannot read {name} of kernel {kernel}"))
    };
    let modules_dep = read("modules.dep")?;
    let drivers = driver_files(&modules_dep, ROOT_DISK_DRIVERS);
    let network = driver_files(&modules_dep, NETWORK_DRIVERS);
    let names: BTreeSet<&str> = drivers.iter().chain(&network).map(|(name, _)| name.as_str()).collect();
    let builtin = read("modules.builtin")?;
    for needed in ["virtio_blk", "virtio_pci"] {
        if !names.contains(needed) && !builtin.contains(&format!("/{needed}.ko")) {
            bail!("kernel {kernel} has no {needed} driver, without which the image cannot find its disk under QEMU");
        }
    }
    let aliases: String = read("modules.alias")?
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (Some("alias"), Some(pattern), Some(name)) = (words.next(), words.next(), words.next()) else {
                return None;
            };
            names.contains(name).then(|| format!("{pattern} {name}\n"))
        })
        .collect();

    let mut cpio = Cpio {
        out: Vec::new(),
        inode: 0,
        mtime: ctx.source_date_epoch,
    };
    for dir in [
        "dev",
        "proc",
        "sys",
        "root",
        "modules",
        "lib",
        "lib/x86_64-linux-gnu",
        "lib64",
    ] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for /init before anything is mounted.
    cpio.entry("dev/console", 0o020600, &[], (5, 1));
    let init = std::fs::read(&ctx.init_bin).with_context(|| format!("cannot read {}", ctx.init_bin.display()))?;
    cpio.file("init", &init, 0o755);
    for lib in LIBRARIES.iter().chain([&LOADER]) {
        // Read through the image's /lib -> usr/lib and versioned symlinks.
        let path = resolve_in(root, lib)?;
        let data = std::fs::read(&path).with_context(|| format!("cannot read {} in the image", lib))?;
        cpio.file(lib, &data, 0o755);
    }
    let mut packed = BTreeSet::new();
    for (list, group) in [("modules/deps", &drivers), ("modules/network", &network)] {
        let mut deps = String::new();
        for (driver, files) in group {
            let names: Vec<String> = files
                .iter()
                .map(|f| format!("/modules/{}.ko", module_name(f)))
                .collect();
            deps.push_str(&format!("{driver} {}\n", names.join(" ")));
            for file in files {
                if packed.insert(file.clone()) {
                    let data =
                        std::fs::read(modules.join(file)).with_context(|| format!("cannot read module {file}"))?;
                    cpio.file(&format!("modules/{}.ko", module_name(file)), &data, 0o644);
                }
            }
        }
        cpio.file(list, deps.as_bytes(), 0o644);
    }
    cpio.file("modules/aliases", aliases.as_bytes(), 0o644);
    let archive = cpio.finish();

    // gzip without a name or time in its header, so the same inputs give the same bytes.
    let target = root.join("boot").join(format!("initrd.img-{kernel}"));
    let partial = target.with_extension("partial");
    let mut gz = GzBuilder::new().mtime(0).write(
        std::fs::File::create(&partial).with_context(|| format!("cannot write {}", partial.display()))?,
        Compression::new(6),
    );
    gz.write_all(&archive)?;
    gz.finish()?.sync_all()?;
    std::fs::rename(&partial, &target)?;
    tracing::info!(
        "initramfs: {} disk and {} network drivers ({} modules), {} KB unpacked",
        drivers.len(),
        network.len(),
        packed.len(),
        archive.len() / 1024
    );
    Ok(())
}

/// `path` inside the image, with every symlink on the way resolved inside the image.
fn resolve_in(root: &Path, path: &str) -> anyhow::Result<std::path::PathBuf> {
    let mut current = root.to_path_buf();
    let mut parts: Vec<String> = path.split('/').rev().map(String::from).collect();
    let mut hops = 0;
    while let Some(part) = parts.pop() {
        if part.is_empty() || part == "." {
            continue;
        }
        if part == ".." {
            if current != root {
                current.pop();
            }
            continue;
        }
        let next = current.join(&part);
        match std::fs::read_link(&next) {
            Ok(target) => {
                hops += 1;
                if hops > 40 {
                    bail!("too many symlinks resolving {path} in the image");
                }
                let target = target.to_string_lossy().to_string();
                if target.starts_with('/') {
                    current = root.to_path_buf();
                }
                parts.extend(target.split('/').rev().map(String::from));
            }
            Err(_) => current = next,
        }
    }
    Ok(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_load_first() {
        let dep = "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/virtio/virtio_ring.ko:\n\
                   kernel/drivers/block/xen-blkfront.ko:\n\
                   kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n";
        let files = driver_files(dep, &["virtio_pci", "xen_blkfront", "absent"]);
        let names: Vec<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["virtio_pci", "xen_blkfront"]);
        assert_eq!(
            files[0].1,
            [
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
                "kernel/drivers/virtio/virtio_pci.ko"
            ]
        );
        assert_eq!(files[1].1, ["kernel/drivers/block/xen-blkfront.ko"]);
    }
}
