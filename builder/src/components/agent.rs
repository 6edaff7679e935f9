//! `agent`: foobar-agent, the application server: the binary, its `agent.toml`, its socket-activated unit; with an
//! `[app]`, the site's own app server's files, migrations, user, directories and unit (`foobar-app.service`).

use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

use super::{copy_tree, enable, write, Component};
use crate::config::{App, ImageConfig, APP_SOCKET_DIR, FIRST_BOOT_MARKER};
use crate::context::Context;
use crate::process::cmd;

pub const COMPONENT: Component = Component {
    name: "agent",
    config_packages,
    install,
    ..super::NOTHING
};

/// `app.packages`: what the site's own app server needs.
fn config_packages(config: &ImageConfig) -> Vec<String> {
    config.app.iter().flat_map(|a| a.packages.iter().cloned()).collect()
}

/// Where an `[app]`'s files and migrations go in the image.
pub const APP_DIR: &str = "/srv/foobar/app";
pub const APP_MIGRATIONS: &str = "/srv/foobar/migrations";

/// The agent's `[app]` table as the image's `agent.toml` carries it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AgentApp {
    pub name: String,
    pub command: Vec<String>,
    pub listen: String,
    pub directory: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    pub env: std::collections::BTreeMap<String, String>,
    /// Its own MariaDB user (by unix_socket, as its own system user), with rights on the site's schema only.
    pub database_url: String,
    pub status_file: String,
}

/// The app's system user and MariaDB user (`image/files/database.sql` makes the latter, with rights on `foobar.*`).
pub const APP_USER: &str = "foobar-app";
/// Where the app's supervisor reports to the agent: a directory of the app's user that the agent's group reads.
pub const APP_STATUS_DIR: &str = "/run/foobar-app-status";

/// The agent's view of an `[app]`: the command as written, where it listens, where its files are.
pub fn agent_app(app: &App) -> AgentApp {
    AgentApp {
        name: app.name.clone(),
        command: app.command.clone(),
        listen: app.address(),
        directory: APP_DIR.to_string(),
        health: app.health.clone(),
        env: app.env.clone(),
        database_url: format!("mysql://{APP_USER}@localhost/foobar?socket=/run/mysqld/mysqld.sock"),
        status_file: format!("{APP_STATUS_DIR}/status.json"),
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct AgentConfig<'a> {
    listen: &'a str,
    database_url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    database_url_file: Option<&'a str>,
    /// In a cluster: the load balancers' checks (every second, two failures) see the drain before the stop.
    #[serde(skip_serializing_if = "Option::is_none")]
    drain_seconds: Option<u32>,
    first_boot_marker: &'a str,
    acme_status: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    migrations: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    app: Option<&'a AgentApp>,
}

/// Where a cluster's app node finds its database URL (`foobar_agent::cluster::DATABASE_URL_FILE`).
const DATABASE_URL_FILE: &str = "/etc/foobar/database-url";

/// How long an app node of a cluster drains before it stops: HAProxy's checks (`inter 1s fall 2`) take it out in
/// 2 to 3 s (`foobar_agent::cluster`).
const CLUSTER_DRAIN_SECONDS: u32 = 4;

/// Where `foobar-agent acme` records its last attempt (its `acme::STATUS`).
const ACME_STATUS: &str = "/var/lib/foobar/acme/status.json";

/// `/etc/foobar/agent.toml`: socket-activated, MariaDB over its socket with unix_socket auth, ready after first boot;
/// with an app, its migrations replace the built-in ones and the agent runs it.
/// In a cluster image (`cluster`), an app node's URL comes from the file its first boot writes.
pub fn agent_config(app: Option<&App>, cluster: bool) -> anyhow::Result<String> {
    let app = app.map(agent_app);
    let listen = format!("unix:{}", crate::config::AGENT_SOCKET);
    let config = AgentConfig {
        listen: &listen,
        database_url: "mysql://foobar@localhost/foobar?socket=/run/mysqld/mysqld.sock",
        // A cluster's app node: TCP through its local HAProxy, with the password first boot wrote there.
        database_url_file: cluster.then_some(DATABASE_URL_FILE),
        drain_seconds: cluster.then_some(CLUSTER_DRAIN_SECONDS),
        first_boot_marker: FIRST_BOOT_MARKER,
        acme_status: ACME_STATUS,
        migrations: app.as_ref().map(|_| APP_MIGRATIONS),
        app: app.as_ref(),
    };
    let text = toml::to_string(&config).context("cannot write the agent's configuration")?;
    Ok(format!(
        "# foobar-agent in the image (written by imagebuild; see README.md, \"The agent\").\n{text}"
    ))
}

/// The app's files (root's, read-only to the app), its migrations (or none), its user, its socket and report
/// directories and its unit (`foobar-app.service`: `foobar-agent app` as that user, in a sandbox of its own).
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
        "usr/lib/sysusers.d/foobar-app.conf",
        format!("# The site's own app server's user (foobar-app.service).\nu {APP_USER} - \"foobar site app\" /nonexistent\n"),
        0o644,
    )?;
    // Made now, like the base component's users: systemd-sysusers does not run at boot.
    cmd("chroot")
        .arg(root)
        .args(["systemd-sysusers", "/usr/lib/sysusers.d/foobar-app.conf"])
        .run()
        .context("cannot create the app's system user")?;
    write(
        root,
        "usr/lib/tmpfiles.d/foobar-app.conf",
        format!(
            "# The site's own app: its socket directory (the app's user writes; setgid, so its socket is group \
             www-data and nginx connects) and its supervisor's report (the agent's group reads).\n\
             d {APP_SOCKET_DIR} 2750 {APP_USER} www-data -\n\
             d {APP_STATUS_DIR} 0750 {APP_USER} foobar -\n"
        ),
        0o644,
    )?;
    write(
        root,
        "etc/systemd/system/foobar-app.service",
        include_str!("../../../image/systemd/foobar-app.service"),
        0o644,
    )?;
    enable(
        root,
        "foobar-app.service",
        "/etc/systemd/system/foobar-app.service",
        "multi-user.target",
    )
}

