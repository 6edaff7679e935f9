//! Helpers shared by the test modules: the real binaries, agent processes and a small HTTP client.

pub mod fake_http;
pub mod mariadb;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A release binary of this workspace (`just test` builds them): what goes into images.
pub fn release_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("release")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release --workspace` first (`just test` does)",
        path.display()
    );
    path
}

/// A binary of this workspace, built by `cargo build` before the tests run (`just test` does that).
pub fn binary(name: &str) -> PathBuf {
    // The test binary lives in target/<profile>/deps/; the workspace binaries one level up.
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first (`just test` does)",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1 (bound and released; the race with other processes is accepted in tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The first of `n` consecutive free ports on 127.0.0.1, never handed out twice in this process (guests need N,
/// N+1 and N+2; the port-surface test forwards a hundred more).
pub fn free_port_block(n: u16) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 200) * 100,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let base = NEXT.fetch_add(n as u32, Ordering::SeqCst);
        assert!(base + (n as u32) < 60_000, "no free block of {n} ports");
        let held: Vec<_> = (0..n)
            .map_while(|i| std::net::TcpListener::bind(("127.0.0.1", base as u16 + i)).ok())
            .collect();
        if held.len() == n as usize {
            return base as u16;
        }
    }
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("foobar-{tag}-{}-{}", std::process::id(), free_port()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A response as a user sees it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .redirects(0)
        .build()
}

fn reply(result: Result<ureq::Response, ureq::Error>) -> Result<Reply, String> {
    let response = match result {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.to_string()),
    };
    Ok(Reply {
        status: response.status(),
        body: response.into_string().unwrap_or_default(),
    })
}

pub fn get(url: &str) -> Result<Reply, String> {
    reply(agent().get(url).call())
}

pub fn post_json(url: &str, body: &serde_json::Value) -> Result<Reply, String> {
    reply(agent().post(url).send_json(body.clone()))
}

/// A GET with the `Host` header a browser would send for `host`; also returns the response headers.
pub fn get_host(url: &str, host: &str) -> Result<(Reply, Vec<(String, String)>), String> {
    get_host_with(url, host, &[])
}

/// `get_host` with more request headers (`Accept-Encoding`, `If-None-Match`).
pub fn get_host_with(
    url: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> Result<(Reply, Vec<(String, String)>), String> {
    let mut request = agent().get(url).set("Host", host);
    for (name, value) in headers {
        request = request.set(name, value);
    }
    let response = match request.call() {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.to_string()),
    };
    let headers = response
        .headers_names()
        .into_iter()
        .flat_map(|name| {
            response
                .all(&name)
                .into_iter()
                .map(move |v| (name.clone(), v.to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    Ok((
        Reply {
            status: response.status(),
            body: response.into_string().unwrap_or_default(),
        },
        headers,
    ))
}

/// A form POST (`application/x-www-form-urlencoded`) with `Host: host`; also returns the `Location` header.
pub fn post_form_host(url: &str, host: &str, fields: &[(&str, &str)]) -> Result<(Reply, Option<String>), String> {
    let response = match agent().post(url).set("Host", host).send_form(fields) {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.to_string()),
    };
    let location = response.header("location").map(String::from);
    Ok((
        Reply {
            status: response.status(),
            body: response.into_string().unwrap_or_default(),
        },
        location,
    ))
}

pub fn post_json_host(url: &str, host: &str, body: &serde_json::Value) -> Result<Reply, String> {
    reply(agent().post(url).set("Host", host).send_json(body.clone()))
}

/// Polls `url` until it answers `status`, or panics after `limit`.
pub fn wait_for_status(url: &str, status: u16, limit: Duration) -> Duration {
    wait_until_status(url, status, limit, get)
}

/// Like `wait_for_status`, with `Host: host` (through nginx).
pub fn wait_for_status_host(url: &str, host: &str, status: u16, limit: Duration) -> Duration {
    wait_until_status(url, status, limit, |u| get_host(u, host).map(|(r, _)| r))
}

fn wait_until_status(
    url: &str,
    status: u16,
    limit: Duration,
    fetch: impl Fn(&str) -> Result<Reply, String>,
) -> Duration {
    let start = Instant::now();
    loop {
        let last = fetch(url);
        if matches!(&last, Ok(r) if r.status == status) {
            return start.elapsed();
        }
        if start.elapsed() > limit {
            let seen = match last {
                Ok(r) => format!("{} {}", r.status, r.body),
                Err(e) => e,
            };
            panic!("{url} did not answer {status} within {limit:?}; last: {seen}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A `foobar-agent` process listening on a TCP port of its own; killed when dropped.
pub struct AgentProcess {
    pub child: Child,
    pub base: String,
    log: PathBuf,
}

impl AgentProcess {
    pub fn serve(database_url: &str, extra: &[&str]) -> AgentProcess {
        Self::serve_with(database_url, extra, |_| {})
    }

    pub fn serve_with(database_url: &str, extra: &[&str], customize: impl FnOnce(&mut Command)) -> AgentProcess {
        let port = free_port();
        let log = temp_dir("agent-log").join("stderr.log");
        let mut cmd = Command::new(binary("foobar-agent"));
        cmd.args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--database-url",
            database_url,
        ])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
        customize(&mut cmd);
        let child = cmd.spawn().expect("start foobar-agent");
        let base = format!("http://127.0.0.1:{port}");
        let agent = AgentProcess { child, base, log };
        agent.wait_listening();
        agent
    }

    /// `foobar-agent app`, the supervisor of the `[app]` in `config`, with its own database URL; it listens on
    /// nothing (`base` is empty).
    pub fn supervise_app(config: &std::path::Path, database_url: &str) -> AgentProcess {
        let log = temp_dir("supervisor-log").join("stderr.log");
        let child = Command::new(binary("foobar-agent"))
            .args([
                "app",
                "--config",
                config.to_str().unwrap(),
                "--database-url",
                database_url,
            ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start foobar-agent app");
        AgentProcess {
            child,
            base: String::new(),
            log,
        }
    }

    fn wait_listening(&self) {
        let addr = self.base.trim_start_matches("http://").to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "agent never listened on {addr}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "foobar-agent did not exit within {limit:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AgentProcess {
    /// SIGTERM first, so that a supervisor stops its app (which leads a process group of its own and would outlive a
    /// SIGKILL of the agent); SIGKILL when the agent has not exited within `STOP_LIMIT`.
    fn drop(&mut self) {
        const STOP_LIMIT: Duration = Duration::from_secs(5);
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // SAFETY: kill(2) with the pid of our own child, which has not been waited for, so is not reused.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_LIMIT;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `foobar-agent` with `args` to completion: (exit code, stdout, stderr).
pub fn agent_command(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary("foobar-agent"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `PATH.suffix`: the manifest and checksum files imagebuild writes beside an image.
pub fn sidecar(path: &std::path::Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{suffix}"));
    PathBuf::from(name)
}

/// A self-signed EC certificate and key in `dir` (`cert.pem`, `key.pem`) naming `names`, made by openssl as first boot
/// makes the image's.
pub fn self_signed_certificate(dir: &std::path::Path, names: &[&str]) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    // An address is an IP entry (a server reached by address, like the ACME test server from a guest).
    let san: Vec<String> = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(_) => format!("IP:{n}"),
            Err(_) => format!("DNS:{n}"),
        })
        .collect();
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
        ])
        .args(["-subj", &format!("/CN={}", names[0]), "-addext"])
        .arg(format!("subjectAltName={}", san.join(",")))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs (scripts/deps.sh installs it)");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// The sha256 of a file by coreutils' `sha256sum`: a reader independent of imagebuild's own hashing.
pub fn sha256sum(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `imagebuild verify PATH`: its exit code and everything it printed.
pub fn imagebuild_verify(path: &std::path::Path) -> (Option<i32>, String) {
    let out = Command::new(binary("imagebuild"))
        .arg("verify")
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// dnsmasq on 127.0.0.1 serving `foobar.com` and whatever `www` is given, authoritative for the zone (unknown names
/// are NXDOMAIN). Stopped when dropped.
pub struct Dns {
    child: std::process::Child,
    pub port: u16,
}

impl Dns {
    /// Started on a free port: a port free for UDP may be taken for TCP (dnsmasq binds both), and then dnsmasq exits at
    /// once; it is started again on another port, at most three times.
    pub fn start(www: Option<&str>) -> Dns {
        let mut last_error = String::new();
        for _ in 0..3 {
            match Self::try_start(www) {
                Ok(dns) => return dns,
                Err(e) => last_error = e,
            }
        }
        panic!("dnsmasq did not start answering: {last_error}");
    }

    fn try_start(www: Option<&str>) -> Result<Dns, String> {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = Command::new("dnsmasq");
        command.args([
            "--keep-in-foreground",
            "--log-facility=-",
            &format!("--port={port}"),
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--pid-file",
            "--local=/foobar.com/",
            "--host-record=foobar.com,127.0.0.1",
        ]);
        match www {
            Some("cname") => command.arg("--cname=www.foobar.com,foobar.com"),
            Some(address) => command.arg(format!("--host-record=www.foobar.com,{address}")),
            None => &mut command,
        };
        let child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("dnsmasq (apt-get install dnsmasq-base; `just deps` does)");
        let mut dns = Dns { child, port };
        // Ready once it answers.
        let resolver = foobar_builder::smoke::dns::Resolver::Server(format!("127.0.0.1:{port}").parse().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        while resolver.lookup("foobar.com").is_err() {
            if let Ok(Some(status)) = dns.child.try_wait() {
                let mut err = String::new();
                if let Some(mut pipe) = dns.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut err);
                }
                return Err(format!("dnsmasq on port {port} exited ({status}): {err}"));
            }
            if Instant::now() >= deadline {
                return Err(format!("no answer on port {port} within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(dns)
    }

    pub fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A program's path on PATH, if it is there.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// Runs a command that must succeed: its stdout.
pub fn run_ok(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// This checkout again at `dest`, another path: a clone of its commit with the working tree's uncommitted changes to
/// tracked files applied (none on CI), so it holds the same source.
pub fn clone_checkout(dest: &std::path::Path) {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    run_ok(Command::new("git").args(["clone", "-q"]).arg(&repo).arg(dest));
    let diff = Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["diff", "HEAD", "--binary"])
        .output()
        .unwrap()
        .stdout;
    if !diff.is_empty() {
        let patch = dest.join("..").join("uncommitted.patch");
        std::fs::write(&patch, diff).unwrap();
        run_ok(Command::new("git").arg("-C").arg(dest).arg("apply").arg(&patch));
    }
}

/// `target/PROFILE` of this checkout copied to `target/PROFILE` (`debug` or `release`), so that a build there compiles
/// the workspace's crates again but not the registry's (their paths are under CARGO_HOME, the same from any
/// checkout). Incremental caches stay behind: they belong to this checkout's path.
pub fn seed_target(target: &std::path::Path, profile: &str) {
    let ours = match profile {
        "release" => release_binary("foobar-agent"),
        _ => binary("imagebuild"),
    };
    std::fs::create_dir_all(target).unwrap();
    run_ok(
        Command::new("sh")
            .args([
                "-c",
                "tar -C \"$1\" -cf - --exclude=incremental \"$2\" | tar -C \"$3\" -xf -",
                "sh",
            ])
            .arg(ours.parent().unwrap().parent().unwrap())
            .arg(profile)
            .arg(target),
    );
}

/// `cargo ARGS` in `dir`, which must succeed.
pub fn cargo_in(dir: &std::path::Path, args: &[&str]) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run_ok(Command::new(cargo).current_dir(dir).args(args));
}
