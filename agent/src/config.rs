//! The agent's configuration file (`/etc/foobar/agent.toml`) and the command-line overrides applied on top of it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::Deserialize;

/// Where the image installs the agent's configuration.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/foobar/agent.toml";

/// The longest drain: the agent's unit gives a stop 35 s (drain, requests in flight, a running migration), the app's
/// 30 s (drain, the app's own stop).
pub const MAX_DRAIN_SECONDS: u64 = 10;

/// Where the agent listens: a TCP `host:port` or a unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(String),
    Unix(PathBuf),
}

impl Listen {
    /// Parses `unix:/path` or `host:port`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "`{text}`: a unix socket path must be absolute, like unix:/run/foobar/agent.sock"
                ));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        match text.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(Listen::Tcp(text.to_string())),
            _ => Err(format!(
                "`{text}`: expected host:port (like 127.0.0.1:8080) or unix:/path"
            )),
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(addr) => write!(f, "{addr}"),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Listen::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The agent's settings. Every key has a default, so an empty file is a valid configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Config {
    /// Where to listen when systemd does not hand over a socket.
    pub listen: Listen,
    /// The MariaDB/MySQL URL; the default reaches the local server over its unix socket with `unix_socket` auth.
    pub database_url: String,
    /// A file holding the database URL, used instead of `database-url` when it exists: a cluster's app node has its
    /// URL, with the password, written there at first boot (0640, group foobar).
    pub database_url_file: Option<PathBuf>,
    /// Connections kept in the pool.
    pub pool_size: u32,
    /// A directory of `NNNN_name.sql` migrations to apply instead of the ones built into the binary.
    pub migrations: Option<PathBuf>,
    /// Seconds to wait for another agent's migration lock before giving up.
    pub migrate_lock_timeout: u64,
    /// Seconds any query of a request may run before MariaDB aborts it (`max_statement_time`); the request then
    /// gets 503. Migrations are not limited.
    pub query_timeout: u64,
    /// Writes are refused (507) while the file system holding `data-dir` has less than this many MiB free.
    pub min_free_mib: u64,
    /// Where the data lives whose file system is watched (MariaDB's data directory); absent: nothing is watched.
    pub data_dir: PathBuf,
    /// A file whose existence means first boot completed; `/readyz` waits for it. Unset outside an image.
    pub first_boot_marker: Option<PathBuf>,
    /// `foobar-agent acme`'s record of its last attempt, shown in `/healthz` on the machine; absent: not shown.
    pub acme_status: Option<PathBuf>,
    /// Seconds that in-flight requests get to finish after SIGTERM.
    pub shutdown_timeout: u64,
    /// Seconds between SIGTERM and the stop during which `/readyz` answers 503 (`draining`) while everything else is
    /// served as before, so that a load balancer's health checks take the node out before it stops taking requests
    /// (also the app's supervisor's, before it stops the app). 0: no drain (one server: nothing else takes over).
    pub drain_seconds: u64,
    /// Milliseconds a read answer of the posts app is kept (the bound on how stale another node's write can be
    /// seen); 0 keeps nothing.
    pub read_cache_ms: u64,
    /// Where `foobar-agent backup` writes (may be a mounted volume).
    pub backup_dir: PathBuf,
    /// How many backups `foobar-agent backup` keeps (the newest); older ones are removed after each backup.
    pub backup_keep: u32,
    /// A command (argv) run after each backup with the backup's path appended, to ship it elsewhere; empty: none.
    pub backup_hook: Vec<String>,
    /// The site's own application server, which the agent runs and watches; absent: the built-in posts app only.
    pub app: Option<AppConfig>,
}

