//! The publish port: where a publisher's events go.
//!
//! [`PublishTarget`] is what the worker SDK's `Publisher` writes to and what
//! each way into the bus implements: [`BusTarget`] (a bus in the same
//! process), the SDK's `HttpTarget` (a gateway's HTTP API) and
//! `runcast_nats::NatsTarget` (JetStream). It lives here, below both the SDK
//! and the NATS adapter, so that neither depends on the other; the SDK
//! re-exports it as `runcast_worker::PublishTarget`.

use std::sync::Arc;

use async_trait::async_trait;
use runcast_core::{NewEvent, ParseKindError, ParseRunIdError, RunId};

use crate::{Bus, BusError};

/// What went wrong with a publish, as a small enum callers can match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishErrorKind {
    /// The run ID or kind is invalid; fix the call.
    InvalidInput,
    /// The server refused the events (bad data, too large, over capacity).
    Rejected,
    /// The bus or gateway could not be reached or failed; retrying may work.
    Unavailable,
    /// TLS to the gateway failed in a way retrying cannot fix: its
    /// certificate is not trusted, or it does not speak TLS. Fix the URL or
    /// the trusted CA (the SDK's `HttpTarget::with_ca_file`).
    Tls,
}

/// A publish failure: a [`PublishErrorKind`] and a message that says what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct PublishError {
    pub kind: PublishErrorKind,
    pub message: String,
}

impl PublishError {
    pub fn new(kind: PublishErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl From<ParseRunIdError> for PublishError {
    fn from(e: ParseRunIdError) -> Self {
        Self::new(PublishErrorKind::InvalidInput, e.to_string())
    }
}

impl From<ParseKindError> for PublishError {
    fn from(e: ParseKindError) -> Self {
        Self::new(PublishErrorKind::InvalidInput, e.to_string())
    }
}

impl From<serde_json::Error> for PublishError {
    fn from(e: serde_json::Error) -> Self {
        Self::new(
            PublishErrorKind::InvalidInput,
            format!("event data does not serialize to JSON: {e}"),
        )
    }
}

impl From<BusError> for PublishError {
    fn from(e: BusError) -> Self {
        let kind = match e {
            BusError::Unavailable(_) => PublishErrorKind::Unavailable,
            BusError::TooManyRuns(_)
            | BusError::Full(_)
            | BusError::EventTooLarge { .. }
            | BusError::NoSpace(_) => PublishErrorKind::Rejected,
        };
        Self::new(kind, e.to_string())
    }
}

/// Where a publisher sends events.
#[async_trait]
pub trait PublishTarget: Send + Sync {
    /// Appends `events` to `run`; returns their seqs.
    async fn publish(&self, run: &RunId, events: Vec<NewEvent>) -> Result<Vec<u64>, PublishError>;
}

/// Publishes straight to a bus in the same process.
pub struct BusTarget(pub Arc<dyn Bus>);

#[async_trait]
impl PublishTarget for BusTarget {
    async fn publish(&self, run: &RunId, events: Vec<NewEvent>) -> Result<Vec<u64>, PublishError> {
        Ok(self.0.publish(run, events).await?)
    }
}
