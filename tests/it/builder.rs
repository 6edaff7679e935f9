//! The builder's fast tier: rendered files (snapshots and the real `nginx -t`), and the errors a user sees for bad
//! input, each checked through the real `imagebuild` binary where a user would meet it.

use std::process::Command;

use expect_test::expect_file;
use foobar_builder::components::agent;
use foobar_builder::components::web::{self as render, ProxyVars, SiteVars};

use crate::support::{self, binary};

fn imagebuild(args: &[&str]) -> (i32, String) {
    let out = Command::new(binary("imagebuild")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn nginx_site_snapshot() {
    let site = render::site(&SiteVars::for_site("foobar.com", "www.foobar.com")).unwrap();
    expect_file!["snapshots/nginx-site.conf"].assert_eq(&site);
    let proxy = render::proxy(&ProxyVars { connect_timeout: 5 }).unwrap();
    expect_file!["snapshots/nginx-proxy.conf"].assert_eq(&proxy);
}

#[test]
fn grub_menu_snapshot() {
    let cfg = foobar_builder::bootloader::grub_cfg("0f1e2d3c-4b5a-4968-8776-655443322110", "6.1.0-99-cloud-amd64");
    expect_file!["snapshots/grub.cfg"].assert_eq(&cfg);
}

/// The site rendered with `vars` (its paths moved into a scratch directory), checked by the real `nginx -t`.
fn nginx_t(tag: &str, mut vars: SiteVars) -> (bool, String, std::path::PathBuf) {
    let dir = support::temp_dir(tag);
    vars.proxy_conf = dir.join("foobar-proxy.conf").display().to_string();
    // nginx -t loads the certificate, as first boot would have made it.
    let (cert, key) = support::self_signed_certificate(&dir, &["www.example.org", "example.org"]);
    vars.tls_certificate = cert.display().to_string();
    vars.tls_key = key.display().to_string();
    std::fs::write(dir.join("site.conf"), render::site(&vars).unwrap()).unwrap();
    std::fs::write(
        dir.join("foobar-proxy.conf"),
        render::proxy(&ProxyVars { connect_timeout: 5 }).unwrap(),
    )
    .unwrap();
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "pid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n  access_log off;\n  \
             client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  include {d}/site.conf;\n}}\n"
        ),
    )
    .unwrap();
    let (ok, stderr) = run_nginx_t(&dir);
    (ok, stderr, dir)
}

/// `nginx -t` on `DIR/nginx.conf`: whether it passed, and what it said.
fn run_nginx_t(dir: &std::path::Path) -> (bool, String) {
    let out = Command::new("nginx")
        .args(["-t", "-p"])
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .output()
        .expect("nginx is installed (`just deps`)");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success() && stderr.contains("test is successful"), stderr)
}

#[test]
fn rendered_nginx_configuration_passes_nginx_t() {
    let (ok, stderr, dir) = nginx_t("nginx", SiteVars::for_site("example.org", "www.example.org"));
    assert!(ok, "nginx -t failed:\n{stderr}");

    // And a broken one fails, so this check can fail.
    std::fs::write(dir.join("site.conf"), "server { listen 80; bogus_directive on; }\n").unwrap();
    let (ok, stderr) = run_nginx_t(&dir);
    assert!(!ok, "{stderr}");
}

fn app_site(upstream: &str, routes: &[&str]) -> SiteVars {
    let routes: Vec<String> = routes.iter().map(|r| r.to_string()).collect();
    SiteVars::for_site("foobar.com", "www.foobar.com").with_app(upstream, &routes)
}

#[test]
fn an_app_site_sends_everything_but_static_files_and_the_agents_endpoints_to_the_app() {
    let site = render::site(&app_site("unix:/run/foobar-app/app.sock", &["/"])).unwrap();
    expect_file!["snapshots/nginx-site-app.conf"].assert_eq(&site);
    // The built-in app's routes are gone; the agent's endpoints stay.
    assert!(!site.contains("location = /posts") && !site.contains("location /api/"));
    assert!(site.contains("location = /readyz"));
    for (tag, vars) in [
        ("nginx-app-socket", app_site("unix:/run/foobar-app/app.sock", &["/"])),
        ("nginx-app-port", app_site("127.0.0.1:8080", &["/notes", "/api/"])),
    ] {
        let (ok, stderr, _) = nginx_t(tag, vars);
        assert!(ok, "{tag}: nginx -t failed:\n{stderr}");
    }
    // Only the named prefixes go to the app when routes are given; `/` then stays static.
    let some = render::site(&app_site("127.0.0.1:8080", &["/notes"])).unwrap();
    assert!(some.contains("location ^~ /notes {") && !some.contains("try_files $uri @app;"));
    assert!(some.contains("try_files /index.html =404;") && some.contains("try_files $uri $uri/ =404;"));
}

