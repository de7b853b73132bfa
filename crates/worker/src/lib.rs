//! The runcast worker SDK: how a long job reports its progress.
//!
//! A [`Publisher`] is a cheap, cloneable handle for one run. It sends events
//! either straight to a [`Bus`] (in-process, as `runcast up --demo` does) or to
//! a gateway's HTTP publish API ([`Publisher::http`]). Each call returns the
//! seq the event was given, so a worker knows exactly what was accepted.
//!
//! Gateways are named by a [`GatewayUrl`] (`http`, `https`, `ws` or `wss`,
//! with an optional path prefix) and reached through [`tls`], the client TLS
//! that the `runcast` CLI's `tail`, `doctor` and `publish` use too.
//!
//! ```no_run
//! # async fn job() -> Result<(), runcast_worker::PublishError> {
//! use runcast_worker::Publisher;
//!
//! let run = Publisher::http("http://127.0.0.1:8080", "nightly-scan-42")?;
//! run.status("starting").await?;
//! for done in 1..=10u64 {
//!     run.progress(done, 10).await?;
//!     run.log(&format!("scanned shard {done}")).await?;
//! }
//! run.complete(&serde_json::json!({ "findings": 0 })).await?;
//! # Ok(()) }
//! ```

mod http;
mod metrics;
pub mod tls;
mod url;

use std::sync::Arc;

use runcast_bus::Bus;
use runcast_core::{EventKind, NewEvent, RunId};
use serde::Serialize;
use tracing::Instrument;

pub use http::HttpTarget;
pub use metrics::{Metered, PublishMetrics};
/// The publish port, defined in `runcast-bus` (below this SDK and the NATS
/// adapter, so neither depends on the other) and re-exported here, where
/// publishers look for it.
pub use runcast_bus::{BusTarget, PublishError, PublishErrorKind, PublishTarget};
pub use url::{GatewayUrl, UrlError};

/// A handle for publishing one run's events.
#[derive(Clone)]
pub struct Publisher {
    target: Arc<dyn PublishTarget>,
    run: RunId,
}

impl Publisher {
    pub fn new(target: Arc<dyn PublishTarget>, run: &str) -> Result<Self, PublishError> {
        Ok(Self {
            target,
            run: RunId::parse(run)?,
        })
    }

    /// A publisher on an in-process bus.
    pub fn on_bus(bus: Arc<dyn Bus>, run: &str) -> Result<Self, PublishError> {
        Self::new(Arc::new(BusTarget(bus)), run)
    }

    /// A publisher that posts to a gateway at `base_url` (`http://host:port`,
    /// `https://host/prefix`; see [`HttpTarget`]).
    pub fn http(base_url: &str, run: &str) -> Result<Self, PublishError> {
        Self::new(Arc::new(HttpTarget::new(base_url)?), run)
    }

    /// The same target, another run.
    pub fn for_run(&self, run: &str) -> Result<Self, PublishError> {
        Ok(Self {
            target: self.target.clone(),
            run: RunId::parse(run)?,
        })
    }

    pub fn run(&self) -> &RunId {
        &self.run
    }

    /// `progress` with `{"done":done,"total":total}`.
    pub async fn progress(&self, done: u64, total: u64) -> Result<u64, PublishError> {
        self.event(
            EventKind::Progress,
            &serde_json::json!({ "done": done, "total": total }),
        )
        .await
    }

    /// `log` with `{"line":line}`.
    pub async fn log(&self, line: &str) -> Result<u64, PublishError> {
        self.event(EventKind::Log, &serde_json::json!({ "line": line }))
            .await
    }

    /// `status` with `{"state":state}`.
    pub async fn status(&self, state: &str) -> Result<u64, PublishError> {
        self.event(EventKind::Status, &serde_json::json!({ "state": state }))
            .await
    }

    /// `complete` with any summary; ends the run.
    pub async fn complete<T: Serialize + ?Sized>(&self, summary: &T) -> Result<u64, PublishError> {
        self.event(EventKind::Complete, summary).await
    }

    /// `error` with `{"message":message}`; ends the run as failed.
    pub async fn error(&self, message: &str) -> Result<u64, PublishError> {
        self.event(EventKind::Error, &serde_json::json!({ "message": message }))
            .await
    }

    /// An event of a custom kind (`[a-z0-9_-]{1,64}`).
    pub async fn custom<T: Serialize + ?Sized>(
        &self,
        kind: &str,
        data: &T,
    ) -> Result<u64, PublishError> {
        self.event(EventKind::parse(kind)?, data).await
    }

