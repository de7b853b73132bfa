//! The admin API the operator uses (`/v1/admin/*`, bearer token): a pod's
//! load, and paced reconnect hints to move clients off a pod, either some
//! of them (`shed`, to rebalance after a scale-up) or all (`drain`, before
//! the pod is removed). SIGTERM uses the same pacing.
//!
//! A reconnect hint is a close with 1001 ("draining: reconnect and
//! resume"): clients reconnect through the load balancer and resume from
//! their cursor, so moving them loses nothing. Hints are paced (`rate` per
//! second) so that thousands of clients do not reconnect in the same
//! instant, and jittered so that clients closed together do not retry
//! together.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use runcast_core::{
    CloseCode, ErrorCode, ProtocolError,
    admin::{Drain, PodStats, Shed},
};

use axum::{
    extract::{FromRequestParts, Request, State},
    http::{StatusCode, header, request::Parts},
    response::Response,
};

use crate::{
    error::{ApiError, json},
    extract::{bearer_credentials, read_body},
    gateway::Gateway,
    hub::Subscriber,
};

/// Why clients are asked to reconnect (the `reason` label of
/// `runcast_reconnect_hints_total`).
#[derive(Debug, Clone, Copy)]
pub enum HintReason {
    Shutdown,
    Drain,
    Rebalance,
}

impl HintReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shutdown => "shutdown",
            Self::Drain => "drain",
            Self::Rebalance => "rebalance",
        }
    }
}

impl Gateway {
    /// This pod's load. The delivery rate is averaged since the previous
    /// call, which the operator makes once per sync period.
    pub fn stats(&self) -> PodStats {
        let delivered = self.metrics.events_delivered.get();
        let now = Instant::now();
        let delivered_per_sec = {
            let mut last = self.rate_mark.lock().unwrap_or_else(|p| p.into_inner());
            let secs = now.duration_since(last.0).as_secs_f64();
            let rate = if secs > 0.0 {
                delivered.saturating_sub(last.1) as f64 / secs
            } else {
                0.0
            };
            *last = (now, delivered);
            rate
        };
        let conns = self.live_sessions();
        let queue_pressure = conns.iter().map(|c| c.queue_fill()).fold(0.0, f64::max);
        PodStats {
            connections: conns.len() as u64,
            subscriptions: self.metrics.subscriptions.get().max(0) as u64,
            watched_runs: self.hub.watched_runs() as u64,
            delivered_per_sec,
            queue_pressure,
            draining: self.is_draining(),
            pending_hints: self.pending_hints.load(Ordering::Relaxed),
        }
    }

    /// Asks `count` clients to reconnect, paced. Refused while other hints
    /// are still being sent or the pod is draining.
    pub fn shed(self: &Arc<Self>, s: &Shed) -> Result<u64, ProtocolError> {
        check_rate(s.rate)?;
        if self.is_draining() {
            return Err(ProtocolError::new(
                ErrorCode::Conflict,
                "the gateway is draining; every client is already being moved",
            ));
        }
        let conns: Vec<_> = self
            .live_sessions()
            .into_iter()
            .take(usize::try_from(s.count).unwrap_or(usize::MAX))
            .collect();
        let n = self.start_hints(
            conns,
            s.rate,
            Duration::from_millis(s.jitter_ms),
            None,
            HintReason::Rebalance,
        )?;
        tracing::info!(count = n, rate = s.rate, "shedding clients to rebalance");
        Ok(n)
    }

    /// Stops being ready, waits `drain_delay` for load balancers to notice,
    /// then asks every client to reconnect elsewhere, paced. Clients that
    /// connect after this are told to go at once.
    pub fn drain(self: &Arc<Self>, d: &Drain) -> Result<u64, ProtocolError> {
        check_rate(d.rate)?;
        if self.draining.swap(true, Ordering::AcqRel) {
            return Err(ProtocolError::new(
                ErrorCode::Conflict,
                "the gateway is already draining",
            ));
        }
        let gw = self.clone();
        let (rate, jitter) = (d.rate, Duration::from_millis(d.jitter_ms));
        let within = d.grace_ms.map(Duration::from_millis);
        let n = self.live_sessions().len() as u64;
        // Counted as pending from now, so stats show the drain at once.
        self.pending_hints.fetch_add(n, Ordering::Relaxed);
        tracing::info!(clients = n, rate, delay = ?self.config.drain_delay, "draining");
        let task = tokio::spawn(async move {
            tokio::time::sleep(gw.config.drain_delay).await;
            let conns = gw.stop_sessions();
            gw.pending_hints.fetch_sub(n, Ordering::Relaxed);
            gw.pending_hints
                .fetch_add(conns.len() as u64, Ordering::Relaxed);
            gw.send_hints(conns, rate, jitter, within, HintReason::Drain)
                .await;
        });
        self.track(task);
        Ok(n)
    }