#[test]
fn an_app_images_agent_configuration_snapshot() {
    let config = foobar_builder::config::ImageConfig::load(Some(&examples().join("flask/foobar.toml"))).unwrap();
    let app = config.app.as_ref().expect("the Flask example has an [app]");
    let text = agent::agent_config(Some(app), false).unwrap();
    expect_file!["snapshots/agent-flask.toml"].assert_eq(&text);
    expect_file!["snapshots/agent-default.toml"].assert_eq(&agent::agent_config(None, false).unwrap());
    let node = foobar_builder::config::ImageConfig::load(Some(&examples().join("node/foobar.toml"))).unwrap();
    let text = agent::agent_config(node.app.as_ref(), false).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:8080\""), "{text}");
}

fn examples() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn bad_app_settings_name_the_key() {
    let dir = support::temp_dir("appcfg");
    std::fs::create_dir_all(dir.join("app")).unwrap();
    std::fs::create_dir_all(dir.join("sql")).unwrap();
    std::fs::write(dir.join("sql/notes.sql"), "SELECT 1;\n").unwrap();
    let out = dir.join("never.qcow2");
    let good = "files = \"app\"\ncommand = [\"server\", \"{port}\"]\n";
    let cases = [
        (
            "files = \"nowhere\"\ncommand = [\"server\", \"{port}\"]\n",
            "app.files",
            "is not one",
        ),
        ("command = [\"server\", \"{port}\"]\n", "files", "missing field"),
        ("files = \"app\"\ncommand = []\n", "app.command", "command line"),
        (
            "files = \"app\"\ncommand = [\"server\", \"{addr}\"]\n",
            "app.command",
            "unknown placeholder `{addr}`",
        ),
        (
            "files = \"app\"\ncommand = [\"server\", \"--port\", \"8000\"]\n",
            "app.command",
            "where the app is told to listen",
        ),
        (
            "files = \"app\"\ncommand = [\"server\", \"{port}\", \"{socket}\"]\n",
            "app.command",
            "not both",
        ),
        (
            &format!("{good}packages = [\"Flask!\"]\n"),
            "app.packages",
            "package names",
        ),
        (
            &format!("{good}health = \"health\"\n"),
            "app.health",
            "a path like /health",
        ),
        (
            &format!("{good}migrations = \"sql\"\n"),
            "app.migrations",
            "found `notes.sql`",
        ),
        (
            &format!("{good}migrations = \"nope\"\n"),
            "app.migrations",
            "cannot read",
        ),
        (
            &format!("{good}env = {{ DATABASE_URL = \"x\" }}\n"),
            "app.env",
            "set by the agent",
        ),
        (
            &format!("{good}env = {{ \"1X\" = \"x\" }}\n"),
            "app.env",
            "variable names",
        ),
        (&format!("{good}routes = [\"/static/app\"]\n"), "app.routes", "overlaps"),
        (&format!("{good}routes = []\n"), "app.routes", "at least one"),
        (&format!("{good}name = \"My App\"\n"), "app.name", "lowercase"),
        (&format!("{good}colour = \"blue\"\n"), "colour", "unknown field"),
    ];
    for (body, key, expected) in cases {
        let file = dir.join("app.toml");
        std::fs::write(&file, format!("[app]\n{body}")).unwrap();
        let (code, stderr) = imagebuild(&["--out", out.to_str().unwrap(), "--config", file.to_str().unwrap()]);
        assert_eq!(code, 1, "{body}: {stderr}");
        assert!(
            stderr.contains(file.to_str().unwrap()),
            "{body}: file not named: {stderr}"
        );
        assert!(stderr.contains(key), "{body}: key `{key}` not named: {stderr}");
        assert!(stderr.contains(expected), "{body}: `{expected}` missing: {stderr}");
    }
    assert!(!out.exists());
    // The good one and both examples are accepted.
    std::fs::write(dir.join("app.toml"), format!("[app]\n{good}")).unwrap();
    for file in [
        dir.join("app.toml"),
        examples().join("flask/foobar.toml"),
        examples().join("node/foobar.toml"),
    ] {
        foobar_builder::config::ImageConfig::load(Some(&file)).unwrap_or_else(|e| panic!("{}: {e:#}", file.display()));
    }
}

#[test]
fn a_bad_config_names_the_file_the_key_and_what_was_expected() {
    let dir = support::temp_dir("imgcfg");
    let out = dir.join("never.qcow2");
    let out_text = out.to_str().unwrap();
    let cases = [
        ("[site]\ndomian = \"x.com\"\n", "domian", "domain"),
        ("[site]\ndomain = \"not a name!\"\n", "site.domain", "DNS name"),
        ("[disk]\nsize-mib = 10\n", "disk.size-mib", "at least 1024"),
        (
            "[debian]\npackages = [\"Bad Name\"]\n",
            "debian.packages",
            "package names",
        ),
        ("[disk]\nsize-mib = \"big\"\n", "size-mib", "expected u64"),
        (
            "[access]\nssh-authorized-keys = [\"hello\"]\n",
            "access.ssh-authorized-keys",
            "OpenSSH public keys",
        ),
    ];
    for (text, key, expected) in cases {
        let file = dir.join("bad.toml");
        std::fs::write(&file, text).unwrap();
        let (code, stderr) = imagebuild(&["--out", out_text, "--config", file.to_str().unwrap()]);
        assert_eq!(code, 1, "{text}: {stderr}");
        assert!(
            stderr.contains(file.to_str().unwrap()),
            "{text}: file not named: {stderr}"
        );
        assert!(stderr.contains(key), "{text}: key `{key}` not named: {stderr}");
        assert!(
            stderr.contains(expected),
            "{text}: expectation `{expected}` missing: {stderr}"
        );
    }
    let (code, stderr) = imagebuild(&[
        "--out",
        out_text,
        "--config",
        dir.join("missing.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot read config file") && stderr.contains("missing.toml"),
        "{stderr}"
    );
    assert!(!out.exists(), "a failed build leaves no output");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        ["bad.toml"],
        "nothing but the test's own file in the output directory"
    );
}

