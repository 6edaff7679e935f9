//! The cluster tier (QEMU, CI; ignored otherwise): the example topology of `examples/cluster/` (2 lb, 2 app, 3 db,
//! and a spare app node held back) from one image, brought up with `imagebuild cluster up` in a network namespace of
//! its own; then, under load from inside that namespace, a rollout to build B through the spare app slot, one to a
//! build C that never becomes ready, and one failure after another: an app node, the active load balancer, the
//! Galera node that takes the writes, each cut off like a power failure (QEMU killed); then a full restart of the
//! database tier. `imagebuild cluster down` stops everything, also when the test fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{self, binary, release_binary};

const SITE: &str = "www.foobar.com";
const FLOATING: &str = "10.88.0.10";

/// The cluster tier needs root (it makes a network namespace); the QEMU lock is the caller's.
fn assert_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the cluster tier makes a network namespace: run it as root"
    );
}

/// A cluster brought up by `imagebuild cluster up`, and what it took.
struct Up {
    cluster: Cluster,
    /// The site on the host: HTTP here, HTTPS at the next port.
    port: u16,
    build_secs: f64,
    /// When `cluster up` began.
    started: Instant,
    /// What `cluster up` printed.
    text: String,
}

/// An example's working directory: a new admin key there, and the example's own files.
struct Example {
    name: String,
    files: PathBuf,
    dir: PathBuf,
    key: PathBuf,
}

fn example(name: &str) -> Example {
    let files = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name);
    let dir = support::temp_dir(name);
    let key = dir.join("id_ed25519");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status();
    assert!(keygen.unwrap().success(), "ssh-keygen runs");
    Example {
        name: name.into(),
        files,
        dir,
        key,
    }
}

/// `imagebuild --config CONFIG --out IMAGE` with the example's key and AGENT: the seconds it took.
fn build_image(example: &Example, config: &Path, image: &Path, agent: &Path) -> f64 {
    let start = Instant::now();
    let out = Command::new(binary("imagebuild"))
        .arg("--out")
        .arg(image)
        .arg("--agent-bin")
        .arg(agent)
        .arg("--config")
        .arg(config)
        .arg("--ssh-key")
        .arg(example.key.with_extension("pub"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "imagebuild {}: {}",
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    start.elapsed().as_secs_f64()
}

/// Builds the example's image (`foobar.toml`) and brings up its `cluster.toml` in the namespace `foobar-NAME`,
/// holding the nodes `hold`.
fn bring_up(example: &Example, namespace: &str, hold: &[&str]) -> Up {
    let image = example.dir.join(format!("{}.qcow2", example.name));
    let build_secs = build_image(
        example,
        &example.files.join("foobar.toml"),
        &image,
        &release_binary("foobar-agent"),
    );
    let state = example.dir.join("state");
    let port = support::free_port_block(2);
    let started = Instant::now();
    let mut up = Command::new(binary("imagebuild"));
    up.args(["cluster", "up"])
        .arg(example.files.join("cluster.toml"))
        .arg("--image")
        .arg(&image)
        .args(["--port", &port.to_string()]);
    for node in hold {
        up.args(["--hold", node]);
    }
    let out = up.arg("--state").arg(&state).output().unwrap();
    let cluster = Cluster {
        state,
        namespace: namespace.into(),
        key: example.key.clone(),
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "cluster up: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Up {
        cluster,
        port,
        build_secs,
        started,
        text,
    }
}

/// Another build of the agent: this checkout's commit plus one more, which adds the migration `file` (so its version
/// names another commit), built in a target directory seeded from this one's release build (so only the agent
/// compiles again). The binary and its version.
fn agent_with_migration(dir: &Path, file: &str, sql: &str) -> (PathBuf, String) {
    let source = dir.join("source-b");
    support::clone_checkout(&source);
    std::fs::write(source.join("sql").join(file), sql).unwrap();
    support::run_ok(Command::new("git").arg("-C").arg(&source).args(["add", "sql"]));
    support::run_ok(Command::new("git").arg("-C").arg(&source).args([
        "-c",
        "user.name=foobar tests",
        "-c",
        "user.email=tests@foobar.invalid",
        "commit",
        "-q",
        "-m",
        "build B: one more migration",
    ]));
    let target = dir.join("target-b");
    support::seed_target(&target, "release");
    support::cargo_in(
        &source,
        &[
            "build",
            "--release",
            "-q",
            "-p",
            "foobar-agent",
            "--target-dir",
            target.to_str().unwrap(),
        ],
    );
    let agent = target.join("release/foobar-agent");
    let version = support::run_ok(Command::new(&agent).arg("--version"));
    let version = version.trim().rsplit(' ').next().unwrap().to_string();
    (agent, version)
}

/// `imagebuild smoke` through the site's address on the host (the floating address behind it), HTTP and HTTPS,
/// and `/readyz` over HTTPS with the site's name as TLS's server name (nginx refuses a handshake for any other).
fn smoke_through_floating_address(port: u16) {
    let smoke = Command::new(binary("imagebuild"))
        .args([
            "smoke",
            &format!("http://127.0.0.1:{port}"),
            "--host",
            SITE,
            "--insecure",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        smoke.status.success(),
        "smoke through the floating address: {}",
        String::from_utf8_lossy(&smoke.stdout)
    );
    let https = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "--resolve"])
        .arg(format!("{SITE}:{}:127.0.0.1", port + 1))
        .arg(format!("https://{SITE}:{}/readyz", port + 1))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&https.stdout),
        "200",
        "HTTPS through the floating address"
    );
}

