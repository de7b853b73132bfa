//! What handlers take from a request, each checked once, here: the client's
//! address, its grant (token), the run in the path, query parameters, a
//! bounded body, and admission of a long-lived session. Failures are
//! [`ApiError`]s, answered and counted like every other error.

use std::{borrow::Cow, net::IpAddr, sync::Arc};

use axum::{
    extract::{FromRequestParts, Path, Request},
    http::{HeaderMap, header, request::Parts},
};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use runcast_core::{ErrorCode, ProtocolError, RunId, frame};

use crate::{
    auth::Grant,
    error::{ApiError, truncate},
    gateway::{ConnInfo, Gateway},
    limits::{IpGuard, Refusal},
};

/// The client's address: the TCP peer, or what a trusted proxy says in
/// `X-Forwarded-For` (`--trusted-proxy`).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

impl FromRequestParts<Arc<Gateway>> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, gw: &Arc<Gateway>) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<ConnInfo>()
            .map(|c| c.peer)
            .ok_or_else(|| ApiError::new(ErrorCode::Internal, "request without a connection"))?;
        let xff = parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        Ok(Self(gw.ip_limits.client_ip(peer, xff)))
    }
}

/// A subscriber's grant: who is asking, from its bearer token. A failure is
/// a 401, counted by reason; the token itself is never logged.
impl FromRequestParts<Arc<Gateway>> for Grant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, gw: &Arc<Gateway>) -> Result<Self, ApiError> {
        authenticate(gw, parts)
    }
}

fn authenticate(gw: &Gateway, parts: &Parts) -> Result<Grant, ApiError> {
    gw.config
        .auth
        .authenticate(bearer(parts).as_deref())
        .map_err(|e| {
            gw.metrics
                .auth_failures
                .with_label_values(&[e.kind.as_str()])
                .inc();
            ApiError::new(ErrorCode::Unauthorized, e.message)
        })
}

/// The subscriber's bearer token: the `Authorization` header, a
/// `runcast.bearer.<token>` WebSocket subprotocol entry (browsers), or an
/// `access_token` query parameter (`EventSource`), in that order.
fn bearer(parts: &Parts) -> Option<String> {
    if let Some(t) = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_credentials)
    {
        return Some(t.to_owned());
    }
    if let Some(t) = header_tokens(&parts.headers, header::SEC_WEBSOCKET_PROTOCOL)
        .find_map(|p| p.strip_prefix("runcast.bearer."))
    {
        return Some(t.to_owned());
    }
    query_param(parts.uri.query()?, "access_token").map(|t| t.into_owned())
}

/// The credentials of an `Authorization: Bearer <credentials>` value. The
/// scheme is case-insensitive (RFC 7235 §2.1), so `bearer` and `BEARER` work.
pub fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}

/// The comma-separated tokens of every `name` header, trimmed.
pub fn header_tokens(headers: &HeaderMap, name: header::HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Whether a `name` header lists `token` (case-insensitive).
pub fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    header_tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// The run in a route's `{run}` segment, checked.
pub struct Run(pub RunId);

impl<S: Send + Sync> FromRequestParts<S> for Run {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::new(ErrorCode::InvalidRunId, e.body_text()))?;
        RunId::parse(&raw)
            .map(Run)
            .map_err(|e| ApiError::new(ErrorCode::InvalidRunId, e.to_string()))
    }
}

/// The raw query string (empty when there is none).
pub struct RawQuery(pub String);

impl<S: Send + Sync> FromRequestParts<S> for RawQuery {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(parts.uri.query().unwrap_or("").to_owned()))
    }
}

/// The first value of `key` in a query string, percent-decoded (RFC 3986:
/// `%2E` is `.`; `+` stays `+`, as it does in a token). A `%` not followed by
/// two hex digits is kept as it is.
pub fn query_param<'a>(q: &'a str, key: &str) -> Option<Cow<'a, str>> {
    q.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// `?key=N`: a non-negative integer, when given.
pub fn query_u64(q: &str, key: &str) -> Result<Option<u64>, ProtocolError> {
    query_param(q, key)
        .map(|v| {
            // Digits only: a decoded `%20` around them is not a number
            // (`parse_since` trims, for the `Last-Event-ID` header).
            let parsed = if v.trim() == v {
                frame::parse_since(&v)
            } else {
                Err(ProtocolError::new(
                    ErrorCode::InvalidSince,
                    format!("cursor {:?} must be a non-negative integer", truncate(&v)),
                ))
            };
            parsed.map_err(|e| ProtocolError::new(e.code, format!("{key}: {}", e.message)))
        })
        .transpose()
}

