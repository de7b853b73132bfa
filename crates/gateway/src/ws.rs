//! The WebSocket transport: `GET /v1/ws`, its handshake (HTTP/1.1 upgrade,
//! or an RFC 8441 extended CONNECT over HTTP/2) and the session loop on the
//! upgraded socket.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode, Version, header},
    response::{IntoResponse, Response},
};
use futures_util::{SinkExt, StreamExt, stream::SplitSink};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use runcast_core::{
    CloseCode, ErrorCode, ProtocolError,
    frame::{self, ClientFrame},
};
use tokio::time::Instant;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        error::{CapacityError, Error as WsError},
        handshake::derive_accept_key,
        protocol::Role,
        protocol::{CloseFrame, WebSocketConfig, frame::coding::CloseCode as WsCloseCode},
    },
};

use crate::{
    error::{ApiError, truncate},
    extract::{admit, conn_info, header_has, header_tokens},
    frame::OutFrame,
    gateway::Gateway,
    session::{Closed, Output, Session, SessionError},
};

type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// `/v1/ws`: checks the handshake, admits the session, answers `101` (HTTP/1.1)
/// or `200` (HTTP/2 extended CONNECT), and serves the session on the upgraded
/// stream. Everything that can be refused is refused before the upgrade, so
/// the client sees a status it can act on.
pub async fn upgrade(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    match handshake(gw, req).await {
        Ok(r) | Err(r) => r,
    }
}

async fn handshake(gw: Arc<Gateway>, req: Request) -> Result<Response, Response> {
    let (mut parts, _body) = req.into_parts();
    // Cross-site WebSocket hijacking: a page on another site must not open
    // a WebSocket with the user's credentials. Checked before anything else.
    if let Some(o) = parts.headers.get(header::ORIGIN) {
        let o = o.to_str().unwrap_or("");
        if !gw.origin_allowed(o) {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("origin {:?} is not allowed (--allowed-origin)", truncate(o)),
            )
            .into_response());
        }
    }
    // RFC 8441: over HTTP/2 a WebSocket is a CONNECT with `:protocol`.
    let h2 = parts.version == Version::HTTP_2;
    if h2 {
        let is_ws = parts.method == Method::CONNECT
            && parts
                .extensions
                .get::<hyper::ext::Protocol>()
                .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
        if !is_ws {
            return Err(upgrade_required(h2));
        }
    } else if parts.method != Method::GET
        || !header_has(&parts.headers, header::UPGRADE, "websocket")
        || !header_has(&parts.headers, header::CONNECTION, "upgrade")
    {
        return Err(upgrade_required(h2));
    }
    if parts
        .headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        let mut r = ApiError::new(ErrorCode::InvalidFrame, "Sec-WebSocket-Version must be 13")
            .into_response();
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Err(r);
    }
    let accept = if h2 {
        None
    } else {
        let key = parts
            .headers
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or_else(|| {
                ApiError::new(ErrorCode::InvalidFrame, "missing Sec-WebSocket-Key").into_response()
            })?;
        Some(derive_accept_key(key.as_bytes()))
    };
    let conn = conn_info(&parts).map_err(IntoResponse::into_response)?;
    let admitted = admit(&gw, &mut parts)
        .await
        .map_err(IntoResponse::into_response)?;
    // Browsers that send their token as a subprotocol also offer
    // `runcast.v1`; selecting it keeps the token out of the response.
    let offers_v1 =
        header_tokens(&parts.headers, header::SEC_WEBSOCKET_PROTOCOL).any(|p| p == "runcast.v1");
    let on_upgrade = parts
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidFrame, "this connection cannot upgrade").into_response()
        })?;
    let task = async move {
        // A client that gets its 101 but never lets the upgrade finish
        // must not hold the session's slot.
        let limit = gw.config.handshake_timeout;
        let Ok(upgraded) = tokio::time::timeout(limit, on_upgrade).await else {
            gw.metrics.timeouts.with_label_values(&["upgrade"]).inc();
            tracing::debug!(?limit, "websocket upgrade timed out");
            return;
        };
        match upgraded {
            Ok(up) => {
                let tokens = conn.detach(admitted.ip);
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(up),
                    Role::Server,
                    Some(ws_config(&gw)),
                )
                .await;
                serve(gw, ws, admitted.grant).await;
                drop(tokens);
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    };
    tokio::spawn(tracing::Instrument::instrument(
        task,
        tracing::debug_span!("ws", h2),
    ));
    let mut r = Response::new(axum::body::Body::empty());
    match accept {
        // HTTP/2: a 200 to the CONNECT opens the stream.
        None => *r.status_mut() = StatusCode::OK,
        Some(accept) => {
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = r.headers_mut();
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            if let Ok(v) = HeaderValue::from_str(&accept) {
                h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
            }
        }
    }
    if offers_v1 {
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("runcast.v1"),
        );
    }
    Ok(r)
}

