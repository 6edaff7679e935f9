//! The `foobar-agent` binary as a process: database outages, concurrent starts, broken migrations, SIGTERM,
//! systemd socket activation and readiness notification, configuration errors.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use serde_json::json;

use crate::support::mariadb::{self, MariaDb};
use crate::support::{self, agent_command, get, post_json, wait_for_status, AgentProcess};

const SOON: Duration = Duration::from_secs(30);

/// A copy of `sql/` that a test may add to or damage.
fn migrations_copy() -> std::path::PathBuf {
    let dir = support::temp_dir("migrations");
    let sql = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql");
    for entry in std::fs::read_dir(sql).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    dir
}

fn database_name(url: &str) -> &str {
    url.split('?').next().unwrap().rsplit('/').next().unwrap()
}

#[test]
fn database_down_at_start_and_later_the_agent_recovers_without_restart() {
    let mut db = MariaDb::start();
    let url = db.fresh_database();
    db.stop();

    let agent = AgentProcess::serve(&url, &[]);
    assert_eq!(get(&agent.url("/livez")).unwrap().status, 200);
    let r = get(&agent.url("/readyz")).unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    let api = get(&agent.url("/api/posts")).unwrap();
    assert_eq!(api.status, 503, "{}", api.body);
    assert!(api.json()["error"].as_str().unwrap().contains("database unavailable"));

    db.resume();
    wait_for_status(&agent.url("/readyz"), 200, SOON);
    let created = post_json(
        &agent.url("/api/posts"),
        &json!({"author": "a", "body": "before outage"}),
    )
    .unwrap();
    assert_eq!(created.status, 201);

    db.stop();
    wait_for_status(&agent.url("/readyz"), 503, SOON);
    assert_eq!(get(&agent.url("/livez")).unwrap().status, 200);
    let health = get(&agent.url("/healthz")).unwrap();
    assert_eq!(
        health.json()["checks"]["database:connection"][0]["status"],
        "fail",
        "{}",
        health.body
    );

    db.resume();
    wait_for_status(&agent.url("/readyz"), 200, SOON);
    let list = get(&agent.url("/api/posts")).unwrap().json();
    assert_eq!(list[0]["body"], "before outage");
    let mut agent = agent;
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent kept running throughout"
    );
}

