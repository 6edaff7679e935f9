//! `firewall`: nftables lets in exactly the ports the machine's components open (plus ICMP, DHCP replies and
//! established connections); everything else from outside is dropped.

use std::path::Path;

use serde::Serialize;

use super::{enable, write, Component};
use crate::context::{Context, Port};

pub const COMPONENT: Component = Component {
    name: "firewall",
    packages: &["nftables"],
    install,
    ..super::NOTHING
};

const RULES: &str = include_str!("../../../image/files/nftables.conf.tera");

#[derive(Serialize)]
struct RulesVars {
    /// What answers, for the file's header: `SSH, HTTP and HTTPS`.
    services: String,
    tcp_ports: Vec<u16>,
}

/// `/etc/nftables.conf` for these ports.
pub fn rules(ports: &[Port]) -> anyhow::Result<String> {
    let names: Vec<&str> = ports.iter().map(|p| p.what).collect();
    let services = match names.split_last() {
        None => "nothing".to_string(),
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    };
    let vars = RulesVars {
        services,
        tcp_ports: ports.iter().map(|p| p.number).collect(),
    };
    crate::render::render("image/files/nftables.conf.tera", RULES, &vars)
}

fn install(ctx: &Context, root: &Path) -> anyhow::Result<()> {
    write(root, "etc/nftables.conf", rules(&ctx.ports)?, 0o755)?;
    enable(
        root,
        "nftables.service",
        "/lib/systemd/system/nftables.service",
        "sysinit.target",
    )
}
