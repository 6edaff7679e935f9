//! `base`: what every foobar machine has. systemd with its users made at build time, the network by DHCP on every
//! NIC with the DNS servers DHCP names (systemd-resolved), the machine's name, the first-boot unit and script (which make what is unique to an instance and write the
//! marker last), and the package layer's slimming rules.

use std::path::Path;

use anyhow::Context as _;

use super::{enable, write, Component};
use crate::config::ImageConfig;
use crate::context::Context;
use crate::process::{cmd, Tool};

/// Where the image's `/etc/resolv.conf` points: systemd-resolved's stub file, written once the network is up.
pub const RESOLV_CONF_TARGET: &str = "../run/systemd/resolve/stub-resolv.conf";

pub const COMPONENT: Component = Component {
    name: "base",
    packages: &[
        "systemd-sysv",
        "udev",
        "dbus",
        "e2fsprogs",
        "fdisk",
        "iproute2",
        "systemd-resolved",
    ],
    config_packages,
    dpkg_rules: DPKG_RULES,
    late_excludes: LATE_EXCLUDES,
    host_tools: &[Tool {
        program: "chroot",
        package: "coreutils",
    }],
    instance_files: &[
        "var/lib/dbus/machine-id",
        "var/lib/systemd/random-seed",
        "var/lib/foobar/first-boot.done",
    ],
    install,
    ..super::NOTHING
};

/// `debian.packages`: the operator's extra packages; `unattended-upgrades` with `updates.security`.
fn config_packages(config: &ImageConfig) -> Vec<String> {
    let mut packages = config.debian.packages.clone();
    if config.updates.security {
        packages.push("unattended-upgrades".to_string());
    }
    packages
}

/// apt's settings for `unattended-upgrades`: daily, the security suite only (Debian's default also takes point
/// releases), every run in the journal, and a reboot only at `updates.reboot-time` when one is set.
pub fn unattended_upgrades(reboot_time: &str) -> String {
    let reboot = if reboot_time.is_empty() {
        "Unattended-Upgrade::Automatic-Reboot \"false\";\n".to_string()
    } else {
        format!(
            "Unattended-Upgrade::Automatic-Reboot \"true\";\nUnattended-Upgrade::Automatic-Reboot-Time \"{reboot_time}\";\n"
        )
    };
    format!(
        "// foobar: security updates by themselves (written by imagebuild from [updates]; see README).\n\
         APT::Periodic::Update-Package-Lists \"1\";\n\
         APT::Periodic::Unattended-Upgrade \"1\";\n\
         APT::Periodic::AutocleanInterval \"7\";\n\
         #clear Unattended-Upgrade::Origins-Pattern;\n\
         Unattended-Upgrade::Origins-Pattern {{\n\
         \x20   \"origin=Debian,codename=${{distro_codename}}-security,label=Debian-Security\";\n\
         \x20   \"origin=Debian,codename=${{distro_codename}},label=Debian-Security\";\n\
         }};\n\
         Unattended-Upgrade::SyslogEnable \"true\";\n\
         Unattended-Upgrade::Remove-Unused-Kernel-Packages \"true\";\n{reboot}"
    )
}

/// Paths dpkg never unpacks: documentation, manual pages and translations the server does not need. They are one
/// dpkg policy file in the image (`/etc/dpkg/dpkg.cfg.d/foobar-excludes`), so the rules for other components'
/// packages (MariaDB's tools, kernel drivers) are kept here, in the file's order: a rule for a package an image
/// does not hold does nothing.
const DPKG_RULES: &[&str] = &[
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
    // udev's hardware database names devices for people; a server boots and serves without it (2.4 MB compressed).
    "path-exclude=/lib/udev/hwdb.d/*",
    // MariaDB's offline table tools, benchmarks and converters (about 24 MB compressed). The server, the client,
    // mariadb-admin, mariadb-dump, mariadb-check and mariadb-upgrade stay.
    "path-exclude=/usr/bin/aria_*",
    "path-exclude=/usr/bin/myisam*",
    "path-exclude=/usr/bin/mariadb-slap",
    "path-exclude=/usr/bin/mariadb-import",
    "path-exclude=/usr/bin/mariadb-show",
    "path-exclude=/usr/bin/mariadb-binlog",
    "path-exclude=/usr/bin/mariadb-conv",
    "path-exclude=/usr/bin/mariadb-plugin",
    "path-exclude=/usr/bin/mariadb-waitpid",
    "path-exclude=/usr/bin/innochecksum",
    "path-exclude=/usr/bin/perror",
    "path-exclude=/usr/bin/replace",
    "path-exclude=/usr/bin/resolve_stack_dump",
    // glibc's character set converters for iconv; nothing in the stack converts between legacy charsets.
    "path-exclude=/usr/lib/x86_64-linux-gnu/gconv/*",
    "path-include=/usr/lib/x86_64-linux-gnu/gconv/gconv-modules*",
    // Kernel drivers a web server guest does not use: InfiniBand, lab data acquisition (comedi), SCSI target and NFS
    // server support. (Packages still name these paths without the /usr prefix, so the rules do too.)
    "path-exclude=/lib/modules/*/kernel/drivers/infiniband/*",
    "path-exclude=/lib/modules/*/kernel/drivers/comedi/*",
    "path-exclude=/lib/modules/*/kernel/drivers/target/*",
    "path-exclude=/lib/modules/*/kernel/fs/nfsd/*",
];