/// A command on the node at ADDR over SSH, as admin with KEY, from the namespace: (exit code, stdout). SSH's own
/// failure (255: no connection within its limit, as under load on emulated guests) is tried twice more, and its
/// error is what stdout then holds.
fn ssh_in(namespace: &str, key: &Path, addr: &str, command: &str) -> (i32, String) {
    let mut tries = 0;
    loop {
        tries += 1;
        let (code, out, err) = ssh_once(namespace, key, addr, command);
        if code != 255 || tries == 3 {
            return (code, if code == 255 { err } else { out });
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn ssh_once(namespace: &str, key: &Path, addr: &str, command: &str) -> (i32, String, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", namespace, "ssh", "-i"])
        .arg(key)
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            &format!("admin@{addr}"),
            command,
        ])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The cluster; `imagebuild cluster down` when dropped.
struct Cluster {
    state: PathBuf,
    namespace: String,
    /// The admin's SSH key the image was built with.
    key: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let out = Command::new(binary("imagebuild"))
            .args(["cluster", "down", "--state"])
            .arg(&self.state)
            .output()
            .unwrap();
        eprintln!("cluster down: {}", String::from_utf8_lossy(&out.stdout).trim());
    }
}

impl Cluster {
    fn status(&self) -> Value {
        serde_json::from_slice(&self.imagebuild(&["cluster", "status", "--json"])).unwrap()
    }

    fn node(&self, name: &str) -> Value {
        self.status()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// `imagebuild ARGS --state STATE`, which must succeed: its stdout.
    fn imagebuild(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new(binary("imagebuild"))
            .args(args)
            .arg("--state")
            .arg(&self.state)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "imagebuild {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Asserts that none of `outcomes` failed; otherwise the message adds what each app node's agent logged about its
    /// database since `since` (the answers it gave 503 and why), from its journal.
    fn assert_none_failed(&self, outcomes: &[Outcome], since: Instant, what: &str) {
        let failures = outcomes.iter().filter(|o| failed(o)).count();
        if failures == 0 {
            return;
        }
        let mut logs = String::new();
        for node in self.status()["nodes"].as_array().unwrap() {
            let is_app = node["roles"].as_array().unwrap().iter().any(|r| r == "app");
            let Some(addr) = node["address"].as_str().filter(|_| is_app) else {
                continue;
            };
            let (_, log) = self.ssh(
                addr,
                &format!(
                    "sudo journalctl -u foobar-agent -o short-monotonic -q --no-pager --since=-{}s | \
                     grep -Ei 'database|commit|connection|write|read' | tail -20",
                    since.elapsed().as_secs() + 10
                ),
            );
            logs.push_str(&format!("{}:\n{log}", node["name"].as_str().unwrap_or("?")));
        }
        panic!(
            "{failures} request(s) failed {what}: {}\nthe app nodes' agents said:\n{logs}",
            summary(outcomes)
        );
    }

    /// A command on a node over SSH (as admin, from the namespace): (exit code, stdout).
    fn ssh(&self, addr: &str, command: &str) -> (i32, String) {
        ssh_in(&self.namespace, &self.key, addr, command)
    }

    /// A power cut: the node's QEMU is killed. The moment of the kill (its pid is read from the state file first,
    /// not asked of `status`, which takes seconds).
    fn kill(&self, name: &str) -> Instant {
        let state = foobar_builder::cluster::load_state(&self.state).unwrap();
        let pid = state
            .nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
            .pid;
        let cut = Instant::now();
        // SAFETY: kill of a QEMU this test's cluster started.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0, "kill {name}");
        while foobar_builder::cluster::alive(pid) {
            assert!(cut.elapsed() < Duration::from_secs(10), "{name} still runs");
            std::thread::sleep(Duration::from_millis(100));
        }
        cut
    }

    /// `exec` with arguments made at run time.
    fn exec_owned(&self, program: &str, args: &[String]) -> (i32, String) {
        self.exec(program, &args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `ip netns exec NS PROGRAM ARGS`: (exit code, stdout).
    fn exec(&self, program: &str, args: &[&str]) -> (i32, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.namespace, program])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// Of PORTS on ADDR, those that accept a TCP connection from the node at FROM (checked there, over SSH).
    fn answering_from<'a>(&self, from: &str, addr: &str, ports: impl Iterator<Item = &'a u16>) -> Vec<u16> {
        let ports: Vec<String> = ports.map(|p| p.to_string()).collect();
        // A closed port drops the connection attempt (the firewall's policy): 2 s without an answer is closed (an
        // open one on this network answers in milliseconds).
        let script = format!(
            "for p in {}; do timeout 2 bash -c \"exec 3<>/dev/tcp/{addr}/$p\" 2>/dev/null && echo $p; done; true",
            ports.join(" ")
        );
        let (code, out) = self.ssh(from, &script);
        assert_eq!(code, 0, "ssh to {from}");
        out.lines().map(|l| l.trim().parse().unwrap()).collect()
    }

    /// Whether a TCP connection to ADDR:PORT is accepted from the namespace's end of the private network.
    fn answers(&self, addr: &str, port: u16) -> bool {
        let (code, _) = self.exec(
            "timeout",
            &["3", "bash", "-c", &format!("exec 3<>/dev/tcp/{addr}/{port}")],
        );
        code == 0
    }

    /// The MAC the floating address answers from, as the namespace last saw it.
    fn floating_mac(&self) -> String {
        let _ = self.answers(FLOATING, 80);
        let (_, out) = self.exec("ip", &["neigh", "show", FLOATING]);
        out.split_whitespace()
            .skip_while(|w| *w != "lladdr")
            .nth(1)
            .unwrap_or("")
            .to_string()
    }
}

/// Enters the namespace on this thread (only this thread: its sockets are then on the cluster's network).
fn enter(namespace: &str) {
    let path = std::ffi::CString::new(format!("/var/run/netns/{namespace}")).unwrap();
    // SAFETY: opens the namespace file and joins it for the calling thread; the descriptor is closed after.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        assert!(fd >= 0, "open {namespace}");
        assert_eq!(libc::setns(fd, libc::CLONE_NEWNET), 0, "setns {namespace}");
        libc::close(fd);
    }
}

/// One request's outcome.
#[derive(Debug, Clone)]
struct Outcome {
    /// When it was sent, and when its answer (or failure) came.
    sent: Instant,
    at: Instant,
    post: bool,
    /// The status, or None when no answer came (connection refused or reset, timeout).
    status: Option<u16>,
    /// A created post's id.
    id: Option<i64>,
}

/// Each load worker's pause after a request: with three workers about 6 requests a second, GET and POST. More
/// starves the guests (every request crosses an lb, an app and three Galera nodes, all emulated on two cores), which
/// then measures the host's CPU, not the failover.
const LOAD_PAUSE: Duration = Duration::from_millis(400);

/// Load against the floating address from inside the namespace: each worker a keep-alive client, GET and POST mixed
/// (one POST every third request).
struct Load {
    stop: Arc<AtomicBool>,
    /// Each worker's pause after a request, in milliseconds (`pace`).
    pause: Arc<AtomicU64>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(namespace: &str, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicU64::new(LOAD_PAUSE.as_millis() as u64));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..workers)
            .map(|w| {
                let (stop, pause, outcomes, ns) =
                    (stop.clone(), pause.clone(), outcomes.clone(), namespace.to_string());
                std::thread::spawn(move || {
                    enter(&ns);
                    let agent = ureq::AgentBuilder::new()
                        .timeout(Duration::from_secs(10))
                        .max_idle_connections_per_host(1)
                        .build();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let sent = Instant::now();
                        let post = n % 3 == (w as u64 % 3);
                        let result = if post {
                            agent
                                .post(&format!("http://{FLOATING}/api/posts"))
                                .set("Host", SITE)
                                .send_json(json!({"author": format!("load{w}"), "body": format!("w{w} n{n}")}))
                        } else {
                            agent
                                .get(&format!("http://{FLOATING}/api/posts?limit=5"))
                                .set("Host", SITE)
                                .call()
                        };
                        let (status, id) = match result {
                            Ok(r) => {
                                let status = r.status();
                                let id = if post {
                                    r.into_json::<Value>().ok().and_then(|v| v["id"].as_i64())
                                } else {
                                    None
                                };
                                (Some(status), id)
                            }
                            Err(ureq::Error::Status(code, _)) => (Some(code), None),
                            Err(_) => (None, None),
                        };
                        outcomes.lock().unwrap().push(Outcome {
                            sent,
                            at: Instant::now(),
                            post,
                            status,
                            id,
                        });
                        // At most 4 requests a second per worker: POSTs stay under nginx's write rate per client.
                        std::thread::sleep(Duration::from_millis(pause.load(Ordering::Relaxed)));
                    }
                })
            })
            .collect();
        Load {
            stop,
            pause,
            outcomes,
            workers,
        }
    }

    /// Each worker pauses `pause` after each request (`LOAD_PAUSE` at the start).
    fn pace(&self, pause: Duration) {
        self.pause.store(pause.as_millis() as u64, Ordering::Relaxed);
    }

    fn since(&self, from: Instant) -> Vec<Outcome> {
        self.outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.at >= from)
            .cloned()
            .collect()
    }

    fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.join().unwrap();
        }
        Arc::try_unwrap(self.outcomes).unwrap().into_inner().unwrap()
    }
}

