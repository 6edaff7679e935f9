//! `foobar-agent app`: the site's own app server in a unit of its own (`foobar-app.service`, its own user and
//! database user). It applies the app's migrations (or finds them applied by the agent: both take the migration
//! lock), starts the app, restarts it when it dies or hangs, and reports its state every second to `status-file`,
//! where the agent reads it for `/readyz` and `/healthz`. On SIGTERM it stops the app gracefully.

use anyhow::bail;
use tokio::sync::watch;

use crate::app::{App, PROBE_EVERY, REPORT_EVERY, REPORT_SOON};
use crate::config::Config;
use crate::db::{self, migrate, DatabaseEnv};
use crate::serve::{migrate_in_background, shutdown_signal};
use crate::state::MigrationStatus;

/// Runs the `[app]` of `config` until SIGTERM. `database_url` (the command line's) overrides `app.database-url`,
/// which defaults to the agent's `database-url`.
pub async fn run(mut config: Config, database_url: Option<String>) -> anyhow::Result<()> {
    let Some(app_config) = config.app.clone() else {
        bail!("the configuration has no [app] table: there is no app to run (the built-in posts app is `foobar-agent serve`'s)");
    };
    if let Some(url) = database_url.or_else(|| app_config.database_url.clone()) {
        config.database_url = url;
    }
    let migrator = migrate::load(config.migrations.as_deref()).await?;
    let pool = db::pool(&config)?;
    let database = DatabaseEnv::from_options(&config.database_url, &db::connect_options(&config)?);
    let app = App::supervised(app_config);
    tracing::info!(app = %app.config.name, user = %database.user, "supervising the app");

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn({
        let (app, drain) = (app.clone(), config.drain());
        async move {
            shutdown_signal().await;
            // A running app serves on while the agent's /readyz says 503 and load balancers take the node out.
            if !drain.is_zero() && app.status().pid.is_some() {
                tracing::info!(?drain, "stopping: draining (the app serves on; /readyz answers 503)");
                app.set_draining();
                tokio::time::sleep(drain).await;
            }
            tracing::info!("stopping the app");
            let _ = stop_tx.send(true);
        }
    });
    let reporter = tokio::spawn({
        let app = app.clone();
        async move {
            let mut failing = false;
            let mut probed: Option<(tokio::time::Instant, (Option<u32>, u64))> = None;
            loop {
                let status = app.status();
                let run = (status.pid, status.restarts);
                let probe = status.problem.is_some()
                    || probed.is_none_or(|(at, probed_run)| probed_run != run || at.elapsed() >= PROBE_EVERY);
                if probe && status.pid.is_some() {
                    probed = Some((tokio::time::Instant::now(), run));
                }
                match app.report(probe).await {
                    Ok(()) => failing = false,
                    Err(err) if !failing => {
                        tracing::warn!(path = %app.config.status_file.display(), error = %err, "cannot write the app's report for the agent");
                        failing = true;
                    }
                    Err(_) => {}
                }
                let status = app.status();
                let starting = status.pid.is_some() && status.problem.is_some();
                app.changed_or(if starting { REPORT_SOON } else { REPORT_EVERY }).await;
            }
        }
    });

    app.set_waiting(Some("waiting for its migrations".to_string()));
    let applied = migrate_in_background(
        &pool,
        &migrator,
        config.migrate_lock_timeout(),
        stop_rx.clone(),
        |status| {
            app.set_waiting(match status {
                MigrationStatus::Applied { .. } => None,
                MigrationStatus::Pending(None) => Some("waiting for its migrations".to_string()),
                MigrationStatus::Pending(Some(err)) => Some(format!("waiting for its migrations: {err}")),
                MigrationStatus::Failed(err) => Some(format!("its migrations failed: {err}")),
            })
        },
    )
    .await;
    pool.close().await;
    let mut stop = stop_rx.clone();
    if applied {
        app.clone()
            .supervise(database, stop_rx, config.shutdown_timeout())
            .await;
    } else {
        // Failed for good (named in the report, so in the agent's /healthz), or stopped while waiting.
        let _ = stop.wait_for(|stopped| *stopped).await;
    }
    reporter.abort();
    let _ = app.report(false).await;
    tracing::info!("stopped");
    Ok(())
}
