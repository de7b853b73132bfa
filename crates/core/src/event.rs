use std::{fmt, sync::Arc};

use serde_json::value::RawValue;

use crate::RunId;

/// What an event says about its run. The well-known kinds drive run state;
/// custom kinds (`[a-z0-9_-]{1,64}`) are stored and delivered like any other.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum EventKind {
    Progress,
    Log,
    Status,
    Complete,
    Error,
    Custom(Arc<str>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "event kind {0:?} is invalid: use progress, log, status, complete, error or 1-64 characters of [a-z0-9_-]"
)]
pub struct ParseKindError(pub String);

impl EventKind {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Result<Self, ParseKindError> {
        Ok(match s {
            "progress" => Self::Progress,
            "log" => Self::Log,
            "status" => Self::Status,
            "complete" => Self::Complete,
            "error" => Self::Error,
            _ => {
                let ok = !s.is_empty()
                    && s.len() <= Self::MAX_LEN
                    && s.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                    });
                if !ok {
                    return Err(ParseKindError(s.chars().take(80).collect()));
                }
                Self::Custom(Arc::from(s))
            }
        })
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Progress => "progress",
            Self::Log => "log",
            Self::Status => "status",
            Self::Complete => "complete",
            Self::Error => "error",
            Self::Custom(s) => s,
        }
    }

    /// `complete` and `error` end a run.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Complete | Self::Error)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for EventKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        EventKind::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An event as a publisher hands it to the bus, before it has a sequence
/// number. `data` is kept as the publisher's JSON text, verbatim.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct NewEvent {
    pub kind: EventKind,
    pub data: Box<RawValue>,
    /// W3C `traceparent` of the publishing span, carried to clients unchanged.
    #[serde(default)]
    pub traceparent: Option<String>,
    /// Idempotency key: a publish of an event whose `id` the run already
    /// stored within the bus's duplicate window is not stored again; the
    /// publisher gets the first one's seq. Lets a publisher that lost a
    /// response retry safely. Not sent to subscribers.
    #[serde(default)]
    pub id: Option<String>,
}

/// Longest event `id` (idempotency key), in bytes.
pub const MAX_EVENT_ID: usize = 128;

/// Whether `id` is a valid idempotency key: 1 to [`MAX_EVENT_ID`] visible
/// ASCII characters (a UUID, a job's own `attempt-3/step-7`, ...).
pub fn valid_event_id(id: &str) -> bool {
    (1..=MAX_EVENT_ID).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

impl NewEvent {
    pub fn new(kind: EventKind, data: Box<RawValue>) -> Self {
        Self {
            kind,
            data,
            traceparent: None,
            id: None,
        }
    }

    /// The same event with an idempotency key.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Builds an event from any serializable value.
    pub fn json<T: serde::Serialize + ?Sized>(
        kind: EventKind,
        data: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self::new(kind, serde_json::value::to_raw_value(data)?))
    }
}

/// A stored event: what the bus assigned (`seq`, `ts`) plus what the
/// publisher sent. Shared by `Arc` between history and every live reader.
#[derive(Debug, Clone)]
pub struct Event {
    pub run: RunId,
    /// Strictly increasing per run, starting at 1.
    pub seq: u64,
    pub kind: EventKind,
    pub data: Box<RawValue>,
    /// Milliseconds since the Unix epoch, when the bus accepted the event.
    pub ts: u64,
    /// Microseconds since the Unix epoch, when the bus stored the event: the
    /// start of the latency metrics' hops (finer than `ts`; not sent to clients).
    pub stored_us: u64,
    pub traceparent: Option<String>,
}

impl Event {
    /// Approximate memory held by this event, for retention by size.
    pub fn size(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.data.get().len()
            + self.traceparent.as_ref().map_or(0, |t| t.len())
    }
}

/// How deeply event data may nest arrays and objects. Deeper data is refused
/// at publish (`data_too_deep`): JSON parsers in every language limit
/// recursion (serde_json at 128, Python's at about 1,000 frames, browsers
/// vary), and a payload that one of them cannot read would break every
/// client of the run. 64 leaves room for any real progress payload.
pub const MAX_DATA_DEPTH: usize = 64;

