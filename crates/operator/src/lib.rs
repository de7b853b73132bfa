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
    let mut v = serde_json::to_value(&crd).expect("a CRD serializes");
    bound_int32(&mut v);
    serde_norway::to_string(&v).expect("a CRD serializes")
}

/// Gives every `int32` field of the schema the bounds of an i32. The pod
/// spec types (affinity weights, topology spread skews, ...) say int32 and
/// nothing more, so the API server stored 3000000000, which the operator
/// cannot read: that cluster was then skipped without a word (an outside
/// tester's finding). Refused at the API server instead, with the field named.
fn bound_int32(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            if m.get("type").and_then(|t| t.as_str()) == Some("integer")
                && m.get("format").and_then(|f| f.as_str()) == Some("int32")
            {
                m.entry("minimum").or_insert(i32::MIN.into());
                m.entry("maximum").or_insert(i32::MAX.into());
            }
            m.values_mut().for_each(bound_int32);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(bound_int32),
        _ => {}
    }
}

pub mod controller;
pub mod crd;
pub mod lease;
pub mod metrics;
pub mod policy;
pub mod reconcile;
pub mod resources;
pub mod served;
