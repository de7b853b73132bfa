//! Live events for the runs a gateway watches: **one core NATS subscription
//! per watched run**, on the copies the events stream republishes of every
//! event it stores (`<prefix>.runs.<run>.<kind>` → `<prefix>.live.<run>.<kind>`,
//! see [`crate::stream`]).
//!
//! Why not a JetStream consumer: the previous design, one ordered consumer
//! per gateway whose `filter_subjects` were every watched run, was rebuilt on
//! every change of interest, hit NATS's 1 MiB request limit at about 30,000
//! runs, and added a pull's 1–2 ms per hop. A core subscription costs the
//! server one entry in its subject index; subscribing and unsubscribing is
//! one protocol line each, so churn rebuilds nothing, and delivery is a plain
//! core publish from the stream leader (`examples/nats_hop.rs`: p99 0.29 ms
//! against 0.72 ms for the shared consumer).
//!
//! Core NATS is at most once, so a feed proves, rather than assumes, that it
//! missed nothing:
//!
//! - **The chain.** Each republished copy carries `Nats-Sequence` and
//!   `Nats-Last-Sequence`, the seq of the previous message *on the same
//!   subject* (one run and kind). A feed remembers the last seq it saw on
//!   each of its run's subjects; a copy whose predecessor is not that seq
//!   (or, for a subject not seen yet, lies after the seq the feed opened at)
//!   proves a loss. The feed then says [`Live::Lagged`] and the fan-out
//!   repairs from history.
//! - **The tail.** A chain shows a loss only when the next message on that
//!   subject arrives, so a run's last event could be missed for good. After
//!   a run goes quiet for [`QUIET`], and once after a watch opens, the feed
//!   asks the stream for the run's last seq (one direct get); if the stream
//!   is ahead and the missing copies have not arrived [`CONFIRM`] later
//!   (they are usually in flight), it resyncs. A run that streams continuously never pays for this; one
//!   that finishes pays one request.
//! - **The connection.** Messages published while the gateway is
//!   disconnected, or dropped by the client as a slow consumer, are lost for
//!   every run at once: on a reconnect or slow-consumer event every feed
//!   checks its run at once, and again after [`GRACE`], by which time the
//!   resubscription has reached every server of the cluster.
//!
//! Checks go through one semaphore per gateway, so a reconnect of a gateway
//! watching 100,000 runs puts at most [`CHECKS_IN_FLIGHT`] requests on
//! JetStream at a time.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::{message::StreamMessage, stream::Stream};
use async_trait::async_trait;
use futures_util::StreamExt;
use runcast_bus::{BusError, Feed, Live};
use runcast_core::{Event, RunId, subject};
use tokio::{
    sync::{Semaphore, watch},
    time::Instant,
};

use crate::message::to_event;

/// How long a run must be quiet before its feed checks that it has the
/// run's last event. Longer than the gap between events of a run that is
/// streaming (so those never pay for a check), short enough that a lost
/// final event reaches clients within about a second.
const QUIET: Duration = Duration::from_secs(1);
/// After a reconnect, and after a watch opens, how long until the (second)
/// check: a subscription reaches the server the gateway is connected to
/// first and the stream leader's server a moment later, through the
/// cluster's routes; an event stored in between is not republished to us.
const GRACE: Duration = Duration::from_secs(1);
/// How long a check that found the stream ahead waits for the copies it
/// has not seen yet before it resyncs: they are usually just in flight (the
/// stream stored them a moment before the check asked), and arrive live,
/// with their trace, instead of as a history read.
const CONFIRM: Duration = Duration::from_millis(250);
/// How often a run that streams without pause is checked all the same
/// (see `RunFeed::check`): a chain shows a lost copy only when the next one
/// on its subject arrives, which for a kind published once may be never.
const VERIFY_EVERY: Duration = Duration::from_secs(5);
/// How long a check waits for the stream's answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// A failed check is tried again after this.
const CHECK_RETRY: Duration = Duration::from_secs(1);
/// Checks in flight per gateway (see the module docs).
const CHECKS_IN_FLIGHT: usize = 32;
/// Subjects (kinds) a feed chains per run before it stops tracking them one
/// by one and resyncs instead: bounds the memory a publisher inventing
/// kinds can make a gateway spend.
const MAX_CHAINS: usize = 64;