/// Values that would reach first boot's root shell, nginx's configuration or mmdebstrap's options: each refused,
/// naming the key.
#[test]
fn hostile_config_values_are_refused_naming_the_key() {
    let dir = support::temp_dir("hostile");
    let out = dir.join("never.qcow2");
    let tls = |cert: &str| format!("[site]\ntls-certificate = {cert:?}\ntls-key = \"/etc/ssl/k.pem\"\n");
    let cases = [
        (tls("/etc/ssl/$(reboot).pem"), "site.tls-certificate"),
        (tls("/etc/ssl/a b.pem"), "site.tls-certificate"),
        (tls("/etc/ssl/x.pem;\n  return 200 pwned"), "site.tls-certificate"),
        (tls("/etc/ssl/'q'.pem"), "site.tls-certificate"),
        (tls("/etc/ssl/../../root/k.pem"), "site.tls-certificate"),
        (tls("cert.pem"), "site.tls-certificate"),
        (
            "[site]\ntls-certificate = \"/etc/ssl/c.pem\"\ntls-key = \"/etc/ssl/`id`.pem\"\n".to_string(),
            "site.tls-key",
        ),
        (
            "[debian]\nmirror = \"--customize-hook=touch /pwned\"\n".into(),
            "debian.mirror",
        ),
        (
            "[debian]\nmirror = \"http://deb.example/debian $(id)\"\n".into(),
            "debian.mirror",
        ),
        (
            "[debian]\nmirror = \"deb http://deb.example/debian bookworm main; id\"\n".into(),
            "debian.mirror",
        ),
        ("[debian]\nmirror = \"ftp.example\"\n".into(), "debian.mirror"),
        ("[debian]\nmirror = \"/no/such/sources.list\"\n".into(), "debian.mirror"),
        (
            "[access]\nssh-authorized-keys = [\"ssh-ed25519 AAAA a\\nssh-ed25519 BBBB injected\"]\n".into(),
            "access.ssh-authorized-keys",
        ),
        ("[site]\ndomain = \"www.foobar.com\"\n".into(), "site.canonical"),
        ("[site]\ndomain = \"foo\\nbar.com\"\n".into(), "site.domain"),
        (
            "[acme]\ndirectory = \"http://acme.example/dir\"\n".into(),
            "acme.directory",
        ),
        (
            "[acme]\ndirectory = \"https://acme.example/dir'; reboot; '\"\n".into(),
            "acme.directory",
        ),
        ("[acme]\ndirectory = \"--server=https://x\"\n".into(), "acme.directory"),
        ("[acme]\nemail = \"ops@foobar.com $(id)\"\n".into(), "acme.email"),
        ("[acme]\nemail = \"-v\"\n".into(), "acme.email"),
        ("[acme]\nrenew-days = 0\n".into(), "acme.renew-days"),
        (
            "[updates]\nreboot-time = \"03:30\\\";\\nAPT::x \\\"1\"\n".into(),
            "updates.reboot-time",
        ),
        ("[updates]\nreboot-time = \"25:00\"\n".into(), "updates.reboot-time"),
        (
            "[updates]\nsecurity = false\nreboot-time = \"03:30\"\n".into(),
            "updates.reboot-time",
        ),
        ("[backup]\nschedule = \"every day\"\n".into(), "backup.schedule"),
        (
            "[backup]\nschedule = \"daily\\nExecStart=/bin/sh\"\n".into(),
            "backup.schedule",
        ),
        ("[backup]\nschedule = \"\"\n".into(), "backup.schedule"),
        ("[backup]\nschedule = \"*-*-* 25:00\"\n".into(), "backup.schedule"),
        ("[data]\ndisk = \"vdb\"\n".into(), "data.disk"),
        ("[data]\ndisk = \"/dev/vdb; reboot\"\n".into(), "data.disk"),
        ("[data]\ndisk = \"/dev/../etc/passwd\"\n".into(), "data.disk"),
        (
            "[acme]\nenabled = true\n[site]\ntls-certificate = \"/etc/ssl/c.pem\"\ntls-key = \"/etc/ssl/k.pem\"\n"
                .into(),
            "acme.enabled",
        ),
    ];
    for (text, key) in cases {
        let file = dir.join("bad.toml");
        std::fs::write(&file, &text).unwrap();
        let (code, stderr) = imagebuild(&["--out", out.to_str().unwrap(), "--config", file.to_str().unwrap()]);
        assert_eq!(code, 1, "{text}: {stderr}");
        assert!(
            stderr.contains(&format!("`{key}`")),
            "{text}: key `{key}` not named: {stderr}"
        );
        assert!(!out.exists(), "{text}: a refused config leaves no output");
    }
}

