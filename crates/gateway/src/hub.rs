//! Interest-based fan-out.
//!
//! The hub holds one bus watch per run that has at least one local
//! subscriber, never one per client, and drops it when the last one leaves.
//! Each event is serialized once into an [`OutFrame`] whose bytes are shared
//! by every subscriber's queue. Queues are bounded in messages and bytes; a
//! subscriber whose queue is full is marked slow and disconnected with a
//! resumable close code instead of being allowed to grow.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use futures_util::task::AtomicWaker;
use runcast_bus::{Bus, BusError, Live};
use runcast_core::{CloseCode, Event, RunId, frame};
use runcast_telemetry::OpenTelemetrySpanExt;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::{
    Metrics,
    frame::{OutFrame, micros_since},
    replay::{Replay, Replayed},
};

/// A subscriber as the hub sees it: one session's bounded queue and its
/// "please close" signal. (Not the TCP connection: over HTTP/2 one
/// connection carries many sessions.)
pub struct Subscriber {
    pub id: u64,
    tx: tokio::sync::mpsc::Sender<Arc<OutFrame>>,
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    /// Set once, by the first close request; also what `offer` checks.
    close_code: OnceLock<CloseCode>,
    /// Wakes the connection's task when it must close. Only that one task
    /// ever waits, so an `AtomicWaker` (two atomic operations per poll)
    /// replaces a `Notify` (a mutex per poll): the connection loop polls
    /// this on every step.
    close_waker: AtomicWaker,
}

impl Subscriber {
    /// A connection handle and the receiving end of its queue.
    pub fn new(
        id: u64,
        max_messages: usize,
        max_bytes: usize,
    ) -> (Arc<Self>, tokio::sync::mpsc::Receiver<Arc<OutFrame>>) {
        let (tx, rx) = tokio::sync::mpsc::channel(max_messages.max(1));
        let conn = Self {
            id,
            tx,
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
            close_code: OnceLock::new(),
            close_waker: AtomicWaker::new(),
        };
        (Arc::new(conn), rx)
    }

    /// Queues a shared frame. Returns false when the queue is over its
    /// message or byte bound, in which case the connection is told to close.
    fn offer(&self, frame: &Arc<OutFrame>) -> bool {
        if self.close_code.get().is_some() {
            return true;
        }
        let len = frame.text.len();
        let before = self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before + len > self.max_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.close(CloseCode::SlowConsumer);
            return false;
        }
        match self.tx.try_send(frame.clone()) {
            Ok(()) => true,
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                self.close(CloseCode::SlowConsumer);
                false
            }
            // The connection is already gone; nothing to deliver to.
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => true,
        }
    }

    /// Called by the connection when it takes a frame off its queue.
    pub fn taken(&self, frame: &OutFrame) {
        self.queued_bytes
            .fetch_sub(frame.text.len(), Ordering::Relaxed);
    }

    /// Asks the connection to close with `code` (the first request wins).
    pub fn close(&self, code: CloseCode) {
        if self.close_code.set(code).is_ok() {
            self.close_waker.wake();
        }
    }

    /// Completes once [`close`](Self::close) was called; yields the code.
    pub fn closed(&self) -> impl Future<Output = CloseCode> + '_ {
        std::future::poll_fn(move |cx| {
            if let Some(code) = self.close_code.get() {
                return std::task::Poll::Ready(*code);
            }
            self.close_waker.register(cx.waker());
            // Check again: `close` may have run between the check and the register.
            match self.close_code.get() {
                Some(code) => std::task::Poll::Ready(*code),
                None => std::task::Poll::Pending,
            }
        })
    }

    pub fn close_code(&self) -> Option<CloseCode> {
        self.close_code.get().copied()
    }

    /// How full the queue is, as a share of its byte bound.
    pub fn queue_fill(&self) -> f64 {
        self.queued_bytes.load(Ordering::Relaxed) as f64 / self.max_bytes.max(1) as f64
    }
}

type Subscribers = Arc<Mutex<HashMap<u64, Arc<Subscriber>>>>;

struct RunFanout {
    subs: Subscribers,
    task: JoinHandle<()>,
}

/// One per gateway process.
pub struct Hub {
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
    replay_page: usize,
    // Lock order: `runs`, then a run's `subs`. Both are std mutexes: every
    // critical section is a map operation or a loop of `try_send`, never an
    // `.await`.
    runs: Mutex<HashMap<RunId, RunFanout>>,
    /// Runs whose bus watch is being opened. The first subscriber of a run
    /// opens it while later ones wait on this lock (an async mutex, held
    /// across the open on purpose), so a burst of subscribers to a new run
    /// costs the bus one watch, not one each.
    opening: Mutex<HashMap<RunId, Arc<tokio::sync::Mutex<()>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    pub fn new(bus: Arc<dyn Bus>, metrics: Arc<Metrics>, replay_page: usize) -> Self {
        Self {
            bus,
            metrics,
            replay_page,
            runs: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
        }
    }

