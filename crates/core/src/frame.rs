//! Client protocol v1 frames (JSON text), as documented in `docs/protocol.md`
//! and `proto/runcast/v1/protocol.proto`.
//!
//! Parsing reports the precise [`ErrorCode`] for every malformed frame.
//! Encoding writes the JSON by hand: run IDs and kinds are validated to need
//! no escaping, and `data` is the publisher's JSON verbatim, so an event frame
//! is built with one allocation and no re-serialization of `data`.

use serde_json::{Map, Value};

use crate::{ErrorCode, Event, ProtocolError, RunId, RunState};

/// A frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// Start receiving a run's events. With `since`, replay every event with
    /// a greater seq first; without it, start from the current state.
    Subscribe {
        run: RunId,
        since: Option<u64>,
    },
    Unsubscribe {
        run: RunId,
    },
    /// Application-level keepalive for clients that cannot send WebSocket pings.
    Ping,
    /// A fresh bearer token for this connection (the answer to `refresh`).
    Auth {
        token: String,
    },
}

/// Parses one text frame from a client.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, ProtocolError> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        ProtocolError::new(
            ErrorCode::InvalidJson,
            format!("frame is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(ProtocolError::new(
            ErrorCode::InvalidFrame,
            "frame must be a JSON object",
        ));
    };
    let ty = match obj.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(_) => {
            return Err(ProtocolError::new(
                ErrorCode::InvalidFrame,
                "\"type\" must be a string",
            ));
        }
        None => {
            return Err(ProtocolError::new(
                ErrorCode::InvalidFrame,
                "frame has no \"type\"",
            ));
        }
    };
    match ty {
        "subscribe" => {
            let run = run_field(&obj)?;
            let since = since_field(&obj).map_err(|e| e.with_run(run.as_str()))?;
            Ok(ClientFrame::Subscribe { run, since })
        }
        "unsubscribe" => Ok(ClientFrame::Unsubscribe {
            run: run_field(&obj)?,
        }),
        "ping" => Ok(ClientFrame::Ping),
        "auth" => match obj.get("token") {
            Some(Value::String(t)) if !t.is_empty() => Ok(ClientFrame::Auth { token: t.clone() }),
            _ => Err(ProtocolError::new(
                ErrorCode::InvalidFrame,
                "an auth frame needs a non-empty string \"token\"",
            )),
        },
        other => Err(ProtocolError::new(
            ErrorCode::UnknownType,
            format!(
                "unknown frame type {:?}; expected subscribe, unsubscribe, ping or auth",
                other.chars().take(64).collect::<String>()
            ),
        )),
    }
}

fn run_field(obj: &Map<String, Value>) -> Result<RunId, ProtocolError> {
    match obj.get("run") {
        Some(Value::String(s)) => RunId::parse(s).map_err(|e| {
            ProtocolError::new(ErrorCode::InvalidRunId, e.to_string()).with_run(truncate(s))
        }),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::InvalidRunId,
            "\"run\" must be a string",
        )),
        None => Err(ProtocolError::new(
            ErrorCode::InvalidRunId,
            "frame has no \"run\"",
        )),
    }
}

fn since_field(obj: &Map<String, Value>) -> Result<Option<u64>, ProtocolError> {
    match obj.get("since") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::InvalidSince,
                format!("\"since\" must be a non-negative integer, got {n}"),
            )
        }),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::InvalidSince,
            "\"since\" must be a non-negative integer",
        )),
    }
}

/// Echoed run IDs are cut so an error frame never grows with the input.
fn truncate(s: &str) -> String {
    s.chars().take(RunId::MAX_LEN + 8).collect()
}

/// Parses a `since` cursor given as text (`Last-Event-ID`, `?since=`).
pub fn parse_since(text: &str) -> Result<u64, ProtocolError> {
    // Spaces and tabs around it are a header's optional whitespace; any
    // other character (a no-break space, say) makes it no cursor.
    let text = text.trim_matches([' ', '\t']);
    // Rust's integer parser takes a leading `+`; a cursor is digits only.
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    digits
        .then(|| text.parse::<u64>().ok())
        .flatten()
        .ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::InvalidSince,
                format!(
                    "cursor {:?} must be a non-negative integer",
                    text.chars().take(32).collect::<String>()
                ),
            )
        })
}

