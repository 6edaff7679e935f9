//! Instance configuration from the cloud, read once at first boot (`foobar-agent instance-config`, run by the
//! first-boot script as root): the hostname, the admin's SSH keys and optionally the site's domain.
//!
//! The platform is told by its DMI/SMBIOS strings, so a machine that is no cloud's asks nothing and waits for nothing.
//! Sources: a NoCloud seed (a volume labelled `cidata` with `meta-data` and `user-data`), EC2 (IMDSv2, IMDSv1 when
//! the token is refused), GCE (`Metadata-Flavor: Google`) and Azure (IMDS; its wire server's goal state is kept so the
//! agent can report `Ready` once the site is ready, see `azure_report_ready`).
//!
//! User data may be a `#cloud-config` document (`hostname:` and `ssh_authorized_keys:` are read) or a foobar fragment
//! starting with `#foobar-config`, TOML with `[site] domain = "..."` and `canonical = "..."`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;
use serde_json::Value;

/// Where every cloud puts its metadata service (Azure's wire server aside).
const LINK_LOCAL: &str = "http://169.254.169.254";
const AZURE_WIRE_SERVER: &str = "http://168.63.129.16";
/// Azure's chassis asset tag, the documented way to tell an Azure VM.
const AZURE_ASSET_TAG: &str = "7783-7084-3265-9085-8269-3286-77";
/// Each request: connect and answer within this, tried this many times.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const ATTEMPTS: u32 = 3;
/// How long to wait for the network (DHCP) before the first request can go out, on a detected cloud.
const NETWORK_WAIT: Duration = Duration::from_secs(20);
/// An OEM string (SMBIOS type 11) `foobar:metadata-url=URL` sends every metadata request to URL instead: a proxy,
/// or the test suite's fake metadata server.
const OEM_OVERRIDE: &str = "foobar:metadata-url=";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    NoCloud,
    Ec2,
    Gce,
    Azure,
    None,
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

/// What Azure's wire server needs to hear `Ready` for this instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AzureGoalState {
    pub wire_server: String,
    pub incarnation: String,
    pub container_id: String,
    pub instance_id: String,
}

/// What the platform said about this instance.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceConfig {
    pub platform: Platform,
    pub hostname: Option<String>,
    pub ssh_keys: Vec<String>,
    pub site: Option<SiteOverride>,
    pub azure: Option<AzureGoalState>,
}

impl InstanceConfig {
    fn empty(platform: Platform) -> InstanceConfig {
        InstanceConfig {
            platform,
            hostname: None,
            ssh_keys: Vec::new(),
            site: None,
            azure: None,
        }
    }
}

