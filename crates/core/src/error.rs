use std::fmt;

use crate::RunId;

/// Stable error codes, shared by protocol error frames, HTTP error bodies and
/// metric labels. Clients match on these strings; never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame or body is not valid JSON.
    InvalidJson,
    /// Valid JSON, but not a frame of the protocol (not an object, no `type`, wrong field types).
    InvalidFrame,
    /// A frame `type` the server does not know.
    UnknownType,
    /// A run ID that is missing or breaks the run ID rules.
    InvalidRunId,
    /// `since` is not a non-negative integer.
    InvalidSince,
    /// `since` is past the run's last sequence number.
    SinceOutOfRange,
    /// A binary WebSocket frame; the protocol is JSON text.
    BinaryNotSupported,
    /// A frame or body larger than the configured limit.
    TooLarge,
    /// The connection already has the maximum number of subscriptions.
    TooManySubscriptions,
    /// Subscribe for a run this connection already subscribes to.
    AlreadySubscribed,
    /// Unsubscribe for a run this connection does not subscribe to.
    NotSubscribed,
    /// An event kind outside `progress|log|status|complete|error|[a-z0-9_-]{1,64}`.
    InvalidKind,
    /// A publish body that is JSON but not an event or array of events.
    InvalidEvent,
    /// A publish batch with more events than allowed.
    TooManyEvents,
    /// The bus holds as many runs or bytes as it is allowed to.
    Capacity,
    /// The run is not known.
    RunNotFound,
    /// No such HTTP route.
    NotFound,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// The bus is unreachable or failed; retry.
    Unavailable,
    /// The server is draining; reconnect elsewhere.
    Draining,
    /// The admin API needs a valid bearer token (or is disabled); or a
    /// subscriber's token is missing, invalid or expired.
    Unauthorized,
    /// The token is valid but does not cover this run.
    Forbidden,
    /// Too many sessions from one address, or opened too fast.
    RateLimited,
    /// The request conflicts with work in progress (a drain or shed).
    Conflict,
    /// The client sent its request body too slowly (`--request-timeout`).
    RequestTimeout,
    /// Event data nested deeper than [`crate::MAX_DATA_DEPTH`] arrays and objects.
    DataTooDeep,
    /// A query parameter (`limit`, `status`) with a value it cannot take.
    InvalidQuery,
    /// A bug or unexpected failure on the server.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidFrame => "invalid_frame",
            Self::UnknownType => "unknown_type",
            Self::InvalidRunId => "invalid_run_id",
            Self::InvalidSince => "invalid_since",
            Self::SinceOutOfRange => "since_out_of_range",
            Self::BinaryNotSupported => "binary_not_supported",
            Self::TooLarge => "too_large",
            Self::TooManySubscriptions => "too_many_subscriptions",
            Self::AlreadySubscribed => "already_subscribed",
            Self::NotSubscribed => "not_subscribed",
            Self::InvalidKind => "invalid_kind",
            Self::InvalidEvent => "invalid_event",
            Self::TooManyEvents => "too_many_events",
            Self::Capacity => "capacity",
            Self::RunNotFound => "run_not_found",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Unavailable => "unavailable",
            Self::Draining => "draining",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
            Self::Conflict => "conflict",
            Self::RequestTimeout => "request_timeout",
            Self::DataTooDeep => "data_too_deep",
            Self::InvalidQuery => "invalid_query",
            Self::Internal => "internal",
        }
    }

    /// The HTTP status this code maps to on the HTTP API.
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidJson
            | Self::InvalidFrame
            | Self::UnknownType
            | Self::InvalidRunId
            | Self::InvalidSince
            | Self::SinceOutOfRange
            | Self::BinaryNotSupported
            | Self::TooManySubscriptions
            | Self::AlreadySubscribed
            | Self::NotSubscribed
            | Self::InvalidKind
            | Self::InvalidEvent
            | Self::DataTooDeep
            | Self::InvalidQuery => 400,
            Self::TooLarge | Self::TooManyEvents => 413,
            Self::RunNotFound | Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::Capacity => 507,
            Self::Unavailable | Self::Draining => 503,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::RateLimited => 429,
            Self::Conflict => 409,
            Self::RequestTimeout => 408,
            Self::Internal => 500,
        }
    }

    pub const ALL: [ErrorCode; 28] = [
        Self::InvalidJson,
        Self::InvalidFrame,
        Self::UnknownType,
        Self::InvalidRunId,
        Self::InvalidSince,
        Self::SinceOutOfRange,
        Self::BinaryNotSupported,
        Self::TooLarge,
        Self::TooManySubscriptions,
        Self::AlreadySubscribed,
        Self::NotSubscribed,
        Self::InvalidKind,
        Self::InvalidEvent,
        Self::TooManyEvents,
        Self::Capacity,
        Self::RunNotFound,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::Unavailable,
        Self::Draining,
        Self::Unauthorized,
        Self::Forbidden,
        Self::RateLimited,
        Self::Conflict,
        Self::RequestTimeout,
        Self::DataTooDeep,
        Self::InvalidQuery,
        Self::Internal,
    ];
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A client mistake or refusal, reported as an error frame or HTTP error body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
    /// The run the error is about, as the client wrote it (may be invalid).
    pub run: Option<String>,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            run: None,
        }
    }

    pub fn with_run(mut self, run: impl Into<String>) -> Self {
        self.run = Some(run.into());
        self
    }

    pub fn for_run(code: ErrorCode, run: &RunId, message: impl Into<String>) -> Self {
        Self::new(code, message).with_run(run.as_str())
    }
}