/// 426: a plain request on the WebSocket endpoint, often because a proxy
/// stripped the upgrade.
fn upgrade_required(h2: bool) -> Response {
    let how = if h2 {
        "over HTTP/2, open it with an extended CONNECT (RFC 8441, :protocol websocket)"
    } else {
        "send Upgrade: websocket (a proxy may have stripped it; use /v1/runs/<run>/stream for SSE)"
    };
    let mut r = ApiError::new(
        ErrorCode::InvalidFrame,
        format!("this endpoint speaks WebSocket: {how}"),
    )
    .into_response();
    // 426 must name the protocol in `Upgrade`, which HTTP/2 forbids: there
    // it stays the 400 of `invalid_frame`.
    if !h2 {
        *r.status_mut() = StatusCode::UPGRADE_REQUIRED;
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    r
}

/// tungstenite settings for many mostly-idle, write-heavy connections.
///
/// The read buffer is allocated up front and zero-filled on every read
/// attempt, and the connection loop attempts a read on every step, so its
/// size costs both memory per connection and CPU per delivered batch
/// (measured: 5% of server CPU at 4 KiB). Client frames are small
/// (subscribe/unsubscribe), so 512 bytes, not the default 128 KiB; larger
/// frames still work, the buffer grows for them. Writes are batched up to
/// 16 KiB per flush.
fn ws_config(gw: &Gateway) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(512)
        .write_buffer_size(16 << 10)
        .max_write_buffer_size(gw.config.queue_bytes.max(1 << 20) + (64 << 10))
        .max_message_size(Some(gw.config.hard_frame_bytes))
        .max_frame_size(Some(gw.config.hard_frame_bytes))
}

struct WsOut(SplitSink<Ws, Message>);

impl Output for WsOut {
    const TRANSPORT: &'static str = "ws";
    async fn send_shared(&mut self, frame: &Arc<OutFrame>) -> Result<(), Closed> {
        self.0
            .feed(Message::Text(frame.text.clone()))
            .await
            .map_err(|_| Closed)
    }
    async fn send_text(&mut self, text: String, _id: Option<u64>) -> Result<(), Closed> {
        self.0
            .feed(Message::Text(text.into()))
            .await
            .map_err(|_| Closed)
    }
    async fn flush(&mut self) -> Result<(), Closed> {
        self.0.flush().await.map_err(|_| Closed)
    }
}

/// Why a connection's loop ended.
#[derive(Debug, Clone, Copy)]
enum End {
    /// Close with this code: a close frame is sent.
    Close(CloseCode),
    /// The socket is already gone; there is no one to tell.
    Gone,
    /// The client sent a close frame; tungstenite has queued the echo that
    /// completes the closing handshake (RFC 6455 §5.5.1).
    ByClient,
}

impl From<Closed> for End {
    fn from(_: Closed) -> Self {
        End::Gone
    }
}

/// What handling one step did, when it did not end the connection.
enum Handled {
    Done,
    /// A fresh token, expiring at this time (seconds since the epoch), was
    /// accepted: its clock starts over.
    Renewed(u64),
}