    /// Adds `conn` as a subscriber of `run`. When this returns, every event
    /// published from now on will be offered to `conn` (the bus watch is
    /// open), so a caller can read state/history next without a seam.
    pub async fn add(&self, run: &RunId, conn: &Arc<Subscriber>) -> Result<(), BusError> {
        if self.try_join(run, conn) {
            return Ok(());
        }
        let gate = lock(&self.opening).entry(run.clone()).or_default().clone();
        let _opening = gate.lock().await;
        // Whoever held the gate before us may have opened the watch.
        if self.try_join(run, conn) {
            return Ok(());
        }
        let opened = self.bus.watch(run).await;
        let result = opened.map(|watch| self.install(run, conn, watch));
        // After `install`: a subscriber arriving now joins the open watch.
        let mut opening = lock(&self.opening);
        // Drop the gate once nobody else holds a handle to it.
        if opening.get(run).is_some_and(|g| Arc::strong_count(g) <= 2) {
            opening.remove(run);
        }
        result
    }

    /// Registers the fan-out for a freshly opened watch, with `conn` as its
    /// first subscriber.
    fn install(&self, run: &RunId, conn: &Arc<Subscriber>, watch: runcast_bus::Watch) {
        let mut runs = lock(&self.runs);
        if let Some(f) = runs.get(run) {
            // Cannot happen while openings go through the gate; harmless
            // if it does: join the existing watch and drop this one.
            lock(&f.subs).insert(conn.id, conn.clone());
            return;
        }
        let subs: Subscribers = Arc::new(Mutex::new(HashMap::from([(conn.id, conn.clone())])));
        let span = tracing::info_span!("fanout", run = %run);
        let task = tokio::spawn(
            fanout(
                run.clone(),
                watch,
                subs.clone(),
                self.bus.clone(),
                self.metrics.clone(),
                self.replay_page,
            )
            .instrument(span),
        );
        runs.insert(run.clone(), RunFanout { subs, task });
        self.metrics.watched_runs.set(runs.len() as i64);
    }

    fn try_join(&self, run: &RunId, conn: &Arc<Subscriber>) -> bool {
        let mut runs = lock(&self.runs);
        // A fan-out that ended (it closed its subscribers) is not joined:
        // the caller opens a new watch.
        if runs.get(run).is_some_and(|f| f.task.is_finished()) {
            runs.remove(run);
            self.metrics.watched_runs.set(runs.len() as i64);
        }
        match runs.get(run) {
            Some(f) => {
                lock(&f.subs).insert(conn.id, conn.clone());
                true
            }
            None => false,
        }
    }

    /// Removes `conn` from `run`; closes the bus watch when it was the last.
    pub fn remove(&self, run: &RunId, conn_id: u64) {
        let mut runs = lock(&self.runs);
        let empty = match runs.get(run) {
            Some(f) => {
                let mut subs = lock(&f.subs);
                subs.remove(&conn_id);
                subs.is_empty()
            }
            None => false,
        };
        if empty && let Some(f) = runs.remove(run) {
            f.task.abort();
        }
        self.metrics.watched_runs.set(runs.len() as i64);
    }

    /// Runs with at least one local subscriber.
    pub fn watched_runs(&self) -> usize {
        lock(&self.runs).len()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        for (_, f) in lock(&self.runs).drain() {
            f.task.abort();
        }
    }
}

