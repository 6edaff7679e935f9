//! `foobar-agent instance-config`: the platform told by DMI strings, each cloud's metadata protocol spoken to a fake
//! metadata service shaped like the real one, and what is applied to a scratch root (hostname, the admin's keys, the
//! site's names). The QEMU tier runs the same fakes against a booted guest (`e2e.rs`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::fake_http::{FakeHttp, Request};
use crate::support::{self, agent_command};

pub const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHr9yBq3mYxV0mZ1gq2K6m2h6f3FvQ2o1mQm3pJ9bXyZ meta@test";
const IMAGE_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB7image0key0from0the0build0only0xxxxxxxxxxxxx build@test";
pub const TOKEN: &str = "AQAEAFake-imds-v2-token==";

/// EC2's metadata service: a token from `PUT /latest/api/token` is required on every GET when `v2`; without `v2`
/// the PUT is refused (an IMDSv1-only instance) and plain GETs work.
pub fn ec2(v2: bool, key: &str, user_data: Option<&str>) -> impl Fn(&Request) -> (u16, String) + Send + Sync + 'static {
    let (key, user_data) = (key.to_string(), user_data.map(String::from));
    move |r: &Request| {
        if r.path == "/latest/api/token" {
            if !v2 {
                return (403, "IMDSv2 disabled".into());
            }
            if r.method != "PUT" || r.header("x-aws-ec2-metadata-token-ttl-seconds").is_none() {
                return (400, "bad token request".into());
            }
            return (200, TOKEN.into());
        }
        if v2 && r.header("x-aws-ec2-metadata-token") != Some(TOKEN) {
            return (401, "token required".into());
        }
        match r.path.as_str() {
            "/latest/meta-data/local-hostname" => (200, "ip-10-1-2-3.ec2.internal".into()),
            "/latest/meta-data/public-keys/" => (200, "0=deploy".into()),
            "/latest/meta-data/public-keys/0/openssh-key" => (200, format!("{key}\n")),
            "/latest/user-data" => match &user_data {
                Some(text) => (200, text.clone()),
                None => (404, "".into()),
            },
            _ => (404, "".into()),
        }
    }
}

/// GCE's metadata server: `Metadata-Flavor: Google` or 403.
pub fn gce(key: &str) -> impl Fn(&Request) -> (u16, String) + Send + Sync + 'static {
    let key = key.to_string();
    move |r: &Request| {
        if r.header("metadata-flavor") != Some("Google") {
            return (403, "Missing Metadata-Flavor:Google header.".into());
        }
        match r.path.as_str() {
            "/computeMetadata/v1/instance/name" => (200, "www-1".into()),
            "/computeMetadata/v1/instance/attributes/ssh-keys" => (200, format!("admin:{key}\n")),
            _ => (404, "".into()),
        }
    }
}

/// Azure: IMDS (with `Metadata: true`) and the wire server (goal state, health reports), on one port by path.
pub fn azure(key: &str) -> impl Fn(&Request) -> (u16, String) + Send + Sync + 'static {
    let key = key.to_string();
    move |r: &Request| {
        if r.path.starts_with("/metadata/") {
            if r.header("metadata") != Some("true") {
                return (
                    400,
                    r#"{"error":"Bad request. Required metadata header not specified"}"#.into(),
                );
            }
            if r.path.starts_with("/metadata/instance/compute/userData") {
                return (200, String::new());
            }
            if r.path.starts_with("/metadata/instance?") {
                let doc = serde_json::json!({"compute": {"name": "vm-www", "osProfile": {"computerName": "www-azure"},
                    "publicKeys": [{"keyData": key, "path": "/home/admin/.ssh/authorized_keys"}]}});
                return (200, doc.to_string());
            }
            return (404, "".into());
        }
        if r.header("x-ms-version").is_none() {
            return (400, "x-ms-version required".into());
        }
        match (r.method.as_str(), r.path.as_str()) {
            ("GET", "/machine/?comp=goalstate") => (
                200,
                "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<GoalState><Version>2012-11-30</Version>\
                 <Incarnation>3</Incarnation><Machine><ExpectedState>Started</ExpectedState></Machine>\
                 <Container><ContainerId>c0ffee00-1111-2222-3333-444455556666</ContainerId><RoleInstanceList>\
                 <RoleInstance><InstanceId>role-instance-7</InstanceId></RoleInstance></RoleInstanceList></Container>\
                 </GoalState>"
                    .into(),
            ),
            ("POST", "/machine/?comp=health") => (200, "".into()),
            _ => (404, "".into()),
        }
    }
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
        "DOMAIN=foobar.com\nCANONICAL=www.foobar.com\nTLS_CERTIFICATE=/etc/foobar/tls/cert.pem\n",
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