#[test]
fn agents_started_together_apply_each_migration_once() {
    let db = mariadb::shared();
    let url2 = db.fresh_database();
    let racers: Vec<_> = (0..4)
        .map(|_| {
            std::process::Command::new(support::binary("foobar-agent"))
                .args(["migrate", "--database-url", &url2])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut applied_by = 0;
    for racer in racers {
        let out = racer.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("schema version 1"), "{stdout}");
        if stdout.contains("applied 1 migration") {
            applied_by += 1;
        }
    }
    assert_eq!(applied_by, 1, "exactly one of the racers applied the migration");
    let name = database_name(&url2);
    let rows = db.sql(&format!("SELECT version, success FROM {name}._sqlx_migrations"));
    assert_eq!(rows.trim(), "1\t1", "one row per migration, applied once");
    assert_eq!(db.sql(&format!("SELECT COUNT(*) FROM {name}.posts")).trim(), "0");
}

#[test]
fn a_broken_migration_leaves_the_agent_live_but_not_ready_and_data_intact() {
    let db = mariadb::shared();
    let url = db.fresh_database();
    let dir = migrations_copy();
    let dir_text = dir.to_str().unwrap();
    let config = support::temp_dir("config").join("agent.toml");
    std::fs::write(&config, format!("migrations = \"{dir_text}\"\n")).unwrap();
    let config_text = config.to_str().unwrap();

    // A healthy first start stores a post.
    {
        let agent = AgentProcess::serve(&url, &["--config", config_text]);
        wait_for_status(&agent.url("/readyz"), 200, SOON);
        assert_eq!(
            post_json(&agent.url("/api/posts"), &json!({"author": "a", "body": "keep me"}))
                .unwrap()
                .status,
            201
        );
    }

    // The new migration creates a table, then fails: MariaDB cannot roll the CREATE back.
    std::fs::write(
        dir.join("0002_broken.sql"),
        "CREATE TABLE half_done (id INT);\nINSERT INTO no_such_table VALUES (1);\n",
    )
    .unwrap();
    let agent = AgentProcess::serve(&url, &["--config", config_text]);
    let deadline = std::time::Instant::now() + SOON;
    let health = loop {
        let health = get(&agent.url("/healthz")).unwrap();
        if health.body.contains("0002_broken") || std::time::Instant::now() > deadline {
            break health;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(health.status, 503);
    let check = &health.json()["checks"]["migrations:version"][0];
    assert_eq!(check["status"], "fail");
    assert!(
        check["output"]
            .as_str()
            .unwrap()
            .contains("migration 0002_broken failed"),
        "{check}"
    );
    assert_eq!(get(&agent.url("/livez")).unwrap().status, 200);
    assert_eq!(get(&agent.url("/readyz")).unwrap().status, 503);
    let name = database_name(&url);
    assert_eq!(db.sql(&format!("SELECT body FROM {name}.posts")).trim(), "keep me");

    // `migrate` refuses with the same story and touches nothing.
    let (code, _, stderr) = agent_command(&["migrate", "--config", config_text, "--database-url", &url]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("migration 0002_broken was left partly applied"),
        "{stderr}"
    );
    assert_eq!(db.sql(&format!("SELECT body FROM {name}.posts")).trim(), "keep me");
    assert_eq!(
        db.sql(&format!("SELECT COUNT(*) FROM {name}.half_done")).trim(),
        "0",
        "nothing dropped"
    );

    // An applied migration edited afterwards is a checksum mismatch, reported, never re-applied.
    let url2 = db.fresh_database();
    let dir2 = migrations_copy();
    let (code, _, stderr) = agent_command(&["migrate", "--database-url", &url2]);
    assert_eq!(code, 0, "{stderr}");
    let first = std::fs::read_dir(&dir2).unwrap().next().unwrap().unwrap().path();
    let mut text = std::fs::read_to_string(&first).unwrap();
    text.push_str("\n-- edited after release\n");
    std::fs::write(&first, text).unwrap();
    let config2 = support::temp_dir("config").join("agent.toml");
    std::fs::write(&config2, format!("migrations = \"{}\"\n", dir2.display())).unwrap();
    let (code, _, stderr) = agent_command(&[
        "migrate",
        "--config",
        config2.to_str().unwrap(),
        "--database-url",
        &url2,
    ]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("migration 0001_posts was changed after it was applied"),
        "{stderr}"
    );
}

#[test]
fn sigterm_lets_an_in_flight_request_finish_and_exits_zero() {
    let db = mariadb::shared();
    let url = db.fresh_database();
    let mut agent = AgentProcess::serve(&url, &[]);
    wait_for_status(&agent.url("/readyz"), 200, SOON);
    let name = database_name(&url);

    // A client holding a write lock on `posts` makes the next list request wait: a slow request.
    let socket = db.socket();
    let mut locker = std::process::Command::new("mariadb")
        .arg("--no-defaults")
        .arg(format!("--socket={}", socket.display()))
        .args([
            "-u",
            "root",
            name,
            "-e",
            "LOCK TABLES posts WRITE; SELECT SLEEP(2); UNLOCK TABLES;",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let url_list = agent.url("/api/posts");
    let slow = std::thread::spawn(move || get(&url_list));
    std::thread::sleep(Duration::from_millis(300));
    agent.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        std::net::TcpStream::connect(agent.base.trim_start_matches("http://")).is_err(),
        "no new connections after SIGTERM"
    );
    let reply = slow.join().unwrap().expect("the in-flight request got an answer");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(agent.wait_exit(Duration::from_secs(15)), Some(0), "{}", agent.log());
    locker.wait().unwrap();
}

#[test]
fn sigterm_with_a_drain_answers_readyz_503_and_serves_everything_else_until_it_ends() {
    let dir = support::temp_dir("drain");
    let config = dir.join("agent.toml");
    std::fs::write(&config, "drain-seconds = 3\n").unwrap();
    let url = mariadb::shared().fresh_database();
    let mut agent = AgentProcess::serve(&url, &["--config", config.to_str().unwrap()]);
    wait_for_status(&agent.url("/readyz"), 200, SOON);

    // Clients keep writing and reading through the stop; not one request fails while the agent listens.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (base, stop) = (agent.base.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut served, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let write = post_json(
                    &format!("{base}/api/posts"),
                    &json!({ "author": "drain", "body": "during the drain" }),
                );
                let read = get(&format!("{base}/api/posts"));
                for reply in [write, read] {
                    match reply {
                        Ok(r) if r.status < 300 => served += 1,
                        other => failed.push(format!("{other:?}")),
                    }
                }
            }
            (served, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let signalled = std::time::Instant::now();
    agent.signal("TERM");
    let draining = wait_for_status(&agent.url("/readyz"), 503, Duration::from_secs(1));
    let reply = get(&agent.url("/readyz")).unwrap();
    assert_eq!(reply.json()["status"], "draining", "{}", reply.body);
    assert_eq!(get(&agent.url("/livez")).unwrap().status, 200);
    // Most of the drain later, still serving.
    std::thread::sleep(Duration::from_millis(2000));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (served, failed) = load.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} failed during the drain: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(served > 10, "only {served} requests served");
    assert_eq!(agent.wait_exit(Duration::from_secs(15)), Some(0), "{}", agent.log());
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "stopped before the drain ended: {took:?}"
    );
    assert!(agent.log().contains("draining"), "{}", agent.log());
    eprintln!("drain: /readyz 503 after {draining:?}, {served} requests served, stopped after {took:?}");
}

#[test]
fn a_drain_longer_than_the_units_allow_is_refused_naming_the_key() {
    let dir = support::temp_dir("drain-bad");
    let file = dir.join("agent.toml");
    std::fs::write(&file, "drain-seconds = 60\n").unwrap();
    let (code, _, stderr) = agent_command(&["serve", "--config", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("key `drain-seconds`: expected at most 10"), "{stderr}");
    assert!(stderr.contains(file.to_str().unwrap()), "{stderr}");
}

#[test]
fn socket_activation_and_ready_notification() {
    let db = mariadb::shared();
    let url = db.fresh_database();
    let dir = support::temp_dir("notify");
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(SOON)).unwrap();
    let port = support::free_port();
    let listen = format!("127.0.0.1:{port}");
    // systemd-socket-activate binds the socket and hands it over as fd 3 with LISTEN_FDS/LISTEN_PID,
    // exactly as the foobar-agent.socket unit does in the image.
    let mut child = std::process::Command::new("systemd-socket-activate")
        .args(["-l", &listen, "-E", &format!("NOTIFY_SOCKET={}", notify_path.display())])
        .arg(support::binary("foobar-agent"))
        .args(["serve", "--listen", "127.0.0.1:1", "--database-url", &url])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (package systemd) runs");
    // Like inetd, systemd-socket-activate starts the service on the first connection; that request waits in the
    // socket's queue meanwhile, which is what socket activation buys across restarts.
    let livez = format!("http://{listen}/livez");
    let first = std::thread::spawn(move || {
        // Retry only while systemd-socket-activate has not bound the port yet.
        let deadline = std::time::Instant::now() + SOON;
        loop {
            match get(&livez) {
                Err(e) if e.contains("refused") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                other => return other,
            }
        }
    });
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 within 30 s");
    assert_eq!(
        first.join().unwrap().expect("the queued request was answered").status,
        200
    );
    assert_eq!(&buf[..n], b"READY=1");
    // READY=1 means serving, on the inherited socket (port 1 was never bound); /readyz turns 200 once the
    // migrations are applied, and systemd's STATUS= says so.
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let ready = get(&format!("http://{listen}/readyz")).unwrap();
        if ready.status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", ready.body);
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut statuses = Vec::new();
    while let Ok(n) = notify.recv(&mut buf) {
        statuses.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        if statuses.iter().any(|s| s == "STATUS=ready") {
            break;
        }
    }
    assert!(statuses.iter().any(|s| s == "STATUS=ready"), "{statuses:?}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn configuration_errors_name_the_file_and_the_key() {
    let dir = support::temp_dir("badconfig");
    let file = dir.join("agent.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:8080\"\npool-sise = 4\n").unwrap();
    let (code, _, stderr) = agent_command(&["serve", "--config", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains(file.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("pool-sise"), "{stderr}");
    assert!(stderr.contains("pool-size"), "expected keys are listed: {stderr}");

    std::fs::write(&file, "listen = \"nowhere\"\n").unwrap();
    let (code, _, stderr) = agent_command(&["serve", "--config", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("listen") && stderr.contains("host:port"), "{stderr}");

    let missing = dir.join("missing.toml");
    let (code, _, stderr) = agent_command(&["serve", "--config", missing.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot read config file") && stderr.contains("missing.toml"),
        "{stderr}"
    );
}

/// During a rollout the old build meets the new build's migrations: it serves on and says so; a build whose migration
/// differs from the one the database recorded is not ready, naming the migration.
#[test]
fn an_old_build_serves_on_beside_a_newer_builds_migrations_and_a_changed_one_is_named() {
    let db = mariadb::shared();
    let url = db.fresh_database();
    // The new build: one more migration (an expand step: a new table the old build does not use).
    let newer = migrations_copy();
    std::fs::write(
        newer.join("0002_expand.sql"),
        "CREATE TABLE tags (id INT PRIMARY KEY);\n",
    )
    .unwrap();
    let config = support::temp_dir("config").join("agent.toml");
    std::fs::write(&config, format!("migrations = \"{}\"\n", newer.display())).unwrap();
    let (code, out, stderr) = agent_command(&["migrate", "--config", config.to_str().unwrap(), "--database-url", &url]);
    assert_eq!(code, 0, "{stderr}");
    assert!(out.contains("schema version 2"), "{out}");

    // The old build (the embedded migrations only) starts, is ready and serves.
    let agent = AgentProcess::serve(&url, &[]);
    wait_for_status(&agent.url("/readyz"), 200, SOON);
    let created = post_json(&agent.url("/api/posts"), &json!({"author": "a", "body": "old build"})).unwrap();
    assert_eq!(created.status, 201, "{}", created.body);
    let health = get(&agent.url("/healthz")).unwrap();
    assert_eq!(health.status, 200, "{}", health.body);
    let check = &health.json()["checks"]["migrations:version"][0];
    assert_eq!(check["status"], "warn", "{check}");
    assert_eq!(check["unknownMigrations"], json!([2]), "{check}");
    assert!(
        check["output"]
            .as_str()
            .unwrap()
            .contains("which this build does not know"),
        "{check}"
    );
    let (code, out, stderr) = agent_command(&["migrate", "--database-url", &url]);
    assert_eq!(code, 0, "{stderr}");
    assert!(out.contains("applied 0 migration(s)") && out.contains("[2]"), "{out}");
    drop(agent);

    // A build whose 0002 differs from the one applied: not ready, and /healthz names it.
    std::fs::write(
        newer.join("0002_expand.sql"),
        "CREATE TABLE tags (id BIGINT PRIMARY KEY);\n",
    )
    .unwrap();
    let agent = AgentProcess::serve(&url, &["--config", config.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + SOON;
    let health = loop {
        let health = get(&agent.url("/healthz")).unwrap();
        if health.body.contains("0002_expand") || std::time::Instant::now() > deadline {
            break health;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(health.status, 503, "{}", health.body);
    let check = &health.json()["checks"]["migrations:version"][0];
    assert_eq!(check["status"], "fail", "{check}");
    assert!(
        check["output"]
            .as_str()
            .unwrap()
            .contains("migration 0002_expand was changed after it was applied"),
        "{check}"
    );
    assert_eq!(get(&agent.url("/readyz")).unwrap().status, 503);
}

#[test]
fn migrate_against_an_unreachable_database_fails_with_the_reason() {
    let (code, _, stderr) = agent_command(&[
        "migrate",
        "--database-url",
        "mysql://foobar@localhost/foobar?socket=/nonexistent/mysqld.sock",
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("database unreachable"), "{stderr}");
}

#[test]
fn sigterm_lets_a_running_migration_finish_and_ends_a_wait_for_the_database_at_once() {
    let db = mariadb::shared();
    let url = db.fresh_database();
    let name = database_name(&url);
    // A migration that takes 3 s, then makes a table.
    let dir = migrations_copy();
    std::fs::write(
        dir.join("0090_slow.sql"),
        "DO SLEEP(3);\nCREATE TABLE slow_done (id INT PRIMARY KEY);\n",
    )
    .unwrap();
    let config = support::temp_dir("slow-config").join("agent.toml");
    std::fs::write(&config, format!("migrations = \"{}\"\n", dir.display())).unwrap();
    let mut agent = AgentProcess::serve(&url, &["--config", config.to_str().unwrap()]);
    // Serving while the migration runs: not ready yet.
    wait_for_status(&agent.url("/livez"), 200, SOON);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(get(&agent.url("/readyz")).unwrap().status, 503);
    agent.signal("TERM");
    let start = std::time::Instant::now();
    assert_eq!(agent.wait_exit(Duration::from_secs(15)), Some(0), "{}", agent.log());
    // Finished, not cut: the table is there and the migration recorded as applied.
    assert_eq!(
        db.sql(&format!(
            "SELECT success FROM {name}._sqlx_migrations WHERE version = 90"
        ))
        .trim(),
        "1",
        "{}",
        agent.log()
    );
    assert_eq!(db.sql(&format!("SELECT COUNT(*) FROM {name}.slow_done")).trim(), "0");
    let finished_in = start.elapsed();

    // Nothing answers at the database's address: SIGTERM ends the wait at once.
    let closed = support::free_port();
    let mut agent = AgentProcess::serve(&format!("mysql://foobar@127.0.0.1:{closed}/foobar"), &[]);
    wait_for_status(&agent.url("/livez"), 200, SOON);
    agent.signal("TERM");
    let start = std::time::Instant::now();
    assert_eq!(agent.wait_exit(Duration::from_secs(5)), Some(0), "{}", agent.log());
    eprintln!(
        "stop with a migration running: {:.1} s; waiting for the database: {:.1} s",
        finished_in.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
}
