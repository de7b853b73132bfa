//! From a Redis message to a runcast event: which run, which kind, what
//! data, and an idempotency key where the source gives one. Every way a
//! message can fail to map has a reason, counted and logged by the bridge.

use runcast_core::{EventKind, NewEvent, RunId};
use serde_json::{Value, value::RawValue};

/// Where a message's run ID comes from.
#[derive(Debug, Clone)]
pub enum RunFrom {
    /// A JSON pointer into the message (`/runId`).
    Pointer(String),
    /// Always this run.
    Fixed(RunId),
    /// The channel's (or stream key's) last segment after `separator`:
    /// `progress:r1` gives `r1`.
    ChannelSuffix(char),
}

/// Where a message's kind comes from.
#[derive(Debug, Clone)]
pub enum KindFrom {
    Fixed(EventKind),
    Pointer(String),
}

#[derive(Debug, Clone)]
pub struct Mapping {
    pub run: RunFrom,
    pub kind: KindFrom,
    /// A JSON pointer to the data; `None`: the whole message.
    pub data: Option<String>,
    /// A JSON pointer to an idempotency key in the message.
    pub id: Option<String>,
}

/// Why a message was not published. The label of
/// `runcast_bridge_bad_messages_total{reason}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Bad {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("no run ID at {0}")]
    NoRun(String),
    #[error("{0}")]
    InvalidRun(String),
    #[error("no kind at {0}")]
    NoKind(String),
    #[error("{0}")]
    InvalidKind(String),
    #[error("no data at {0}")]
    NoData(String),
    #[error("{0}")]
    InvalidId(String),
    /// The target refused the event (too large, too deep, over capacity).
    #[error("refused by runcast: {0}")]
    Rejected(String),
}

impl Bad {
    pub const REASONS: &[&str] = &[
        "not_json",
        "no_run",
        "invalid_run",
        "no_kind",
        "invalid_kind",
        "no_data",
        "invalid_id",
        "rejected",
    ];

    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotJson(_) => "not_json",
            Self::NoRun(_) => "no_run",
            Self::InvalidRun(_) => "invalid_run",
            Self::NoKind(_) => "no_kind",
            Self::InvalidKind(_) => "invalid_kind",
            Self::NoData(_) => "no_data",
            Self::InvalidId(_) => "invalid_id",
            Self::Rejected(_) => "rejected",
        }
    }
}

/// A string at `pointer`: a JSON string as is, an integer in decimal (run
/// IDs are often numbers in a producer's JSON).
fn text_at<'a>(v: &'a Value, pointer: &str) -> Option<std::borrow::Cow<'a, str>> {
    match v.pointer(pointer)? {
        Value::String(s) => Some(s.as_str().into()),
        Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string().into()),
        _ => None,
    }
}

