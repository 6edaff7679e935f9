#![allow(clippy::disallowed_methods)] // tests run real programs directly

//! The one integration test binary: black-box tests of the agent, the builder and the image.
//!
//! Fast tiers always run. The QEMU tier's tests are `#[ignore]`d (a plain `cargo test` lists them as ignored) and run
//! with `--include-ignored`, which `just test` passes when `FOOBAR_E2E=1` (CI sets it); see `e2e.rs`.

mod agent_app;
mod agent_http;
mod agent_process;
mod backup;
mod builder;
mod cluster_node;
mod cluster_tier;
mod docs;
mod e2e;
mod formats;
mod instance;
mod read_cache;
mod smoke;
mod support;
