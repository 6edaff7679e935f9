//! Our files on top of the package layer: the agent and its units, the nginx site, the static site, MariaDB and
//! network settings, the boot configuration; and removal of everything that must be unique to an instance.

use std::os::unix::fs::{symlink, PermissionsExt as _};
use std::path::Path;

use anyhow::Context as _;

use crate::config::{App, AppListen};
use crate::context::Context;
use crate::process::cmd;
use crate::render;

/// Where an `[app]`'s files and migrations go in the image, and where it listens.
pub const APP_DIR: &str = "/srv/foobar/app";
pub const APP_MIGRATIONS: &str = "/srv/foobar/migrations";
pub const APP_SOCKET_DIR: &str = "/run/foobar-app";
pub const APP_SOCKET: &str = "/run/foobar-app/app.sock";
pub const APP_PORT: u16 = 8080;

/// Files that must never ship in an image: each instance makes its own at first boot.
pub const INSTANCE_FILES: &[&str] = &[
    "etc/ssh/ssh_host_rsa_key",
    "etc/ssh/ssh_host_rsa_key.pub",
    "etc/ssh/ssh_host_ecdsa_key",
    "etc/ssh/ssh_host_ecdsa_key.pub",
    "etc/ssh/ssh_host_ed25519_key",
    "etc/ssh/ssh_host_ed25519_key.pub",
    "var/lib/dbus/machine-id",
    "var/lib/systemd/random-seed",
    "var/lib/foobar/first-boot.done",
    "etc/foobar/tls/key.pem",
    "etc/foobar/tls/cert.pem",
];

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

fn mask(root: &Path, unit: &str) -> anyhow::Result<()> {
    mask_in(root, "etc/systemd/system", unit)
}

/// Masks `name` in `dir` of the image (a unit, a generator) with a symlink to /dev/null.
fn mask_in(root: &Path, dir: &str, name: &str) -> anyhow::Result<()> {
    let link = root.join(dir).join(name);
    std::fs::create_dir_all(root.join(dir))?;
    let _ = std::fs::remove_file(&link);
    symlink("/dev/null", &link).with_context(|| format!("cannot mask {name}"))
}

/// Units a one-server web stack does not use, masked so that nothing starts them. Under emulation every process and
/// mount at boot competes for the two CPUs with what the site needs (boot-time figures in ARCHITECTURE.md).
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

/// Removes from boot what the stack does not need (see the lists above).
fn boot_diet(root: &Path) -> anyhow::Result<()> {
    // Nothing here needs the network to be "online"; waiting for it only delays boot.
    mask(root, "systemd-networkd-wait-online.service")?;
    for unit in MASKED_UNITS {
        mask(root, unit)?;
    }
    for generator in MASKED_GENERATORS {
        mask_in(root, "etc/systemd/system-generators", generator)?;
    }
    for rules in MASKED_UDEV_RULES {
        write(root, &format!("etc/udev/rules.d/{rules}"), "", 0o644)?;
    }
    // What operators use (SSH, consoles, login sessions and the D-Bus they need) starts once nginx has started (or
    // failed to), so that it does not compete with the web stack for the CPUs at boot. Not after the agent: a
    // database that never comes up would keep the agent starting, and SSH away, for its whole start timeout.
    for unit in [
        "ssh.service",
        "systemd-logind.service",
        "dbus.service",
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
    // A web server has no use for KVM: its modules are the largest that udev would load on a CPU that offers
    // virtualization (nested virtualization in a cloud VM, or an emulator).
    write(
        root,
        "etc/modprobe.d/foobar.conf",
        "# foobar: not loaded at boot (see imagebuild's overlay.rs); `modprobe kvm_intel` still loads them by hand\n\
         blacklist kvm\nblacklist kvm_intel\nblacklist kvm_amd\n",
        0o644,
    )?;
    Ok(())
}

pub fn kernel_version(root: &Path) -> anyhow::Result<String> {
    let mut versions: Vec<String> = std::fs::read_dir(root.join("boot"))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_prefix("vmlinuz-").map(String::from))
        .collect();
    versions.sort();
    versions.pop().context("no kernel in /boot of the root file system")
}

/// The GRUB menu read from the root file system by both the BIOS and the UEFI core images. `cryptomgr.notests`: the
/// kernel skips its crypto algorithms' self-tests, 0.5 s of kernel init and as much again in udev's module loads under
/// emulation (`fips=1` still runs them).
pub fn grub_cfg(root_uuid: &str, kernel: &str) -> String {
    format!(
        "# foobar: written by imagebuild\n\
         set timeout=0\n\
         serial --unit=0 --speed=115200\n\
         terminal_input serial console\n\
         terminal_output serial console\n\
         menuentry 'foobar' {{\n\
         \tsearch --no-floppy --fs-uuid --set=root {root_uuid}\n\
         \tlinux /boot/vmlinuz-{kernel} root=UUID={root_uuid} rw console=tty0 console=ttyS0,115200n8 quiet cryptomgr.notests\n\
         \tinitrd /boot/initrd.img-{kernel}\n\
         }}\n"
    )
}

