//! Everything about the database: the URL parsed once, the lazy pool, the readiness ping, the migrations
//! (`migrate`), and what the site's own app is told about its database.

use std::str::FromStr as _;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{ConnectOptions as _, MySqlPool};

use crate::config::Config;

pub mod migrate;

/// The database URL, parsed once by sqlx for the pool and for what the app is told.
pub fn connect_options(config: &Config) -> anyhow::Result<MySqlConnectOptions> {
    MySqlConnectOptions::from_str(&config.database_url)
        .with_context(|| format!("invalid database URL `{}`", config.database_url))
}

/// A pool that connects on first use, so the agent starts (and answers `/livez`) while the database is down.
pub fn pool(config: &Config) -> anyhow::Result<MySqlPool> {
    let options = connect_options(config)?
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1));
    let limit = config.query_timeout;
    Ok(MySqlPoolOptions::new()
        .max_connections(config.pool_size)
        .acquire_timeout(Duration::from_secs(2))
        // Every query of a request is bounded by the server itself (migrations lift it on their own connection).
        .after_connect(move |conn, _| {
            Box::pin(async move {
                sqlx::query(&format!("SET SESSION max_statement_time = {limit}"))
                    .execute(conn)
                    .await
                    .map(|_| ())
            })
        })
        .connect_lazy_with(options))
}

/// MariaDB error numbers that mean "try again shortly", not "this request is wrong": too many connections (1040,
/// 1203), lock wait timeout (1205), deadlock (1213), query interrupted or over `max_statement_time` (1317, 1969),
/// connection killed (1927), a Galera node not ready (1047), the server shutting down (1053).
pub const TRANSIENT: &[u16] = &[1040, 1047, 1053, 1203, 1205, 1213, 1317, 1927, 1969];

/// Whether an error is one a client may retry after a pause.
pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .is_some_and(|e| TRANSIENT.contains(&e.number())),
        _ => false,
    }
}

/// Whether the connection was lost or closed under the statement (not a refusal by a server that answered): the
/// proxy took its node out (a planned stop: its open connections are closed), the node stopped or was killed
/// (1927, 1053). The statement's transaction was not committed unless it was a COMMIT.
pub fn connection_lost(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .is_some_and(|e| matches!(e.number(), 1053 | 1927)),
        _ => false,
    }
}

/// Whether a failed COMMIT is known to have rolled back: a deadlock (Galera's certification failure is reported as
/// one) or a node that is not ready (1047).
fn rolled_back(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .is_some_and(|e| matches!(e.number(), 1047 | 1213)),
        _ => false,
    }
}

/// The pauses before each further attempt of a statement that certainly did not run or commit: the pool opens a new
/// connection, which the proxy sends to a node still in. Two more attempts, so that a second cut in a row (the node
/// the first retry reached was being taken out as well) still fails no request; about 0.6 s at most.
const RETRY_PAUSES: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(500)];

/// How long after a COMMIT whose answer was lost before its outcome is looked up: the server goes on committing
/// after its client is gone, and a Galera node replicates and applies within milliseconds.
pub const SETTLE: Duration = Duration::from_secs(1);

/// A read, again on a new connection when its connection was lost under it (reads change nothing).
pub async fn read<T, F, Fut>(mut run: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut pauses = RETRY_PAUSES.iter();
    loop {
        match run().await {
            Err(err) if connection_lost(&err) => match pauses.next() {
                Some(pause) => {
                    tracing::info!(error = %err, "connection lost under a read; again on a new connection");
                    tokio::time::sleep(*pause).await;
                }
                None => return Err(err),
            },
            other => return other,
        }
    }
}

