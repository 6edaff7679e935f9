//! The image configuration (`image/foobar.toml` by default): parsed once, validated, and never read again by stages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

/// The default configuration, embedded so `imagebuild --out X` needs no file.
pub const DEFAULT_CONFIG: &str = include_str!("../../image/foobar.toml");

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ImageConfig {
    /// What the machine is for: a role from `roles.rs` or a list of them (`all`: the one-server stack). With a
    /// `cluster`, these are the roles of an instance that is none of its nodes.
    #[serde(deserialize_with = "one_or_many")]
    pub role: Vec<String>,
    /// The cluster description (`cluster.toml`), relative to this file: the image gets the components of every role
    /// its nodes hold, and each instance turns on its own node's roles at first boot.
    pub cluster: Option<PathBuf>,
    /// The description `cluster` names, read and checked, and its text as written.
    #[serde(skip)]
    pub cluster_description: Option<(foobar_agent::cluster::Description, String)>,
    pub debian: Debian,
    pub site: Site,
    pub disk: Disk,
    pub access: Access,
    /// Certificates from an ACME CA (Let's Encrypt by default), issued and renewed on the instance.
    pub acme: Acme,
    /// Debian's security updates, applied by the instance itself.
    pub updates: Updates,
    /// The data disk: where MariaDB's data directory lives when the instance has one.
    pub data: Data,
    /// When the instance backs up the site's database (`foobar-backup.timer`).
    pub backup: Backup,
    /// The site's own application server; absent: the built-in posts app.
    pub app: Option<App>,
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            role: vec!["all".into()],
            cluster: None,
            cluster_description: None,
            debian: Debian::default(),
            site: Site::default(),
            disk: Disk::default(),
            access: Access::default(),
            acme: Acme::default(),
            updates: Updates::default(),
            data: Data::default(),
            backup: Backup::default(),
            app: None,
        }
    }
}

/// Where the agent listens in the image (nginx proxies to it).
pub const AGENT_SOCKET: &str = "/run/foobar/agent.sock";
/// Written last by first boot; the agent is ready only once it exists.
pub const FIRST_BOOT_MARKER: &str = "/var/lib/foobar/first-boot.done";
/// Where an `[app]` listens: its socket (in a directory the app's user writes and nginx's group enters), or its port.
pub const APP_SOCKET_DIR: &str = "/run/foobar-app";
pub const APP_SOCKET: &str = "/run/foobar-app/app.sock";
pub const APP_PORT: u16 = 8080;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Debian {
    /// The Debian release to install.
    pub suite: String,
    /// A mirror URL, or a sources file (one-line or deb822 format); empty means mmdebstrap's default.
    pub mirror: String,
    /// Packages added to the base set.
    pub packages: Vec<String>,
}