    /// One event of any kind.
    pub async fn event<T: Serialize + ?Sized>(
        &self,
        kind: EventKind,
        data: &T,
    ) -> Result<u64, PublishError> {
        let event = NewEvent::json(kind, data)?;
        // Refused here as the gateway would refuse it, so a NATS target
        // (which stores anything) never gets data clients cannot parse.
        runcast_core::check_depth(&event.data)
            .map_err(|e| PublishError::new(PublishErrorKind::InvalidInput, format!("event {e}")))?;
        let seqs = publish_traced(&*self.target, &self.run, vec![event]).await?;
        seqs.first().copied().ok_or_else(|| {
            PublishError::new(PublishErrorKind::Unavailable, "publish returned no seq")
        })
    }

    /// Several events at once, stored atomically and in order.
    pub async fn batch(&self, events: Vec<NewEvent>) -> Result<Vec<u64>, PublishError> {
        publish_traced(&*self.target, &self.run, events).await
    }
}

/// Publishes `events` through `target` inside a `runcast.publish` span, the
/// root of each event's trace, and stamps every event with that span's W3C
/// `traceparent` so the gateways and clients continue the same trace.
///
/// The span's parent is the first event's own `traceparent` if it has one,
/// otherwise the caller's current span (a job's span, say). Without an
/// OpenTelemetry layer for [`runcast_telemetry::TARGET`] the span is
/// disabled and events go out untouched.
pub async fn publish_traced(
    target: &dyn PublishTarget,
    run: &RunId,
    mut events: Vec<NewEvent>,
) -> Result<Vec<u64>, PublishError> {
    let span = tracing::info_span!(
        target: runcast_telemetry::TARGET,
        "runcast.publish",
        otel.kind = "producer",
        runcast.run = %run,
        runcast.events = events.len(),
        runcast.first_seq = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_message = tracing::field::Empty,
    );
    if span.is_disabled() {
        return target.publish(run, events).await;
    }
    let parent = events.first().and_then(|e| e.traceparent.as_deref());
    if let Some(tp) = runcast_telemetry::continue_trace(&span, parent) {
        for e in &mut events {
            e.traceparent = Some(tp.clone());
        }
    }
    let result = target.publish(run, events).instrument(span.clone()).await;
    match &result {
        Ok(seqs) => {
            span.record("runcast.first_seq", seqs.first().copied().unwrap_or(0));
        }
        Err(e) => {
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_message", e.message.as_str());
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use runcast_bus::{EmbeddedBus, Retention};

    #[tokio::test]
    async fn helpers_publish_in_order_with_expected_data() {
        let bus: Arc<dyn Bus> = Arc::new(EmbeddedBus::new(Retention::default()));
        let p = Publisher::on_bus(bus.clone(), "job-1").unwrap();
        assert_eq!(p.status("starting").await.unwrap(), 1);
        assert_eq!(p.progress(5, 10).await.unwrap(), 2);
        assert_eq!(p.log("half way").await.unwrap(), 3);
        assert_eq!(
            p.custom("metric", &serde_json::json!({"rps": 10}))
                .await
                .unwrap(),
            4
        );
        assert_eq!(
            p.complete(&serde_json::json!({"ok": true})).await.unwrap(),
            5
        );
        let page = bus.read(p.run(), 1, 10).await.unwrap();
        let kinds: Vec<_> = page.events.iter().map(|e| e.kind.to_string()).collect();
        assert_eq!(kinds, ["status", "progress", "log", "metric", "complete"]);
        assert_eq!(page.events[1].data.get(), r#"{"done":5,"total":10}"#);
        let state = bus.state(p.run()).await.unwrap().unwrap();
        assert_eq!(state.percent, Some(100.0));
    }

    #[tokio::test]
    async fn bad_input_is_an_invalid_input_error() {
        let bus: Arc<dyn Bus> = Arc::new(EmbeddedBus::new(Retention::default()));
        assert_eq!(
            Publisher::on_bus(bus.clone(), "a.b").err().unwrap().kind,
            PublishErrorKind::InvalidInput
        );
        let p = Publisher::on_bus(bus.clone(), "ok").unwrap();
        assert_eq!(
            p.custom("Not.Valid", &1).await.unwrap_err().kind,
            PublishErrorKind::InvalidInput
        );
        // Data nested past the limit never leaves the worker.
        let mut deep = serde_json::json!(1);
        for _ in 0..65 {
            deep = serde_json::json!([deep]);
        }
        let e = p.complete(&deep).await.unwrap_err();
        assert_eq!(e.kind, PublishErrorKind::InvalidInput, "{e}");
        assert!(
            bus.state(p.run()).await.unwrap().is_none(),
            "nothing stored"
        );
    }
}
