//! `boot`: the kernel (Debian's cloud kernel), the root file system's mount, and the boot diet: units, generators
//! and udev rules a server VM does not use, masked, so that under emulation nothing competes for the two CPUs with
//! what the site needs (boot-time figures in ARCHITECTURE.md). The initramfs (`initrd.rs`) and GRUB
//! (`bootloader.rs`) are build stages of their own.

use std::path::Path;

use super::{mask_in, write, Component};
use crate::context::{Context, LayerHook};

pub const COMPONENT: Component = Component {
    name: "boot",
    packages: &["linux-image-cloud-amd64"],
    layer_hooks: &[INITRAMFS],
    install,
    ..super::NOTHING
};

/// An initramfs-tools hook that copies in the drivers for the root disk on every cloud (see the file). With it,
/// `MODULES=list` makes initramfs-tools' initramfs about a third of `most`'s size; the image boots with
/// imagebuild's own, and this one serves `update-initramfs` in an instance.
const INITRAMFS: LayerHook = LayerHook {
    key: "initramfs",
    file: include_str!("../../../image/files/initramfs-hook"),
    command: "install -m 0755 '{file}' \"$1/etc/initramfs-tools/hooks/foobar\" && \
              printf 'MODULES=list\\n' > \"$1/etc/initramfs-tools/conf.d/foobar.conf\" && \
              chroot \"$1\" update-initramfs -u -k all",
};

fn mask(root: &Path, unit: &str) -> anyhow::Result<()> {
    mask_in(root, "etc/systemd/system", unit)
}

/// Units a one-server web stack does not use, masked so that nothing starts them.
const MASKED_UNITS: &[&str] = &[
    // e2scrub checks LVM snapshots; there is no LVM.
    "e2scrub_reap.service",
    "e2scrub_all.timer",
    // Drivers for graphics, FUSE, loop and device-mapper devices, EFI pstore and configfs: nothing here uses them.
    "modprobe@drm.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
    "modprobe@dm_mod.service",
    "modprobe@efi_pstore.service",
    "modprobe@configfs.service",
    "systemd-pstore.service",
    // Kernel file systems for huge pages, POSIX message queues, debugging, tracing, configfs, FUSE and binfmt_misc.
    "dev-hugepages.mount",
    "dev-mqueue.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-binfmt.service",
    // Static device nodes (/dev/fuse, /dev/loop-control, ...) for modules nothing here loads.
    "kmod-static-nodes.service",
    // Boot and runlevel records in /var/log/wtmp (`last reboot`); the journal lists boots (`journalctl --list-boots`).
    "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
];

/// systemd generators for what the image does not have: encrypted, integrity or verity volumes, hibernation,
/// auto-discovered GPT partitions, SysV init scripts (every service here has a unit), rc.local, offline updates.
const MASKED_GENERATORS: &[&str] = &[
    "systemd-cryptsetup-generator",
    "systemd-integritysetup-generator",
    "systemd-veritysetup-generator",
    "systemd-hibernate-resume-generator",
    "systemd-gpt-auto-generator",
    "systemd-sysv-generator",
    "systemd-rc-local-generator",
    "systemd-system-update-generator",
];

/// udev rules for hardware a server VM does not have (input devices, sound, cameras, video, FIDO keys, InfiniBand,
/// MTD flash, tape, CD-ROM) or software it does not run (device-mapper, btrfs, e2scrub). Masked with empty files of the
/// same name, so coldplug runs fewer rules and starts fewer helper programs.
const MASKED_UDEV_RULES: &[&str] = &[
    "55-dm.rules",
    "60-cdrom_id.rules",
    "60-drm.rules",
    "60-evdev.rules",
    "60-fido-id.rules",
    "60-infiniband.rules",
    "60-persistent-alsa.rules",
    "60-persistent-input.rules",
    "60-persistent-storage-dm.rules",
    "60-persistent-storage-tape.rules",
    "60-persistent-v4l.rules",
    "60-sensor.rules",
    "64-btrfs.rules",
    "70-camera.rules",
    "70-joystick.rules",
    "70-mouse.rules",
    "70-touchpad.rules",
    "75-probe_mtd.rules",
    "78-sound-card.rules",
    "95-dm-notify.rules",
    "96-e2scrub.rules",
];

fn install(ctx: &Context, root: &Path) -> anyhow::Result<()> {
    // Nothing here needs the network to be "online"; waiting for it only delays boot.
    mask(root, "systemd-networkd-wait-online.service")?;
    // A stop is bounded at 10 s (systemd's default: 90 s), so that the power button powers off within 30 s whenever
    // it is pressed: systemd-networkd that got SIGTERM while it started took 28 s to exit under emulation. Units that
    // need longer say so (the agent: 35 s, to drain and finish a migration).
    write(
        root,
        "etc/systemd/system.conf.d/foobar-stop.conf",
        "# foobar: every stop bounded (then SIGKILL), so that a power-off takes seconds, not minutes.\n\
         [Manager]\nDefaultTimeoutStopSec=10s\n",
        0o644,
    )?;
    for unit in MASKED_UNITS {
        mask(root, unit)?;
    }
    for generator in MASKED_GENERATORS {
        mask_in(root, "etc/systemd/system-generators", generator)?;
    }
    for rules in MASKED_UDEV_RULES {
        write(root, &format!("etc/udev/rules.d/{rules}"), "", 0o644)?;
    }
    // What operators use (SSH, consoles, login sessions) starts once nginx has started (or failed to), so that it
    // does not compete with the web stack for the CPUs at boot. Not after the agent: a database that never comes up
    // would keep the agent starting, and SSH away, for its whole start timeout. Not logind and D-Bus either: logind
    // handles the power button (a cloud's "stop"), and a press before it watches the button is lost.
    for unit in [
        "ssh.service",
        "getty@.service",
        "serial-getty@.service",
        "systemd-user-sessions.service",
    ] {
        write(
            root,
            &format!("etc/systemd/system/{unit}.d/foobar-after-site.conf"),
            "# foobar: after the web server (see imagebuild's overlay.rs)\n[Unit]\nAfter=nginx.service\n",
            0o644,
        )?;
    }
    // The power button is a cloud's "stop". logind handles it once udev has tagged the button for it, which under
    // emulation comes late in first boot; until then `foobar-power-button.service` does (`foobar-agent
    // power-button`), from as soon as the button's driver is there: it loads with the first modules, not when udev's
    // coldplug gets to it.
    write(
        root,
        "etc/modules-load.d/foobar-button.conf",
        "# foobar: the ACPI power button's driver, early (see imagebuild's components/boot.rs)\nbutton\n",
        0o644,
    )?;
    // A web server has no use for KVM: its modules are the largest that udev would load on a CPU that offers
    // virtualization (nested virtualization in a cloud VM, or an emulator).
    write(
        root,
        "etc/modprobe.d/foobar.conf",
        "# foobar: not loaded at boot (see imagebuild's overlay.rs); `modprobe kvm_intel` still loads them by hand\n\
         blacklist kvm\nblacklist kvm_intel\nblacklist kvm_amd\n",
        0o644,
    )?;
    write(
        root,
        "etc/fstab",
        // No fsck pass at boot (pass 0): ext4's journal is replayed when the kernel mounts it read-write (see
        // bootloader.rs, grub_cfg). Under emulation the check cost 1.4 s before anything else could start; README
        // says how to turn it back on.
        format!("UUID={} / ext4 defaults,errors=remount-ro 0 0\n", ctx.ids.root_fs_uuid),
        0o644,
    )?;
    Ok(())
}
