//! `cluster`: what makes one image every node of a cluster. It carries the cluster description (no secret in it)
//! and the roles an instance outside it takes (`role`), and makes each role's units conditional: first boot runs
//! `foobar-agent node`, which finds this instance in the description, writes its engines' settings and firewall,
//! and marks the units its roles run (`/etc/foobar/active/UNIT`); every other unit of the image stays off.

use std::path::Path;

use foobar_agent::cluster::{self, Role};

use super::{write, Component};
use crate::context::Context;

pub const COMPONENT: Component = Component {
    name: "cluster",
    instance_files: &["etc/foobar/node.toml", "etc/foobar/active", "etc/foobar/database-url"],
    install,
    ..super::NOTHING
};

fn install(ctx: &Context, root: &Path) -> anyhow::Result<()> {
    if let Some((_, text)) = &ctx.config.cluster_description {
        write(root, cluster::DESCRIPTION, text, 0o644)?;
    }
    write(
        root,
        cluster::DEFAULT_ROLES,
        format!("{}\n", ctx.config.role.join(" ")),
        0o644,
    )?;
    let every_role = [Role::All, Role::Lb, Role::App, Role::Db].into_iter().collect();
    for unit in cluster::services(&every_role) {
        let mut text = format!(
            "# foobar: on a node whose roles run it (first boot marks it: foobar-agent node)\n[Unit]\n\
             ConditionPathExists=/{}/{unit}\nAfter=foobar-firstboot.service\n",
            cluster::ACTIVE_DIR
        );
        if unit == "foobar-agent.service" {
            // An app node reaches the database through its local HAProxy.
            text.push_str("After=haproxy.service\n");
        }
        write(
            root,
            &format!("etc/systemd/system/{unit}.d/foobar-role.conf"),
            text,
            0o644,
        )?;
    }
    Ok(())
}
