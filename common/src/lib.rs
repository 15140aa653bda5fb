//! Pieces that every nodekeeper binary shares. Nothing here knows about a particular service:
//! the agent, event center, detector and remediator depend on this crate and on the wire contract,
//! never on each other.

pub mod backoff;
pub mod config;
pub mod errors;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod names;
pub mod observation;
pub mod service;
pub mod shutdown;
pub mod systemd;
pub mod time;
pub mod tls;

/// Version of every nodekeeper binary, reported in hellos and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