fn failed(o: &Outcome) -> bool {
    !matches!(o.status, Some(200) | Some(201))
}

fn summary(outcomes: &[Outcome]) -> String {
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for o in outcomes {
        let key = format!(
            "{} {}",
            if o.post { "POST" } else { "GET" },
            o.status.map_or("no answer".to_string(), |s| s.to_string())
        );
        *by.entry(key).or_default() += 1;
    }
    format!("{by:?}")
}

/// Each failed request: its method, when it was sent and when it failed (seconds after `from`), and its status.
fn timeline(outcomes: &[Outcome], from: Instant) -> Vec<String> {
    outcomes
        .iter()
        .filter(|o| failed(o))
        .map(|o| {
            format!(
                "{} {:.1}-{:.1} {}",
                if o.post { "POST" } else { "GET" },
                o.sent.saturating_duration_since(from).as_secs_f64(),
                o.at.duration_since(from).as_secs_f64(),
                o.status.map_or("-".to_string(), |s| s.to_string())
            )
        })
        .collect()
}

/// Waits until `f` holds, polling every 500 ms; the seconds it took.
fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> f64 {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    start.elapsed().as_secs_f64()
}

/// The text without terminal colour sequences (the agent's log lines carry them).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters final-letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A figure for the log, stamped with the time since the tier's first report (where a run spends its time).
fn report(line: String) {
    use std::io::Write as _;
    static FIRST: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let since = FIRST.get_or_init(Instant::now).elapsed().as_secs_f64();
    let _ = writeln!(std::io::stderr(), "[{since:6.1} s] {line}");
}

