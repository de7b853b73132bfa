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

/// Encodes one SSE message. A frame holds the publisher's `data` verbatim,
/// and JSON may have line breaks between tokens (pretty-printed data), so
/// the text is split on every line break the SSE format knows (CRLF, LF,
/// CR), one `data:` line each: `EventSource` joins them with LF, which is
/// the same JSON value.
pub fn encode(id: Option<u64>, json: &str) -> Bytes {
    let mut s = String::with_capacity(json.len() + 32);
    if let Some(id) = id {
        s.push_str("id: ");
        s.push_str(&id.to_string());
        s.push('\n');
    }
    if json.contains(['\n', '\r']) {
        for line in json.split("\r\n").flat_map(|l| l.split(['\n', '\r'])) {
            s.push_str("data: ");
            s.push_str(line);
            s.push('\n');
        }
    } else {
        s.push_str("data: ");
        s.push_str(json);
        s.push('\n');
    }
    s.push('\n');
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use runcast_core::{Event, EventKind, frame};
    use serde_json::Value;

    /// The event-stream interpretation of the WHATWG HTML standard (9.2.6):
    /// lines end at CRLF, LF or CR; `data` fields are joined with LF; a
    /// blank line dispatches. Returns each dispatched (last event ID, data).
    fn parse_stream(text: &str) -> Vec<(String, String)> {
        let (mut out, mut data, mut id, mut has_data) =
            (Vec::new(), String::new(), String::new(), false);
        let mut rest = text;
        while !rest.is_empty() {
            let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
            let line = &rest[..end];
            rest = &rest[end..];
            rest = rest
                .strip_prefix("\r\n")
                .or_else(|| rest.strip_prefix('\r'))
                .or_else(|| rest.strip_prefix('\n'))
                .unwrap_or(rest);
            if line.is_empty() {
                if has_data {
                    out.push((id.clone(), std::mem::take(&mut data)));
                }
                has_data = false;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "data" => {
                    if has_data {
                        data.push('\n');
                    }
                    data.push_str(value);
                    has_data = true;
                }
                "id" if !value.contains('\0') => id = value.to_owned(),
                _ => {}
            }
        }
        out
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            // Quarters are exact in binary, so text and value round-trip.
            (-4_000_000i32..4_000_000).prop_map(|n| Value::from(f64::from(n) / 4.0)),
            ".*".prop_map(Value::String),
        ];
        leaf.prop_recursive(6, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".*", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// The JSON text of `v` with the whitespace between tokens drawn from
    /// `ws` in turn: how differently formatted publishers send it.
    fn formatted(v: &Value, ws: &[&str], i: &mut usize) -> String {
        fn pad(ws: &[&str], i: &mut usize) -> String {
            *i += 1;
            ws[*i % ws.len()].to_owned()
        }
        match v {
            Value::Array(a) => {
                let mut s = format!("[{}", pad(ws, i));
                for (n, x) in a.iter().enumerate() {
                    if n > 0 {
                        s += &format!(",{}", pad(ws, i));
                    }
                    s += &formatted(x, ws, i);
                }
                s + &pad(ws, i) + "]"
            }
            Value::Object(m) => {
                let mut s = format!("{{{}", pad(ws, i));
                for (n, (k, x)) in m.iter().enumerate() {
                    if n > 0 {
                        s += &format!(",{}", pad(ws, i));
                    }
                    s += &format!("{}{}:{}", Value::String(k.clone()), pad(ws, i), pad(ws, i));
                    s += &formatted(x, ws, i);
                }
                s + &pad(ws, i) + "}"
            }
            scalar => scalar.to_string(),
        }
    }

    proptest! {
        /// Any JSON value, however it is formatted, comes out of a
        /// spec-compliant SSE parser as the same value, with the event's seq
        /// as its id.
        #[test]
        fn any_json_survives_sse(
            v in json_value(),
            ws in prop::collection::vec(prop::sample::select(vec!["", " ", "\n", "\r\n", "\r", "\t", "\n  ", "\r\n\t"]), 1..8),
            seq in 1u64..u64::MAX,
        ) {
            let text = formatted(&v, &ws, &mut 0);
            prop_assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), v.clone());
            let ev = Event {
                run: runcast_core::RunId::parse("r").unwrap(),
                seq,
                kind: EventKind::Progress,
                data: serde_json::value::RawValue::from_string(text).unwrap(),
                ts: 1,
                stored_us: 1,
                traceparent: None,
            };
            let bytes = encode(Some(seq), &frame::encode_event(&ev));
            let got = parse_stream(std::str::from_utf8(&bytes).unwrap());
            prop_assert_eq!(got.len(), 1);
            prop_assert_eq!(&got[0].0, &seq.to_string());
            let frame: Value = serde_json::from_str(&got[0].1).unwrap();
            prop_assert_eq!(&frame["data"], &v);
            prop_assert_eq!(&frame["seq"], &Value::from(seq));
        }
    }

    #[test]
    fn pretty_printed_data_is_split_into_data_lines() {
        let got = encode(Some(3), "{\"a\":\r\n [1,\r2]\n}");
        assert_eq!(
            std::str::from_utf8(&got).unwrap(),
            "id: 3\ndata: {\"a\":\ndata:  [1,\ndata: 2]\ndata: }\n\n"
        );
    }
}
