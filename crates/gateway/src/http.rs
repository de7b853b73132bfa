//! HTTP routes: the API, the WebSocket upgrade, SSE, health and metrics.
//!
//! Every error response is `{"error":{"code":..,"message":..}}` with the
//! status [`ErrorCode::http_status`] gives, so HTTP and protocol errors share
//! one vocabulary.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
};
use hyper_util::rt::TokioIo;
use runcast_bus::RunFilter;
use runcast_core::{ErrorCode, EventKind, NewEvent, ProtocolError, RunId, RunStatus, frame};
use serde_json::value::RawValue;
use tokio_tungstenite::{WebSocketStream, tungstenite::protocol::Role};
use tracing::Instrument;

use crate::{Gateway, server::ConnCtx, session::SessionError, session::bus_error};

pub type Body = BoxBody<Bytes, Infallible>;

const PAGE: &str = include_str!("page.html");

pub async fn route(ctx: ConnCtx, req: Request<Incoming>) -> Response<Body> {
    // The headers are in: the connection's handshake deadline no longer applies.
    ctx.started
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let path = req.uri().path().to_owned();
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let m = req.method().clone();
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // Cross-site WebSocket hijacking: a page on another site must not open
    // a WebSocket with the user's credentials. Checked before anything else.
    if let Some(o) = &origin
        && !origin_allowed(&ctx.gw, o)
        && segs.as_slice() == ["v1", "ws"]
    {
        return counted(
            &ctx.gw,
            ProtocolError::new(
                ErrorCode::Forbidden,
                format!("origin {:?} is not allowed (--allowed-origin)", truncate(o)),
            ),
        );
    }
    if m == Method::OPTIONS {
        return preflight(&ctx.gw, origin.as_deref());
    }
    // Decided before routing moves `ctx`: no copy of the allow-list per request.
    let cors = origin.as_deref().and_then(|o| cors_origin(&ctx.gw, o));
    let mut resp = match (segs.as_slice(), &m) {
        ([] | [""], &Method::GET) => text(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        (["healthz"], &Method::GET) => text(StatusCode::OK, "text/plain", "ok\n"),
        (["readyz"], &Method::GET) => readyz(&ctx.gw),
        (["metrics"], &Method::GET) => {
            let up = ctx.gw.bus.health().is_ok();
            ctx.gw.metrics.record_bus(ctx.gw.bus.stats());
            ctx.gw.metrics.bus_up.set(i64::from(up));
            ctx.gw
                .metrics
                .ready
                .set(i64::from(up && !ctx.gw.is_draining()));
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                ctx.gw.metrics.render(),
            )
        }
        (["v1", "ws"], &Method::GET) => upgrade(ctx.clone(), req),
        (["v1", "runs"], &Method::GET) => match authenticate(&ctx.gw, &req) {
            Ok(grant) => list_runs(&ctx.gw, req.uri().query().unwrap_or(""), &grant).await,
            Err(e) => error(e),
        },
        (["v1", "runs", run], &Method::GET) => match authenticate(&ctx.gw, &req) {
            Ok(grant) => {
                with_run(run, |r| async move {
                    match allowed(&grant, &r) {
                        Ok(()) => get_run(ctx.gw.clone(), r).await,
                        Err(e) => error(e),
                    }
                })
                .await
            }
            Err(e) => error(e),
        },
        (["v1", "runs", run, "events"], &Method::GET) => match authenticate(&ctx.gw, &req) {
            Ok(grant) => {
                let q = req.uri().query().unwrap_or("").to_owned();
                with_run(run, |r| async move {
                    match allowed(&grant, &r) {
                        Ok(()) => history(ctx.gw.clone(), r, q).await,
                        Err(e) => error(e),
                    }
                })
                .await
            }
            Err(e) => error(e),
        },
        (["v1", "runs", run, "events"], &Method::POST) => {
            let run = run.to_string();
            publish(ctx.gw.clone(), run, req).await
        }
        (["v1", "runs", run, "stream"], &Method::GET) => {
            let run = run.to_string();
            stream(ctx.clone(), run, req).await
        }
        (["v1", "admin", op], _) => {
            let op = op.to_string();
            admin(ctx.gw.clone(), &op, req).await
        }
        (["", ..] | [], _)
        | (["healthz" | "readyz" | "metrics"], _)
        | (["v1", "ws"], _)
        | (["v1", "runs"], _)
        | (["v1", "runs", _], _)
        | (["v1", "runs", _, "stream"], _) => method_not_allowed("GET"),
        (["v1", "runs", _, "events"], _) => method_not_allowed("GET, POST"),
        _ => error(ProtocolError::new(
            ErrorCode::NotFound,
            format!("no route for {}", truncate(&path)),
        )),
    };
    if let Some(v) = cors {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    if resp.status().is_client_error() || resp.status().is_server_error() {
        tracing::debug!(method = %m, status = resp.status().as_u16(), "request failed");
    }
    resp
}

/// Whether a browser origin may use this gateway: any, when no list is
/// configured.
fn origin_allowed(gw: &Gateway, origin: &str) -> bool {
    let allowed = &gw.config.allowed_origins;
    allowed.is_empty() || allowed.iter().any(|a| a == origin || a == "*")
}

/// The `Access-Control-Allow-Origin` value for `origin`: only when an
/// allow-list is configured and names it (without a list there is no CORS).
fn cors_origin(gw: &Gateway, origin: &str) -> Option<HeaderValue> {
    if gw.config.allowed_origins.is_empty() || !origin_allowed(gw, origin) {
        return None;
    }
    HeaderValue::from_str(origin).ok()
}

/// CORS preflight: allowed origins may POST JSON with a key or token.
fn preflight(gw: &Gateway, origin: Option<&str>) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    if let Some(v) = origin.and_then(|o| cors_origin(gw, o)) {
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(
                "authorization, content-type, x-runcast-key, last-event-id, traceparent",
            ),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    r
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn text(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    text(status, "application/json", body)
}

pub fn error(err: ProtocolError) -> Response<Body> {
    let body =
        serde_json::json!({ "error": { "code": err.code.as_str(), "message": err.message } });
    let status =
        StatusCode::from_u16(err.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json(status, body.to_string());
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::PAYLOAD_TOO_LARGE {
        // The rest of a trickled or oversized body is not worth reading.
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = error(ProtocolError::new(
        ErrorCode::MethodNotAllowed,
        format!("method not allowed here; allowed: {allow}"),
    ));
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

async fn with_run<F, Fut>(raw: &str, f: F) -> Response<Body>
where
    F: FnOnce(RunId) -> Fut,
    Fut: Future<Output = Response<Body>>,
{
    match RunId::parse(raw) {
        Ok(run) => f(run).await,
        Err(e) => error(ProtocolError::new(ErrorCode::InvalidRunId, e.to_string())),
    }
}

/// The error response, counted in `runcast_protocol_errors_total`.
fn counted(gw: &Gateway, e: ProtocolError) -> Response<Body> {
    gw.metrics
        .protocol_errors
        .with_label_values(&[e.code.as_str()])
        .inc();
    error(e)
}

fn protocol_error(gw: &Gateway, e: SessionError) -> Response<Body> {
    match e {
        SessionError::Protocol(p) => counted(gw, p),
        SessionError::Closed => error(ProtocolError::new(ErrorCode::Internal, "connection closed")),
    }
}

fn readyz(gw: &Gateway) -> Response<Body> {
    if gw.is_draining() {
        return error(ProtocolError::new(
            ErrorCode::Draining,
            "gateway is draining",
        ));
    }
    match gw.bus.health() {
        Ok(()) => text(StatusCode::OK, "text/plain", "ready\n"),
        Err(why) => error(ProtocolError::new(
            ErrorCode::Unavailable,
            format!("bus not ready: {why}"),
        )),
    }
}

/// `GET /v1/runs[?status=running|completed|failed][&limit=N]`
/// Whether a new WebSocket or SSE session may start, cheapest checks
/// first: not draining, the client address's limits, then its token.
fn admit(
    ctx: &ConnCtx,
    req: &Request<Incoming>,
) -> Result<(crate::limits::IpGuard, crate::auth::Grant), ProtocolError> {
    if ctx.gw.is_draining() {
        return Err(ProtocolError::new(
            ErrorCode::Draining,
            "gateway is draining; connect to another",
        ));
    }
    let ip = session_slot(ctx, req)?;
    Ok((ip, authenticate(&ctx.gw, req)?))
}

/// A long-lived session's slot under its client address's limits, or the
/// `rate_limited` error (429 with `Retry-After`). Checked before anything costlier (token checks, upgrade).
fn session_slot(
    ctx: &ConnCtx,
    req: &Request<Incoming>,
) -> Result<crate::limits::IpGuard, ProtocolError> {
    let xff = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    let ip = ctx.gw.ip_limits.client_ip(ctx.peer, xff);
    ctx.gw.ip_limits.acquire(ip).map_err(|why| {
        ctx.gw
            .metrics
            .refused_sessions
            .with_label_values(&[why.as_str()])
            .inc();
        let msg = match why {
            crate::limits::Refusal::PerIp => format!(
                "{ip} already holds {} sessions on this gateway",
                ctx.gw.config.max_sessions_per_ip
            ),
            crate::limits::Refusal::Rate => format!("{ip} opens sessions too fast; slow down"),
        };
        ProtocolError::new(ErrorCode::RateLimited, msg)
    })
}

/// The subscriber's bearer token: the `Authorization` header, a
/// `runcast.bearer.<token>` WebSocket subprotocol entry (browsers), or an
/// `access_token` query parameter (`EventSource`), in that order.
fn bearer(req: &Request<Incoming>) -> Option<String> {
    if let Some(t) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_credentials)
    {
        return Some(t.to_owned());
    }
    if let Some(t) = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix("runcast.bearer."))
    {
        return Some(t.to_owned());
    }
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("access_token="))
        .map(str::to_owned)
}

/// The credentials of an `Authorization: Bearer <credentials>` value. The
/// scheme is case-insensitive (RFC 7235 §2.1), so `bearer` and `BEARER` work.
pub(crate) fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}

/// Who is asking: a grant, or the 401 to send. Failures are counted by
/// reason; the token itself is never logged.
fn authenticate(
    gw: &Gateway,
    req: &Request<Incoming>,
) -> Result<crate::auth::Grant, ProtocolError> {
    gw.config
        .auth
        .authenticate(bearer(req).as_deref())
        .map_err(|e| {
            gw.metrics
                .auth_failures
                .with_label_values(&[e.kind.as_str()])
                .inc();
            ProtocolError::new(ErrorCode::Unauthorized, e.message)
        })
}

fn allowed(grant: &crate::auth::Grant, run: &RunId) -> Result<(), ProtocolError> {
    if grant.allows(run) {
        Ok(())
    } else {
        Err(ProtocolError::for_run(
            ErrorCode::Forbidden,
            run,
            "your token does not cover this run",
        ))
    }
}

async fn list_runs(gw: &Gateway, q: &str, grant: &crate::auth::Grant) -> Response<Body> {
    let limit = match query_limit(q) {
        Ok(l) => l.map_or(usize::MAX, |l| l as usize),
        Err(e) => return error(e),
    };
    let status = match q.split('&').find_map(|kv| kv.strip_prefix("status=")) {
        None => None,
        Some(s) => match RunStatus::parse(s) {
            Some(st) => Some(st),
            None => {
                return error(ProtocolError::new(
                    ErrorCode::InvalidQuery,
                    format!(
                        "status must be running, completed or failed, not {:?}",
                        truncate(s)
                    ),
                ));
            }
        },
    };
    // A scoped token sees only its runs: filter before applying the limit.
    let fetch = if grant.allows_all() {
        limit
    } else {
        usize::MAX
    };
    match gw
        .bus
        .runs(RunFilter {
            status,
            limit: fetch,
        })
        .await
    {
        Ok(runs) => {
            let runs: Vec<_> = runs
                .into_iter()
                .filter(|r| grant.allows(&r.run))
                .take(limit)
                .collect();
            match encode_runs(&runs) {
                Ok(body) => json(StatusCode::OK, body),
                Err(e) => error(ProtocolError::new(
                    ErrorCode::Internal,
                    format!("could not encode the run list: {e}"),
                )),
            }
        }
        Err(e) => error(ProtocolError::new(ErrorCode::Unavailable, e.to_string())),
    }
}

/// `{"runs":[..]}`, straight from the states, never through a `Value`:
/// they hold publisher data verbatim (see `frame::encode_state`).
pub(crate) fn encode_runs(runs: &[runcast_core::RunState]) -> Result<String, serde_json::Error> {
    #[derive(serde::Serialize)]
    struct Runs<'a> {
        runs: &'a [runcast_core::RunState],
    }
    serde_json::to_string(&Runs { runs })
}