impl Mapping {
    /// Maps `payload`, received on `channel`. `source_id` is the source's
    /// own ID for the message (a stream entry's), used as the idempotency
    /// key unless the mapping names one in the message.
    pub fn map(
        &self,
        channel: &str,
        payload: &[u8],
        source_id: Option<&str>,
    ) -> Result<(RunId, NewEvent), Bad> {
        let text = std::str::from_utf8(payload).map_err(|_| Bad::NotJson("not UTF-8".into()))?;
        let parsed: Value = serde_json::from_str(text).map_err(|e| Bad::NotJson(e.to_string()))?;
        let run = match &self.run {
            RunFrom::Fixed(r) => r.clone(),
            RunFrom::Pointer(p) => {
                let s = text_at(&parsed, p).ok_or_else(|| Bad::NoRun(p.clone()))?;
                RunId::parse(&s).map_err(|e| Bad::InvalidRun(e.to_string()))?
            }
            RunFrom::ChannelSuffix(sep) => {
                let s = channel.rsplit(*sep).next().unwrap_or(channel);
                RunId::parse(s)
                    .map_err(|e| Bad::InvalidRun(format!("from channel {channel:?}: {e}")))?
            }
        };
        let kind = match &self.kind {
            KindFrom::Fixed(k) => k.clone(),
            KindFrom::Pointer(p) => {
                let s = text_at(&parsed, p).ok_or_else(|| Bad::NoKind(p.clone()))?;
                EventKind::parse(&s).map_err(|e| Bad::InvalidKind(e.to_string()))?
            }
        };
        let data: Box<RawValue> = match &self.data {
            // The producer's own text, not a re-serialization of it.
            None => RawValue::from_string(text.trim().to_owned())
                .map_err(|e| Bad::NotJson(e.to_string()))?,
            Some(p) => {
                let v = parsed.pointer(p).ok_or_else(|| Bad::NoData(p.clone()))?;
                serde_json::value::to_raw_value(v).map_err(|e| Bad::NoData(e.to_string()))?
            }
        };
        let mut event = NewEvent::new(kind, data);
        let id = match &self.id {
            Some(p) => Some(
                text_at(&parsed, p)
                    .map(|s| s.into_owned())
                    .ok_or_else(|| Bad::InvalidId(format!("no idempotency key at {p}")))?,
            ),
            None => source_id.map(str::to_owned),
        };
        if let Some(id) = id {
            if !runcast_core::valid_event_id(&id) {
                return Err(Bad::InvalidId(format!(
                    "idempotency key {:?} is not 1-{} visible ASCII characters",
                    id.chars().take(40).collect::<String>(),
                    runcast_core::MAX_EVENT_ID
                )));
            }
            event = event.with_id(id);
        }
        Ok((run, event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn optio() -> Mapping {
        Mapping {
            run: RunFrom::Pointer("/runId".into()),
            kind: KindFrom::Fixed(EventKind::Progress),
            data: None,
            id: None,
        }
    }

    #[test]
    fn an_unchanged_producers_message_maps_to_a_progress_event() {
        let msg = br#"{"runId":"r1","enqueued":45,"processed":42}"#;
        let (run, e) = optio().map("optio:progress", msg, None).unwrap();
        assert_eq!(run.as_str(), "r1");
        assert_eq!(e.kind, EventKind::Progress);
        assert_eq!(
            e.data.get(),
            r#"{"runId":"r1","enqueued":45,"processed":42}"#
        );
        assert_eq!(e.id, None);
        let (run, _) = optio().map("c", br#"{"runId":7}"#, None).unwrap();
        assert_eq!(run.as_str(), "7", "numeric run IDs");
    }

    #[test]
    fn kind_data_id_and_run_from_the_message_or_the_channel() {
        let m = Mapping {
            run: RunFrom::ChannelSuffix(':'),
            kind: KindFrom::Pointer("/type".into()),
            data: Some("/payload".into()),
            id: Some("/eventId".into()),
        };
        let msg = br#"{"type":"log","payload":{"line":"hi"},"eventId":"e-1"}"#;
        let (run, e) = m.map("jobs:run-9", msg, Some("ignored-0")).unwrap();
        assert_eq!((run.as_str(), &e.kind), ("run-9", &EventKind::Log));
        assert_eq!(e.data.get(), r#"{"line":"hi"}"#);
        assert_eq!(e.id.as_deref(), Some("e-1"));
        // A stream entry's own ID when the message names none.
        let (_, e) = optio()
            .map("s", br#"{"runId":"r"}"#, Some("s/1-0"))
            .unwrap();
        assert_eq!(e.id.as_deref(), Some("s/1-0"));
    }

    #[test]
    fn every_bad_message_has_a_reason() {
        let m = Mapping {
            kind: KindFrom::Pointer("/kind".into()),
            data: Some("/data".into()),
            ..optio()
        };
        for (msg, reason) in [
            (&b"not json"[..], "not_json"),
            (b"\xff\xfe", "not_json"),
            (br#"{"kind":"log","data":1}"#, "no_run"),
            (br#"{"runId":{"x":1},"kind":"log","data":1}"#, "no_run"),
            (
                br#"{"runId":"bad id!","kind":"log","data":1}"#,
                "invalid_run",
            ),
            (br#"{"runId":"r","data":1}"#, "no_kind"),
            (
                br#"{"runId":"r","kind":"Not A Kind","data":1}"#,
                "invalid_kind",
            ),
            (br#"{"runId":"r","kind":"log"}"#, "no_data"),
        ] {
            let got = m.map("c", msg, None).unwrap_err();
            assert_eq!(
                got.reason(),
                reason,
                "{:?}: {got}",
                String::from_utf8_lossy(msg)
            );
        }
        let long = "x".repeat(200);
        let got = optio()
            .map("c", br#"{"runId":"r"}"#, Some(&long))
            .unwrap_err();
        assert_eq!(got.reason(), "invalid_id");
        let bad = Mapping {
            run: RunFrom::ChannelSuffix(':'),
            ..optio()
        };
        assert_eq!(
            bad.map("a:b c", b"{}", None).unwrap_err().reason(),
            "invalid_run"
        );
    }
}
