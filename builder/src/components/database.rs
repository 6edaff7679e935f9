//! `database`: MariaDB, on its unix socket only, with the application's database and its `unix_socket` user made
//! in the package layer (so first boot does not wait for MariaDB to create them). No password exists anywhere.

use std::path::Path;

use super::{write, Component};
use crate::context::{Context, LayerHook};

pub const COMPONENT: Component = Component {
    name: "database",
    packages: &["mariadb-server"],
    layer_hooks: &[DATABASE],
    install,
    ..super::NOTHING
};

/// The application's database and unix_socket user, made at build time by MariaDB itself.
const DATABASE: LayerHook = LayerHook {
    key: "database",
    file: include_str!("../../../image/files/database.sql"),
    command: "chroot \"$1\" /usr/sbin/mariadbd --bootstrap --user=mysql --datadir=/var/lib/mysql \
              --skip-networking --log-error=/dev/null < '{file}'",
};

fn install(_: &Context, root: &Path) -> anyhow::Result<()> {
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
    )
}
