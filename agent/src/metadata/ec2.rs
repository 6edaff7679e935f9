//! EC2: IMDSv2 (a session token first), IMDSv1 when the service offers no token.

use super::{read_user_data, Fetch, InstanceConfig, Platform, Probe, Source};

pub struct Ec2;

impl Source for Ec2 {
    fn platform(&self) -> Platform {
        Platform::Ec2
    }

    fn detect(&self, probe: &Probe) -> bool {
        let bios = format!("{} {}", probe.bios_vendor, probe.bios_version).to_lowercase();
        probe.sys_vendor == "Amazon EC2" || bios.contains("amazon")
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
        if let Some(user_data) = get("user-data")? {
            read_user_data(&user_data, &mut config)?;
        }
        Ok(config)
    }
}
