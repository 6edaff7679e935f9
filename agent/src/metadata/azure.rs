//! Azure: IMDS (`Metadata: true`) for the instance, and the wire server for the provisioning report.
//!
//! IMDS answers 410 for up to 70 s after the VM starts, 429 when asked too fast, and 500 on a passing fault: the
//! client retries all three with backoff. The report goes out on every boot once first boot is over (not at first
//! boot's fetch, and independent of the site's app): the goal state is fetched just before each report (its
//! incarnation and container id change when the VM is redeployed), then `Ready`, or `NotReady` with the reason when
//! provisioning failed, is posted to `/machine?comp=health`, retried for minutes as real agents do.

use anyhow::{bail, Context as _};
use serde_json::Value;

use super::{userdata, Fetch, InstanceConfig, Outcome, Platform, Probe, Source};

/// Azure's chassis asset tag, the documented way to tell an Azure VM.
const ASSET_TAG: &str = "7783-7084-3265-9085-8269-3286-77";
const WIRE_SERVER: &str = "http://168.63.129.16";
const WIRE_HEADERS: [(&str, &str); 2] = [("x-ms-version", "2012-11-30"), ("x-ms-agent-name", "foobar-agent")];

/// What a health report names: the current goal state's incarnation, container and role instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoalState {
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
            match userdata::base64(encoded.trim()) {
                Ok(decoded) => userdata::read(&decoded, &mut config),
                Err(_) => config.errors.push("Azure user data is not base64".into()),
            }
        }
        Ok(config)
    }

    /// Fetches the goal state, then posts the health report; a refused report is tried again with a fresh goal
    /// state until the client's budget runs out.
    fn report(&self, at: &Fetch, outcome: &Outcome) -> anyhow::Result<Option<String>> {
        let wire = at.overridden.as_deref().unwrap_or(WIRE_SERVER);
        let mut pause = std::time::Duration::from_secs(1);
        loop {
            let result = goal_state(at, wire).and_then(|goal| {
                at.http
                    .send(
                        "POST",
                        &format!("{wire}/machine?comp=health"),
                        &[
                            WIRE_HEADERS[0],
                            WIRE_HEADERS[1],
                            ("Content-Type", "text/xml;charset=utf-8"),
                        ],
                        Some(&health(&goal, outcome)),
                    )?
                    .context("the wire server has no health endpoint (404)")?;
                Ok(goal)
            });
            match result {
                Ok(goal) => {
                    let state = match outcome {
                        Outcome::Provisioned => "Ready".to_string(),
                        Outcome::Failed(why) => format!("NotReady ({why})"),
                    };
                    return Ok(Some(format!("{state}, goal state incarnation {}", goal.incarnation)));
                }
                Err(err) if pause < at.http.remaining() => {
                    tracing::warn!(error = %format!("{err:#}"), retry_in = ?pause, "Azure health report not taken; retrying");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_secs(30));
                }
                Err(err) => return Err(err.context("Azure health report")),
            }
        }
    }
}

fn goal_state(at: &Fetch, wire: &str) -> anyhow::Result<GoalState> {
    let goal = at
        .http
        .get(&format!("{wire}/machine/?comp=goalstate"), &WIRE_HEADERS)?
        .context("the wire server has no goal state")?;
    parse_goal_state(&goal)
}

pub fn parse_goal_state(xml: &str) -> anyhow::Result<GoalState> {
    let tag = |name: &str| -> anyhow::Result<String> {
        let open = format!("<{name}>");
        let start = xml
            .find(&open)
            .map(|i| i + open.len())
            .with_context(|| format!("goal state without <{name}>"))?;
        let end = xml[start..].find('<').map(|i| start + i).unwrap_or(xml.len());
        let value = xml[start..end].trim();
        if value.is_empty() || value.contains(['&', '"', '\'']) {
            bail!("goal state with an unusable <{name}>");
        }
        Ok(value.to_string())
    };
    Ok(GoalState {
        incarnation: tag("Incarnation")?,
        container_id: tag("ContainerId")?,
        instance_id: tag("InstanceId")?,
    })
}

/// The health report: `Ready`, or `NotReady` with `ProvisioningFailed` and the reason (escaped, bounded).
pub fn health(goal: &GoalState, outcome: &Outcome) -> String {
    let state = match outcome {
        Outcome::Provisioned => "<State>Ready</State>".to_string(),
        Outcome::Failed(why) => {
            let why: String = why.chars().take(512).collect();
            format!(
                "<State>NotReady</State>\n          <Details>\n            <SubStatus>ProvisioningFailed</SubStatus>\n            \
                 <Description>{}</Description>\n          </Details>",
                xml_escape(&why)
            )
        }
    };
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Health xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" \
         xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\">\n  <GoalStateIncarnation>{}</GoalStateIncarnation>\n  \
         <Container>\n    <ContainerId>{}</ContainerId>\n    <RoleInstanceList>\n      <Role>\n        \
         <InstanceId>{}</InstanceId>\n        <Health>\n          {state}\n        </Health>\n      \
         </Role>\n    </RoleInstanceList>\n  </Container>\n</Health>\n",
        goal.incarnation, goal.container_id, goal.instance_id
    )
}

fn xml_escape(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '&' => "&amp;".into(),
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '"' => "&quot;".into(),
            '\'' => "&apos;".into(),
            c if c.is_control() => " ".into(),
            c => c.to_string(),
        })
        .collect()
}