/// `{"type":"event","run":..,"seq":..,"kind":..,"data":..,"ts":..[,"traceparent":..]}`
pub fn encode_event(ev: &Event) -> String {
    let data = ev.data.get();
    let mut s = String::with_capacity(96 + ev.run.as_str().len() + data.len());
    s.push_str(r#"{"type":"event","run":""#);
    s.push_str(ev.run.as_str());
    s.push_str(r#"","seq":"#);
    push_u64(&mut s, ev.seq);
    s.push_str(r#","kind":""#);
    s.push_str(ev.kind.as_str());
    s.push_str(r#"","data":"#);
    s.push_str(data);
    s.push_str(r#","ts":"#);
    push_u64(&mut s, ev.ts);
    if let Some(tp) = &ev.traceparent {
        s.push_str(r#","traceparent":"#);
        // Publisher-controlled text: escape it properly.
        s.push_str(&Value::String(tp.clone()).to_string());
    }
    s.push('}');
    s
}

fn push_u64(s: &mut String, n: u64) {
    use std::fmt::Write;
    let _ = write!(s, "{n}");
}

/// `{"type":"state","run":..,"seq":..,"state":{..}|null}`: sent first on
/// every subscribe. `seq` is the last seq the state includes (0: no events yet).
///
/// Serialized straight from the state, never through `serde_json::Value`:
/// the state holds publisher data verbatim, and converting it to a `Value`
/// re-parses it under serde_json's recursion limit (a panic in `json!`).
pub fn encode_state(run: &RunId, state: Option<&RunState>) -> String {
    #[derive(serde::Serialize)]
    struct StateFrame<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        run: &'a RunId,
        seq: u64,
        state: Option<&'a RunState>,
    }
    let frame = StateFrame {
        ty: "state",
        run,
        seq: state.map_or(0, |s| s.seq),
        state,
    };
    // Serializing verbatim JSON, strings and numbers cannot fail; if it
    // ever did, the client still learns the seq rather than nothing.
    serde_json::to_string(&frame).unwrap_or_else(|_| {
        format!(
            r#"{{"type":"state","run":"{run}","seq":{},"state":null}}"#,
            frame.seq
        )
    })
}

/// `{"type":"gap","run":..,"from":..,"to":..,"message":..}`: events `from..=to`
/// are no longer retained and will never be delivered.
pub fn encode_gap(run: &RunId, from: u64, to: u64) -> String {
    serde_json::json!({
        "type": "gap",
        "run": run,
        "from": from,
        "to": to,
        "message": format!("events {from}..={to} are past retention and cannot be replayed"),
    })
    .to_string()
}

/// `{"type":"error","code":..,"message":..[,"run":..]}`
pub fn encode_error(err: &ProtocolError) -> String {
    let mut v = serde_json::json!({
        "type": "error",
        "code": err.code.as_str(),
        "message": err.message,
    });
    if let Some(run) = &err.run {
        v["run"] = Value::String(run.clone());
    }
    v.to_string()
}

/// `{"type":"hello",..}`: the first frame on a WebSocket. `anonymous` says
/// the connection has no token because the gateway lets anyone watch every
/// run (pages show a warning).
pub fn encode_hello(
    connection: u64,
    heartbeat_ms: u64,
    max_frame_bytes: usize,
    max_subscriptions: usize,
    anonymous: bool,
) -> String {
    serde_json::json!({
        "type": "hello",
        "version": crate::PROTOCOL_VERSION,
        "connection": connection,
        "heartbeat_ms": heartbeat_ms,
        "max_frame_bytes": max_frame_bytes,
        "max_subscriptions": max_subscriptions,
        "anonymous": anonymous,
    })
    .to_string()
}

/// `{"type":"refresh","expires":..}`: the connection's token expires at
/// `expires` (seconds since the epoch); send an `auth` frame before then.
pub fn encode_refresh(expires: u64) -> String {
    format!(r#"{{"type":"refresh","expires":{expires}}}"#)
}

/// `{"type":"authenticated","expires":..}`: a new token was accepted.
pub fn encode_authenticated(expires: u64) -> String {
    format!(r#"{{"type":"authenticated","expires":{expires}}}"#)
}

/// `{"type":"unsubscribed","run":..}`
pub fn encode_unsubscribed(run: &RunId) -> String {
    format!(r#"{{"type":"unsubscribed","run":"{run}"}}"#)
}

pub const PONG: &str = r#"{"type":"pong"}"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventKind;

    fn err(text: &str) -> ErrorCode {
        parse_client_frame(text).unwrap_err().code
    }

    #[test]
    fn parses_valid_frames() {
        let r = RunId::parse("r1").unwrap();
        assert_eq!(
            parse_client_frame(r#"{"type":"subscribe","run":"r1"}"#).unwrap(),
            ClientFrame::Subscribe {
                run: r.clone(),
                since: None
            }
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"subscribe","run":"r1","since":42}"#).unwrap(),
            ClientFrame::Subscribe {
                run: r.clone(),
                since: Some(42)
            }
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"unsubscribe","run":"r1","extra":1}"#).unwrap(),
            ClientFrame::Unsubscribe { run: r }
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"ping"}"#).unwrap(),
            ClientFrame::Ping
        );
    }

    #[test]
    fn malformed_frames_get_precise_codes() {
        use ErrorCode::*;
        let long = format!(r#"{{"type":"subscribe","run":"{}"}}"#, "x".repeat(129));
        let cases: &[(&str, ErrorCode)] = &[
            ("not json", InvalidJson),
            ("", InvalidJson),
            ("[1,2]", InvalidFrame),
            (r#"{"run":"r1"}"#, InvalidFrame),
            (r#"{"type":7}"#, InvalidFrame),
            (r#"{"type":"dance"}"#, UnknownType),
            (r#"{"type":"subscribe"}"#, InvalidRunId),
            (r#"{"type":"subscribe","run":5}"#, InvalidRunId),
            (r#"{"type":"subscribe","run":""}"#, InvalidRunId),
            (r#"{"type":"subscribe","run":"a.b"}"#, InvalidRunId),
            (r#"{"type":"subscribe","run":"*"}"#, InvalidRunId),
            (r#"{"type":"subscribe","run":">"}"#, InvalidRunId),
            (r#"{"type":"subscribe","run":"héllo"}"#, InvalidRunId),
            (&long, InvalidRunId),
            (
                r#"{"type":"subscribe","run":"r1","since":-1}"#,
                InvalidSince,
            ),
            (
                r#"{"type":"subscribe","run":"r1","since":1.5}"#,
                InvalidSince,
            ),
            (
                r#"{"type":"subscribe","run":"r1","since":"3"}"#,
                InvalidSince,
            ),
            (r#"{"type":"unsubscribe","run":"a b"}"#, InvalidRunId),
        ];
        for (text, want) in cases {
            assert_eq!(err(text), *want, "frame {text}");
        }
    }

    #[test]
    fn event_frame_is_valid_json_with_data_verbatim() {
        let ev = Event {
            run: RunId::parse("r1").unwrap(),
            seq: 7,
            kind: EventKind::Progress,
            data: serde_json::value::RawValue::from_string(r#"{"done": 3, "total":10}"#.into())
                .unwrap(),
            ts: 1_700_000_000_000,
            stored_us: 1_700_000_000_000_000,
            traceparent: Some("00-abc-\"x\"-01".into()),
        };
        let text = encode_event(&ev);
        assert!(text.contains(r#""data":{"done": 3, "total":10}"#), "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["kind"], "progress");
        assert_eq!(v["traceparent"], "00-abc-\"x\"-01");
    }

    #[test]
    fn state_frame_with_deeply_nested_data_is_no_panic() {
        let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
        let ev = Event {
            run: RunId::parse("r1").unwrap(),
            seq: 1,
            kind: EventKind::Status,
            data: serde_json::value::RawValue::from_string(deep.clone()).unwrap(),
            ts: 1,
            stored_us: 1,
            traceparent: None,
        };
        let state = RunState::new(&ev);
        let text = encode_state(&ev.run, Some(&state));
        assert!(
            text.starts_with(r#"{"type":"state","run":"r1","seq":1,"state":{"#),
            "{text}"
        );
        assert!(text.contains(&deep));
        assert!(encode_event(&ev).contains(&deep));
    }

    #[test]
    fn since_cursor_text() {
        assert_eq!(parse_since(" 12 ").unwrap(), 12);
        assert_eq!(
            parse_since("0\u{a0}").unwrap_err().code,
            ErrorCode::InvalidSince,
            "a no-break space is not whitespace a header may carry (found by proptest)"
        );
        assert_eq!(parse_since("-1").unwrap_err().code, ErrorCode::InvalidSince);
        assert_eq!(parse_since("+1").unwrap_err().code, ErrorCode::InvalidSince);
        assert_eq!(parse_since("").unwrap_err().code, ErrorCode::InvalidSince);
        assert_eq!(
            parse_since("abc").unwrap_err().code,
            ErrorCode::InvalidSince
        );
    }
}
