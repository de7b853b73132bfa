//! Accept loop and graceful shutdown.

use std::{
    convert::Infallible,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use runcast_bus::Bus;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch},
};
use tracing::Instrument;

use runcast_core::CloseCode;

use crate::{
    Config, Metrics,
    hub::{Conn, Hub},
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
    conn_limit: Arc<Semaphore>,
    /// Every open WebSocket/SSE session, so shutdown can tell each to close.
    /// Touched twice per session lifetime, never per message: a shared
    /// shutdown channel polled by every session on every step was measurable
    /// lock contention at 200k frames/s.
    sessions: std::sync::Mutex<std::collections::HashMap<u64, std::sync::Weak<Conn>>>,
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
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, std::sync::Weak<Conn>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tracks a session so shutdown reaches it.
    pub(crate) fn register(&self, conn: &Arc<Conn>) {
        self.sessions().insert(conn.id, Arc::downgrade(conn));
        if self.stopping.load(Ordering::Acquire) {
            conn.close(CloseCode::GoingAway);
        }
    }

    pub(crate) fn deregister(&self, id: u64) {
        self.sessions().remove(&id);
    }

    /// Open sessions that have not been asked to close yet.
    pub(crate) fn live_sessions(&self) -> Vec<Arc<Conn>> {
        self.sessions()
            .values()
            .filter_map(|w| w.upgrade())
            .filter(|c| c.close_code().is_none())
            .collect()
    }

    /// From now on new sessions are closed as they open; returns the open
    /// ones, for the caller to close (paced).
    pub(crate) fn stop_sessions(&self) -> Vec<Arc<Conn>> {
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

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}

/// What every request handler of one TCP connection can reach.
#[derive(Clone)]
pub(crate) struct ConnCtx {
    pub gw: Arc<Gateway>,
    /// Held by every task that must finish before shutdown completes.
    pub done: mpsc::Sender<()>,
    /// The connection's slot under `max_connections`, held by upgraded
    /// WebSockets and SSE streams too.
    pub _permit: Arc<OwnedSemaphorePermit>,
    /// The TCP peer (a proxy, or the client itself).
    pub peer: std::net::IpAddr,
    /// Set when the connection's first request headers are in, which ends
    /// its handshake deadline.
    pub started: Arc<AtomicBool>,
}

impl ConnCtx {
    /// For a task that outlives the HTTP exchange (an upgraded WebSocket, an
    /// SSE stream): the gateway, and tokens that keep shutdown waiting and the
    /// connection slot taken until the task drops them.
    pub(crate) fn detach(self, ip: crate::limits::IpGuard) -> (Arc<Gateway>, SessionTokens) {
        let ConnCtx {
            gw, done, _permit, ..
        } = self;
        (
            gw,
            SessionTokens {
                _done: done,
                _permit,
                _ip: ip,
            },
        )
    }
}

pub(crate) struct SessionTokens {
    _done: mpsc::Sender<()>,
    _permit: Arc<OwnedSemaphorePermit>,
    /// The session's slot under its client address's limit.
    _ip: crate::limits::IpGuard,
}

/// Serves the gateway on `listener` until `shutdown` completes, then drains:
/// readiness fails at once, new connections are still accepted for
/// `drain_delay` (so load balancers can notice), then every client is told to
/// reconnect elsewhere (WebSocket close 1001, SSE streams end) and the call
/// returns when all connections are done or `drain_timeout` passes.
pub async fn run(
    gw: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let reloader = gw
        .config
        .tls
        .as_ref()
        .map(|tls| tls.spawn_reloader(gw.metrics.clone()));
    tokio::pin!(shutdown);
    let mut drain_deadline = None;
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown, if drain_deadline.is_none() => {
                gw.draining.store(true, Ordering::Relaxed);
                tracing::info!(delay = ?gw.config.drain_delay, "draining: readiness now fails");
                drain_deadline = Some(tokio::time::Instant::now() + gw.config.drain_delay);
                continue;
            }
            _ = async { tokio::time::sleep_until(drain_deadline.expect("guarded")).await }, if drain_deadline.is_some() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, addr)) => {
                let ctx_parts = (gw.clone(), stop_rx.clone(), done_tx.clone());
                let span = tracing::debug_span!("conn", %addr);
                tokio::spawn(serve_tcp(tcp, addr.ip(), ctx_parts).instrument(span));
            }
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    // Clients leave at a paced rate, finishing within half the drain
    // timeout so that the last ones still have time to close cleanly.
    let conns = gw.stop_sessions();
    tracing::info!(
        clients = conns.len(),
        rate = gw.config.drain_rate,
        "telling clients to reconnect elsewhere"
    );
    gw.pending_hints
        .fetch_add(conns.len() as u64, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    drop(done_tx);
    let hints = gw.send_hints(
        conns,
        gw.config.drain_rate,
        gw.config.drain_jitter,
        Some(gw.config.drain_timeout / 2),
        crate::admin::HintReason::Shutdown,
    );
    let all_done = async {
        hints.await;
        done_rx.recv().await
    };
    if tokio::time::timeout(gw.config.drain_timeout, all_done)
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?gw.config.drain_timeout, "drain timed out; dropping remaining connections");
    }
    if let Some(r) = reloader {
        r.abort();
    }
    Ok(())
}

