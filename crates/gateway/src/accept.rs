//! The accept loop: what happens to a TCP connection before and around
//! HTTP. The 503 for a connection over `max_connections` (before hyper sees
//! it), the handshake deadline (TLS and the first request's headers), TLS
//! with certificate reload, HTTP/1.1 or HTTP/2 (ALPN `h2`, or h2c with
//! prior knowledge in plain text) serving the [router](crate::router), and
//! the paced drain at shutdown.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use futures_util::TryFutureExt;
use hyper::{Request, body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tower::ServiceExt;
use tracing::Instrument;

use crate::gateway::{Activity, Busy, ConnInfo, Gateway, Slot};

/// A response body that keeps its connection busy while it streams.
struct Guarded {
    body: axum::body::Body,
    _busy: Option<Busy>,
}

impl hyper::body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
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
    let router = crate::router::router(gw.clone());
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
                tokio::spawn(serve_tcp(tcp, addr.ip(), ctx_parts, router.clone()).instrument(span));
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
    router: axum::Router,
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
        gw.metrics
            .protocol_errors
            .with_label_values(&["capacity"])
            .inc();
        let _ = tcp.write_all(resp.as_bytes()).await;
        let _ = tcp.shutdown().await;
        return;
    };
    let _ = tcp.set_nodelay(true);
    // From here the client has `handshake_timeout` to get its first request's
    // headers in: idle or trickling connections (slow loris) would otherwise
    // hold a slot under max_connections for as long as they like.
    let deadline = tokio::time::Instant::now() + gw.config.handshake_timeout;
    let conn = ConnInfo {
        done,
        permit: Arc::new(Slot::new(permit, gw.metrics.tcp_connections.clone())),
        peer,
        activity: Activity::default(),
    };
    let Some(tls) = gw.config.tls.clone() else {
        serve_http(TokioIo::new(tcp), &gw, conn, router, &mut stop, deadline).await;
        return;
    };
    // The TLS handshake counts against the same deadline as the headers.
    match tokio::time::timeout_at(deadline, tls.acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            serve_http(TokioIo::new(stream), &gw, conn, router, &mut stop, deadline).await
        }
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

/// HTTP/1.1 (with upgrades) or HTTP/2 (with RFC 8441 WebSockets) on one
/// accepted connection, until it ends, the gateway stops, or the handshake
/// deadline passes before a request.
async fn serve_http<I>(
    io: I,
    gw: &Gateway,
    conn: ConnInfo,
    router: axum::Router,
    stop: &mut watch::Receiver<bool>,
    deadline: tokio::time::Instant,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let started = Arc::new(AtomicBool::new(false));
    let activity = conn.activity.clone();
    let svc = {
        let started = started.clone();
        service_fn(move |mut req: Request<Incoming>| {
            // The headers are in: the connection's handshake deadline no
            // longer applies.
            started.store(true, Ordering::Relaxed);
            let busy = conn.activity.busy();
            req.extensions_mut().insert(conn.clone());
            crate::router::normalize_path(&mut req);
            // Busy while the handler runs, and after that while a streamed
            // body (SSE) is open. A response of known length is done on our
            // side: a client that stalls it behind a zero flow-control
            // window must not keep the connection from counting as idle.
            router.clone().oneshot(req).map_ok(move |resp| {
                let streams = hyper::body::Body::size_hint(resp.body()).exact().is_none();
                resp.map(|body| Guarded {
                    body,
                    _busy: streams.then_some(busy),
                })
            })
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(gw.config.header_read_timeout);
    // HTTP/2 pings find dead peers of idle streams, as WebSocket pings do.
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .keep_alive_interval(gw.config.heartbeat_interval)
        .keep_alive_timeout(gw.config.heartbeat_timeout);
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    let handshake = tokio::time::sleep_until(deadline);
    tokio::pin!(handshake);
    let mut waiting = true;
    // A connection with nothing in flight for a whole `idle` period (no
    // handler running, no stream open, no request started) is closed:
    // gracefully (GOAWAY over HTTP/2), then, after one more period, for
    // good, whatever responses a client left unread. Before its first
    // request the handshake deadline rules instead.
    let idle = gw.config.header_read_timeout;
    let mut idle_check = tokio::time::interval_at(tokio::time::Instant::now() + idle, idle);
    let mut seen = u64::MAX;
    let closing = activity.clone();
    let closing = closing.closing();
    tokio::pin!(closing);
    loop {
        tokio::select! {
            _ = idle_check.tick() => {
                let now = activity.started();
                if activity.idle() && now == seen {
                    tracing::debug!(?idle, "idle connection; closing");
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(idle, conn).await;
                    return;
                }
                seen = now;
            }
            () = &mut closing => {
                tracing::debug!("closing the connection after a timed-out request");
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(idle, conn).await;
                return;
            }
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
