//! `balancer`: HAProxy and keepalived, for a cluster. On an `lb` node HAProxy sends the site's traffic to the app
//! nodes that pass `/readyz`, and keepalived holds the floating address; on an `app` node HAProxy is the agent's one
//! local database endpoint, in front of the Galera nodes. Their settings are the node's own, written at first boot
//! from the cluster description (`foobar-agent node`); the units run only where the node's roles need them.

use std::path::Path;

use super::{write, Component};
use crate::context::Context;

pub const COMPONENT: Component = Component {
    name: "balancer",
    packages: &["haproxy", "keepalived"],
    instance_files: &["etc/keepalived/keepalived.conf", "etc/foobar/tls/lb.pem"],
    install,
    ..super::NOTHING
};

fn install(_: &Context, root: &Path) -> anyhow::Result<()> {
    write(
        root,
        "etc/systemd/system/keepalived.service.d/foobar.conf",
        include_str!("../../../image/systemd/keepalived-foobar.conf"),
        0o644,
    )?;
    write(
        root,
        "usr/lib/foobar/keepalived-config",
        include_str!("../../../image/files/keepalived-config"),
        0o755,
    )
}
