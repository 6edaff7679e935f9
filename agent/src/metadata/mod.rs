//! Instance configuration from the cloud, read once at first boot (`foobar-agent instance-config`, run by the
//! first-boot script as root): the hostname, the admin's SSH keys and optionally the site's domain.
//!
//! Each platform is one module behind `Source`: how it is told (DMI/SMBIOS strings, or the NoCloud seed's label,
//! so a machine that is no cloud's asks nothing and waits for nothing), how its metadata is read, and what it must
//! hear on every boot once the machine is provisioned (Azure's health report, `Ready` or `NotReady` with the reason;
//! nothing elsewhere). A new cloud is one module and one line in `SOURCES`.
//!
//! User data is read by `userdata` (gzip, cloud-config through a YAML parser, MIME multi-part, the `#foobar-config`
//! fragment). SSH keys go to one user, the image's admin (`ADMIN`): keys the platform gives for other users are not
//! installed, and every such decision is named in `InstanceConfig::notes`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::Serialize;
use serde_json::Value;

pub mod azure;
pub mod ec2;
pub mod gce;
pub mod http;
pub mod nocloud;
pub mod userdata;

/// The image's one login user, who has passwordless sudo: the only user metadata keys are installed for.
pub const ADMIN: &str = "admin";

/// Where every cloud puts its metadata service (Azure's wire server aside).
const LINK_LOCAL: &str = "http://169.254.169.254";
/// An OEM string (SMBIOS type 11) `foobar:metadata-url=URL` sends every metadata request to URL instead: a proxy,
/// or the test suite's fake metadata server.
const OEM_OVERRIDE: &str = "foobar:metadata-url=";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    NoCloud,
    Ec2,
    Gce,
    Azure,
    None,
}

/// A platform's metadata: how to tell it, how to read it, and what to tell it once the site is ready.
pub trait Source: Sync {
    fn platform(&self) -> Platform;
    /// Whether this machine runs on the platform, from what the machine itself shows (no network).
    fn detect(&self, probe: &Probe) -> bool;
    /// Reads this instance's configuration (blocking; bounded by the client's timeouts).
    fn fetch(&self, at: &Fetch) -> anyhow::Result<InstanceConfig>;
    /// On every boot, once first boot is over: what the platform waits to hear (blocking, retried within the
    /// client's budget). `Ok(None)` where the platform waits for nothing; otherwise what was said.
    fn report(&self, at: &Fetch, outcome: &Outcome) -> anyhow::Result<Option<String>> {
        let _ = (at, outcome);
        Ok(None)
    }
}

/// How provisioning went, as first boot recorded it: what a platform's report says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Provisioned,
    Failed(String),
}

/// Every platform, in the order they are tried: a NoCloud seed wins over the cloud the machine runs in.
pub const SOURCES: &[&dyn Source] = &[&nocloud::NoCloud, &ec2::Ec2, &gce::Gce, &azure::Azure];

/// What the machine shows of its platform: the DMI strings and whether a NoCloud seed is attached.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    pub sys_vendor: String,
    pub product_name: String,
    pub bios_vendor: String,
    pub bios_version: String,
    pub chassis_asset_tag: String,
    /// Readable by root only; EC2 instances' begins with `ec2` (or, byte-swapped, `ec2` after the swap).
    pub product_uuid: String,
    pub seed: bool,
}

/// Where a source's requests go.
pub struct Fetch {
    pub http: http::Http,
    /// The metadata service: the link-local address, or the override.
    pub base: String,
    /// The override (`--metadata-url` or the OEM string), which also stands in for Azure's wire server.
    pub overridden: Option<String>,
    /// A NoCloud seed's files already at hand (tests); otherwise the `cidata` volume is mounted.
    pub seed_dir: Option<PathBuf>,
}

/// Where to look; the defaults are the real locations, tests point them elsewhere.
#[derive(Debug, Clone)]
pub struct Sources {
    pub root: PathBuf,
    pub dmi_dir: PathBuf,
    pub oem_strings: PathBuf,
    /// A NoCloud seed's files, when already at hand (tests); otherwise the `cidata` volume is mounted.
    pub seed_dir: Option<PathBuf>,
    pub metadata_url: Option<String>,
}

