//! `foobar-agent instance-config`: the platform told by DMI strings, each cloud's metadata protocol spoken to a fake
//! metadata service shaped like the real one, and what is applied to a scratch root (hostname, the admin's keys, the
//! site's names). The QEMU tier runs the same fakes against a booted guest (`e2e.rs`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::fake_http::{FakeHttp, Reply, Request};
use crate::support::{self, agent_command};

pub const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHr9yBq3mYxV0mZ1gq2K6m2h6f3FvQ2o1mQm3pJ9bXyZ meta@test";
const IMAGE_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB7image0key0from0the0build0only0xxxxxxxxxxxxx build@test";
pub const TOKEN: &str = "AQAEAFake-imds-v2-token==";

/// How an EC2 instance's metadata service treats tokens (`HttpTokens` of the instance's metadata options), plus a
/// service from before IMDSv2 (or a proxy passing only GETs), which does not know the token path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Imds {
    /// `HttpTokens=optional`: a token is handed out; GETs work with a valid token or none; a wrong one is 401.
    Optional,
    /// `HttpTokens=required`: GETs without a valid token are 401.
    Required,
    /// No token service: `PUT /latest/api/token` is 404; plain GETs work.
    Legacy,
}

/// EC2's metadata service, as AWS documents IMDS: the token PUT needs `X-aws-ec2-metadata-token-ttl-seconds`
/// between 1 and 21600 (else 400) and is refused with `X-Forwarded-For` (403); the token is checked per mode; with
/// `throttle`, the first meta-data GET is answered 429 (IMDS throttles per instance). User data is served as given
/// (bytes: gzip when the test gzipped it).
pub fn ec2(
    mode: Imds,
    key: &str,
    user_data: Option<Vec<u8>>,
    throttle: bool,
) -> impl Fn(&Request) -> Reply + Send + Sync + 'static {
    let key = key.to_string();
    let throttled = AtomicBool::new(!throttle);
    move |r: &Request| {
        if r.path == "/latest/api/token" {
            if mode == Imds::Legacy {
                return (404, "Not Found").into();
            }
            if r.method != "PUT" {
                return (405, "Method Not Allowed").into();
            }
            if r.header("x-forwarded-for").is_some() {
                return (403, "Forbidden").into();
            }
            let ttl = r
                .header("x-aws-ec2-metadata-token-ttl-seconds")
                .and_then(|v| v.parse::<u32>().ok());
            return match ttl {
                Some(ttl) if (1..=21600).contains(&ttl) => {
                    Reply::from((200, TOKEN)).header("X-aws-ec2-metadata-token-ttl-seconds", &ttl.to_string())
                }
                _ => (400, "Bad Request").into(),
            };
        }
        match (mode, r.header("x-aws-ec2-metadata-token")) {
            (Imds::Legacy, _) | (Imds::Optional, None) => {}
            (_, Some(TOKEN)) => {}
            _ => return (401, "Unauthorized").into(),
        }
        if r.method != "GET" {
            return (405, "Method Not Allowed").into();
        }
        if r.path.starts_with("/latest/meta-data/") && !throttled.swap(true, Ordering::SeqCst) {
            return (429, "Too Many Requests").into();
        }
        match r.path.as_str() {
            "/latest/meta-data/local-hostname" => (200, "ip-10-1-2-3.ec2.internal").into(),
            "/latest/meta-data/public-keys/" => (200, "0=deploy").into(),
            "/latest/meta-data/public-keys/0/openssh-key" => (200, format!("{key}\n")).into(),
            "/latest/user-data" => match &user_data {
                Some(bytes) => (200, bytes.clone()).into(),
                None => (404, "Not Found").into(),
            },
            _ => (404, "Not Found").into(),
        }
    }
}