async fn get_run(gw: Arc<Gateway>, run: RunId) -> Response<Body> {
    match gw.bus.state(&run).await {
        Ok(Some(s)) => match serde_json::to_string(&s) {
            Ok(body) => json(StatusCode::OK, body),
            Err(e) => error(ProtocolError::for_run(
                ErrorCode::Internal,
                &run,
                format!("could not encode the run's state: {e}"),
            )),
        },
        Ok(None) => error(ProtocolError::for_run(
            ErrorCode::RunNotFound,
            &run,
            format!("run {run} has no retained events"),
        )),
        Err(e) => protocol_error(&gw, bus_error(e, &run)),
    }
}

pub(crate) fn query_u64(q: &str, key: &str) -> Result<Option<u64>, ProtocolError> {
    for pair in q.split('&') {
        if let Some((k, v)) = pair.split_once('=')
            && k == key
        {
            return frame::parse_since(v)
                .map(Some)
                .map_err(|e| ProtocolError::new(e.code, format!("{key}: {}", e.message)));
        }
    }
    Ok(None)
}

/// `?limit=N`: a positive integer, when given.
pub(crate) fn query_limit(q: &str) -> Result<Option<u64>, ProtocolError> {
    match query_u64(q, "limit") {
        Ok(Some(0)) | Err(_) => Err(ProtocolError::new(
            ErrorCode::InvalidQuery,
            format!(
                "limit must be a positive integer, not {:?}",
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("limit="))
                    .unwrap_or("")
                    .chars()
                    .take(32)
                    .collect::<String>()
            ),
        )),
        ok => ok,
    }
}

