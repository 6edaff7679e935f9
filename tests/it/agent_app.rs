//! A site's own app server (`[app]` in the agent's config), run by its supervisor (`foobar-agent app`, a process and
//! database user of its own) beside the agent (`foobar-agent serve`, which reads the supervisor's reports): the app
//! starts after its migrations with its own database in its environment, `/readyz` follows whether it answers and
//! whether the supervisor reports, a killed app comes back, an app that dies at start is retried with growing pauses
//! and `/healthz` says why, and stopping the supervisor stops the app gracefully.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::mariadb;
use crate::support::{self, get, wait_for_status, AgentProcess};

const TINY_APP: &str = include_str!("fixtures/tiny_app.py");

/// An agent config whose `[app]` runs `command` (TOML array text) listening on `listen`.
fn app_config(dir: &Path, listen: &str, command: &str, extra: &str) -> PathBuf {
    std::fs::write(dir.join("tiny_app.py"), TINY_APP).unwrap();
    let migrations = dir.join("migrations");
    std::fs::create_dir_all(&migrations).unwrap();
    std::fs::write(
        migrations.join("0001_tiny.sql"),
        "CREATE TABLE tiny_notes (id BIGINT PRIMARY KEY AUTO_INCREMENT, body TEXT NOT NULL);\n",
    )
    .unwrap();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "migrations = \"{}\"\n\n[app]\nname = \"tiny\"\ncommand = {command}\nlisten = \"{listen}\"\ndirectory = \"{}\"\nstatus-file = \"{}\"\n{extra}\n",
            migrations.display(),
            dir.display(),
            dir.join("status.json").display()
        ),
    )
    .unwrap();
    config
}

/// The agent and the app's supervisor, on one config and database: what the image runs in two units.
fn start(config: &Path, database_url: &str) -> (AgentProcess, AgentProcess) {
    let supervisor = AgentProcess::supervise_app(config, database_url);
    let agent = AgentProcess::serve(database_url, &["--config", config.to_str().unwrap()]);
    (agent, supervisor)
}

/// The agent and the supervisor running the tiny app on a unix socket, with no health path.
fn serve_tiny_app_on_a_socket(tag: &str) -> (AgentProcess, AgentProcess) {
    let dir = support::temp_dir(tag);
    let socket = dir.join("app.sock");
    let config = app_config(
        &dir,
        &format!("unix:{}", socket.display()),
        r#"["python3", "tiny_app.py", "--socket", "{socket}"]"#,
        "",
    );
    start(&config, &mariadb::shared().fresh_database())
}

fn health(agent: &AgentProcess) -> Value {
    get(&agent.url("/healthz")).unwrap().json()
}

fn app_check(agent: &AgentProcess) -> Value {
    health(agent)["checks"]["app:process"][0].clone()
}

fn kill(pid: i64, signal: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{signal} {pid}");
}

