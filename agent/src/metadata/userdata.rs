//! User data, read the way the clouds' own tooling writes it.
//!
//! Decoding first: gzip (EC2 and GCE accept compressed user data; the magic bytes tell it) and base64 (Azure always,
//! GCE when `user-data-encoding: base64`). Then the format, by its first line or headers:
//! - `#foobar-config`: TOML, `[site] domain = "..."` and `canonical = "..."`, `[tls]`, `[acme]`, and for a cluster
//!   node `[node] name = "..."` and `[secrets]`;
//! - `#cloud-config`: YAML (block or flow style), read with a real YAML parser: `hostname`, `fqdn`,
//!   `ssh_authorized_keys`, and `users:` entries for the admin user (or `default`, which is the admin);
//! - MIME multi-part (what `write-mime-multipart` and Terraform's cloud-init provider make): each part as above.
//!
//! Whatever is not acted on (a shell script, another user, `packages:`, ...) is named in `notes`, which the agent
//! prints to the journal and records; nothing is dropped silently. A part or key we act on that is malformed is
//! named in `errors` and skipped: every valid part still applies (the admin's keys above all).

use std::io::Read as _;

use anyhow::{bail, Context as _};
use yaml_rust2::{Yaml, YamlLoader};

use super::{valid_hostname, InstanceConfig, SiteOverride, TlsFiles, ADMIN};

/// Decompressed user data larger than this is refused (the clouds' own limits are far below).
const MAX_DECODED: u64 = 4 << 20;

/// Reads user data (raw bytes as the platform served them) into `config`; what cannot be read is in its `errors`.
pub fn read(bytes: &[u8], config: &mut InstanceConfig) {
    let result = gunzip(bytes).and_then(|bytes| {
        let text = String::from_utf8_lossy(&bytes);
        read_text(text.trim_start_matches('\u{feff}'), config, "user data")
    });
    if let Err(err) = result {
        config.errors.push(format!("{err:#}"));
    }
}

/// Decompresses gzip data (told by its magic bytes); anything else is returned as it is.
pub fn gunzip(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes.to_vec());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(MAX_DECODED + 1)
        .read_to_end(&mut out)
        .context("user data: gzip data that does not decompress")?;
    if out.len() as u64 > MAX_DECODED {
        bail!("user data: more than {} MiB once decompressed", MAX_DECODED >> 20);
    }
    Ok(out)
}

fn read_text(text: &str, config: &mut InstanceConfig, what: &str) -> anyhow::Result<()> {
    let first = text.lines().next().unwrap_or("").trim_end();
    if text.trim().is_empty() {
        Ok(())
    } else if let Some(fragment) = text.strip_prefix("#foobar-config") {
        foobar_fragment(fragment, config, what)
    } else if first == "#cloud-config" || first.starts_with("#cloud-config ") {
        cloud_config(text, config, what)
    } else if is_mime(text) {
        mime(text, config)
    } else {
        let kind = if first.starts_with("#!") {
            "a script (this image runs no user-data scripts)".to_string()
        } else if first.starts_with('#') {
            format!(
                "`{}` (not a format this image reads)",
                first.chars().take(40).collect::<String>()
            )
        } else {
            "data without a `#cloud-config` or `#foobar-config` first line".to_string()
        };
        config.notes.push(format!("{what}: {kind}: not acted on"));
        Ok(())
    }
}

fn foobar_fragment(fragment: &str, config: &mut InstanceConfig, what: &str) -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Fragment {
        site: Option<SiteOverride>,
        tls: Option<TlsFiles>,
        acme: Option<crate::acme::AcmeOverride>,
        node: Option<NodeName>,
        secrets: Option<crate::cluster::Secrets>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NodeName {
        name: String,
    }
    let fragment: Fragment =
        toml::from_str(fragment).with_context(|| format!("{what}: invalid #foobar-config fragment"))?;
    if let Some(site) = &fragment.site {
        for name in [&site.domain, &site.canonical].into_iter().flatten() {
            if !valid_hostname(name) {
                bail!("{what}: key `site`: expected DNS names, got `{name}`");
            }
        }
    }
    if let Some(tls) = &fragment.tls {
        tls.validate().map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    }
    if let Some(acme) = &fragment.acme {
        acme.validate().map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    }
    if let Some(node) = &fragment.node {
        if !valid_hostname(&node.name) || node.name.contains('.') {
            bail!(
                "{what}: key `node.name`: expected a node name of the cluster description, got `{}`",
                node.name
            );
        }
    }
    if let Some(secrets) = &fragment.secrets {
        secrets.validate().map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    }
    if let Some(node) = fragment.node {
        config.node = Some(node.name);
    }
    if fragment.secrets.is_some() {
        config.secrets = fragment.secrets;
    }
    if fragment.site.is_some() {
        config.site = fragment.site;
    }
    if fragment.acme.is_some() {
        config.acme = fragment.acme;
    }
    if fragment.tls.is_some() {
        config.tls = fragment.tls;
    }
    Ok(())
}

