//! The image configuration (`image/foobar.toml` by default): parsed once, validated, and never read again by stages.

use std::path::Path;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

/// The default configuration, embedded so `imagebuild --out X` needs no file.
pub const DEFAULT_CONFIG: &str = include_str!("../../image/foobar.toml");

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ImageConfig {
    pub debian: Debian,
    pub site: Site,
    pub disk: Disk,
    pub access: Access,
}

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
}

impl Default for Site {
    fn default() -> Self {
        Site {
            domain: "foobar.com".into(),
            canonical: "www.foobar.com".into(),
            tls_certificate: String::new(),
            tls_key: String::new(),
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

fn is_hostname(name: &str) -> bool {
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
    /// Parses `text`; `origin` names the file in every error.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<ImageConfig> {
        let config: ImageConfig = toml::from_str(text).with_context(|| format!("invalid config file {origin}"))?;
        config
            .validate()
            .with_context(|| format!("invalid config file {origin}"))?;
        Ok(config)
    }

    pub fn load(path: Option<&Path>) -> anyhow::Result<ImageConfig> {
        match path {
            None => Self::parse(DEFAULT_CONFIG, "image/foobar.toml (built in)"),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                Self::parse(&text, &path.display().to_string())
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
        for (key, path) in [
            ("site.tls-certificate", &self.site.tls_certificate),
            ("site.tls-key", &self.site.tls_key),
        ] {
            if !path.is_empty() && !path.starts_with('/') {
                bail!("key `{key}`: expected an absolute path on the instance, got `{path}`");
            }
        }
        if self.debian.suite.is_empty() || !self.debian.suite.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!(
                "key `debian.suite`: expected a Debian suite name like bookworm, got `{}`",
                self.debian.suite
            );
        }
        if let Some(bad) = self.debian.packages.iter().find(|p| {
            p.is_empty()
                || !p
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
        }) {
            bail!("key `debian.packages`: expected Debian package names, got `{bad}`");
        }
        if self.disk.size_mib < 1024 {
            bail!(
                "key `disk.size-mib`: expected at least 1024 (the stack needs about 700 MiB), got {}",
                self.disk.size_mib
            );
        }
        if let Some(bad) = self
            .access
            .ssh_authorized_keys
            .iter()
            .find(|k| !k.starts_with("ssh-") && !k.starts_with("ecdsa-"))
        {
            bail!("key `access.ssh-authorized-keys`: expected OpenSSH public keys (ssh-ed25519 AAAA...), got `{bad}`");
        }
        Ok(())
    }
}
