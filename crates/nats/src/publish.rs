use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use async_nats::{
    HeaderMap,
    jetstream::{
        self, ErrorCode,
        context::{PublishError as JsPublishError, PublishErrorKind as JsKind},
    },
};
use bytes::Bytes;
use runcast_bus::{PublishError, PublishErrorKind, PublishTarget};
use runcast_core::{NewEvent, RunId, subject};

use crate::{
    config::{NatsConfig, connect},
    error::NatsError,
    stream::{StreamSettings, ensure_stream},
};

/// Publishes events to JetStream and waits for each acknowledgement.
///
/// Every event gets a `Nats-Msg-Id` before its first attempt and keeps it
/// across retries, so an attempt whose ack was lost, and which is retried,
/// is stored once (within the stream's duplicate window). Events of one call
/// are published in order, one after the other: JetStream does not make the
/// batch atomic, so on failure the error says how many were stored.
pub struct NatsTarget {
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
    /// Attempts per event, including the first.
    attempts: u32,
    ack_timeout: Duration,
    /// The stream's largest message, when the caller knows it: events over
    /// it are refused before anything is sent.
    max_message_size: Option<usize>,
    /// Unique per process and event: `<start nanos>-<pid>-<counter>`.
    id_prefix: String,
    counter: AtomicU64,
}

/// Why an event was not stored, as a kind to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreErrorKind {
    /// The message (payload and headers, as NATS counts them) is `size`
    /// bytes, over the server's `max_payload` or the stream's largest
    /// message, `limit` (`None` when the stream's could not be looked up).
    TooLarge { size: usize, limit: Option<usize> },
    /// JetStream has no room for it: the account's or server's storage is
    /// used up, or the stream is at a limit that refuses new messages.
    NoSpace,
    /// The subject is not a valid NATS subject (a bad `--nats-prefix`).
    InvalidSubject,
    /// No acknowledgement after every attempt: NATS unreachable, no stream
    /// capturing the subject, or JetStream failing; it may still be stored.
    Unavailable,
}

/// A failed store: its kind, and a message that says what happened (with
/// the NATS error it came from) and what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub(crate) struct StoreError {
    pub(crate) kind: StoreErrorKind,
    pub(crate) message: String,
}

impl From<StoreError> for PublishError {
    fn from(e: StoreError) -> Self {
        let kind = match e.kind {
            StoreErrorKind::TooLarge { .. } | StoreErrorKind::NoSpace => PublishErrorKind::Rejected,
            StoreErrorKind::InvalidSubject => PublishErrorKind::InvalidInput,
            StoreErrorKind::Unavailable => PublishErrorKind::Unavailable,
        };
        PublishError::new(kind, e.message)
    }
}

/// One event as it goes on the wire.
struct Message {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    msg_id: String,
}

impl Message {
    /// Its size as NATS counts it against `max_payload` and a stream's
    /// largest message: the header block as sent (`NATS/1.0`, one line per
    /// header, a blank line) plus the payload.
    fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .flat_map(|(name, values)| {
                let name: &str = name.as_ref();
                values
                    .iter()
                    .map(move |v| name.len() + 2 + v.as_str().len() + 2)
            })
            .sum();
        "NATS/1.0\r\n".len() + headers + "\r\n".len() + self.payload.len()
    }
}

/// What one failed attempt means.
enum Attempt {
    /// The same message would fail the same way: stop.
    GiveUp(StoreErrorKind),
    /// Worth another attempt; if it is the last one, the event is reported
    /// with this kind.
    Retry(StoreErrorKind),
}

impl NatsTarget {
    pub fn new(client: async_nats::Client, prefix: &str) -> Self {
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Self {
            js: jetstream::new(client.clone()),
            client,
            prefix: prefix.to_owned(),
            attempts: 5,
            ack_timeout: Duration::from_secs(5),
            max_message_size: None,
            id_prefix: format!("{start:x}-{}", std::process::id()),
            counter: AtomicU64::new(0),
        }
    }