/// `GET /v1/runs/<run>/events?since=N&limit=M`: one page of history.
async fn history(gw: Arc<Gateway>, run: RunId, q: String) -> Response<Body> {
    let (since, limit) = match (query_u64(&q, "since"), query_limit(&q)) {
        (Ok(s), Ok(l)) => (s.unwrap_or(0), l.unwrap_or(100).min(1000) as usize),
        (Err(e), _) | (_, Err(e)) => return error(e),
    };
    let page = match gw.bus.read(&run, since.saturating_add(1), limit).await {
        Ok(p) => p,
        Err(e) => return protocol_error(&gw, bus_error(e, &run)),
    };
    if since > page.head {
        return error(ProtocolError::for_run(
            ErrorCode::SinceOutOfRange,
            &run,
            format!("since {since} is past the run's last seq {}", page.head),
        ));
    }
    json(StatusCode::OK, encode_history(&run, &page, since))
}

/// A history page's body: `{"run","events":[event frames],"first","head","next_since","gap"}`.
pub(crate) fn encode_history(run: &RunId, page: &runcast_bus::Page, since: u64) -> String {
    let mut body = String::from("{\"run\":\"");
    body.push_str(run.as_str());
    body.push_str("\",\"events\":[");
    for (i, ev) in page.events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&frame::encode_event(ev));
    }
    let next = page
        .events
        .last()
        .map_or(since.max(page.first.saturating_sub(1)), |e| e.seq);
    let gap = (since + 1 < page.first && page.first > 1).then(|| (since + 1, page.first - 1));
    body.push_str(&format!(
        "],\"first\":{},\"head\":{},\"next_since\":{},\"gap\":{}}}",
        page.first,
        page.head,
        next,
        gap.map_or("null".to_string(), |(f, t)| format!(
            "{{\"from\":{f},\"to\":{t}}}"
        ))
    ));
    body
}

