//! foobar-agent: the application server of the foobar image. It runs the posts app, applies the SQL migrations,
//! reports health, and talks to systemd. `app` is the whole HTTP surface, so tests drive it without a socket.

pub mod config;
pub mod http;
pub mod metrics;
pub mod migrate;
pub mod serve;
pub mod state;
pub mod systemd;

pub use http::app;
pub use state::AppState;
