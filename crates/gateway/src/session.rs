//! One client's subscriptions, independent of the transport.
//!
//! A session keeps a cursor per subscribed run (the next seq that client
//! needs) and is the only place that decides what reaches the client:
//! the state snapshot first, then replayed history, then live frames, with
//! duplicates dropped and holes filled from history by seq. Transports (WebSocket,
//! SSE) plug in through [`Output`], so this logic is the same for both.

use std::{collections::HashMap, sync::Arc};

use runcast_core::{ErrorCode, ProtocolError, RunId, frame};
use runcast_telemetry::OpenTelemetrySpanExt;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::{
    Gateway,
    auth::Grant,
    error::bus_error,
    frame::OutFrame,
    hub::Subscriber,
    replay::{Replay, Replayed},
};

/// The transport was closed or failed; the session is over.
#[derive(Debug)]
pub struct Closed;

/// Where a session writes frames. `id` is the seq an SSE client should
/// resume after; the WebSocket transport ignores it.
pub trait Output: Send {
    /// The transport's name in metrics and spans (`ws`, `sse`).
    const TRANSPORT: &'static str;
    async fn send_shared(&mut self, frame: &Arc<OutFrame>) -> Result<(), Closed>;
    async fn send_text(&mut self, text: String, id: Option<u64>) -> Result<(), Closed>;
    async fn flush(&mut self) -> Result<(), Closed>;
}

#[derive(Debug)]
pub enum SessionError {
    Protocol(ProtocolError),
    Closed,
}

impl From<ProtocolError> for SessionError {
    fn from(e: ProtocolError) -> Self {
        SessionError::Protocol(e)
    }
}

impl From<Closed> for SessionError {
    fn from(_: Closed) -> Self {
        SessionError::Closed
    }
}

/// How many queued frames are written before one flush.
const BATCH: usize = 64;

pub struct Session<O: Output> {
    pub gw: Arc<Gateway>,
    pub sub: Arc<Subscriber>,
    pub rx: mpsc::Receiver<Arc<OutFrame>>,
    pub out: O,
    /// run → next seq the client needs.
    cursors: HashMap<RunId, u64>,
    /// The runs this client may watch, and until when.
    pub grant: Grant,
}

impl<O: Output> Session<O> {
    pub fn new(gw: Arc<Gateway>, out: O, grant: Grant) -> Self {
        let id = gw.next_conn_id();
        let (sub, rx) = Subscriber::new(id, gw.config.queue_messages, gw.config.queue_bytes);
        gw.register(&sub);
        Self {
            gw,
            sub,
            rx,
            out,
            cursors: HashMap::new(),
            grant,
        }
    }

    /// Replaces the connection's token (an `auth` frame). Runs the new token
    /// does not cover are unsubscribed. Returns the new expiry.
    pub async fn reauth(&mut self, token: &str) -> Result<Option<u64>, SessionError> {
        let grant = self.gw.config.auth.authenticate(Some(token)).map_err(|e| {
            self.gw
                .metrics
                .auth_failures
                .with_label_values(&[e.kind.as_str()])
                .inc();
            SessionError::Protocol(ProtocolError::new(ErrorCode::Unauthorized, e.message))
        })?;
        let dropped: Vec<RunId> = self
            .cursors
            .keys()
            .filter(|r| !grant.allows(r))
            .cloned()
            .collect();
        self.grant = grant;
        for run in dropped {
            self.unsubscribe(&run).await?;
        }
        if let Some(exp) = self.grant.expires {
            self.out
                .send_text(frame::encode_authenticated(exp), None)
                .await?;
            self.out.flush().await?;
        }
        Ok(self.grant.expires)
    }

    pub fn id(&self) -> u64 {
        self.sub.id
    }

