//! Reading the events stream: a stored or delivered JetStream message as an
//! [`Event`], and the retry every read goes through. It sits below the
//! modules that read: `bus` (history), `state` (the folder) and `watch` (live
//! feeds) all use it, and it uses none of them, so they never import each
//! other's helpers.

use async_nats::jetstream;
use runcast_bus::BusError;
use runcast_core::{Event, subject};

/// Turns a stored message into an event; `None` for subjects that are not
/// runcast events (the stream only captures `<prefix>.runs.>`, so only a
/// malformed run or kind token gets here, and is logged).
pub(crate) fn to_event(prefix: &str, m: jetstream::message::StreamMessage) -> Option<Event> {
    let Some((run, kind)) = subject::parse_event_subject(prefix, m.subject.as_str()) else {
        tracing::warn!(subject = %m.subject, seq = m.sequence, "skipping a message on a subject that is not a runcast event");
        return None;
    };
    Some(Event {
        run,
        seq: m.sequence,
        kind,
        data: runcast_core::data_from_payload(&m.payload),
        ts: (m.time.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
        stored_us: (m.time.unix_timestamp_nanos() / 1_000).max(0) as u64,
        traceparent: m.headers.get("traceparent").map(|v| v.to_string()),
    })
}

/// How long a failed read is retried before it reaches a client as
/// `unavailable`.
const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs a read again when it fails, for up to `RETRY_FOR`: when a NATS node
/// dies, requests get "no responders" or time out until the client has
/// reconnected and the cluster has moved its leaders, which usually takes
/// less than a second. Only for reads: they are safe to repeat.
pub(crate) async fn patiently<T, Fut>(mut read: impl FnMut() -> Fut) -> Result<T, BusError>
where
    Fut: std::future::Future<Output = Result<T, BusError>>,
{
    let started = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(50);
    loop {
        match read().await {
            Err(e) if started.elapsed() < RETRY_FOR => {
                tracing::debug!(error = %e, "NATS read failed; retrying");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            done => return done,
        }
    }
}

/// A consumer's delivery as an event, the same as a direct read of it.
pub(crate) fn delivered_event(
    prefix: &str,
    msg: &jetstream::Message,
    info: &jetstream::message::Info<'_>,
) -> Option<Event> {
    to_event(
        prefix,
        jetstream::message::StreamMessage {
            subject: msg.subject.clone(),
            sequence: info.stream_sequence,
            headers: msg.headers.clone().unwrap_or_default(),
            payload: msg.payload.clone(),
            time: info.published,
        },
    )
}

/// The stream sequence of the last message on `subject` (may be a
/// wildcard), if any is retained; read through [`patiently`].
/// Like [`last_seq`], but answered by the stream's leader (a stream
/// message get, not a direct get, which any replica answers and a lagging
/// one answers with an old head). For the few reads whose answer refuses
/// something: a cursor past the head is only bad if the leader says so.
pub(crate) async fn leader_last_seq(
    stream: &jetstream::stream::Stream,
    subject: &str,
) -> Result<Option<u64>, BusError> {
    use jetstream::stream::LastRawMessageErrorKind as Kind;
    patiently(|| async {
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(Some(m.sequence)),
            Err(e) if e.kind() == Kind::NoMessageFound => Ok(None),
            Err(e) => Err(BusError::Unavailable(format!(
                "reading {subject} from the stream leader: {e}"
            ))),
        }
    })
    .await
}

pub(crate) async fn last_seq(
    stream: &jetstream::stream::Stream,
    subject: &str,
) -> Result<Option<u64>, BusError> {
    patiently(|| async {
        match stream.direct_get_last_for_subject(subject).await {
            Ok(m) => Ok(Some(m.sequence)),
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(BusError::Unavailable(format!("reading {subject}: {e}"))),
        }
    })
    .await
}