fn dmi(sources: &Sources, field: &str) -> String {
    std::fs::read_to_string(sources.dmi_dir.join(field))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
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

/// The block device of a NoCloud seed: udev's label link, or, when udev has not got to it yet, the first device
/// whose FAT or ISO 9660 label reads `cidata` (a few sectors read per device; no probing tool to start).
fn seed_device() -> Option<PathBuf> {
    for label in ["cidata", "CIDATA"] {
        let link = Path::new("/dev/disk/by-label").join(label);
        if link.exists() {
            return Some(link);
        }
    }
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/block")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with("loop") && !n.starts_with("ram") && !n.starts_with("zram"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| PathBuf::from("/dev").join(n))
        .find(|device| has_seed_label(device))
}

fn has_seed_label(device: &Path) -> bool {
    use std::os::unix::fs::FileExt as _;
    let Ok(file) = std::fs::File::open(device) else {
        return false;
    };
    let mut boot = [0u8; 512];
    let mut iso = [0u8; 72];
    let is_label = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().eq_ignore_ascii_case("cidata");
    if file.read_exact_at(&mut boot, 0).is_ok() && boot[510..512] == [0x55, 0xAA] {
        // FAT12/16 keep the volume label at 0x2B, FAT32 at 0x47.
        if is_label(&boot[0x2B..0x36]) || is_label(&boot[0x47..0x52]) {
            return true;
        }
    }
    // ISO 9660: the primary volume descriptor in sector 16, its volume id at byte 40.
    file.read_exact_at(&mut iso, 16 * 2048).is_ok() && &iso[1..6] == b"CD001" && is_label(&iso[40..72])
}

/// The platform, by DMI alone (and the NoCloud seed's label). Reads files; never touches the network.
pub fn detect(sources: &Sources) -> Platform {
    if sources.seed_dir.is_some() || (sources.root == Path::new("/") && seed_device().is_some()) {
        return Platform::NoCloud;
    }
    let vendor = dmi(sources, "sys_vendor");
    let product = dmi(sources, "product_name");
    let bios = format!("{} {}", dmi(sources, "bios_vendor"), dmi(sources, "bios_version")).to_lowercase();
    if vendor == "Amazon EC2" || bios.contains("amazon") {
        Platform::Ec2
    } else if vendor == "Google" || product == "Google Compute Engine" {
        Platform::Gce
    } else if dmi(sources, "chassis_asset_tag") == AZURE_ASSET_TAG {
        Platform::Azure
    } else {
        Platform::None
    }
}

fn valid_hostname(name: &str) -> bool {
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

/// Reads user data: `#foobar-config` (TOML `[site]`) or `#cloud-config` (`hostname`, `ssh_authorized_keys`).
fn read_user_data(text: &str, config: &mut InstanceConfig) -> anyhow::Result<()> {
    let text = text.trim_start_matches('\u{feff}');
    if let Some(fragment) = text.strip_prefix("#foobar-config") {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fragment {
            site: Option<SiteOverride>,
        }
        let fragment: Fragment = toml::from_str(fragment).context("user data: invalid #foobar-config fragment")?;
        if let Some(site) = &fragment.site {
            for name in [&site.domain, &site.canonical].into_iter().flatten() {
                if !valid_hostname(name) {
                    bail!("user data: key `site`: expected DNS names, got `{name}`");
                }
            }
        }
        config.site = fragment.site;
    } else if text.starts_with("#cloud-config") {
        let mut in_keys = false;
        for line in text.lines() {
            let trimmed = line.trim();
            if let Some(value) = trimmed.strip_prefix("hostname:") {
                config.hostname = Some(unquote(value));
                in_keys = false;
            } else if trimmed.starts_with("ssh_authorized_keys:") {
                in_keys = true;
            } else if let (true, Some(item)) = (in_keys, trimmed.strip_prefix("- ")) {
                config.ssh_keys.push(unquote(item));
            } else if !line.starts_with(' ') && !trimmed.is_empty() {
                in_keys = false;
            }
        }
    }
    Ok(())
}

fn unquote(value: &str) -> String {
    value.trim().trim_matches(|c| c == '"' || c == '\'').to_string()
}

/// A small HTTP client: bounded time per request, bounded attempts, never a redirect.
struct Http {
    agent: ureq::Agent,
    started: Instant,
}

impl Http {
    fn new() -> Http {
        Http {
            agent: ureq::AgentBuilder::new()
                .timeout_connect(REQUEST_TIMEOUT)
                .timeout(REQUEST_TIMEOUT)
                .redirects(0)
                .build(),
            started: Instant::now(),
        }
    }

    /// Sends until an HTTP answer arrives. Connection errors are retried (quickly at first, while DHCP finishes);
    /// an HTTP status is an answer. `Ok(None)` is a 404.
    fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> anyhow::Result<Option<String>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut request = self.agent.request(method, url);
            for (name, value) in headers {
                request = request.set(name, value);
            }
            let result = match body {
                Some(body) => request.send_string(body),
                None => request.call(),
            };
            match result {
                Ok(response) => return Ok(Some(response.into_string()?)),
                Err(ureq::Error::Status(404, _)) => return Ok(None),
                Err(ureq::Error::Status(code, response)) => {
                    let text = response.into_string().unwrap_or_default();
                    bail!("{method} {url}: {code} {}", text.chars().take(200).collect::<String>());
                }
                Err(err) => {
                    // The network may still be coming up: keep trying for a while, then give up.
                    let waited = self.started.elapsed();
                    if attempt >= ATTEMPTS && waited >= NETWORK_WAIT {
                        bail!("{method} {url}: {err}");
                    }
                    let pause = if waited < NETWORK_WAIT { 250 } else { 500 };
                    tracing::debug!(%url, error = %err, attempt, "metadata request failed; retrying");
                    std::thread::sleep(Duration::from_millis(pause));
                }
            }
        }
    }

    fn get(&self, url: &str, headers: &[(&str, &str)]) -> anyhow::Result<Option<String>> {
        self.send("GET", url, headers, None)
    }
}

