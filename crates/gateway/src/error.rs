//! How an HTTP request fails: every error response is
//! `{"error":{"code":..,"message":..}}` with the status
//! [`ErrorCode::http_status`] gives, so HTTP and protocol errors share one
//! vocabulary. Handlers return [`ApiError`]; the router counts every
//! response that carries one (`runcast_protocol_errors_total{code}`), so no
//! route can answer an error without counting it.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use runcast_bus::BusError;
use runcast_core::{ErrorCode, ProtocolError, RunId};

/// A failed request: the protocol error it answers with.
#[derive(Debug)]
pub struct ApiError(pub ProtocolError);

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(ProtocolError::new(code, message))
    }

    pub fn for_run(code: ErrorCode, run: &RunId, message: impl Into<String>) -> Self {
        Self(ProtocolError::for_run(code, run, message))
    }
}

impl From<ProtocolError> for ApiError {
    fn from(e: ProtocolError) -> Self {
        Self(e)
    }
}

/// The code of an error response, left in its extensions for the router's
/// counting layer.
#[derive(Debug, Clone, Copy)]
pub struct Failed(pub ErrorCode);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let ApiError(err) = self;
        let body =
            serde_json::json!({ "error": { "code": err.code.as_str(), "message": err.message } });
        let status = StatusCode::from_u16(err.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = json(status, body.to_string());
        let h = r.headers_mut();
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of a trickled or oversized body is not worth reading.
            // (HTTP/2 has no such header; hyper leaves it out there.)
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r.extensions_mut().insert(Failed(err.code));
        r
    }
}

/// A JSON response.
pub fn json(status: StatusCode, body: impl Into<axum::body::Body>) -> Response {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Maps a bus failure to the protocol error a client sees.
pub fn bus_error(e: BusError, run: &RunId) -> ProtocolError {
    let code = match e {
        BusError::TooManyRuns(_) | BusError::Full(_) | BusError::NoSpace(_) => ErrorCode::Capacity,
        BusError::EventTooLarge { .. } => ErrorCode::TooLarge,
        BusError::Unavailable(_) => ErrorCode::Unavailable,
    };
    ProtocolError::for_run(code, run, e.to_string())
}

/// At most 200 characters of something a client sent, for an error message.
pub fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}
