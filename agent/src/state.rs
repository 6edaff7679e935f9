//! What the request handlers share: the pool, the migration status, the templates and the metrics.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use sqlx::MySqlPool;

use crate::app::App;
use crate::cache::ReadCache;
use crate::metrics::Metrics;

/// Where the schema stands, as the background migration task last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationStatus {
    /// Not applied yet; holds the last transient error, if any (database down, lock held).
    Pending(Option<String>),
    /// `newly_applied`: how many this process applied (0 on a later boot with nothing new); `unknown`: applied
    /// migrations this build does not know (a newer build's, during a rollout), which do not stop it serving.
    Applied {
        version: i64,
        newly_applied: i64,
        unknown: Vec<i64>,
    },
    /// A migration failed or was modified: not retried, never repaired.
    Failed(String),
}

/// How long a readiness result answers `/readyz` and `/healthz`: a flood of health requests costs one database ping
/// and one app check per interval, not one per request. A migration status change starts a new interval.
pub const HEALTH_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// What a readiness result was taken under: the migration status changes and the app's run. When either changes,
/// the result is taken again at once (the agent knows of these itself; the database and the marker are outside it,
/// and wait for `HEALTH_TTL`).
type HealthKey = (u64, Option<(Option<u32>, u64)>);

/// The result of one readiness check per component; `Err` holds what is wrong.
#[derive(Debug, Clone)]
pub struct Readiness {
    pub database: Result<(), String>,
    pub migrations: Result<i64, String>,
    pub first_boot: Result<(), String>,
    /// The site's own app server, when there is one.
    pub app: Option<Result<(), String>>,
}

impl Readiness {
    /// The agent's own parts: what systemd is told with `READY=1`. A failing app server does not hold the unit in
    /// "activating" (where systemd would time out and restart the agent, and its backoff, every 90 s); it shows in
    /// `/readyz` and `/healthz`.
    pub fn agent_ready(&self) -> bool {
        self.database.is_ok() && self.migrations.is_ok() && self.first_boot.is_ok()
    }

    pub fn is_ready(&self) -> bool {
        self.database.is_ok()
            && self.migrations.is_ok()
            && self.first_boot.is_ok()
            && self.app.as_ref().is_none_or(Result::is_ok)
    }
}

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub pool: MySqlPool,
    pub migrations: RwLock<MigrationStatus>,
    pub first_boot_marker: Option<PathBuf>,
    pub metrics: Metrics,
    pub templates: tera::Tera,
    /// The site's own app server, which the agent supervises; `None` for the built-in app alone.
    pub app: Option<App>,
    /// Answers of the posts reads, kept until a write here or their time to live (`cache.rs`).
    pub cache: ReadCache,
    /// The last readiness result and when it was taken (`HEALTH_TTL`); the lock makes concurrent askers share one
    /// check.
    health: tokio::sync::Mutex<Option<(tokio::time::Instant, HealthKey, Arc<Readiness>)>>,
    /// Bumped by every migration status change: a result taken before it is not used after.
    health_generation: std::sync::atomic::AtomicU64,
    /// How many readiness checks ran (`/metrics`).
    pub readiness_checks: std::sync::atomic::AtomicU64,
    /// Where writes check for free space, set once at start (`serve`); unset: never refused for space.
    pub disk: std::sync::OnceLock<DiskGuard>,
    /// `foobar-agent acme`'s status file, set once at start (`serve`); unset: no certificate check in `/healthz`.
    pub acme_status: std::sync::OnceLock<PathBuf>,
    /// Set by SIGTERM when a drain is configured: `/readyz` answers 503 until the agent stops.
    pub draining: std::sync::atomic::AtomicBool,
}

/// The free-space floor below which writes are refused, so that reads keep working and MariaDB never meets a full
/// disk mid-write.
#[derive(Debug, Clone)]
pub struct DiskGuard {
    pub path: PathBuf,
    pub min_free: u64,
}