impl Default for Debian {
    fn default() -> Self {
        Debian {
            suite: "bookworm".into(),
            mirror: String::new(),
            packages: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Site {
    /// The bare domain; it redirects to `canonical`.
    pub domain: String,
    /// The name the site is served under.
    pub canonical: String,
    /// A real certificate (PEM, full chain) on the instance; empty: a self-signed one is made at first boot.
    pub tls_certificate: String,
    /// The private key for `tls-certificate`, on the instance (never in the image).
    pub tls_key: String,
    /// A directory of the site's own static files (relative: from the config file's directory); absent: the
    /// built-in page. Checked and listed by the `web` component when the build is planned.
    pub root: Option<PathBuf>,
}

impl Default for Site {
    fn default() -> Self {
        Site {
            domain: "foobar.com".into(),
            canonical: "www.foobar.com".into(),
            tls_certificate: String::new(),
            tls_key: String::new(),
            root: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Disk {
    /// Virtual disk size; the root file system grows to fill a larger disk at first boot.
    pub size_mib: u64,
}

impl Default for Disk {
    fn default() -> Self {
        Disk { size_mib: 2048 }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Access {
    /// SSH public keys for the admin user (added to those of `--ssh-key`).
    pub ssh_authorized_keys: Vec<String>,
}

/// `[updates]`: Debian's `unattended-upgrades` for the security suite, daily.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Updates {
    /// Install security updates by themselves (daily, from the security suite only).
    pub security: bool,
    /// `HH:MM`: reboot at that time when an installed update needs it (a new kernel); empty: never by itself.
    pub reboot_time: String,
}

impl Default for Updates {
    fn default() -> Self {
        Updates {
            security: true,
            reboot_time: String::new(),
        }
    }
}

/// `[data]`: the data disk. Without `disk`, a disk labelled or with serial `foobar-data` is the data disk.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Data {
    /// The data disk's device, for a cloud's stable path (`/dev/disk/azure/scsi1/lun0`); absent: found by name.
    pub disk: Option<PathBuf>,
}

/// `[backup]`: when `foobar-backup.timer` runs `foobar-agent backup` (where to, how many and the hook are the
/// instance's `agent.toml` keys).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Backup {
    /// A systemd calendar spec (`OnCalendar=`): `daily`, `hourly`, `*-*-* 03:15`, `Mon..Fri 02:00`.
    pub schedule: String,
}

impl Default for Backup {
    fn default() -> Self {
        Backup {
            schedule: "daily".into(),
        }
    }
}

/// What the config's checks run on the host: `backup.schedule` is asked of systemd.
pub const TOOLS: &[crate::process::Tool] = &[crate::process::Tool {
    program: "systemd-analyze",
    package: "systemd",
}];

/// A systemd calendar spec, asked of systemd itself (`systemd-analyze calendar`), in the characters such specs use
/// (it becomes a line of a unit file). Without `systemd-analyze` on the host, the host tool check that follows the
/// config's says so.
fn is_calendar_spec(text: &str) -> bool {
    let plain = !text.is_empty()
        && text.len() <= 64
        && !text.starts_with('-')
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " :*,./~-".contains(c));
    plain
        && match crate::process::cmd("systemd-analyze")
            .args(["calendar", "--iterations=1", text])
            .run()
        {
            Ok(()) => true,
            Err(e) => e.to_string().starts_with("cannot start"),
        }
}

/// `HH:MM`, 24-hour.
fn is_time_of_day(text: &str) -> bool {
    let Some((h, m)) = text.split_once(':') else {
        return false;
    };
    let number = |s: &str, max: u32| {
        s.len() == 2 && s.chars().all(|c| c.is_ascii_digit()) && s.parse::<u32>().is_ok_and(|n| n <= max)
    };
    number(h, 23) && number(m, 59)
}

/// Let's Encrypt's production directory: the ACME CA used when `acme.directory` names none.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// `[acme]`: a certificate for the canonical name and the bare domain from an ACME CA, by HTTP-01 through nginx
/// (the instance's `foobar-acme` service runs `uacme`); the self-signed one serves until it is issued.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Acme {
    pub enabled: bool,
    /// The CA's directory URL (https).
    pub directory: String,
    /// The account's contact address; empty: none.
    pub email: String,
    /// A certificate is renewed when it has fewer days left than this.
    pub renew_days: u32,
}

impl Default for Acme {
    fn default() -> Self {
        Acme {
            enabled: false,
            directory: LETS_ENCRYPT.into(),
            email: String::new(),
            renew_days: 30,
        }
    }
}

/// An ACME directory URL: `https://`, a host, then plain URL characters (it reaches a shell-sourced file and a
/// command line). The agent checks URLs from instance configuration with the same rule; a test feeds both the same.
pub fn is_acme_url(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("https://") else {
        return false;
    };
    let host = rest.split(['/', ':']).next().unwrap_or("");
    !host.is_empty()
        && url.len() <= 512
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~:/?=&%+@[]".contains(c))
}

/// A contact address: `local@domain`, plain characters only. The agent uses the same rule.
pub fn is_email(address: &str) -> bool {
    let Some((local, domain)) = address.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && local.len() <= 64
        && local.chars().all(|c| c.is_ascii_alphanumeric() || "._%+-".contains(c))
        && is_hostname(domain)
        && domain.contains('.')
}

/// `[app]`: the site's own application server, which the agent runs behind nginx.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct App {
    /// Its name in the journal and in `/healthz`.
    #[serde(default = "default_app_name")]
    pub name: String,
    /// The directory of application files copied into the image (relative paths: from the config file's directory).
    pub files: PathBuf,
    /// The app server's command line (argv), run in the files' directory, with `{socket}` or `{port}` for where it
    /// must listen.
    pub command: Vec<String>,
    /// Debian packages it needs, installed in the image.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Its own health path, which the agent GETs for `/readyz`; absent: a connect is enough.
    #[serde(default)]
    pub health: Option<String>,
    /// A directory of `NNNN_name.sql` migrations the agent applies before starting it.
    #[serde(default)]
    pub migrations: Option<PathBuf>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Path prefixes nginx sends to the app; `/` means every path that is not a static file.
    #[serde(default = "default_routes")]
    pub routes: Vec<String>,
}

fn default_app_name() -> String {
    "app".to_string()
}

fn default_routes() -> Vec<String> {
    vec!["/".to_string()]
}

/// The placeholders `app.command` may use: where the agent tells the app to listen.
pub const APP_PLACEHOLDERS: &[&str] = &["{socket}", "{port}"];

/// Variables the agent sets for the app itself; `app.env` may not override them.
pub const APP_RESERVED_ENV: &[&str] = &[
    "DATABASE_URL",
    "DATABASE_SOCKET",
    "DATABASE_NAME",
    "DATABASE_USER",
    "PORT",
];

/// Paths that stay with nginx and the agent whatever the app's routes say.
const RESERVED_PATHS: &[&str] = &["/static/", "/livez", "/readyz", "/healthz", "/metrics"];

/// Where an app listens, as decided by its command's placeholder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppListen {
    Socket,
    Port,
}

impl App {
    /// Which placeholder the command uses; validation made sure it is exactly one kind.
    pub fn listen(&self) -> AppListen {
        if self.command.iter().any(|a| a.contains("{socket}")) {
            AppListen::Socket
        } else {
            AppListen::Port
        }
    }

