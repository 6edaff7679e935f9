//! The site's own application server: started after migrations, restarted with backoff when it dies, stopped
//! gracefully, its output sent to the journal under its own name, and asked whether it answers. Its supervisor
//! (`foobar-agent app`, in a unit and user of its own) reports all that in a file, which the agent reads.

use std::collections::VecDeque;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::config::{AppConfig, Listen};
use crate::db::DatabaseEnv;

/// How many of the app's last output lines `/healthz` shows.
const KEPT_LINES: usize = 20;
/// A longer line is cut here (in the buffer; the journal gets up to `MAX_LINE` bytes of it).
const KEPT_LINE_CHARS: usize = 300;
/// Output without a newline is sent on in pieces of this many bytes: the agent's memory stays bounded whatever the
/// app prints.
const MAX_LINE: usize = 16 * 1024;
/// The first restart waits this long; each quick death doubles it, up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run at least this long counts as healthy: the next death restarts after `FIRST_BACKOFF` again.
const STABLE_RUN: Duration = Duration::from_secs(30);
/// How long a health probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What `/healthz` shows about the app; what the supervisor reports to the agent (`status-file`, JSON).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppStatus {
    pub pid: Option<u32>,
    pub restarts: u64,
    /// `exit status 3` or `killed by signal 9`, for the last run that ended.
    pub last_exit: Option<String>,
    pub last_output: VecDeque<String>,
    /// Set while waiting to restart after a death.
    pub next_start_in: Option<Duration>,
    /// Why the app has not been started yet (its migrations), while that lasts.
    pub waiting: Option<String>,
    /// What the last health probe found wrong; `None` when it answered (or nothing runs to ask).
    pub problem: Option<String>,
    /// Its unit is stopping: the app serves on for the drain time, but the site is no longer ready.
    #[serde(default)]
    pub draining: bool,
}

/// The supervisor's report: the app's status and when it was written (Unix seconds).
#[derive(serde::Serialize, serde::Deserialize)]
struct Report {
    #[serde(flatten)]
    status: AppStatus,
    written: u64,
}

/// How often the supervisor reports; a report older than `STALE_REPORT` means the supervisor is gone. While a
/// running app does not answer (it is starting), every `REPORT_SOON`, so the site is ready again soon after it is.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
pub const REPORT_SOON: Duration = Duration::from_millis(200);
/// How often an app that answers is asked again (each probe is a request in its access log); one that does not is
/// asked at every report, and a new run at once.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);
const STALE_REPORT: Duration = Duration::from_secs(5);

/// Where an app's state lives: in the supervisor that runs it (`foobar-agent app`), or in the supervisor's reports,
/// which the agent (`foobar-agent serve`, another user in another unit) reads.
#[derive(Clone)]
enum Source {
    /// The status, and a wake-up for the reporter when it changes (a death is reported at once, not a second later).
    Supervised(Arc<Mutex<AppStatus>>, Arc<tokio::sync::Notify>),
    Reported(Arc<Path>),
}

/// The app and what is known about it; cheap to clone.
#[derive(Clone)]
pub struct App {
    pub config: Arc<AppConfig>,
    source: Source,
}

impl App {
    /// The app as its supervisor sees it: it runs it.
    pub fn supervised(config: AppConfig) -> App {
        App {
            config: Arc::new(config),
            source: Source::Supervised(Arc::default(), Arc::default()),
        }
    }

    /// The app as the agent sees it: through the supervisor's reports in `status-file`.
    pub fn reported(config: AppConfig) -> App {
        let path: Arc<Path> = config.status_file.clone().into();
        App {
            config: Arc::new(config),
            source: Source::Reported(path),
        }
    }

    pub fn status(&self) -> AppStatus {
        match &self.source {
            Source::Supervised(status, _) => status.lock().expect("app status lock").clone(),
            Source::Reported(path) => read_report(path).map(|r| r.status).unwrap_or_default(),
        }
    }

