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

use axum::{
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use hyper::body::{Body, Frame};
use runcast_core::{ErrorCode, ProtocolError, RunId, frame};
use tokio::{sync::mpsc, time::Instant};

use crate::{
    error::ApiError,
    extract::{Run, admit, conn_info, query_u64},
    frame::{OutFrame, sse_message},
    gateway::Gateway,
    runs::{allowed, page_after},
    session::{Closed, Output, Session, SessionError},
};

/// `GET /v1/runs/{run}/stream`: SSE, resuming after `Last-Event-ID` or `?since=`.
pub async fn stream(
    State(gw): State<Arc<Gateway>>,
    Run(run): Run,
    req: Request,
) -> Result<Response, ApiError> {
    let (mut parts, _body) = req.into_parts();
    if parts.method == Method::HEAD {
        // axum answers HEAD with the GET handler; here that would open (and
        // at once end) a session, using up the address's session rate.
        let mut r = ApiError::new(
            ErrorCode::MethodNotAllowed,
            "the SSE stream answers GET only",
        )
        .into_response();
        *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return Ok(r);
    }
    let since = match parts.headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| frame::parse_since(s).ok())
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::InvalidSince,
                        "Last-Event-ID must be a non-negative integer",
                    )
                })?,
        ),
        None => query_u64(parts.uri.query().unwrap_or(""), "since")?,
    };
    let conn = conn_info(&parts)?;
    let admitted = admit(&gw, &mut parts).await?;
    allowed(&admitted.grant, &run)?;
    // A cursor past the run's head is a 400 before the stream starts, as a
    // bad cursor's syntax is: EventSource gives up on an HTTP error, while
    // an error inside a 200 stream would only make it reconnect in a loop.
    if let Some(since) = since {
        page_after(&gw, &run, since, 0).await?;
    }
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let tokens = conn.detach(admitted.ip);
    let grant = admitted.grant;
    let task = async move {
        serve(gw, run, since, tx, grant).await;
        drop(tokens);
    };
    tokio::spawn(tracing::Instrument::instrument(
        task,
        tracing::debug_span!("sse"),
    ));
    let mut r = Response::new(axum::body::Body::new(ChannelBody(rx)));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-style proxies not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(r)
}

/// A response body fed by a channel. The channel is small (8 chunks): the
/// session awaits each send, so a slow reader pushes back into the session
/// and from there into the bounded per-connection queue.
struct ChannelBody(mpsc::Receiver<Bytes>);

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
        self.0
            .send(sse_message(id, &text))
            .await
            .map_err(|_| Closed)
    }
    async fn flush(&mut self) -> Result<(), Closed> {
        Ok(())
    }
}

/// Streams `run` into `tx` until the client goes away, falls behind, or the
/// server drains. Ending the stream is the only "close" SSE has: the client
/// reconnects with `Last-Event-ID` and resumes.
async fn serve(
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
        let conn = s.sub.clone();
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
    if let Some(code) = s.sub.close_code() {
        gw.metrics
            .closes
            .with_label_values(&[&code.code().to_string()])
            .inc();
    }
    transport.dec();
}
