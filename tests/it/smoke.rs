//! `imagebuild smoke` against small local sites that get one thing wrong each: every fault must be caught by
//! exactly the check meant for it, and a correct site must pass every check. The booted image is checked in
//! `e2e.rs` with the same command.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use foobar_builder::smoke::{self, Options, Outcome};
use serde_json::{json, Value};

use crate::support::{binary, self_signed_certificate, temp_dir, Dns};

const SITE: &str = "www.foobar.com";
const BARE: &str = "foobar.com";

/// What a fake site gets wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    WrongRedirect,
    MissingNosniff,
    ServerVersion,
    NoCacheHeaders,
    UnknownHostServed,
    NotReady,
    HealthWithoutVersion,
    HealthCheckFailing,
    ApiListError,
    ApiWriteError,
    PageDropsPosts,
    NoBodyLimit,
    CertificateForOtherName,
    /// Not a fault: the site runs its own app server (`/healthz` says so) and has no posts app.
    OwnApp,
}

struct Request {
    method: String,
    path: String,
    host: String,
    body: Vec<u8>,
}

struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
}

fn answer(status: u16, content_type: &str, body: impl Into<String>) -> Option<Answer> {
    Some(Answer {
        status,
        headers: vec![("Content-Type", content_type.to_string())],
        body: body.into(),
    })
}

/// A certificate and key for `names`, made by openssl once per name set.
type MadeCertificates = Mutex<Vec<(&'static str, PathBuf, PathBuf)>>;

fn certificate(names: &'static str) -> (PathBuf, PathBuf) {
    static CERTS: OnceLock<MadeCertificates> = OnceLock::new();
    let mut made = CERTS.get_or_init(Default::default).lock().unwrap();
    if let Some((_, cert, key)) = made.iter().find(|(n, _, _)| *n == names) {
        return (cert.clone(), key.clone());
    }
    let list: Vec<&str> = names.split(',').collect();
    let (cert, key) = self_signed_certificate(&temp_dir("smoke-cert"), &list);
    made.push((names, cert.clone(), key.clone()));
    (cert, key)
}

fn tls_config(fault: Fault) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let names = if fault == Fault::CertificateForOtherName {
        "www.example.org"
    } else {
        "www.foobar.com,foobar.com"
    };
    let (cert, key) = certificate(names);
    let certs = CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    Arc::new(config)
}

/// A site shaped like the image's (nginx in front of the agent) in a few hundred lines, with one fault.
struct FakeSite {
    fault: Fault,
    posts: Mutex<Vec<(u64, String, String)>>,
    writes: Mutex<u32>,
}

