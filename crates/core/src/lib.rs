//! Domain types shared by every runcast component: validated run IDs, event
//! kinds, stored events, run state, NATS subject names, the client protocol's
//! frames and its stable error and close codes.
//!
//! This crate sits under everything else in the data flow (worker → bus →
//! gateway → client) and does no I/O, so every rule about what a valid run ID
//! or frame is lives in exactly one place.

mod error;
mod event;
pub mod frame;
mod run_id;
mod state;
pub mod subject;

pub use error::{CloseCode, ErrorCode, ProtocolError};
pub use event::{Event, EventKind, NewEvent, ParseKindError, now_micros, now_millis};
pub use run_id::{ParseRunIdError, RunId};
pub use state::{RunState, RunStatus};

/// Protocol version spoken on `/v1/ws` and `/v1/runs/<run>/stream`.
pub const PROTOCOL_VERSION: u32 = 1;
