//! Running the agent: connect lazily, migrate in the background, listen (or take systemd's socket), tell systemd
//! when ready, and on SIGTERM drain in-flight requests within a bounded time.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::migrate::Migrator;
use tokio::net::{TcpListener, UnixListener};

use crate::app::App;
use crate::config::{Config, Listen};
use crate::db::{self, migrate};
use crate::state::{AppState, MigrationStatus};
use crate::systemd;

/// Applies migrations until they are applied or fail for good, retrying while the database is unreachable.
/// Returns whether they were applied. At boot the agent starts beside MariaDB, so for its first 30 s it retries
/// every 200 ms (a refused unix-socket connect costs nothing) and notices the database soon after it opens; then
/// every 5 s. The warning is logged when the error changes and every 5 s, not on every try.
/// A stop (`stop` turns true) ends the waiting at once; a migration already running is given the shutdown time
/// to finish (the caller bounds it), since cutting one leaves it half-applied.
/// `report` is told each status on the way (`Pending` with the error, then `Applied` or `Failed`).
pub(crate) async fn migrate_in_background(
    pool: &sqlx::MySqlPool,
    migrator: &Migrator,
    lock_timeout: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
    report: impl Fn(MigrationStatus),
) -> bool {
    const FAST: Duration = Duration::from_millis(200);
    const SLOW: Duration = Duration::from_secs(5);
    let started = tokio::time::Instant::now();
    let mut last_logged: Option<(String, tokio::time::Instant)> = None;
    loop {
        let delay = if started.elapsed() < Duration::from_secs(30) {
            FAST
        } else {
            SLOW
        };
        match migrate::apply(pool, migrator, lock_timeout).await {
            Ok(migrate::Applied {
                version,
                newly_applied,
                unknown,
            }) => {
                if unknown.is_empty() {
                    tracing::info!(version, newly_applied, "schema is current");
                } else {
                    tracing::warn!(
                        version,
                        newly_applied,
                        ?unknown,
                        "the database has migrations this build does not know (a newer build applied them); serving on"
                    );
                }
                report(MigrationStatus::Applied {
                    version,
                    newly_applied,
                    unknown,
                });
                return true;
            }
            Err(err) if err.is_retryable() => {
                let text = err.to_string();
                let due = match &last_logged {
                    Some((previous, at)) => *previous != text || at.elapsed() >= SLOW,
                    None => true,
                };
                if due {
                    tracing::warn!(error = %err, retry_in = ?delay, "migrations not applied yet");
                    last_logged = Some((text.clone(), tokio::time::Instant::now()));
                }
                report(MigrationStatus::Pending(Some(text)));
            }
            Err(err) => {
                tracing::error!(error = %err, "migrations failed; staying up but not ready");
                report(MigrationStatus::Failed(err.to_string()));
                return false;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|stopped| *stopped) => {
                tracing::info!("stopping: no longer waiting for the database to apply migrations");
                return false;
            }
        }
    }
}

/// Tells systemd (`STATUS=`, in `systemctl status`) and the journal when the agent's own parts are first ready (with
/// the built-in app: when `/readyz` is 200). `READY=1` was sent when it began serving: readiness is `/readyz`'s
/// business, so the unit's start does not wait for the database or migrations, and its start timeout never cuts a
/// migration short.
async fn notify_when_ready(state: AppState) {
    systemd::notify("STATUS=serving; waiting for the database, migrations and first boot");
    loop {
        if state.readiness().await.agent_ready() {
            tracing::info!("ready");
            systemd::notify("STATUS=ready");
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// What to log: the socket actually listened on.
    fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_default(),
        }
    }
}

async fn listen(config: &Config) -> anyhow::Result<Listener> {
    if let Some(inherited) = systemd::take_listener() {
        tracing::info!("using the socket passed by systemd");
        return Ok(match inherited {
            systemd::Inherited::Tcp(l) => {
                l.set_nonblocking(true)?;
                Listener::Tcp(TcpListener::from_std(l)?)
            }
            systemd::Inherited::Unix(l) => {
                l.set_nonblocking(true)?;
                Listener::Unix(UnixListener::from_std(l)?)
            }
        });
    }
    match &config.listen {
        Listen::Tcp(addr) => Ok(Listener::Tcp(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        )),
        Listen::Unix(path) => {
            // A socket file left by an earlier run would make bind fail; it is ours to replace.
            if std::fs::symlink_metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt as _;
                m.file_type().is_socket()
            }) {
                std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
            }
            let listener =
                UnixListener::bind(path).with_context(|| format!("cannot listen on unix:{}", path.display()))?;
            Ok(Listener::Unix(listener))
        }
    }
}