fn form_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap_or(b'?'));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FakeSite {
    fn respond(&self, req: &Request, https: bool) -> Option<Answer> {
        let f = self.fault;
        let scheme = if https { "https" } else { "http" };
        let host = req.host.split(':').next().unwrap_or("");
        if host == BARE {
            let target = if f == Fault::WrongRedirect {
                "elsewhere.example"
            } else {
                SITE
            };
            let mut a = answer(301, "text/html", "moved")?;
            a.headers.push(("Location", format!("{scheme}://{target}{}", req.path)));
            return Some(a);
        }
        if host != SITE && f != Fault::UnknownHostServed {
            return None; // closed without an answer, like nginx's 444
        }
        let json_type = "application/json";
        let mut a = match (req.method.as_str(), req.path.as_str()) {
            (_, "/api/posts") if req.body.len() > 64 * 1024 && f != Fault::NoBodyLimit => {
                answer(413, "text/html", "<html>413 Request Entity Too Large</html>")?
            }
            (_, p) if f == Fault::OwnApp && (p.starts_with("/api/") || p.starts_with("/posts")) => {
                answer(404, json_type, r#"{"error":"not found"}"#)?
            }
            ("GET", "/") => answer(
                200,
                "text/html",
                "<!doctype html><html><head><link rel=\"stylesheet\" href=\"/static/site.css\"></head><body>hi</body></html>",
            )?,
            ("GET", "/static/site.css") => {
                let mut a = answer(200, "text/css", "body{}")?;
                if f != Fault::NoCacheHeaders {
                    a.headers.push(("Cache-Control", "max-age=604800".into()));
                    a.headers.push(("Expires", "Thu, 31 Dec 2099 23:59:59 GMT".into()));
                }
                a
            }
            ("GET", "/livez") => answer(200, json_type, r#"{"status":"pass"}"#)?,
            ("GET", "/readyz") if f == Fault::NotReady => answer(503, json_type, r#"{"status":"not ready"}"#)?,
            ("GET", "/readyz") => answer(200, json_type, r#"{"status":"ready"}"#)?,
            ("GET", "/healthz") => {
                let mut doc = json!({
                    "status": "pass",
                    "version": "0.1.0",
                    "checks": {
                        "database:connection": [{"status": "pass"}],
                        "migrations:version": [{"status": if f == Fault::HealthCheckFailing { "warn" } else { "pass" }}],
                    },
                });
                if f == Fault::HealthWithoutVersion {
                    doc.as_object_mut().unwrap().remove("version");
                }
                if f == Fault::OwnApp {
                    doc["checks"]["app:process"] =
                        json!([{"status": "pass", "componentType": "app", "componentId": "notes", "restarts": 0}]);
                }
                answer(200, "application/health+json", doc.to_string())?
            }
            ("POST", "/api/posts") if f == Fault::ApiWriteError => {
                answer(500, json_type, r#"{"error":"internal error"}"#)?
            }
            ("POST", "/api/posts") => {
                let Ok(v) = serde_json::from_slice::<Value>(&req.body) else {
                    return answer(400, json_type, r#"{"error":"body is not JSON"}"#);
                };
                let post = self.store(v["author"].as_str()?, v["body"].as_str()?);
                answer(201, json_type, post.to_string())?
            }
            ("GET", p) if p.starts_with("/api/posts?") => {
                if f == Fault::ApiListError {
                    answer(500, json_type, r#"{"error":"internal error"}"#)?
                } else {
                    let posts = self.posts.lock().unwrap();
                    let list: Vec<Value> = posts
                        .iter()
                        .rev()
                        .map(|(id, a, b)| json!({"id": id, "author": a, "body": b}))
                        .collect();
                    answer(200, json_type, Value::from(list).to_string())?
                }
            }
            ("GET", p) if p.starts_with("/api/posts/") => {
                let id: u64 = p["/api/posts/".len()..].parse().ok()?;
                let posts = self.posts.lock().unwrap();
                match posts.iter().find(|(i, _, _)| *i == id) {
                    Some((id, a, b)) => answer(200, json_type, json!({"id": id, "author": a, "body": b}).to_string())?,
                    None => answer(404, json_type, r#"{"error":"no such post"}"#)?,
                }
            }
            ("POST", "/posts") => {
                let text = String::from_utf8_lossy(&req.body).into_owned();
                let field = |name: &str| {
                    text.split('&')
                        .find_map(|kv| kv.strip_prefix(&format!("{name}=")[..]).map(form_decode))
                };
                if f != Fault::PageDropsPosts {
                    self.store(&field("author")?, &field("body")?);
                }
                let mut a = answer(303, "text/plain", "")?;
                a.headers.push(("Location", "/posts".into()));
                a
            }
            ("GET", "/posts") => {
                let posts = self.posts.lock().unwrap();
                let items: String = posts.iter().map(|(_, a, b)| format!("<li>{a}: {b}</li>")).collect();
                answer(
                    200,
                    "text/html",
                    format!("<html><form method=\"post\" action=\"/posts\"></form><ul>{items}</ul></html>"),
                )?
            }
            _ => answer(404, json_type, r#"{"error":"not found"}"#)?,
        };
        let server = if f == Fault::ServerVersion {
            "nginx/1.22.1"
        } else {
            "nginx"
        };
        a.headers.push(("Server", server.into()));
        if f != Fault::MissingNosniff {
            a.headers.push(("X-Content-Type-Options", "nosniff".into()));
        }
        a.headers.push(("X-Frame-Options", "DENY".into()));
        a.headers
            .push(("Referrer-Policy", "strict-origin-when-cross-origin".into()));
        Some(a)
    }

    fn store(&self, author: &str, body: &str) -> Value {
        let mut posts = self.posts.lock().unwrap();
        let id = posts.len() as u64 + 1;
        posts.push((id, author.to_string(), body.to_string()));
        *self.writes.lock().unwrap() += 1;
        json!({"id": id, "author": author, "body": body})
    }

    fn serve(&self, stream: &mut (impl Read + Write), https: bool) {
        let mut reader = BufReader::new(&mut *stream);
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let (mut host, mut length) = (String::new(), 0usize);
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "host" => host = value.trim().to_string(),
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        drop(reader);
        let request = Request {
            method,
            path,
            host,
            body,
        };
        let Some(a) = self.respond(&request, https) else {
            return;
        };
        let mut head = format!(
            "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
            a.status,
            a.body.len()
        );
        for (name, value) in &a.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(a.body.as_bytes());
        let _ = stream.flush();
    }
}

/// A running fake site: plain HTTP on `port`, HTTPS on `https_port`.
struct Running {
    port: u16,
    https_port: u16,
    site: Arc<FakeSite>,
}

fn start(fault: Fault) -> Running {
    let site = Arc::new(FakeSite {
        fault,
        posts: Mutex::new(Vec::new()),
        writes: Mutex::new(0),
    });
    let plain = TcpListener::bind("127.0.0.1:0").unwrap();
    let tls = TcpListener::bind("127.0.0.1:0").unwrap();
    let (port, https_port) = (plain.local_addr().unwrap().port(), tls.local_addr().unwrap().port());
    let config = tls_config(fault);
    let s = Arc::clone(&site);
    std::thread::spawn(move || {
        for mut stream in plain.incoming().flatten() {
            let s = Arc::clone(&s);
            std::thread::spawn(move || s.serve(&mut stream, false));
        }
    });
    let s = Arc::clone(&site);
    std::thread::spawn(move || {
        for stream in tls.incoming().flatten() {
            let (s, config) = (Arc::clone(&s), Arc::clone(&config));
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut stream = rustls::StreamOwned::new(conn, stream);
                s.serve(&mut stream, true);
                stream.conn.send_close_notify();
                let _ = stream.flush();
            });
        }
    });
    Running { port, https_port, site }
}

impl Running {
    fn options(&self) -> Options {
        let mut options = Options::new(&format!("http://127.0.0.1:{}", self.port));
        options.https_port = Some(self.https_port);
        options.insecure = true;
        options.timeout = Duration::from_secs(5);
        options
    }
}

fn failed_checks(options: &Options) -> (BTreeSet<&'static str>, String) {
    let report = smoke::run(options, |_| {}).expect("the options are valid");
    let failed = report
        .results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Fail(_)))
        .map(|r| r.name)
        .collect();
    let lines = report
        .results
        .iter()
        .map(smoke::report::line)
        .collect::<Vec<_>>()
        .join("\n");
    (failed, lines)
}

#[test]
fn each_fault_of_a_site_is_caught_by_exactly_the_check_meant_for_it() {
    let cases = [
        (Fault::None, None),
        (Fault::WrongRedirect, Some("redirect-to-canonical")),
        (Fault::MissingNosniff, Some("security-headers")),
        (Fault::ServerVersion, Some("security-headers")),
        (Fault::NoCacheHeaders, Some("static-asset")),
        (Fault::UnknownHostServed, Some("unknown-host")),
        (Fault::NotReady, Some("readyz")),
        (Fault::HealthWithoutVersion, Some("healthz")),
        (Fault::HealthCheckFailing, Some("healthz")),
        (Fault::ApiListError, Some("api-read")),
        (Fault::ApiWriteError, Some("api-write")),
        (Fault::PageDropsPosts, Some("page-read")),
        (Fault::NoBodyLimit, Some("body-limit")),
        (Fault::CertificateForOtherName, Some("https")),
    ];
    let mut wrong = Vec::new();
    for (fault, expected) in cases {
        let site = start(fault);
        let (failed, lines) = failed_checks(&site.options());
        let expected: BTreeSet<&str> = expected.into_iter().collect();
        if failed != expected {
            wrong.push(format!(
                "{fault:?}: expected {expected:?} to fail, got {failed:?}\n{lines}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

#[test]
fn failures_say_what_was_expected_and_what_came_back() {
    let site = start(Fault::ApiListError);
    let report = smoke::run(&site.options(), |_| {}).unwrap();
    let api = report.results.iter().find(|r| r.name == "api-read").unwrap();
    let Outcome::Fail(message) = &api.outcome else {
        panic!("api-read passed against a 500: {api:?}");
    };
    assert!(
        message.contains("expected 200") && message.contains("500") && message.contains("internal error"),
        "{message}"
    );
    assert!(message.contains("/api/posts"), "the message names the URL: {message}");
}

#[test]
fn read_only_runs_write_nothing_and_skip_the_write_checks() {
    let site = start(Fault::None);
    let mut options = site.options();
    options.read_only = true;
    let report = smoke::run(&options, |_| {}).unwrap();
    assert!(report.ok(), "{report:?}");
    let skipped: Vec<_> = report
        .results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Skip(_)))
        .map(|r| r.name)
        .collect();
    assert_eq!(
        skipped,
        ["dns", "api-write", "page-write"],
        "dns: the URL is an address"
    );
    assert_eq!(*site.site.writes.lock().unwrap(), 0, "a read-only run stored something");
}

#[test]
fn a_site_that_runs_its_own_app_skips_the_posts_checks_and_passes() {
    let site = start(Fault::OwnApp);
    let report = smoke::run(&site.options(), |_| {}).unwrap();
    assert!(report.ok(), "{report:?}");
    let skipped: Vec<_> = report
        .results
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Skip(why) => Some((r.name, why.clone())),
            _ => None,
        })
        .collect();
    let names: Vec<_> = skipped.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["dns", "api-write", "api-read", "page-write", "page-read"]);
    assert!(skipped[1].1.contains("its own app `notes`"), "{skipped:?}");
    // The same site without the app component fails those checks: the skip comes from /healthz, nothing else.
    let (failed, _) = failed_checks(&start(Fault::None).options());
    assert!(failed.is_empty());
}

#[test]
fn repeated_runs_against_one_site_do_not_collide() {
    let site = start(Fault::None);
    for _ in 0..2 {
        let (failed, lines) = failed_checks(&site.options());
        assert!(failed.is_empty(), "{lines}");
    }
    assert_eq!(*site.site.writes.lock().unwrap(), 4, "two runs, two writes each");
}

fn smoke_command(args: &[&str]) -> (i32, String, String, Duration) {
    let started = Instant::now();
    let out = Command::new(binary("imagebuild"))
        .arg("smoke")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn the_command_prints_a_line_per_check_and_exits_by_the_result_in_each_format() {
    let good = start(Fault::None);
    let url = format!("http://127.0.0.1:{}", good.port);
    let https = good.https_port.to_string();
    let common = ["--https-port", &https, "--insecure", "--wait", "5"];

    let (code, out, err, _) = smoke_command(&[&[url.as_str()][..], &common].concat());
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("pass  wait-ready") && l.contains("ready after")),
        "{out}"
    );
    assert!(out.lines().any(|l| l.starts_with("pass  https")), "{out}");
    assert!(
        out.trim_end()
            .lines()
            .last()
            .unwrap()
            .starts_with("16 passed, 0 failed"),
        "{out}"
    );

    let (code, out, err, _) = smoke_command(&[&[url.as_str(), "--format", "json"][..], &common].concat());
    assert_eq!(code, 0, "{out}{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (doc["passed"].as_u64(), doc["failed"].as_u64()),
        (Some(16), Some(0)),
        "{doc}"
    );
    assert_eq!(doc["host"], SITE);

    let bad = start(Fault::NotReady);
    let url = format!("http://127.0.0.1:{}", bad.port);
    let https = bad.https_port.to_string();
    let (code, out, _, _) = smoke_command(&[url.as_str(), "--https-port", &https, "--insecure", "--format", "junit"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("<?xml"), "{out}");
    assert!(
        out.contains("tests=\"16\" failures=\"1\" skipped=\"1\""),
        "the DNS check skips an address: {out}"
    );
    assert!(
        out.contains("name=\"readyz\"") && out.contains("<failure message=\"http://www.foobar.com:"),
        "{out}"
    );

    let (code, out, _, _) = smoke_command(&[url.as_str(), "--https-port", &https, "--insecure"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("14 passed, 1 failed, 1 skipped"), "{out}");
}

#[test]
fn a_closed_port_fails_at_once_with_a_connection_error_naming_the_url() {
    let port = crate::support::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let (code, out, err, took) = smoke_command(&[&url]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("FAIL  connect") && out.contains(&format!("cannot connect to {url}")),
        "{out}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn the_certificate_must_be_trusted_unless_insecure() {
    let site = start(Fault::None);
    let mut options = site.options();
    options.insecure = false;
    let (failed, lines) = failed_checks(&options);
    assert_eq!(failed, BTreeSet::from(["https"]), "{lines}");
    assert!(
        lines.contains("invalid peer certificate") && lines.contains("--insecure"),
        "the message says why and what to do: {lines}"
    );
}

/// Smoke against `http://NAME:PORT` for the site's canonical name, resolved by `dns`.
fn dns_outcome(site: &Running, dns: &Dns, url_name: &str) -> (Outcome, smoke::Report) {
    let mut options = site.options();
    options.url = format!("http://{url_name}:{}", site.port);
    options.host = Some(SITE.to_string());
    options.dns_server = Some(dns.server().parse().unwrap());
    let report = smoke::run(&options, |_| {}).unwrap();
    let outcome = report.results.iter().find(|r| r.name == "dns").unwrap().outcome.clone();
    (outcome, report)
}

#[test]
fn the_dns_check_passes_when_both_names_reach_the_site_and_says_what_it_found() {
    let site = start(Fault::None);
    let dns = Dns::start(Some("cname"));
    let (outcome, report) = dns_outcome(&site, &dns, SITE);
    assert_eq!(
        outcome,
        Outcome::Pass(format!("{SITE} → CNAME {BARE} → 127.0.0.1; {BARE} → 127.0.0.1")),
        "{report:?}"
    );
    // Every other check reached the site through the same server's answers.
    assert!(report.ok() && report.skipped() == 0, "{report:?}");

    // The command line, with the flag.
    let url = format!("http://{SITE}:{}", site.port);
    let https = site.https_port.to_string();
    let (code, out, err, _) = smoke_command(&[
        url.as_str(),
        "--dns-server",
        &dns.server(),
        "--https-port",
        &https,
        "--insecure",
        "--read-only",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("pass  dns") && l.contains("CNAME foobar.com")),
        "{out}"
    );
    let (code, _, err, _) = smoke_command(&[url.as_str(), "--dns-server", "not-an-address"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("expected IP or IP:PORT"), "{err}");
}

#[test]
fn the_dns_check_fails_when_www_points_elsewhere_or_nowhere() {
    let site = start(Fault::None);
    // `www` on another address (the IPv6 loopback: nothing leaves the machine).
    let dns = Dns::start(Some("::1"));
    let (outcome, _) = dns_outcome(&site, &dns, BARE);
    let Outcome::Fail(message) = outcome else {
        panic!("passed with www elsewhere: {outcome:?}");
    };
    assert!(
        message.contains("the names resolve to different addresses: www.foobar.com → ::1; foobar.com → 127.0.0.1"),
        "{message}"
    );
    assert!(message.contains("`www` a CNAME to it"), "the fix: {message}");
    drop(dns);

    // No `www` record at all (the URL names the apex, which resolves).
    let dns = Dns::start(None);
    let (outcome, _) = dns_outcome(&site, &dns, BARE);
    let Outcome::Fail(message) = outcome else {
        panic!("passed without a www record: {outcome:?}");
    };
    assert!(
        message.contains("www.foobar.com does not exist (NXDOMAIN from 127.0.0.1:"),
        "{message}"
    );
}