fn process_exists(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn the_app_starts_after_its_migrations_with_its_own_database_user_in_its_environment() {
    let dir = support::temp_dir("app-env");
    let port = support::free_port();
    let config = app_config(
        &dir,
        &format!("127.0.0.1:{port}"),
        r#"["python3", "tiny_app.py", "--port", "{port}"]"#,
        "health = \"/health\"\nenv = { GREETING = \"hello\" }",
    );
    let db = mariadb::shared();
    let url = db.fresh_database();
    let database = url.split('?').next().unwrap().rsplit('/').next().unwrap().to_string();
    // The app's own user, with rights on its database only (the image's `foobar-app`).
    let user = format!("app_{database}");
    db.sql(&format!(
        "CREATE USER `{user}`@`localhost` IDENTIFIED BY 'app-secret'; GRANT ALL PRIVILEGES ON `{database}`.* TO `{user}`@`localhost`"
    ));
    let app_url = format!(
        "mysql://{user}:app-secret@localhost/{database}?socket={}",
        db.socket().display()
    );

    // The supervisor alone applies the migrations, as the app's user, then starts the app.
    let supervisor = AgentProcess::supervise_app(&config, &app_url);
    let deadline = Instant::now() + Duration::from_secs(30);
    let env = loop {
        if let Ok(reply) = get(&format!("http://127.0.0.1:{port}/env")) {
            break reply.json();
        }
        assert!(
            Instant::now() < deadline,
            "the app never answered: {}",
            supervisor.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let tables = db.sql(&format!("SHOW TABLES FROM `{database}`"));
    assert!(tables.contains("tiny_notes"), "{tables}");
    assert_eq!(env["DATABASE_URL"], app_url.as_str());
    assert_eq!(env["DATABASE_USER"], user.as_str());
    assert_eq!(env["DATABASE_NAME"], database.as_str());
    assert_eq!(env["DATABASE_SOCKET"], db.socket().display().to_string());
    assert_eq!(env["PORT"], port.to_string());
    assert_eq!(env["GREETING"], "hello");
    assert_eq!(env["cwd"], dir.display().to_string());
    // Its output reaches the supervisor's log under its name (the journal, in the image).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !supervisor.log().contains("tiny: tiny app listening on") {
        assert!(Instant::now() < deadline, "{}", supervisor.log());
        std::thread::sleep(Duration::from_millis(100));
    }

    // The agent, with its own user, finds the schema current and reads the supervisor's report.
    let agent = AgentProcess::serve(&url, &["--config", config.to_str().unwrap()]);
    wait_for_status(&agent.url("/readyz"), 200, Duration::from_secs(30));
    let check = app_check(&agent);
    assert_eq!(check["status"], "pass", "{check}");
    assert_eq!(check["componentId"], "tiny");
    assert_eq!(check["restarts"], 0);
    assert_eq!(check["pid"], env["pid"]);
    assert!(
        !agent.log().contains("tiny app listening"),
        "the app's output is the supervisor's, not the agent's"
    );
}

#[test]
fn the_agent_is_not_ready_while_the_apps_supervisor_is_missing_or_silent() {
    let dir = support::temp_dir("app-silent");
    let socket = dir.join("app.sock");
    let config = app_config(
        &dir,
        &format!("unix:{}", socket.display()),
        r#"["python3", "tiny_app.py", "--socket", "{socket}"]"#,
        "",
    );
    let url = mariadb::shared().fresh_database();
    let agent = AgentProcess::serve(&url, &["--config", config.to_str().unwrap()]);
    // No supervisor yet: the agent's own parts are ready, the site is not, and /readyz says where it looked.
    std::thread::sleep(Duration::from_secs(2));
    let ready = get(&agent.url("/readyz")).unwrap();
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(
        ready
            .body
            .contains("its supervisor (foobar-app.service, `foobar-agent app`) has not reported in"),
        "{}",
        ready.body
    );

    let mut supervisor = AgentProcess::supervise_app(&config, &url);
    wait_for_status(&agent.url("/readyz"), 200, Duration::from_secs(30));
    let app_pid = app_check(&agent)["pid"].as_i64().unwrap();
    // A supervisor killed outright leaves its last report behind, which goes stale.
    supervisor.signal("KILL");
    supervisor.wait_exit(Duration::from_secs(5));
    let silent = wait_for_status(&agent.url("/readyz"), 503, Duration::from_secs(10));
    let ready = get(&agent.url("/readyz")).unwrap();
    assert!(
        ready
            .body
            .contains("its supervisor (foobar-app.service) has not reported for"),
        "{}",
        ready.body
    );
    eprintln!("a silent supervisor noticed after {silent:?}");
    // (The app it left behind is what systemd's KillMode=mixed ends in the image; here the test does.)
    kill(app_pid, "KILL");
}

#[test]
fn the_supervisor_refuses_a_config_without_an_app() {
    let dir = support::temp_dir("app-none");
    let config = dir.join("agent.toml");
    std::fs::write(&config, "shutdown-timeout = 5\n").unwrap();
    let (code, _, stderr) = support::agent_command(&["app", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("the configuration has no [app] table"), "{stderr}");
}

#[test]
fn readiness_follows_the_apps_own_health_path() {
    let dir = support::temp_dir("app-health");
    let socket = dir.join("app.sock");
    let unhealthy = dir.join("unhealthy");
    let config = app_config(
        &dir,
        &format!("unix:{}", socket.display()),
        r#"["python3", "tiny_app.py", "--socket", "{socket}"]"#,
        &format!(
            "health = \"/health\"\nenv = {{ UNHEALTHY_FILE = \"{}\" }}",
            unhealthy.display()
        ),
    );
    let (agent, _supervisor) = start(&config, &mariadb::shared().fresh_database());
    wait_for_status(&agent.url("/readyz"), 200, Duration::from_secs(30));
    std::fs::write(&unhealthy, "").unwrap();
    // Seen within the probe interval of an app that answers (5 s) and the agent's health interval (1 s).
    let seen = wait_for_status(&agent.url("/readyz"), 503, Duration::from_secs(7));
    let r = get(&agent.url("/readyz")).unwrap();
    assert!(r.body.contains("GET /health answered 500"), "{}", r.body);
    // One that does not answer is asked at every report: seen again within a second or so.
    std::fs::remove_file(&unhealthy).unwrap();
    let back = wait_for_status(&agent.url("/readyz"), 200, Duration::from_secs(2));
    eprintln!("an unhealthy app seen after {seen:?}, its recovery after {back:?}");
}

#[test]
fn an_app_that_hangs_is_restarted_after_its_hang_timeout() {
    let dir = support::temp_dir("app-hang");
    let socket = dir.join("app.sock");
    let hang = dir.join("hang");
    let config = app_config(
        &dir,
        &format!("unix:{}", socket.display()),
        r#"["python3", "tiny_app.py", "--socket", "{socket}"]"#,
        &format!(
            "health = \"/health\"\nhang-timeout = 3\nenv = {{ HANG_FILE = \"{}\" }}",
            hang.display()
        ),
    );
    let (agent, _supervisor) = start(&config, &mariadb::shared().fresh_database());
    wait_for_status(&agent.url("/readyz"), 200, Duration::from_secs(30));
    let pid = app_check(&agent)["pid"].as_i64().unwrap();
    // Alive, not answering: no exit for the supervisor to see. The file goes once the restart has begun, so the
    // next run answers.
    std::fs::write(&hang, "").unwrap();
    let hung_at = Instant::now();
    let deadline = hung_at + Duration::from_secs(30);
    let check = loop {
        let check = app_check(&agent);
        if check["restarts"] == 1 {
            break check;
        }
        assert!(Instant::now() < deadline, "a hung app was not restarted: {check}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let took = hung_at.elapsed();
    std::fs::remove_file(&hang).unwrap();
    assert!(
        check["lastExit"]
            .as_str()
            .unwrap_or("")
            .starts_with("restarted: no answer to its health check for"),
        "{check}"
    );
    assert!(
        took >= Duration::from_secs(3),
        "restarted before its hang timeout: {took:?}"
    );
    assert!(!process_exists(pid), "the hung process is gone");
    wait_for_status(&agent.url("/readyz"), 200, Duration::from_secs(20));
    eprintln!("hung app restarted {took:?} after it stopped answering");
}

#[test]
fn a_killed_app_is_restarted_and_ready_again_within_seconds() {
    let (agent, _supervisor) = serve_tiny_app_on_a_socket("app-kill");
    wait_for_status(&agent.url("/readyz"), 200, Duration::from_secs(30));
    let pid = app_check(&agent)["pid"].as_i64().expect("the app's pid");

    kill(pid, "KILL");
    // The kernel tears the process down a moment after the signal; until the restart, nothing answers.
    wait_for_status(&agent.url("/readyz"), 503, Duration::from_secs(2));
    let back = wait_for_status(&agent.url("/readyz"), 200, Duration::from_secs(10));
    let check = app_check(&agent);
    assert_eq!(check["restarts"], 1, "{check}");
    assert_eq!(check["lastExit"], "killed by signal 9");
    assert_ne!(check["pid"].as_i64(), Some(pid));
    assert!(!process_exists(pid));
    eprintln!("app back {back:?} after SIGKILL");
}

#[test]
fn an_app_that_dies_at_start_is_retried_with_growing_pauses_and_health_says_why() {
    let dir = support::temp_dir("app-crash");
    let config = app_config(
        &dir,
        "127.0.0.1:9",
        r#"["sh", "-c", "echo starting on $0; echo 'fatal: settings.ini is missing' >&2; exit 3", "{port}"]"#,
        "",
    );
    let (agent, _supervisor) = start(&config, &mariadb::shared().fresh_database());
    let started = Instant::now();
    // Wait for the first death to be reported.
    let mut check = Value::Null;
    while started.elapsed() < Duration::from_secs(15) {
        check = app_check(&agent);
        if check["lastExit"].is_string() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(check["lastExit"], "exit status 3", "{check}");
    assert_eq!(check["status"], "fail");
    let output: Vec<String> = serde_json::from_value(check["lastOutput"].clone()).unwrap();
    assert!(
        output.iter().any(|l| l == "fatal: settings.ini is missing"),
        "{output:?}"
    );
    assert!(output.iter().any(|l| l == "starting on 9"), "{output:?}");

    std::thread::sleep(Duration::from_secs(6));
    let restarts = app_check(&agent)["restarts"].as_u64().unwrap();
    // 0.5 + 1 + 2 + 4 s of pauses fit in about 7 s: a tight loop would have restarted hundreds of times.
    assert!((2..=6).contains(&restarts), "{restarts} restarts in ~7 s");
    assert_eq!(get(&agent.url("/livez")).unwrap().status, 200);
    let ready = get(&agent.url("/readyz")).unwrap();
    assert_eq!(ready.status, 503);
    assert!(ready.body.contains("app `tiny` is not running"), "{}", ready.body);
    assert_eq!(health(&agent)["status"], "fail");
}

/// The agent's peak resident memory, from /proc.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn invalid_utf8_and_an_endless_line_neither_stop_the_output_nor_grow_the_agent() {
    let dir = support::temp_dir("app-noise");
    let socket = dir.join("app.sock");
    // 32 MiB without a newline, invalid UTF-8, a line, then the app itself (still writing to the pipe).
    std::fs::write(
        dir.join("noise.sh"),
        "head -c 33554432 /dev/zero | tr '\\000' x\nprintf '\\nbad \\377\\376 bytes\\n'\n\
         printf 'after the long line\\n'\nexec python3 tiny_app.py --socket \"$1\"\n",
    )
    .unwrap();
    let config = app_config(
        &dir,
        &format!("unix:{}", socket.display()),
        r#"["sh", "noise.sh", "{socket}"]"#,
        "",
    );
    let (agent, supervisor) = start(&config, &mariadb::shared().fresh_database());
    wait_for_status(&agent.url("/readyz"), 200, Duration::from_secs(60));
    // The app runs on, and its later output still arrives.
    let deadline = Instant::now() + Duration::from_secs(10);
    let output = loop {
        let output: Vec<String> = serde_json::from_value(app_check(&agent)["lastOutput"].clone()).unwrap();
        if output.iter().any(|l| l.starts_with("tiny app listening")) || Instant::now() > deadline {
            break output;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(output.iter().any(|l| l == "bad \u{fffd}\u{fffd} bytes"), "{output:?}");
    assert!(output.iter().any(|l| l == "after the long line"), "{output:?}");
    assert!(output.iter().any(|l| l.starts_with("tiny app listening")), "{output:?}");
    // The long line went through in bounded pieces (kept lines are cut at 300 characters).
    assert!(
        output.iter().any(|l| l.len() == 300 && l.bytes().all(|b| b == b'x')),
        "{output:?}"
    );
    assert_eq!(
        app_check(&agent)["restarts"],
        0,
        "the app was not broken by its own output"
    );
    let peak = peak_rss_kib(supervisor.child.id());
    assert!(
        peak < 40 * 1024,
        "the supervisor peaked at {peak} KiB for a 32 MiB line"
    );
    eprintln!("supervisor peak RSS {peak} KiB");
}

#[test]
fn stopping_the_supervisor_stops_the_app_gracefully() {
    let (agent, mut supervisor) = serve_tiny_app_on_a_socket("app-stop");
    wait_for_status(&agent.url("/readyz"), 200, Duration::from_secs(30));
    let pid = app_check(&agent)["pid"].as_i64().unwrap();
    supervisor.signal("TERM");
    assert_eq!(
        supervisor.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        supervisor.log()
    );
    let log = supervisor.log();
    assert!(log.contains("tiny: got SIGTERM, stopping"), "{log}");
    assert!(log.contains("exit status 0"), "{log}");
    assert!(!process_exists(pid), "the app outlived its supervisor");
    // Its last report says the app is gone, so the agent is not ready (not waiting for the report to go stale).
    let down = wait_for_status(&agent.url("/readyz"), 503, Duration::from_secs(2));
    assert!(get(&agent.url("/readyz"))
        .unwrap()
        .body
        .contains("app `tiny` is not running"));
    eprintln!("agent not ready {down:?} after the supervisor stopped");
}

#[test]
fn stopping_the_supervisor_with_a_drain_keeps_the_app_serving_while_readiness_says_503() {
    let dir = support::temp_dir("app-drain");
    let port = support::free_port();
    let config = app_config(
        &dir,
        &format!("127.0.0.1:{port}"),
        r#"["python3", "tiny_app.py", "--port", "{port}"]"#,
        "",
    );
    // drain-seconds is a top-level key: put it before the [app] table.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("drain-seconds = 2\n{text}")).unwrap();
    let (agent, mut supervisor) = start(&config, &mariadb::shared().fresh_database());
    wait_for_status(&agent.url("/readyz"), 200, Duration::from_secs(30));
    let signalled = Instant::now();
    supervisor.signal("TERM");
    wait_for_status(&agent.url("/readyz"), 503, Duration::from_secs(1));
    assert!(get(&agent.url("/readyz"))
        .unwrap()
        .body
        .contains("app `tiny` is draining"));
    // The app still answers during the drain.
    assert_eq!(get(&format!("http://127.0.0.1:{port}/health")).unwrap().status, 200);
    assert_eq!(
        supervisor.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        supervisor.log()
    );
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "the app stopped before the drain ended: {took:?}"
    );
    assert!(
        get(&format!("http://127.0.0.1:{port}/health")).is_err(),
        "the app is gone after the drain"
    );
}

#[test]
fn bad_app_settings_are_refused_naming_the_key() {
    let dir = support::temp_dir("app-bad");
    for (command, listen, expected) in [
        (
            "[]",
            "127.0.0.1:9",
            "key `app.command`: expected the app server's command line",
        ),
        (
            r#"["app", "--listen", "{host}"]"#,
            "127.0.0.1:9",
            "unknown placeholder `{host}`",
        ),
        (
            r#"["app", "--bind", "127.0.0.1:8000"]"#,
            "127.0.0.1:9",
            "expected `{port}` somewhere",
        ),
    ] {
        let config = app_config(&dir, listen, command, "");
        for mode in ["serve", "app"] {
            let (code, _, stderr) = support::agent_command(&[mode, "--config", config.to_str().unwrap()]);
            assert_eq!(code, 1, "{mode}: {stderr}");
            assert!(stderr.contains(expected), "{mode} {command}: {stderr}");
            assert!(stderr.contains(&config.display().to_string()), "{stderr}");
        }
    }
}