impl DiskGuard {
    /// Bytes free for unprivileged writers on `path`'s file system; `None` when it cannot be told (no such path).
    pub fn free(&self) -> Option<u64> {
        let c = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: a valid NUL-terminated path and a zeroed out-struct of the right type.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut stat) } != 0 {
            return None;
        }
        Some(stat.f_bavail as u64 * stat.f_frsize as u64)
    }

    /// `Err(free bytes)` when below the floor.
    pub fn check(&self) -> Result<(), u64> {
        match self.free() {
            Some(free) if free < self.min_free => Err(free),
            _ => Ok(()),
        }
    }
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The page templates, compiled into the binary from `image/templates/`.
fn templates() -> tera::Tera {
    let mut tera = tera::Tera::default();
    // A `.html` name turns on tera's autoescaping.
    tera.add_raw_template("posts.html", include_str!("../../image/templates/posts.html"))
        .expect("the built-in posts.html template parses");
    tera
}

impl AppState {
    /// The built-in app with the default read cache (`read-cache-ms`).
    pub fn new(pool: MySqlPool, first_boot_marker: Option<PathBuf>) -> AppState {
        Self::with_app(
            pool,
            first_boot_marker,
            None,
            crate::config::Config::default().read_cache(),
        )
    }

    pub fn with_app(
        pool: MySqlPool,
        first_boot_marker: Option<PathBuf>,
        app: Option<App>,
        read_cache: std::time::Duration,
    ) -> AppState {
        AppState(Arc::new(Inner {
            pool,
            migrations: RwLock::new(MigrationStatus::Pending(None)),
            first_boot_marker,
            metrics: Metrics::default(),
            templates: templates(),
            app,
            cache: ReadCache::new(read_cache),
            health: tokio::sync::Mutex::new(None),
            health_generation: std::sync::atomic::AtomicU64::new(0),
            readiness_checks: std::sync::atomic::AtomicU64::new(0),
            disk: std::sync::OnceLock::new(),
            acme_status: std::sync::OnceLock::new(),
            draining: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn migration_status(&self) -> MigrationStatus {
        self.migrations.read().expect("migration status lock").clone()
    }

    pub fn set_migration_status(&self, status: MigrationStatus) {
        *self.migrations.write().expect("migration status lock") = status;
        self.health_generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// `readiness()`, taken at most once per `HEALTH_TTL` however many ask (the health endpoints).
    pub async fn readiness_cached(&self) -> Arc<Readiness> {
        use std::sync::atomic::Ordering;
        let mut cached = self.health.lock().await;
        let generation = (
            self.health_generation.load(Ordering::SeqCst),
            self.app.as_ref().map(App::run),
        );
        if let Some((at, taken, readiness)) = cached.as_ref() {
            if *taken == generation && at.elapsed() < HEALTH_TTL {
                return Arc::clone(readiness);
            }
        }
        let readiness = Arc::new(self.readiness().await);
        *cached = Some((tokio::time::Instant::now(), generation, Arc::clone(&readiness)));
        readiness
    }

    /// Checks every component that `/readyz` depends on, the database live.
    pub async fn readiness(&self) -> Readiness {
        self.readiness_checks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let database = crate::db::ping(&self.pool).await;
        let migrations = match self.migration_status() {
            MigrationStatus::Applied { version, .. } => Ok(version),
            MigrationStatus::Pending(None) => Err("migrations not applied yet".to_string()),
            MigrationStatus::Pending(Some(err)) => Err(format!("migrations not applied yet: {err}")),
            MigrationStatus::Failed(err) => Err(err),
        };
        let first_boot = match &self.first_boot_marker {
            None => Ok(()),
            Some(marker) if marker.exists() => Ok(()),
            Some(marker) => Err(format!("first boot not complete ({} missing)", marker.display())),
        };
        let app = match &self.app {
            None => None,
            // The app starts only after the migrations; before that, its absence is not news.
            Some(_) if migrations.is_err() => Some(Err("app not started: waiting for migrations".to_string())),
            Some(app) => Some(app.check().await),
        };
        Readiness {
            database,
            migrations,
            first_boot,
            app,
        }
    }
}
