//! runcast on NATS JetStream: the **NATS** hop of the data flow (worker →
//! NATS → gateway), with one piece for each side of it.
//!
//! - [`NatsConfig`] and [`connect`]: servers, credentials and TLS, the same
//!   for every role;
//! - [`ensure_stream`]: creates the `RUNCAST_EVENTS` stream that keeps every
//!   run's recent history on `<prefix>.runs.<run>.<kind>`, or verifies an
//!   existing one and refuses, with a clear error, one it cannot use;
//! - publishing side, [`NatsTarget`]: a [`runcast_bus::PublishTarget`] (the
//!   worker SDK's publish port) that publishes with JetStream
//!   acknowledgements, bounded retries and a `Nats-Msg-Id` per event, so a
//!   retried publish is stored once. [`NatsTarget::connect`] is all a
//!   worker runs: it only publishes;
//! - gateway side, [`NatsBus`]: the [`runcast_bus::Bus`] the gateways share,
//!   with history read from the stream, live watches through one consumer
//!   per gateway, and run state folded into the `RUNCAST_RUNS` KV bucket
//!   ([`ensure_bucket`]).
//!
//! The payload on the wire is the event's JSON `data`, verbatim, so any NATS
//! client in any language can publish (`nats pub runcast.runs.r1.progress
//! '{"done":1}'`). The `seq` a run's events get is the stream sequence,
//! shared by all runs: it strictly increases per run and means the same on
//! every gateway, but skips the numbers other runs took.

mod bus;
mod config;
mod error;
mod message;
mod publish;
mod state;
mod stream;
mod watch;

/// The NATS client runcast uses, for callers that need more of it.
pub use async_nats;
pub use bus::NatsBus;
pub use config::{NatsConfig, connect};
pub use error::NatsError;
pub use publish::NatsTarget;
pub use state::ensure_bucket;
pub use stream::{StreamSettings, ensure_stream};