#[test]
fn site_env_quotes_every_value_for_the_shell_that_sources_it() {
    use foobar_builder::components::web::shell_quote;
    assert_eq!(shell_quote("foobar.com"), "'foobar.com'");
    assert_eq!(shell_quote("it's"), "'it'\\''s'");
    // What a shell makes of it: the value itself, and nothing run.
    let dir = support::temp_dir("quote");
    let value = "a'b $(touch pwned) `touch pwned2` \"c\"";
    let script = format!("V={}\nprintf %s \"$V\"", shell_quote(value));
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), value);
    assert!(!dir.join("pwned").exists() && !dir.join("pwned2").exists());
}

#[test]
fn unusable_flags_are_refused_before_any_work() {
    let dir = support::temp_dir("imgflags");
    let out = |name: &str| dir.join(name).display().to_string();
    let (code, stderr) = imagebuild(&["--out", &out("disk.iso")]);
    assert_eq!(code, 1);
    assert!(stderr.contains("unknown format `iso`"), "{stderr}");
    let (code, stderr) = imagebuild(&["--out", &out("noext")]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no extension"), "{stderr}");
    let private = dir.join("id_ed25519");
    std::fs::write(
        &private,
        "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n",
    )
    .unwrap();
    let (code, stderr) = imagebuild(&["--out", &out("x.qcow2"), "--ssh-key", private.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("expected an OpenSSH public key"), "{stderr}");
    let (code, stderr) = imagebuild(&["--out", &out("x.qcow2"), "--agent-bin", &out("nope")]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("agent binary") && stderr.contains("cargo build --release"),
        "{stderr}"
    );
    let (code, stderr) = imagebuild(&["--out", "/nonexistent-dir/x.qcow2"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("does not exist"), "{stderr}");
}

#[test]
fn missing_host_tools_are_listed_with_their_packages() {
    let empty = support::temp_dir("emptypath");
    let out = Command::new(binary("imagebuild"))
        .args(["--out", "/tmp/x.qcow2"])
        .env("PATH", &empty)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("missing host tools"), "{stderr}");
    for (tool, package) in [
        ("mmdebstrap", "mmdebstrap"),
        ("qemu-img", "qemu-utils"),
        ("mcopy", "mtools"),
    ] {
        assert!(
            stderr.contains(tool) && stderr.contains(package),
            "{tool}/{package} not listed: {stderr}"
        );
    }
}

#[test]
fn verify_accepts_what_the_manifest_recorded_and_names_both_hashes_otherwise() {
    let dir = support::temp_dir("verify");
    let image = dir.join("site.qcow2");
    let extra = dir.join("site.raw");
    std::fs::write(&image, b"not really an image, but bytes with a hash").unwrap();
    std::fs::write(&extra, b"the raw twin").unwrap();
    let sha = support::sha256sum;
    let manifest = serde_json::json!({
        "seed": "abc123",
        "outputs": [
            { "format": "qcow2", "path": image.display().to_string(), "sha256": sha(&image), "bytes": 42 },
            { "format": "raw", "path": extra.display().to_string(), "sha256": sha(&extra), "bytes": 12 },
        ],
    });
    std::fs::write(support::sidecar(&image, "manifest.json"), manifest.to_string()).unwrap();
    let verify = support::imagebuild_verify;

    let (code, text) = verify(&image);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&sha(&image)) && text.contains("seed abc123"), "{text}");
    let (code, text) = verify(&extra);
    assert_eq!(
        code,
        Some(0),
        "an extra format is found in the main output's manifest: {text}"
    );

    let mut bytes = std::fs::read(&image).unwrap();
    bytes[10] ^= 0x01;
    std::fs::write(&image, &bytes).unwrap();
    let (code, text) = verify(&image);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("does not match its manifest") && text.contains(&sha(&image)),
        "both hashes are named: {text}"
    );

    let (code, text) = verify(&dir.join("elsewhere.qcow2"));
    assert_eq!(code, Some(1));
    assert!(text.contains("cannot read the manifest"), "{text}");
}

#[test]
fn a_cached_layer_that_changed_after_it_was_sealed_is_not_used() {
    use foobar_builder::rootfs::{check_layer, seal_layer};
    let dir = support::temp_dir("layer");
    let layer = dir.join("rootfs-key");
    let marker = dir.join("rootfs-key.complete");
    std::fs::create_dir_all(layer.join("var/lib/dpkg")).unwrap();
    std::fs::write(layer.join("var/lib/dpkg/status"), "Package: base-files\n").unwrap();
    std::fs::write(layer.join("etc-file"), "x").unwrap();

    assert!(check_layer(&layer, &marker)
        .unwrap_err()
        .contains("no completion marker"));
    seal_layer(&layer, &marker).unwrap();
    assert_eq!(check_layer(&layer, &marker), Ok(()));

    // A file lost (a cache directory cleaned by hand, a disk error): the layer is rebuilt, not used.
    std::fs::remove_file(layer.join("etc-file")).unwrap();
    assert!(check_layer(&layer, &marker)
        .unwrap_err()
        .contains("changed after it was cached"));
    std::fs::write(layer.join("etc-file"), "x").unwrap();
    // A file truncated.
    std::fs::write(layer.join("var/lib/dpkg/status"), "").unwrap();
    assert!(check_layer(&layer, &marker).is_err());
}