/// Event data nested deeper than [`MAX_DATA_DEPTH`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("data nests {0} levels of arrays and objects; the limit is {MAX_DATA_DEPTH}")]
pub struct DataTooDeep(pub usize);

/// Refuses data nested deeper than [`MAX_DATA_DEPTH`]: what every publish
/// path checks before anything is stored.
pub fn check_depth(data: &RawValue) -> Result<(), DataTooDeep> {
    match json_depth(data.get()) {
        d if d > MAX_DATA_DEPTH => Err(DataTooDeep(d)),
        _ => Ok(()),
    }
}

/// The deepest nesting of arrays and objects in a JSON text (0 for a
/// scalar). Counts brackets outside strings in one pass without recursion,
/// so it is safe on any input; on text that is not JSON the answer is only
/// an estimate, but never a panic.
pub fn json_depth(text: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// A stored payload as event data. Publishers that go through the gateway
/// send JSON within [`MAX_DATA_DEPTH`], but any NATS client can store any
/// bytes on a run's subject. Anything else (plain text from `nats pub`,
/// invalid UTF-8, JSON nested too deep for clients' parsers) becomes a JSON
/// string of its text (invalid UTF-8 replaced by U+FFFD): it still reaches
/// every client, and no reader has to parse it.
pub fn data_from_payload(payload: &[u8]) -> Box<RawValue> {
    if let Ok(text) = std::str::from_utf8(payload)
        && json_depth(text) <= MAX_DATA_DEPTH
        && let Ok(raw) = serde_json::from_str::<&RawValue>(text)
    {
        return raw.to_owned();
    }
    let text = String::from_utf8_lossy(payload);
    // Serializing a string cannot fail; `null` only keeps this panic-free.
    serde_json::value::to_raw_value(&text).unwrap_or_else(|_| Box::<RawValue>::default())
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Wall-clock microseconds since the Unix epoch (0 if the clock is before it).
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for k in [
            "progress",
            "log",
            "status",
            "complete",
            "error",
            "my-kind_2",
        ] {
            assert_eq!(EventKind::parse(k).unwrap().as_str(), k);
        }
    }

    #[test]
    fn bad_kinds_are_rejected() {
        for k in ["", "Progress", "a.b", "with space", "ü", &"k".repeat(65)] {
            assert!(EventKind::parse(k).is_err(), "{k:?} should be rejected");
        }
    }

    #[test]
    fn depth_counts_brackets_outside_strings() {
        assert_eq!(json_depth("1"), 0);
        assert_eq!(json_depth(r#""[[[""#), 0);
        assert_eq!(json_depth(r#"{"a":[1,{"b":"]}"}]}"#), 3);
        assert_eq!(json_depth(r#"["\\",[["\"["]]]"#), 3);
        let deep = format!("{}{}", "[".repeat(130), "]".repeat(130));
        assert_eq!(json_depth(&deep), 130);
        // Unbalanced input is no panic.
        assert_eq!(json_depth("]]]["), 1);
    }

    #[test]
    fn stored_payloads_become_json_a_client_can_parse() {
        let data = |p: &[u8]| data_from_payload(p).get().to_owned();
        assert_eq!(data(br#"{"done": 1}"#), r#"{"done": 1}"#);
        assert_eq!(data(b"plain text"), r#""plain text""#);
        assert_eq!(data(b"\xff\xfe"), "\"\u{fffd}\u{fffd}\"");
        assert_eq!(data(b""), r#""""#);
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert_eq!(data(ok.as_bytes()), ok);
        let deep = format!("{}{}", "[".repeat(130), "]".repeat(130));
        let back: String = serde_json::from_str(&data(deep.as_bytes())).unwrap();
        assert_eq!(back, deep, "delivered as a string holding the text");
    }

    #[test]
    fn terminal_kinds() {
        assert!(EventKind::Complete.is_terminal());
        assert!(EventKind::Error.is_terminal());
        assert!(!EventKind::Progress.is_terminal());
    }
}
