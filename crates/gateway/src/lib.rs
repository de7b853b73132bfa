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
pub mod tls;
mod ws;

pub use config::Config;
pub use metrics::Metrics;
pub use server::{Gateway, run};

/// Entry points for the fuzz targets in `fuzz/`: the parsers that network
/// input reaches and that are private to this crate. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    use runcast_core::ProtocolError;

    /// A publish request body, as `POST /v1/runs/<run>/events` parses it:
    /// the number of events, or the error the client gets.
    pub fn publish_body(body: &[u8], traceparent: Option<&str>) -> Result<usize, ProtocolError> {
        crate::http::parse_publish(body, 1000, traceparent).map(|v| v.len())
    }

    /// A request's query string, as the read and SSE routes parse `since`/`limit`.
    pub fn query(q: &str) {
        let _ = crate::http::query_u64(q, "since");
        let _ = crate::http::query_limit(q);
    }
}