/// The agent's view of an `[app]`: the command as written, where it listens, where its files are.
pub fn agent_app(app: &App) -> render::AgentApp {
    render::AgentApp {
        name: app.name.clone(),
        command: app.command.clone(),
        listen: app_address(app),
        directory: APP_DIR.to_string(),
        health: app.health.clone(),
        env: app.env.clone(),
    }
}

/// Where an `[app]` listens: `unix:/path` or `127.0.0.1:PORT`, which is both the agent's and nginx's syntax.
pub fn app_address(app: &App) -> String {
    match app.listen() {
        AppListen::Socket => format!("unix:{APP_SOCKET}"),
        AppListen::Port => format!("127.0.0.1:{APP_PORT}"),
    }
}

/// The app's files (root's, read-only to the app), its migrations (or none), its socket directory and the agent
/// unit's exceptions for it.
fn install_app(root: &Path, app: &App) -> anyhow::Result<()> {
    copy_tree(&app.files, &root.join(APP_DIR.trim_start_matches('/')))
        .with_context(|| format!("key `app.files`: cannot copy {}", app.files.display()))?;
    let migrations = root.join(APP_MIGRATIONS.trim_start_matches('/'));
    std::fs::create_dir_all(&migrations)?;
    if let Some(dir) = &app.migrations {
        copy_tree(dir, &migrations).with_context(|| format!("key `app.migrations`: cannot copy {}", dir.display()))?;
    }
    write(
        root,
        "etc/systemd/system/foobar-agent.service.d/app.conf",
        include_str!("../../image/systemd/foobar-agent-app.conf"),
        0o644,
    )?;
    write(
        root,
        "usr/lib/tmpfiles.d/foobar-app.conf",
        format!("# The socket directory of the site's own app: the agent's user writes, nginx connects.\nd {APP_SOCKET_DIR} 0750 foobar www-data -\n"),
        0o644,
    )?;
    Ok(())
}

