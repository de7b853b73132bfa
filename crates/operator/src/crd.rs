//! The `RuncastCluster` custom resource: one gateway fleet on one NATS.
//!
//! `runcast crdgen` prints the CRD generated from these types; the copies in
//! `k8s/` and `charts/runcast/crds/` are checked against it in tests.

// Several `printcolumn(...)` arguments of `#[kube]` share keys (`type_`),
// which clippy mistakes for repeated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Affinity, LocalObjectReference, PodSecurityContext, ResourceRequirements,
        SecretKeySelector, SecurityContext, Toleration, TopologySpreadConstraint,
    },
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A fleet of runcast gateways: how to run them, how many, when to scale,
/// and how to move clients when pods come and go.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "runcast.dev",
    version = "v1alpha1",
    kind = "RuncastCluster",
    namespaced,
    status = "RuncastClusterStatus",
    shortname = "rcc",
    category = "runcast",
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredReplicas"
    ),
    printcolumn(
        name = "Connections",
        type_ = "integer",
        json_path = ".status.connections"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RuncastClusterSpec {
    #[serde(default)]
    pub gateway: GatewaySpec,
    #[serde(default)]
    pub replicas: ReplicasSpec,
    #[serde(default)]
    pub scaling: ScalingSpec,
    #[serde(default)]
    pub drain: DrainSpec,
    pub nats: NatsSpec,
    #[serde(default)]
    pub service: ServiceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<IngressSpec>,
    #[serde(default)]
    pub observability: ObservabilitySpec,
    #[serde(default)]
    pub auth: AuthSpec,
}

/// Who may watch which runs on these gateways.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// Let clients without a token watch every run. Off unless set.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// An HS256 shared secret (32+ bytes) for subscriber tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs256_secret_ref: Option<SecretKeySelector>,
    /// A JWKS document (public keys chosen by kid) for subscriber tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_secret_ref: Option<SecretKeySelector>,
    /// Required `aud` claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Required `iss` claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// API keys for the HTTP publish API, as `name:sha256hex[:prefix|...]` entries from
    /// `runcast publish-key` (digests, not keys, so they may sit in the ConfigMap).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish_keys: Vec<String>,
    /// Without publish keys, let anyone who reaches the gateways publish over HTTP.
    /// Off unless set: workers publish over NATS.
    #[serde(default)]
    pub allow_anonymous_publish: bool,
}

/// The gateway pods.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Container image with the `runcast` binary.
    #[serde(default = "default_image")]
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra `RUNCAST_*` settings for the gateways (see `runcast gateway --help`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Extra pod annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
    /// Secrets for pulling the image from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Where the pods may run: the pod spec's fields of the same names.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// Replaces the pod's security context (default: non-root UID/GID
    /// 65532, the RuntimeDefault seccomp profile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_security_context: Option<PodSecurityContext>,
    /// Replaces the container's security context (default: read-only root
    /// filesystem, no privilege escalation, every capability dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
    /// A priority class for the gateway pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

impl Default for GatewaySpec {
    fn default() -> Self {
        Self {
            image: default_image(),
            image_pull_policy: None,
            resources: None,
            env: BTreeMap::new(),
            pod_annotations: BTreeMap::new(),
            image_pull_secrets: Vec::new(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
            topology_spread_constraints: Vec::new(),
            pod_security_context: None,
            security_context: None,
            priority_class_name: None,
        }
    }
}

fn default_image() -> String {
    "ghcr.io/runcast/runcast:0.1.0".into()
}

/// Bounds of the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicasSpec {
    // Bounded so that the API server refuses what the operator could not
    // read: an out-of-range integer in one stored object made every list
    // of RuncastClusters fail, stopping the operator for all of them.
    #[serde(default = "default_min")]
    #[schemars(range(min = 1, max = 10000))]
    pub min: i32,
    #[serde(default = "default_max")]
    #[schemars(range(min = 1, max = 10000))]
    pub max: i32,
}

impl Default for ReplicasSpec {
    fn default() -> Self {
        Self {
            min: default_min(),
            max: default_max(),
        }
    }
}

fn default_min() -> i32 {
    2
}
fn default_max() -> i32 {
    10
}

/// What one pod should carry, and how quickly to react.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingSpec {
    /// Target open connections per pod.
    #[serde(default = "default_connections")]
    #[schemars(range(min = 1, max = 100000000))]
    pub connections_per_pod: u64,
    /// Target delivered event frames per second per pod.
    #[serde(default = "default_messages")]
    #[schemars(range(min = 1.0, max = 1.0e9))]
    pub messages_per_second_per_pod: f64,
    /// A higher replica count must be recommended this long before scaling up.
    #[serde(default = "default_up_window")]
    #[schemars(range(max = 86400))]
    pub scale_up_stabilization_seconds: u64,
    /// A lower replica count must be recommended this long before scaling down.
    #[serde(default = "default_down_window")]
    #[schemars(range(max = 86400))]
    pub scale_down_stabilization_seconds: u64,
    /// After a scale-up, move clients from pods above the fair share.
    #[serde(default = "yes")]
    pub rebalance: bool,
}