/// The `[app]` table: the site's own application server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AppConfig {
    /// The name its output carries in the journal and its component in `/healthz`.
    #[serde(default = "default_app_name")]
    pub name: String,
    /// The command line (argv); `{socket}` and `{port}` are replaced with where `listen` says it must listen.
    pub command: Vec<String>,
    /// Where the app listens: `unix:/path` or `127.0.0.1:PORT`.
    pub listen: Listen,
    /// Its working directory (the application files).
    pub directory: PathBuf,
    /// A path the agent GETs to ask whether the app is healthy (2xx or 3xx); absent: a connect is enough.
    #[serde(default)]
    pub health: Option<String>,
    /// Extra environment, on top of `DATABASE_URL`, `DATABASE_SOCKET`, `DATABASE_NAME` and `DATABASE_USER`.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Seconds an app that answered its health check may then fail it before it is restarted (alive but hung); an
    /// app that never answered gets four times as long from its start. 0: never restarted for not answering.
    #[serde(default = "default_hang_timeout")]
    pub hang_timeout: u64,
    /// The app's own database URL (its own MariaDB user, with rights on the site's schema only), used by
    /// `foobar-agent app` for the migrations and passed to the app; absent: the agent's `database-url`.
    #[serde(default)]
    pub database_url: Option<String>,
    /// Where `foobar-agent app` (the app's supervisor, in its own unit) reports the app's state every second, and
    /// `foobar-agent serve` reads it for `/readyz` and `/healthz`.
    #[serde(default = "default_status_file")]
    pub status_file: PathBuf,
}

/// Where the image's `foobar-app.service` reports (a directory of the app's user, readable by the agent's group).
pub const DEFAULT_APP_STATUS_FILE: &str = "/run/foobar-app-status/status.json";

fn default_status_file() -> PathBuf {
    PathBuf::from(DEFAULT_APP_STATUS_FILE)
}

fn default_hang_timeout() -> u64 {
    30
}

/// An app's name: up to 32 lowercase letters, digits and `-` (its journal tag and its `/healthz` component id).
/// imagebuild checks `app.name` with the same rule; a test feeds both the same names.
pub fn valid_app_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn default_app_name() -> String {
    "app".to_string()
}

/// The placeholders an app's command line may use.
pub const PLACEHOLDERS: &[&str] = &["{socket}", "{port}"];

impl AppConfig {
    /// The command line with its placeholders filled in from `listen`.
    pub fn argv(&self) -> Vec<String> {
        let (socket, port) = match &self.listen {
            Listen::Unix(path) => (path.display().to_string(), String::new()),
            Listen::Tcp(addr) => (
                String::new(),
                addr.rsplit_once(':').map(|(_, p)| p.to_string()).unwrap_or_default(),
            ),
        };
        self.command
            .iter()
            .map(|arg| arg.replace("{socket}", &socket).replace("{port}", &port))
            .collect()
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.command.first().is_none_or(|c| c.trim().is_empty()) {
            bail!("key `app.command`: expected the app server's command line, like [\"gunicorn\", \"--bind\", \"unix:{{socket}}\", \"app:app\"]");
        }
        for arg in &self.command {
            let mut rest = arg.as_str();
            while let Some(start) = rest.find('{') {
                let end = rest[start..].find('}').map(|e| start + e + 1).unwrap_or(rest.len());
                let placeholder = &rest[start..end];
                if !PLACEHOLDERS.contains(&placeholder) {
                    bail!(
                        "key `app.command`: unknown placeholder `{placeholder}` in `{arg}`; expected {}",
                        PLACEHOLDERS.join(" or ")
                    );
                }
                rest = &rest[end..];
            }
        }
        let joined = self.command.join(" ");
        let needs = match &self.listen {
            Listen::Unix(_) => "{socket}",
            Listen::Tcp(_) => "{port}",
        };
        if !joined.contains(needs) {
            bail!(
                "key `app.command`: expected `{needs}` somewhere, to tell the app where to listen ({})",
                self.listen
            );
        }
        if let Some(health) = &self.health {
            if !health.starts_with('/') || health.chars().any(|c| c.is_whitespace()) {
                bail!("key `app.health`: expected a path like /health, got `{health}`");
            }
        }
        if !valid_app_name(&self.name) {
            bail!(
                "key `app.name`: expected up to 32 lowercase letters, digits and `-`, like notes, got `{}`",
                self.name
            );
        }
        if let Some(url) = &self.database_url {
            if !url.starts_with("mysql://") && !url.starts_with("mariadb://") {
                bail!("key `app.database-url`: expected a mysql:// URL, got `{url}`");
            }
        }
        if !self.status_file.is_absolute() {
            bail!(
                "key `app.status-file`: expected an absolute path, like {DEFAULT_APP_STATUS_FILE}, got `{}`",
                self.status_file.display()
            );
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: Listen::Unix(PathBuf::from("/run/foobar/agent.sock")),
            database_url: "mysql://foobar@localhost/foobar?socket=/run/mysqld/mysqld.sock".to_string(),
            database_url_file: None,
            pool_size: 16,
            migrations: None,
            migrate_lock_timeout: 60,
            query_timeout: 10,
            min_free_mib: 256,
            data_dir: PathBuf::from("/var/lib/mysql"),
            first_boot_marker: None,
            acme_status: None,
            shutdown_timeout: 10,
            drain_seconds: 0,
            backup_dir: PathBuf::from("/var/backups/foobar"),
            backup_keep: 7,
            backup_hook: Vec::new(),
            read_cache_ms: 1000,
            app: None,
        }
    }
}

