//! EC2: IMDSv2 (a session token first), IMDSv1 when the service offers no token. Told by the DMI vendor, an Amazon
//! BIOS, or (older Xen instances) a product UUID that begins with `ec2`. User data may be gzip.

use super::{userdata, Fetch, InstanceConfig, Platform, Probe, Source};

pub struct Ec2;

impl Source for Ec2 {
    fn platform(&self) -> Platform {
        Platform::Ec2
    }

    fn detect(&self, probe: &Probe) -> bool {
        let bios = format!("{} {}", probe.bios_vendor, probe.bios_version).to_lowercase();
        probe.sys_vendor == "Amazon EC2" || bios.contains("amazon") || ec2_uuid(&probe.product_uuid)
    }

    fn fetch(&self, at: &Fetch) -> anyhow::Result<InstanceConfig> {
        let (http, base) = (&at.http, &at.base);
        let mut config = InstanceConfig::empty(Platform::Ec2);
        let token = match http.send(
            "PUT",
            &format!("{base}/latest/api/token"),
            &[("X-aws-ec2-metadata-token-ttl-seconds", "300")],
            Some(""),
        ) {
            Ok(Some(token)) if !token.trim().is_empty() => Some(token.trim().to_string()),
            Ok(_) => None,
            Err(err) => {
                tracing::info!(error = %err, "no IMDSv2 token; using IMDSv1");
                None
            }
        };
        let headers: Vec<(&str, &str)> = token
            .as_deref()
            .map(|t| vec![("X-aws-ec2-metadata-token", t)])
            .unwrap_or_default();
        let get = |path: &str| http.get(&format!("{base}/latest/{path}"), &headers);
        config.hostname = get("meta-data/local-hostname")?.map(|h| h.trim().to_string());
        if let Some(list) = get("meta-data/public-keys/")? {
            for line in list.lines() {
                let index = line.split('=').next().unwrap_or("").trim();
                if index.is_empty() {
                    continue;
                }
                if let Some(key) = get(&format!("meta-data/public-keys/{index}/openssh-key"))? {
                    config.ssh_keys.extend(key.lines().map(|l| l.trim().to_string()));
                }
            }
        }
        if let Some(user_data) = http.get_bytes(&format!("{base}/latest/user-data"), &headers)? {
            userdata::read(&user_data, &mut config);
        }
        Ok(config)
    }
}

/// Whether a product UUID is EC2's: it begins with `ec2`, or does once its first field's bytes are swapped (firmware
/// that presents the UUID little-endian shows `45E12AEC-...` for `EC2AE145-...`).
pub fn ec2_uuid(uuid: &str) -> bool {
    let uuid = uuid.trim().to_ascii_lowercase();
    let Some(first) = uuid.get(..8).filter(|f| f.chars().all(|c| c.is_ascii_hexdigit())) else {
        return false;
    };
    let swapped: String = (0..4).rev().map(|i| &first[i * 2..i * 2 + 2]).collect();
    uuid.starts_with("ec2") || swapped.starts_with("ec2")
}