/// One statement (its `?` bound to `args`, in order) in a transaction of its own.
///
/// It runs again (at most twice more) when it certainly did not commit: its connection was lost before the COMMIT was
/// sent (the server rolls an open transaction back when its client goes), or the statement or the COMMIT was refused
/// with a rollback (a deadlock, which is how Galera reports a certification failure; a node not ready).
///
/// A connection lost during the COMMIT itself leaves the outcome unknown: it is never run again. After `SETTLE`,
/// `committed` is asked, on a new connection, whether the statement's effect is there (given the statement's result,
/// whose `last_insert_id` the server assigned before the COMMIT); if it is, the write succeeded, otherwise the COMMIT's
/// error is returned.
pub async fn write<C, Fut>(
    pool: &MySqlPool,
    sql: &str,
    args: &[&str],
    committed: C,
) -> Result<sqlx::mysql::MySqlQueryResult, sqlx::Error>
where
    C: FnOnce(u64) -> Fut,
    Fut: std::future::Future<Output = Result<bool, sqlx::Error>>,
{
    let mut pauses = RETRY_PAUSES.iter();
    loop {
        let err = match attempt(pool, sql, args).await {
            Attempt::Committed(done) => return Ok(done),
            Attempt::Failed(err) => err,
            Attempt::Unknown(done, err) => {
                tracing::warn!(error = %err, "the connection was lost during a COMMIT; looking up its outcome");
                tokio::time::sleep(SETTLE).await;
                return match committed(done.last_insert_id()).await {
                    Ok(true) => {
                        tracing::info!("the COMMIT whose answer was lost had committed");
                        Ok(done)
                    }
                    Ok(false) => Err(err),
                    Err(lookup) => {
                        tracing::warn!(error = %lookup, "the outcome of a COMMIT could not be looked up");
                        Err(err)
                    }
                };
            }
        };
        match pauses.next() {
            Some(pause) if connection_lost(&err) || rolled_back(&err) => {
                tracing::info!(error = %err, "a write did not commit; again on a new connection");
                tokio::time::sleep(*pause).await;
            }
            _ => return Err(err),
        }
    }
}

/// What became of one attempt of a write.
enum Attempt {
    Committed(sqlx::mysql::MySqlQueryResult),
    /// Certainly not committed.
    Failed(sqlx::Error),
    /// The statement ran, and the COMMIT was sent but not answered.
    Unknown(sqlx::mysql::MySqlQueryResult, sqlx::Error),
}

async fn attempt(pool: &MySqlPool, sql: &str, args: &[&str]) -> Attempt {
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(err) => return Attempt::Failed(err),
    };
    let mut query = sqlx::query(sql);
    for arg in args {
        query = query.bind(*arg);
    }
    let done = match query.execute(&mut *tx).await {
        Ok(done) => done,
        Err(err) => return Attempt::Failed(err),
    };
    match tx.commit().await {
        Ok(()) => Attempt::Committed(done),
        Err(err) if connection_lost(&err) => Attempt::Unknown(done, err),
        // A refusal by a server that answered: rolled back.
        Err(err) => Attempt::Failed(err),
    }
}

/// Whether the database answers a trivial query within 2 s; the error says what is wrong, without SQL.
pub async fn ping(pool: &MySqlPool) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(2), sqlx::query("SELECT 1").execute(pool)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(format!("database unreachable: {}", summary(&err))),
        Err(_) => Err("database did not answer within 2 s".to_string()),
    }
}

/// A short description of a database error for logs and health checks: the kind, not the query.
pub fn summary(err: &sqlx::Error) -> String {
    match err {
        sqlx::Error::Io(io) => io.to_string(),
        sqlx::Error::PoolTimedOut => "no connection available (timed out)".to_string(),
        sqlx::Error::Database(db) => db.message().to_string(),
        other => other.to_string(),
    }
}

/// What the app is told about its database.
#[derive(Debug, Clone)]
pub struct DatabaseEnv {
    pub url: String,
    pub socket: String,
    pub name: String,
    pub user: String,
}

impl DatabaseEnv {
    /// Takes the parts from the agent's own database URL, as sqlx parsed it.
    pub fn from_options(url: &str, options: &MySqlConnectOptions) -> DatabaseEnv {
        DatabaseEnv {
            url: url.to_string(),
            socket: options
                .get_socket()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            name: options.get_database().unwrap_or_default().to_string(),
            user: options.get_username().to_string(),
        }
    }
}