fn ec2(http: &Http, base: &str) -> anyhow::Result<InstanceConfig> {
    let mut config = InstanceConfig::empty(Platform::Ec2);
    // IMDSv2: a session token first; IMDSv1 (no token) when the service does not offer one.
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

fn gce(http: &Http, base: &str) -> anyhow::Result<InstanceConfig> {
    let mut config = InstanceConfig::empty(Platform::Gce);
    let headers = [("Metadata-Flavor", "Google")];
    let get = |path: &str| http.get(&format!("{base}/computeMetadata/v1/{path}"), &headers);
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

fn azure(http: &Http, imds: &str, wire: &str) -> anyhow::Result<InstanceConfig> {
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
    config.azure = Some(AzureGoalState {
        wire_server: wire.to_string(),
        incarnation: tag("Incarnation")?,
        container_id: tag("ContainerId")?,
        instance_id: tag("InstanceId")?,
    });
    Ok(config)
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

/// The NoCloud seed's `meta-data` (`local-hostname: x`) and `user-data`.
fn nocloud(dir: &Path) -> anyhow::Result<InstanceConfig> {
    let mut config = InstanceConfig::empty(Platform::NoCloud);
    let meta = std::fs::read_to_string(dir.join("meta-data")).unwrap_or_default();
    for line in meta.lines() {
        if let Some(value) = line.trim().strip_prefix("local-hostname:") {
            config.hostname = Some(unquote(value));
        }
    }
    if let Ok(user_data) = std::fs::read_to_string(dir.join("user-data")) {
        read_user_data(&user_data, &mut config)?;
    }
    Ok(config)
}

/// Mounts the `cidata` volume read-only for the duration of `f`.
fn with_seed<T>(f: impl FnOnce(&Path) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let device = seed_device().context("no cidata volume")?;
    let mount_point = Path::new("/run/foobar/seed");
    std::fs::create_dir_all(mount_point)?;
    #[allow(clippy::disallowed_methods)] // the agent's one-shot mount of the seed, not a builder tool
    let status = std::process::Command::new("mount")
        .args(["-o", "ro,nosuid,nodev,noexec"])
        .arg(&device)
        .arg(mount_point)
        .status()
        .context("cannot run mount")?;
    if !status.success() {
        bail!("cannot mount the NoCloud seed {}: mount {status}", device.display());
    }
    let result = f(mount_point);
    #[allow(clippy::disallowed_methods)]
    let _ = std::process::Command::new("umount").arg(mount_point).status();
    result
}

/// Asks the platform (blocking; bounded by the timeouts above).
pub fn fetch(sources: &Sources) -> anyhow::Result<InstanceConfig> {
    let platform = detect(sources);
    let overridden = sources.metadata_url.clone().or_else(|| {
        let raw = std::fs::read(&sources.oem_strings).ok()?;
        oem_strings(&raw)
            .into_iter()
            .find_map(|s| s.strip_prefix(OEM_OVERRIDE).map(String::from))
    });
    let base = overridden.clone().unwrap_or_else(|| LINK_LOCAL.to_string());
    let http = Http::new();
    match platform {
        Platform::None => Ok(InstanceConfig::empty(Platform::None)),
        Platform::NoCloud => match &sources.seed_dir {
            Some(dir) => nocloud(dir),
            None => with_seed(nocloud),
        },
        Platform::Ec2 => ec2(&http, &base),
        Platform::Gce => gce(&http, &base),
        Platform::Azure => azure(&http, &base, overridden.as_deref().unwrap_or(AZURE_WIRE_SERVER)),
    }
}

/// Where the result is recorded for operators, and Azure's goal state for the `Ready` report.
pub const RECORD: &str = "var/lib/foobar/instance.json";

/// Applies what was found under `root`: hostname, the admin's keys, the site's names; records it all.
pub fn apply(config: &InstanceConfig, root: &Path) -> anyhow::Result<()> {
    if let Some(name) = &config.hostname {
        // Clouds hand out fully qualified names; the machine's own name is the first label.
        let short = name.split('.').next().unwrap_or(name);
        if !valid_hostname(short) {
            bail!("the platform's hostname `{name}` is not a valid host name");
        }
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
    if let Some(site) = &config.site {
        override_site(root, site)?;
    }
    write(root, RECORD, &serde_json::to_string_pretty(config)?, 0o644)?;
    Ok(())
}

/// Renames the site: the nginx server names and redirect target, and `site.env` (which the TLS step reads after this).
fn override_site(root: &Path, site: &SiteOverride) -> anyhow::Result<()> {
    let env_path = root.join("etc/foobar/site.env");
    let env = std::fs::read_to_string(&env_path).with_context(|| format!("cannot read {}", env_path.display()))?;
    let value = |key: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or("")
            .to_string()
    };
    let (old_domain, old_canonical) = (value("DOMAIN"), value("CANONICAL"));
    let domain = site.domain.clone().unwrap_or(old_domain.clone());
    let canonical = site.canonical.clone().unwrap_or(old_canonical.clone());
    let nginx_path = root.join("etc/nginx/sites-available/foobar");
    let nginx =
        std::fs::read_to_string(&nginx_path).with_context(|| format!("cannot read {}", nginx_path.display()))?;
    let nginx = nginx
        .replace(
            &format!("server_name {old_canonical};"),
            &format!("server_name {canonical};"),
        )
        .replace(&format!("server_name {old_domain};"), &format!("server_name {domain};"))
        .replace(
            &format!("://{old_canonical}$request_uri"),
            &format!("://{canonical}$request_uri"),
        );
    write(root, "etc/nginx/sites-available/foobar", &nginx, 0o644)?;
    let env: String = env
        .lines()
        .map(|l| {
            if l.starts_with("DOMAIN=") {
                format!("DOMAIN={domain}")
            } else if l.starts_with("CANONICAL=") {
                format!("CANONICAL={canonical}")
            } else {
                l.to_string()
            }
        })
        .map(|l| l + "\n")
        .collect();
    write(root, "etc/foobar/site.env", &env, 0o644)
}

fn write(root: &Path, path: &str, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let full = root.join(path);
    if let Some(dir) = full.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = full.with_extension("foobar-new");
    std::fs::write(&partial, text).with_context(|| format!("cannot write {}", full.display()))?;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&partial, &full).with_context(|| format!("cannot replace {}", full.display()))?;
    Ok(())
}

/// On Azure, tells the wire server the instance is `Ready` (once the site is). Blocking.
pub fn azure_report_ready(goal: &AzureGoalState) -> anyhow::Result<()> {
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

/// The Azure goal state recorded at first boot, if this instance is on Azure.
pub fn recorded_azure_goal(root: &Path) -> Option<AzureGoalState> {
    let text = std::fs::read_to_string(root.join(RECORD)).ok()?;
    let doc: Value = serde_json::from_str(&text).ok()?;
    serde_json::from_value(doc.get("azure")?.clone()).ok()
}
