//! foobar-agent: the application server of the foobar image. It runs the posts app (or, in a unit of its own, supervises the site's own app server), applies the SQL migrations,
//! reports health, and talks to systemd. `app` is the whole HTTP surface, so tests drive it without a socket.

pub mod acme;
pub mod app;
pub mod backup;
pub mod cache;
pub mod config;
pub mod db;
pub mod http;
pub mod metadata;
pub mod metrics;
pub mod serve;
pub mod state;
pub mod supervisor;
pub mod systemd;

pub use http::app;
pub use state::AppState;