    /// Where it listens: `unix:/path` or `127.0.0.1:PORT`, which is both the agent's and nginx's syntax.
    pub fn address(&self) -> String {
        match self.listen() {
            AppListen::Socket => format!("unix:{APP_SOCKET}"),
            AppListen::Port => format!("127.0.0.1:{APP_PORT}"),
        }
    }

    /// Makes relative paths relative to the config file's directory.
    fn resolve(&mut self, base: &Path) {
        if self.files.is_relative() {
            self.files = base.join(&self.files);
        }
        if let Some(m) = self.migrations.as_mut().filter(|m| m.is_relative()) {
            *m = base.join(&*m);
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !valid_app_name(&self.name) {
            bail!(
                "key `app.name`: expected up to 32 lowercase letters, digits and `-`, like notes, got `{}`",
                self.name
            );
        }
        if !self.files.is_dir() {
            bail!(
                "key `app.files`: expected a directory of application files, but {} is not one \
                 (a relative path is taken from the config file's directory)",
                self.files.display()
            );
        }
        if self.command.first().is_none_or(|c| c.trim().is_empty()) {
            bail!("key `app.command`: expected the app server's command line as a list, like [\"gunicorn\", \"--bind\", \"unix:{{socket}}\", \"app:app\"]");
        }
        for arg in &self.command {
            let mut rest = arg.as_str();
            while let Some(start) = rest.find('{') {
                let end = rest[start..].find('}').map_or(rest.len(), |e| start + e + 1);
                let placeholder = &rest[start..end];
                if !APP_PLACEHOLDERS.contains(&placeholder) {
                    bail!(
                        "key `app.command`: unknown placeholder `{placeholder}` in `{arg}`; expected {}",
                        APP_PLACEHOLDERS.join(" or ")
                    );
                }
                rest = &rest[end..];
            }
        }
        let joined = self.command.join(" ");
        match (joined.contains("{socket}"), joined.contains("{port}")) {
            (true, true) => bail!("key `app.command`: expected one of `{{socket}}` or `{{port}}`, not both"),
            (false, false) => bail!(
                "key `app.command`: expected `{{socket}}` (a unix socket path) or `{{port}}` (a TCP port on 127.0.0.1) \
                 where the app is told to listen"
            ),
            _ => {}
        }
        check_package_names("app.packages", &self.packages)?;
        if let Some(health) = &self.health {
            if !health.starts_with('/') || !health.chars().all(is_path_char) {
                bail!("key `app.health`: expected a path like /health, got `{health}`");
            }
        }
        if let Some(dir) = &self.migrations {
            let entries = std::fs::read_dir(dir).with_context(|| {
                format!(
                    "key `app.migrations`: expected a directory of NNNN_name.sql files, but cannot read {}",
                    dir.display()
                )
            })?;
            for entry in entries {
                let name = entry?.file_name().to_string_lossy().into_owned();
                let (number, rest) = name.split_once('_').unwrap_or(("", ""));
                if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit()) || !rest.ends_with(".sql") {
                    bail!(
                        "key `app.migrations`: expected only NNNN_name.sql files in {}, found `{name}`",
                        dir.display()
                    );
                }
            }
        }
        for key in self.env.keys() {
            let valid = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                bail!("key `app.env`: expected variable names like LOG_LEVEL, got `{key}`");
            }
            if APP_RESERVED_ENV.contains(&key.as_str()) {
                bail!("key `app.env`: `{key}` is set by the agent for every app and cannot be overridden");
            }
        }
        if self.routes.is_empty() {
            bail!("key `app.routes`: expected at least one path prefix, like [\"/\"] (everything that is not static)");
        }
        for route in &self.routes {
            if !route.starts_with('/') || !route.chars().all(is_path_char) {
                bail!("key `app.routes`: expected path prefixes like /app/, got `{route}`");
            }
            if route != "/"
                && RESERVED_PATHS
                    .iter()
                    .any(|r| r.starts_with(route.as_str()) || route.starts_with(r))
            {
                bail!(
                    "key `app.routes`: `{route}` overlaps {}, which stay with nginx and the agent",
                    RESERVED_PATHS.join(", ")
                );
            }
        }
        Ok(())
    }
}