#[derive(serde::Deserialize)]
struct PublishItem {
    kind: Option<serde_json::Value>,
    /// `None` only when the field is absent: `"data": null` is valid data.
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
    traceparent: Option<String>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    <Box<RawValue> as serde::Deserialize>::deserialize(d).map(Some)
}

pub(crate) fn parse_publish(
    body: &[u8],
    max_batch: usize,
    header_tp: Option<&str>,
) -> Result<Vec<NewEvent>, ProtocolError> {
    let raw: &RawValue = serde_json::from_slice(body).map_err(|e| {
        ProtocolError::new(
            ErrorCode::InvalidJson,
            format!("body is not valid JSON: {e}"),
        )
    })?;
    let text = raw.get().trim_start();
    let items: Vec<PublishItem> = if text.starts_with('[') {
        serde_json::from_str(text).map_err(|e| {
            ProtocolError::new(
                ErrorCode::InvalidEvent,
                format!("each event must be {{\"kind\":..,\"data\":..}}: {e}"),
            )
        })?
    } else if text.starts_with('{') {
        vec![serde_json::from_str(text).map_err(|e| {
            ProtocolError::new(
                ErrorCode::InvalidEvent,
                format!("an event is {{\"kind\":..,\"data\":..}}: {e}"),
            )
        })?]
    } else {
        return Err(ProtocolError::new(
            ErrorCode::InvalidEvent,
            "body must be an event object or an array of them",
        ));
    };
    if items.is_empty() {
        return Err(ProtocolError::new(
            ErrorCode::InvalidEvent,
            "the array of events is empty",
        ));
    }
    if items.len() > max_batch {
        return Err(ProtocolError::new(
            ErrorCode::TooManyEvents,
            format!(
                "{} events in one request; the limit is {max_batch}",
                items.len()
            ),
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, it)| {
            let kind = match it.kind {
                Some(serde_json::Value::String(k)) => EventKind::parse(&k).map_err(|e| {
                    ProtocolError::new(ErrorCode::InvalidKind, format!("event {i}: {e}"))
                })?,
                Some(_) => {
                    return Err(ProtocolError::new(
                        ErrorCode::InvalidKind,
                        format!("event {i}: \"kind\" must be a string"),
                    ));
                }
                None => {
                    return Err(ProtocolError::new(
                        ErrorCode::InvalidKind,
                        format!("event {i} has no \"kind\""),
                    ));
                }
            };
            let data = it.data.ok_or_else(|| {
                ProtocolError::new(
                    ErrorCode::InvalidEvent,
                    format!("event {i} has no \"data\""),
                )
            })?;
            runcast_core::check_depth(&data).map_err(|e| {
                ProtocolError::new(ErrorCode::DataTooDeep, format!("event {i}: {e}"))
            })?;
            // A malformed traceparent is dropped, as W3C Trace Context says
            // to: it would only put a publisher's junk into every client's
            // frames and logs as a trace ID no trace has.
            let traceparent = it
                .traceparent
                .or_else(|| header_tp.map(str::to_owned))
                .filter(|tp| runcast_telemetry::trace_id(tp).is_some());
            Ok(NewEvent {
                kind,
                data,
                traceparent,
            })
        })
        .collect()
}

/// `POST /v1/runs/<run>/events`
async fn publish(gw: Arc<Gateway>, raw_run: String, req: Request<Incoming>) -> Response<Body> {
    let run = match RunId::parse(&raw_run) {
        Ok(r) => r,
        Err(e) => return error(ProtocolError::new(ErrorCode::InvalidRunId, e.to_string())),
    };
    if gw.is_draining() {
        return error(ProtocolError::new(
            ErrorCode::Draining,
            "gateway is draining; publish to another",
        ));
    }
    // The key is checked before the body is read: an unauthorized client
    // cannot make the gateway buffer anything.
    let key = req
        .headers()
        .get("x-runcast-key")
        .or_else(|| req.headers().get(header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .map(|v| bearer_credentials(v).unwrap_or(v).trim().to_owned());
    let checked = gw
        .config
        .publish_keys
        .check(key.as_deref(), &run)
        .and_then(|name| match name {
            Some(n) if !gw.key_rates.take(&n) => Err(ProtocolError::new(
                ErrorCode::RateLimited,
                format!("API key {n:?} publishes faster than --publish-rate-per-key; slow down"),
            )),
            _ => Ok(()),
        });
    if let Err(e) = checked {
        return counted(&gw, e);
    }
    let limit = gw.config.max_publish_bytes;
    let tp = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 256)
        .map(str::to_owned);
    let body = match read_body(&gw, req, limit).await {
        Ok(b) => b,
        Err(e) => return counted(&gw, e),
    };
    let events = match parse_publish(&body, gw.config.max_batch, tp.as_deref()) {
        Ok(ev) => ev,
        Err(e) => return counted(&gw, e),
    };
    let n = events.len() as u64;
    // Continues the publisher's trace (the body's or the header's
    // traceparent) when this gateway exports traces; otherwise events keep
    // the traceparent they came with.
    let span = tracing::info_span!(
        target: runcast_telemetry::TARGET,
        "runcast.publish",
        otel.kind = "server",
        runcast.run = %run,
        runcast.events = n,
    );
    let mut events = events;
    let parent = events.first().and_then(|e| e.traceparent.as_deref());
    if let Some(tp) = runcast_telemetry::continue_trace(&span, parent) {
        for e in &mut events {
            e.traceparent = Some(tp.clone());
        }
    }
    match gw.bus.publish(&run, events).instrument(span).await {
        Ok(seqs) => {
            gw.metrics.events_published.inc_by(n);
            json(
                StatusCode::OK,
                serde_json::json!({ "run": run, "seqs": seqs }).to_string(),
            )
        }
        Err(e) => protocol_error(&gw, bus_error(e, &run)),
    }
}

/// `/v1/admin/{stats,drain,shed}`, for the operator: bearer token first.
async fn admin(gw: Arc<Gateway>, op: &str, req: Request<Incoming>) -> Response<Body> {
    if let Err(e) = authorize(&gw, &req) {
        return error(e);
    }
    let accepted = |n: u64| {
        json(
            StatusCode::ACCEPTED,
            serde_json::json!({ "clients": n }).to_string(),
        )
    };
    match (op, req.method()) {
        ("stats", &Method::GET) => json(
            StatusCode::OK,
            serde_json::to_string(&gw.stats()).unwrap_or_default(),
        ),
        ("drain", &Method::POST) => {
            match admin_body::<runcast_core::admin::Drain>(&gw, req).await {
                Ok(d) => match gw.drain(&d.unwrap_or_default()) {
                    Ok(n) => accepted(n),
                    Err(e) => error(e),
                },
                Err(e) => error(e),
            }
        }
        ("shed", &Method::POST) => match admin_body::<runcast_core::admin::Shed>(&gw, req).await {
            Ok(Some(s)) => match gw.shed(&s) {
                Ok(n) => accepted(n),
                Err(e) => error(e),
            },
            Ok(None) => error(ProtocolError::new(
                ErrorCode::InvalidEvent,
                r#"shed needs a body like {"count":100,"rate":50,"jitter_ms":500}"#,
            )),
            Err(e) => error(e),
        },
        ("stats", _) => method_not_allowed("GET"),
        ("drain" | "shed", _) => method_not_allowed("POST"),
        _ => error(ProtocolError::new(
            ErrorCode::NotFound,
            "admin routes are stats, drain and shed",
        )),
    }
}

/// The admin API needs `Authorization: Bearer <--admin-token>`; without a
/// configured token it is off. Compared in constant time.
fn authorize(gw: &Gateway, req: &Request<Incoming>) -> Result<(), ProtocolError> {
    use subtle::ConstantTimeEq;
    let Some(token) = gw.config.admin_token.as_deref().filter(|t| !t.is_empty()) else {
        return Err(ProtocolError::new(
            ErrorCode::Unauthorized,
            "the admin API is off: start the gateway with --admin-token",
        ));
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_credentials)
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err(ProtocolError::new(
            ErrorCode::Unauthorized,
            "missing or wrong bearer token for the admin API",
        ))
    }
}

/// A request body of at most `limit` bytes, arriving within the request
/// timeout: a client that trickles its body (slow loris) gets 408 and the
/// connection is closed, instead of holding a task and a buffer.
async fn read_body(
    gw: &Gateway,
    req: Request<Incoming>,
    limit: usize,
) -> Result<Bytes, ProtocolError> {
    // A body that says up front it is too large is refused from its header:
    // nothing of it is read, and a client that sent `Expect: 100-continue`
    // never gets the 100 (hyper sends it only once the body is polled).
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(n) = declared
        && n > limit as u64
    {
        // A client that asked `Expect: 100-continue` sends nothing more and
        // reads the 413. Any other is sending the body right now; closing
        // with it unread would reset the connection before the client reads
        // the answer. So the body is discarded in the background (bounded in
        // bytes and time) while the 413 goes out, as nginx's lingering close
        // does; reading it never grows a buffer.
        if !header_has(&req, header::EXPECT, "100-continue") {
            let deadline = gw.config.request_timeout;
            let cap = n.min(MAX_DISCARD);
            tokio::spawn(async move {
                let mut body = req.into_body();
                let mut seen = 0u64;
                let drain = async {
                    while let Some(Ok(frame)) = body.frame().await {
                        seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                        if seen >= cap {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(deadline, drain).await;
            });
        }
        return Err(ProtocolError::new(
            ErrorCode::TooLarge,
            format!("body of {n} bytes (Content-Length) is over the limit of {limit} bytes"),
        ));
    }
    let read = Limited::new(req.into_body(), limit).collect();
    match tokio::time::timeout(gw.config.request_timeout, read).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ProtocolError::new(
            ErrorCode::TooLarge,
            format!("body is over the limit of {limit} bytes"),
        )),
        Ok(Err(e)) => Err(ProtocolError::new(
            ErrorCode::InvalidEvent,
            format!("could not read body: {e}"),
        )),
        Err(_) => {
            gw.metrics
                .timeouts
                .with_label_values(&["request_body"])
                .inc();
            Err(ProtocolError::new(
                ErrorCode::RequestTimeout,
                format!(
                    "the body did not arrive within {:?} (--request-timeout)",
                    gw.config.request_timeout
                ),
            ))
        }
    }
}

/// The most of a refused oversized body discarded before the connection is
/// closed anyway.
const MAX_DISCARD: u64 = 64 << 20;

/// An optional JSON body of at most 64 KiB.
async fn admin_body<T: serde::de::DeserializeOwned>(
    gw: &Gateway,
    req: Request<Incoming>,
) -> Result<Option<T>, ProtocolError> {
    let body = read_body(gw, req, 64 << 10).await.map_err(|mut e| {
        e.message = format!("admin body: {}", e.message);
        e
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| ProtocolError::new(ErrorCode::InvalidJson, format!("admin body: {e}")))
}

fn header_has(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// `GET /v1/ws`: the WebSocket handshake on hyper, then the session on the
/// upgraded socket.
fn upgrade(ctx: ConnCtx, mut req: Request<Incoming>) -> Response<Body> {
    if !header_has(&req, header::UPGRADE, "websocket")
        || !header_has(&req, header::CONNECTION, "upgrade")
    {
        let mut r = error(ProtocolError::new(
            ErrorCode::InvalidFrame,
            "this endpoint speaks WebSocket: send Upgrade: websocket (a proxy may have stripped it; use /v1/runs/<run>/stream for SSE)",
        ));
        *r.status_mut() = StatusCode::UPGRADE_REQUIRED;
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return r;
    }
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        let mut r = error(ProtocolError::new(
            ErrorCode::InvalidFrame,
            "Sec-WebSocket-Version must be 13",
        ));
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return r;
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return error(ProtocolError::new(
            ErrorCode::InvalidFrame,
            "missing Sec-WebSocket-Key",
        ));
    };
    // Refused before the upgrade, so the client sees a status it can act on.
    let (ip, grant) = match admit(&ctx, &req) {
        Ok(a) => a,
        Err(e) => return error(e),
    };
    // Browsers that send their token as a subprotocol also offer
    // `runcast.v1`; selecting it keeps the token out of the response.
    let offers_v1 = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "runcast.v1");
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let span = tracing::debug_span!("ws");
    let task = async move {
        // A client that gets its 101 but never lets the upgrade finish
        // must not hold the session's slot.
        let limit = ctx.gw.config.handshake_timeout;
        let Ok(upgraded) = tokio::time::timeout(limit, on_upgrade).await else {
            ctx.gw
                .metrics
                .timeouts
                .with_label_values(&["upgrade"])
                .inc();
            tracing::debug!(?limit, "websocket upgrade timed out");
            return;
        };
        match upgraded {
            Ok(up) => {
                let cfg = crate::ws::ws_config(&ctx.gw);
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, Some(cfg))
                        .await;
                let (gw, tokens) = ctx.detach(ip);
                crate::ws::serve(gw, ws, grant).await;
                drop(tokens);
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    };
    tokio::spawn(tracing::Instrument::instrument(task, span));
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if offers_v1 {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("runcast.v1"),
        );
    }
    r
}

/// `GET /v1/runs/<run>/stream`: SSE, resuming after `Last-Event-ID` or `?since=`.
async fn stream(ctx: ConnCtx, raw_run: String, req: Request<Incoming>) -> Response<Body> {
    let run = match RunId::parse(&raw_run) {
        Ok(r) => r,
        Err(e) => return error(ProtocolError::new(ErrorCode::InvalidRunId, e.to_string())),
    };
    let since = match req.headers().get("last-event-id") {
        Some(v) => match v
            .to_str()
            .map_err(|_| ())
            .and_then(|s| frame::parse_since(s).map_err(|_| ()))
        {
            Ok(n) => Some(n),
            Err(()) => {
                return error(ProtocolError::new(
                    ErrorCode::InvalidSince,
                    "Last-Event-ID must be a non-negative integer",
                ));
            }
        },
        None => match query_u64(req.uri().query().unwrap_or(""), "since") {
            Ok(s) => s,
            Err(e) => return error(e),
        },
    };
    let (ip, grant) = match admit(&ctx, &req) {
        Ok(a) => a,
        Err(e) => return error(e),
    };
    if let Err(e) = allowed(&grant, &run) {
        return error(e);
    }
    // A cursor past the run's head is a 400 before the stream starts, as a
    // bad cursor's syntax is: EventSource gives up on an HTTP error, while
    // an error inside a 200 stream would only make it reconnect in a loop.
    if let Some(since) = since {
        match ctx.gw.bus.read(&run, since.saturating_add(1), 0).await {
            Ok(page) if since > page.head => {
                return counted(
                    &ctx.gw,
                    ProtocolError::for_run(
                        ErrorCode::SinceOutOfRange,
                        &run,
                        format!("since {since} is past the run's last seq {}", page.head),
                    ),
                );
            }
            Ok(_) => {}
            Err(e) => return protocol_error(&ctx.gw, bus_error(e, &run)),
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let (gw, tokens) = ctx.detach(ip);
    let task = async move {
        crate::sse::serve(gw, run, since, tx, grant).await;
        drop(tokens);
    };
    tokio::spawn(tracing::Instrument::instrument(
        task,
        tracing::debug_span!("sse"),
    ));
    let mut r = Response::new(BodyExt::boxed(crate::sse::ChannelBody(rx)));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-style proxies not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_bodies() {
        let ok = parse_publish(br#"{"kind":"progress","data":{"done": 1}}"#, 10, None).unwrap();
        assert_eq!(ok[0].data.get(), r#"{"done": 1}"#);
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let batch = parse_publish(
            br#"[{"kind":"log","data":"a"},{"kind":"x-y","data":null,"traceparent":"00-junk"}]"#,
            10,
            Some(tp),
        )
        .unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[0].traceparent.as_deref(), Some(tp));
        assert_eq!(
            batch[1].traceparent, None,
            "a malformed traceparent is dropped"
        );
        let code = |b: &[u8]| parse_publish(b, 2, None).unwrap_err().code;
        assert_eq!(code(b"nope"), ErrorCode::InvalidJson);
        assert_eq!(code(b"42"), ErrorCode::InvalidEvent);
        assert_eq!(code(b"[]"), ErrorCode::InvalidEvent);
        assert_eq!(code(br#"{"kind":"log"}"#), ErrorCode::InvalidEvent);
        assert_eq!(code(br#"{"data":1}"#), ErrorCode::InvalidKind);
        assert_eq!(
            code(br#"{"kind":"Bad.Kind","data":1}"#),
            ErrorCode::InvalidKind
        );
        assert_eq!(code(br#"{"kind":7,"data":1}"#), ErrorCode::InvalidKind);
        assert_eq!(
            code(br#"[{"kind":"log","data":1},{"kind":"log","data":1},{"kind":"log","data":1}]"#),
            ErrorCode::TooManyEvents
        );
    }
}