/// What every feed of one gateway shares: the signal that the connection
/// may have lost messages, the check budget, and counters.
pub(crate) struct LiveShared {
    lost: watch::Sender<u64>,
    checks: Semaphore,
    pub(crate) checks_made: AtomicU64,
    pub(crate) resyncs: AtomicU64,
    /// Copies found missing only after later events of their run went out
    /// (see `RunFeed::check`).
    pub(crate) missed: AtomicU64,
    /// For each watched run, the highest seq its feed has seen or covered
    /// (shared by the feeds of one run): how the bus tells whether a history
    /// page it read a moment ago may still be handed out.
    seen: std::sync::Mutex<HashMap<RunId, Arc<AtomicU64>>>,
}

impl Default for LiveShared {
    fn default() -> Self {
        Self {
            lost: watch::Sender::new(0),
            checks: Semaphore::new(CHECKS_IN_FLIGHT),
            checks_made: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            missed: AtomicU64::new(0),
            seen: Default::default(),
        }
    }
}

impl LiveShared {
    /// Copies may have been lost for every run at once: each feed checks
    /// its run, and takes its next copy as unproven.
    pub(crate) fn may_have_lost(&self) {
        self.lost.send_modify(|n| *n += 1);
    }

    /// The highest seq a feed of `run` has seen, if the run is watched.
    pub(crate) fn seen(&self, run: &RunId) -> Option<u64> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(run).map(|s| s.load(Ordering::Acquire))
    }

    fn track(&self, run: &RunId, head: u64) -> Arc<AtomicU64> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let s = seen.entry(run.clone()).or_default().clone();
        s.fetch_max(head, Ordering::AcqRel);
        s
    }

    fn untrack(&self, run: &RunId, s: &Arc<AtomicU64>) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        // The map's and this feed's: no other feed of the run is left.
        if seen.get(run).is_some_and(|m| Arc::ptr_eq(m, s)) && Arc::strong_count(s) == 2 {
            seen.remove(run);
        }
    }

    /// What the NATS client reports: a (re)connection or a subscription the
    /// client had to drop messages for means messages may be gone.
    pub(crate) fn on_client_event(&self, event: &async_nats::Event) {
        // (The stream's leader changing is the same signal: see
        // `NatsBus::start`, which follows JetStream's advisory.)
        match event {
            async_nats::Event::Connected | async_nats::Event::SlowConsumer(_) => {
                self.may_have_lost()
            }
            _ => {}
        }
    }
}

/// One run's live events: a core subscription to its republished copies.
pub(crate) struct RunFeed {
    sub: async_nats::Subscriber,
    /// For checks that read several messages at once.
    client: async_nats::Client,
    run: RunId,
    prefix: String,
    stream: Stream,
    shared: Arc<LiveShared>,
    lost: watch::Receiver<u64>,
    /// Every event of the run up to this seq was delivered, or lies in
    /// history that the fan-out reads after a [`Live::Lagged`].
    base: u64,
    /// The last seq seen on each of the run's subjects since `base`.
    chains: HashMap<String, u64>,
    /// The highest seq handed out (or covered by a resync).
    last: u64,
    /// `last`, for the bus (see `LiveShared::seen`); set before the fan-out
    /// gets the copy, so a session that joins the fan-out afterwards and
    /// then reads history never gets a page from before it.
    seen: Arc<AtomicU64>,
    /// When to check the run's last seq against the stream.
    check_at: Option<Instant>,
    /// The latest a run that keeps streaming is checked (`VERIFY_EVERY`).
    verify_at: Instant,
    /// After this check, one more at `GRACE` (a reconnect).
    check_again: bool,
    /// A seq a check found stored, and when to resync if its copy has not
    /// arrived by then.
    expect: Option<(u64, Instant)>,
    /// An event to hand out after the `Lagged` that preceded it.
    pending: Option<Event>,
    /// The client's connection count when the feed last took a copy.
    stats: Arc<async_nats::Statistics>,
    connects: u64,
    /// The next copy cannot be vouched for: it is the first since the watch
    /// opened (its subscription may have reached the stream leader's server
    /// only after some events were stored) or since a reconnect (copies of
    /// the outage are gone). Copies arrive in stream order, so whatever was
    /// lost lies before it: the fan-out reads that stretch from history.
    unproven: bool,
    /// For an unproven copy: the first seq after what the feed had.
    unproven_from: u64,
}