/// Forwards one run's live events to its local subscribers, keeping the
/// sequence contiguous: anything the watch skipped (lag, or a hole in the
/// feed) is read back from history, and what history no longer holds is
/// announced as a gap, so subscribers never wait for an event that will not come.
async fn fanout(
    run: RunId,
    mut watch: runcast_bus::Watch,
    subs: Subscribers,
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
    page: usize,
) {
    let mut last = watch.head;
    let emit = |frame: OutFrame| {
        let frame = Arc::new(frame);
        let subs = lock(&subs);
        let mut slow = 0;
        for conn in subs.values() {
            if !conn.offer(&frame) {
                slow += 1;
            }
        }
        if slow > 0 {
            metrics.slow_consumer_disconnects.inc_by(slow);
            tracing::info!(slow, "slow consumers disconnected");
        }
    };
    loop {
        let item = watch.feed.next().await;
        // Seqs need not be contiguous (NATS numbers events across all runs),
        // so a jump is not a hole: only the feed saying it lagged is.
        // Where history must be read up to before the item is taken.
        let (item, repair_to) = match item {
            Some(Live::Event(ev) | Live::Unproven(ev)) if ev.seq <= last => continue,
            Some(Live::Event(ev)) => (Some(Live::Event(ev)), None),
            // Not a lag: whatever lies between the last seq and an event
            // the feed could not vouch for is read from history (usually
            // nothing), then the event goes out live, with its trace. Not
            // counted as a repair.
            Some(Live::Unproven(ev)) => {
                let to = ev.seq - 1;
                (Some(Live::Event(ev)), Some(to))
            }
            Some(Live::Lagged) => {
                metrics.feed_repairs.inc();
                (Some(Live::Lagged), Some(u64::MAX))
            }
            None => {
                tracing::warn!("bus closed the watch; closing subscribers so they resume");
                for conn in lock(&subs).values() {
                    conn.close(CloseCode::InternalError);
                }
                return;
            }
        };
        if let Some(to) = repair_to
            && to > last
        {
            // The feed skipped events: forward history from `last` to its
            // end (what retention dropped as a gap); live events already
            // covered by it are skipped above.
            let mut replay = Replay::new(&*bus, &run, last + 1, to, page);
            loop {
                match replay.next().await {
                    Ok(Some(Replayed::Gap { from, to })) => {
                        metrics.gap_notices.inc();
                        emit(OutFrame::new(
                            run.clone(),
                            from,
                            to,
                            frame::encode_gap(&run, from, to),
                        ));
                        last = to;
                    }
                    Ok(Some(Replayed::Event(ev))) => {
                        metrics.events_received.inc();
                        emit(OutFrame::event_after(&ev, last));
                        last = ev.seq;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // Going on would skip what the read should have
                        // brought, without a word. Subscribers instead
                        // reconnect and resume from their cursors, which lie
                        // before the hole; their sessions read it again.
                        tracing::warn!(error = %e, last, "history read failed while repairing the live feed; closing subscribers so they resume from their cursors");
                        metrics.feed_repair_failures.inc();
                        for conn in lock(&subs).values() {
                            conn.close(CloseCode::InternalError);
                        }
                        return;
                    }
                }
            }
        }
        if let Some(Live::Event(ev)) = item
            && ev.seq > last
        {
            let received = std::time::Instant::now();
            metrics.events_received.inc();
            metrics
                .publish_to_receive
                .observe(micros_since(ev.stored_us) as f64 / 1e6);
            let mut frame = OutFrame::event_after(&ev, last);
            frame.live = Some((ev.stored_us, received));
            match traced(&ev) {
                Some(parent) => {
                    // runcast.receive continues the publisher's trace;
                    // runcast.fanout is its child and covers handing the
                    // frame to every local subscriber's queue.
                    let receive = tracing::info_span!(
                        target: runcast_telemetry::TARGET,
                        "runcast.receive",
                        otel.kind = "consumer",
                        runcast.run = %run,
                        runcast.seq = ev.seq,
                        runcast.publish_to_receive_us = micros_since(ev.stored_us),
                    );
                    let _ = receive.set_parent(parent);
                    let fanout = tracing::info_span!(
                        target: runcast_telemetry::TARGET,
                        parent: &receive,
                        "runcast.fanout",
                        runcast.subscribers = lock(&subs).len(),
                    );
                    frame.trace = Some(fanout.context());
                    fanout.in_scope(|| emit(frame));
                }
                None => emit(frame),
            }
            last = ev.seq;
        }
    }
}