impl Config {
    /// Reads the configuration. A missing file is an error unless it is the default path, which a laptop does not have.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let (path, explicit) = match path {
            Some(path) => (path, true),
            None => (Path::new(DEFAULT_CONFIG_PATH), false),
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !explicit => {
                tracing::info!(path = %path.display(), "no configuration file, using defaults");
                return Ok(Config::default());
            }
            Err(err) => return Err(err).with_context(|| format!("cannot read config file {}", path.display())),
        };
        let mut config: Config =
            toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?;
        if let Some(file) = &config.database_url_file {
            match std::fs::read_to_string(file) {
                Ok(url) => config.database_url = url.trim().to_string(),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(err).with_context(|| {
                        format!(
                            "config file {}: key `database-url-file`: cannot read {}",
                            path.display(),
                            file.display()
                        )
                    })
                }
            }
        }
        config
            .validate()
            .with_context(|| format!("invalid config file {}", path.display()))?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !self.database_url.starts_with("mysql://") && !self.database_url.starts_with("mariadb://") {
            bail!(
                "key `database-url`: expected a mysql:// URL, got `{}`",
                self.database_url
            );
        }
        if self.pool_size == 0 {
            bail!("key `pool-size`: expected at least 1");
        }
        if self.read_cache_ms > 60_000 {
            bail!(
                "key `read-cache-ms`: expected at most 60000 (it bounds how stale a read may be), got {}",
                self.read_cache_ms
            );
        }
        if self.query_timeout == 0 || self.query_timeout > 3600 {
            bail!(
                "key `query-timeout`: expected 1 to 3600 seconds, got {}",
                self.query_timeout
            );
        }
        if self.drain_seconds > MAX_DRAIN_SECONDS {
            bail!(
                "key `drain-seconds`: expected at most {MAX_DRAIN_SECONDS} (the units' stop timeouts leave room for that much), got {}",
                self.drain_seconds
            );
        }
        if self.backup_keep == 0 {
            bail!("key `backup-keep`: expected at least 1 (the backup just taken)");
        }
        if !self.backup_dir.is_absolute() {
            bail!(
                "key `backup-dir`: expected an absolute path, like /var/backups/foobar, got `{}`",
                self.backup_dir.display()
            );
        }
        if self.backup_hook.first().is_some_and(|p| p.is_empty()) {
            bail!("key `backup-hook`: expected a command line, like [\"rclone\", \"copy\"], got an empty program");
        }
        if self.migrate_lock_timeout == 0 {
            bail!("key `migrate-lock-timeout`: expected at least 1 second");
        }
        if let Some(app) = &self.app {
            app.validate()?;
        }
        Ok(())
    }

    pub fn migrate_lock_timeout(&self) -> Duration {
        Duration::from_secs(self.migrate_lock_timeout)
    }

    pub fn read_cache(&self) -> Duration {
        Duration::from_millis(self.read_cache_ms)
    }

    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_seconds)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout)
    }
}