fn install(ctx: &Context, root: &Path) -> anyhow::Result<()> {
    let agent = std::fs::read(&ctx.agent_bin).with_context(|| format!("cannot read {}", ctx.agent_bin.display()))?;
    write(root, "usr/local/bin/foobar-agent", agent, 0o755)?;
    let watcher = std::fs::read(&ctx.power_button_bin)
        .with_context(|| format!("cannot read {}", ctx.power_button_bin.display()))?;
    write(root, "usr/lib/foobar/foobar-power-button", watcher, 0o755)?;
    write(
        root,
        "etc/foobar/agent.toml",
        agent_config(ctx.config.app.as_ref(), ctx.components.contains(&"cluster"))?,
        0o644,
    )?;
    if let Some(app) = &ctx.config.app {
        install_app(root, app)?;
    }
    for (name, text) in [
        (
            "foobar-agent.socket",
            include_str!("../../../image/systemd/foobar-agent.socket"),
        ),
        (
            "foobar-agent.service",
            include_str!("../../../image/systemd/foobar-agent.service"),
        ),
        (
            "foobar-power-button.service",
            include_str!("../../../image/systemd/foobar-power-button.service"),
        ),
        (
            "foobar-backup.service",
            include_str!("../../../image/systemd/foobar-backup.service"),
        ),
    ] {
        write(root, &format!("etc/systemd/system/{name}"), text, 0o644)?;
    }
    write(
        root,
        "etc/systemd/system/foobar-backup.timer",
        backup_timer(&ctx.config.backup.schedule),
        0o644,
    )?;
    enable(
        root,
        "foobar-agent.socket",
        "/etc/systemd/system/foobar-agent.socket",
        "sockets.target",
    )?;
    enable(
        root,
        "foobar-backup.timer",
        "/etc/systemd/system/foobar-backup.timer",
        "timers.target",
    )?;
    enable(
        root,
        "foobar-power-button.service",
        "/etc/systemd/system/foobar-power-button.service",
        "sysinit.target",
    )?;
    enable(
        root,
        "foobar-agent.service",
        "/etc/systemd/system/foobar-agent.service",
        "multi-user.target",
    )
}

/// `foobar-backup.timer` with the image config's `backup.schedule` as its `OnCalendar=`.
pub fn backup_timer(schedule: &str) -> String {
    const TIMER: &str = include_str!("../../../image/systemd/foobar-backup.timer");
    const LINE: &str = "OnCalendar=daily\n";
    assert!(TIMER.contains(LINE), "foobar-backup.timer has its OnCalendar= line");
    TIMER.replacen(LINE, &format!("OnCalendar={schedule}\n"), 1)
}
