//! Operations endpoints: `/livez`, `/readyz`, `/healthz` (health+json) and `/metrics` (Prometheus text).
//!
//! `/readyz` and `/healthz` answer in full (what is wrong, the app's last output) only on the machine: a request
//! nginx forwarded gets the full answer when nginx vouches for it (`X-Foobar-Health-Detail: 1`, which nginx sets for
//! loopback clients and overwrites from anyone else); every other proxied request gets statuses and the version
//! alone. A request that reached the agent directly (its unix socket, or `--listen` in development; no
//! `X-Forwarded-For`) is on the machine. Both answers come from a readiness result at most `HEALTH_TTL` old.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::metrics::Gauges;
use crate::state::{AppState, MigrationStatus};

/// 200 as long as the process can answer at all.
pub async fn livez() -> Json<Value> {
    Json(json!({ "status": "pass" }))
}

/// Whether this request may see the full health documents (see the module's comment).
pub fn detailed(headers: &HeaderMap) -> bool {
    match headers.get("x-foobar-health-detail") {
        Some(value) => value == "1",
        None => !headers.contains_key("x-forwarded-for"),
    }
}

/// 200 only when the database answers, migrations are applied and first boot is complete.
pub async fn readyz(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if state.is_draining() {
        // Stopping: still serving, but no longer to be sent new work (a load balancer takes the node out).
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "draining" }))).into_response();
    }
    let r = state.readiness_cached().await;
    let problems: Vec<String> = [
        r.database.clone().err(),
        r.migrations.clone().err(),
        r.first_boot.clone().err(),
        r.app.clone().and_then(Result::err),
    ]
    .into_iter()
    .flatten()
    .collect();
    if problems.is_empty() {
        (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response()
    } else if !detailed(&headers) {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "not ready" }))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "problems": problems })),
        )
            .into_response()
    }
}

fn check(result: &Result<(), String>, observed: Option<Value>) -> Value {
    let mut check = match result {
        Ok(()) => json!({ "status": "pass" }),
        Err(output) => json!({ "status": "fail", "output": output }),
    };
    if let Some(value) = observed {
        check["observedValue"] = value;
    }
    json!([check])
}

/// The health document (draft-inadarei-api-health-check): overall status, version and one check per component.
pub async fn healthz(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let r = state.readiness_cached().await;
    let ready = r.is_ready();
    let version = r.migrations.as_ref().ok().copied();
    let (newly_applied, unknown) = match state.migration_status() {
        MigrationStatus::Applied {
            newly_applied, unknown, ..
        } => (Some(newly_applied), unknown),
        _ => (None, Vec::new()),
    };
    let mut body = json!({
        "status": if ready { "pass" } else { "fail" },
        "version": crate::VERSION,
        "serviceId": "foobar-agent",
        "checks": {
            "database:connection": check(&r.database, None),
            "migrations:version": check(&r.migrations.clone().map(|_| ()), version.map(Value::from)),
            "first-boot:marker": check(&r.first_boot, None),
        },
    });
    if let (Some(app), Some(result)) = (&state.app, &r.app) {
        // The site's own app server: whether it answers, how often it was restarted, how its last run ended and
        // what it printed last (an app that dies at start says why here).
        let status = app.status();
        let mut entry = check(result, None);
        entry[0]["componentId"] = json!(app.config.name);
        entry[0]["componentType"] = json!("app");
        entry[0]["pid"] = json!(status.pid);
        entry[0]["restarts"] = json!(status.restarts);
        entry[0]["lastExit"] = json!(status.last_exit);
        entry[0]["lastOutput"] = json!(status.last_output);
        body["checks"]["app:process"] = entry;
    }
    if let Some(status) = state.acme_status.get().and_then(|p| std::fs::read_to_string(p).ok()) {
        // The certificate from the ACME CA: `warn` while none is in place or renewal fails (the site still serves,
        // with the certificate it has); the error and the next attempt on the machine only.
        if let Ok(status) = serde_json::from_str::<crate::acme::Status>(&status) {
            let mut entry = json!({
                "status": if status.state == "issued" { "pass" } else { "warn" },
                "componentType": "certificate",
                "directory": status.directory,
                "names": status.names,
                "time": status.checked_at,
            });
            for (key, value) in [
                ("notAfter", status.not_after.map(Value::from)),
                ("output", status.error.map(Value::from)),
                ("retryIn", status.retry_in.map(Value::from)),
            ] {
                if let Some(value) = value {
                    entry[key] = value;
                }
            }
            body["checks"]["tls:certificate"] = json!([entry]);
        }
    }
    if let Some(n) = newly_applied {
        // How many migrations this start applied: 0 on every boot after the one that brought them.
        body["checks"]["migrations:version"][0]["appliedThisStart"] = json!(n);
    }
    if !unknown.is_empty() {
        // A newer build's migrations (during a rollout): this build serves on, and says so.
        let check = &mut body["checks"]["migrations:version"][0];
        check["status"] = json!("warn");
        check["unknownMigrations"] = json!(unknown);
        check["output"] = json!(format!(
            "the database has migration(s) {} applied, which this build does not know (a newer build applied them); \
             this build serves on, as expand/contract migrations allow",
            unknown.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
        ));
    }
    if !detailed(&headers) {
        // Statuses and the version only: no error text, no app output, no counts.
        if let Some(checks) = body["checks"].as_object_mut() {
            for entries in checks.values_mut() {
                for entry in entries.as_array_mut().into_iter().flatten() {
                    if let Some(fields) = entry.as_object_mut() {
                        fields.retain(|k, _| matches!(k.as_str(), "status" | "componentId" | "componentType"));
                    }
                }
            }
        }
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/health+json")],
        body.to_string(),
    )
        .into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let gauges = Gauges {
        pool_size: state.pool.size(),
        pool_idle: state.pool.num_idle(),
        pool_max: state.pool.options().get_max_connections(),
        migration_version: match state.migration_status() {
            MigrationStatus::Applied { version, .. } => version,
            _ => 0,
        },
        cache_hits: state.cache.hits.load(std::sync::atomic::Ordering::Relaxed),
        cache_misses: state.cache.misses.load(std::sync::atomic::Ordering::Relaxed),
        cache_invalidations: state.cache.invalidations.load(std::sync::atomic::Ordering::Relaxed),
        readiness_checks: state.readiness_checks.load(std::sync::atomic::Ordering::Relaxed),
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(&gauges),
    )
        .into_response()
}