impl RunFeed {
    /// Follows `run` with `sub` (already subscribed and flushed), from
    /// `head`: its last stored seq, read after the subscription was made.
    pub(crate) fn new(
        sub: async_nats::Subscriber,
        run: &RunId,
        head: u64,
        prefix: &str,
        stream: Stream,
        shared: Arc<LiveShared>,
        client: async_nats::Client,
    ) -> Self {
        let stats = client.statistics();
        let lost = shared.lost.subscribe();
        let connects = stats.connects.load(Ordering::Relaxed);
        let seen = shared.track(run, head);
        Self {
            seen,
            client,
            verify_at: Instant::now() + VERIFY_EVERY,
            sub,
            run: run.clone(),
            prefix: prefix.to_owned(),
            stream,
            shared,
            lost,
            base: head,
            chains: HashMap::new(),
            last: head,
            check_at: Some(Instant::now() + GRACE),
            check_again: false,
            expect: None,
            pending: None,
            stats,
            connects,
            unproven: true,
            unproven_from: 0,
        }
    }

    /// Asks the stream for the last seq of each of the run's subjects (one
    /// batched direct get). A subject whose last seq is past `last` is
    /// expected within `CONFIRM`. One whose last seq is at or before `last`
    /// but was never seen had its copy lost while later events of the run,
    /// on other subjects, went out: the chains cannot show that (they link
    /// one subject's messages), and the fan-out cannot put it back in order.
    /// It is counted (`runcast_bus_live_missed_total`) and logged with its
    /// seq; the event is in history, and docs/kubernetes.md says what that
    /// means for clients.
    async fn check(&mut self) -> Result<(), BusError> {
        let lasts = {
            let _permit = self.shared.checks.acquire().await;
            self.shared.checks_made.fetch_add(1, Ordering::Relaxed);
            let filter = subject::run_wildcard(&self.prefix, &self.run);
            match self.subject_lasts(&filter).await {
                Ok(lasts) => lasts,
                // A server without batched direct gets (before 2.11): the
                // run's last seq alone covers its tail.
                Err(why) => {
                    tracing::debug!(run = %self.run, %why, "no batched direct get; checking the run's last seq only");
                    let head = crate::message::last_seq(&self.stream, &filter)
                        .await?
                        .unwrap_or(0);
                    vec![(String::new(), head)]
                }
            }
        };
        self.verify_at = Instant::now() + VERIFY_EVERY;
        // A batch cut at its limit may lack the run's highest subject.
        let lasts_complete = lasts.len() <= MAX_CHAINS;
        let mut head = 0;
        for (subject, seq) in lasts {
            head = head.max(seq);
            if subject.is_empty() || seq > self.last || seq <= self.base {
                continue;
            }
            if self.chains.get(&subject).is_none_or(|&s| s < seq) {
                self.shared.missed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    run = %self.run,
                    seq,
                    subject = %subject,
                    "a live copy was lost and later events of the run were already sent; clients of this run did not get this event live (it is in history)"
                );
                if self.chains.len() < MAX_CHAINS {
                    self.chains.insert(subject, seq);
                }
            }
        }
        if head > self.last {
            self.expect = Some((head, Instant::now() + CONFIRM));
        } else if head < self.last && lasts_complete {
            // The feed handed out a seq the stream does not have for this
            // run: a message published by hand on the live subject with the
            // stream's headers. It cannot be taken back; say so loudly.
            tracing::error!(
                run = %self.run,
                handed_out = self.last,
                stream_head = head,
                "this run's live feed delivered a seq the events stream does not hold: a forged message on a live subject (deny publishing on <prefix>.live.> to all but the stream; see docs/security.md)"
            );
        }
        Ok(())
    }

    /// The last message of each subject matching `filter`: a direct get
    /// with `multi_last` (nats-server 2.11+), answered with one message per
    /// subject and an end-of-batch status.
    async fn subject_lasts(&self, filter: &str) -> Result<Vec<(String, u64)>, String> {
        let inbox = self.client.new_inbox();
        let mut answers = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| e.to_string())?;
        let request = serde_json::json!({"multi_last": [filter], "batch": MAX_CHAINS + 1});
        let name = &self.stream.cached_info().config.name;
        self.client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{name}"),
                inbox,
                request.to_string().into(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let deadline = Instant::now() + CHECK_TIMEOUT;
        loop {
            let msg = tokio::time::timeout_at(deadline, answers.next())
                .await
                .map_err(|_| format!("no answer within {CHECK_TIMEOUT:?}"))?
                .ok_or("subscription closed")?;
            match msg.status.map(|s| s.as_u16()) {
                // End of the batch; or no message matches (no events yet).
                Some(204) | Some(404) => return Ok(out),
                Some(code) if code != 200 => {
                    return Err(format!("status {code} {:?}", msg.description));
                }
                _ => {}
            }
            let header = |name: &str| msg.headers.as_ref().and_then(|h| h.get_last(name));
            let subject = header("Nats-Subject").map(|v| v.as_str().to_owned());
            let seq = header("Nats-Sequence").and_then(|v| v.as_str().parse::<u64>().ok());
            match (subject, seq) {
                (Some(subject), Some(seq)) => out.push((subject, seq)),
                _ => return Err("an answer without Nats-Subject or Nats-Sequence".into()),
            }
            if out.len() > MAX_CHAINS + 1 {
                return Ok(out);
            }
        }
    }

    /// From here on, everything up to `upto` counts as covered: the fan-out
    /// reads it from history after the `Lagged` this goes with.
    fn resync(&mut self, upto: u64) {
        self.shared.resyncs.fetch_add(1, Ordering::Relaxed);
        self.base = upto;
        self.last = self.last.max(upto);
        self.seen.fetch_max(self.last, Ordering::AcqRel);
        self.chains.clear();
    }

    /// One republished copy: the event, a `Lagged` that must come before it
    /// (its event then waits in `pending`), or nothing (a repeat, or not a
    /// copy the stream made).
    fn take(&mut self, msg: async_nats::Message) -> Option<Live> {
        // The last value of each: the stream appends its headers to the
        // publisher's. A publisher allowed on runcast.runs.> can store a
        // message with a `Nats-Sequence` of its own, and its copy then has
        // two (an outside tester's seq 999999999 broke the run on every
        // gateway); the stream's is the one after.
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get_last(name))
                .map(|v| v.as_str())
        };
        let seq = header("Nats-Sequence").and_then(|s| s.parse::<u64>().ok());
        let (Some(seq), Some(stored_on)) = (seq, header("Nats-Subject")) else {
            // Only the stream publishes on live subjects (security.md's
            // permissions deny everyone else); whatever else arrives there
            // cannot be placed in the run's sequence.
            tracing::warn!(subject = %msg.subject, "ignoring a message on a live subject that the stream did not republish");
            return None;
        };
        // A copy the stream made names it; one that names another stream
        // (or none) was published by hand on the live subject.
        if header("Nats-Stream") != Some(self.stream.cached_info().config.name.as_str()) {
            tracing::warn!(subject = %msg.subject, "ignoring a message on a live subject that does not come from the events stream");
            return None;
        }
        let prev = header("Nats-Last-Sequence")
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        self.check_at = Some((Instant::now() + QUIET).min(self.verify_at));
        // Read here, not only from the client's (asynchronous) event: the
        // count goes up before the resubscriptions are sent, so no copy
        // after a reconnect is taken before this sees it.
        let connects = self.stats.connects.load(Ordering::Relaxed);
        if connects != self.connects {
            self.connects = connects;
            self.unproven = true;
        }
        if seq <= self.last {
            return None;
        }
        let chained = match self.chains.get(stored_on) {
            Some(&p) => prev == p,
            None => prev <= self.base,
        };
        let stored_on = stored_on.to_owned();
        let time = header("Nats-Time-Stamp")
            .and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            })
            .unwrap_or_else(time::OffsetDateTime::now_utc);
        let event = to_event(
            &self.prefix,
            StreamMessage {
                subject: stored_on.as_str().into(),
                sequence: seq,
                headers: msg.headers.unwrap_or_default(),
                payload: msg.payload,
                time,
            },
        );
        self.unproven_from = self.last + 1;
        self.last = seq;
        self.seen.fetch_max(seq, Ordering::AcqRel);
        if !chained || (self.chains.len() >= MAX_CHAINS && !self.chains.contains_key(&stored_on)) {
            if !chained {
                tracing::debug!(run = %self.run, seq, prev, "a live copy's predecessor never arrived; resyncing from history");
            }
            self.resync(seq);
            self.chains.insert(stored_on, seq);
            self.pending = event;
            return Some(Live::Lagged);
        }
        let unproven = std::mem::take(&mut self.unproven);
        if unproven {
            // The fan-out reads history up to this copy: what lies before
            // it counts as covered, as after a resync.
            self.base = self.base.max(seq - 1);
            self.chains.clear();
        }
        self.chains.insert(stored_on, seq);
        let event = Arc::new(event?);
        Some(if unproven {
            Live::Unproven(event)
        } else {
            Live::Event(event)
        })
    }
}

