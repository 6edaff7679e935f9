//! GCE: the metadata server with `Metadata-Flavor: Google`, read in one request (`?recursive=true&alt=json`, as
//! Google's guest agent reads it).
//!
//! SSH keys follow Google's documented rules, for the image's admin user only:
//! - `enable-oslogin` true (the instance's attribute, else the project's): OS Login owns SSH access, so no metadata
//!   key is installed (the image's own keys stay) and the notes say so;
//! - the instance's `ssh-keys` and legacy `sshKeys`; the project's `ssh-keys` and `sshKeys` too, unless the instance
//!   sets `block-project-ssh-keys` true or has a legacy `sshKeys` of its own;
//! - each line is `user:key`; a line without a user, a key for another user, and a key whose `google-ssh` comment has
//!   an `expireOn` in the past (or none that can be read) are not installed, each named in the notes.
//!
//! The hostname is `instance/hostname`'s first label when set, else `instance/name`. User data is the `user-data`
//! attribute, base64 when `user-data-encoding` is `base64`, and may be gzip.

use anyhow::Context as _;
use serde_json::Value;

use super::{userdata, Fetch, InstanceConfig, Platform, Probe, Source, ADMIN};

pub struct Gce;

impl Source for Gce {
    fn platform(&self) -> Platform {
        Platform::Gce
    }

    fn detect(&self, probe: &Probe) -> bool {
        probe.sys_vendor == "Google" || probe.product_name == "Google Compute Engine"
    }

    fn fetch(&self, at: &Fetch) -> anyhow::Result<InstanceConfig> {
        let mut config = InstanceConfig::empty(Platform::Gce);
        let text = at
            .http
            .get(
                &format!("{}/computeMetadata/v1/?recursive=true&alt=json", at.base),
                &[("Metadata-Flavor", "Google")],
            )?
            .context("the GCE metadata server has no metadata")?;
        let doc: Value = serde_json::from_str(&text).context("GCE metadata: not JSON")?;
        let (instance, project) = (&doc["instance"], &doc["project"]);
        let attribute = |of: &Value, name: &str| of["attributes"][name].as_str().map(str::to_string);
        let truthy = |v: Option<String>| {
            v.is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
        };

        config.hostname = instance["hostname"]
            .as_str()
            .filter(|h| !h.trim().is_empty())
            .or(instance["name"].as_str())
            .map(|h| h.trim().to_string());

        let oslogin = attribute(instance, "enable-oslogin").or_else(|| attribute(project, "enable-oslogin"));
        if truthy(oslogin) {
            config.notes.push(
                "GCE: enable-oslogin is true: SSH access is left to OS Login, so no metadata key is installed \
                 (OS Login needs Google's guest environment, which this image does not ship: log in with the \
                 image's own keys, or turn OS Login off for this instance)"
                    .into(),
            );
        } else {
            let mut lists = vec![
                ("instance ssh-keys", attribute(instance, "ssh-keys")),
                ("instance sshKeys", attribute(instance, "sshKeys")),
            ];
            let legacy = attribute(instance, "sshKeys").is_some();
            if truthy(attribute(instance, "block-project-ssh-keys")) || legacy {
                if attribute(project, "ssh-keys").is_some() || attribute(project, "sshKeys").is_some() {
                    let why = if legacy {
                        "the instance's legacy sshKeys"
                    } else {
                        "block-project-ssh-keys"
                    };
                    config.notes.push(format!("GCE: project keys not installed ({why})"));
                }
            } else {
                lists.push(("project ssh-keys", attribute(project, "ssh-keys")));
                lists.push(("project sshKeys", attribute(project, "sshKeys")));
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            for (source, list) in lists {
                for line in list
                    .unwrap_or_default()
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                {
                    match admin_key(line, now) {
                        Ok(key) => config.ssh_keys.push(key),
                        Err(why) => config.notes.push(format!("GCE {source}: {why}")),
                    }
                }
            }
        }

        if let Some(data) = attribute(instance, "user-data") {
            let encoding = attribute(instance, "user-data-encoding").unwrap_or_default();
            let bytes = if encoding.trim().eq_ignore_ascii_case("base64") {
                userdata::base64(&data)
                    .map_err(|_| "GCE user data: user-data-encoding is base64 but it is not".to_string())
            } else {
                Ok(data.into_bytes())
            };
            match bytes {
                Ok(bytes) => userdata::read(&bytes, &mut config),
                Err(err) => config.errors.push(err),
            }
        }
        Ok(config)
    }
}

/// The key of a `user:key` line when it is the admin's and not expired; otherwise why not (naming no key material).
pub fn admin_key(line: &str, now: i64) -> Result<String, String> {
    let Some((user, key)) = line.split_once(':').filter(|(u, _)| !u.contains(' ')) else {
        return Err("a line without `user:` not installed".into());
    };
    let key = key.trim();
    if user != ADMIN {
        return Err(format!(
            "key for user `{user}` not installed (only `{ADMIN}`'s keys are)"
        ));
    }
    // `TYPE DATA google-ssh {"userName":"...","expireOn":"..."}`: an expiring key.
    let fields: Vec<&str> = key.splitn(4, ' ').collect();
    if fields.len() >= 3 && fields[2] == "google-ssh" {
        let expiry = fields
            .get(3)
            .and_then(|json| serde_json::from_str::<Value>(json).ok())
            .and_then(|doc| doc["expireOn"].as_str().and_then(parse_time));
        match expiry {
            None => {
                return Err(format!(
                    "{user}'s google-ssh key without a readable expireOn not installed"
                ))
            }
            Some(at) if at <= now => return Err(format!("{user}'s google-ssh key expired, not installed")),
            Some(_) => {}
        }
    }
    Ok(key.to_string())
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS` followed by `Z`, `+0000` or `+00:00` (any offset), as
/// `expireOn` is written (RFC 3339, or with a colon-less offset).
pub fn parse_time(text: &str) -> Option<i64> {
    let text = text.trim();
    if text.len() < 20 || !text.is_char_boundary(19) {
        return None;
    }
    let (stamp, zone) = text.split_at(19);
    let b = stamp.as_bytes();
    if b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b't' || b[10] == b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| stamp.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, s) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    // Fractional seconds, then the offset.
    let zone = zone
        .strip_prefix('.')
        .map_or(zone, |z| z.trim_start_matches(|c: char| c.is_ascii_digit()));
    let offset = match zone {
        "Z" | "z" => 0,
        _ => {
            let sign = match zone.chars().next()? {
                '+' => 1,
                '-' => -1,
                _ => return None,
            };
            let digits: String = zone[1..].chars().filter(|c| *c != ':').collect();
            if digits.len() != 4 || !digits.chars().all(|c| c.is_ascii_digit()) {
                return None;
            }
            sign * (digits[..2].parse::<i64>().ok()? * 3600 + digits[2..].parse::<i64>().ok()? * 60)
        }
    };
    // Days from the civil date (proleptic Gregorian).
    let (y, m) = if mo <= 2 { (y - 1, mo + 9) } else { (y, mo - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + s - offset)
}