/// WebSocket close codes. Codes below tell a client whether to reconnect and
/// resume from its cursor, or to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: the client asked to close.
    Normal,
    /// 1001: the server is draining or shutting down. Reconnect and resume.
    GoingAway,
    /// 1011: unexpected server failure. Reconnect and resume.
    InternalError,
    /// 1009: a frame over the hard size limit. Do not retry the same frame.
    MessageTooBig,
    /// 1008: the client broke the rules. Do not retry.
    PolicyViolation,
    /// 4000: the client did not read fast enough; its queue overflowed.
    /// Reconnect and resume from the last seq received.
    SlowConsumer,
    /// 4001: no pong or other frame within the heartbeat timeout.
    /// Reconnect and resume.
    HeartbeatTimeout,
    /// 4003: the connection's token expired without a refresh. Reconnect
    /// with a fresh token and resume.
    TokenExpired,
}

impl CloseCode {
    pub fn code(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::GoingAway => 1001,
            Self::PolicyViolation => 1008,
            Self::MessageTooBig => 1009,
            Self::InternalError => 1011,
            Self::SlowConsumer => 4000,
            Self::HeartbeatTimeout => 4001,
            Self::TokenExpired => 4003,
        }
    }

    /// Every code the server sends.
    pub const ALL: [CloseCode; 8] = [
        Self::Normal,
        Self::GoingAway,
        Self::PolicyViolation,
        Self::MessageTooBig,
        Self::InternalError,
        Self::SlowConsumer,
        Self::HeartbeatTimeout,
        Self::TokenExpired,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::GoingAway => "draining: reconnect and resume",
            Self::PolicyViolation => "policy violation: do not retry",
            Self::MessageTooBig => "message too big",
            Self::InternalError => "internal error: reconnect and resume",
            Self::SlowConsumer => "slow consumer: reconnect and resume",
            Self::HeartbeatTimeout => "heartbeat timeout: reconnect and resume",
            Self::TokenExpired => "token expired: reconnect with a fresh token and resume",
        }
    }

    /// Whether a client should reconnect and resume after this code. Codes
    /// this server does not send are judged by range: 4000–4399 resume,
    /// 4400–4999 do not.
    pub fn should_resume(code: u16) -> bool {
        !matches!(code, 1000 | 1003 | 1007 | 1008 | 1009 | 1010 | 4400..=4999)
    }
}
