//! The router: every route, the body limit, request spans and the metrics middleware.

pub mod error;
pub mod health;
pub mod posts;

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

use crate::state::AppState;
use error::ApiError;

/// Largest request body accepted, in bytes; larger ones get 413.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Builds the application. Tests call this directly with `oneshot`; `serve` puts it on a socket.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/livez", get(health::livez))
        .route("/readyz", get(health::readyz))
        .route("/healthz", get(health::healthz))
        .route("/metrics", get(health::metrics))
        .route("/api/posts", get(posts::list_posts).post(posts::create_post))
        .route("/api/posts/{id}", get(posts::get_post))
        .route("/posts", get(posts::page).post(posts::submit))
        .fallback(|| async { ApiError::NotFound("no such path".to_string()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), record_metrics))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(
                    |req: &Request| tracing::debug_span!("request", method = %req.method(), path = %req.uri().path()),
                )
                // A 503 from /readyz while booting is not an error; real failures are logged where they happen.
                .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
        )
        .with_state(state)
}

async fn record_metrics(State(state): State<AppState>, req: Request, next: Next) -> Response {
    // The matched route is shared (an `Arc<str>` inside): cloning it allocates nothing.
    let route = req.extensions().get::<MatchedPath>().cloned();
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let start = Instant::now();
    let response = next.run(req).await;
    let elapsed = start.elapsed();
    state.metrics.record(route, response.status().as_u16(), elapsed);
    // (A 503 from /readyz is its answer while not ready, not a failure.)
    if response.status().is_server_error() && route != "/readyz" {
        // Request spans are at debug level (they cost a formatted string per request); a failure names its route.
        tracing::warn!(
            route,
            status = response.status().as_u16(),
            "answered with a server error"
        );
    }
    tracing::debug!(
        status = response.status().as_u16(),
        latency_us = elapsed.as_micros() as u64,
        "answered"
    );
    response
}
