//! `foobar-agent acme`: the site's certificate from an ACME CA. The protocol is uacme's (Debian's `uacme`, run as a
//! child); this drives it: the account, the order for the canonical name and the bare domain by HTTP-01 (the hook
//! writes each challenge where nginx serves `/.well-known/acme-challenge/`), installing what was issued where nginx
//! reads the site's certificate, a graceful reload, and retries with backoff. What happened is in the journal and in
//! `status.json`, which `/healthz` shows on the machine.
//!
//! Settings come from `/etc/foobar/site.env` (`ACME`, `ACME_DIRECTORY`, `ACME_EMAIL`, `ACME_RENEW_DAYS`, written by
//! imagebuild from `[acme]` and rewritten by the instance configuration's `[acme]`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use serde::Serialize;

use crate::metadata::{read_site_env, site_env_value, write};

/// Where the account, the issued certificates and the status live (under the root).
pub const STATE_DIR: &str = "var/lib/foobar/acme";
/// What the last attempt did, for `/healthz` (agent config `acme-status`).
pub const STATUS: &str = "var/lib/foobar/acme/status.json";
/// Where the hook writes the challenges; nginx serves `/.well-known/acme-challenge/` from here for both names.
pub const CHALLENGES: &str = "var/lib/foobar/acme/webroot/.well-known/acme-challenge";
/// A CA the instance configuration asked to trust for the ACME server (a private CA); added to the system's bundle.
pub const CA_FILE: &str = "usr/local/share/ca-certificates/foobar-acme.crt";
/// The CAs libcurl (and so uacme) trusts.
const BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";
/// The challenge hook imagebuild installs.
pub const HOOK: &str = "/usr/lib/foobar/acme-hook";

/// Retries: 15 s, doubling to an hour, until a certificate is in place.
const FIRST_RETRY: Duration = Duration::from_secs(15);
const LAST_RETRY: Duration = Duration::from_secs(3600);

/// The settings of one run, from `site.env`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub enabled: bool,
    pub directory: String,
    pub email: String,
    pub renew_days: u32,
    pub canonical: String,
    pub domain: String,
    pub certificate: String,
    pub key: String,
    pub https_only: String,
}

impl Settings {
    pub fn load(root: &Path) -> anyhow::Result<Settings> {
        let env = read_site_env(root)?;
        let value = |key: &str| site_env_value(&env, key).unwrap_or_default();
        let settings = Settings {
            enabled: value("ACME") == "yes",
            directory: value("ACME_DIRECTORY"),
            email: value("ACME_EMAIL"),
            renew_days: value("ACME_RENEW_DAYS").parse().unwrap_or(30),
            canonical: value("CANONICAL"),
            domain: value("DOMAIN"),
            certificate: value("TLS_CERTIFICATE"),
            key: value("TLS_KEY"),
            https_only: value("HTTPS_ONLY"),
        };
        if settings.enabled {
            if !valid_url(&settings.directory) {
                bail!(
                    "/etc/foobar/site.env: ACME_DIRECTORY is not an https:// URL: `{}`",
                    settings.directory
                );
            }
            for (key, path) in [
                ("TLS_CERTIFICATE", &settings.certificate),
                ("TLS_KEY", &settings.key),
                ("HTTPS_ONLY", &settings.https_only),
            ] {
                if !path.starts_with('/') {
                    bail!("/etc/foobar/site.env: {key} is not an absolute path: `{path}`");
                }
            }
        }
        Ok(settings)
    }
}

/// An ACME directory URL: `https://`, a host, then plain URL characters (it reaches `site.env` and a command line).
/// imagebuild checks `acme.directory` with the same rule; a test feeds both the same URLs.
pub fn valid_url(url: &str) -> bool {
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

/// A contact address: `local@domain`, plain characters only (imagebuild's `acme.email` rule).
pub fn valid_email(address: &str) -> bool {
    let Some((local, domain)) = address.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && local.len() <= 64
        && local.chars().all(|c| c.is_ascii_alphanumeric() || "._%+-".contains(c))
        && crate::metadata::valid_hostname(domain)
        && domain.contains('.')
}

/// `[acme]` of the instance configuration's fragment: turns ACME on or off and points it at a CA; each key replaces
/// the image's.
#[derive(Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AcmeOverride {
    pub enabled: Option<bool>,
    pub directory: Option<String>,
    pub email: Option<String>,
    /// PEM: a CA to trust for the ACME server's own HTTPS (a private CA). Not recorded, only whether one came.
    #[serde(skip_serializing)]
    pub ca_certificate: Option<String>,
}

impl std::fmt::Debug for AcmeOverride {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeOverride")
            .field("enabled", &self.enabled)
            .field("directory", &self.directory)
            .field("email", &self.email)
            .field("ca_certificate", &self.ca_certificate.is_some())
            .finish()
    }
}