    /// Which run of the app this is: its pid and the restarts before it. Changes when it dies and when it starts.
    pub fn run(&self) -> (Option<u32>, u64) {
        let status = self.status();
        (status.pid, status.restarts)
    }

    /// Changes the supervised status and wakes the reporter.
    fn update(&self, f: impl FnOnce(&mut AppStatus)) {
        if let Source::Supervised(_, changed) = &self.source {
            self.update_quietly(f);
            changed.notify_one();
        }
    }

    /// Changes the supervised status for the next regular report (output lines: a chatty app is not a reason to
    /// report more often).
    fn update_quietly(&self, f: impl FnOnce(&mut AppStatus)) {
        if let Source::Supervised(status, _) = &self.source {
            f(&mut status.lock().expect("app status lock"));
        }
    }

    /// `Ok` when the app runs and answers: its health path with 2xx/3xx, or a connect when it has none. The agent
    /// takes the supervisor's last probe, which is at most `STALE_REPORT` old.
    pub async fn check(&self) -> Result<(), String> {
        let name = &self.config.name;
        let Source::Reported(path) = &self.source else {
            let status = self.status();
            if status.pid.is_none() {
                return Err(not_running(name, &status));
            }
            return self.probe().await;
        };
        let report = match read_report(path) {
            Ok(report) => report,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!(
                    "app `{name}` is not running: its supervisor (foobar-app.service, `foobar-agent app`) has not reported in {}",
                    path.display()
                ))
            }
            Err(err) => return Err(format!("app `{name}`: its supervisor's report {} is unreadable: {err}", path.display())),
        };
        let age = unix_now().saturating_sub(report.written);
        if age > STALE_REPORT.as_secs() {
            return Err(format!(
                "app `{name}`: its supervisor (foobar-app.service) has not reported for {age} s"
            ));
        }
        if report.status.pid.is_none() {
            return Err(not_running(name, &report.status));
        }
        if report.status.draining {
            return Err(format!("app `{name}` is draining: foobar-app.service is stopping"));
        }
        match report.status.problem {
            Some(problem) => Err(problem),
            None => Ok(()),
        }
    }

    /// One probe of the running app, bounded by `PROBE_TIMEOUT`.
    async fn probe(&self) -> Result<(), String> {
        let name = &self.config.name;
        match tokio::time::timeout(PROBE_TIMEOUT, probe(&self.config.listen, self.config.health.as_deref())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(format!("app `{name}` does not answer on {}: {err}", self.config.listen)),
            Err(_) => Err(format!(
                "app `{name}` did not answer on {} within {} s",
                self.config.listen,
                PROBE_TIMEOUT.as_secs()
            )),
        }
    }

    /// Marks the app as draining (reported at once).
    pub fn set_draining(&self) {
        self.update(|s| s.draining = true);
    }

    /// Notes why the app is not started yet (`None` once it may start).
    pub fn set_waiting(&self, why: Option<String>) {
        self.update(|s| s.waiting = why);
    }

    /// Resolves at the next change of the supervised status, or after `every`.
    pub async fn changed_or(&self, every: Duration) {
        if let Source::Supervised(_, changed) = &self.source {
            let _ = tokio::time::timeout(every, changed.notified()).await;
        }
    }

    /// Writes the supervisor's report now: the status and a fresh probe of the running app. Written to a temporary
    /// file and renamed, so the agent never reads half a report.
    /// Without `probe`, the last probe's finding is reported again.
    pub async fn report(&self, probe: bool) -> std::io::Result<()> {
        let Source::Supervised(status, _) = &self.source else {
            return Ok(());
        };
        let (pid, run) = self.run();
        let problem = match pid {
            Some(_) if probe => Some(self.probe().await.err()),
            Some(_) => None,
            None => Some(None),
        };
        let status = {
            let mut status = status.lock().expect("app status lock");
            // A probe of a run that ended meanwhile says nothing about the next one.
            if let (Some(problem), true) = (problem, (status.pid, status.restarts) == (pid, run)) {
                status.problem = problem;
            }
            status.clone()
        };
        let text = serde_json::to_vec(&Report {
            status,
            written: unix_now(),
        })?;
        let path = &self.config.status_file;
        let partial = path.with_extension("json.partial");
        std::fs::write(&partial, text)?;
        std::fs::rename(&partial, path)
    }

    /// Runs the app until `stop` turns true, restarting it whenever it dies; then stops it gracefully.
    pub async fn supervise(self, database: DatabaseEnv, mut stop: watch::Receiver<bool>, grace: Duration) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            if *stop.borrow() {
                return;
            }
            let started = Instant::now();
            let (mut child, forwarders) = match self.spawn(&database) {
                Ok(spawned) => spawned,
                Err(err) => {
                    tracing::error!(app = %self.config.name, error = %err, "cannot start the app");
                    self.update(|s| {
                        s.last_exit = Some(format!("failed to start: {err}"));
                        s.restarts += 1;
                    });
                    if self.wait_before_restart(&mut backoff, started, &mut stop).await {
                        return;
                    }
                    continue;
                }
            };
            let pid = child.id();
            tracing::info!(app = %self.config.name, pid, argv = ?self.config.argv(), "app started");
            self.update(|s| {
                s.pid = pid;
                s.next_start_in = None;
            });
            let exit = tokio::select! {
                status = child.wait() => match status {
                    Ok(status) => describe(status),
                    Err(err) => format!("lost: {err}"),
                },
                _ = stopped(&mut stop) => {
                    self.stop_gracefully(&mut child, grace).await;
                    self.update(|s| s.pid = None);
                    return;
                }
                why = self.hung() => {
                    tracing::warn!(app = %self.config.name, %why, "the app is alive but hung; restarting it");
                    self.stop_gracefully(&mut child, grace).await;
                    format!("restarted: {why}")
                }
            };
            // Whatever it left behind (workers of a killed master) would hold the socket; end them too.
            if let Some(pid) = pid {
                signal_group(pid, libc::SIGKILL);
            }
            // Its last words (why it died) belong in the report of its death: the pipes are read to their end,
            // briefly (a grandchild that escaped the group could hold them open).
            for forwarder in forwarders {
                let _ = tokio::time::timeout(Duration::from_millis(500), forwarder).await;
            }
            tracing::warn!(app = %self.config.name, %exit, ran = ?started.elapsed(), "app exited");
            self.update(|s| {
                s.pid = None;
                s.restarts += 1;
                s.last_exit = Some(exit);
            });
            if self.wait_before_restart(&mut backoff, started, &mut stop).await {
                return;
            }
        }
    }

    /// Resolves when the running app has failed its health check for too long: `hang-timeout` seconds after it last
    /// answered, or four times that from its start when it never did. Never, with `hang-timeout = 0`.
    async fn hung(&self) -> String {
        let limit = Duration::from_secs(self.config.hang_timeout);
        if limit.is_zero() {
            return std::future::pending().await;
        }
        let every = (limit / 3).clamp(Duration::from_millis(200), Duration::from_secs(5));
        let started = Instant::now();
        let mut answered = false;
        let mut failing_since: Option<Instant> = None;
        loop {
            tokio::time::sleep(every).await;
            match self.check().await {
                Ok(()) => {
                    answered = true;
                    failing_since = None;
                }
                Err(err) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if answered && since.elapsed() >= limit {
                        return format!(
                            "no answer to its health check for {} s ({err})",
                            since.elapsed().as_secs()
                        );
                    }
                    if !answered && started.elapsed() >= limit * 4 {
                        return format!(
                            "never answered its health check in {} s ({err})",
                            started.elapsed().as_secs()
                        );
                    }
                }
            }
        }
    }

    /// Sleeps the backoff (reset after a stable run, doubled after a quick death); true when told to stop meanwhile.
    async fn wait_before_restart(
        &self,
        backoff: &mut Duration,
        started: Instant,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        if started.elapsed() >= STABLE_RUN {
            *backoff = FIRST_BACKOFF;
        }
        let wait = *backoff;
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        self.update(|s| s.next_start_in = Some(wait));
        tracing::info!(app = %self.config.name, wait = ?wait, "restarting the app after a pause");
        tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            _ = stopped(stop) => true,
        }
    }

    /// Starts the app; returns it and the tasks that forward its output (done when its pipes close).
    fn spawn(&self, database: &DatabaseEnv) -> std::io::Result<(Child, Vec<tokio::task::JoinHandle<()>>)> {
        let argv = self.config.argv();
        if let Listen::Unix(path) = &self.config.listen {
            // A socket file left by the last run makes most servers fail with "address in use".
            remove_stale_socket(path);
        }
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .current_dir(&self.config.directory)
            .env("DATABASE_URL", &database.url)
            .env("DATABASE_SOCKET", &database.socket)
            .env("DATABASE_NAME", &database.name)
            .env("DATABASE_USER", &database.user)
            .envs(&self.config.env)
            // systemd's notification socket is the agent's: a server that speaks sd_notify (gunicorn does) would
            // otherwise report to a unit that does not listen to it.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a death or a stop can reach the workers it forked.
            .process_group(0)
            .kill_on_drop(true);
        if let Listen::Tcp(addr) = &self.config.listen {
            if let Some((_, port)) = addr.rsplit_once(':') {
                command.env("PORT", port);
            }
        }
        let mut child = command.spawn()?;
        let journal = Journal::open(&self.config.name, child.id());
        let mut forwarders = Vec::new();
        if let Some(out) = child.stdout.take() {
            forwarders.push(tokio::spawn(self.clone().forward(out, journal.clone())));
        }
        if let Some(err) = child.stderr.take() {
            forwarders.push(tokio::spawn(self.clone().forward(err, journal)));
        }
        Ok((child, forwarders))
    }

    /// Copies the app's output, line by line, to the journal and into the kept lines: every byte (invalid UTF-8
    /// replaced, never a reason to stop), a line longer than `MAX_LINE` in pieces, until the app closes its end. The
    /// pipe is read to the end, so the app never gets SIGPIPE or blocks on a full pipe because of the agent.
    async fn forward(self, stream: impl AsyncRead + Unpin, journal: Journal) {
        let mut reader = BufReader::new(stream);
        let mut line: Vec<u8> = Vec::with_capacity(256);
        loop {
            let buffer = match reader.fill_buf().await {
                Ok(buffer) => buffer,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            if buffer.is_empty() {
                break;
            }
            let room = MAX_LINE - line.len();
            let window = &buffer[..buffer.len().min(room)];
            let (taken, complete) = match window.iter().position(|b| *b == b'\n') {
                Some(end) => {
                    line.extend_from_slice(&window[..end]);
                    (end + 1, true)
                }
                None => {
                    line.extend_from_slice(window);
                    (window.len(), line.len() >= MAX_LINE)
                }
            };
            reader.consume(taken);
            if complete {
                self.emit(&journal, &line);
                line.clear();
            }
        }
        if !line.is_empty() {
            self.emit(&journal, &line);
        }
    }

    fn emit(&self, journal: &Journal, bytes: &[u8]) {
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        let line = String::from_utf8_lossy(bytes);
        journal.send(&line);
        let kept: String = line.chars().take(KEPT_LINE_CHARS).collect();
        self.update_quietly(|s| {
            if s.last_output.len() == KEPT_LINES {
                s.last_output.pop_front();
            }
            s.last_output.push_back(kept);
        });
    }

    /// SIGTERM, then SIGKILL to the whole group if it has not exited within `grace`.
    async fn stop_gracefully(&self, child: &mut Child, grace: Duration) {
        let Some(pid) = child.id() else { return };
        tracing::info!(app = %self.config.name, pid, "stopping the app");
        signal_pid(pid, libc::SIGTERM);
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => {
                let exit = status.map(describe).unwrap_or_default();
                tracing::info!(app = %self.config.name, %exit, "app stopped");
            }
            Err(_) => tracing::warn!(app = %self.config.name, ?grace, "app did not stop in time; killing it"),
        }
        signal_group(pid, libc::SIGKILL);
    }
}