/// A GCE instance's metadata: instance and project attributes and names.
#[derive(Debug, Clone, Default)]
pub struct GceMetadata {
    pub name: String,
    pub hostname: Option<String>,
    pub instance: Vec<(&'static str, String)>,
    pub project: Vec<(&'static str, String)>,
}

impl GceMetadata {
    /// One instance key for `admin`, the instance named `www-1` with an internal DNS hostname.
    pub fn simple(key: &str) -> GceMetadata {
        GceMetadata {
            name: "www-1".into(),
            hostname: Some("www-1.c.example-project.internal".into()),
            instance: vec![("ssh-keys", format!("admin:{key}\n"))],
            project: Vec::new(),
        }
    }
}

/// GCE's metadata server, as Google documents it: every request needs `Metadata-Flavor: Google` (else 403), a
/// request with `X-Forwarded-For` is refused (403), answers carry `Metadata-Flavor: Google`, and a directory read
/// with `?recursive=true` (`alt=json`) is one JSON document. The first request is answered 503 (rate limited).
pub fn gce(metadata: GceMetadata) -> impl Fn(&Request) -> Reply + Send + Sync + 'static {
    let throttled = AtomicBool::new(false);
    move |r: &Request| {
        if r.header("metadata-flavor") != Some("Google") || r.header("x-forwarded-for").is_some() {
            return (403, "Missing Metadata-Flavor:Google header.").into();
        }
        if !throttled.swap(true, Ordering::SeqCst) {
            return (503, "Service Unavailable").into();
        }
        let attributes = |list: &[(&str, String)]| {
            serde_json::Value::Object(
                list.iter()
                    .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
                    .collect(),
            )
        };
        let mut instance = serde_json::json!({
            "attributes": attributes(&metadata.instance),
            "id": 4520031799277581759u64,
            "name": metadata.name,
            "zone": "projects/123456789012/zones/europe-west1-b",
        });
        if let Some(hostname) = &metadata.hostname {
            instance["hostname"] = hostname.clone().into();
        }
        let doc = serde_json::json!({
            "instance": instance,
            "project": {"attributes": attributes(&metadata.project), "numericProjectId": 123456789012u64,
                        "projectId": "example-project"},
        });
        let (path, query) = r.path.split_once('?').unwrap_or((r.path.as_str(), ""));
        let recursive = query.split('&').any(|p| p == "recursive=true");
        let reply = match (path, recursive) {
            ("/computeMetadata/v1/", true) => Reply::from((200, doc.to_string())),
            ("/computeMetadata/v1/instance/name", false) => Reply::from((200, metadata.name.clone())),
            _ => Reply::from((404, "Not Found")),
        };
        reply.header("Metadata-Flavor", "Google")
    }
}

/// What the Azure fake's wire server holds: the current goal state, what IMDS and the health endpoint answer
/// first, and the user data.
#[derive(Debug)]
pub struct AzureState {
    pub incarnation: u32,
    pub container_id: String,
    /// Statuses the instance document is answered with before it is served (410 while the VM starts, then 429).
    pub imds_first: Vec<u16>,
    /// Statuses the first health reports are answered with.
    pub health_first: Vec<u16>,
    pub user_data: String,
}

impl AzureState {
    pub fn new() -> Arc<Mutex<AzureState>> {
        Arc::new(Mutex::new(AzureState {
            incarnation: 3,
            container_id: "c0ffee00-1111-2222-3333-444455556666".into(),
            imds_first: vec![410, 429],
            health_first: Vec::new(),
            user_data: String::new(),
        }))
    }
}

/// Azure: IMDS and the wire server on one port, by path. IMDS, as documented: `Metadata: true` and an
/// `api-version` are required (400), `X-Forwarded-For` is refused (400), and it answers 410 and 429 before it
/// serves. The wire server: `x-ms-version` required; the goal state at `/machine/?comp=goalstate`; health reports
/// only at `/machine?comp=health`, as `text/xml`, naming the current incarnation, container and role instance (400
/// otherwise, as for a stale goal state).
pub fn azure(key: &str, state: Arc<Mutex<AzureState>>) -> impl Fn(&Request) -> Reply + Send + Sync + 'static {
    let key = key.to_string();
    move |r: &Request| {
        let mut state = state.lock().unwrap();
        if r.path.starts_with("/metadata/") {
            if r.header("metadata") != Some("true") || r.header("x-forwarded-for").is_some() {
                return (
                    400,
                    r#"{"error":"Bad request. Required metadata header not specified"}"#,
                )
                    .into();
            }
            if !r.path.contains("api-version=") {
                return (
                    400,
                    r#"{"error":"Bad request. api-version was not specified in the request."}"#,
                )
                    .into();
            }
            if r.path.starts_with("/metadata/instance/compute/userData") {
                return (200, base64(state.user_data.as_bytes())).into();
            }
            if r.path.starts_with("/metadata/instance?") {
                if !state.imds_first.is_empty() {
                    let status = state.imds_first.remove(0);
                    return (status, r#"{"error":"try again later"}"#).into();
                }
                let doc = serde_json::json!({"compute": {"name": "vm-www", "osProfile": {"computerName": "www-azure"},
                    "publicKeys": [{"keyData": key, "path": "/home/admin/.ssh/authorized_keys"}]}});
                return (200, doc.to_string()).into();
            }
            return (404, "").into();
        }
        if r.header("x-ms-version") != Some("2012-11-30") {
            return (400, "x-ms-version required").into();
        }
        match (r.method.as_str(), r.path.as_str()) {
            ("GET", "/machine/?comp=goalstate") => (
                200,
                format!(
                    "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<GoalState><Version>2012-11-30</Version>\
                     <Incarnation>{}</Incarnation><Machine><ExpectedState>Started</ExpectedState></Machine>\
                     <Container><ContainerId>{}</ContainerId><RoleInstanceList>\
                     <RoleInstance><InstanceId>role-instance-7</InstanceId></RoleInstance></RoleInstanceList>\
                     </Container></GoalState>",
                    state.incarnation, state.container_id
                ),
            )
                .into(),
            ("POST", "/machine?comp=health") => {
                if !r.header("content-type").is_some_and(|t| t.starts_with("text/xml")) {
                    return (400, "content type must be text/xml").into();
                }
                let current = [
                    format!("<GoalStateIncarnation>{}</GoalStateIncarnation>", state.incarnation),
                    format!("<ContainerId>{}</ContainerId>", state.container_id),
                    "<InstanceId>role-instance-7</InstanceId>".to_string(),
                ];
                if !current.iter().all(|needle| r.body.contains(needle.as_str())) {
                    return (400, "the report does not name the current goal state").into();
                }
                if !state.health_first.is_empty() {
                    let status = state.health_first.remove(0);
                    return (status, "").into();
                }
                (200, "").into()
            }
            _ => (404, "").into(),
        }
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn gzip(text: &str) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(text.as_bytes()).unwrap();
    encoder.finish().unwrap()
}

/// A root with the files instance-config changes, as the image has them.
fn scratch_root(tag: &str) -> PathBuf {
    let root = support::temp_dir(tag);
    let write = |path: &str, text: &str| {
        let full = root.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, text).unwrap();
    };
    write("etc/hostname", "foobar\n");
    write("etc/hosts", "127.0.0.1 localhost\n127.0.1.1 foobar\n::1 localhost\n");
    write("etc/ssh/authorized_keys/admin", &format!("{IMAGE_KEY}\n"));
    write(
        "etc/foobar/site.env",
        "DOMAIN='foobar.com'\nCANONICAL='www.foobar.com'\nTLS_CERTIFICATE='/etc/foobar/tls/cert.pem'\n",
    );
    let site = foobar_builder::components::web::site(&foobar_builder::components::web::SiteVars::for_site(
        "foobar.com",
        "www.foobar.com",
    ))
    .unwrap();
    write("etc/nginx/sites-available/foobar", &site);
    root
}

fn dmi(tag: &str, fields: &[(&str, &str)]) -> PathBuf {
    let dir = support::temp_dir(tag);
    for (name, value) in fields {
        std::fs::write(dir.join(name), format!("{value}\n")).unwrap();
    }
    dir
}

/// Runs `instance-config`: (exit code, stdout, stderr, seconds).
fn instance_config(root: &Path, dmi: &Path, extra: &[&str]) -> (i32, String, String, f64) {
    let start = Instant::now();
    let mut args = vec![
        "instance-config",
        "--root",
        root.to_str().unwrap(),
        "--dmi-dir",
        dmi.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = agent_command(&args);
    (code, out, err, start.elapsed().as_secs_f64())
}

fn read(root: &Path, path: &str) -> String {
    std::fs::read_to_string(root.join(path)).unwrap_or_default()
}

const AZURE_TAG: &str = "7783-7084-3265-9085-8269-3286-77";

#[test]
fn no_cloud_in_dmi_means_no_request_no_wait_and_no_change() {
    let root = scratch_root("inst-none");
    let dmi = dmi(
        "dmi-qemu",
        &[
            ("sys_vendor", "QEMU"),
            ("product_name", "Standard PC (Q35 + ICH9, 2009)"),
            ("product_uuid", "9f3c1a2b-0000-4000-8000-000000000001"),
        ],
    );
    // A metadata service that answers: it must not be asked.
    let server = FakeHttp::start(ec2(Imds::Optional, KEY, None, false));
    let (code, out, err, secs) = instance_config(&root, &dmi, &["--metadata-url", &server.url()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("platform none"), "{out}");
    assert!(secs < 1.0, "took {secs:.2} s");
    assert!(server.requests().is_empty());
    assert_eq!(read(&root, "etc/hostname"), "foobar\n");
    assert_eq!(read(&root, "etc/ssh/authorized_keys/admin"), format!("{IMAGE_KEY}\n"));
    // Nothing to report either, and nothing asked.
    let (code, out, err) = report(&root, &dmi, &server.url());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("nothing to report"), "{out}");
    assert!(server.requests().is_empty());
}

#[test]
fn ec2_imdsv2_required_with_throttling_and_gzip_user_data() {
    let root = scratch_root("inst-ec2");
    let dmi = dmi("dmi-ec2", &[("sys_vendor", "Amazon EC2"), ("product_name", "t3.small")]);
    let fragment = "#foobar-config\n[site]\ndomain = \"example.org\"\ncanonical = \"www.example.org\"\n";
    let server = FakeHttp::start(ec2(Imds::Required, KEY, Some(gzip(fragment)), true));
    let (code, out, err, _) = instance_config(&root, &dmi, &["--metadata-url", &server.url()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("platform ec2: hostname ip-10-1-2-3.ec2.internal, 1 SSH key(s)"),
        "{out}"
    );
    let requests = server.requests();
    assert_eq!(requests[0].method, "PUT", "the token comes first: {requests:?}");
    assert_eq!(requests[0].path, "/latest/api/token");
    assert!(requests[1..]
        .iter()
        .all(|r| r.header("x-aws-ec2-metadata-token") == Some(TOKEN)));
    // The throttled request was asked again.
    assert_eq!(requests[1].path, requests[2].path, "{requests:?}");

    assert_eq!(read(&root, "etc/hostname"), "ip-10-1-2-3\n");
    assert!(read(&root, "etc/hosts").contains("127.0.1.1 ip-10-1-2-3\n"));
    assert!(!read(&root, "etc/hosts").contains("foobar"));
    let keys = read(&root, "etc/ssh/authorized_keys/admin");
    assert!(keys.contains(IMAGE_KEY) && keys.contains(KEY), "{keys}");
    // The gzip user data was decompressed and its fragment applied.
    let site = read(&root, "etc/nginx/sites-available/foobar");
    assert!(site.contains("server_name www.example.org;") && site.contains("server_name example.org;"));
    assert!(site.contains("return 301 $foobar_redirect_scheme://www.example.org$request_uri;"));
    assert!(!site.contains("foobar.com;"), "{site}");
    let env = read(&root, "etc/foobar/site.env");
    assert!(
        env.contains("DOMAIN='example.org'\n")
            && env.contains("CANONICAL='www.example.org'\n")
            && env.contains("TLS_CERTIFICATE=")
    );
    let record: serde_json::Value = serde_json::from_str(&read(&root, "var/lib/foobar/instance.json")).unwrap();
    assert_eq!(record["platform"], "ec2");
    // EC2 waits for no report: nothing is sent.
    let before = server.requests().len();
    let (code, out, err) = report(&root, &dmi, &server.url());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("nothing to report"), "{out}");
    assert_eq!(server.requests().len(), before);

    // Applying again (a first boot that re-runs) adds nothing twice.
    let (code, _, err, _) = instance_config(&root, &dmi, &["--metadata-url", &server.url()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(read(&root, "etc/ssh/authorized_keys/admin").matches(KEY).count(), 1);
}

#[test]
fn ec2_with_optional_tokens_uses_one_and_without_a_token_service_falls_back_to_imdsv1() {
    let root = scratch_root("inst-ec2opt");
    let optional = dmi("dmi-ec2-opt", &[("sys_vendor", "Amazon EC2")]);
    let server = FakeHttp::start(ec2(Imds::Optional, KEY, None, false));
    let (code, _, err, _) = instance_config(&root, &optional, &["--metadata-url", &server.url()]);
    assert_eq!(code, 0, "{err}");
    assert!(server.requests()[1..]
        .iter()
        .all(|r| r.header("x-aws-ec2-metadata-token") == Some(TOKEN)));

    let root = scratch_root("inst-ec2v1");
    let dmi = dmi("dmi-ec2-xen", &[("sys_vendor", "Xen"), ("bios_version", "4.11.amazon")]);
    let server = FakeHttp::start(ec2(Imds::Legacy, KEY, None, false));
    let (code, out, err, _) = instance_config(&root, &dmi, &["--metadata-url", &server.url()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("platform ec2"), "{out}");
    assert!(read(&root, "etc/ssh/authorized_keys/admin").contains(KEY));
    assert!(server
        .requests()
        .iter()
        .skip(1)
        .all(|r| r.header("x-aws-ec2-metadata-token").is_none()));
}

#[test]
fn an_ec2_product_uuid_tells_ec2_when_the_vendor_strings_do_not() {
    use foobar_agent::metadata::ec2::ec2_uuid;
    assert!(ec2_uuid("ec2e1916-9099-7caf-fd21-012345abcdef"));
    assert!(ec2_uuid("EC2E1916-9099-7CAF-FD21-012345ABCDEF"));
    // Little-endian firmware shows the first field byte-swapped.
    assert!(ec2_uuid("45E12AEC-DCD1-B213-94ED-012345ABCDEF"));
    assert!(!ec2_uuid("9f3c1a2b-0000-4000-8000-000000000001"));
    assert!(!ec2_uuid("ec2"));
    assert!(!ec2_uuid(""));

    let root = scratch_root("inst-ec2uuid");
    let dmi = dmi(
        "dmi-xen-uuid",
        &[
            ("sys_vendor", "Xen"),
            ("bios_vendor", "Xen"),
            ("product_uuid", "EC2E1916-9099-7CAF-FD21-012345ABCDEF"),
        ],
    );
    let server = FakeHttp::start(ec2(Imds::Optional, KEY, None, false));
    let (code, out, err, _) = instance_config(&root, &dmi, &["--metadata-url", &server.url()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("platform ec2"), "{out}");
}

fn gce_dmi(tag: &str) -> PathBuf {
    dmi(
        tag,
        &[("sys_vendor", "Google"), ("product_name", "Google Compute Engine")],
    )
}

const KEY2: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJane0key0not0for0the0admin0xxxxxxxxxxxxxxxxx jane@test";
const KEY3: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFuture0expiring0key0xxxxxxxxxxxxxxxxxxxxxxxx";
const EXPIRED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExpired0key0xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
const PROJECT_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIProject0key0xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx p@test";

#[test]
fn gce_installs_only_the_admins_current_keys_and_honours_blocking_and_os_login() {
    let instance_keys = format!(
        "admin:{KEY}\njane:{KEY2}\n{KEY2}\n\
         admin:{EXPIRED} google-ssh {{\"userName\":\"a@example.com\",\"expireOn\":\"2018-12-04T20:12:00+0000\"}}\n\
         admin:{KEY3} google-ssh {{\"userName\":\"a@example.com\",\"expireOn\":\"2999-01-01T00:00:00Z\"}}\n"
    );
    let mut metadata = GceMetadata::simple(KEY);
    metadata.instance = vec![("ssh-keys", instance_keys.clone())];
    metadata.project = vec![("ssh-keys", format!("admin:{PROJECT_KEY}\n"))];
    let root = scratch_root("inst-gce");
    let server = FakeHttp::start(gce(metadata.clone()));
    let (code, out, err, _) = instance_config(&root, &gce_dmi("dmi-gce"), &["--metadata-url", &server.url()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("platform gce: hostname www-1.c.example-project.internal, 3 SSH key(s)"),
        "{out}"
    );
    // The hostname is instance/hostname's first label.
    assert_eq!(read(&root, "etc/hostname"), "www-1\n");
    let keys = read(&root, "etc/ssh/authorized_keys/admin");
    assert!(
        keys.contains(KEY) && keys.contains(KEY3) && keys.contains(PROJECT_KEY),
        "{keys}"
    );
    assert!(!keys.contains(KEY2) && !keys.contains(EXPIRED), "{keys}");
    for note in [
        "key for user `jane` not installed",
        "a line without `user:` not installed",
        "google-ssh key expired, not installed",
    ] {
        assert!(err.contains(note), "{note}: {err}");
    }
    let requests = server.requests();
    assert!(requests.iter().all(|r| r.header("metadata-flavor") == Some("Google")));
    assert!(requests.len() >= 2, "the 503 was retried: {requests:?}");

    // Project keys blocked by the instance.
    metadata.instance.push(("block-project-ssh-keys", "TRUE".into()));
    let root = scratch_root("inst-gce-block");
    let server = FakeHttp::start(gce(metadata.clone()));
    let (code, _, err, _) = instance_config(&root, &gce_dmi("dmi-gce2"), &["--metadata-url", &server.url()]);
    assert_eq!(code, 0, "{err}");
    let keys = read(&root, "etc/ssh/authorized_keys/admin");
    assert!(keys.contains(KEY) && !keys.contains(PROJECT_KEY), "{keys}");
    assert!(
        err.contains("project keys not installed (block-project-ssh-keys)"),
        "{err}"
    );

    // The legacy instance `sshKeys` is read, and also keeps the project's keys out.
    let mut legacy = GceMetadata::simple(KEY);
    legacy.instance = vec![("sshKeys", format!("admin:{KEY3}\n"))];
    legacy.project = vec![("ssh-keys", format!("admin:{PROJECT_KEY}\n"))];
    legacy.hostname = None;
    let root = scratch_root("inst-gce-legacy");
    let server = FakeHttp::start(gce(legacy));
    let (code, out, err, _) = instance_config(&root, &gce_dmi("dmi-gce3"), &["--metadata-url", &server.url()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("hostname www-1,"),
        "without instance/hostname, the name: {out}"
    );
    let keys = read(&root, "etc/ssh/authorized_keys/admin");
    assert!(keys.contains(KEY3) && !keys.contains(PROJECT_KEY), "{keys}");

    // OS Login on the project (the instance does not say otherwise): no metadata key at all.
    metadata.project.push(("enable-oslogin", "TRUE".into()));
    let root = scratch_root("inst-gce-oslogin");
    let server = FakeHttp::start(gce(metadata.clone()));
    let (code, out, err, _) = instance_config(&root, &gce_dmi("dmi-gce4"), &["--metadata-url", &server.url()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("0 SSH key(s)"), "{out}");
    assert_eq!(read(&root, "etc/ssh/authorized_keys/admin"), format!("{IMAGE_KEY}\n"));
    assert!(
        err.contains("enable-oslogin is true: SSH access is left to OS Login"),
        "{err}"
    );
    // ...unless the instance turns it off.
    metadata.instance.push(("enable-oslogin", "false".into()));
    let root = scratch_root("inst-gce-oslogin-off");
    let server = FakeHttp::start(gce(metadata));
    let (code, _, err, _) = instance_config(&root, &gce_dmi("dmi-gce5"), &["--metadata-url", &server.url()]);
    assert_eq!(code, 0, "{err}");
    assert!(read(&root, "etc/ssh/authorized_keys/admin").contains(KEY));
}

#[test]
fn gce_user_data_may_be_base64_and_gzip() {
    let fragment = "#foobar-config\n[site]\ndomain = \"example.net\"\ncanonical = \"www.example.net\"\n";
    let mut metadata = GceMetadata::simple(KEY);
    metadata.instance.push(("user-data", base64(&gzip(fragment))));
    metadata.instance.push(("user-data-encoding", "base64".into()));
    let root = scratch_root("inst-gce-ud");
    let server = FakeHttp::start(gce(metadata));
    let (code, out, err, _) = instance_config(&root, &gce_dmi("dmi-gce-ud"), &["--metadata-url", &server.url()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("renamed to www.example.net / example.net"), "{out}");
}

#[test]
fn the_expiry_of_a_google_ssh_key_is_read_in_both_written_forms() {
    use foobar_agent::metadata::gce::parse_time;
    assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(parse_time("2018-12-04T20:12:00+0000"), Some(1_543_954_320));
    assert_eq!(parse_time("2018-12-04T21:12:00+01:00"), Some(1_543_954_320));
    assert_eq!(parse_time("2018-12-04T20:12:00.250Z"), Some(1_543_954_320));
    assert_eq!(parse_time("2000-02-29T00:00:00Z"), Some(951_782_400));
    for bad in [
        "",
        "2018-12-04",
        "2018-13-04T20:12:00Z",
        "2018-12-04T20:12:00",
        "next tuesday",
    ] {
        assert_eq!(parse_time(bad), None, "{bad}");
    }
}

fn azure_dmi(tag: &str) -> PathBuf {
    dmi(
        tag,
        &[
            ("sys_vendor", "Microsoft Corporation"),
            ("product_name", "Virtual Machine"),
            ("chassis_asset_tag", AZURE_TAG),
        ],
    )
}

/// Runs `report`: (exit code, stdout, stderr).
fn report(root: &Path, dmi: &Path, url: &str) -> (i32, String, String) {
    agent_command(&[
        "report",
        "--root",
        root.to_str().unwrap(),
        "--dmi-dir",
        dmi.to_str().unwrap(),
        "--metadata-url",
        url,
        "--timeout",
        "30",
    ])
}

fn health_reports(server: &FakeHttp) -> Vec<Request> {
    server.requests().into_iter().filter(|r| r.method == "POST").collect()
}

#[test]
fn azure_retries_imds_then_reports_ready_against_the_goal_state_of_the_moment() {
    let root = scratch_root("inst-azure");
    let dmi = azure_dmi("dmi-azure");
    let state = AzureState::new();
    state.lock().unwrap().health_first = vec![500];
    let server = FakeHttp::start(azure(KEY, state.clone()));
    let (code, out, err, _) = instance_config(&root, &dmi, &["--metadata-url", &server.url()]);
    assert_eq!(code, 0, "IMDS's 410 and 429 are retried: {err}");
    assert!(out.contains("platform azure: hostname www-azure"), "{out}");
    assert!(read(&root, "etc/ssh/authorized_keys/admin").contains(KEY));
    let asked: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/metadata/instance?"))
        .collect();
    assert_eq!(asked.len(), 3, "410, 429, then the document: {asked:?}");
    // Instance configuration reports nothing; the report is its own step.
    assert!(health_reports(&server).is_empty());

    // Redeployed before the report: a new incarnation and container. The report names those of the moment.
    {
        let mut state = state.lock().unwrap();
        state.incarnation = 4;
        state.container_id = "d00dfeed-aaaa-bbbb-cccc-ddddeeeeffff".into();
    }
    let (code, out, err) = report(&root, &dmi, &server.url());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("platform azure: reported Ready, goal state incarnation 4"),
        "{out}"
    );
    let reports = health_reports(&server);
    assert_eq!(reports.len(), 2, "a 500 is retried: {reports:?}");
    let body = &reports[1].body;
    for needle in [
        "<State>Ready</State>",
        "<ContainerId>d00dfeed-aaaa-bbbb-cccc-ddddeeeeffff</ContainerId>",
        "<InstanceId>role-instance-7</InstanceId>",
        "<GoalStateIncarnation>4</GoalStateIncarnation>",
    ] {
        assert!(body.contains(needle), "{needle} not in {body}");
    }
    assert_eq!(reports[1].path, "/machine?comp=health");
    assert_eq!(reports[1].header("x-ms-version"), Some("2012-11-30"));
    // The goal state was read just before the report.
    let requests = server.requests();
    let post = requests.iter().position(|r| r.method == "POST").unwrap();
    assert_eq!(requests[post - 1].path, "/machine/?comp=goalstate");
}

#[test]
fn azure_hears_not_ready_with_the_reason_when_provisioning_failed() {
    let root = scratch_root("inst-azure-bad");
    let dmi = azure_dmi("dmi-azure-bad");
    let state = AzureState::new();
    state.lock().unwrap().user_data = "#foobar-config\n[site]\ndomain = \"not a <name>\"\n".into();
    let server = FakeHttp::start(azure(KEY, state));
    let (code, _, err, _) = instance_config(&root, &dmi, &["--metadata-url", &server.url()]);
    assert_eq!(code, 1, "{err}");
    let (code, out, err) = report(&root, &dmi, &server.url());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("reported NotReady"), "{out}");
    let reports = health_reports(&server);
    assert_eq!(reports.len(), 1);
    let body = &reports[0].body;
    assert!(body.contains("<State>NotReady</State>") && body.contains("<SubStatus>ProvisioningFailed</SubStatus>"));
    assert!(
        body.contains("key `site`: expected DNS names, got `not a &lt;name&gt;`"),
        "the reason, escaped: {body}"
    );
}

#[test]
fn nocloud_reads_flow_style_cloud_config_and_users_entries_and_names_what_it_skips() {
    let root = scratch_root("inst-nocloud");
    let dmi = dmi("dmi-plain", &[("sys_vendor", "QEMU")]);
    let seed = support::temp_dir("seed");
    std::fs::write(seed.join("meta-data"), "instance-id: i-1\nlocal-hostname: web-7\n").unwrap();
    // What cloud-localds users write: flow style, a users list with the default user and another.
    std::fs::write(
        seed.join("user-data"),
        format!(
            "#cloud-config\nssh_authorized_keys: [\"{KEY}\"]\npackages: [htop]\nusers:\n  - default\n  \
             - {{name: admin, ssh_authorized_keys: [\"{KEY3}\"]}}\n  - name: jane\n    ssh_authorized_keys:\n      \
             - {KEY2}\n"
        ),
    )
    .unwrap();
    let (code, out, err, _) = instance_config(&root, &dmi, &["--seed-dir", seed.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("platform nocloud: hostname web-7, 2 SSH key(s)"), "{out}");
    assert_eq!(read(&root, "etc/hostname"), "web-7\n");
    let keys = read(&root, "etc/ssh/authorized_keys/admin");
    assert!(
        keys.contains(KEY) && keys.contains(KEY3) && !keys.contains(KEY2),
        "{keys}"
    );
    assert!(err.contains("cloud-config keys not acted on: packages"), "{err}");
    assert!(
        err.contains("user `jane` not made and its 1 key(s) not installed"),
        "{err}"
    );
}

#[test]
fn mime_multipart_user_data_is_read_part_by_part() {
    let root = scratch_root("inst-mime");
    let dmi = dmi("dmi-plain2", &[("sys_vendor", "QEMU")]);
    let seed = support::temp_dir("seed-mime");
    std::fs::write(seed.join("meta-data"), "instance-id: i-2\n").unwrap();
    // As write-mime-multipart makes it: a cloud-config part (base64, as Terraform's provider encodes parts), a shell
    // script and a foobar fragment.
    let cloud = format!("#cloud-config\nhostname: mime-host\nssh_authorized_keys:\n  - {KEY}\n");
    let user_data = format!(
        "Content-Type: multipart/mixed; boundary=\"===============4206921239367378185==\"\nMIME-Version: 1.0\n\n\
         --===============4206921239367378185==\nContent-Type: text/cloud-config; charset=\"us-ascii\"\n\
         MIME-Version: 1.0\nContent-Transfer-Encoding: base64\nContent-Disposition: attachment; filename=\"a.yaml\"\n\n\
         {}\n\
         --===============4206921239367378185==\nContent-Type: text/x-shellscript; charset=\"us-ascii\"\n\
         MIME-Version: 1.0\nContent-Transfer-Encoding: 7bit\nContent-Disposition: attachment; filename=\"b.sh\"\n\n\
         #!/bin/sh\necho hello\n\n\
         --===============4206921239367378185==\nContent-Type: text/plain; charset=\"us-ascii\"\n\
         MIME-Version: 1.0\nContent-Transfer-Encoding: 7bit\n\n\
         #foobar-config\n[site]\ndomain = \"example.com\"\ncanonical = \"www.example.com\"\n\n\
         --===============4206921239367378185==--\n",
        base64(cloud.as_bytes())
    );
    std::fs::write(seed.join("user-data"), gzip(&user_data)).unwrap();
    let (code, out, err, _) = instance_config(&root, &dmi, &["--seed-dir", seed.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("hostname mime-host, 1 SSH key(s), site renamed to www.example.com"),
        "{out}"
    );
    assert!(read(&root, "etc/ssh/authorized_keys/admin").contains(KEY));
    assert!(
        err.contains("(text/x-shellscript): a script (this image runs no user-data scripts)"),
        "{err}"
    );
}

/// A `#foobar-config` fragment with a `[tls]` certificate and key (TOML multi-line strings).
pub fn tls_fragment(cert: &str, key: &str) -> String {
    format!("#foobar-config\n[tls]\ncertificate = \"\"\"\n{cert}\"\"\"\nkey = \"\"\"\n{key}\"\"\"\n")
}

#[test]
fn a_certificate_in_the_instance_configuration_is_installed_where_nginx_reads_it_and_never_recorded() {
    use std::os::unix::fs::PermissionsExt as _;
    let (cert_file, key_file) =
        support::self_signed_certificate(&support::temp_dir("inst-tls-cert"), &["www.foobar.com"]);
    let (cert, key) = (
        std::fs::read_to_string(&cert_file).unwrap(),
        std::fs::read_to_string(&key_file).unwrap(),
    );
    let root = scratch_root("inst-tls");
    std::fs::write(
        root.join("etc/foobar/site.env"),
        "DOMAIN='foobar.com'\nCANONICAL='www.foobar.com'\nTLS_CERTIFICATE='/etc/ssl/site/cert.pem'\n\
         TLS_KEY='/etc/ssl/site/key.pem'\nTLS_SELF_SIGNED='no'\n",
    )
    .unwrap();
    let plain = dmi("dmi-plain-tls", &[("sys_vendor", "QEMU")]);
    let seed = support::temp_dir("seed-tls");
    std::fs::write(seed.join("meta-data"), "instance-id: i-4\n").unwrap();
    std::fs::write(seed.join("user-data"), tls_fragment(&cert, &key)).unwrap();
    let (code, _, err, _) = instance_config(&root, &plain, &["--seed-dir", seed.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(read(&root, "etc/ssl/site/cert.pem"), cert);
    assert_eq!(read(&root, "etc/ssl/site/key.pem"), key);
    let mode = |p: &str| std::fs::metadata(root.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("etc/ssl/site/key.pem"), 0o600);
    assert_eq!(mode("etc/ssl/site/cert.pem"), 0o644);
    let record = read(&root, "var/lib/foobar/instance.json");
    assert!(!record.contains("PRIVATE KEY"), "the key is never recorded: {record}");
    assert!(
        err.contains("TLS certificate from the instance configuration: /etc/ssl/site/cert.pem"),
        "{err}"
    );

    // Not a key: named, nothing written.
    let root = scratch_root("inst-tls-bad");
    std::fs::write(seed.join("user-data"), tls_fragment(&cert, "not a key\n")).unwrap();
    let (code, _, err, _) = instance_config(&root, &plain, &["--seed-dir", seed.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("key `tls.key`: expected a PEM private key"), "{err}");
    assert!(!root.join("etc/foobar/tls/key.pem").exists() && !root.join("etc/foobar/tls/cert.pem").exists());
}

#[test]
fn swapping_the_domain_and_the_canonical_name_swaps_them_and_one_name_for_both_is_refused() {
    let root = scratch_root("inst-swap");
    let dmi = dmi("dmi-plain-swap", &[("sys_vendor", "QEMU")]);
    let seed = support::temp_dir("seed-swap");
    std::fs::write(seed.join("meta-data"), "instance-id: i-3\n").unwrap();
    std::fs::write(
        seed.join("user-data"),
        "#foobar-config\n[site]\ndomain = \"www.foobar.com\"\ncanonical = \"foobar.com\"\n",
    )
    .unwrap();
    let (code, _, err, _) = instance_config(&root, &dmi, &["--seed-dir", seed.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let site = read(&root, "etc/nginx/sites-available/foobar");
    let names: Vec<&str> = site
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("server_name "))
        .collect();
    assert!(
        names.contains(&"server_name foobar.com;") && names.contains(&"server_name www.foobar.com;"),
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| **n == "server_name foobar.com;").count(),
        names.iter().filter(|n| **n == "server_name www.foobar.com;").count(),
        "one server per name and port: {names:?}"
    );
    assert!(
        site.contains("return 301 $foobar_redirect_scheme://foobar.com$request_uri;"),
        "the redirect goes to the new canonical name"
    );
    assert!(
        !site.contains("://www.foobar.com$request_uri"),
        "no redirect loop: {site}"
    );
    assert!(read(&root, "etc/foobar/site.env").contains("CANONICAL='foobar.com'\n"));

    let root = scratch_root("inst-same");
    std::fs::write(
        seed.join("user-data"),
        "#foobar-config\n[site]\ndomain = \"www.foobar.com\"\n",
    )
    .unwrap();
    let (code, _, err, _) = instance_config(&root, &dmi, &["--seed-dir", seed.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the domain and the canonical name must differ"), "{err}");
    assert!(
        read(&root, "etc/nginx/sites-available/foobar").contains("server_name foobar.com;"),
        "unchanged"
    );
}

#[test]
fn a_silent_metadata_service_is_given_up_on_within_bounds_and_a_bad_part_is_skipped_not_the_rest() {
    let root = scratch_root("inst-bad");
    let dmi = dmi("dmi-ec2b", &[("sys_vendor", "Amazon EC2")]);
    let fragment = "#foobar-config\n[site]\ndomain = \"not a name\"\n";
    let server = FakeHttp::start(ec2(Imds::Optional, KEY, Some(fragment.as_bytes().to_vec()), false));
    let (code, _, err, _) = instance_config(&root, &dmi, &["--metadata-url", &server.url()]);
    assert_eq!(code, 1, "an invalid part fails the command");
    assert!(
        err.contains("key `site`: expected DNS names, got `not a name`"),
        "{err}"
    );
    // Everything valid is applied all the same: the admin is not locked out by a bad fragment.
    assert!(read(&root, "etc/ssh/authorized_keys/admin").contains(KEY));
    assert_eq!(read(&root, "etc/hostname"), "ip-10-1-2-3\n");
    assert!(
        read(&root, "etc/nginx/sites-available/foobar").contains("server_name www.foobar.com;"),
        "site unchanged"
    );
    let record: serde_json::Value = serde_json::from_str(&read(&root, "var/lib/foobar/instance.json")).unwrap();
    assert!(record["errors"][0].as_str().unwrap().contains("not a name"), "{record}");

    // A bad value in a cloud-config document skips that key only.
    let root = scratch_root("inst-bad-key");
    let plain = self::dmi("dmi-plain-bad", &[("sys_vendor", "QEMU")]);
    let seed = support::temp_dir("seed-bad");
    std::fs::write(seed.join("meta-data"), "instance-id: i-9\nlocal-hostname: bad_name!\n").unwrap();
    std::fs::write(
        seed.join("user-data"),
        format!("#cloud-config\nusers: 7\nssh_authorized_keys: [\"{KEY}\"]\n"),
    )
    .unwrap();
    let (code, _, err, _) = instance_config(&root, &plain, &["--seed-dir", seed.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("`users` must be a list"), "{err}");
    assert!(err.contains("hostname `bad_name!` is not a valid host name"), "{err}");
    assert!(
        read(&root, "etc/ssh/authorized_keys/admin").contains(KEY),
        "the keys still apply"
    );
    assert_eq!(read(&root, "etc/hostname"), "foobar\n");

    // Nothing listens: bounded retries, then a clear error.
    let port = support::free_port();
    let start = Instant::now();
    let (code, _, err, _) = instance_config(&root, &dmi, &["--metadata-url", &format!("http://127.0.0.1:{port}")]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(start.elapsed() < Duration::from_secs(40), "{:?}", start.elapsed());
    // ... and it is asked again on the next boot (foobar-instance-config.service runs while this file exists) until
    // it answers once; then the keys arrive and the mark is gone.
    let pending = read(&root, "var/lib/foobar/instance-config.pending");
    assert!(pending.contains(&format!("127.0.0.1:{port}")), "pending: {pending}");
    let root_keys = read(&root, "etc/ssh/authorized_keys/admin");
    std::fs::write(root.join("etc/ssh/authorized_keys/admin"), format!("{IMAGE_KEY}\n")).unwrap();
    let server = FakeHttp::start(ec2(Imds::Optional, KEY, None, false));
    let (code, _, err, _) = instance_config(&root, &dmi, &["--metadata-url", &server.url()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        read(&root, "etc/ssh/authorized_keys/admin").contains(KEY),
        "{root_keys}"
    );
    assert!(!root.join("var/lib/foobar/instance-config.pending").exists());
}

/// The site.env imagebuild writes, with ACME as given.
fn acme_site_env(root: &Path, acme: &str, directory: &str) {
    std::fs::write(
        root.join("etc/foobar/site.env"),
        format!(
            "DOMAIN='foobar.com'\nCANONICAL='www.foobar.com'\nTLS_CERTIFICATE='/etc/foobar/tls/cert.pem'\n\
             TLS_KEY='/etc/foobar/tls/key.pem'\nTLS_SELF_SIGNED='yes'\nHTTPS_ONLY='/etc/foobar/tls/https-only.conf'\n\
             ACME='{acme}'\nACME_DIRECTORY='{directory}'\nACME_EMAIL=''\nACME_RENEW_DAYS='30'\n"
        ),
    )
    .unwrap();
}

#[test]
fn acme_settings_in_the_instance_configuration_replace_the_images_and_hostile_ones_are_refused() {
    let (ca, _) = support::self_signed_certificate(&support::temp_dir("inst-acme-ca"), &["ca.internal"]);
    let ca = std::fs::read_to_string(ca).unwrap();
    let plain = dmi("dmi-plain-acme", &[("sys_vendor", "QEMU")]);
    let seed = support::temp_dir("seed-acme");
    std::fs::write(seed.join("meta-data"), "instance-id: i-5\n").unwrap();
    let fragment = |body: &str| format!("#foobar-config\n[acme]\n{body}");
    let root = scratch_root("inst-acme");
    acme_site_env(&root, "no", "https://acme-v02.api.letsencrypt.org/directory");
    std::fs::write(
        seed.join("user-data"),
        fragment(&format!(
            "enabled = true\ndirectory = \"https://ca.internal/acme/directory\"\nemail = \"ops@foobar.com\"\n\
             ca-certificate = \"\"\"\n{ca}\"\"\"\n"
        )),
    )
    .unwrap();
    let (code, _, err, _) = instance_config(&root, &plain, &["--seed-dir", seed.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let env = read(&root, "etc/foobar/site.env");
    for line in [
        "ACME='yes'",
        "ACME_DIRECTORY='https://ca.internal/acme/directory'",
        "ACME_EMAIL='ops@foobar.com'",
    ] {
        assert_eq!(env.lines().filter(|l| *l == line).count(), 1, "{line} once in:\n{env}");
    }
    assert!(
        env.contains("ACME_RENEW_DAYS='30'") && env.contains("DOMAIN='foobar.com'"),
        "{env}"
    );
    assert_eq!(read(&root, "usr/local/share/ca-certificates/foobar-acme.crt"), ca);
    // The record says which settings came, not the CA's text.
    let record = read(&root, "var/lib/foobar/instance.json");
    assert!(
        record.contains("ca.internal") && !record.contains("BEGIN CERTIFICATE"),
        "{record}"
    );

    // Hostile values: refused by name, site.env untouched (the shell that sources it runs as root).
    for (body, key) in [
        ("directory = \"https://x.example/'; reboot; '\"\n", "acme.directory"),
        ("directory = \"http://x.example/dir\"\n", "acme.directory"),
        ("email = \"ops@foobar.com\\nACME='yes'\"\n", "acme.email"),
        (
            "ca-certificate = \"-----BEGIN PRIVATE KEY-----\"\n",
            "acme.ca-certificate",
        ),
        ("url = \"https://x.example/\"\n", "url"),
    ] {
        let root = scratch_root("inst-acme-bad");
        acme_site_env(&root, "no", "https://acme-v02.api.letsencrypt.org/directory");
        let before = read(&root, "etc/foobar/site.env");
        std::fs::write(seed.join("user-data"), fragment(body)).unwrap();
        let (code, _, err, _) = instance_config(&root, &plain, &["--seed-dir", seed.to_str().unwrap()]);
        assert_eq!(code, 1, "{body}: {err}");
        assert!(err.contains(key), "{body}: `{key}` not named: {err}");
        assert_eq!(read(&root, "etc/foobar/site.env"), before, "{body}");
    }
}

/// Runs `foobar-agent acme --once` under `root` with the repository's hook: (exit code, stdout, stderr).
fn acme_once(root: &Path) -> (i32, String, String) {
    let hook = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/files/acme-hook");
    support::agent_command(&[
        "acme",
        "--once",
        "--root",
        root.to_str().unwrap(),
        "--hook",
        hook.to_str().unwrap(),
    ])
}

#[test]
fn acme_off_does_nothing_and_a_ca_that_does_not_answer_is_recorded_and_leaves_the_certificate() {
    let root = scratch_root("acme-off");
    acme_site_env(&root, "no", "https://acme-v02.api.letsencrypt.org/directory");
    let (code, out, err) = acme_once(&root);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ACME is off"), "{out}");
    assert!(!root.join("var/lib/foobar/acme").exists(), "nothing made when off");

    // A CA nobody answers for: the attempt fails naming it, the status says so, the certificate stays.
    let root = scratch_root("acme-down");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let directory = format!("https://127.0.0.1:{closed}/dir");
    acme_site_env(&root, "yes", &directory);
    std::fs::create_dir_all(root.join("etc/foobar/tls")).unwrap();
    std::fs::write(root.join("etc/foobar/tls/cert.pem"), "self-signed stand-in").unwrap();
    // A private CA from the instance configuration joins the system's bundle once, however many attempts there are.
    let ca = "-----BEGIN CERTIFICATE-----\nMIIBprivate\n-----END CERTIFICATE-----\n";
    std::fs::create_dir_all(root.join("usr/local/share/ca-certificates")).unwrap();
    std::fs::write(root.join("usr/local/share/ca-certificates/foobar-acme.crt"), ca).unwrap();
    std::fs::create_dir_all(root.join("etc/ssl/certs")).unwrap();
    std::fs::write(
        root.join("etc/ssl/certs/ca-certificates.crt"),
        "-----BEGIN CERTIFICATE-----\nMIIBpublic\n-----END CERTIFICATE-----",
    )
    .unwrap();
    acme_once(&root);
    let (code, _, err) = acme_once(&root);
    assert_eq!(code, 1, "{err}");
    let bundle = read(&root, "etc/ssl/certs/ca-certificates.crt");
    assert!(
        bundle.contains("MIIBpublic\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nMIIBprivate"),
        "{bundle}"
    );
    assert_eq!(bundle.matches("MIIBprivate").count(), 1, "{bundle}");
    assert!(err.contains(&directory), "the CA is named: {err}");
    let status: serde_json::Value =
        serde_json::from_str(&read(&root, "var/lib/foobar/acme/status.json")).expect("status.json");
    assert_eq!(status["state"], "retrying", "{status}");
    assert!(status["error"].as_str().unwrap().contains(&directory), "{status}");
    assert_eq!(status["names"], serde_json::json!(["www.foobar.com", "foobar.com"]));
    assert_eq!(read(&root, "etc/foobar/tls/cert.pem"), "self-signed stand-in");
    assert!(
        !root.join("etc/foobar/tls/https-only.conf").exists(),
        "no HTTPS-only without a CA's certificate"
    );
}

#[test]
fn the_acme_hook_serves_http_01_tokens_only_and_removes_them_after() {
    let hook = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/files/acme-hook");
    let dir = support::temp_dir("acme-hook").join("challenges");
    let run = |args: &[&str]| {
        std::process::Command::new(&hook)
            .args(args)
            .env("FOOBAR_ACME_CHALLENGES", &dir)
            .status()
            .unwrap()
            .code()
            .unwrap_or(-1)
    };
    assert_eq!(
        run(&["begin", "http-01", "www.foobar.com", "tok_EN-1", "tok_EN-1.thumb"]),
        0
    );
    assert_eq!(std::fs::read_to_string(dir.join("tok_EN-1")).unwrap(), "tok_EN-1.thumb");
    assert_eq!(
        run(&["done", "http-01", "www.foobar.com", "tok_EN-1", "tok_EN-1.thumb"]),
        0
    );
    assert!(!dir.join("tok_EN-1").exists());
    // Declined: other challenge types; refused: a token that is not base64url (a path), a wrong argument count.
    assert_eq!(run(&["begin", "dns-01", "www.foobar.com", "tok", "auth"]), 1);
    assert_ne!(run(&["begin", "http-01", "www.foobar.com", "../../escape", "x"]), 0);
    assert!(!dir.join("../../escape").exists() && !dir.parent().unwrap().join("escape").exists());
    assert_ne!(run(&["begin", "http-01"]), 0);
}

/// A power button as the kernel shows it under `root`: sysfs name and number, and a FIFO standing in for
/// `/dev/input/eventN`.
fn fake_button(root: &Path, event: &str) -> PathBuf {
    let sys = root.join("sys/class/input").join(event);
    std::fs::create_dir_all(sys.join("device")).unwrap();
    std::fs::write(sys.join("device/name"), "Power Button\n").unwrap();
    std::fs::write(sys.join("dev"), "13:65\n").unwrap();
    std::fs::create_dir_all(root.join("dev/input")).unwrap();
    let fifo = root.join("dev/input").join(event);
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    fifo
}

/// One `struct input_event` (64-bit): time, type, code, value.
fn input_event(kind: u16, code: u16, value: i32) -> Vec<u8> {
    let mut e = vec![0u8; 16];
    e.extend_from_slice(&kind.to_ne_bytes());
    e.extend_from_slice(&code.to_ne_bytes());
    e.extend_from_slice(&value.to_ne_bytes());
    e
}

/// `foobar-power-button` watching the devices under `root`; logind runs when `root/logind` exists, and powering off
/// leaves `root/off`.
fn power_button_watch(root: &Path) -> std::process::Child {
    std::process::Command::new(support::binary("foobar-power-button"))
        .arg("--root")
        .arg(root)
        .args(["--logind", &format!("test -e {}", root.join("logind").display())])
        .args(["--power-off", &format!("touch {}", root.join("off").display())])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("foobar-power-button (cargo build --workspace)")
}

/// Waits for the watch to end: (exit code, what it printed).
fn power_button_end(mut child: std::process::Child, limit: Duration) -> (i32, String) {
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("foobar-power-button still watching after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    (status.code().unwrap_or(-1), out)
}

#[test]
fn the_power_button_powers_off_before_logind_has_it_and_is_handed_over_after() {
    use std::io::Write as _;
    // The button appears after the watch began (its driver loads), other keys and the release are ignored, a press
    // powers off, once.
    let root = support::temp_dir("power-button");
    let child = power_button_watch(&root);
    std::thread::sleep(Duration::from_millis(300));
    let fifo = fake_button(&root, "event1");
    std::thread::sleep(Duration::from_millis(500));
    // Read-write: opening never blocks, even when the watcher is not reading.
    let mut device = std::fs::OpenOptions::new().read(true).write(true).open(&fifo).unwrap();
    device
        .write_all(&[input_event(1, 30, 1), input_event(1, 116, 0), input_event(0, 0, 0)].concat())
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!root.join("off").exists(), "no power-off for other keys or a release");
    device
        .write_all(&[input_event(1, 116, 1), input_event(0, 0, 0)].concat())
        .unwrap();
    let (code, out) = power_button_end(child, Duration::from_secs(5));
    assert_eq!(code, 0, "{out}");
    assert!(root.join("off").exists(), "powered off: {out}");
    assert!(out.contains("pressed before logind watches it"), "{out}");
    assert!(out.contains("poweroff.target requested"), "{out}");

    // Handed over only when logind runs and udev has tagged the button for it.
    let root = support::temp_dir("power-button-logind");
    let fifo = fake_button(&root, "event1");
    let _writer = std::fs::OpenOptions::new().read(true).write(true).open(&fifo).unwrap();
    let mut child = power_button_watch(&root);
    std::fs::write(root.join("logind"), "").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "not handed over before udev tags the button"
    );
    std::fs::create_dir_all(root.join("run/udev/data")).unwrap();
    std::fs::write(
        root.join("run/udev/data/c13:65"),
        "E:ID_INPUT=1\nG:power-switch\nQ:power-switch\n",
    )
    .unwrap();
    let (code, out) = power_button_end(child, Duration::from_secs(3));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("logind handles the power button now") && !root.join("off").exists(),
        "{out}"
    );
}