enum Step {
    Inbound(Option<Result<Message, WsError>>),
    Frame(Arc<OutFrame>),
    Heartbeat,
    /// The token's refresh point or expiry passed.
    TokenTimer,
}

/// When to act on a token that expires at `exp` (seconds since the epoch):
/// first ask for a fresh one (a tenth of the remaining lifetime before,
/// between 5 s and 60 s), then, at `exp`, close.
struct TokenClock {
    exp: u64,
    asked: bool,
}

impl TokenClock {
    fn deadline(&self) -> Instant {
        let now = runcast_core::now_millis() / 1000;
        let left = self.exp.saturating_sub(now);
        let wait = if self.asked {
            left
        } else {
            left.saturating_sub((left / 10).clamp(5, 60))
        };
        Instant::now() + std::time::Duration::from_secs(wait)
    }
}

/// Serves one upgraded WebSocket until the client leaves, misbehaves, falls
/// behind, or the server drains (shutdown closes every session's `Subscriber`).
async fn serve(gw: Arc<Gateway>, ws: Ws, grant: crate::auth::Grant) {
    let (sink, mut stream) = ws.split();
    let mut clock = grant.expires.map(|exp| TokenClock { exp, asked: false });
    // One timer, reset when the token changes; none for anonymous clients.
    let mut token_timer = clock
        .as_ref()
        .map(|c| Box::pin(tokio::time::sleep_until(c.deadline())));
    let mut s = Session::new(gw.clone(), WsOut(sink), grant);
    let metrics = gw.metrics.clone();
    let transport = metrics.connections.with_label_values(&["websocket"]);
    transport.inc();
    let cfg = &gw.config;
    tracing::debug!(conn = s.id(), "websocket connected");

    let hello = frame::encode_hello(
        s.id(),
        cfg.heartbeat_interval.as_millis() as u64,
        cfg.max_frame_bytes,
        cfg.max_subscriptions,
        s.grant.allows_all(),
    );
    let greeted = match s.out.send_text(hello, None).await {
        Ok(()) => s.out.flush().await,
        Err(c) => Err(c),
    };
    let mut end = greeted.err().map(End::from);
    let mut heartbeat = tokio::time::interval_at(
        Instant::now() + cfg.heartbeat_interval,
        cfg.heartbeat_interval,
    );
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = Instant::now();

    while end.is_none() {
        let step = tokio::select! {
            biased;
            code = s.sub.closed() => { end = Some(End::Close(code)); break; }
            msg = stream.next() => Step::Inbound(msg),
            Some(f) = s.rx.recv() => Step::Frame(f),
            _ = heartbeat.tick() => Step::Heartbeat,
            () = async { token_timer.as_mut().expect("guarded").await }, if token_timer.is_some() => Step::TokenTimer,
        };
        if let Step::TokenTimer = step {
            let Some(c) = clock.as_mut() else { continue };
            if c.asked {
                end = Some(End::Close(CloseCode::TokenExpired));
                break;
            }
            c.asked = true;
            let refresh = frame::encode_refresh(c.exp);
            if s.out.send_text(refresh, None).await.is_err() || s.out.flush().await.is_err() {
                end = Some(End::Gone);
                break;
            }
            if let Some(t) = token_timer.as_mut() {
                t.as_mut().reset(c.deadline());
            }
            continue;
        }
        // A step may block on a slow socket; a close request must still win.
        let conn = s.sub.clone();
        let outcome = tokio::select! {
            biased;
            code = conn.closed() => Err(End::Close(code)),
            r = handle(&mut s, step, &mut last_seen) => r,
        };
        match outcome {
            Err(e) => end = Some(e),
            Ok(Handled::Renewed(exp)) => {
                clock = Some(TokenClock { exp, asked: false });
                let at = clock.as_ref().expect("set").deadline();
                match token_timer.as_mut() {
                    Some(t) => t.as_mut().reset(at),
                    None => token_timer = Some(Box::pin(tokio::time::sleep_until(at))),
                }
            }
            Ok(Handled::Done) => {}
        }
    }

    if let Some(End::ByClient) = end {
        // Bounded, like our own close: the client may stop reading.
        let _ = tokio::time::timeout(cfg.close_timeout, s.out.0.flush()).await;
    }
    if let Some(End::Close(code)) = end {
        metrics
            .closes
            .with_label_values(&[&code.code().to_string()])
            .inc();
        let frame = CloseFrame {
            code: WsCloseCode::from(code.code()),
            reason: code.reason().into(),
        };
        // The peer may not be reading (that is often why we close); give the
        // close frame a bounded time, then drop the socket.
        let _ = tokio::time::timeout(cfg.close_timeout, s.out.0.send(Message::Close(Some(frame))))
            .await;
        tracing::debug!(
            conn = s.id(),
            code = code.code(),
            "websocket closed by server"
        );
    }
    transport.dec();
}

