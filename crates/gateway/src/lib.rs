//! The runcast gateway: terminates WebSocket and SSE clients, fans each run's
//! events out to the clients that watch it, and serves the HTTP API and the
//! watch page.
//!
//! It sits between the bus and the clients (worker → bus → **gateway** →
//! client) and holds no state of its own that matters: history, sequence
//! numbers and run state live in the bus, so any gateway can serve any client
//! and a client that reconnects anywhere resumes from its cursor.
//!
//! Layers, bottom up: [`hub`] (one bus watch per run with local interest,
//! each event serialized once and offered to every subscriber's bounded
//! queue), `session` (per-connection cursors, replay and catch-up, generic
//! over the transport), `ws` / `sse` (transports), `http` (routes), and
//! [`server::run`] (accept loop and graceful shutdown).

pub mod admin;
pub mod auth;
mod config;
mod http;
pub mod hub;
pub mod limits;
mod metrics;
pub mod publish_keys;
mod replay;
pub mod server;
mod session;
mod sse;
mod ws;

pub use config::Config;
pub use metrics::Metrics;
pub use server::{Gateway, run};
