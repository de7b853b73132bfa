//! The Server-Sent Events fallback: `GET /v1/runs/<run>/stream`.
//!
//! Each message's `data` is the same JSON frame the WebSocket carries; event
//! and gap frames carry `id: <seq>` so a browser's `EventSource` resumes with
//! `Last-Event-ID` on its own after any disconnect.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use runcast_core::{ErrorCode, ProtocolError, RunId};
use tokio::{sync::mpsc, time::Instant};

use crate::{
    Gateway,
    hub::OutFrame,
    session::{Closed, Output, Session, SessionError},
};

/// Encodes one SSE message. JSON frames never contain raw newlines, so a
/// single `data:` line is always enough.
pub fn encode(id: Option<u64>, json: &str) -> Bytes {
    let mut s = String::with_capacity(json.len() + 32);
    if let Some(id) = id {
        s.push_str("id: ");
        s.push_str(&id.to_string());
        s.push('\n');
    }
    s.push_str("data: ");
    s.push_str(json);
    s.push_str("\n\n");
    Bytes::from(s)
}

/// A response body fed by a channel. The channel is small (8 chunks): the
/// session awaits each send, so a slow reader pushes back into the session
/// and from there into the bounded per-connection queue.
pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

struct SseOut(mpsc::Sender<Bytes>);

impl Output for SseOut {
    const TRANSPORT: &'static str = "sse";
    async fn send_shared(&mut self, frame: &Arc<OutFrame>) -> Result<(), Closed> {
        self.0.send(frame.sse().clone()).await.map_err(|_| Closed)
    }
    async fn send_text(&mut self, text: String, id: Option<u64>) -> Result<(), Closed> {
        self.0.send(encode(id, &text)).await.map_err(|_| Closed)
    }
    async fn flush(&mut self) -> Result<(), Closed> {
        Ok(())
    }
}

/// Streams `run` into `tx` until the client goes away, falls behind, or the
/// server drains. Ending the stream is the only "close" SSE has: the client
/// reconnects with `Last-Event-ID` and resumes.
pub async fn serve(
    gw: Arc<Gateway>,
    run: RunId,
    since: Option<u64>,
    tx: mpsc::Sender<Bytes>,
    grant: crate::auth::Grant,
) {
    let transport = gw.metrics.connections.with_label_values(&["sse"]);
    transport.inc();
    // SSE cannot take a fresh token mid-stream: the stream ends when the
    // token expires and the client reconnects with a new one.
    let expires = grant.expires.map(|exp| {
        let left = exp.saturating_sub(runcast_core::now_millis() / 1000);
        Instant::now() + std::time::Duration::from_secs(left)
    });
    let mut s = Session::new(gw.clone(), SseOut(tx), grant);
    let retry = format!("retry: {}\n\n", gw.config.sse_retry.as_millis());
    if s.out.0.send(Bytes::from(retry)).await.is_err() {
        transport.dec();
        return;
    }
    match s.subscribe(run, since).await {
        Ok(()) => {}
        Err(SessionError::Protocol(e)) => {
            let _ = s.send_error(&e).await;
            transport.dec();
            return;
        }
        Err(SessionError::Closed) => {
            transport.dec();
            return;
        }
    }
    let interval = gw.config.heartbeat_interval;
    let mut heartbeat = tokio::time::interval_at(Instant::now() + interval, interval);
    // A second handle on the body channel only to notice the client leaving.
    let client = s.out.0.clone();
    loop {
        let conn = s.conn.clone();
        let step = tokio::select! {
            biased;
            _ = conn.closed() => break,
            _ = client.closed() => break,
            () = async { tokio::time::sleep_until(expires.expect("guarded")).await }, if expires.is_some() => {
                let e = ProtocolError::new(ErrorCode::Unauthorized, "the token expired: reconnect with a fresh access_token and resume");
                let _ = s.send_error(&e).await;
                conn.close(runcast_core::CloseCode::TokenExpired);
                break;
            }
            r = async {
                tokio::select! {
                    Some(f) = s.rx.recv() => s.deliver_batch(f).await,
                    _ = heartbeat.tick() => s.out.0.send(Bytes::from_static(b": heartbeat\n\n")).await.map_err(|_| Closed),
                }
            } => r,
        };
        if step.is_err() {
            break;
        }
    }
    if let Some(code) = s.conn.close_code() {
        gw.metrics
            .closes
            .with_label_values(&[&code.code().to_string()])
            .inc();
    }
    transport.dec();
}