/// Why the app is not running, from its status: waiting for its migrations, or restarting after an exit.
fn not_running(name: &str, status: &AppStatus) -> String {
    if let Some(waiting) = &status.waiting {
        return format!("app `{name}` not started: {waiting}");
    }
    let why = match (&status.last_exit, status.next_start_in) {
        (Some(exit), Some(wait)) => format!(", restarting in {:.1} s after {exit}", wait.as_secs_f64()),
        (Some(exit), None) => format!(", last {exit}"),
        _ => String::new(),
    };
    format!("app `{name}` is not running{why}")
}

fn read_report(path: &Path) -> std::io::Result<Report> {
    let text = std::fs::read(path)?;
    serde_json::from_slice(&text).map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidData, err))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Resolves once `stop` is true (the `Ref` that `wait_for` returns must not live across the caller's awaits).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

fn signal_pid(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory effects; a pid that is gone gives ESRCH, which is fine.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

fn signal_group(pid: u32, signal: i32) {
    // SAFETY: as above; the app leads its own process group (`process_group(0)`), so -pid is that group.
    unsafe {
        libc::kill(-(pid as i32), signal);
    }
}

fn remove_stale_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt as _;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// One connect (and, with a health path, one HTTP GET) to the app.
async fn probe(listen: &Listen, health: Option<&str>) -> Result<(), String> {
    match listen {
        Listen::Unix(path) => {
            let stream = UnixStream::connect(path).await.map_err(|e| e.to_string())?;
            ask(stream, health).await
        }
        Listen::Tcp(addr) => {
            let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            ask(stream, health).await
        }
    }
}

async fn ask(mut stream: impl AsyncRead + tokio::io::AsyncWrite + Unpin, health: Option<&str>) -> Result<(), String> {
    let Some(path) = health else { return Ok(()) };
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: foobar-agent\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        let n = stream.read(&mut head[read..]).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        read += n;
    }
    let line = String::from_utf8_lossy(&head[..read]);
    let code: Option<u16> = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse().ok());
    match code {
        Some(code) if (200..400).contains(&code) => Ok(()),
        Some(code) => Err(format!("GET {path} answered {code}")),
        None => Err(format!("GET {path} did not answer HTTP")),
    }
}

/// The journal's native socket, where each line is sent under the app's name; without one (outside an image),
/// lines go to the agent's own stderr with the name in front.
#[derive(Clone)]
struct Journal {
    name: Arc<str>,
    pid: Option<u32>,
    socket: Option<Arc<std::os::unix::net::UnixDatagram>>,
}

const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

impl Journal {
    fn open(name: &str, pid: Option<u32>) -> Journal {
        let socket = std::os::unix::net::UnixDatagram::unbound()
            .and_then(|s| s.connect(JOURNAL_SOCKET).map(|()| s))
            .ok()
            .map(Arc::new);
        Journal {
            name: name.into(),
            pid,
            socket,
        }
    }

    fn send(&self, line: &str) {
        let sent = self.socket.as_ref().is_some_and(|socket| {
            // The journal stamps the sender (the agent); SYSLOG_PID names the app's own process.
            let message = format!(
                "SYSLOG_IDENTIFIER={}\nSYSLOG_PID={}\nPRIORITY=6\nMESSAGE={}\n",
                self.name,
                self.pid.unwrap_or_default(),
                line.replace('\n', " ")
            );
            socket.send(message.as_bytes()).is_ok()
        });
        if !sent {
            eprintln!("{}: {line}", self.name);
        }
    }
}