async fn serve_tcp(
    mut tcp: TcpStream,
    peer: std::net::IpAddr,
    (gw, mut stop, done): (Arc<Gateway>, watch::Receiver<bool>, mpsc::Sender<()>),
) {
    let Ok(permit) = gw.conn_limit.clone().try_acquire_owned() else {
        gw.metrics.refused_connections.inc();
        if gw.config.tls.is_some() {
            // A plain-text 503 means nothing to a TLS client; closing does.
            return;
        }
        let body = r#"{"error":{"code":"capacity","message":"too many connections; try another gateway"}}"#;
        let resp = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
            body.len()
        );
        let _ = tcp.write_all(resp.as_bytes()).await;
        let _ = tcp.shutdown().await;
        return;
    };
    let _ = tcp.set_nodelay(true);
    // From here the client has `handshake_timeout` to get its first request's
    // headers in: idle or trickling connections (slow loris) would otherwise
    // hold a slot under max_connections for as long as they like.
    let deadline = tokio::time::Instant::now() + gw.config.handshake_timeout;
    let ctx = ConnCtx {
        gw: gw.clone(),
        done,
        _permit: Arc::new(permit),
        peer,
        started: Arc::new(AtomicBool::new(false)),
    };
    let Some(tls) = gw.config.tls.clone() else {
        serve_http(TokioIo::new(tcp), ctx, &mut stop, deadline).await;
        return;
    };
    // The TLS handshake counts against the same deadline as the headers.
    match tokio::time::timeout_at(deadline, tls.acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => serve_http(TokioIo::new(stream), ctx, &mut stop, deadline).await,
        Ok(Err(e)) => {
            gw.metrics.tls_handshake_failures.inc();
            tracing::debug!(error = %e, "TLS handshake failed");
        }
        Err(_) => {
            gw.metrics.timeouts.with_label_values(&["handshake"]).inc();
            tracing::debug!("TLS handshake timed out");
        }
    }
}

/// HTTP/1.1 (with upgrades) on one accepted connection, until it ends, the
/// gateway stops, or the handshake deadline passes before a request.
async fn serve_http<I>(
    io: I,
    ctx: ConnCtx,
    stop: &mut watch::Receiver<bool>,
    deadline: tokio::time::Instant,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let gw = ctx.gw.clone();
    let started = ctx.started.clone();
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(crate::http::route(ctx, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(gw.config.header_read_timeout)
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::pin!(conn);
    let handshake = tokio::time::sleep_until(deadline);
    tokio::pin!(handshake);
    let mut waiting = true;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "http connection ended with an error");
                }
                return;
            }
            _ = stop.changed() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
                return;
            }
            _ = &mut handshake, if waiting => {
                if started.load(Ordering::Relaxed) {
                    waiting = false;
                    continue;
                }
                gw.metrics.timeouts.with_label_values(&["handshake"]).inc();
                tracing::debug!(timeout = ?gw.config.handshake_timeout, "no request in time; closing");
                return;
            }
        }
    }
}
