//! Azure: IMDS (`Metadata: true`) for the instance, and the wire server's goal state, kept so that the agent can
//! report `Ready` once the site is ready (`report_ready`), as Azure waits for.

use anyhow::Context as _;
use serde_json::Value;

use super::http::Http;
use super::{read_user_data, Fetch, InstanceConfig, Platform, Probe, Source};

/// Azure's chassis asset tag, the documented way to tell an Azure VM.
const ASSET_TAG: &str = "7783-7084-3265-9085-8269-3286-77";
const WIRE_SERVER: &str = "http://168.63.129.16";

/// What Azure's wire server needs to hear `Ready` for this instance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GoalState {
    pub wire_server: String,
    pub incarnation: String,
    pub container_id: String,
    pub instance_id: String,
}

pub struct Azure;

impl Source for Azure {
    fn platform(&self) -> Platform {
        Platform::Azure
    }

    fn detect(&self, probe: &Probe) -> bool {
        probe.chassis_asset_tag == ASSET_TAG
    }

    fn fetch(&self, at: &Fetch) -> anyhow::Result<InstanceConfig> {
        let (http, imds) = (&at.http, &at.base);
        let wire = at.overridden.as_deref().unwrap_or(WIRE_SERVER);
        let mut config = InstanceConfig::empty(Platform::Azure);
        let headers = [("Metadata", "true")];
        let instance = http
            .get(&format!("{imds}/metadata/instance?api-version=2021-02-01"), &headers)?
            .context("Azure IMDS has no instance document")?;
        let doc: Value = serde_json::from_str(&instance).context("Azure IMDS: the instance document is not JSON")?;
        let compute = &doc["compute"];
        config.hostname = compute["osProfile"]["computerName"]
            .as_str()
            .or(compute["name"].as_str())
            .map(String::from);
        for key in compute["publicKeys"].as_array().into_iter().flatten() {
            if let Some(data) = key["keyData"].as_str() {
                config.ssh_keys.push(data.trim().to_string());
            }
        }
        if let Some(encoded) = http.get(
            &format!("{imds}/metadata/instance/compute/userData?api-version=2021-01-01&format=text"),
            &headers,
        )? {
            let decoded = base64_decode(encoded.trim()).context("Azure user data is not base64")?;
            read_user_data(&String::from_utf8_lossy(&decoded), &mut config)?;
        }
        let goal = http
            .get(
                &format!("{wire}/machine/?comp=goalstate"),
                &[("x-ms-version", "2012-11-30"), ("x-ms-agent-name", "foobar-agent")],
            )?
            .context("Azure wire server has no goal state")?;
        let tag = |name: &str| -> anyhow::Result<String> {
            let open = format!("<{name}>");
            let start = goal
                .find(&open)
                .map(|i| i + open.len())
                .with_context(|| format!("goal state without <{name}>"))?;
            let end = goal[start..].find('<').map(|i| start + i).unwrap_or(goal.len());
            Ok(goal[start..end].trim().to_string())
        };
        let state = GoalState {
            wire_server: wire.to_string(),
            incarnation: tag("Incarnation")?,
            container_id: tag("ContainerId")?,
            instance_id: tag("InstanceId")?,
        };
        config.ready_report = Some(serde_json::to_value(state)?);
        Ok(config)
    }

    /// Tells the wire server the instance is `Ready`. Blocking.
    fn report_ready(&self, recorded: &Value) -> anyhow::Result<()> {
        let goal: GoalState =
            serde_json::from_value(recorded.clone()).context("the recorded Azure goal state is not readable")?;
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Health xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" \
             xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\">\n  <GoalStateIncarnation>{}</GoalStateIncarnation>\n  \
             <Container>\n    <ContainerId>{}</ContainerId>\n    <RoleInstanceList>\n      <Role>\n        \
             <InstanceId>{}</InstanceId>\n        <Health>\n          <State>Ready</State>\n        </Health>\n      \
             </Role>\n    </RoleInstanceList>\n  </Container>\n</Health>\n",
            goal.incarnation, goal.container_id, goal.instance_id
        );
        Http::new()
            .send(
                "POST",
                &format!("{}/machine/?comp=health", goal.wire_server),
                &[
                    ("x-ms-version", "2012-11-30"),
                    ("x-ms-agent-name", "foobar-agent"),
                    ("Content-Type", "text/xml; charset=utf-8"),
                ],
                Some(&body),
            )
            .map(|_| ())
    }
}

fn base64_decode(text: &str) -> anyhow::Result<Vec<u8>> {
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
