//! Applying the SQL migrations in `sql/`: exactly once, under a lock of our own, and never "repairing" a failure.
//!
//! sqlx's own migration lock is `GET_LOCK(name, -1)`, which MariaDB rejects (a negative timeout returns NULL and takes
//! no lock), so we turn it off and hold `GET_LOCK` with a positive timeout on the connection that runs the migrations.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::{MySqlPool, Row as _};

/// The migrations in `sql/`, embedded at compile time.
pub static EMBEDDED: Migrator = sqlx::migrate!("../sql");

const LOCK_NAME: &str = "foobar_migrate";

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The database could not be reached; trying again later may succeed.
    #[error("database unreachable: {0}")]
    Unreachable(String),
    #[error("timed out after {0} s waiting for the migration lock held by another agent")]
    LockTimeout(u64),
    /// A migration failed or no longer matches what was applied; a person must look at the database.
    #[error("{0}")]
    Failed(String),
}

impl MigrationError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, MigrationError::Unreachable(_) | MigrationError::LockTimeout(_))
    }
}

/// Loads migrations from a directory instead of the embedded set (for sites that ship their own).
pub async fn load(dir: Option<&Path>) -> anyhow::Result<Migrator> {
    let mut migrator = match dir {
        Some(dir) => Migrator::new(dir)
            .await
            .with_context(|| format!("cannot read migrations from {}", dir.display()))?,
        None => Migrator {
            migrations: EMBEDDED.migrations.clone(),
            ..Migrator::DEFAULT
        },
    };
    migrator.set_locking(false);
    // Migrations a newer build applied (a rollout runs old and new builds side by side; expand/contract keeps the
    // schema good for both): this build keeps serving and says so in /healthz (`Applied::unknown`).
    migrator.set_ignore_missing(true);
    Ok(migrator)
}

/// What one `apply` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The schema version now (0 when there are no migrations).
    pub version: i64,
    /// How many migrations this call applied (0 when the schema was already current).
    pub newly_applied: i64,
    /// Applied migrations this build does not know (a newer build applied them), by version.
    pub unknown: Vec<i64>,
}

/// Applies every pending migration.
pub async fn apply(pool: &MySqlPool, migrator: &Migrator, lock_timeout: Duration) -> Result<Applied, MigrationError> {
    // A connection of its own (detached: closed after, never handed to a request) without the requests' time limit:
    // the lock wait and a long migration may take longer than any query of a request.
    let mut own = pool.acquire().await.map_err(unreachable)?.detach();
    let conn: &mut sqlx::MySqlConnection = &mut own;
    sqlx::query("SET SESSION max_statement_time = 0")
        .execute(&mut *conn)
        .await
        .map_err(unreachable)?;
    let secs = lock_timeout.as_secs().max(1);
    let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
        .bind(LOCK_NAME)
        .bind(secs as i64)
        .fetch_one(&mut *conn)
        .await
        .map_err(unreachable)?;
    if locked != Some(1) {
        return Err(MigrationError::LockTimeout(secs));
    }
    let before = applied_count(conn).await?;
    let result = migrator.run_direct(&mut *conn).await;
    // The lock is released even when the migration failed; a dropped connection releases it too.
    let _ = sqlx::query("SELECT RELEASE_LOCK(?)")
        .bind(LOCK_NAME)
        .execute(&mut *conn)
        .await;
    result.map_err(|err| describe(migrator, err))?;
    let row = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut *conn)
        .await
        .map_err(unreachable)?;
    let version = row.try_get::<i64, _>("v").unwrap_or(0);
    let after = applied_count(conn).await?;
    let recorded: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(&mut *conn)
        .await
        .map_err(unreachable)?;
    let unknown = recorded
        .into_iter()
        .filter(|v| !migrator.iter().any(|m| m.version == *v))
        .collect();
    Ok(Applied {
        version,
        newly_applied: after - before,
        unknown,
    })
}

/// Successful migrations recorded so far; 0 before the bookkeeping table exists.
async fn applied_count(conn: &mut sqlx::MySqlConnection) -> Result<i64, MigrationError> {
    let exists: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.tables \
         WHERE table_schema = DATABASE() AND table_name = '_sqlx_migrations'",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(unreachable)?;
    if exists == 0 {
        return Ok(0);
    }
    sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(conn)
        .await
        .map_err(unreachable)
}

fn unreachable(err: sqlx::Error) -> MigrationError {
    MigrationError::Unreachable(err.to_string())
}

fn is_connection_error(err: &sqlx::Error) -> bool {
    matches!(
        err,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_)
    )
}

/// Turns sqlx's error into one that names the migration by its file name.
fn describe(migrator: &Migrator, err: MigrateError) -> MigrationError {
    let name = |version: i64| {
        migrator
            .iter()
            .find(|m| m.version == version)
            .map(|m| format!("{:04}_{}", m.version, m.description.replace(' ', "_")))
            .unwrap_or_else(|| format!("version {version}"))
    };
    match err {
        MigrateError::Execute(e) if is_connection_error(&e) => unreachable(e),
        MigrateError::ExecuteMigration(e, _) if is_connection_error(&e) => unreachable(e),
        MigrateError::ExecuteMigration(e, v) => MigrationError::Failed(format!(
            "migration {} failed: {e}; MariaDB cannot roll back DDL, so check the schema by hand, then delete its row \
             from _sqlx_migrations",
            name(v)
        )),
        MigrateError::Dirty(v) => MigrationError::Failed(format!(
            "migration {} was left partly applied by an earlier failure; check the schema by hand, then delete its \
             row from _sqlx_migrations",
            name(v)
        )),
        MigrateError::VersionMismatch(v) => MigrationError::Failed(format!(
            "migration {} was changed after it was applied (checksum mismatch); restore the original file",
            name(v)
        )),
        MigrateError::VersionMissing(v) => MigrationError::Failed(format!(
            "the database has migration {v} applied, which this agent does not know; run a newer agent"
        )),
        other => MigrationError::Failed(format!("migration failed: {other}")),
    }
}
