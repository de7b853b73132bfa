//! Prometheus metrics for publishers: wrap any [`PublishTarget`] in
//! [`Metered`] to count what it publishes, why publishes fail, and how long
//! each takes to be acknowledged.

use std::{sync::Arc, time::Instant};

use async_trait::async_trait;
use prometheus::{Histogram, IntCounter, IntCounterVec, Registry};
use runcast_core::{NewEvent, RunId};
use runcast_telemetry::metrics::Registrar;

use crate::{PublishError, PublishErrorKind, PublishTarget};

/// A publisher's metrics, registered in a registry of its own.
pub struct PublishMetrics {
    registry: Registry,
    published: IntCounter,
    errors: IntCounterVec,
    ack: Histogram,
}

impl Default for PublishMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl PublishMetrics {
    pub fn new() -> Self {
        let m = Registrar::new();
        Self {
            published: m.counter(
                "runcast_events_published_total",
                "Events this worker published and the bus acknowledged.",
            ),
            errors: m.counter_vec(
                "runcast_publish_errors_total",
                "Publish calls that failed, by reason (invalid_input, rejected, unavailable, tls).",
                "reason",
                &["invalid_input", "rejected", "unavailable", "tls"],
            ),
            ack: m.histogram(
                "runcast_publish_ack_seconds",
                "From a publish call to the bus's acknowledgement of all its events.",
                runcast_core::LATENCY_BUCKETS,
            ),
            registry: m.into_registry(),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        runcast_telemetry::metrics::render(&self.registry)
    }
}

/// A [`PublishTarget`] that records [`PublishMetrics`] for another.
pub struct Metered<T> {
    inner: T,
    metrics: Arc<PublishMetrics>,
}

impl<T> Metered<T> {
    pub fn new(inner: T, metrics: Arc<PublishMetrics>) -> Self {
        Self { inner, metrics }
    }
}

#[async_trait]
impl<T: PublishTarget> PublishTarget for Metered<T> {
    async fn publish(&self, run: &RunId, events: Vec<NewEvent>) -> Result<Vec<u64>, PublishError> {
        let started = Instant::now();
        let result = self.inner.publish(run, events).await;
        match &result {
            Ok(seqs) => {
                self.metrics.ack.observe(started.elapsed().as_secs_f64());
                self.metrics.published.inc_by(seqs.len() as u64);
            }
            Err(e) => {
                let reason = match e.kind {
                    PublishErrorKind::InvalidInput => "invalid_input",
                    PublishErrorKind::Rejected => "rejected",
                    PublishErrorKind::Unavailable => "unavailable",
                    PublishErrorKind::Tls => "tls",
                };
                self.metrics.errors.with_label_values(&[reason]).inc();
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusTarget;
    use runcast_bus::{EmbeddedBus, Retention};
    use runcast_core::EventKind;

    #[tokio::test]
    async fn counts_acknowledged_events_and_errors_by_reason() {
        let bus = EmbeddedBus::new(Retention {
            max_event_bytes: 300,
            ..Retention::default()
        });
        let metrics = Arc::new(PublishMetrics::new());
        let target = Metered::new(BusTarget(Arc::new(bus)), metrics.clone());
        let run = RunId::parse("m").unwrap();
        let small = || NewEvent::json(EventKind::Log, &"hi").unwrap();
        target.publish(&run, vec![small(), small()]).await.unwrap();
        let big = NewEvent::json(EventKind::Log, &"x".repeat(1000)).unwrap();
        assert!(target.publish(&run, vec![big]).await.is_err());
        let text = metrics.render();
        for line in [
            "runcast_events_published_total 2",
            r#"runcast_publish_errors_total{reason="rejected"} 1"#,
            r#"runcast_publish_errors_total{reason="unavailable"} 0"#,
            r#"runcast_publish_errors_total{reason="tls"} 0"#,
            "runcast_publish_ack_seconds_count 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }
}
