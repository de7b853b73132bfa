//! Prometheus metrics for every role: one registry per process (the
//! gateway, a worker, the operator), built with [`Registrar`] so each metric
//! is created and registered in one call, and rendered with [`render`].
//!
//! A labelled metric is created with the label values known in advance,
//! which are exported at 0 from the start: `rate()` and alerts then see a
//! series before the first event, and an idle pod shows 0, not "no data".

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder, core::Collector,
};

/// Creates metrics and registers them in one registry.
///
/// Names and help texts are constants in the calling code, so a bad name or
/// a name registered twice is a programming error that the first test to
/// build the metrics finds: the methods panic, naming the metric.
pub struct Registrar {
    registry: Registry,
}

impl Default for Registrar {
    fn default() -> Self {
        Self::new()
    }
}

impl Registrar {
    /// A new registry holding, on Linux, the process metrics (CPU seconds,
    /// resident memory, open and max fds, start time).
    pub fn new() -> Self {
        let r = Self {
            registry: Registry::new(),
        };
        #[cfg(target_os = "linux")]
        r.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .unwrap_or_else(|e| panic!("process metrics: {e}"));
        r
    }

    fn register<C: Collector + Clone + 'static>(&self, name: &str, metric: C) -> C {
        self.registry
            .register(Box::new(metric.clone()))
            .unwrap_or_else(|e| panic!("metric {name}: {e}"));
        metric
    }

    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
        self.register(name, c)
    }

    pub fn gauge(&self, name: &str, help: &str) -> IntGauge {
        let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
        self.register(name, g)
    }

    /// A counter by `label`, each of `values` exported at 0 from the start.
    pub fn counter_vec(
        &self,
        name: &str,
        help: &str,
        label: &str,
        values: &[&str],
    ) -> IntCounterVec {
        let v = IntCounterVec::new(Opts::new(name, help), &[label])
            .unwrap_or_else(|e| panic!("metric {name}: {e}"));
        for value in values {
            v.with_label_values(&[value]);
        }
        self.register(name, v)
    }

    /// A gauge by `label`, each of `values` exported at 0 from the start.
    pub fn gauge_vec(&self, name: &str, help: &str, label: &str, values: &[&str]) -> IntGaugeVec {
        let v = IntGaugeVec::new(Opts::new(name, help), &[label])
            .unwrap_or_else(|e| panic!("metric {name}: {e}"));
        for value in values {
            v.with_label_values(&[value]);
        }
        self.register(name, v)
    }

    pub fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
            .unwrap_or_else(|e| panic!("metric {name}: {e}"));
        self.register(name, h)
    }

    /// A histogram by `label` (its series appear once observed or asked
    /// for with `with_label_values`).
    pub fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        label: &str,
        buckets: &[f64],
    ) -> HistogramVec {
        let v = HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            &[label],
        )
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
        self.register(name, v)
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn into_registry(self) -> Registry {
        self.registry
    }
}

/// The Prometheus text exposition of every metric in `registry`.
pub fn render(registry: &Registry) -> String {
    TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_metrics_are_exported_at_zero_before_first_use() {
        let r = Registrar::new();
        let c = r.counter("runcast_test_total", "A counter.");
        r.counter_vec(
            "runcast_test_errors_total",
            "By reason.",
            "reason",
            &["a", "b"],
        );
        r.gauge_vec("runcast_test_open", "By transport.", "transport", &["ws"]);
        r.histogram("runcast_test_seconds", "A histogram.", &[0.1, 1.0]);
        c.inc();
        let text = render(r.registry());
        for line in [
            "# HELP runcast_test_total A counter.",
            "# TYPE runcast_test_total counter",
            "runcast_test_total 1",
            r#"runcast_test_errors_total{reason="a"} 0"#,
            r#"runcast_test_errors_total{reason="b"} 0"#,
            r#"runcast_test_open{transport="ws"} 0"#,
            r#"runcast_test_seconds_bucket{le="0.1"} 0"#,
            "runcast_test_seconds_count 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }

    #[test]
    #[should_panic(expected = "metric runcast_twice")]
    fn a_name_registered_twice_is_named_in_the_panic() {
        let r = Registrar::new();
        r.gauge("runcast_twice", "Once.");
        r.gauge("runcast_twice", "Twice.");
    }
}