impl Default for Sources {
    fn default() -> Self {
        Sources {
            root: PathBuf::from("/"),
            dmi_dir: PathBuf::from("/sys/class/dmi/id"),
            oem_strings: PathBuf::from("/sys/firmware/dmi/entries/11-0/raw"),
            seed_dir: None,
            metadata_url: None,
        }
    }
}

/// The site names a fragment asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SiteOverride {
    pub domain: Option<String>,
    pub canonical: Option<String>,
}

/// A certificate and its key handed over in instance configuration (`[tls]` of the fragment), installed where
/// `site.env` says nginx reads them. Never recorded: the key is a secret of the instance.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM: the certificate, then its chain.
    pub certificate: String,
    /// PEM: its private key.
    pub key: String,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsFiles { .. }")
    }
}

impl TlsFiles {
    /// The PEM blocks each must hold; the pair's match is checked by first boot with openssl before nginx starts.
    pub fn validate(&self) -> Result<(), String> {
        if !self.certificate.contains("-----BEGIN CERTIFICATE-----") {
            return Err("key `tls.certificate`: expected a PEM certificate (-----BEGIN CERTIFICATE-----)".into());
        }
        let key = &self.key;
        if !(key.contains("-----BEGIN ") && key.contains("PRIVATE KEY-----")) || key.contains("CERTIFICATE-----") {
            return Err("key `tls.key`: expected a PEM private key (-----BEGIN ... PRIVATE KEY-----)".into());
        }
        Ok(())
    }
}

/// What the platform said about this instance.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceConfig {
    pub platform: Platform,
    pub hostname: Option<String>,
    pub ssh_keys: Vec<String>,
    pub site: Option<SiteOverride>,
    /// A certificate for the site, from the fragment's `[tls]`; not recorded (the record says only whether one came).
    #[serde(skip)]
    pub tls: Option<TlsFiles>,
    /// ACME settings from the fragment's `[acme]` (the CA certificate itself is not recorded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acme: Option<crate::acme::AcmeOverride>,
    /// Which node of the cluster description this instance is (the fragment's `[node] name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The cluster's secrets (the fragment's `[secrets]`); never recorded.
    #[serde(skip)]
    pub secrets: Option<crate::cluster::Secrets>,
    /// What was given but not acted on, and why (a key for another user, an expired key, a script, ...).
    pub notes: Vec<String>,
    /// What was given but is invalid (a malformed fragment, a bad host name): skipped, each named; every valid part
    /// still applies. Any of these makes instance configuration fail (and Azure hear `NotReady`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl InstanceConfig {
    pub fn empty(platform: Platform) -> InstanceConfig {
        InstanceConfig {
            platform,
            hostname: None,
            ssh_keys: Vec::new(),
            site: None,
            tls: None,
            acme: None,
            node: None,
            secrets: None,
            notes: Vec::new(),
            errors: Vec::new(),
        }
    }
}

