//! The gateway's admin API types (`/v1/admin/*`): what a pod reports about
//! its load, and the paced reconnect requests the operator sends it. Shared
//! by the gateway that serves them and the operator that reads them.

use serde::{Deserialize, Serialize};

/// One gateway pod's load, as `GET /v1/admin/stats` reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PodStats {
    /// Open WebSocket and SSE sessions.
    pub connections: u64,
    /// Subscriptions over all sessions.
    pub subscriptions: u64,
    /// Distinct runs with local subscribers (the pod's bus interest).
    pub watched_runs: u64,
    /// Event frames delivered per second, averaged since the previous stats
    /// request (or since start).
    pub delivered_per_sec: f64,
    /// The fullest connection queue, as a share of its byte bound (0–1):
    /// near 1, clients are about to be disconnected as slow consumers.
    pub queue_pressure: f64,
    /// The pod is draining: readiness fails and clients are being moved.
    pub draining: bool,
    /// Reconnect hints still to be sent by a drain or shed in progress.
    pub pending_hints: u64,
}

/// `POST /v1/admin/shed`: ask `count` clients to reconnect (elsewhere, if
/// the load balancer prefers other pods), `rate` per second, each hint at
/// its slot plus a random delay of up to `jitter_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shed {
    pub count: u64,
    #[serde(default = "default_rate")]
    pub rate: f64,
    #[serde(default)]
    pub jitter_ms: u64,
}

/// `POST /v1/admin/drain`: stop being ready, then ask every client to
/// reconnect elsewhere, `rate` per second with up to `jitter_ms` of jitter,
/// faster if needed to be done within `grace_ms` (the pod's termination
/// grace period, less a margin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drain {
    #[serde(default = "default_rate")]
    pub rate: f64,
    #[serde(default)]
    pub jitter_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_ms: Option<u64>,
}

fn default_rate() -> f64 {
    100.0
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            rate: default_rate(),
            jitter_ms: 0,
            grace_ms: None,
        }
    }
}