#[test]
fn role_all_is_the_one_server_stack_with_its_packages_and_ports() {
    use foobar_builder::{plan, roles};
    let config = foobar_builder::config::ImageConfig::load(None).unwrap();
    assert_eq!(config.role, ["all"]);
    let components = roles::resolve(&config.role, roles::ROLES).unwrap();
    let names: Vec<&str> = components.iter().map(|c| c.name).collect();
    assert_eq!(
        names,
        ["base", "boot", "access", "firewall", "web", "database", "agent"]
    );
    let layer = plan::layer(&config, &components);
    assert_eq!(
        layer.packages,
        [
            "ca-certificates",
            "dbus",
            "e2fsprogs",
            "fdisk",
            "iproute2",
            "linux-image-cloud-amd64",
            "logrotate",
            "mariadb-server",
            "nftables",
            "nginx-light",
            "openssh-server",
            "openssl",
            "sudo",
            "systemd-resolved",
            "systemd-sysv",
            "uacme",
            "udev",
            "unattended-upgrades",
        ]
    );
    let hooks: Vec<&str> = layer.hooks.iter().map(|h| h.key).collect();
    assert_eq!(hooks, ["initramfs"]);
    let ports: Vec<u16> = plan::ports(&components).iter().map(|p| p.number).collect();
    assert_eq!(ports, [22, 80, 443]);
    // The firewall opens exactly those.
    let rules = foobar_builder::components::firewall::rules(&plan::ports(&components)).unwrap();
    assert!(rules.contains("tcp dport { 22, 80, 443 } accept"), "{rules}");
    assert!(rules.contains("only SSH, HTTP and HTTPS answer"), "{rules}");
}

#[test]
fn the_layer_key_follows_the_resolved_package_list() {
    use foobar_builder::{plan, roles};
    let config = foobar_builder::config::ImageConfig::load(None).unwrap();
    let components = roles::resolve(&["all".to_string()], roles::ROLES).unwrap();
    let key = plan::layer(&config, &components).key;
    assert_eq!(key, plan::layer(&config, &components).key, "the key is stable");
    let mut more = config.clone();
    more.debian.packages = vec!["curl".to_string()];
    let with_curl = plan::layer(&more, &components);
    assert!(with_curl.packages.contains(&"curl".to_string()));
    assert_ne!(with_curl.key, key, "another package list, another layer");
    let fewer: Vec<_> = components.iter().copied().filter(|c| c.name != "database").collect();
    let without_db = plan::layer(&config, &fewer);
    assert!(!without_db.packages.contains(&"mariadb-server".to_string()));
    assert_ne!(without_db.key, key);
}

