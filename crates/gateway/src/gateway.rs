//! The state one gateway process shares across its connections: the bus,
//! the hub, metrics, limits, and the registry of open sessions that drain
//! and shutdown reach.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use runcast_bus::Bus;
use runcast_core::CloseCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::{
    Config, Metrics,
    hub::{Hub, Subscriber},
};

/// Everything a gateway process shares across connections.
pub struct Gateway {
    pub bus: Arc<dyn Bus>,
    pub hub: Hub,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    pub(crate) draining: AtomicBool,
    /// Set once clients have been told to leave; sessions opened later close at once.
    stopping: AtomicBool,
    next_conn: AtomicU64,
    pub(crate) conn_limit: Arc<Semaphore>,
    /// Every open WebSocket/SSE session, so shutdown can tell each to close.
    /// Touched twice per session lifetime, never per message: a shared
    /// shutdown channel polled by every session on every step was measurable
    /// lock contention at 200k frames/s.
    sessions: std::sync::Mutex<std::collections::HashMap<u64, std::sync::Weak<Subscriber>>>,
    /// Bounds the `runcast.deliver` spans and the slow-event log lines.
    pub(crate) delivery_spans: runcast_telemetry::Budget,
    pub(crate) slow_event_logs: runcast_telemetry::Budget,
    /// Per-client-address session limits.
    pub(crate) ip_limits: Arc<crate::limits::IpLimits>,
    /// Per-API-key publish rates.
    pub(crate) key_rates: crate::limits::KeyRates,
    /// Reconnect hints scheduled and not yet sent (drain, shed, shutdown).
    pub(crate) pending_hints: AtomicU64,
    /// The delivered counter at the previous stats request, for its rate.
    pub(crate) rate_mark: std::sync::Mutex<(std::time::Instant, u64)>,
    /// Drain and shed tasks, kept so that a panic in one is logged and
    /// they stop with the gateway.
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Gateway {
    /// `source` labels received events in metrics (`embedded`, `nats`).
    pub fn new(bus: Arc<dyn Bus>, config: Config, source: &str) -> Arc<Self> {
        let metrics = Arc::new(Metrics::new(source));
        Arc::new(Self {
            hub: Hub::new(bus.clone(), metrics.clone(), config.replay_page),
            bus,
            metrics,
            conn_limit: Arc::new(Semaphore::new(config.max_connections)),
            delivery_spans: runcast_telemetry::Budget::per_second(config.trace_deliveries_per_sec),
            slow_event_logs: runcast_telemetry::Budget::per_second(5),
            ip_limits: Arc::new(crate::limits::IpLimits::new(
                config.max_sessions_per_ip,
                config.session_rate_per_ip,
                config.trusted_proxies.clone(),
            )),
            key_rates: crate::limits::KeyRates::new(config.publish_rate_per_key),
            pending_hints: AtomicU64::new(0),
            rate_mark: std::sync::Mutex::new((std::time::Instant::now(), 0)),
            tasks: std::sync::Mutex::new(Vec::new()),
            config,
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            sessions: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    fn sessions(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, std::sync::Weak<Subscriber>>>
    {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tracks a session so shutdown reaches it.
    pub(crate) fn register(&self, conn: &Arc<Subscriber>) {
        self.sessions().insert(conn.id, Arc::downgrade(conn));
        if self.stopping.load(Ordering::Acquire) {
            conn.close(CloseCode::GoingAway);
        }
    }

    pub(crate) fn deregister(&self, id: u64) {
        self.sessions().remove(&id);
    }

    /// Open sessions that have not been asked to close yet.
    pub(crate) fn live_sessions(&self) -> Vec<Arc<Subscriber>> {
        self.sessions()
            .values()
            .filter_map(|w| w.upgrade())
            .filter(|c| c.close_code().is_none())
            .collect()
    }

    /// From now on new sessions are closed as they open; returns the open
    /// ones, for the caller to close (paced).
    pub(crate) fn stop_sessions(&self) -> Vec<Arc<Subscriber>> {
        self.stopping.store(true, Ordering::Release);
        self.live_sessions()
    }

    /// Keeps a background task's handle; finished ones are reaped here, and
    /// a panicked one is logged.
    pub(crate) fn track(&self, task: tokio::task::JoinHandle<()>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }

    /// Whether a browser origin may use this gateway: any, when no list is
    /// configured.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        let allowed = &self.config.allowed_origins;
        allowed.is_empty() || allowed.iter().any(|a| a == origin || a == "*")
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}

/// One accepted TCP connection, as its requests see it (a request
/// extension): who is on the other end, and the tokens every session opened
/// on it must hold. Over HTTP/2 many sessions share one connection.
#[derive(Clone)]
pub(crate) struct ConnInfo {
    /// Held by every task that must finish before shutdown completes.
    pub done: mpsc::Sender<()>,
    /// The connection's slot under `max_connections`, held by upgraded
    /// WebSockets and SSE streams too.
    pub permit: Arc<Slot>,
    /// The TCP peer (a proxy, or the client itself).
    pub peer: std::net::IpAddr,
    /// What is in flight on the connection, so an idle one can be closed.
    pub activity: Activity,
}

/// Counts the requests and sessions in flight on one connection. Over
/// HTTP/1.1 hyper closes an idle keep-alive connection itself; over HTTP/2
/// a client that answers pings could otherwise hold a connection (and a
/// slot under `max_connections`) with nothing on it for ever.
#[derive(Clone, Default)]
pub(crate) struct Activity(Arc<Counts>);

#[derive(Default)]
pub(crate) struct Counts {
    in_flight: std::sync::atomic::AtomicUsize,
    started: AtomicU64,
    /// Asks the connection to close (gracefully, then for good).
    close: tokio::sync::Notify,
}

impl Activity {
    /// Marks one more thing in flight until the guard is dropped.
    pub fn busy(&self) -> Busy {
        self.0.in_flight.fetch_add(1, Ordering::Relaxed);
        self.0.started.fetch_add(1, Ordering::Relaxed);
        Busy(self.0.clone())
    }

    /// Nothing in flight right now.
    pub fn idle(&self) -> bool {
        self.0.in_flight.load(Ordering::Relaxed) == 0
    }

    /// How many things were ever started (changes whenever one starts).
    pub fn started(&self) -> u64 {
        self.0.started.load(Ordering::Relaxed)
    }

    /// Asks the connection to close: over HTTP/2 a timed-out request ends
    /// only its stream, and a client could open the next one on the same
    /// connection for ever.
    pub fn close_soon(&self) {
        self.0.close.notify_one();
    }

    /// Completes once [`close_soon`](Self::close_soon) was called.
    pub async fn closing(&self) {
        self.0.close.notified().await
    }
}

pub(crate) struct Busy(Arc<Counts>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnInfo {
    /// For a task that outlives the HTTP exchange (an upgraded WebSocket, an
    /// SSE stream): tokens that keep shutdown waiting and the connection
    /// slot taken until the task drops them.
    pub(crate) fn detach(&self, ip: crate::limits::IpGuard) -> SessionTokens {
        SessionTokens {
            _done: self.done.clone(),
            _permit: self.permit.clone(),
            _ip: ip,
            _busy: self.activity.busy(),
        }
    }
}

/// A TCP connection's slot under `max_connections`, counted in
/// `runcast_tcp_connections` for as long as anything holds it (the
/// connection's tasks, or an upgraded WebSocket that outlives them).
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    open: prometheus::IntGauge,
}

impl Slot {
    pub fn new(permit: OwnedSemaphorePermit, open: prometheus::IntGauge) -> Self {
        open.inc();
        Self {
            _permit: permit,
            open,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

pub(crate) struct SessionTokens {
    _done: mpsc::Sender<()>,
    _permit: Arc<Slot>,
    /// The session's slot under its client address's limit.
    _ip: crate::limits::IpGuard,
    /// Keeps the connection from counting as idle.
    _busy: Busy,
}