/// An app's name: up to 32 lowercase letters, digits and `-` (a journal tag and a `/healthz` component id). The
/// agent checks its `app.name` with the same rule; a test feeds both the same names.
pub fn valid_app_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "/-._~".contains(c)
}

/// An absolute path of plain characters: safe in nginx's configuration and in a shell, unquoted or not.
pub fn is_instance_path(path: &str) -> bool {
    path.starts_with('/') && path.chars().all(is_path_char) && !path.split('/').any(|c| c == "..")
}

/// `debian.mirror`: empty, a URL, a `deb ...` line, or an absolute path to a sources file; never an option.
fn check_mirror(mirror: &str) -> anyhow::Result<()> {
    const EXPECTED: &str = "expected a mirror URL (http://, https://, file://, or mirror+ of one), a one-line \
                            `deb ...` entry, or the absolute path of a sources file";
    if mirror.is_empty() {
        return Ok(());
    }
    if mirror.starts_with('-') {
        bail!("key `debian.mirror`: {EXPECTED}, got `{mirror}` (a leading `-` would be read as an mmdebstrap option)");
    }
    if mirror.chars().any(|c| c.is_control() || "'\"`$\\;|&<>".contains(c)) {
        bail!(
            "key `debian.mirror`: {EXPECTED}, got `{}` (quotes, `$`, `;` and control characters are not allowed)",
            mirror.escape_debug()
        );
    }
    let schemes = ["http://", "https://", "file://"];
    let bare = mirror.strip_prefix("mirror+").unwrap_or(mirror);
    let url = schemes.iter().any(|s| bare.starts_with(s)) && !mirror.contains(char::is_whitespace);
    let line = mirror.starts_with("deb ") || mirror.starts_with("deb [");
    let file = mirror.starts_with('/') && !mirror.contains(char::is_whitespace);
    if !(url || line || file) {
        bail!("key `debian.mirror`: {EXPECTED}, got `{mirror}`");
    }
    if file && !Path::new(mirror).is_file() {
        bail!("key `debian.mirror`: the sources file `{mirror}` does not exist on this machine");
    }
    Ok(())
}