impl Default for ScalingSpec {
    fn default() -> Self {
        Self {
            connections_per_pod: default_connections(),
            messages_per_second_per_pod: default_messages(),
            scale_up_stabilization_seconds: default_up_window(),
            scale_down_stabilization_seconds: default_down_window(),
            rebalance: true,
        }
    }
}

fn default_connections() -> u64 {
    5_000
}
fn default_messages() -> f64 {
    50_000.0
}
fn default_up_window() -> u64 {
    30
}
fn default_down_window() -> u64 {
    300
}
fn yes() -> bool {
    true
}

/// How clients are moved off a pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainSpec {
    /// Reconnect hints per second per pod.
    #[serde(default = "default_drain_rate")]
    #[schemars(range(min = 1.0, max = 1.0e6))]
    pub rate: f64,
    /// Random delay of up to this much for each hint, so clients do not reconnect in step.
    #[serde(default = "default_jitter")]
    #[schemars(range(max = 3600000))]
    pub jitter_ms: u64,
    /// The pods' terminationGracePeriodSeconds; a drain finishes within it.
    #[serde(default = "default_grace")]
    #[schemars(range(min = 15, max = 86400))]
    pub grace_period_seconds: i64,
}

impl Default for DrainSpec {
    fn default() -> Self {
        Self {
            rate: default_drain_rate(),
            jitter_ms: default_jitter(),
            grace_period_seconds: default_grace(),
        }
    }
}

fn default_drain_rate() -> f64 {
    200.0
}
fn default_jitter() -> u64 {
    1_000
}
fn default_grace() -> i64 {
    60
}

/// Where NATS is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NatsSpec {
    /// NATS URLs, comma-separated.
    pub url: String,
    /// A Secret with a `creds` key (NATS credentials file), mounted into the gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// Stream and KV bucket replicas (1, 3 or 5).
    #[serde(default = "one")]
    // Odd, as the chart's values schema says: an even count of replicas
    // survives no more node losses than the odd count below it.
    #[schemars(range(min = 1, max = 5), extend("enum" = [1, 3, 5]))]
    pub stream_replicas: i32,
}

fn one() -> i32 {
    1
}

/// The Service in front of the gateways.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default = "default_service_type", rename = "type")]
    pub type_: String,
    #[schemars(range(min = 1, max = 65535))]
    #[serde(default = "default_service_port")]
    pub port: i32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            type_: default_service_type(),
            port: default_service_port(),
            annotations: BTreeMap::new(),
        }
    }
}

fn default_service_type() -> String {
    "ClusterIP".into()
}
fn default_service_port() -> i32 {
    80
}

/// An Ingress for browsers, with WebSocket-safe settings for ingress-nginx.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressSpec {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Metrics and traces.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservabilitySpec {
    /// Create a ServiceMonitor (Prometheus Operator) for the gateways.
    #[serde(default)]
    pub service_monitor: bool,
    /// Create a PrometheusRule with runcast's alert and recording rules.
    #[serde(default)]
    pub prometheus_rule: bool,
    /// OTLP/gRPC collector for traces (e.g. http://otel-collector:4317).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled, 0.0 to 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub trace_sample_ratio: Option<f64>,
}

/// What the operator last saw and did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuncastClusterStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Gateway pods that exist.
    #[serde(default)]
    pub replicas: i32,
    /// Ready gateway pods.
    #[serde(default)]
    pub ready_replicas: i32,
    /// What the scaling policy wants.
    #[serde(default)]
    pub desired_replicas: i32,
    /// Open client connections over all pods.
    #[serde(default)]
    pub connections: u64,
    /// Delivered event frames per second over all pods.
    #[serde(default)]
    pub delivered_per_second: f64,
    /// Load per pod, as each pod reported it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<PodLoadStatus>,
    /// Ready, Scaling, Draining, Degraded, APIsAvailable, Reconciled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The operator that reconciles this cluster, as the namespace/name
    /// of its leader Lease. Another operator leaves the cluster alone while
    /// that Lease is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
}

/// One pod's load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodLoadStatus {
    pub name: String,
    pub connections: u64,
    pub delivered_per_second: f64,
    pub draining: bool,
}