/// The SMBIOS type 11 strings: after the structure's formatted part (its length is byte 1), NUL-terminated strings.
pub fn oem_strings(raw: &[u8]) -> Vec<String> {
    if raw.len() < 5 || raw[0] != 11 {
        return Vec::new();
    }
    let start = usize::from(raw[1]).min(raw.len());
    raw[start..]
        .split(|b| *b == 0)
        .take_while(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// What this machine shows: its DMI strings, and a NoCloud seed (given, or looked for when running on `/`).
pub fn probe(sources: &Sources) -> Probe {
    let dmi = |field: &str| {
        std::fs::read_to_string(sources.dmi_dir.join(field))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    Probe {
        sys_vendor: dmi("sys_vendor"),
        product_name: dmi("product_name"),
        bios_vendor: dmi("bios_vendor"),
        bios_version: dmi("bios_version"),
        chassis_asset_tag: dmi("chassis_asset_tag"),
        product_uuid: dmi("product_uuid"),
        seed: sources.seed_dir.is_some() || (sources.root == Path::new("/") && nocloud::seed_device().is_some()),
    }
}

/// The platform's source, by what the machine shows alone. Reads files; never touches the network.
pub fn detect(sources: &Sources) -> Option<&'static dyn Source> {
    let probe = probe(sources);
    SOURCES.iter().copied().find(|s| s.detect(&probe))
}

/// A DNS name: dot-separated labels of letters, digits and `-` (not at either end), 63 bytes each, 253 in all.
/// imagebuild checks its config's names with the same rule; a test feeds both the same names.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn valid_key(key: &str) -> bool {
    (key.starts_with("ssh-") || key.starts_with("ecdsa-") || key.starts_with("sk-"))
        && key.split_whitespace().count() >= 2
        && !key.contains('\n')
}

/// Where a detected platform's requests go: the override (`--metadata-url`, or the OEM string) or its own address.
fn at(sources: &Sources, http: http::Http) -> Fetch {
    let overridden = sources.metadata_url.clone().or_else(|| {
        let raw = std::fs::read(&sources.oem_strings).ok()?;
        oem_strings(&raw)
            .into_iter()
            .find_map(|s| s.strip_prefix(OEM_OVERRIDE).map(String::from))
    });
    Fetch {
        http,
        base: overridden.clone().unwrap_or_else(|| LINK_LOCAL.to_string()),
        overridden,
        seed_dir: sources.seed_dir.clone(),
    }
}

/// Asks the platform (blocking; bounded by the client's budget). No platform: an empty configuration at once.
pub fn fetch(sources: &Sources) -> anyhow::Result<InstanceConfig> {
    let Some(source) = detect(sources) else {
        return Ok(InstanceConfig::empty(Platform::None));
    };
    source.fetch(&at(sources, http::Http::new()))
}

/// Where the result is recorded for operators, and what the platform needs for its `Ready` report.
pub const RECORD: &str = "var/lib/foobar/instance.json";

/// Applies what was found under `root`: hostname, the admin's keys, the site's names; records it all. An invalid
/// part (a bad host name, a site rename that cannot be done) is added to `errors` and skipped, the rest applied;
/// only a file that cannot be written fails the whole.
pub fn apply(config: &mut InstanceConfig, root: &Path) -> anyhow::Result<()> {
    let short = config
        .hostname
        .as_deref()
        .map(|name| (name.to_string(), name.split('.').next().unwrap_or(name).to_string()));
    match short {
        Some((name, short)) if !valid_hostname(&short) => config.errors.push(format!(
            "the platform's hostname `{name}` is not a valid host name: kept the image's"
        )),
        Some((_, short)) => set_hostname(root, &short)?,
        None => {}
    }
    if config.node.is_some() || config.secrets.is_some() {
        // For `foobar-agent node`, which runs next: readable by root only (the secrets).
        let file = crate::cluster::NodeFile {
            name: config.node.clone(),
            secrets: config.secrets.clone().unwrap_or_default(),
        };
        write(root, crate::cluster::NODE_FILE, &toml::to_string(&file)?, 0o600)?;
    }
    apply_keys_and_site(config, root)
}

fn set_hostname(root: &Path, short: &str) -> anyhow::Result<()> {
    {
        write(root, "etc/hostname", &format!("{short}\n"), 0o644)?;
        let hosts = std::fs::read_to_string(root.join("etc/hosts")).unwrap_or_default();
        let mut lines: Vec<String> = hosts
            .lines()
            .filter(|l| !l.starts_with("127.0.1.1"))
            .map(String::from)
            .collect();
        lines.insert(1.min(lines.len()), format!("127.0.1.1 {short}"));
        write(root, "etc/hosts", &(lines.join("\n") + "\n"), 0o644)?;
        if root == Path::new("/") {
            let c = std::ffi::CString::new(short)?;
            // SAFETY: a valid NUL-terminated buffer of the given length.
            if unsafe { libc::sethostname(c.as_ptr(), short.len()) } != 0 {
                tracing::warn!(error = %std::io::Error::last_os_error(), "cannot set the running host name");
            }
        }
    }
    Ok(())
}

fn apply_keys_and_site(config: &mut InstanceConfig, root: &Path) -> anyhow::Result<()> {
    let keys: Vec<&String> = config.ssh_keys.iter().filter(|k| valid_key(k)).collect();
    if keys.len() != config.ssh_keys.len() {
        tracing::warn!(
            ignored = config.ssh_keys.len() - keys.len(),
            "lines that are not OpenSSH public keys ignored"
        );
    }
    if !keys.is_empty() {
        let path = "etc/ssh/authorized_keys/admin";
        let mut text = std::fs::read_to_string(root.join(path)).unwrap_or_default();
        for key in keys {
            if !text.lines().any(|l| l.trim() == key.as_str()) {
                text.push_str(key);
                text.push('\n');
            }
        }
        write(root, path, &text, 0o644)?;
    }
    if let Some(site) = config.site.clone() {
        if let Err(err) = override_site(root, &site) {
            config.errors.push(format!("{err:#}"));
        }
    }
    if let Some(tls) = config.tls.clone() {
        match install_tls(root, &tls) {
            Ok(paths) => config
                .notes
                .push(format!("TLS certificate from the instance configuration: {paths}")),
            Err(err) => config.errors.push(format!("{err:#}")),
        }
    }
    if let Some(acme) = config.acme.clone() {
        match acme.apply(root) {
            Ok(()) => config
                .notes
                .push(format!("ACME settings from the instance configuration: {acme:?}")),
            Err(err) => config.errors.push(format!("{err:#}")),
        }
    }
    write(root, RECORD, &serde_json::to_string_pretty(config)?, 0o644)?;
    Ok(())
}

/// `site.env` as the image wrote it, under `root`.
pub(crate) const SITE_ENV: &str = "etc/foobar/site.env";

pub fn read_site_env(root: &Path) -> anyhow::Result<String> {
    let path = root.join(SITE_ENV);
    std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// A value of `site.env` (`KEY='value'`, single-quoted shell), unquoted.
pub fn site_env_value(env: &str, key: &str) -> Option<String> {
    env.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim_matches('\'').to_string())
}

/// Renames the site: the nginx server names and redirect target, and `site.env` (which the TLS step reads after this).
/// Each line is rewritten once, from what it was, so swapping the two names swaps them (no chained replacement).
fn override_site(root: &Path, site: &SiteOverride) -> anyhow::Result<()> {
    let env = read_site_env(root)?;
    let value = |key: &str| site_env_value(&env, key).unwrap_or_default();
    let (old_domain, old_canonical) = (value("DOMAIN"), value("CANONICAL"));
    let domain = site.domain.clone().unwrap_or(old_domain.clone());
    let canonical = site.canonical.clone().unwrap_or(old_canonical.clone());
    if domain == canonical {
        bail!("user data: key `site`: the domain and the canonical name must differ (both are `{domain}`)");
    }
    let nginx_path = root.join("etc/nginx/sites-available/foobar");
    let nginx =
        std::fs::read_to_string(&nginx_path).with_context(|| format!("cannot read {}", nginx_path.display()))?;
    let (canonical_line, domain_line) = (
        format!("server_name {old_canonical};"),
        format!("server_name {old_domain};"),
    );
    let redirect = format!("://{old_canonical}$request_uri");
    let nginx: String = nginx
        .lines()
        .map(|line| {
            let trimmed = line.trim();
            if trimmed == canonical_line {
                line.replace(&canonical_line, &format!("server_name {canonical};"))
            } else if trimmed == domain_line {
                line.replace(&domain_line, &format!("server_name {domain};"))
            } else if line.contains(&redirect) {
                line.replace(&redirect, &format!("://{canonical}$request_uri"))
            } else {
                line.to_string()
            }
        })
        .map(|l| l + "\n")
        .collect();
    write(root, "etc/nginx/sites-available/foobar", &nginx, 0o644)?;
    set_site_env(root, &env, &[("DOMAIN", domain), ("CANONICAL", canonical)])
}

/// Writes `site.env` (its text `env`, as read) with each `(KEY, value)` set: its line replaced where it has one,
/// appended otherwise. Values are checked plain text (no quote), written single-quoted for the shell that sources it.
pub(crate) fn set_site_env(root: &Path, env: &str, values: &[(&str, String)]) -> anyhow::Result<()> {
    let line = |key: &str| {
        values
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(k, v)| format!("{k}='{v}'"))
    };
    let mut text = String::new();
    let mut set = Vec::new();
    for l in env.lines() {
        match l.split_once('=').and_then(|(key, _)| line(key).map(|new| (key, new))) {
            Some((key, new)) => {
                set.push(key.to_string());
                text.push_str(&new);
            }
            None => text.push_str(l),
        }
        text.push('\n');
    }
    for (key, _) in values.iter().filter(|(k, _)| !set.iter().any(|s| s == k)) {
        text.push_str(&line(key).expect("a key of values"));
        text.push('\n');
    }
    write(root, SITE_ENV, &text, 0o644)
}