    /// A publish-only connection, what a worker needs: connects (retrying
    /// in the background, so a worker may start before NATS), creates or
    /// checks the events stream, since publishing needs it to store
    /// anything (retrying every second, and saying why, until it answers),
    /// and returns a target on it that refuses events over the stream's
    /// limit up front.
    ///
    /// Nothing else: no state bucket, no run state folder, no watch
    /// consumer. Workers never write run state; gateways fold it from the
    /// stream (see [`crate::NatsBus`]). Fails only on a connection that
    /// cannot be configured (a bad URL, unreadable credentials).
    pub async fn connect(cfg: &NatsConfig, settings: &StreamSettings) -> Result<Self, NatsError> {
        let client = connect(cfg, true).await?;
        let js = jetstream::new(client.clone());
        loop {
            match ensure_stream(&js, &cfg.prefix, settings).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(reason = %e, "events stream not ready; waiting before publishing");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        tracing::info!(stream = %settings.name, "events stream ready; publishing");
        Ok(Self::new(client, &cfg.prefix)
            .with_max_message_size(settings.max_message_size.max(0) as usize))
    }

    /// Sets how many times each event is tried and how long each ack may take.
    pub fn with_retries(mut self, attempts: u32, ack_timeout: Duration) -> Self {
        self.attempts = attempts.max(1);
        self.ack_timeout = ack_timeout;
        self
    }

    /// The stream's largest message (`StreamSettings::max_message_size`):
    /// a call with an event over it is refused whole, before any of its
    /// events is sent. Without it only the server's `max_payload` is checked
    /// up front, and the stream refuses what is over its own limit.
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = Some(bytes);
        self
    }