/// Handles one step.
async fn handle(
    s: &mut Session<WsOut>,
    step: Step,
    last_seen: &mut Instant,
) -> Result<Handled, End> {
    let cfg = &s.gw.config;
    match step {
        Step::TokenTimer => Ok(Handled::Done),
        Step::Frame(f) => Ok(s.deliver_batch(f).await.map(|()| Handled::Done)?),
        Step::Heartbeat => {
            if last_seen.elapsed() > cfg.heartbeat_interval + cfg.heartbeat_timeout {
                return Err(End::Close(CloseCode::HeartbeatTimeout));
            }
            s.out
                .0
                .send(Message::Ping(Default::default()))
                .await
                .map(|()| Handled::Done)
                .map_err(|_| End::Gone)
        }
        Step::Inbound(None) => Err(End::Gone),
        Step::Inbound(Some(Err(WsError::Capacity(CapacityError::MessageTooLong {
            size,
            max_size,
        })))) => {
            tracing::debug!(conn = s.id(), size, max_size, "frame over the hard limit");
            Err(End::Close(CloseCode::MessageTooBig))
        }
        Step::Inbound(Some(Err(_))) => Err(End::Gone),
        Step::Inbound(Some(Ok(msg))) => {
            *last_seen = Instant::now();
            let mut renewed = None;
            let result = match msg {
                Message::Text(text) => {
                    if text.len() > cfg.max_frame_bytes {
                        Err(SessionError::Protocol(ProtocolError::new(
                            ErrorCode::TooLarge,
                            format!(
                                "frame of {} bytes is over the limit of {} bytes",
                                text.len(),
                                cfg.max_frame_bytes
                            ),
                        )))
                    } else {
                        match frame::parse_client_frame(&text) {
                            Ok(ClientFrame::Subscribe { run, since }) => {
                                s.subscribe(run, since).await
                            }
                            Ok(ClientFrame::Unsubscribe { run }) => s.unsubscribe(&run).await,
                            Ok(ClientFrame::Auth { token }) => match s.reauth(&token).await {
                                Ok(exp) => {
                                    renewed = exp;
                                    Ok(())
                                }
                                Err(e) => Err(e),
                            },
                            Ok(ClientFrame::Ping) => {
                                match s.out.send_text(frame::PONG.to_owned(), None).await {
                                    Ok(()) => s.out.flush().await.map_err(SessionError::from),
                                    Err(c) => Err(c.into()),
                                }
                            }
                            Err(e) => Err(SessionError::Protocol(e)),
                        }
                    }
                }
                Message::Binary(_) => Err(SessionError::Protocol(ProtocolError::new(
                    ErrorCode::BinaryNotSupported,
                    "binary frames are not part of the protocol; send JSON text frames",
                ))),
                Message::Close(_) => return Err(End::ByClient),
                // tungstenite answers pings itself; any frame proves liveness.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
            };
            match result {
                Ok(()) => Ok(renewed.map_or(Handled::Done, Handled::Renewed)),
                Err(SessionError::Protocol(e)) => {
                    tracing::debug!(conn = s.id(), code = %e.code, "protocol error");
                    s.send_error(&e).await?;
                    Ok(Handled::Done)
                }
                Err(SessionError::Closed) => Err(End::Gone),
            }
        }
    }
}