#[test]
fn an_unknown_role_fails_the_build_naming_the_key_and_the_roles_and_writes_nothing() {
    let dir = support::temp_dir("role");
    let out = dir.join("never.qcow2");
    let file = dir.join("role.toml");
    std::fs::write(&file, "role = \"webserver\"\n").unwrap();
    let (code, stderr) = imagebuild(&["--out", out.to_str().unwrap(), "--config", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(file.to_str().unwrap()), "file not named: {stderr}");
    assert!(
        stderr.contains("key `role`")
            && stderr.contains("expected one or more of all")
            && stderr.contains("`webserver`"),
        "{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left,
        [std::ffi::OsString::from("role.toml")],
        "output written: {left:?}"
    );
}

#[test]
fn a_role_that_names_an_unknown_component_is_refused_naming_it() {
    use foobar_builder::roles::{resolve, Role};
    let roles = [Role {
        name: "edge",
        components: &["base", "loadbalancer"],
    }];
    let err = format!(
        "{:#}",
        resolve(&["edge".to_string()], &roles)
            .err()
            .expect("an unknown component is an error")
    );
    assert!(
        err.contains("role `edge`") && err.contains("`loadbalancer`") && err.contains("base, boot, access"),
        "{err}"
    );
    // Every built-in role names only components that exist.
    for role in foobar_builder::roles::ROLES {
        resolve(&[role.name.to_string()], foobar_builder::roles::ROLES).unwrap();
    }
}

/// The agent.toml imagebuild writes, read by the agent's own `Config`: the two views cannot drift apart.
fn agent_reads(text: &str, tag: &str) -> foobar_agent::config::Config {
    let dir = support::temp_dir(tag);
    let file = dir.join("agent.toml");
    std::fs::write(&file, text).unwrap();
    foobar_agent::config::Config::load(Some(&file))
        .unwrap_or_else(|e| panic!("the agent rejects imagebuild's agent.toml: {e:#}\n{text}"))
}

#[test]
fn the_agent_reads_the_agent_toml_imagebuild_writes_as_meant() {
    use foobar_agent::config::Listen;
    use std::path::PathBuf;
    let config = agent_reads(&agent::agent_config(None, false).unwrap(), "agent-default");
    assert_eq!(
        config.listen,
        Listen::Unix(PathBuf::from(foobar_builder::config::AGENT_SOCKET))
    );
    assert_eq!(
        config.database_url,
        "mysql://foobar@localhost/foobar?socket=/run/mysqld/mysqld.sock"
    );
    assert_eq!(
        config.first_boot_marker.as_deref(),
        Some(std::path::Path::new(foobar_builder::config::FIRST_BOOT_MARKER))
    );
    assert!(config.app.is_none() && config.migrations.is_none());

    for (example, listen) in [
        ("flask", Listen::Unix(PathBuf::from(foobar_builder::config::APP_SOCKET))),
        ("node", Listen::Tcp("127.0.0.1:8080".to_string())),
    ] {
        let image = foobar_builder::config::ImageConfig::load(Some(&examples().join(format!("{example}/foobar.toml"))))
            .unwrap();
        let written = image.app.as_ref().unwrap();
        let config = agent_reads(&agent::agent_config(Some(written), false).unwrap(), example);
        assert_eq!(
            config.migrations.as_deref(),
            Some(std::path::Path::new(agent::APP_MIGRATIONS))
        );
        let app = config.app.expect("the [app] table arrives");
        assert_eq!(app.name, written.name);
        assert_eq!(app.command, written.command);
        assert_eq!(app.listen, listen, "{example}");
        assert_eq!(app.directory, PathBuf::from(agent::APP_DIR));
        assert_eq!(app.health, written.health);
        assert_eq!(app.env, written.env);
        // The agent fills in the placeholder where nginx (the web component) expects the app.
        let argv = app.argv().join(" ");
        let upstream = written.address();
        let at = upstream.trim_start_matches("unix:").rsplit(':').next().unwrap();
        assert!(argv.contains(at), "{example}: `{argv}` does not listen at {upstream}");
    }
}

#[test]
fn imagebuild_and_the_agent_judge_host_names_app_names_and_acme_settings_alike() {
    let hostnames = [
        ("www.foobar.com", true),
        ("foobar", true),
        ("a-b.c-d.example", true),
        ("x1.example.org", true),
        (&*format!("{}.com", "a".repeat(63)), true),
        (&*format!("{}.com", "a".repeat(64)), false),
        (&*["abcdefghi"; 26].join("."), false), // 259 bytes
        ("", false),
        ("-lead.example", false),
        ("trail-.example", false),
        ("double..dot", false),
        ("under_score.example", false),
        ("space here", false),
        ("semi;colon", false),
        ("new\nline", false),
        ("dot.", false),
    ];
    for (name, valid) in hostnames {
        assert_eq!(
            foobar_builder::config::is_hostname(name),
            valid,
            "imagebuild on {name:?}"
        );
        assert_eq!(
            foobar_agent::metadata::valid_hostname(name),
            valid,
            "the agent on {name:?}"
        );
    }
    let urls = [
        ("https://acme-v02.api.letsencrypt.org/directory", true),
        ("https://10.0.2.2:14000/dir", true),
        ("https://ca.internal/acme/acme/directory", true),
        ("http://acme.example/dir", false),
        ("https:///dir", false),
        ("https://acme.example/dir'x", false),
        ("https://acme.example/$(id)", false),
        ("https://acme.example/a b", false),
        ("https://acme.example/\n", false),
        ("-https://acme.example/", false),
    ];
    for (url, valid) in urls {
        assert_eq!(foobar_builder::config::is_acme_url(url), valid, "imagebuild on {url:?}");
        assert_eq!(foobar_agent::acme::valid_url(url), valid, "the agent on {url:?}");
    }
    let emails = [
        ("ops@foobar.com", true),
        ("first.last+acme@mail.foobar.com", true),
        ("ops@localhost", false),
        ("@foobar.com", false),
        ("ops", false),
        ("o'ps@foobar.com", false),
        ("ops@foobar.com\n", false),
        ("ops @foobar.com", false),
    ];
    for (email, valid) in emails {
        assert_eq!(
            foobar_builder::config::is_email(email),
            valid,
            "imagebuild on {email:?}"
        );
        assert_eq!(foobar_agent::acme::valid_email(email), valid, "the agent on {email:?}");
    }
    let app_names = [
        ("app", true),
        ("notes-flask", true),
        ("node2", true),
        (&*"a".repeat(32), true),
        (&*"a".repeat(33), false),
        ("", false),
        ("Notes", false),
        ("my_app", false),
        ("my.app", false),
        ("sp ace", false),
        ("é", false),
    ];
    for (name, valid) in app_names {
        assert_eq!(
            foobar_builder::config::valid_app_name(name),
            valid,
            "imagebuild on {name:?}"
        );
        assert_eq!(
            foobar_agent::config::valid_app_name(name),
            valid,
            "the agent on {name:?}"
        );
    }
}

/// A copy of examples/static/public in a scratch directory, and a config naming it.
fn static_site(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = support::temp_dir(tag);
    let site = dir.join("public");
    let status = Command::new("cp")
        .arg("-r")
        .arg(examples().join("static/public"))
        .arg(&site)
        .status()
        .unwrap();
    assert!(status.success());
    let config = dir.join("site.toml");
    std::fs::write(&config, "[site]\nroot = \"public\"\n").unwrap();
    (config, site)
}

#[test]
fn a_bad_site_root_is_refused_naming_the_key_and_the_path_and_writes_nothing() {
    /// Spoils a copy of the example: (config file, site directory).
    type Spoil = Box<dyn Fn(&std::path::Path, &std::path::Path)>;
    let cases: Vec<(&str, Spoil, &str)> = vec![
        (
            "missing",
            Box::new(|config: &std::path::Path, _: &std::path::Path| {
                std::fs::write(config, "[site]\nroot = \"no-such-dir\"\n").unwrap()
            }),
            "no-such-dir is not one",
        ),
        (
            "no-index",
            Box::new(|_, site: &std::path::Path| std::fs::remove_file(site.join("index.html")).unwrap()),
            "has no index.html",
        ),
        (
            "symlink-out",
            Box::new(|_, site: &std::path::Path| {
                std::os::unix::fs::symlink("/etc/hostname", site.join("host.txt")).unwrap()
            }),
            "host.txt is a symbolic link that leaves the site directory",
        ),
        (
            "control-char",
            Box::new(|_, site: &std::path::Path| std::fs::write(site.join("bad\nname.html"), "x").unwrap()),
            "control characters",
        ),
        (
            "fifo",
            Box::new(|_, site: &std::path::Path| {
                assert!(Command::new("mkfifo")
                    .arg(site.join("pipe"))
                    .status()
                    .unwrap()
                    .success());
            }),
            "pipe is not a regular file",
        ),
        (
            "too-big",
            Box::new(|config: &std::path::Path, site: &std::path::Path| {
                std::fs::write(config, "[site]\nroot = \"public\"\n[disk]\nsize-mib = 1025\n").unwrap();
                std::fs::write(site.join("big.bin"), vec![7u8; 2 << 20]).unwrap();
            }),
            "more than the 1 MiB that `disk.size-mib` = 1025 leaves",
        ),
    ];
    for (tag, spoil, expected) in cases {
        let (config, site) = static_site(&format!("site-{tag}"));
        spoil(&config, &site);
        let out = config.with_file_name("never.qcow2");
        let (code, stderr) = imagebuild(&["--out", out.to_str().unwrap(), "--config", config.to_str().unwrap()]);
        assert_eq!(code, 1, "{tag}: {stderr}");
        assert!(
            stderr.contains(config.to_str().unwrap()),
            "{tag}: file not named: {stderr}"
        );
        assert!(stderr.contains("key `site.root`"), "{tag}: key not named: {stderr}");
        assert!(stderr.contains(expected), "{tag}: expected `{expected}` in: {stderr}");
        assert!(!out.exists(), "{tag}: output written");
    }
}

#[test]
fn the_sites_files_change_the_image_seed_but_not_the_package_layer() {
    use foobar_builder::components::web;
    use foobar_builder::{plan, roles};
    let (config_path, site) = static_site("site-digest");
    let config = foobar_builder::config::ImageConfig::load(Some(&config_path)).unwrap();
    let tree = web::scan_site(&config).unwrap().expect("a site tree");
    let paths: Vec<&str> = tree.entries.iter().map(|e| e.path.as_str()).collect();
    assert!(
        paths.contains(&"css/site.3f9a2b1c.css.gz") && paths.contains(&"about/index.html"),
        "{paths:?}"
    );
    assert!(
        !paths.iter().any(|p| p.contains(".env")),
        "a dot-file would be copied: {paths:?}"
    );
    let components = roles::resolve(&["all".to_string()], roles::ROLES).unwrap();
    let key = plan::layer(&config, &components).key;
    let digest = plan::site_digest(&tree);
    assert_eq!(
        plan::site_digest(&web::scan_site(&config).unwrap().unwrap()),
        digest,
        "stable"
    );

    std::fs::write(site.join("about/index.html"), "<!doctype html><p>changed</p>\n").unwrap();
    let changed = web::scan_site(&config).unwrap().unwrap();
    assert_ne!(plan::site_digest(&changed), digest, "a changed file changes the image");
    assert_eq!(plan::layer(&config, &components).key, key, "the package layer stays");
    let default = foobar_builder::config::ImageConfig::load(None).unwrap();
    assert_eq!(
        plan::layer(&default, &components).key,
        key,
        "the same layer as the default image's"
    );

    // Its error pages are used, and the rendered site passes nginx -t.
    let vars = SiteVars::for_site("foobar.com", "www.foobar.com").with_error_pages(|p| changed.has_file(p));
    assert_eq!(
        vars.error_pages,
        ["403 404 =404 /404.html", "500 502 503 504 /50x.html"]
    );
    let (ok, stderr, _) = nginx_t("nginx-static", vars);
    assert!(ok, "nginx -t failed:\n{stderr}");
}

/// First boot's TLS step, as the image ships it (its two functions taken from `image/files/firstboot`, run by dash):
/// a matching pair stays, a broken one is set aside, and a certificate is always in place for nginx.
#[test]
fn first_boots_tls_step_keeps_a_matching_pair_sets_aside_a_broken_one_and_always_leaves_one() {
    let script =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/files/firstboot"))
            .unwrap();
    let function = |name: &str| -> String {
        let start = script
            .find(&format!("\n{name}() {{"))
            .unwrap_or_else(|| panic!("no {name}() in firstboot"));
        let end = script[start + 1..].find("\n}\n").unwrap() + start + 4;
        script[start..end].to_string()
    };
    let dir = support::temp_dir("fb-tls");
    let (other_cert, other_key) = support::self_signed_certificate(&support::temp_dir("fb-other"), &["other.example"]);
    let run = |self_signed: &str, prepare: &str| -> (String, bool) {
        let body = format!(
            "say() {{ echo \"say: $*\"; }}\n{}\n{}\nTLS_CERTIFICATE={d}/tls/cert.pem TLS_KEY={d}/tls/key.pem \
             TLS_SELF_SIGNED={self_signed} CANONICAL=www.foobar.com DOMAIN=foobar.com\n{prepare}\ntls\n\
             tls_pair_matches && echo matches\n",
            function("tls_pair_matches"),
            function("tls"),
            d = dir.display()
        );
        let out = Command::new("dash").arg("-c").arg(&body).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (text.clone(), out.status.success() && text.contains("matches"))
    };
    // Nothing there: a self-signed pair, the key readable by root alone.
    let (text, ok) = run("yes", "");
    assert!(
        ok && text.contains("self-signed TLS certificate for www.foobar.com"),
        "{text}"
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.join("tls/key.pem")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // An operator's path with nothing installed yet: a stand-in serves, and says how to switch.
    let (text, ok) = run("no", "rm -f \"$TLS_CERTIFICATE\" \"$TLS_KEY\"");
    assert!(
        ok && text.contains("missing: a self-signed one serves until it is installed"),
        "{text}"
    );
    // A key that is not the certificate's: set aside, a stand-in made.
    let broken = format!("cp {} \"$TLS_KEY\"", other_key.display());
    let (text, ok) = run("no", &broken);
    assert!(
        ok && text.contains("not a certificate and its key: set aside as .invalid"),
        "{text}"
    );
    assert!(dir.join("tls/key.pem.invalid").exists());
    // A matching pair in place: kept as it is.
    let pair = format!(
        "cp {} \"$TLS_CERTIFICATE\"; cp {} \"$TLS_KEY\"",
        other_cert.display(),
        other_key.display()
    );
    let (text, ok) = run("no", &pair);
    assert!(ok && !text.contains("say:"), "{text}");
    assert_eq!(
        std::fs::read(dir.join("tls/cert.pem")).unwrap(),
        std::fs::read(&other_cert).unwrap()
    );
}

#[test]
fn security_updates_are_on_by_default_and_off_leaves_the_package_out() {
    use foobar_builder::{plan, roles};
    let on = foobar_builder::config::ImageConfig::load(None).unwrap();
    let components = roles::resolve(&on.role, roles::ROLES).unwrap();
    assert!(plan::layer(&on, &components)
        .packages
        .iter()
        .any(|p| p == "unattended-upgrades"));
    let off =
        foobar_builder::config::ImageConfig::parse("[updates]\nsecurity = false\n", "test", std::path::Path::new("."))
            .unwrap();
    assert!(!plan::layer(&off, &components)
        .packages
        .iter()
        .any(|p| p == "unattended-upgrades"));
    // The security suite only, and a reboot only when a time is set.
    let text = foobar_builder::components::base::unattended_upgrades("");
    assert!(text.contains("#clear Unattended-Upgrade::Origins-Pattern;"), "{text}");
    assert!(
        text.contains("codename=${distro_codename}-security,label=Debian-Security"),
        "{text}"
    );
    assert!(!text.contains("label=Debian\""), "no point-release updates: {text}");
    assert!(text.contains("Automatic-Reboot \"false\""), "{text}");
    let text = foobar_builder::components::base::unattended_upgrades("03:30");
    assert!(
        text.contains("Automatic-Reboot \"true\"") && text.contains("Automatic-Reboot-Time \"03:30\""),
        "{text}"
    );
}

#[test]
fn the_backup_timer_runs_on_the_configured_schedule_daily_by_default() {
    let on_calendar = |text: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("OnCalendar="))
            .map(str::to_string)
            .collect()
    };
    let default = foobar_builder::config::ImageConfig::default();
    assert_eq!(default.backup.schedule, "daily");
    let text = foobar_builder::components::agent::backup_timer(&default.backup.schedule);
    assert_eq!(on_calendar(&text), ["daily"], "{text}");
    let text = foobar_builder::components::agent::backup_timer("*-*-* 03:15");
    assert_eq!(on_calendar(&text), ["*-*-* 03:15"], "{text}");
    assert!(
        text.contains("Persistent=true") && text.contains("WantedBy=timers.target"),
        "{text}"
    );
    // A config with a schedule builds past the config check (an unknown or bad one fails naming the key, above).
    let dir = support::temp_dir("backup-schedule");
    let file = dir.join("ok.toml");
    std::fs::write(&file, "[backup]\nschedule = \"Mon..Fri 02:00\"\n").unwrap();
    let config = foobar_builder::config::ImageConfig::load(Some(&file)).unwrap();
    assert_eq!(config.backup.schedule, "Mon..Fri 02:00");
}