/// `foobar-agent serve`.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let migrator = migrate::load(config.migrations.as_deref()).await?;
    // The site's own app runs in a unit of its own (`foobar-agent app`); the agent reads its supervisor's reports.
    let app = config.app.clone().map(App::reported);
    let state = AppState::with_app(
        db::pool(&config)?,
        config.first_boot_marker.clone(),
        app.clone(),
        config.read_cache(),
    );
    let _ = state.disk.set(crate::state::DiskGuard {
        path: config.data_dir.clone(),
        min_free: config.min_free_mib.saturating_mul(1 << 20),
    });
    if let Some(path) = &config.acme_status {
        let _ = state.acme_status.set(path.clone());
    }
    let inherited = std::env::var_os("LISTEN_FDS").is_some();
    let listener = listen(&config).await?;
    tracing::info!(listen = %listener.describe(), version = crate::VERSION, "foobar-agent serving");

    // Serving (health answers; /readyz says whether it is ready): the start is done.
    systemd::notify("READY=1");

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut migration = tokio::spawn({
        let (state, stop) = (state.clone(), stop_rx.clone());
        let lock_timeout = config.migrate_lock_timeout();
        async move {
            let pool = state.pool.clone();
            migrate_in_background(&pool, &migrator, lock_timeout, stop, |status| {
                state.set_migration_status(status)
            })
            .await;
        }
    });
    tokio::spawn(notify_when_ready(state.clone()));
    if let Some(interval) = systemd::watchdog_interval() {
        tokio::spawn(async move {
            loop {
                systemd::notify("WATCHDOG=1");
                tokio::time::sleep(interval).await;
            }
        });
    }

    let app = crate::app(state.clone());
    let drain = config.drain();
    let draining = state.clone();
    let graceful = async move {
        shutdown_signal().await;
        if !drain.is_zero() {
            tracing::info!(
                ?drain,
                "stopping: draining (/readyz answers 503, everything else is served)"
            );
            systemd::notify("STATUS=draining");
            draining.draining.store(true, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(drain).await;
        }
        tracing::info!("stopping: no new connections, finishing in-flight requests");
        systemd::notify("STOPPING=1");
        let _ = stop_tx.send(true);
    };
    let server = async {
        match listener {
            Listener::Tcp(l) => axum::serve(l, app).with_graceful_shutdown(graceful).await,
            Listener::Unix(l) => axum::serve(l, app).with_graceful_shutdown(graceful).await,
        }
    };
    let deadline = async {
        let _ = stop_rx.wait_for(|stopped| *stopped).await;
        tokio::time::sleep(config.shutdown_timeout()).await;
    };
    tokio::select! {
        result = server => result.context("server failed")?,
        _ = deadline => tracing::warn!(timeout = ?config.shutdown_timeout(), "in-flight requests cut off at the shutdown timeout"),
    }
    // A migration in progress may finish (bounded by the shutdown time: cut, it would be left half-applied, which
    // the next start reports by name); one only waiting for the database has already given up.
    if tokio::time::timeout(config.shutdown_timeout(), &mut migration)
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?config.shutdown_timeout(), "a migration was still running at the shutdown timeout: cut off");
        migration.abort();
    }
    state.pool.close().await;
    // A socket we bound ourselves is ours to remove; systemd's stays for the next start.
    if let (Listen::Unix(path), false) = (&config.listen, inherited) {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped");
    Ok(())
}

/// `foobar-agent migrate`: apply pending migrations once and report the version, or fail with the reason.
pub async fn migrate_once(config: Config) -> anyhow::Result<migrate::Applied> {
    let migrator = migrate::load(config.migrations.as_deref()).await?;
    let pool = db::pool(&config)?;
    let applied = migrate::apply(&pool, &migrator, config.migrate_lock_timeout()).await?;
    pool.close().await;
    Ok(applied)
}