#[test]
#[ignore = "cluster tier, as root: eight guests; run with FOOBAR_CLUSTER=1 just test, or just cluster-test"]
fn a_cluster_of_lb_app_and_galera_nodes_serves_through_the_loss_of_any_one_node() {
    let _one = crate::e2e::QEMU.lock().unwrap_or_else(|e| e.into_inner());
    assert_root();
    // Up: the lb and db nodes one after another; then both app nodes at the same moment, against an empty
    // database (each would apply the migrations); then the site ready through the floating address.
    // Builds B and C first (before any node boots: builds and guests would share the host's two cores).
    // B: another commit of the agent, which adds a migration (expand only: a column the old build does not know).
    let ex = example("cluster");
    let (agent_b, version_b) = agent_with_migration(
        &ex.dir,
        "0002_posts_edited_at.sql",
        "ALTER TABLE posts ADD COLUMN edited_at DATETIME(6) NULL DEFAULT NULL;\n",
    );
    let image_b = ex.dir.join("b.raw");
    let build_b = build_image(&ex, &ex.files.join("foobar.toml"), &image_b, &agent_b);
    // C: a build that never becomes ready: the site's own application exits as soon as it starts.
    let broken = ex.dir.join("broken");
    std::fs::create_dir_all(broken.join("app")).unwrap();
    std::fs::write(broken.join("app/README"), "an app that cannot start\n").unwrap();
    std::fs::copy(ex.files.join("cluster.toml"), broken.join("cluster.toml")).unwrap();
    std::fs::write(
        broken.join("foobar.toml"),
        std::fs::read_to_string(ex.files.join("foobar.toml")).unwrap()
            + "\n[app]\nname = \"broken\"\nfiles = \"app\"\n\
               command = [\"sh\", \"-c\", \"echo 'broken: a setting is missing' >&2; exit 3\", \"sh\", \"{port}\"]\n",
    )
    .unwrap();
    let image_c = ex.dir.join("c.raw");
    let build_c = build_image(&ex, &broken.join("foobar.toml"), &image_c, &agent_b);
    let version_a = {
        let out = Command::new(release_binary("foobar-agent"))
            .arg("--version")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .rsplit(' ')
            .next()
            .unwrap()
            .to_string()
    };
    report(format!(
        "cluster: build B ({version_b}, after A's {version_a}) in {build_b:.0} s, build C (its app exits) in \
         {build_c:.0} s"
    ));
    assert_ne!(version_a, version_b, "B's agent names another build");

    let Up {
        cluster,
        port,
        build_secs,
        started,
        text: up_text,
    } = bring_up(&ex, "foobar-foobar", &["app1", "app2", "app3"]);
    cluster.imagebuild(&["cluster", "start", "app1"]);
    cluster.imagebuild(&["cluster", "start", "app2"]);
    let ready = |c: &Cluster| {
        let s = c.status();
        s["site_readyz"] == 200
            && s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["name"] != "app3")
                .all(|n| {
                    n["running"] == true
                        && (n["readyz"].is_null() || n["readyz"] == 200)
                        && (n["galera"].is_null() || n["galera"] == "synced")
                })
    };
    wait_until("every node ready", Duration::from_secs(400), || ready(&cluster));
    let up_secs = started.elapsed().as_secs_f64();
    report(format!(
        "cluster: image built in {build_secs:.0} s; 7 nodes up and ready in {up_secs:.1} s (lb and db nodes one after \
         another, then both app nodes together)\n{up_text}"
    ));

    smoke_through_floating_address(port);
    // TLS ends on the lb nodes: the floating address shows an lb node's certificate, not an app node's.
    let fingerprint = |command: &str, on: Option<&str>| -> String {
        let (code, out) = match on {
            Some(addr) => cluster.ssh(addr, command),
            None => cluster.exec("sh", &["-c", command]),
        };
        assert_eq!(code, 0, "{command}");
        out.trim().to_string()
    };
    let served = fingerprint(
        &format!(
            "openssl s_client -connect {FLOATING}:443 -servername {SITE} </dev/null 2>/dev/null \
             | openssl x509 -noout -fingerprint -sha256"
        ),
        None,
    );
    let of = |addr: &str| {
        fingerprint(
            "sudo openssl x509 -in /etc/foobar/tls/cert.pem -noout -fingerprint -sha256",
            Some(addr),
        )
    };
    let (lb_certs, app_certs) = (
        [of("10.88.0.11"), of("10.88.0.12")],
        [of("10.88.0.21"), of("10.88.0.22")],
    );
    report(format!(
        "cluster: HTTPS at the floating address: {served}; lb nodes {lb_certs:?}, app nodes {app_certs:?}"
    ));
    assert!(
        served.contains("Fingerprint=") && lb_certs.contains(&served) && !app_certs.contains(&served),
        "the floating address's certificate is not an lb node's"
    );

    // Each role's ports only, checked from another node on the private network.
    for (from, node, addr, open, closed) in [
        (
            "10.88.0.22",
            "lb1",
            "10.88.0.11",
            &[80u16, 443][..],
            &[3306u16, 4567, 9200][..],
        ),
        ("10.88.0.12", "app1", "10.88.0.21", &[80, 443], &[3306, 4567, 9200]),
        ("10.88.0.22", "db1", "10.88.0.31", &[3306, 4567, 9200], &[80, 443]),
    ] {
        let answering = cluster.answering_from(from, addr, open.iter().chain(closed));
        assert_eq!(
            answering,
            open.to_vec(),
            "{node}: the ports that answer from {from} (expected exactly its roles' ports)"
        );
    }
    // What a role does not run is not there at all.
    let (code, _) = cluster.ssh("10.88.0.21", "pgrep -x mariadbd");
    assert_ne!(code, 0, "app1 runs a MariaDB server");
    let (code, _) = cluster.ssh("10.88.0.31", "pgrep -x nginx");
    assert_ne!(code, 0, "db1 runs nginx");
    // The migrations ran once for the cluster: both app nodes are ready and the record holds each migration once.
    let user_data = std::fs::read_to_string(cluster.state.join("app1.seed/user-data")).unwrap();
    let password = user_data
        .lines()
        .find_map(|l| l.strip_prefix("database-password = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let mariadb_args = |query: &str| -> Vec<String> {
        [
            "-h",
            "10.88.0.31",
            "-u",
            "foobar",
            &format!("-p{password}"),
            "-N",
            "-B",
            "foobar",
            "-e",
            query,
        ]
        .map(str::to_string)
        .to_vec()
    };
    let (code, rows) = cluster.exec_owned(
        "mariadb",
        &mariadb_args("SELECT version, COUNT(*) FROM _sqlx_migrations GROUP BY version ORDER BY version"),
    );
    let migrations = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "sql"))
        .count();
    assert_eq!(
        code, 0,
        "the database answers the app nodes' user from the private network"
    );
    let rows: Vec<&str> = rows.lines().collect();
    assert_eq!(rows.len(), migrations, "every migration recorded: {rows:?}");
    assert!(rows.iter().all(|r| r.ends_with("\t1")), "each migration once: {rows:?}");
    // Both agents ran the migrations against the same empty database: one applied them all, the other none.
    let applied: Vec<usize> = ["10.88.0.21", "10.88.0.22"]
        .iter()
        .map(|addr| {
            let (_, log) = cluster.ssh(addr, "sudo journalctl -u foobar-agent -o cat --no-pager");
            let log = strip_ansi(&log);
            let line = log
                .lines()
                .find(|l| l.contains("schema is current"))
                .unwrap_or_else(|| panic!("{addr}: its agent logged no migration outcome:\n{log}"));
            line.split_whitespace()
                .find_map(|w| w.strip_prefix("newly_applied="))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{addr}: no count in {line:?}"))
        })
        .collect();
    report(format!(
        "cluster: app1 and app2 started together on an empty database: they applied {applied:?} migration(s); \
         the record holds each of the {migrations} once"
    ));
    assert_eq!(
        applied.iter().sum::<usize>(),
        migrations,
        "the app nodes applied {applied:?} migrations between them"
    );

    let load = Load::start(&cluster.namespace, 3);
    std::thread::sleep(Duration::from_secs(5));

    // A rollout to build B under load: app3 (the free slot) boots B; once it is ready and smoke-checked, app1 drains
    // and stops, and its slot boots B; then app2 drains and stops and keeps B unbooted. Nothing fails. The load is
    // lighter meanwhile (about 4 requests a second in all): a boot under emulation competes with every request for
    // the host's two cores.
    load.pace(Duration::from_millis(600));
    let rolling = Instant::now();
    let rollout = Command::new(binary("imagebuild"))
        .args(["cluster", "rollout", "--image"])
        .arg(&image_b)
        .arg("--state")
        .arg(&cluster.state)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let booted = wait_until("app3 ready", Duration::from_secs(300), || {
        cluster.node("app3")["readyz"] == 200
    });
    let ready_at = Instant::now();
    // When app3's nginx logged its first request from a load balancer: its age by app3's own clock, asked over SSH
    // (so neither the clocks' offset nor the time SSH takes under load counts).
    let mut first_request = None;
    wait_until(
        "app3 gets requests from the load balancers",
        Duration::from_secs(90),
        || {
            let (code, age) = cluster.ssh(
                "10.88.0.23",
                "line=$(sudo grep -m1 'GET /api/posts' /var/log/nginx/access.log) || exit 1; \
                 t=$(echo \"$line\" | sed -E 's/.*\\[([^]]+)\\].*/\\1/; s/:/ /; s#/# #g'); \
                 echo $(( $(date +%s) - $(date -d \"$t\" +%s) ))",
            );
            let answered = Instant::now();
            match (code, age.trim().parse::<u64>()) {
                (0, Ok(age)) => {
                    first_request = answered.checked_sub(Duration::from_secs(age));
                    true
                }
                _ => false,
            }
        },
    );
    let first_request = first_request.expect("app3's first request has a time");
    // Negative when it came before the test saw it ready (the check polls): reported as 0.
    let served = first_request.saturating_duration_since(ready_at).as_secs_f64();
    let out = rollout.wait_with_output().unwrap();
    let rollout_text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "cluster rollout to B: {rollout_text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rolled = rolling.elapsed().as_secs_f64();
    load.pace(LOAD_PAUSE);
    let during = load.since(rolling);
    report(format!(
        "cluster: rollout to B in {rolled:.1} s: app3 ready {booted:.1} s after the rollout began, its first request \
         {served:.1} s after that; {}\n{rollout_text}",
        summary(&during)
    ));
    assert!(
        served <= 30.0,
        "app3 got its first request {served:.1} s after it was ready"
    );
    cluster.assert_none_failed(&during, rolling, "during the rollout");
    let versions = |c: &Cluster| -> Vec<(String, bool, String)> {
        c.status()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["roles"][0] == "app")
            .map(|n| {
                (
                    n["name"].as_str().unwrap().to_string(),
                    n["running"] == true,
                    n["version"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    // app1 and app3 run B; app2 is the free slot.
    let b_serving = [
        ("app1".to_string(), true, version_b.clone()),
        ("app2".to_string(), false, String::new()),
        ("app3".to_string(), true, version_b.clone()),
    ];
    assert_eq!(
        versions(&cluster),
        b_serving,
        "after the rollout every running app node answers with B's version; app2 is the free slot"
    );
    // B's migration: recorded once, applied by one node of B (the first: app3), found applied by the other.
    let (code, rows) = cluster.exec_owned(
        "mariadb",
        &mariadb_args("SELECT version, COUNT(*) FROM _sqlx_migrations GROUP BY version ORDER BY version"),
    );
    assert_eq!(code, 0);
    assert!(
        rows.lines().any(|r| r == "2\t1") && rows.lines().all(|r| r.ends_with("\t1")),
        "B's migration (version 2) recorded once: {rows:?}"
    );
    let applied_by = |addr: &str| -> usize {
        let (_, log) = cluster.ssh(addr, "sudo journalctl -u foobar-agent -o cat --no-pager");
        let log = strip_ansi(&log);
        log.lines()
            .filter(|l| l.contains("schema is current"))
            .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("newly_applied=")))
            .filter_map(|n| n.parse::<usize>().ok())
            .sum()
    };
    assert_eq!(
        (applied_by("10.88.0.23"), applied_by("10.88.0.21")),
        (1, 0),
        "app3 (B's first node) applied B's migration, app1 found it applied"
    );

    // A rollout to C, whose nodes never become ready: it stops after the first one, which is removed, and the nodes
    // of B serve on without a failed request. Its limit is well above what B's nodes took (so C's is not merely
    // slow).
    const C_LIMIT: f64 = 120.0;
    let b_ready: Vec<f64> = rollout_text
        .lines()
        .filter_map(|l| l.split_once(": ready and smoke-checked "))
        .filter_map(|(_, rest)| rest.split(' ').next()?.parse().ok())
        .collect();
    assert!(
        b_ready.len() == 2 && b_ready.iter().all(|s| *s < C_LIMIT * 0.8),
        "B's nodes were ready after {b_ready:?} s: too close to C's limit of {C_LIMIT} s to tell slow from never"
    );
    load.pace(Duration::from_millis(600));
    let trying = Instant::now();
    let out = Command::new(binary("imagebuild"))
        .args(["cluster", "rollout", "--timeout", &C_LIMIT.to_string(), "--image"])
        .arg(&image_c)
        .arg("--state")
        .arg(&cluster.state)
        .output()
        .unwrap();
    let refused = trying.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let during = load.since(trying);
    report(format!(
        "cluster: rollout to C (never ready) stopped after {refused:.1} s: {}; {}",
        stderr.trim(),
        summary(&during)
    ));
    assert!(!out.status.success(), "the rollout to C succeeded");
    assert!(
        stderr.contains("rollout stopped: app2") && stderr.contains("not ready within the limit"),
        "{stderr}"
    );
    cluster.assert_none_failed(&during, trying, "during the rollout to C");
    assert_eq!(
        versions(&cluster),
        b_serving,
        "after the failed rollout B's nodes serve and C's node is gone"
    );

    // The free slot joins again, from B's disk: the failures below meet the app nodes a cluster of this size runs
    // (two, and one after the next cut). It gets requests once ready, and nothing fails meanwhile.
    let joined = Instant::now();
    cluster.imagebuild(&["cluster", "start", "app2"]);
    let app2_ready = wait_until("app2 ready", Duration::from_secs(300), || {
        cluster.node("app2")["readyz"] == 200
    });
    // The load balancers' checks: `rise` answers of 200, `inter` apart.
    std::thread::sleep(Duration::from_secs(6));
    load.pace(LOAD_PAUSE);
    let during = load.since(joined);
    report(format!(
        "cluster: app2 started again (B's disk): ready after {app2_ready:.1} s; {}",
        summary(&during)
    ));
    cluster.assert_none_failed(&during, joined, "while app2 joined");
    assert_eq!(cluster.node("app2")["version"], version_b.as_str(), "app2 runs B");

    // The db nodes to build B, in place, one at a time under load: each drains (its Galera check answers 503 and the
    // app nodes' proxies move on), powers off, boots B on its own data disk and catches up with what it missed before
    // the next one goes. Nothing fails; every post stays (read back at the end).
    load.pace(Duration::from_millis(600));
    let rolling = Instant::now();
    let db_text = String::from_utf8(cluster.imagebuild(&[
        "cluster",
        "rollout",
        "--role",
        "db",
        "--image",
        image_b.to_str().unwrap(),
    ]))
    .unwrap();
    let db_rolled = rolling.elapsed().as_secs_f64();
    load.pace(LOAD_PAUSE);
    let during = load.since(rolling);
    let db1 = cluster.node("db1")["address"].as_str().unwrap().to_string();
    let (_, transfer) = cluster.ssh(
        &db1,
        "sudo journalctl -b -u mariadb -q --no-pager | grep -Eo 'IST received: [^ ]+|SST [a-z]+ [a-z]+' | head -3",
    );
    report(format!(
        "cluster: db nodes rolled to B in {db_rolled:.1} s; {}; failed (sent-answered, s): {:?}; db1's transfer: {}\n\
         {db_text}",
        summary(&during),
        timeline(&during, rolling),
        transfer.trim().replace('\n', ", ")
    ));
    cluster.assert_none_failed(&during, rolling, "while the db nodes were replaced");
    let image_b_path = std::fs::canonicalize(&image_b).unwrap();
    for db in ["db1", "db2", "db3"] {
        assert_eq!(cluster.node(db)["galera"], "synced", "{db} after the rollout");
        // Its root disk is an overlay of B now (what QEMU boots), and its data disk is the one it had.
        let info = Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(cluster.state.join(format!("{db}.qcow2")))
            .output()
            .unwrap();
        let info: Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(
            info["backing-filename"].as_str().map(PathBuf::from),
            Some(image_b_path.clone()),
            "{db}'s root disk"
        );
        assert!(db_text.contains(&format!("{db}: Synced")), "{db_text}");
    }

    // Memory under load, every running node: what each uses of its 768 MiB (MemTotal - MemAvailable), and no
    // process the kernel killed for want of memory.
    // Asked of every node at once (SSH under load takes seconds each).
    let checks: Vec<_> = cluster.status()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|node| node["running"] == true)
        .map(|node| {
            let (name, addr) = (node["name"].as_str().unwrap().to_string(), node["address"].as_str().unwrap().to_string());
            let (namespace, key) = (cluster.namespace.clone(), cluster.key.clone());
            std::thread::spawn(move || {
                let (code, out) = ssh_in(
                    &namespace,
                    &key,
                    &addr,
                    "awk '/MemTotal|MemAvailable/ {print $2}' /proc/meminfo; sudo journalctl -k -q --no-pager | grep -c 'Out of memory' || true",
                );
                (name, addr, code, out)
            })
        })
        .collect();
    let mut memory = Vec::new();
    for check in checks {
        let (name, addr, code, out) = check.join().unwrap();
        assert_eq!(code, 0, "{addr}: meminfo: {out}");
        let numbers: Vec<u64> = out.lines().map(|l| l.trim().parse().unwrap()).collect();
        let (total, available, ooms) = (numbers[0] / 1024, numbers[1] / 1024, numbers[2]);
        assert_eq!(ooms, 0, "{addr}: the kernel killed a process for memory");
        assert!(available >= 64, "{addr}: only {available} MiB left of {total}");
        memory.push(format!("{name} {} MiB", total - available));
    }
    report(format!(
        "cluster: memory used under load (of 768 MiB each): {}",
        memory.join(", ")
    ));

    // An app node: a power cut under load.
    let cut = cluster.kill("app1");
    std::thread::sleep(Duration::from_secs(10));
    let during = load.since(cut);
    let gets_failed = during.iter().filter(|o| !o.post && failed(o)).count();
    let posts_failed = during.iter().filter(|o| o.post && failed(o)).count();
    report(format!(
        "cluster: app1 killed: {} ({} requests)",
        summary(&during),
        during.len()
    ));
    assert_eq!(
        gets_failed,
        0,
        "GETs failed when an app node died: {}",
        summary(&during)
    );
    assert!(
        posts_failed <= 3,
        "more POSTs failed than were in flight: {}",
        summary(&during)
    );

    // The active load balancer.
    let lbs: BTreeMap<String, String> = cluster.status()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["roles"][0] == "lb")
        .map(|n| {
            (
                n["mac"].as_str().unwrap().to_string(),
                n["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let active = lbs
        .get(&cluster.floating_mac())
        .cloned()
        .expect("the floating address answers from an lb node");
    let cut = cluster.kill(&active);
    std::thread::sleep(Duration::from_secs(15));
    let during = load.since(cut);
    let failures: Vec<&Outcome> = during.iter().filter(|o| failed(o)).collect();
    // How long requests failed: from the cut to the last failed request's sending (a request sent while the
    // address moved may learn so only at its next retransmission, later).
    let window = failures
        .iter()
        .map(|o| o.sent.saturating_duration_since(cut).as_secs_f64())
        .fold(0.0, f64::max);
    let last_answer = failures
        .iter()
        .map(|o| o.at.duration_since(cut).as_secs_f64())
        .fold(0.0, f64::max);
    // When the other lb took the address, by its own journal and clock (the age of keepalived's line, over SSH).
    let other_addr = cluster.node(lbs.values().find(|n| **n != active).unwrap())["address"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, age) = cluster.ssh(
        &other_addr,
        "t=$(sudo journalctl -u keepalived -o short-unix --no-pager | grep 'Entering MASTER STATE' | tail -1 | \
         cut -d' ' -f1); awk -v now=\"$(date +%s.%N)\" -v t=\"$t\" 'BEGIN { print now - t }'",
    );
    let took = age
        .trim()
        .parse::<f64>()
        .map(|age| format!("{:.1} s", (Instant::now() - cut).as_secs_f64() - age))
        .unwrap_or_else(|_| format!("unknown ({})", age.trim()));
    report(format!(
        "cluster: active lb {active} killed: requests sent up to {window:.1} s after the cut failed (the last failure \
         came {last_answer:.1} s after it); the other lb took the address {took} after the cut; failed (sent-answered, \
         s after the cut): {:?}; {}",
        timeline(&during, cut),
        summary(&during)
    ));
    assert!(
        window <= 5.0,
        "requests failed for {window:.1} s after the active lb died"
    );
    let other = lbs.values().find(|n| **n != active).unwrap();
    assert_eq!(
        lbs.get(&cluster.floating_mac()),
        Some(other),
        "the other lb holds the floating address"
    );

    // The Galera node that takes the writes (every app node's HAProxy sends them to the first db node).
    let cut = cluster.kill("db1");
    std::thread::sleep(Duration::from_secs(20));
    let during = load.since(cut);
    let posts: Vec<&Outcome> = during.iter().filter(|o| o.post).collect();
    let resumed = posts
        .iter()
        .find(|o| o.status == Some(201) && posts.iter().any(|f| failed(f) && f.at < o.at))
        .map(|o| o.at.duration_since(cut).as_secs_f64());
    let last_failure = posts
        .iter()
        .filter(|o| failed(o))
        .map(|o| o.at.duration_since(cut).as_secs_f64())
        .fold(0.0, f64::max);
    report(format!(
        "cluster: db1 killed: failed requests (sent-answered, s after the cut): {:?}",
        timeline(&during, cut)
    ));
    // The write outage: the longest time after the cut with no POST answered 201 (blocked writes answered late count
    // as out until their answer).
    let mut answered: Vec<f64> = posts
        .iter()
        .filter(|o| o.status == Some(201))
        .map(|o| o.at.duration_since(cut).as_secs_f64())
        .collect();
    answered.sort_by(f64::total_cmp);
    let outage = answered
        .iter()
        .scan(0.0, |prev, at| {
            let gap = at - *prev;
            *prev = *at;
            Some(gap)
        })
        .fold(0.0, f64::max);
    report(format!(
        "cluster: db1 killed: no write answered for {outage:.1} s at most; last failed write {last_failure:.1} s after \
         the cut, writes resumed {}; {}",
        resumed.map_or("without a failure".to_string(), |s| format!("after {s:.1} s")),
        summary(&during)
    ));
    assert!(
        last_failure <= 10.0,
        "writes failed {last_failure:.1} s after the db node died"
    );
    assert!(
        outage <= 10.0,
        "no write was answered for {outage:.1} s after the db node died"
    );
    for db in ["db2", "db3"] {
        assert_eq!(cluster.node(db)["galera"], "synced", "{db} after db1 died");
    }

    let outcomes = load.finish();

    // A full restart of the database tier: db1 is off already (cut), db2 and then db3 are powered off by their
    // buttons (db3 stops last), then all three boot again, db1 first. Galera's own files decide who starts it.
    for db in ["db2", "db3"] {
        cluster.imagebuild(&["cluster", "stop", db]);
    }
    let restart = Instant::now();
    for db in ["db1", "db2", "db3"] {
        cluster.imagebuild(&["cluster", "start", db]);
    }
    let formed = wait_until("the database tier formed again", Duration::from_secs(400), || {
        let s = cluster.status();
        s["site_readyz"] == 200
            && s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| !n["galera"].is_null())
                .all(|n| n["galera"] == "synced")
    });
    report(format!(
        "cluster: every db node off (db1 cut, db2 then db3 by the power button), booted again: all Synced and the \
         site ready {:.1} s after the first start ({formed:.1} s of waiting)",
        restart.elapsed().as_secs_f64()
    ));

    // Every POST answered 201 is there, read through the floating address.
    let created: Vec<i64> = outcomes.iter().filter_map(|o| o.id).collect();
    assert!(created.len() > 20, "too few writes to judge: {}", summary(&outcomes));
    // Four readers, each a quarter of the ids.
    let readers: Vec<_> = created
        .chunks(created.len().div_ceil(4))
        .map(|ids| {
            let (ns, ids) = (cluster.namespace.clone(), ids.to_vec());
            std::thread::spawn(move || {
                enter(&ns);
                let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
                ids.into_iter()
                    .filter(|id| {
                        agent
                            .get(&format!("http://{FLOATING}/api/posts/{id}"))
                            .set("Host", SITE)
                            .call()
                            .map(|r| r.status())
                            .ok()
                            != Some(200)
                    })
                    .collect::<Vec<i64>>()
            })
        })
        .collect();
    let missing: Vec<i64> = readers.into_iter().flat_map(|r| r.join().unwrap()).collect();
    report(format!(
        "cluster: {} requests in all ({}), {} posts acknowledged, {} missing",
        outcomes.len(),
        summary(&outcomes),
        outcomes.iter().filter(|o| o.id.is_some()).count(),
        missing.len()
    ));
    assert!(missing.is_empty(), "posts answered 201 but gone: {missing:?}");
}

#[test]
#[ignore = "cluster tier, as root: three guests; run with FOOBAR_CLUSTER=1 just test, or just cluster-test"]
fn the_combined_layout_of_three_machines_each_lb_app_and_db_serves_the_site() {
    let _one = crate::e2e::QEMU.lock().unwrap_or_else(|e| e.into_inner());
    assert_root();
    let Up {
        cluster,
        port,
        started,
        text: up_text,
        ..
    } = bring_up(&example("cluster-combined"), "foobar-combined", &[]);
    wait_until("every node ready", Duration::from_secs(300), || {
        let s = cluster.status();
        s["site_readyz"] == 200
            && s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["running"] == true && n["readyz"] == 200 && n["galera"] == "synced")
    });
    report(format!(
        "cluster (combined): 3 nodes, each lb, app and db, up and ready in {:.1} s\n{up_text}",
        started.elapsed().as_secs_f64()
    ));
    smoke_through_floating_address(port);
    // HAProxy's own ports answer only through the floating address's redirect, never directly.
    let direct = cluster.answering_from(
        "10.89.0.12",
        "10.89.0.11",
        [80u16, 443, 3306, SHARED_HTTP, SHARED_HTTPS].iter(),
    );
    assert_eq!(direct, vec![80, 443, 3306], "node1's ports, from node2");
}

const SHARED_HTTP: u16 = foobar_agent::cluster::SHARED_LB_PORTS.0;
const SHARED_HTTPS: u16 = foobar_agent::cluster::SHARED_LB_PORTS.1;