    fn next_id(&self) -> String {
        format!(
            "{}-{}",
            self.id_prefix,
            self.counter.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn message(&self, run: &RunId, ev: &NewEvent, msg_id: String) -> Message {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id.as_str());
        if let Some(tp) = &ev.traceparent {
            headers.insert("traceparent", tp.as_str());
        }
        Message {
            subject: subject::event_subject(&self.prefix, run, &ev.kind),
            headers,
            payload: Bytes::copy_from_slice(ev.data.get().as_bytes()),
            msg_id,
        }
    }

    /// Refuses a message that NATS would refuse for its size, with its size
    /// and the limit it is over.
    fn check_size(&self, m: &Message) -> Result<(), StoreError> {
        let limit = self
            .max_message_size
            .map_or(self.client.max_payload(), |s| {
                s.min(self.client.max_payload())
            });
        let size = m.size();
        if size <= limit {
            return Ok(());
        }
        Err(StoreError {
            kind: StoreErrorKind::TooLarge {
                size,
                limit: Some(limit),
            },
            message: format!(
                "the event on {} is {size} bytes with its headers, over the limit of {limit} bytes",
                m.subject
            ),
        })
    }

    /// Publishes one event with `msg_id`, retrying with backoff; returns its seq.
    pub async fn publish_one(
        &self,
        run: &RunId,
        ev: &NewEvent,
        msg_id: &str,
    ) -> Result<u64, PublishError> {
        let m = self.message(run, ev, msg_id.to_owned());
        self.check_size(&m)?;
        Ok(self.store(&m).await?)
    }

    /// Publishes `events` in order, each with a fresh `Nats-Msg-Id`; none
    /// is sent if one of them is too large. Returns their seqs.
    pub(crate) async fn store_all(
        &self,
        run: &RunId,
        events: &[NewEvent],
    ) -> Result<Vec<u64>, StoreError> {
        // A publisher's own event id becomes the Nats-Msg-Id (scoped to
        // its run), so JetStream's duplicate window makes its retries safe.
        let messages: Vec<Message> = events
            .iter()
            .map(|ev| {
                let msg_id = match &ev.id {
                    Some(id) => format!("{run}/{id}"),
                    None => self.next_id(),
                };
                self.message(run, ev, msg_id)
            })
            .collect();
        for m in &messages {
            self.check_size(m)?;
        }
        // Pipelined: every message is handed to the connection before the
        // first acknowledgement is awaited, so a batch costs one round trip
        // to JetStream instead of one per event. One connection keeps them
        // in order, and JetStream stores them in the order they arrive.
        let mut pending = Vec::with_capacity(messages.len());
        for m in &messages {
            let sent = self
                .js
                .publish_with_headers(m.subject.clone(), m.headers.clone(), m.payload.clone())
                .await;
            pending.push(sent.ok());
        }
        let mut seqs: Vec<u64> = Vec::with_capacity(messages.len());
        for (i, (m, ack)) in messages.iter().zip(pending).enumerate() {
            let first = match ack {
                Some(fut) => match tokio::time::timeout(self.ack_timeout, fut).await {
                    Ok(Ok(ack)) => Some(ack.sequence),
                    _ => None,
                },
                None => None,
            };
            // Not acknowledged: the one-by-one path retries (and classifies
            // the failure) with the same Nats-Msg-Id, so a copy the stream
            // already holds is answered with its seq, not stored again.
            let seq = match first {
                Some(seq) => seq,
                None => match self.store(m).await {
                    Ok(seq) => seq,
                    Err(e) if i > 0 => {
                        return Err(StoreError {
                            message: format!(
                                "{i} of {} events were stored; then: {}",
                                messages.len(),
                                e.message
                            ),
                            ..e
                        });
                    }
                    Err(e) => return Err(e),
                },
            };
            if let Some(&prev) = seqs.last()
                && seq < prev
            {
                // Only when the connection failed mid-batch: an event whose
                // first send was lost was stored on retry, after later ones
                // that got through. Each is still stored once; the seqs say
                // in which order.
                tracing::warn!(
                    subject = %m.subject,
                    seq,
                    prev,
                    "a retried event of a batch was stored after a later one"
                );
            }
            seqs.push(seq);
        }
        Ok(seqs)
    }

    /// Publishes one message, retrying with backoff; returns its seq.
    async fn store(&self, m: &Message) -> Result<u64, StoreError> {
        let subj = &m.subject;
        let mut last = String::new();
        let mut kind = StoreErrorKind::Unavailable;
        for attempt in 0..self.attempts {
            if attempt > 0 {
                // 50 ms doubling, capped at 2 s.
                tokio::time::sleep(
                    Duration::from_millis(50u64 << attempt.min(5)).min(Duration::from_secs(2)),
                )
                .await;
            }
            let sent = self
                .js
                .publish_with_headers(subj.clone(), m.headers.clone(), m.payload.clone())
                .await;
            let (why, failed) = match sent {
                Ok(fut) => match tokio::time::timeout(self.ack_timeout, fut).await {
                    Ok(Ok(ack)) => return Ok(ack.sequence),
                    Ok(Err(e)) => (describe(&e, subj), e),
                    Err(_) => (
                        format!("no acknowledgement within {:?}", self.ack_timeout),
                        JsPublishError::new(JsKind::TimedOut),
                    ),
                },
                Err(e) => (describe(&e, subj), e),
            };
            last = why;
            match classify(&failed, m.size(), self.client.max_payload()) {
                Attempt::GiveUp(StoreErrorKind::TooLarge { size, limit: None }) => {
                    let limit = self.stream_limit(subj).await;
                    return Err(StoreError {
                        kind: StoreErrorKind::TooLarge { size, limit },
                        message: format!(
                            "the stream capturing {subj} refused the event of {size} bytes with its headers \
                             as too large{}: {last}",
                            limit.map_or(String::new(), |l| format!(" (its limit is {l} bytes)"))
                        ),
                    });
                }
                Attempt::GiveUp(kind) => {
                    return Err(StoreError {
                        kind,
                        message: format!(
                            "NATS refused the event on {subj}: {last}; retrying cannot help"
                        ),
                    });
                }
                Attempt::Retry(k) => kind = k,
            }
            tracing::debug!(attempt, error = %last, "publish failed; retrying");
        }
        let message = match kind {
            StoreErrorKind::NoSpace => format!(
                "JetStream has no room for the event on {subj} after {} attempts: {last}",
                self.attempts
            ),
            // An unacknowledged publish may still reach the stream (the client
            // buffers while disconnected): say so, and how to retry safely.
            _ => format!(
                "publishing to {subj} failed after {} attempts: {last}; it may still be stored when NATS \
                 recovers, so retry with the same Nats-Msg-Id ({}) to store it at most once",
                self.attempts, m.msg_id
            ),
        };
        Err(StoreError { kind, message })
    }

    /// The largest message of the stream that captures `subj`, if JetStream
    /// says (a worker's NATS permissions may not let it ask).
    async fn stream_limit(&self, subj: &str) -> Option<usize> {
        let lookup = async {
            let name = self.js.stream_by_subject(subj).await.ok()?;
            let stream = self.js.get_stream(name).await.ok()?;
            usize::try_from(stream.cached_info().config.max_message_size).ok()
        };
        tokio::time::timeout(self.ack_timeout, lookup)
            .await
            .ok()
            .flatten()
    }
}

/// What a failed attempt to publish on `subj` says, for the error.
fn describe(e: &JsPublishError, subj: &str) -> String {
    match e.kind() {
        // NATS says "no responders" both when no stream captures the
        // subject and while the stream that does has no leader (an election
        // after a node was lost): one answer, two causes, both named.
        JsKind::StreamNotFound => format!(
            "no JetStream stream answered for {subj}: the stream may be electing a new leader \
             (after a NATS node was lost; retry), or no stream captures the subject (gateways and \
             `runcast worker` create it at start-up)"
        ),
        _ => e.to_string(),
    }
}

/// Sorts a failed publish attempt by async-nats's error kind and, for the
/// server's refusals, JetStream's error code; never by its text.
fn classify(e: &JsPublishError, size: usize, max_payload: usize) -> Attempt {
    match e.kind() {
        // Checked by the client before sending (as `check_size` does first).
        JsKind::MaxPayloadExceeded => Attempt::GiveUp(StoreErrorKind::TooLarge {
            size,
            limit: Some(max_payload),
        }),
        // No ack in time, the connection dropped, nobody answered (no
        // stream yet, or a cluster moving its leader), or too many acks
        // pending in this client: all pass.
        JsKind::TimedOut | JsKind::BrokenPipe | JsKind::StreamNotFound | JsKind::MaxAckPending => {
            Attempt::Retry(StoreErrorKind::Unavailable)
        }
        // Only sent with expectation headers, which runcast never sets.
        JsKind::WrongLastMessageId | JsKind::WrongLastSequence => {
            Attempt::GiveUp(StoreErrorKind::Unavailable)
        }
        JsKind::Other => {
            let source = std::error::Error::source(e);
            if let Some(js) = source.and_then(|s| s.downcast_ref::<jetstream::Error>()) {
                return by_code(js.error_code(), size);
            }
            if source.is_some_and(|s| s.is::<async_nats::SubjectError>()) {
                return Attempt::GiveUp(StoreErrorKind::InvalidSubject);
            }
            // The request could not be sent, or its answer not read.
            Attempt::Retry(StoreErrorKind::Unavailable)
        }
    }
}

/// A JetStream error answering a publish of `size` bytes, by its code.
fn by_code(code: ErrorCode, size: usize) -> Attempt {
    match code {
        // Over the stream's own limit, which this client does not know.
        ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM | ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM => {
            Attempt::GiveUp(StoreErrorKind::TooLarge { size, limit: None })
        }
        // Storage used up, for the account or the server: no amount of
        // retrying within seconds frees it.
        ErrorCode::ACCOUNT_RESOURCES_EXCEEDED
        | ErrorCode::INSUFFICIENT_RESOURCES
        | ErrorCode::STORAGE_RESOURCES_EXCEEDED
        | ErrorCode::MEMORY_RESOURCES_EXCEEDED => Attempt::GiveUp(StoreErrorKind::NoSpace),
        // The store refused the message: mostly a limit that refuses new
        // messages (max messages or bytes with the discard-new policy) or a
        // full disk, but also a store closing for a restart, which passes:
        // tried again, and reported as no room if it persists.
        ErrorCode::STREAM_STORE_FAILED => Attempt::Retry(StoreErrorKind::NoSpace),
        // Anything else (no leader during a failover, say) may pass.
        _ => Attempt::Retry(StoreErrorKind::Unavailable),
    }
}

#[async_trait::async_trait]
impl PublishTarget for NatsTarget {
    async fn publish(&self, run: &RunId, events: Vec<NewEvent>) -> Result<Vec<u64>, PublishError> {
        Ok(self.store_all(run, &events).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_as_large_as_nats_counts_it() {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, "id-1");
        headers.insert("traceparent", "00-abc-def-01");
        let m = Message {
            subject: "runcast.runs.r.log".into(),
            headers,
            payload: Bytes::from_static(b"{\"line\":1}"),
            msg_id: "id-1".into(),
        };
        let wire = "NATS/1.0\r\nNats-Msg-Id: id-1\r\ntraceparent: 00-abc-def-01\r\n\r\n";
        assert_eq!(m.size(), wire.len() + 10);
    }

    #[test]
    fn refusals_are_sorted_by_kind_and_code_not_by_text() {
        let too_large = JsPublishError::with_source(
            JsKind::Other,
            serde_json::from_str::<jetstream::Error>(
                r#"{"code":400,"err_code":10054,"description":"some words"}"#,
            )
            .unwrap(),
        );
        assert!(matches!(
            classify(&too_large, 10, 100),
            Attempt::GiveUp(StoreErrorKind::TooLarge { limit: None, .. })
        ));
        let full = JsPublishError::with_source(
            JsKind::Other,
            serde_json::from_str::<jetstream::Error>(
                r#"{"code":400,"err_code":10047,"description":"message size exceeds maximum allowed"}"#,
            )
            .unwrap(),
        );
        assert!(
            matches!(
                classify(&full, 10, 100),
                Attempt::GiveUp(StoreErrorKind::NoSpace)
            ),
            "the code decides, whatever the description says"
        );
        assert!(matches!(
            classify(&JsPublishError::new(JsKind::MaxPayloadExceeded), 200, 100),
            Attempt::GiveUp(StoreErrorKind::TooLarge {
                size: 200,
                limit: Some(100)
            })
        ));
        for passing in [JsKind::TimedOut, JsKind::StreamNotFound, JsKind::BrokenPipe] {
            assert!(matches!(
                classify(&JsPublishError::new(passing), 1, 100),
                Attempt::Retry(StoreErrorKind::Unavailable)
            ));
        }
        let bad_subject =
            JsPublishError::with_source(JsKind::Other, async_nats::SubjectError::InvalidFormat);
        assert!(matches!(
            classify(&bad_subject, 1, 100),
            Attempt::GiveUp(StoreErrorKind::InvalidSubject)
        ));
    }
}