    /// Subscribes to `run`: registers interest, sends the state frame, and
    /// replays what history holds after the cursor (`since`, or the state's seq).
    pub async fn subscribe(&mut self, run: RunId, since: Option<u64>) -> Result<(), SessionError> {
        let max = self.gw.config.max_subscriptions;
        if !self.grant.allows(&run) {
            return Err(SessionError::Protocol(ProtocolError::for_run(
                ErrorCode::Forbidden,
                &run,
                "your token does not cover this run",
            )));
        }
        if self.cursors.contains_key(&run) {
            return Err(SessionError::Protocol(ProtocolError::for_run(
                ErrorCode::AlreadySubscribed,
                &run,
                "already subscribed to this run; unsubscribe first to change the cursor",
            )));
        }
        if self.cursors.len() >= max {
            return Err(SessionError::Protocol(ProtocolError::for_run(
                ErrorCode::TooManySubscriptions,
                &run,
                format!("this connection already has the maximum of {max} subscriptions"),
            )));
        }
        // Interest first, then state: every event after the state's seq is
        // then either in the queue or in history.
        self.gw
            .hub
            .add(&run, &self.sub)
            .await
            .map_err(|e| bus_error(e, &run))?;
        let state = match self.gw.bus.state(&run).await {
            Ok(s) => s,
            Err(e) => {
                self.gw.hub.remove(&run, self.sub.id);
                return Err(bus_error(e, &run).into());
            }
        };
        let head = state.as_ref().map_or(0, |s| s.seq);
        if let Some(since) = since
            && since > head
        {
            // A bus may serve a state a moment old (NATS caches it briefly);
            // ask for the run's current head before calling the cursor bad.
            let fresh = match self.gw.bus.read(&run, since.saturating_add(1), 0).await {
                Ok(page) => page.head,
                Err(_) => head,
            };
            if since > fresh {
                self.gw.hub.remove(&run, self.sub.id);
                return Err(SessionError::Protocol(ProtocolError::for_run(
                    ErrorCode::SinceOutOfRange,
                    &run,
                    format!("since {since} is past the run's last seq {fresh}"),
                )));
            }
        }
        let cursor = since.unwrap_or(head);
        self.cursors.insert(run.clone(), cursor + 1);
        self.gw.metrics.subscriptions.inc();
        // The state frame's SSE id is where the client stands now, not the
        // state's seq: on a resume, events `since+1..=head` are still to be
        // replayed, and a client cut off right after this frame must resume
        // from `since` or it would lose them.
        self.out
            .send_text(frame::encode_state(&run, state.as_ref()), Some(cursor))
            .await?;
        // Replay everything after the cursor that history holds now, not
        // only up to the state's seq: a state may be a moment old, and if
        // nothing else is ever published (a finished run) no live frame would
        // reveal what lies between.
        self.catch_up(&run, u64::MAX, head).await?;
        self.out.flush().await?;
        Ok(())
    }

    pub async fn unsubscribe(&mut self, run: &RunId) -> Result<(), SessionError> {
        if self.cursors.remove(run).is_none() {
            return Err(SessionError::Protocol(ProtocolError::for_run(
                ErrorCode::NotSubscribed,
                run,
                "not subscribed to this run",
            )));
        }
        self.gw.hub.remove(run, self.sub.id);
        self.gw.metrics.subscriptions.dec();
        self.out
            .send_text(frame::encode_unsubscribed(run), None)
            .await?;
        self.out.flush().await?;
        Ok(())
    }

    /// Sends an error frame and counts it.
    pub async fn send_error(&mut self, err: &ProtocolError) -> Result<(), Closed> {
        self.gw
            .metrics
            .protocol_errors
            .with_label_values(&[err.code.as_str()])
            .inc();
        self.out.send_text(frame::encode_error(err), None).await?;
        self.out.flush().await
    }

    /// Writes `first` and whatever else is already queued (up to a batch),
    /// then flushes once.
    pub async fn deliver_batch(&mut self, first: Arc<OutFrame>) -> Result<(), Closed> {
        self.gw.metrics.queue_depth.observe(self.rx.len() as f64);
        let mut sent = u64::from(self.deliver(first).await?);
        for _ in 1..BATCH {
            match self.rx.try_recv() {
                Ok(f) => sent += u64::from(self.deliver(f).await?),
                Err(_) => break,
            }
        }
        // One shared-counter update per batch, not per frame: the counter's
        // cache line is contended by every worker thread.
        self.gw.metrics.events_delivered.inc_by(sent);
        self.out.flush().await
    }