/// The keys of a cloud-config document this image acts on; every other top-level key is named in the notes.
fn cloud_config(text: &str, config: &mut InstanceConfig, what: &str) -> anyhow::Result<()> {
    let docs = YamlLoader::load_from_str(text)
        .map_err(|e| anyhow::anyhow!("{what}: the #cloud-config document is not valid YAML: {e}"))?;
    let doc = match docs.into_iter().next() {
        None | Some(Yaml::Null) => return Ok(()),
        Some(Yaml::Hash(map)) => map,
        Some(_) => bail!("{what}: a #cloud-config document must be a mapping of keys"),
    };
    let mut fqdn = None;
    let mut ignored = Vec::new();
    for (key, value) in &doc {
        let Some(key) = key.as_str() else {
            ignored.push(format!("{key:?}"));
            continue;
        };
        // A bad value is named and skipped; the other keys still apply.
        let result = match key {
            "hostname" => string(value, what, "hostname").map(|v| config.hostname = Some(v)),
            "fqdn" => string(value, what, "fqdn").map(|v| fqdn = Some(v)),
            "ssh_authorized_keys" | "ssh-authorized-keys" => {
                strings(value, what, key).map(|keys| config.ssh_keys.extend(keys))
            }
            "users" => users(value, config, what),
            _ => {
                ignored.push(key.to_string());
                Ok(())
            }
        };
        if let Err(err) = result {
            config.errors.push(format!("{err:#}"));
        }
    }
    if config.hostname.is_none() {
        config.hostname = fqdn;
    }
    if !ignored.is_empty() {
        config.notes.push(format!(
            "{what}: cloud-config keys not acted on: {}",
            ignored.join(", ")
        ));
    }
    Ok(())
}

/// `users:`: `default` is the admin; an entry named like the admin gives its keys; other users are not made.
fn users(value: &Yaml, config: &mut InstanceConfig, what: &str) -> anyhow::Result<()> {
    let Yaml::Array(entries) = value else {
        bail!("{what}: `users` must be a list");
    };
    for entry in entries {
        match entry {
            Yaml::String(name) if name == "default" || name == ADMIN => {}
            Yaml::String(name) => config.notes.push(format!(
                "{what}: user `{name}` not made (this image's one login user is `{ADMIN}`)"
            )),
            Yaml::Hash(map) => {
                let name = map
                    .get(&Yaml::String("name".into()))
                    .map(|v| string(v, what, "users[].name"))
                    .transpose()?
                    .unwrap_or_default();
                let keys = ["ssh_authorized_keys", "ssh-authorized-keys"]
                    .iter()
                    .filter_map(|k| map.get(&Yaml::String((*k).into())))
                    .map(|v| strings(v, what, "users[].ssh_authorized_keys"))
                    .collect::<anyhow::Result<Vec<_>>>()?
                    .concat();
                if name == ADMIN || name == "default" {
                    config.ssh_keys.extend(keys);
                } else {
                    config.notes.push(format!(
                        "{what}: user `{name}` not made and its {} key(s) not installed (this image's one login \
                         user is `{ADMIN}`: give keys to `{ADMIN}` or to the default user)",
                        keys.len()
                    ));
                }
            }
            _ => bail!("{what}: each entry of `users` must be a name or a mapping"),
        }
    }
    Ok(())
}

fn string(value: &Yaml, what: &str, key: &str) -> anyhow::Result<String> {
    match value {
        Yaml::String(s) => Ok(s.trim().to_string()),
        _ => bail!("{what}: `{key}` must be a string"),
    }
}

fn strings(value: &Yaml, what: &str, key: &str) -> anyhow::Result<Vec<String>> {
    match value {
        Yaml::Null => Ok(Vec::new()),
        Yaml::String(s) => Ok(vec![s.trim().to_string()]),
        Yaml::Array(items) => items.iter().map(|v| string(v, what, key)).collect(),
        _ => bail!("{what}: `{key}` must be a list of strings"),
    }
}

/// MIME: the headers come first, before a blank line, and name a content type.
fn is_mime(text: &str) -> bool {
    let head = text.split("\n\n").next().unwrap_or("").to_ascii_lowercase();
    head.lines()
        .any(|l| l.starts_with("content-type:") || l.starts_with("mime-version:"))
}

fn mime(text: &str, config: &mut InstanceConfig) -> anyhow::Result<()> {
    use mail_parser::{MessageParser, MimeHeaders as _, PartType};
    let message = MessageParser::default()
        .parse(text.as_bytes())
        .context("user data: a MIME document that cannot be read")?;
    let mut leaves = 0;
    for (index, part) in message.parts.iter().enumerate() {
        if matches!(part.body, PartType::Multipart(_) | PartType::Message(_)) {
            continue;
        }
        leaves += 1;
        let kind = part
            .content_type()
            .map(|t| format!("{}/{}", t.ctype(), t.subtype().unwrap_or("")).to_ascii_lowercase())
            .unwrap_or_else(|| "text/plain".into());
        let what = format!("user data part {index} ({kind})");
        let contents = gunzip(part.contents())?;
        let body = String::from_utf8_lossy(&contents);
        let body = body.trim_start_matches('\u{feff}');
        match kind.as_str() {
            // The part's type stands for its first line when the line is left out.
            "text/cloud-config" if !body.starts_with("#cloud-config") => {
                cloud_config(&format!("#cloud-config\n{body}"), config, &what)?
            }
            "text/x-foobar-config" if !body.starts_with("#foobar-config") => foobar_fragment(body, config, &what)?,
            _ => read_text(body, config, &what)?,
        }
    }
    if leaves == 0 {
        config.notes.push("user data: a MIME document without parts".into());
    }
    Ok(())
}

/// Base64 (standard alphabet, padding and line breaks allowed).
pub fn base64(text: &str) -> anyhow::Result<Vec<u8>> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut buffer = 0u32;
    let mut bits = 0;
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let value = ALPHABET
            .iter()
            .position(|a| *a == c)
            .context("not a base64 character")? as u32;
        buffer = (buffer << 6) | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    Ok(out)
}
