//! GCE: the metadata server with `Metadata-Flavor: Google`.

use super::{read_user_data, Fetch, InstanceConfig, Platform, Probe, Source};

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
        let headers = [("Metadata-Flavor", "Google")];
        let get = |path: &str| at.http.get(&format!("{}/computeMetadata/v1/{path}", at.base), &headers);
        // The instance's name is its short hostname; the full one carries the internal DNS zone.
        config.hostname = get("instance/name")?.map(|h| h.trim().to_string());
        for path in ["project/attributes/ssh-keys", "instance/attributes/ssh-keys"] {
            for line in get(path)?.unwrap_or_default().lines() {
                // `user:ssh-ed25519 AAAA... comment`: every key is installed for the admin user.
                let key = line.split_once(':').map_or(line, |(_, k)| k).trim();
                config.ssh_keys.push(key.to_string());
            }
        }
        if let Some(user_data) = get("instance/attributes/user-data")? {
            read_user_data(&user_data, &mut config)?;
        }
        Ok(config)
    }
}
