//! The operator's Prometheus metrics. Labels are bounded: an error reason,
//! and the cluster (`namespace/name`: one per RuncastCluster resource).

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use runcast_telemetry::metrics::Registrar;

use crate::crd::RuncastClusterStatus;

pub struct OperatorMetrics {
    registry: Registry,
    pub reconciles: IntCounter,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: Histogram,
    pub leader: IntGauge,
    desired: IntGaugeVec,
    replicas: IntGaugeVec,
    connections: IntGaugeVec,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl OperatorMetrics {
    pub fn new() -> Self {
        let m = Registrar::new();
        Self {
            reconciles: m.counter(
                "runcast_operator_reconciles_total",
                "RuncastCluster reconciles run.",
            ),
            reconcile_errors: m.counter_vec(
                "runcast_operator_reconcile_errors_total",
                "Reconciles that failed, by reason (kube, spec, no_namespace).",
                "reason",
                &["kube", "spec", "no_namespace"],
            ),
            reconcile_duration: m.histogram(
                "runcast_operator_reconcile_duration_seconds",
                "How long one reconcile took, API calls and pod stats included.",
                runcast_core::LATENCY_BUCKETS,
            ),
            leader: m.gauge(
                "runcast_operator_leader",
                "1 while this replica holds the leader lease and reconciles.",
            ),
            // Per cluster: its series appear when it is first reconciled.
            desired: m.gauge_vec(
                "runcast_operator_desired_replicas",
                "Gateway pods the scaling policy wants, per cluster.",
                "cluster",
                &[],
            ),
            replicas: m.gauge_vec(
                "runcast_operator_replicas",
                "Gateway pods that exist, per cluster.",
                "cluster",
                &[],
            ),
            connections: m.gauge_vec(
                "runcast_operator_connections",
                "Client connections over all gateway pods, per cluster.",
                "cluster",
                &[],
            ),
            registry: m.into_registry(),
        }
    }

    pub fn record(&self, cluster: &str, s: &RuncastClusterStatus) {
        self.desired
            .with_label_values(&[cluster])
            .set(i64::from(s.desired_replicas));
        self.replicas
            .with_label_values(&[cluster])
            .set(i64::from(s.replicas));
        self.connections
            .with_label_values(&[cluster])
            .set(s.connections as i64);
    }

    /// Drops the series of every cluster not in `keep`: a deleted cluster,
    /// or one another operator reconciles, must not be reported as if it
    /// still ran here with its last figures.
    pub fn retain(&self, keep: &std::collections::HashSet<String>) {
        for vec in [&self.desired, &self.replicas, &self.connections] {
            for family in prometheus::core::Collector::collect(vec) {
                for m in family.get_metric() {
                    let Some(cluster) = m
                        .get_label()
                        .iter()
                        .find(|l| l.name() == "cluster")
                        .map(|l| l.value().to_owned())
                    else {
                        continue;
                    };
                    if !keep.contains(&cluster) {
                        let _ = vec.remove_label_values(&[&cluster]);
                    }
                }
            }
        }
    }

    pub fn render(&self) -> String {
        runcast_telemetry::metrics::render(&self.registry)
    }
}
