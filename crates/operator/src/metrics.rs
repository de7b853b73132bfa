//! The operator's Prometheus metrics. Labels are bounded: an error reason,
//! and the cluster (`namespace/name`: one per RuncastCluster resource).

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

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
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).expect("unique metric");
        };
        let reconciles = IntCounter::new(
            "runcast_operator_reconciles_total",
            "RuncastCluster reconciles run.",
        )
        .expect("valid metric");
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "runcast_operator_reconcile_errors_total",
                "Reconciles that failed, by reason (kube, spec, no_namespace).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for r in ["kube", "spec", "no_namespace"] {
            reconcile_errors.with_label_values(&[r]);
        }
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "runcast_operator_reconcile_duration_seconds",
                "How long one reconcile took, API calls and pod stats included.",
            )
            .buckets(runcast_core::LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "runcast_operator_leader",
            "1 while this replica holds the leader lease and reconciles.",
        )
        .expect("valid metric");
        let gauge = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["cluster"]).expect("valid metric")
        };
        let desired = gauge(
            "runcast_operator_desired_replicas",
            "Gateway pods the scaling policy wants, per cluster.",
        );
        let replicas = gauge(
            "runcast_operator_replicas",
            "Gateway pods that exist, per cluster.",
        );
        let connections = gauge(
            "runcast_operator_connections",
            "Client connections over all gateway pods, per cluster.",
        );
        reg(Box::new(reconciles.clone()));
        reg(Box::new(reconcile_errors.clone()));
        reg(Box::new(reconcile_duration.clone()));
        reg(Box::new(leader.clone()));
        reg(Box::new(desired.clone()));
        reg(Box::new(replicas.clone()));
        reg(Box::new(connections.clone()));
        #[cfg(target_os = "linux")]
        reg(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            leader,
            desired,
            replicas,
            connections,
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

    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}
