//! The runcast operator: reconciles `RuncastCluster` resources into a
//! gateway fleet (Deployment, Service, PodDisruptionBudget, ConfigMap,
//! optional ServiceMonitor and PrometheusRule) and sizes it by what matters
//! for long-lived connections: connections and delivered messages per pod,
//! with paced drain before a pod is removed and rebalancing after one is
//! added.
//!
//! Layers: [`crd`] (the resource), [`policy`] (pure scaling decisions),
//! `resources` (the objects a cluster owns), `reconcile` (the controller
//! glue), `lease` (leader election).

pub mod crd;
pub mod policy;