fn check_package_names(key: &str, packages: &[String]) -> anyhow::Result<()> {
    if let Some(bad) = packages.iter().find(|p| {
        p.is_empty()
            || !p
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
    }) {
        bail!("key `{key}`: expected Debian package names, got `{bad}`");
    }
    Ok(())
}

/// A DNS name: dot-separated labels of letters, digits and `-` (not at either end), 63 bytes each, 253 in all.
/// The agent checks names from cloud metadata with the same rule; a test feeds both the same names.
pub fn is_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl ImageConfig {
    fn validate_data(&self) -> anyhow::Result<()> {
        if let Some(disk) = &self.data.disk {
            let text = disk.to_string_lossy();
            if !text.starts_with("/dev/")
                || text.contains("/../")
                || !text.chars().all(|c| c.is_ascii_alphanumeric() || "/-_.:+@".contains(c))
            {
                bail!(
                    "key `data.disk`: expected a device path under /dev like /dev/disk/azure/scsi1/lun0, got `{}`",
                    text.escape_debug()
                );
            }
        }
        Ok(())
    }

    fn validate_acme(&self) -> anyhow::Result<()> {
        let acme = &self.acme;
        if !is_acme_url(&acme.directory) {
            bail!(
                "key `acme.directory`: expected the https:// URL of an ACME directory, like {LETS_ENCRYPT}, got `{}`",
                acme.directory.escape_debug()
            );
        }
        if !acme.email.is_empty() && !is_email(&acme.email) {
            bail!(
                "key `acme.email`: expected a contact address like ops@foobar.com, got `{}`",
                acme.email.escape_debug()
            );
        }
        if !(1..=365).contains(&acme.renew_days) {
            bail!("key `acme.renew-days`: expected 1 to 365 days, got {}", acme.renew_days);
        }
        let reboot = &self.updates.reboot_time;
        if !reboot.is_empty() && !is_time_of_day(reboot) {
            bail!(
                "key `updates.reboot-time`: expected a time of day like 03:30 (or empty: never reboot by itself), got `{}`",
                reboot.escape_debug()
            );
        }
        if !reboot.is_empty() && !self.updates.security {
            bail!("key `updates.reboot-time`: set, but `updates.security` is off (nothing would install an update)");
        }
        if !is_calendar_spec(&self.backup.schedule) {
            bail!(
                "key `backup.schedule`: expected a systemd calendar spec like daily, hourly or \"*-*-* 03:15\" \
                 (`systemd-analyze calendar` accepts it), got `{}`",
                self.backup.schedule.escape_debug()
            );
        }
        if acme.enabled && !self.site.tls_certificate.is_empty() {
            bail!(
                "keys `acme.enabled` and `site.tls-certificate`: expected one source of the site's certificate, got \
                 both (remove `site.tls-certificate` to have ACME issue it, or turn ACME off)"
            );
        }
        Ok(())
    }

    /// Parses `text`; `origin` names the file in every error.
    /// Relative paths in it (`app.files`, `app.migrations`) are taken from `base`.
    pub fn parse(text: &str, origin: &str, base: &Path) -> anyhow::Result<ImageConfig> {
        let mut config: ImageConfig = toml::from_str(text).with_context(|| format!("invalid config file {origin}"))?;
        if let Some(app) = config.app.as_mut() {
            app.resolve(base);
        }
        if let Some(root) = config.site.root.as_mut().filter(|r| r.is_relative()) {
            *root = base.join(&*root);
        }
        if let Some(path) = config.cluster.as_mut() {
            if path.is_relative() {
                *path = base.join(&*path);
            }
            let text = std::fs::read_to_string(&*path).with_context(|| {
                format!(
                    "invalid config file {origin}: key `cluster`: cannot read {}",
                    path.display()
                )
            })?;
            let description = foobar_agent::cluster::Description::parse(&text).with_context(|| {
                format!(
                    "invalid config file {origin}: key `cluster`: invalid cluster description {}",
                    path.display()
                )
            })?;
            config.cluster_description = Some((description, text));
        }
        config
            .validate()
            .with_context(|| format!("invalid config file {origin}"))?;
        Ok(config)
    }

    /// Every role the image must be able to take: `role`, and those of the cluster's nodes; sorted, once each.
    pub fn roles(&self) -> Vec<String> {
        let mut roles: Vec<String> = self.role.clone();
        if let Some((description, _)) = &self.cluster_description {
            roles.extend(description.roles().iter().map(|r| r.name().to_string()));
        }
        roles.sort();
        roles.dedup();
        roles
    }

    pub fn load(path: Option<&Path>) -> anyhow::Result<ImageConfig> {
        match path {
            None => Self::parse(DEFAULT_CONFIG, "image/foobar.toml (built in)", Path::new(".")),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                let base = path.parent().unwrap_or(Path::new("."));
                Self::parse(&text, &path.display().to_string(), base)
            }
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !is_hostname(&self.site.domain) {
            bail!(
                "key `site.domain`: expected a DNS name like foobar.com, got `{}`",
                self.site.domain
            );
        }
        if !is_hostname(&self.site.canonical) {
            bail!(
                "key `site.canonical`: expected a DNS name like www.foobar.com, got `{}`",
                self.site.canonical
            );
        }
        if self.site.tls_certificate.is_empty() != self.site.tls_key.is_empty() {
            bail!("keys `site.tls-certificate` and `site.tls-key`: expected both (a real certificate) or neither (self-signed)");
        }
        if self.site.domain == self.site.canonical {
            bail!(
                "keys `site.domain` and `site.canonical`: expected two different names (the domain redirects to the \
                 canonical name), got `{}` for both",
                self.site.domain
            );
        }
        for (key, path) in [
            ("site.tls-certificate", &self.site.tls_certificate),
            ("site.tls-key", &self.site.tls_key),
        ] {
            // These reach nginx's configuration and first boot's shell: plain path characters only.
            if !path.is_empty() && !is_instance_path(path) {
                bail!(
                    "key `{key}`: expected an absolute path on the instance of letters, digits and `/-._~` (no `..`), \
                     like /etc/ssl/foobar/cert.pem, got `{path}`"
                );
            }
        }
        self.validate_acme()?;
        self.validate_data()?;
        check_mirror(&self.debian.mirror)?;
        if self.debian.suite.is_empty() || !self.debian.suite.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!(
                "key `debian.suite`: expected a Debian suite name like bookworm, got `{}`",
                self.debian.suite
            );
        }
        check_package_names("debian.packages", &self.debian.packages)?;
        if let Some(app) = &self.app {
            app.validate()?;
        }
        if self.disk.size_mib < 1024 {
            bail!(
                "key `disk.size-mib`: expected at least 1024 (the stack needs about 700 MiB), got {}",
                self.disk.size_mib
            );
        }
        if let Some(bad) = self.access.ssh_authorized_keys.iter().find(|k| {
            !(k.starts_with("ssh-") || k.starts_with("ecdsa-") || k.starts_with("sk-"))
                || k.split_whitespace().count() < 2
                || k.chars().any(char::is_control)
        }) {
            bail!("key `access.ssh-authorized-keys`: expected OpenSSH public keys (ssh-ed25519 AAAA...), got `{bad}`");
        }
        Ok(())
    }
}

/// `role = "all"` or `role = ["lb", "app"]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct Roles;
    impl<'de> serde::de::Visitor<'de> for Roles {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a role or a list of roles, like \"all\" or [\"lb\", \"app\"]")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![v.to_string()])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut roles = Vec::new();
            while let Some(role) = seq.next_element::<String>()? {
                roles.push(role);
            }
            if roles.is_empty() {
                return Err(serde::de::Error::invalid_length(0, &self));
            }
            Ok(roles)
        }
    }
    deserializer.deserialize_any(Roles)
}