impl AcmeOverride {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(url) = self.directory.as_deref().filter(|u| !valid_url(u)) {
            return Err(format!(
                "key `acme.directory`: expected the https:// URL of an ACME directory, got `{}`",
                url.escape_debug()
            ));
        }
        if let Some(email) = self.email.as_deref().filter(|e| !e.is_empty() && !valid_email(e)) {
            return Err(format!(
                "key `acme.email`: expected a contact address like ops@foobar.com, got `{}`",
                email.escape_debug()
            ));
        }
        if let Some(ca) = &self.ca_certificate {
            if !ca.contains("-----BEGIN CERTIFICATE-----") || ca.contains("PRIVATE KEY") {
                return Err(
                    "key `acme.ca-certificate`: expected a PEM CA certificate (-----BEGIN CERTIFICATE-----)".into(),
                );
            }
        }
        Ok(())
    }

    /// Rewrites the `ACME*` lines of `site.env` (each value checked above, written single-quoted) and installs the
    /// CA, which the next `foobar-agent acme` adds to the system's bundle.
    pub fn apply(&self, root: &Path) -> anyhow::Result<()> {
        self.validate().map_err(anyhow::Error::msg)?;
        let env = read_site_env(root)?;
        let mut replace: Vec<(&str, String)> = Vec::new();
        if let Some(enabled) = self.enabled {
            replace.push(("ACME", if enabled { "yes" } else { "no" }.to_string()));
        }
        if let Some(url) = &self.directory {
            replace.push(("ACME_DIRECTORY", url.clone()));
        }
        if let Some(email) = &self.email {
            replace.push(("ACME_EMAIL", email.clone()));
        }
        crate::metadata::set_site_env(root, &env, &replace)?;
        if let Some(ca) = &self.ca_certificate {
            write(root, CA_FILE, ca, 0o644)?;
        }
        Ok(())
    }
}

/// What the last attempt did (`status.json`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Status {
    /// `issued` (a certificate from the CA is in place), `retrying` (none yet, or renewal failing) or `off`.
    pub state: String,
    pub directory: String,
    pub names: Vec<String>,
    /// The certificate in place, when it is the CA's: its expiry as openssl prints it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// Unix seconds of the attempt.
    pub checked_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Seconds until the next attempt, while retrying.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_in: Option<u64>,
}

/// Where and how the run works; tests point it at a temporary root and the repository's hook.
#[derive(Debug, Clone)]
pub struct Run {
    pub root: PathBuf,
    pub hook: PathBuf,
    /// One attempt, no retries (the exit status says how it went).
    pub once: bool,
    /// Reload nginx after installing (on the machine itself).
    pub reload: bool,
}

/// What one attempt did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A new certificate was installed and nginx reloaded.
    Installed,
    /// The one in place has more than `renew-days` left.
    Current,
}

/// Runs until a certificate from the CA is in place (one attempt with `once`).
pub fn run(run: &Run) -> anyhow::Result<Option<Outcome>> {
    let settings = Settings::load(&run.root)?;
    if !settings.enabled {
        println!("foobar-agent acme: ACME is off (`[acme] enabled` in the image or the instance configuration)");
        return Ok(None);
    }
    let mut delay = FIRST_RETRY;
    loop {
        match attempt(run, &settings) {
            Ok(outcome) => {
                record(run, &settings, None, None)?;
                match outcome {
                    Outcome::Installed => println!(
                        "foobar-agent acme: certificate for {} and {} from {} installed; nginx reloaded",
                        settings.canonical, settings.domain, settings.directory
                    ),
                    Outcome::Current => println!(
                        "foobar-agent acme: the certificate in place has more than {} days left",
                        settings.renew_days
                    ),
                }
                return Ok(Some(outcome));
            }
            Err(err) if run.once => {
                record(run, &settings, Some(&format!("{err:#}")), None)?;
                return Err(err);
            }
            Err(err) => {
                eprintln!("foobar-agent acme: {err:#}; trying again in {} s", delay.as_secs());
                record(run, &settings, Some(&format!("{err:#}")), Some(delay))?;
                std::thread::sleep(delay);
                delay = (delay * 2).min(LAST_RETRY);
            }
        }
    }
}

/// The account directory for this CA: one per directory host, so a change of CA starts a fresh account.
fn account_dir(run: &Run, settings: &Settings) -> PathBuf {
    let host: String = settings
        .directory
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap_or("ca")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    run.root.join(STATE_DIR).join(host)
}