impl Drop for RunFeed {
    fn drop(&mut self) {
        self.shared.untrack(&self.run, &self.seen);
    }
}

impl RunFeed {
    /// An unproven copy is proven with one direct get: the run's first
    /// stored message after what the feed had. When that is this copy,
    /// nothing lies between and it goes out as a plain event; otherwise (or
    /// when JetStream does not answer) the fan-out reads the stretch from
    /// history. Every watch's first copy comes here, so this must be cheap:
    /// a history read is several requests, one of them a stream info, and
    /// 500 watches opening at once made them the p99 of a whole benchmark.
    async fn prove(&self, ev: Arc<Event>) -> Live {
        let _permit = self.shared.checks.acquire().await;
        self.shared.checks_made.fetch_add(1, Ordering::Relaxed);
        let filter = subject::run_wildcard(&self.prefix, &self.run);
        match self
            .stream
            .direct_get_next_for_subject(filter.as_str(), Some(self.unproven_from))
            .await
        {
            Ok(m) if m.sequence == ev.seq => Live::Event(ev),
            _ => Live::Unproven(ev),
        }
    }
}

#[async_trait]
impl Feed for RunFeed {
    async fn next(&mut self) -> Option<Live> {
        loop {
            if let Some(ev) = self.pending.take() {
                return Some(Live::Event(Arc::new(ev)));
            }
            let check_at = self.check_at;
            let expect_at = self.expect.map(|(_, at)| at);
            let wake = match (check_at, expect_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                biased;
                changed = self.lost.changed() => {
                    changed.ok()?;
                    self.unproven = true;
                    self.check_at = Some(Instant::now());
                    self.check_again = true;
                }
                () = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    let now = Instant::now();
                    if let Some((seq, at)) = self.expect
                        && at <= now
                    {
                        self.expect = None;
                        if seq > self.last {
                            tracing::debug!(run = %self.run, seq, last = self.last, "a stored event's copy did not arrive; resyncing from history");
                            self.resync(seq);
                            return Some(Live::Lagged);
                        }
                    }
                    if check_at.is_some_and(|at| at <= now) {
                        self.check_at = None;
                        let again = std::mem::take(&mut self.check_again);
                        match self.check().await {
                            Ok(()) if again => self.check_at = Some(Instant::now() + GRACE),
                            Ok(()) => {}
                            Err(e) => {
                                tracing::warn!(run = %self.run, error = %e, "cannot check a live feed against the stream; retrying");
                                self.check_again = again;
                                self.check_at = Some(Instant::now() + CHECK_RETRY);
                            }
                        }
                    }
                }
                msg = self.sub.next() => {
                    match self.take(msg?) {
                        Some(Live::Unproven(ev)) => return Some(self.prove(ev).await),
                        Some(item) => return Some(item),
                        None => {}
                    }
                }
            }
        }
    }
}