/// Removed after installation (the bootstrap itself runs them) and kept out by dpkg from then on: Perl beyond
/// perl-base (about 13 MB compressed). MariaDB depends on it only for optional admin scripts (mariadb-report,
/// mariadb-dumpslow, mariadb-hotcopy and the like); perl-base, which dpkg and debconf use, stays whole.
const LATE_EXCLUDES: &[&str] = &["/usr/share/perl/*", "/usr/lib/x86_64-linux-gnu/perl/*"];

fn install(ctx: &Context, root: &Path) -> anyhow::Result<()> {
    if ctx.config.updates.security {
        write(
            root,
            "etc/apt/apt.conf.d/52foobar-unattended-upgrades",
            unattended_upgrades(&ctx.config.updates.reboot_time),
            0o644,
        )?;
    }
    write(
        root,
        "usr/lib/foobar/firstboot",
        include_str!("../../../image/files/firstboot"),
        0o755,
    )?;
    write(
        root,
        "usr/lib/sysusers.d/foobar.conf",
        include_str!("../../../image/files/sysusers.conf"),
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
    write(
        root,
        "usr/lib/tmpfiles.d/foobar.conf",
        include_str!("../../../image/files/tmpfiles.conf"),
        0o644,
    )?;

    write(
        root,
        "etc/systemd/system/foobar-firstboot.service",
        include_str!("../../../image/systemd/foobar-firstboot.service"),
        0o644,
    )?;
    enable(
        root,
        "foobar-firstboot.service",
        "/etc/systemd/system/foobar-firstboot.service",
        "multi-user.target",
    )?;
    // The journal's disk use has a fixed ceiling, whatever the disk's size (journald's default is 10 % of it, up to
    // 4 GiB).
    write(
        root,
        "etc/systemd/journald.conf.d/foobar.conf",
        "[Journal]\n# foobar: bounded logs (written by imagebuild).\nSystemMaxUse=200M\nSystemKeepFree=256M\n\
         RuntimeMaxUse=32M\n",
        0o644,
    )?;
    // The platform's report, and the instance configuration asked again while the platform has not answered once.
    for (unit, text) in [
        (
            "foobar-report.service",
            include_str!("../../../image/systemd/foobar-report.service"),
        ),
        (
            "foobar-instance-config.service",
            include_str!("../../../image/systemd/foobar-instance-config.service"),
        ),
    ] {
        let path = format!("etc/systemd/system/{unit}");
        write(root, &path, text, 0o644)?;
        enable(root, unit, &format!("/{path}"), "multi-user.target")?;
    }

    // The network: DHCP on every NIC.
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
    write(
        root,
        "etc/systemd/network/80-dhcp.network",
        include_str!("../../../image/files/dhcp.network"),
        0o644,
    )?;

    // Names: the DNS servers the network's DHCP names, through systemd-resolved's stub on 127.0.0.53. Never the
    // build host's resolv.conf (which the package layer got from the host for apt): its servers mean nothing where
    // the image boots. resolved answers on the loopback only: no LLMNR or multicast DNS on the network.
    enable(
        root,
        "systemd-resolved.service",
        "/lib/systemd/system/systemd-resolved.service",
        "multi-user.target",
    )?;
    write(
        root,
        "etc/systemd/resolved.conf.d/foobar.conf",
        "# foobar: DNS from DHCP, asked on the loopback only\n[Resolve]\nLLMNR=no\nMulticastDNS=no\n",
        0o644,
    )?;
    // The package's own switch to the stub kept the host's file beside it, as a backup: neither stays.
    let resolv = root.join("etc/resolv.conf");
    for file in [resolv.clone(), root.join("etc/.resolv.conf.systemd-resolved.bak")] {
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", file.display()))
            }
            _ => {}
        }
    }
    std::os::unix::fs::symlink(RESOLV_CONF_TARGET, &resolv)
        .with_context(|| format!("cannot link {} to {RESOLV_CONF_TARGET}", resolv.display()))?;

    // Identity: a neutral name until the instance's configuration gives one; systemd creates the machine id at
    // first boot when the file is empty.
    write(root, "etc/hostname", "foobar\n", 0o644)?;
    write(
        root,
        "etc/hosts",
        "127.0.0.1 localhost\n127.0.1.1 foobar\n::1 localhost ip6-localhost ip6-loopback\n",
        0o644,
    )?;
    write(root, "etc/machine-id", "", 0o444)?;
    Ok(())
}
