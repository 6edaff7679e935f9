//! `galera`: MariaDB as a node of a Galera cluster (`db` role). Galera replicates; `foobar-agent galera-start`
//! decides before each start whether this node starts a new cluster or joins one, from Galera's own state files; a
//! socket on port 9200 (`foobar-agent galera-check`) answers whether the node is `Synced`, for the app nodes' HAProxy; and the app nodes' database
//! user is made from the instance's secret once the server runs. The Galera settings themselves are the node's,
//! written at first boot; a machine that is no db node runs MariaDB as before.

use std::path::Path;

use super::{enable, write, Component};
use crate::context::Context;

pub const COMPONENT: Component = Component {
    name: "galera",
    // rsync: the state transfer to a joining node; lsof: what its script checks the port with.
    packages: &["galera-4", "rsync", "lsof"],
    instance_files: &[
        "etc/foobar/cluster-users.sql",
        "etc/mysql/mariadb.conf.d/99-foobar-cluster.cnf",
    ],
    install,
    ..super::NOTHING
};

fn install(_: &Context, root: &Path) -> anyhow::Result<()> {
    write(
        root,
        "etc/systemd/system/mariadb.service.d/galera.conf",
        include_str!("../../../image/systemd/mariadb-galera.conf"),
        0o644,
    )?;
    for unit in [
        "foobar-galera-check.socket",
        "foobar-galera-check.service",
        "foobar-cluster-users.service",
    ] {
        let text = match unit {
            "foobar-galera-check.socket" => include_str!("../../../image/systemd/foobar-galera-check.socket"),
            "foobar-galera-check.service" => include_str!("../../../image/systemd/foobar-galera-check.service"),
            _ => include_str!("../../../image/systemd/foobar-cluster-users.service"),
        };
        write(root, &format!("etc/systemd/system/{unit}"), text, 0o644)?;
    }
    enable(
        root,
        "foobar-galera-check.socket",
        "/etc/systemd/system/foobar-galera-check.socket",
        "sockets.target",
    )?;
    enable(
        root,
        "foobar-cluster-users.service",
        "/etc/systemd/system/foobar-cluster-users.service",
        "multi-user.target",
    )
}