/// The remote parent of a live event's gateway spans: only while traces are
/// exported, and only for an event its publisher sampled (parent-based
/// sampling would drop the rest, so they cost no span at all).
fn traced(ev: &Event) -> Option<runcast_telemetry::Context> {
    if !runcast_telemetry::exporting() {
        return None;
    }
    let tp = ev.traceparent.as_deref()?;
    if !runcast_telemetry::sampled(tp) {
        return None;
    }
    runcast_telemetry::parent(tp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use runcast_bus::{EmbeddedBus, Feed, Retention, Watch};
    use runcast_core::{EventKind, NewEvent};

    /// A feed that replays a script, then ends.
    struct Scripted(std::collections::VecDeque<Live>);

    #[async_trait::async_trait]
    impl Feed for Scripted {
        async fn next(&mut self) -> Option<Live> {
            match self.0.pop_front() {
                Some(item) => Some(item),
                None => std::future::pending().await,
            }
        }
    }

    #[tokio::test]
    async fn a_lagged_feed_is_repaired_from_history_without_duplicates() {
        let bus = EmbeddedBus::new(Retention::default());
        let run = RunId::parse("lagging").unwrap();
        let mut events = Vec::new();
        for i in 1..=6u64 {
            let seq = bus
                .publish(&run, vec![NewEvent::json(EventKind::Log, &i).unwrap()])
                .await
                .unwrap()[0];
            events.push(bus.read(&run, seq, 1).await.unwrap().events[0].clone());
        }
        // The feed delivers 1, says it lagged (2..=6 were skipped), then
        // delivers 5 and 6 late: the repair must cover 2..=6 once each.
        let script = [
            Live::Event(events[0].clone()),
            Live::Lagged,
            Live::Event(events[4].clone()),
            Live::Event(events[5].clone()),
        ];
        let watch = Watch {
            head: 0,
            feed: Box::new(Scripted(script.into_iter().collect())),
        };
        let (conn, mut rx) = Subscriber::new(1, 64, 1 << 20);
        let subs: Subscribers = Arc::new(Mutex::new(HashMap::from([(1, conn)])));
        let metrics = Arc::new(Metrics::new("embedded"));
        let task = tokio::spawn(fanout(run, watch, subs, Arc::new(bus), metrics.clone(), 2));
        let mut got = Vec::new();
        while got.len() < 6 {
            let f = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            got.push((f.first, f.last));
        }
        task.abort();
        assert_eq!(
            got,
            (1..=6).map(|s| (s, s)).collect::<Vec<_>>(),
            "contiguous, each once"
        );
        assert!(rx.try_recv().is_err(), "nothing extra");
        assert_eq!(metrics.feed_repairs.get(), 1, "the repair is counted");
    }

    /// A bus whose history reads fail (JetStream not answering), and
    /// which otherwise is the embedded one.
    struct FailingReads(EmbeddedBus);

    #[async_trait::async_trait]
    impl Bus for FailingReads {
        async fn publish(&self, run: &RunId, events: Vec<NewEvent>) -> Result<Vec<u64>, BusError> {
            self.0.publish(run, events).await
        }
        async fn watch(&self, run: &RunId) -> Result<Watch, BusError> {
            self.0.watch(run).await
        }
        async fn read(&self, _: &RunId, _: u64, _: usize) -> Result<runcast_bus::Page, BusError> {
            Err(BusError::Unavailable("timed out".into()))
        }
        async fn state(&self, run: &RunId) -> Result<Option<runcast_core::RunState>, BusError> {
            self.0.state(run).await
        }
        async fn runs(
            &self,
            f: runcast_bus::RunFilter,
        ) -> Result<Vec<runcast_core::RunState>, BusError> {
            self.0.runs(f).await
        }
        fn health(&self) -> Result<(), String> {
            Ok(())
        }
    }

    /// The outside tester's finding: a repair whose history read failed
    /// went on with the next live event, so the hole was skipped without a
    /// word and the client's cursor moved past it. Now the subscribers are
    /// closed (1011) before anything after the hole goes out, and resume
    /// from their cursors.
    #[tokio::test]
    async fn a_repair_whose_read_fails_closes_subscribers_instead_of_skipping() {
        let inner = EmbeddedBus::new(Retention::default());
        let run = RunId::parse("hole").unwrap();
        let mut events = Vec::new();
        for i in 1..=3u64 {
            let seq = inner
                .publish(&run, vec![NewEvent::json(EventKind::Log, &i).unwrap()])
                .await
                .unwrap()[0];
            events.push(inner.read(&run, seq, 1).await.unwrap().events[0].clone());
        }
        let script = [
            Live::Event(events[0].clone()),
            Live::Lagged,
            Live::Event(events[2].clone()),
        ];
        let watch = Watch {
            head: 0,
            feed: Box::new(Scripted(script.into_iter().collect())),
        };
        let (conn, mut rx) = Subscriber::new(1, 64, 1 << 20);
        let subs: Subscribers = Arc::new(Mutex::new(HashMap::from([(1, conn.clone())])));
        let metrics = Arc::new(Metrics::new("embedded"));
        let bus: Arc<dyn Bus> = Arc::new(FailingReads(inner));
        let task = tokio::spawn(fanout(run, watch, subs, bus, metrics.clone(), 2));
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the fan-out ends")
            .unwrap();
        let first = rx.recv().await.unwrap();
        assert_eq!((first.first, first.last), (1, 1));
        assert!(rx.try_recv().is_err(), "nothing after the hole went out");
        assert_eq!(conn.close_code(), Some(CloseCode::InternalError));
        assert_eq!(metrics.feed_repair_failures.get(), 1);
    }
}