/// Copies a tree: directories 0755, files 0644 (0755 when executable), symbolic links as they are.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755))?;
    for entry in crate::normalize::sorted_entries(from)? {
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

pub fn install_overlay(ctx: &Context, root: &Path) -> anyhow::Result<()> {
    // The agent and its configuration.
    let agent = std::fs::read(&ctx.agent_bin).with_context(|| format!("cannot read {}", ctx.agent_bin.display()))?;
    write(root, "usr/local/bin/foobar-agent", agent, 0o755)?;
    let app = ctx.config.app.as_ref().map(|app| (app, agent_app(app)));
    write(
        root,
        "etc/foobar/agent.toml",
        render::agent_config(app.as_ref().map(|(_, agent)| (agent, APP_MIGRATIONS)))?,
        0o644,
    )?;
    if let Some((app, _)) = &app {
        install_app(root, app)?;
    }
    write(
        root,
        "usr/lib/foobar/firstboot",
        include_str!("../../image/files/firstboot"),
        0o755,
    )?;
    write(
        root,
        "usr/lib/sysusers.d/foobar.conf",
        include_str!("../../image/files/sysusers.conf"),
        0o644,
    )?;
    // The system users exist in the image, so systemd-sysusers has nothing to do at boot; with /etc/.updated and
    // /var/.updated no older than /usr, neither it nor the other ConditionNeedsUpdate= units run (until a package
    // update makes /usr newer).
    cmd("chroot")
        .arg(root)
        .arg("systemd-sysusers")
        .run()
        .context("cannot create the image's system users")?;
    for marker in ["etc/.updated", "var/.updated"] {
        write(
            root,
            marker,
            "# foobar: the image was built with its users and caches current\n",
            0o644,
        )?;
    }

    // systemd units.
    let units = [
        (
            "foobar-agent.socket",
            include_str!("../../image/systemd/foobar-agent.socket"),
        ),
        (
            "foobar-agent.service",
            include_str!("../../image/systemd/foobar-agent.service"),
        ),
        (
            "foobar-firstboot.service",
            include_str!("../../image/systemd/foobar-firstboot.service"),
        ),
    ];
    for (name, text) in units {
        write(root, &format!("etc/systemd/system/{name}"), text, 0o644)?;
    }
    enable(
        root,
        "foobar-agent.socket",
        "/etc/systemd/system/foobar-agent.socket",
        "sockets.target",
    )?;
    enable(
        root,
        "foobar-agent.service",
        "/etc/systemd/system/foobar-agent.service",
        "multi-user.target",
    )?;
    enable(
        root,
        "foobar-firstboot.service",
        "/etc/systemd/system/foobar-firstboot.service",
        "multi-user.target",
    )?;
    enable(
        root,
        "systemd-networkd.service",
        "/lib/systemd/system/systemd-networkd.service",
        "multi-user.target",
    )?;
    enable(
        root,
        "systemd-networkd.socket",
        "/lib/systemd/system/systemd-networkd.socket",
        "sockets.target",
    )?;
    boot_diet(root)?;
    write(
        root,
        "etc/systemd/network/80-dhcp.network",
        include_str!("../../image/files/dhcp.network"),
        0o644,
    )?;

    // nginx: our site only, on 80 and 443.
    // nginx's own unit neither waits for the network to be online nor tests its configuration before each start
    // (imagebuild ran `nginx -t` on it already).
    write(
        root,
        "etc/systemd/system/nginx.service",
        include_str!("../../image/systemd/nginx.service"),
        0o644,
    )?;
    let mut site = render::SiteVars::for_site(&ctx.config.site.domain, &ctx.config.site.canonical);
    if let Some((app, _)) = &app {
        site = site.with_app(&app_address(app), &app.routes);
    }
    let self_signed = ctx.config.site.tls_certificate.is_empty();
    if !self_signed {
        site.tls_certificate = ctx.config.site.tls_certificate.clone();
        site.tls_key = ctx.config.site.tls_key.clone();
    }
    write(
        root,
        "etc/foobar/site.env",
        format!(
            "# What first boot needs to know about the site (written by imagebuild).\nDOMAIN={}\nCANONICAL={}\n\
             TLS_CERTIFICATE={}\nTLS_KEY={}\nTLS_SELF_SIGNED={}\n",
            ctx.config.site.domain,
            ctx.config.site.canonical,
            site.tls_certificate,
            site.tls_key,
            if self_signed { "yes" } else { "no" }
        ),
        0o644,
    )?;
    write(root, "etc/nginx/sites-available/foobar", render::site(&site)?, 0o644)?;
    write(
        root,
        "etc/nginx/foobar-proxy.conf",
        render::proxy(&render::ProxyVars { connect_timeout: 5 })?,
        0o644,
    )?;
    let _ = std::fs::remove_file(root.join("etc/nginx/sites-enabled/default"));
    let enabled = root.join("etc/nginx/sites-enabled/foobar");
    let _ = std::fs::remove_file(&enabled);
    symlink("/etc/nginx/sites-available/foobar", &enabled)?;
    write(
        root,
        "var/www/foobar/index.html",
        include_str!("../../image/site/index.html"),
        0o644,
    )?;
    write(
        root,
        "var/www/foobar/static/site.css",
        include_str!("../../image/site/static/site.css"),
        0o644,
    )?;

    // Only 22, 80 and 443 answer from outside.
    write(
        root,
        "etc/nftables.conf",
        include_str!("../../image/files/nftables.conf"),
        0o755,
    )?;
    enable(
        root,
        "nftables.service",
        "/lib/systemd/system/nftables.service",
        "sysinit.target",
    )?;
    write(
        root,
        "usr/lib/tmpfiles.d/foobar.conf",
        include_str!("../../image/files/tmpfiles.conf"),
        0o644,
    )?;

    // MariaDB on its socket only.
    write(
        root,
        "etc/mysql/mariadb.conf.d/90-foobar.cnf",
        include_str!("../../image/files/mariadb.cnf"),
        0o644,
    )?;
    write(
        root,
        "etc/systemd/system/mariadb.service",
        include_str!("../../image/systemd/mariadb.service"),
        0o644,
    )?;

    // Admin access: keys only.
    let keys: String = ctx.ssh_keys.iter().map(|k| format!("{k}\n")).collect();
    write(root, "etc/ssh/authorized_keys/admin", keys, 0o644)?;
    write(
        root,
        "etc/ssh/sshd_config.d/foobar.conf",
        "# foobar: public keys only, no root; the host keys first boot makes\nPermitRootLogin no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nAuthorizedKeysFile /etc/ssh/authorized_keys/%u .ssh/authorized_keys\nHostKey /etc/ssh/ssh_host_ed25519_key\nHostKey /etc/ssh/ssh_host_ecdsa_key\n",
        0o644,
    )?;
    write(
        root,
        "etc/sudoers.d/foobar-admin",
        "admin ALL=(ALL) NOPASSWD:ALL\n",
        0o440,
    )?;

    // Identity and boot.
    write(root, "etc/hostname", "foobar\n", 0o644)?;
    write(
        root,
        "etc/hosts",
        "127.0.0.1 localhost\n127.0.1.1 foobar\n::1 localhost ip6-localhost ip6-loopback\n",
        0o644,
    )?;
    write(
        root,
        "etc/fstab",
        // No fsck pass at boot (pass 0): ext4's journal is replayed when the kernel mounts it read-write (see
        // grub_cfg). Under emulation the check cost 1.4 s before anything else could start; README says how to
        // turn it back on.
        format!("UUID={} / ext4 defaults,errors=remount-ro 0 0\n", ctx.ids.root_fs_uuid),
        0o644,
    )?;
    let kernel = kernel_version(root)?;
    write(
        root,
        "boot/grub/grub.cfg",
        grub_cfg(&ctx.ids.root_fs_uuid, &kernel),
        0o644,
    )?;
    // systemd creates the machine id at first boot when the file is empty.
    write(root, "etc/machine-id", "", 0o444)?;
    for file in INSTANCE_FILES {
        let _ = std::fs::remove_file(root.join(file));
    }
    Ok(())
}
