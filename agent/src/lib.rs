//! foobar-agent: the application server of the foobar image. It runs the posts app (or, in a unit of its own, supervises the site's own app server), applies the SQL migrations,
//! reports health, and talks to systemd. `app` is the whole HTTP surface, so tests drive it without a socket.

/// This build: the package version and the source commit (`0.1.0+1a2b3c4d5e6f`), as `/healthz` reports it.
pub const VERSION: &str = env!("FOOBAR_BUILD_VERSION");

pub mod acme;
pub mod app;
pub mod backup;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod db;
pub mod galera;
pub mod http;
pub mod metadata;
pub mod metrics;
pub mod serve;
pub mod state;
pub mod supervisor;
pub mod systemd;

pub use http::app;
pub use state::AppState;
