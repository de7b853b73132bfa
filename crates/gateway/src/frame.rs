//! A frame on its way out: serialized once per gateway and shared by every
//! subscriber of its run, with its SSE encoding built at most once. Below
//! the hub, the sessions and both transports, which all pass frames along.

use std::sync::OnceLock;

use bytes::Bytes;
use runcast_core::{Event, RunId, frame};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// A frame serialized once per gateway and shared by all subscribers of its run.
#[derive(Debug)]
pub struct OutFrame {
    pub run: RunId,
    /// The seqs this frame covers: for an event, everything after the run's
    /// previous event up to this one; for a gap, the missing range.
    pub first: u64,
    pub last: u64,
    pub text: Utf8Bytes,
    /// The SSE encoding, built by the first SSE subscriber that needs it.
    sse: OnceLock<Bytes>,
    /// For an event received live: when the bus stored it (µs since the
    /// epoch) and when this gateway received it, for the hop latencies.
    pub live: Option<Timing>,
    /// For a sampled event while traces are exported: the `runcast.fanout`
    /// span, parent of the sessions' `runcast.deliver` spans.
    pub trace: Option<runcast_telemetry::Context>,
}

/// When the bus stored an event (µs since the epoch) and when this gateway
/// received it live.
pub type Timing = (u64, std::time::Instant);

impl OutFrame {
    pub fn new(run: RunId, first: u64, last: u64, text: String) -> Self {
        Self {
            run,
            first,
            last,
            text: Utf8Bytes::from(text),
            sse: OnceLock::new(),
            live: None,
            trace: None,
        }
    }

    /// An event that directly follows seq `prev` of its run: the frame covers
    /// `prev+1..=seq`, so a subscriber whose cursor is anywhere in that range
    /// has missed nothing.
    pub fn event_after(ev: &Event, prev: u64) -> Self {
        Self::new(ev.run.clone(), prev + 1, ev.seq, frame::encode_event(ev))
    }

    pub fn sse(&self) -> &Bytes {
        self.sse
            .get_or_init(|| sse_message(Some(self.last), self.text.as_str()))
    }
}

/// Encodes one SSE message. A frame holds the publisher's `data` verbatim,
/// and JSON may have line breaks between tokens (pretty-printed data), so
/// the text is split on every line break the SSE format knows (CRLF, LF,
/// CR), one `data:` line each: `EventSource` joins them with LF, which is
/// the same JSON value.
pub fn sse_message(id: Option<u64>, json: &str) -> Bytes {
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

/// Microseconds from `then` (µs since the epoch) to now; 0 if the clocks
/// disagree (the bus's clock may be another machine's).
pub fn micros_since(then: u64) -> u64 {
    runcast_core::now_micros().saturating_sub(then)
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
            let bytes = sse_message(Some(seq), &frame::encode_event(&ev));
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
        let got = sse_message(Some(3), "{\"a\":\r\n [1,\r2]\n}");
        assert_eq!(
            std::str::from_utf8(&got).unwrap(),
            "id: 3\ndata: {\"a\":\ndata:  [1,\ndata: 2]\ndata: }\n\n"
        );
    }
}