/// Writes the certificate (0644) and key (0600) where `site.env` names them; returns the two paths.
fn install_tls(root: &Path, tls: &TlsFiles) -> anyhow::Result<String> {
    tls.validate().map_err(anyhow::Error::msg)?;
    let env = read_site_env(root)?;
    let value = |key: &str| {
        site_env_value(&env, key)
            .filter(|v| v.starts_with('/'))
            .with_context(|| format!("/{SITE_ENV} names no {key}"))
    };
    let (cert, key) = (value("TLS_CERTIFICATE")?, value("TLS_KEY")?);
    for (path, text, mode) in [(&key, &tls.key, 0o600), (&cert, &tls.certificate, 0o644)] {
        let relative = path.trim_start_matches('/');
        if let Some(dir) = root.join(relative).parent().filter(|d| !d.exists()) {
            std::fs::create_dir_all(dir)?;
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        write(root, relative, text, mode)?;
    }
    Ok(format!("{cert} and {key}"))
}

pub(crate) fn write(root: &Path, path: &str, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let full = root.join(path);
    if let Some(dir) = full.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = full.with_extension("foobar-new");
    let _ = std::fs::remove_file(&partial);
    // Created with its final mode (a key is never readable by others, not even for a moment), synced, then renamed.
    let written = (|| -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&partial)?;
        file.write_all(text.as_bytes())?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()
    })();
    written.with_context(|| format!("cannot write {}", full.display()))?;
    std::fs::rename(&partial, &full).with_context(|| format!("cannot replace {}", full.display()))?;
    Ok(())
}