    /// Writes one queued frame if the client still needs it; whether it did.
    async fn deliver(&mut self, f: Arc<OutFrame>) -> Result<bool, Closed> {
        self.sub.taken(&f);
        let Some(&next) = self.cursors.get(&f.run) else {
            return Ok(false); // unsubscribed since it was queued
        };
        if f.last < next {
            return Ok(false); // already delivered by replay
        }
        if f.first > next {
            // Only at the seam of a fresh subscription can the queue start
            // ahead of the cursor; fill from history.
            self.catch_up(&f.run, f.first - 1, f.first - 1).await?;
            if self.cursors.get(&f.run).is_none_or(|&n| f.last < n) {
                return Ok(false);
            }
        }
        match &f.trace {
            // A sampled event's write gets a span while the budget lasts.
            Some(fanout) if self.gw.delivery_spans.take() => {
                let span = tracing::info_span!(
                    target: runcast_telemetry::TARGET,
                    "runcast.deliver",
                    runcast.conn = self.sub.id,
                    runcast.transport = O::TRANSPORT,
                );
                let _ = span.set_parent(fanout.clone());
                self.out.send_shared(&f).instrument(span).await?;
            }
            _ => self.out.send_shared(&f).await?,
        }
        // Observed as the frame goes to the connection's writer, which the
        // batch flushes right after. Not after the flush: keeping each
        // frame's timing until then would cost every connection's task
        // about 1.5 KiB (measured: 5.2 -> 6.5 KiB per idle connection).
        if let Some((stored_us, received)) = f.live {
            let m = &self.gw.metrics;
            let receive_to_write = received.elapsed();
            let publish_to_write = crate::frame::micros_since(stored_us);
            m.receive_to_write.observe(receive_to_write.as_secs_f64());
            m.publish_to_write.observe(publish_to_write as f64 / 1e6);
            let slow = self.gw.config.slow_event_log;
            if !slow.is_zero()
                && u128::from(publish_to_write) > slow.as_micros()
                && self.gw.slow_event_logs.take()
            {
                log_slow(&f, publish_to_write, receive_to_write);
            }
        }
        // get_mut, not insert: cloning the run ID would touch its shared
        // reference count from every connection on every event.
        if let Some(cursor) = self.cursors.get_mut(&f.run) {
            *cursor = f.last + 1;
        }
        Ok(true)
    }

    /// Replays history from the run's cursor up to `to` (inclusive), sending a
    /// gap frame for anything retention already dropped.
    /// `known_head` is a seq the run is known to have reached (see
    /// [`Replay::known_head`]).
    async fn catch_up(&mut self, run: &RunId, to: u64, known_head: u64) -> Result<(), Closed> {
        let Some(from) = self.cursors.get(run).copied() else {
            return Ok(());
        };
        let bus = self.gw.bus.clone();
        let mut replay =
            Replay::new(&*bus, run, from, to, self.gw.config.replay_page).known_head(known_head);
        loop {
            match replay.next().await {
                Ok(Some(Replayed::Gap { from, to })) => {
                    self.gw.metrics.gap_notices.inc();
                    self.out
                        .send_text(frame::encode_gap(run, from, to), Some(to))
                        .await?;
                }
                Ok(Some(Replayed::Event(ev))) => {
                    self.out
                        .send_text(frame::encode_event(&ev), Some(ev.seq))
                        .await?;
                    self.gw.metrics.replayed_events.inc();
                }
                Ok(None) => break,
                Err(e) => {
                    // History cannot be read now: the subscription ends
                    // here, with the error frame, and the client subscribes
                    // again from its cursor (protocol.md). Kept alive, the
                    // next live frame would have moved its cursor past the
                    // events this read should have sent: an outside tester
                    // lost 153 events that way across a NATS leader kill,
                    // and its resubscribe was refused as already_subscribed.
                    if self.cursors.remove(run).is_some() {
                        self.gw.hub.remove(run, self.sub.id);
                        self.gw.metrics.subscriptions.dec();
                    }
                    self.send_error(&bus_error(e, run)).await?;
                    return Ok(());
                }
            }
        }
        if let Some(cursor) = self.cursors.get_mut(run) {
            *cursor = replay.next_seq();
        }
        Ok(())
    }
}

impl<O: Output> Drop for Session<O> {
    fn drop(&mut self) {
        self.gw.deregister(self.sub.id);
        for run in self.cursors.keys() {
            self.gw.hub.remove(run, self.sub.id);
        }
        self.gw.metrics.subscriptions.sub(self.cursors.len() as i64);
    }
}

/// One slow delivery, with the hop split and the trace ID, so that a slow
/// latency bucket leads to a trace.
fn log_slow(f: &OutFrame, publish_to_write_us: u64, receive_to_write: std::time::Duration) {
    // Read back from the frame only on this rare path, so frames do not
    // carry the traceparent twice.
    let trace_id = serde_json::from_str::<serde_json::Value>(&f.text)
        .ok()
        .and_then(|v| {
            v["traceparent"]
                .as_str()
                .and_then(runcast_telemetry::trace_id)
                .map(str::to_owned)
        });
    let receive_to_write_us = receive_to_write.as_micros() as u64;
    tracing::warn!(
        run = %f.run,
        seq = f.last,
        publish_to_write_us,
        publish_to_receive_us = publish_to_write_us.saturating_sub(receive_to_write_us),
        receive_to_write_us,
        trace_id = %trace_id.as_deref().unwrap_or("none"),
        "slow event delivery"
    );
}