#[test]
fn no_cloud_in_dmi_means_no_request_no_wait_and_no_change() {
    let root = scratch_root("inst-none");
    let dmi = dmi(
        "dmi-qemu",
        &[
            ("sys_vendor", "QEMU"),
            ("product_name", "Standard PC (Q35 + ICH9, 2009)"),
        ],
    );
    // A metadata service that answers: it must not be asked.
    let server = FakeHttp::start(ec2(true, KEY, None));
    let (code, out, err, secs) = instance_config(&root, &dmi, &["--metadata-url", &server.url()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("platform none"), "{out}");
    assert!(secs < 1.0, "took {secs:.2} s");
    assert!(server.requests().is_empty());
    assert_eq!(read(&root, "etc/hostname"), "foobar\n");
    assert_eq!(read(&root, "etc/ssh/authorized_keys/admin"), format!("{IMAGE_KEY}\n"));
}

#[test]
fn ec2_imdsv2_gives_hostname_key_and_a_site_fragment() {
    let root = scratch_root("inst-ec2");
    let dmi = dmi("dmi-ec2", &[("sys_vendor", "Amazon EC2"), ("product_name", "t3.small")]);
    let fragment = "#foobar-config\n[site]\ndomain = \"example.org\"\ncanonical = \"www.example.org\"\n";
    let server = FakeHttp::start(ec2(true, KEY, Some(fragment)));
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

    assert_eq!(read(&root, "etc/hostname"), "ip-10-1-2-3\n");
    assert!(read(&root, "etc/hosts").contains("127.0.1.1 ip-10-1-2-3\n"));
    assert!(!read(&root, "etc/hosts").contains("foobar"));
    let keys = read(&root, "etc/ssh/authorized_keys/admin");
    assert!(keys.contains(IMAGE_KEY) && keys.contains(KEY), "{keys}");
    let site = read(&root, "etc/nginx/sites-available/foobar");
    assert!(site.contains("server_name www.example.org;") && site.contains("server_name example.org;"));
    assert!(site.contains("return 301 $scheme://www.example.org$request_uri;"));
    assert!(!site.contains("foobar.com;"), "{site}");
    let env = read(&root, "etc/foobar/site.env");
    assert!(
        env.contains("DOMAIN=example.org\n")
            && env.contains("CANONICAL=www.example.org\n")
            && env.contains("TLS_CERTIFICATE=")
    );
    let record: serde_json::Value = serde_json::from_str(&read(&root, "var/lib/foobar/instance.json")).unwrap();
    assert_eq!(record["platform"], "ec2");
    // EC2 waits for no report: nothing is recorded for one and nothing is sent.
    assert!(!foobar_agent::metadata::has_ready_report(&root));
    assert_eq!(foobar_agent::metadata::report_ready(&root).unwrap(), None);

    // Applying again (a first boot that re-runs) adds nothing twice.
    let (code, _, err, _) = instance_config(&root, &dmi, &["--metadata-url", &server.url()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(read(&root, "etc/ssh/authorized_keys/admin").matches(KEY).count(), 1);
}

#[test]
fn ec2_without_imdsv2_falls_back_to_imdsv1() {
    let root = scratch_root("inst-ec2v1");
    let dmi = dmi("dmi-ec2-xen", &[("sys_vendor", "Xen"), ("bios_version", "4.11.amazon")]);
    let server = FakeHttp::start(ec2(false, KEY, None));
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
fn gce_asks_with_the_metadata_flavor_header() {
    let root = scratch_root("inst-gce");
    let dmi = dmi(
        "dmi-gce",
        &[("sys_vendor", "Google"), ("product_name", "Google Compute Engine")],
    );
    let server = FakeHttp::start(gce(KEY));
    let (code, out, err, _) = instance_config(&root, &dmi, &["--metadata-url", &server.url()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("platform gce: hostname www-1"), "{out}");
    assert_eq!(read(&root, "etc/hostname"), "www-1\n");
    assert!(read(&root, "etc/ssh/authorized_keys/admin").contains(KEY));
    assert!(server
        .requests()
        .iter()
        .all(|r| r.header("metadata-flavor") == Some("Google")));
}

#[test]
fn azure_reads_imds_and_the_goal_state_then_reports_ready_once_asked() {
    let root = scratch_root("inst-azure");
    let dmi = dmi(
        "dmi-azure",
        &[
            ("sys_vendor", "Microsoft Corporation"),
            ("product_name", "Virtual Machine"),
            ("chassis_asset_tag", "7783-7084-3265-9085-8269-3286-77"),
        ],
    );
    let server = FakeHttp::start(azure(KEY));
    let (code, out, err, _) = instance_config(&root, &dmi, &["--metadata-url", &server.url()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("platform azure: hostname www-azure"), "{out}");
    assert!(read(&root, "etc/ssh/authorized_keys/admin").contains(KEY));
    // Nothing is reported at first boot: Ready waits for the site.
    assert!(!server.requests().iter().any(|r| r.method == "POST"));
    assert!(
        foobar_agent::metadata::has_ready_report(&root),
        "the goal state is recorded"
    );
    let told = foobar_agent::metadata::report_ready(&root).unwrap();
    assert_eq!(told, Some(foobar_agent::metadata::Platform::Azure));
    let reports: Vec<Request> = server.requests().into_iter().filter(|r| r.method == "POST").collect();
    assert_eq!(reports.len(), 1);
    let body = &reports[0].body;
    for needle in [
        "<State>Ready</State>",
        "<ContainerId>c0ffee00-1111-2222-3333-444455556666</ContainerId>",
        "<InstanceId>role-instance-7</InstanceId>",
        "<GoalStateIncarnation>3</GoalStateIncarnation>",
    ] {
        assert!(body.contains(needle), "{needle} not in {body}");
    }
}

#[test]
fn nocloud_seed_gives_hostname_and_keys_from_cloud_config() {
    let root = scratch_root("inst-nocloud");
    let dmi = dmi("dmi-plain", &[("sys_vendor", "QEMU")]);
    let seed = support::temp_dir("seed");
    std::fs::write(seed.join("meta-data"), "instance-id: i-1\nlocal-hostname: web-7\n").unwrap();
    std::fs::write(
        seed.join("user-data"),
        format!("#cloud-config\nssh_authorized_keys:\n  - {KEY}\npackages: []\n"),
    )
    .unwrap();
    let (code, out, err, _) = instance_config(&root, &dmi, &["--seed-dir", seed.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("platform nocloud: hostname web-7, 1 SSH key(s)"), "{out}");
    assert_eq!(read(&root, "etc/hostname"), "web-7\n");
    assert!(read(&root, "etc/ssh/authorized_keys/admin").contains(KEY));
}

#[test]
fn a_silent_metadata_service_is_given_up_on_within_bounds_and_a_bad_fragment_is_refused() {
    let root = scratch_root("inst-bad");
    let dmi = dmi("dmi-ec2b", &[("sys_vendor", "Amazon EC2")]);
    let fragment = "#foobar-config\n[site]\ndomain = \"not a name\"\n";
    let server = FakeHttp::start(ec2(true, KEY, Some(fragment)));
    let (code, _, err, _) = instance_config(&root, &dmi, &["--metadata-url", &server.url()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("key `site`: expected DNS names, got `not a name`"),
        "{err}"
    );
    assert_eq!(
        read(&root, "etc/hostname"),
        "foobar\n",
        "nothing applied from a refused answer"
    );

    // Nothing listens: bounded retries, then a clear error.
    let port = support::free_port();
    let start = Instant::now();
    let (code, _, err, _) = instance_config(&root, &dmi, &["--metadata-url", &format!("http://127.0.0.1:{port}")]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(start.elapsed() < Duration::from_secs(40), "{:?}", start.elapsed());
}