/// Present while the platform has not answered once: `foobar-instance-config.service` asks again on every boot.
pub const PENDING: &str = "var/lib/foobar/instance-config.pending";

/// Marks the instance configuration as still to be asked for (with why), or done.
pub fn set_pending(root: &Path, error: Option<&str>) -> anyhow::Result<()> {
    match error {
        Some(error) => write(root, PENDING, &format!("{error}\n"), 0o644),
        None => match std::fs::remove_file(root.join(PENDING)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                Err(err).with_context(|| format!("cannot remove /{PENDING}"))
            }
            _ => Ok(()),
        },
    }
}

/// Records that first boot could not configure the instance (under `root`), for the platform's report.
pub fn record_failure(root: &Path, platform: Platform, error: &str) -> anyhow::Result<()> {
    let doc = serde_json::json!({ "platform": platform, "error": error });
    write(root, RECORD, &serde_json::to_string_pretty(&doc)?, 0o644)
}

/// How long the report keeps trying: real agents keep reporting for many minutes while Azure waits (it fails the VM
/// after its own provisioning timeout, 20 minutes by default, hears nothing).
pub const REPORT_BUDGET: std::time::Duration = std::time::Duration::from_secs(20 * 60);

/// Tells the platform how provisioning went (every boot, after first boot): `Ready`, or `NotReady` with the error
/// first boot recorded. Returns the platform and what was said, or `None` where the platform waits for nothing.
/// Blocking; retried within `budget`.
pub fn report(sources: &Sources, budget: std::time::Duration) -> anyhow::Result<Option<(Platform, String)>> {
    let Some(source) = detect(sources) else {
        return Ok(None);
    };
    let outcome = match std::fs::read_to_string(sources.root.join(RECORD)) {
        Ok(text) => {
            let doc: Value = serde_json::from_str(&text).with_context(|| format!("cannot read /{RECORD}"))?;
            let errors: Vec<&str> = doc
                .get("error")
                .and_then(Value::as_str)
                .into_iter()
                .chain(doc["errors"].as_array().into_iter().flatten().filter_map(Value::as_str))
                .collect();
            if errors.is_empty() {
                Outcome::Provisioned
            } else {
                Outcome::Failed(errors.join("; "))
            }
        }
        Err(_) => Outcome::Failed("first boot recorded no instance configuration".into()),
    };
    let said = source.report(&at(sources, http::Http::with_budget(budget)), &outcome)?;
    Ok(said.map(|said| (source.platform(), said)))
}