fn attempt(run: &Run, settings: &Settings) -> anyhow::Result<Outcome> {
    let conf = account_dir(run, settings);
    std::fs::create_dir_all(run.root.join(CHALLENGES))
        .with_context(|| format!("cannot create {}", run.root.join(CHALLENGES).display()))?;
    trust_ca(run)?;
    let uacme = |args: &[&str]| -> anyhow::Result<(i32, String)> {
        let out = tool("uacme")
            .arg("--confdir")
            .arg(&conf)
            .args(["--acme-url", &settings.directory, "--type", "EC", "--verbose"])
            .args(args)
            .env("FOOBAR_ACME_CHALLENGES", run.root.join(CHALLENGES))
            .output()
            .context("cannot run uacme (Debian package uacme)")?;
        let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
        Ok((out.status.code().unwrap_or(-1), text))
    };
    // The account: made once per CA (and its key kept); `new` again after a failure that left only the key.
    let made = conf.join("account.done");
    if !made.exists() {
        let mut args = vec!["--yes", "new"];
        if !settings.email.is_empty() {
            args.push(&settings.email);
        }
        let (code, text) = uacme(&args)?;
        // An account this key already holds (made by a run cut off before its marker) is the one wanted.
        if code != 0 && !text.contains("already exists") {
            bail!(
                "the ACME CA at {} refused a new account: {}",
                settings.directory,
                last_lines(&text)
            );
        }
        std::fs::write(&made, b"").with_context(|| format!("cannot write {}", made.display()))?;
    }
    let days = settings.renew_days.to_string();
    let hook = run.hook.to_string_lossy().into_owned();
    let (code, text) = uacme(&[
        "--days",
        &days,
        "--hook",
        &hook,
        "issue",
        &settings.canonical,
        &settings.domain,
    ])?;
    // uacme: 0 issued, 1 not reissued (still valid for longer than --days), anything else a failure.
    if code != 0 && code != 1 {
        bail!(
            "no certificate for {} and {} from {}: {}",
            settings.canonical,
            settings.domain,
            settings.directory,
            last_lines(&text)
        );
    }
    let issued_cert = conf.join(&settings.canonical).join("cert.pem");
    let issued_key = conf.join("private").join(&settings.canonical).join("key.pem");
    let in_place = |path: &str| std::fs::read(run.root.join(path.trim_start_matches('/'))).unwrap_or_default();
    let cert = std::fs::read(&issued_cert).with_context(|| format!("uacme left no {}", issued_cert.display()))?;
    if code == 1 && cert == in_place(&settings.certificate) {
        return Ok(Outcome::Current);
    }
    // Installed key first, then the certificate, each replaced whole; then the redirect and HSTS; then a graceful
    // reload (connections in flight finish on the old workers).
    let key = std::fs::read(&issued_key).with_context(|| format!("uacme left no {}", issued_key.display()))?;
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).context("uacme wrote a PEM file that is not text");
    write(&run.root, settings.key.trim_start_matches('/'), &text(key)?, 0o600)?;
    write(
        &run.root,
        settings.certificate.trim_start_matches('/'),
        &text(cert)?,
        0o644,
    )?;
    write(
        &run.root,
        settings.https_only.trim_start_matches('/'),
        "set $foobar_trusted 1;\nssl_stapling on;\n",
        0o644,
    )?;
    if run.reload {
        let status = tool("systemctl")
            .args(["reload-or-restart", "nginx.service"])
            .status()
            .context("cannot run systemctl")?;
        if !status.success() {
            bail!("the certificate is installed but nginx did not reload ({status}); see `journalctl -u nginx`");
        }
    }
    Ok(Outcome::Installed)
}

/// A CA from the instance configuration joins the CAs uacme's libcurl trusts (the system bundle). It is appended to
/// the bundle directly: `update-ca-certificates` rebuilds all of it, which took a minute of CPU under emulation. The
/// file stays in `/usr/local/share/ca-certificates`, so the next rebuild (a ca-certificates update) keeps it.
fn trust_ca(run: &Run) -> anyhow::Result<()> {
    let Ok(ca) = std::fs::read_to_string(run.root.join(CA_FILE)) else {
        return Ok(());
    };
    let bundle_path = run.root.join(BUNDLE);
    let bundle = std::fs::read_to_string(&bundle_path).unwrap_or_default();
    if bundle.contains(ca.trim()) {
        return Ok(());
    }
    let mut text = bundle;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(ca.trim());
    text.push('\n');
    write(&run.root, BUNDLE, &text, 0o644)
}

/// A command of the image's own tools (uacme, openssl, systemctl); each caller reads its status and output and
/// names the tool in its error (the builder's `process.rs` rule is about the build's commands).
#[allow(clippy::disallowed_methods)]
fn tool(program: &str) -> Command {
    Command::new(program)
}

/// The end of a tool's output: what went wrong, without pages of protocol.
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

fn record(run: &Run, settings: &Settings, error: Option<&str>, retry: Option<Duration>) -> anyhow::Result<()> {
    let cert = run.root.join(settings.certificate.trim_start_matches('/'));
    let issued = run.root.join(settings.https_only.trim_start_matches('/')).exists();
    let not_after = tool("openssl")
        .args(["x509", "-noout", "-enddate", "-in"])
        .arg(&cert)
        .output()
        .ok()
        .filter(|o| o.status.success() && issued)
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .trim_start_matches("notAfter=")
                .to_string()
        });
    let status = Status {
        state: if error.is_none() && issued {
            "issued"
        } else {
            "retrying"
        }
        .to_string(),
        directory: settings.directory.clone(),
        names: vec![settings.canonical.clone(), settings.domain.clone()],
        not_after,
        checked_at: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        error: error.map(String::from),
        retry_in: retry.map(|d| d.as_secs()),
    };
    write(&run.root, STATUS, &serde_json::to_string_pretty(&status)?, 0o644)
}