/// `?limit=N`: a positive integer, when given.
pub fn query_limit(q: &str) -> Result<Option<u64>, ProtocolError> {
    match query_u64(q, "limit") {
        Ok(Some(0)) | Err(_) => Err(ProtocolError::new(
            ErrorCode::InvalidQuery,
            format!(
                "limit must be a positive integer, not {:?}",
                query_param(q, "limit")
                    .unwrap_or_default()
                    .chars()
                    .take(32)
                    .collect::<String>()
            ),
        )),
        ok => ok,
    }
}

/// A long-lived session (WebSocket or SSE) admitted: its slot under the
/// client address's limits, and its grant.
pub struct Admitted {
    pub ip: IpGuard,
    pub grant: Grant,
}

/// Whether a new WebSocket or SSE session may start, cheapest checks
/// first: not draining, the client address's limits, then its token.
pub async fn admit(gw: &Arc<Gateway>, parts: &mut Parts) -> Result<Admitted, ApiError> {
    if gw.is_draining() {
        return Err(ApiError::new(
            ErrorCode::Draining,
            "gateway is draining; connect to another",
        ));
    }
    let ClientAddr(ip) = ClientAddr::from_request_parts(parts, gw).await?;
    let guard = gw.ip_limits.acquire(ip).map_err(|why| {
        gw.metrics
            .refused_sessions
            .with_label_values(&[why.as_str()])
            .inc();
        let msg = match why {
            Refusal::PerIp => format!(
                "{ip} already holds {} sessions on this gateway",
                gw.config.max_sessions_per_ip
            ),
            Refusal::Rate => format!("{ip} opens sessions too fast; slow down"),
        };
        ApiError::new(ErrorCode::RateLimited, msg)
    })?;
    let grant = authenticate(gw, parts)?;
    // The clock-skew leeway lets a token in a few seconds past its `exp`,
    // but a session never outlives `exp`: it would be opened only to be
    // closed at once (4003, or an SSE stream that ends), and a client
    // reconnecting with the same token would loop until the leeway ran out.
    // Refused up front instead, like any expired token.
    if let Some(exp) = grant.expires
        && exp <= runcast_core::now_millis() / 1000
    {
        gw.metrics
            .auth_failures
            .with_label_values(&[crate::auth::AuthErrorKind::Expired.as_str()])
            .inc();
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "the token has expired: a session needs a token that has not",
        ));
    }
    Ok(Admitted { ip: guard, grant })
}

/// The per-connection handle a session holds (see [`ConnInfo::detach`]).
pub fn conn_info(parts: &Parts) -> Result<ConnInfo, ApiError> {
    parts
        .extensions
        .get::<ConnInfo>()
        .cloned()
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "request without a connection"))
}

/// A request body of at most `limit` bytes, arriving within the request
/// timeout: a client that trickles its body (slow loris) gets 408 and the
/// connection is closed, instead of holding a task and a buffer.
pub async fn read_body(gw: &Gateway, req: Request, limit: usize) -> Result<Bytes, ApiError> {
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
        if !header_has(req.headers(), header::EXPECT, "100-continue") {
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
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!("body of {n} bytes (Content-Length) is over the limit of {limit} bytes"),
        ));
    }
    let conn = req.extensions().get::<ConnInfo>().cloned();
    let read = Limited::new(req.into_body(), limit).collect();
    match tokio::time::timeout(gw.config.request_timeout, read).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            ErrorCode::TooLarge,
            format!("body is over the limit of {limit} bytes"),
        )),
        Ok(Err(e)) => Err(ApiError::new(
            ErrorCode::InvalidEvent,
            format!("could not read body: {}", truncate(&e.to_string())),
        )),
        Err(_) => {
            gw.metrics
                .timeouts
                .with_label_values(&["request_body"])
                .inc();
            // The connection goes too, as over HTTP/1.1 (`Connection:
            // close`): a slow-body client must not renew its hold on a
            // connection slot one stream at a time.
            if let Some(c) = conn {
                c.activity.close_soon();
            }
            Err(ApiError::new(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(query_param("since=%31&x=1", "since").as_deref(), Some("1"));
        assert_eq!(
            query_param("a=1&st%61tus=runn%69ng", "status").as_deref(),
            Some("running")
        );
        assert_eq!(
            query_param("access_token=a%2Eb.c+d", "access_token").as_deref(),
            Some("a.b.c+d")
        );
        assert_eq!(query_param("x=%zz%4", "x").as_deref(), Some("%zz%4"));
        assert_eq!(query_param("flag", "flag").as_deref(), Some(""));
        assert_eq!(query_param("a=1", "b"), None);
        assert_eq!(query_u64("limit=%35", "limit").unwrap(), Some(5));
        assert!(query_u64("since=%2D1", "since").is_err());
        assert!(query_u64("since=%201", "since").is_err());
        assert!(query_u64("since=1%20", "since").is_err());
        // Not UTF-8 once decoded: replaced, never a panic.
        assert_eq!(query_param("x=%ff", "x").as_deref(), Some("\u{fffd}"));
    }
}
