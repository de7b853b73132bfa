use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use async_nats::{HeaderMap, jetstream};
use bytes::Bytes;
use runcast_bus::{PublishError, PublishErrorKind, PublishTarget};
use runcast_core::{NewEvent, RunId, subject};

/// Publishes events to JetStream and waits for each acknowledgement.
///
/// Every event gets a `Nats-Msg-Id` before its first attempt and keeps it
/// across retries, so an attempt whose ack was lost, and which is retried,
/// is stored once (within the stream's duplicate window). Events of one call
/// are published in order, one after the other: JetStream does not make the
/// batch atomic, so on failure the error says how many were stored.
pub struct NatsTarget {
    js: jetstream::Context,
    prefix: String,
    /// Attempts per event, including the first.
    attempts: u32,
    ack_timeout: Duration,
    /// Unique per process and event: `<start nanos>-<pid>-<counter>`.
    id_prefix: String,
    counter: AtomicU64,
}

impl NatsTarget {
    pub fn new(client: async_nats::Client, prefix: &str) -> Self {
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Self {
            js: jetstream::new(client),
            prefix: prefix.to_owned(),
            attempts: 5,
            ack_timeout: Duration::from_secs(5),
            id_prefix: format!("{start:x}-{}", std::process::id()),
            counter: AtomicU64::new(0),
        }
    }

    /// Sets how many times each event is tried and how long each ack may take.
    pub fn with_retries(mut self, attempts: u32, ack_timeout: Duration) -> Self {
        self.attempts = attempts.max(1);
        self.ack_timeout = ack_timeout;
        self
    }

    fn next_id(&self) -> String {
        format!(
            "{}-{}",
            self.id_prefix,
            self.counter.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Publishes one event with `msg_id`, retrying with backoff; returns its seq.
    pub async fn publish_one(
        &self,
        run: &RunId,
        ev: &NewEvent,
        msg_id: &str,
    ) -> Result<u64, PublishError> {
        let subj = subject::event_subject(&self.prefix, run, &ev.kind);
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
        if let Some(tp) = &ev.traceparent {
            headers.insert("traceparent", tp.as_str());
        }
        let payload = Bytes::copy_from_slice(ev.data.get().as_bytes());
        let mut last = String::new();
        let mut too_big = false;
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
                .publish_with_headers(subj.clone(), headers.clone(), payload.clone())
                .await;
            let ack = match sent {
                Ok(fut) => tokio::time::timeout(self.ack_timeout, fut).await,
                Err(e) => {
                    last = e.to_string();
                    // The client refuses a message over the server's
                    // max_payload before sending it: the same every time.
                    if e.kind()
                        == async_nats::jetstream::context::PublishErrorKind::MaxPayloadExceeded
                    {
                        too_big = true;
                        break;
                    }
                    if is_permanent(&last) {
                        break;
                    }
                    continue;
                }
            };
            match ack {
                Ok(Ok(ack)) => return Ok(ack.sequence),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = format!("no acknowledgement within {:?}", self.ack_timeout),
            }
            if is_permanent(&last) {
                break;
            }
            tracing::debug!(attempt, error = %last, "publish failed; retrying");
        }
        if too_big || is_permanent(&last) {
            return Err(PublishError::new(
                PublishErrorKind::Rejected,
                format!("NATS refused the event on {subj}: {last}; retrying cannot help"),
            ));
        }
        let kind = PublishErrorKind::Unavailable;
        // An unacknowledged publish may still reach the stream (the client
        // buffers while disconnected): say so, and how to retry safely.
        Err(PublishError::new(
            kind,
            format!(
                "publishing to {subj} failed after {} attempts: {last}; it may still be stored when NATS \
                 recovers, so retry with the same Nats-Msg-Id ({msg_id}) to store it at most once",
                self.attempts
            ),
        ))
    }
}

/// An upper bound of the header bytes `publish_one` adds to an event's
/// data: the `NATS/1.0` line, a `Nats-Msg-Id` (a prefix and a counter, under
/// 96 bytes) and the event's traceparent.
pub(crate) fn header_bytes(ev: &NewEvent) -> usize {
    const FIXED: usize = "NATS/1.0\r\n\r\n".len() + "Nats-Msg-Id: \r\n".len() + 96;
    FIXED
        + ev.traceparent
            .as_ref()
            .map_or(0, |t| "traceparent: \r\n".len() + t.len())
}

/// Failures that retrying cannot fix.
fn is_permanent(reason: &str) -> bool {
    let r = reason.to_ascii_lowercase();
    r.contains("maximum payload") || r.contains("message size exceeds")
}

#[async_trait::async_trait]
impl PublishTarget for NatsTarget {
    async fn publish(&self, run: &RunId, events: Vec<NewEvent>) -> Result<Vec<u64>, PublishError> {
        let mut seqs = Vec::with_capacity(events.len());
        for (i, ev) in events.iter().enumerate() {
            let id = self.next_id();
            match self.publish_one(run, ev, &id).await {
                Ok(seq) => seqs.push(seq),
                Err(e) if i > 0 => {
                    return Err(PublishError::new(
                        e.kind,
                        format!(
                            "{} of {} events were stored; then: {}",
                            i,
                            events.len(),
                            e.message
                        ),
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(seqs)
    }
}
