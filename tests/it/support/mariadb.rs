//! A throwaway MariaDB server on a temporary datadir and socket, started and stopped by the tests themselves.
//!
//! The server runs under a small shell that holds a pipe from the test process: when the test process exits for any
//! reason (pass, panic, abort), the pipe closes and the shell stops the server and removes the datadir.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct MariaDb {
    dir: PathBuf,
    guard: Option<(Child, ChildStdin)>,
}

/// One server shared by the tests that only need a database of their own (each gets a fresh one).
pub fn shared() -> &'static MariaDb {
    static SHARED: OnceLock<MariaDb> = OnceLock::new();
    SHARED.get_or_init(MariaDb::start)
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is mariadb-server installed? `just deps`)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

impl MariaDb {
    /// Creates a datadir and starts a server on it.
    pub fn start() -> MariaDb {
        let dir = std::env::temp_dir().join(format!(
            "foobar-mariadb-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        run(Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .args([
                "--user=root",
                "--skip-test-db",
                "--auth-root-authentication-method=socket",
            ]));
        let mut db = MariaDb { dir, guard: None };
        db.resume();
        db
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("mysqld.sock")
    }

    /// A URL for `database`, authenticated by `unix_socket` as the (root) test user: no password anywhere.
    pub fn url(&self, database: &str) -> String {
        format!("mysql://root@localhost/{database}?socket={}", self.socket().display())
    }

    /// Creates an empty database with a unique name and returns its URL.
    pub fn fresh_database(&self) -> String {
        let name = format!("t{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        self.sql(&format!("CREATE DATABASE {name} CHARACTER SET utf8mb4"));
        self.url(&name)
    }

    /// Runs SQL with the `mariadb` client and returns its tab-separated output.
    pub fn sql(&self, sql: &str) -> String {
        let out = Command::new("mariadb")
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-u", "root", "-N", "-B", "-e", sql])
            .output()
            .expect("run mariadb client");
        assert!(
            out.status.success(),
            "sql `{sql}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Stops the server, keeping its datadir for `resume`.
    pub fn stop(&mut self) {
        if let Some((mut child, stdin)) = self.guard.take() {
            std::fs::write(self.dir.join(".keep"), b"").unwrap();
            drop(stdin);
            child.wait().unwrap();
        }
    }

    /// Starts the server on its existing datadir and waits until it accepts connections.
    pub fn resume(&mut self) {
        let _ = std::fs::remove_file(self.dir.join(".keep"));
        let dir = self.dir.display().to_string();
        let script = r#"dir="$1"
mariadbd --no-defaults --datadir="$dir/data" --socket="$dir/mysqld.sock" --pid-file="$dir/mysqld.pid" \
  --skip-networking --user=root --log-error="$dir/error.log" --innodb-buffer-pool-size=64M \
  --innodb-flush-log-at-trx-commit=2 --max-connections=500 &
pid=$!
read -r _
kill "$pid"; wait "$pid"
[ -e "$dir/.keep" ] || rm -rf "$dir""#;
        let mut child = Command::new("sh")
            .args(["-c", script, "mariadb-guard", &dir])
            .stdin(Stdio::piped())
            .spawn()
            .expect("start mariadbd");
        let stdin = child.stdin.take().unwrap();
        self.guard = Some((child, stdin));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = Command::new("mariadb-admin")
                .arg("--no-defaults")
                .arg(format!("--socket={}", self.socket().display()))
                .args(["-u", "root", "ping"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd did not start: {}",
                self.error_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        if let Some((mut child, mut stdin)) = self.guard.take() {
            let _ = stdin.write_all(b"stop\n");
            drop(stdin);
            let _ = child.wait();
        }
    }
}
