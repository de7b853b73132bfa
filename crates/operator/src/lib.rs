//! The runcast operator: reconciles `RuncastCluster` resources into a
//! gateway fleet (Deployment, Service, PodDisruptionBudget, ConfigMap,
//! optional ServiceMonitor and PrometheusRule) and sizes it by what matters
//! for long-lived connections: connections and delivered messages per pod,
//! with paced drain before a pod is removed and rebalancing after one is
//! added.
//!
//! Layers: [`crd`] (the resource), [`policy`] (pure scaling decisions),
//! [`resources`] (the objects a cluster owns), [`served`] (which optional APIs
//! the cluster serves), [`reconcile`] (one cluster's
//! reconcile), [`lease`] (leader election) and [`controller`] (wiring).

use kube::CustomResourceExt;

/// The CRD as YAML, as `runcast crdgen` prints it.
pub fn crd_yaml() -> String {
    let crd = crd::RuncastCluster::crd();
    serde_norway::to_string(&crd).expect("a CRD serializes")
}

pub mod controller;
pub mod crd;
pub mod lease;
pub mod metrics;
pub mod policy;
pub mod reconcile;
pub mod resources;
pub mod served;