    fn start_hints(
        self: &Arc<Self>,
        conns: Vec<Arc<Subscriber>>,
        rate: f64,
        jitter: Duration,
        within: Option<Duration>,
        reason: HintReason,
    ) -> Result<u64, ProtocolError> {
        let n = conns.len() as u64;
        if self
            .pending_hints
            .compare_exchange(0, n, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return Err(ProtocolError::new(
                ErrorCode::Conflict,
                "reconnect hints are still being sent; wait until pending_hints is 0",
            ));
        }
        let gw = self.clone();
        let task = tokio::spawn(async move {
            gw.send_hints(conns, rate, jitter, within, reason).await;
        });
        self.track(task);
        Ok(n)
    }

    /// Closes `conns` with 1001, `rate` per second (faster if needed to end
    /// within `within`), each at its slot plus a random share of `jitter`.
    /// Expects `pending_hints` to already count them; counts each down.
    pub(crate) async fn send_hints(
        &self,
        conns: Vec<Arc<Subscriber>>,
        rate: f64,
        jitter: Duration,
        within: Option<Duration>,
        reason: HintReason,
    ) {
        let n = conns.len();
        let mut rate = rate.max(f64::MIN_POSITIVE);
        if let Some(w) = within {
            if w.is_zero() {
                rate = f64::INFINITY;
            } else if n as f64 / rate > w.as_secs_f64() {
                rate = n as f64 / w.as_secs_f64();
            }
        }
        let mut rng = Jitter::seeded();
        let mut slots: Vec<(Duration, Arc<Subscriber>)> = conns
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let at = Duration::from_secs_f64(i as f64 / rate) + jitter.mul_f64(rng.next());
                (within.map_or(at, |w| at.min(w)), c)
            })
            .collect();
        slots.sort_by_key(|s| s.0);
        let start = tokio::time::Instant::now();
        let hints = self
            .metrics
            .reconnect_hints
            .with_label_values(&[reason.as_str()]);
        for (at, conn) in slots {
            tokio::time::sleep_until(start + at).await;
            conn.close(CloseCode::GoingAway);
            hints.inc();
            self.pending_hints.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The admin API needs `Authorization: Bearer <--admin-token>`; without a
/// configured token it is off. Compared in constant time.
pub struct AdminAuth;

impl FromRequestParts<Arc<Gateway>> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, gw: &Arc<Gateway>) -> Result<Self, ApiError> {
        use subtle::ConstantTimeEq;
        let Some(token) = gw.config.admin_token.as_deref().filter(|t| !t.is_empty()) else {
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                "the admin API is off: start the gateway with --admin-token",
            ));
        };
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_credentials)
            .unwrap_or("");
        if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            Ok(AdminAuth)
        } else {
            Err(ApiError::new(
                ErrorCode::Unauthorized,
                "missing or wrong bearer token for the admin API",
            ))
        }
    }
}

/// `GET /v1/admin/stats`
pub async fn get_stats(_: AdminAuth, State(gw): State<Arc<Gateway>>) -> Response {
    json(
        StatusCode::OK,
        serde_json::to_string(&gw.stats()).unwrap_or_default(),
    )
}

/// `POST /v1/admin/drain`, with an optional body.
pub async fn post_drain(
    _: AdminAuth,
    State(gw): State<Arc<Gateway>>,
    req: Request,
) -> Result<Response, ApiError> {
    let d = admin_body::<Drain>(&gw, req).await?.unwrap_or_default();
    Ok(accepted(gw.drain(&d)?))
}

/// `POST /v1/admin/shed`, with a body.
pub async fn post_shed(
    _: AdminAuth,
    State(gw): State<Arc<Gateway>>,
    req: Request,
) -> Result<Response, ApiError> {
    let Some(s) = admin_body::<Shed>(&gw, req).await? else {
        return Err(ApiError::new(
            ErrorCode::InvalidEvent,
            r#"shed needs a body like {"count":100,"rate":50,"jitter_ms":500}"#,
        ));
    };
    Ok(accepted(gw.shed(&s)?))
}

fn accepted(clients: u64) -> Response {
    json(
        StatusCode::ACCEPTED,
        serde_json::json!({ "clients": clients }).to_string(),
    )
}

/// An optional JSON body of at most 64 KiB.
async fn admin_body<T: serde::de::DeserializeOwned>(
    gw: &Gateway,
    req: Request,
) -> Result<Option<T>, ApiError> {
    let body = read_body(gw, req, 64 << 10).await.map_err(|mut e| {
        e.0.message = format!("admin body: {}", e.0.message);
        e
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| ApiError::new(ErrorCode::InvalidJson, format!("admin body: {e}")))
}

fn check_rate(rate: f64) -> Result<(), ProtocolError> {
    if rate.is_finite() && rate > 0.0 {
        Ok(())
    } else {
        Err(ProtocolError::new(
            ErrorCode::InvalidEvent,
            format!("rate must be a positive number of clients per second, not {rate}"),
        ))
    }
}

/// xorshift64*: enough to spread reconnects; not for anything secret.
struct Jitter(u64);

impl Jitter {
    fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self(t | 1)
    }

    /// Uniform in [0, 1).
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_uniform_enough() {
        let mut j = Jitter::seeded();
        let xs: Vec<f64> = (0..10_000).map(|_| j.next()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }

    #[test]
    fn rates_must_be_positive() {
        assert!(check_rate(10.0).is_ok());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(check_rate(bad).unwrap_err().code, ErrorCode::InvalidEvent);
        }
    }
}
