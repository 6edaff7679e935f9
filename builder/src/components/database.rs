//! `database`: MariaDB, on its unix socket only. Its data directory is made at first boot (`image/files/datadir`, run
//! by `foobar-datadir.service` before MariaDB), on the data disk when the instance has one: the image holds none,
//! since one made at build time carries times and log positions that differ between two builds. The application's
//! database and its `unix_socket` users are made with it (`image/files/database.sql`). No password exists anywhere.

use std::path::Path;

use anyhow::Context as _;

use super::{write, Component};
use crate::context::Context;

pub const COMPONENT: Component = Component {
    name: "database",
    packages: &["mariadb-server"],
    // The build's secret check fails if a data directory would ship.
    instance_files: &["var/lib/mysql"],
    install,
    ..super::NOTHING
};

fn install(ctx: &Context, root: &Path) -> anyhow::Result<()> {
    // The data directory Debian's package made while it was installed: first boot makes the instance's own.
    let datadir = root.join("var/lib/mysql");
    if datadir.exists() {
        std::fs::remove_dir_all(&datadir).with_context(|| format!("cannot remove {}", datadir.display()))?;
    }
    write(
        root,
        "etc/mysql/mariadb.conf.d/90-foobar.cnf",
        include_str!("../../../image/files/mariadb.cnf"),
        0o644,
    )?;
    write(
        root,
        "etc/systemd/system/mariadb.service",
        include_str!("../../../image/systemd/mariadb.service"),
        0o644,
    )?;
    // The data directory (mariadb.service requires its unit): on the data disk, found by label or serial or named
    // by `data.disk`, or on the root disk.
    write(
        root,
        "usr/lib/foobar/datadir",
        include_str!("../../../image/files/datadir"),
        0o755,
    )?;
    write(
        root,
        "usr/lib/foobar/database.sql",
        include_str!("../../../image/files/database.sql"),
        0o644,
    )?;
    write(
        root,
        "etc/systemd/system/foobar-datadir.service",
        include_str!("../../../image/systemd/foobar-datadir.service"),
        0o644,
    )?;
    if let Some(disk) = &ctx.config.data.disk {
        write(root, "etc/foobar/data-disk", format!("{}\n", disk.display()), 0o644)?;
    }
    Ok(())
}
