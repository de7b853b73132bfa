//! Domain types shared by every runcast component: validated run IDs, event
//! kinds, stored events, run state, NATS subject names, the client protocol's
//! frames and its stable error and close codes.
//!
//! This crate sits under everything else in the data flow (worker → bus →
//! gateway → client) and does no I/O, so every rule about what a valid run ID
//! or frame is lives in exactly one place.

pub mod admin;
mod error;
mod event;
pub mod frame;
mod run_id;
mod state;
pub mod subject;

pub use error::{CloseCode, ErrorCode, ProtocolError};
pub use event::{
    DataTooDeep, Event, EventKind, MAX_DATA_DEPTH, MAX_EVENT_ID, NewEvent, ParseKindError,
    check_depth, data_from_payload, json_depth, now_micros, now_millis, valid_event_id,
};
pub use run_id::{ParseRunIdError, RunId};
pub use state::{RunState, RunStatus};

/// Protocol version spoken on `/v1/ws` and `/v1/runs/<run>/stream`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Buckets (seconds) for every latency histogram runcast exports, on any
/// role: 100 µs to 10 s, 1-2.5-5 per decade, so dashboards can compare hops.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
