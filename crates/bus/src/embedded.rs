//! The embedded in-process bus used by `runcast up`.
//!
//! All state sits behind one `std::sync::Mutex`: every operation is a short,
//! non-async critical section (a push, a trim, a slice copy), so a blocking
//! mutex is cheaper than an async one and can never be held across `.await`.
//! Live delivery uses one `tokio::sync::broadcast` channel per watched run:
//! sending never blocks the publisher, and a watcher that falls behind gets
//! `Lagged`, which the gateway repairs from history.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use runcast_core::{Event, NewEvent, RunId, RunState, now_micros, now_millis};
use tokio::sync::broadcast;

use crate::{Bus, BusError, Feed, Live, Page, RunFilter, Watch};

/// How much history the embedded bus keeps.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Events kept per run; older ones are dropped first.
    pub max_events_per_run: usize,
    /// Bytes of event data kept per run.
    pub max_bytes_per_run: usize,
    /// Bytes of event data kept across all runs; publishes beyond it fail
    /// with [`BusError::Full`] rather than silently dropping other runs' history.
    pub max_total_bytes: usize,
    /// Events older than this are dropped.
    pub max_age: Duration,
    /// Runs kept (including runs that only have watchers).
    pub max_runs: usize,
    /// A finished run (complete/error) is forgotten this long after it finished.
    pub finished_ttl: Duration,
    /// A run with no event for this long is forgotten even if it never finished.
    pub idle_ttl: Duration,
    /// Largest single event (data plus metadata) accepted.
    pub max_event_bytes: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_events_per_run: 10_000,
            max_bytes_per_run: 16 << 20,
            max_total_bytes: 1 << 30,
            max_age: Duration::from_secs(3600),
            max_runs: 10_000,
            finished_ttl: Duration::from_secs(3600),
            idle_ttl: Duration::from_secs(24 * 3600),
            max_event_bytes: 1 << 20,
        }
    }
}

/// Capacity of each run's live broadcast channel. A gateway's fan-out task
/// drains it in microseconds; 1,024 absorbs publish bursts, and beyond that
/// the watcher is told it lagged and reads the difference from history.
const LIVE_CAPACITY: usize = 1024;

#[derive(Clone)]
pub struct EmbeddedBus {
    inner: Arc<Inner>,
}

struct Inner {
    retention: Retention,
    state: Mutex<Store>,
}

/// How long an event `id` is remembered, as JetStream's default duplicate
/// window: a retry within it is not stored again.
pub const DEDUPE_WINDOW: Duration = Duration::from_secs(120);
/// Most ids remembered at once; beyond it the oldest are forgotten early,
/// so the window is bounded in memory whatever the publish rate.
pub const DEDUPE_MAX: usize = 100_000;

#[derive(Default)]
struct Store {
    runs: HashMap<RunId, RunLog>,
    total_bytes: usize,
    seen: Seen,
}

/// The event ids stored within the duplicate window, with their seqs.
#[derive(Default)]
struct Seen {
    seqs: HashMap<(RunId, String), u64>,
    order: VecDeque<(std::time::Instant, RunId, String)>,
}

impl Seen {
    fn forget_old(&mut self, now: std::time::Instant) {
        while let Some((at, ..)) = self.order.front() {
            if now.duration_since(*at) < DEDUPE_WINDOW && self.order.len() <= DEDUPE_MAX {
                break;
            }
            if let Some((_, run, id)) = self.order.pop_front() {
                self.seqs.remove(&(run, id));
            }
        }
    }

    fn get(&self, run: &RunId, id: &str) -> Option<u64> {
        // A borrowed key would need a custom Borrow impl; ids are short.
        self.seqs.get(&(run.clone(), id.to_owned())).copied()
    }

    fn insert(&mut self, now: std::time::Instant, run: &RunId, id: String, seq: u64) {
        self.seqs.insert((run.clone(), id.clone()), seq);
        self.order.push_back((now, run.clone(), id));
    }
}

struct RunLog {
    events: VecDeque<Arc<Event>>,
    bytes: usize,
    /// The last seq assigned (0: none yet).
    head: u64,
    state: Option<RunState>,
    live: broadcast::Sender<Arc<Event>>,
}

impl RunLog {
    fn new() -> Self {
        Self {
            events: VecDeque::new(),
            bytes: 0,
            head: 0,
            state: None,
            live: broadcast::channel(LIVE_CAPACITY).0,
        }
    }

    fn first_retained(&self) -> u64 {
        self.events.front().map_or(self.head + 1, |e| e.seq)
    }

    fn pop_front(&mut self) -> usize {
        let size = self.events.pop_front().map_or(0, |e| e.size());
        self.bytes -= size;
        size
    }
}

impl EmbeddedBus {
    pub fn new(retention: Retention) -> Self {
        Self {
            inner: Arc::new(Inner {
                retention,
                state: Mutex::new(Store::default()),
            }),
        }
    }

    pub fn retention(&self) -> &Retention {
        &self.inner.retention
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        // A panic while holding this lock would be a bug in a few lines of
        // bookkeeping; the data is still consistent enough to keep serving.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops expired events and forgets expired runs. Runs with live
    /// watchers are kept (their history still trims by age) so a watch never
    /// silently detaches. Returns the number of runs forgotten.
    pub fn sweep(&self, now_ms: u64) -> usize {
        let r = &self.inner.retention;
        let age_ms = r.max_age.as_millis() as u64;
        let mut store = self.lock();
        let Store {
            runs, total_bytes, ..
        } = &mut *store;
        for log in runs.values_mut() {
            while log
                .events
                .front()
                .is_some_and(|e| now_ms.saturating_sub(e.ts) > age_ms)
            {
                *total_bytes -= log.pop_front();
            }
        }
        let before = runs.len();
        runs.retain(|_, log| {
            if log.live.receiver_count() > 0 {
                return true;
            }
            let keep = match &log.state {
                None => false,
                Some(s) => match s.finished_ts {
                    Some(f) => now_ms.saturating_sub(f) <= r.finished_ttl.as_millis() as u64,
                    None => now_ms.saturating_sub(s.updated_ts) <= r.idle_ttl.as_millis() as u64,
                },
            };
            if !keep {
                *total_bytes -= log.bytes;
            }
            keep
        });
        before - runs.len()
    }

    /// Runs [`sweep`](Self::sweep) every `every` until the bus is dropped
    /// everywhere else. The caller keeps the handle (supervised, not fire-and-forget).
    pub fn spawn_sweeper(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let forgotten = EmbeddedBus { inner }.sweep(now_millis());
                if forgotten > 0 {
                    tracing::debug!(forgotten, "swept expired runs");
                }
            }
        })
    }

    fn log_mut<'a>(
        runs: &'a mut HashMap<RunId, RunLog>,
        run: &RunId,
        max_runs: usize,
    ) -> Result<&'a mut RunLog, BusError> {
        if !runs.contains_key(run) {
            if runs.len() >= max_runs {
                return Err(BusError::TooManyRuns(max_runs));
            }
            runs.insert(run.clone(), RunLog::new());
        }
        Ok(runs.get_mut(run).expect("inserted above"))
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    async fn publish(&self, run: &RunId, events: Vec<NewEvent>) -> Result<Vec<u64>, BusError> {
        let r = &self.inner.retention;
        let stored_us = now_micros();
        let ts = stored_us / 1000;
        let mut store = self.lock();
        let Store {
            runs,
            total_bytes,
            seen,
        } = &mut *store;
        let now = std::time::Instant::now();
        seen.forget_old(now);
        // An event whose id this run stored within the window is not stored
        // again: its seq is the first one's. (A repeat inside the batch
        // itself is found as it is stored, below.)
        let dups: Vec<Option<u64>> = events
            .iter()
            .map(|ev| ev.id.as_deref().and_then(|id| seen.get(run, id)))
            .collect();
        if dups.iter().all(Option::is_some) {
            return Ok(dups.into_iter().flatten().collect());
        }

        // Check every limit before changing anything: a batch is all or nothing.
        let mut batch_bytes = 0;
        for (ev, _) in events.iter().zip(&dups).filter(|(_, d)| d.is_none()) {
            let size = std::mem::size_of::<Event>()
                + ev.data.get().len()
                + ev.traceparent.as_ref().map_or(0, |t| t.len());
            if size > r.max_event_bytes {
                return Err(BusError::EventTooLarge {
                    size,
                    limit: Some(r.max_event_bytes),
                });
            }
            batch_bytes += size;
        }
        if *total_bytes + batch_bytes > r.max_total_bytes {
            return Err(BusError::Full(r.max_total_bytes));
        }
        let log = Self::log_mut(runs, run, r.max_runs)?;

        let mut seqs = Vec::with_capacity(events.len());
        for (ev, dup) in events.into_iter().zip(dups) {
            let repeat = ev.id.as_deref().and_then(|id| seen.get(run, id));
            if let Some(seq) = dup.or(repeat) {
                seqs.push(seq);
                continue;
            }
            log.head += 1;
            if let Some(id) = &ev.id {
                seen.insert(now, run, id.clone(), log.head);
            }
            let event = Arc::new(Event {
                run: run.clone(),
                seq: log.head,
                kind: ev.kind,
                data: ev.data,
                ts,
                stored_us,
                traceparent: ev.traceparent,
            });
            match &mut log.state {
                Some(s) => s.apply(&event),
                None => log.state = Some(RunState::new(&event)),
            }
            let size = event.size();
            log.bytes += size;
            *total_bytes += size;
            seqs.push(event.seq);
            log.events.push_back(event.clone());
            // No receivers is normal (nobody watching); that is not an error.
            let _ = log.live.send(event);
        }
        while log.events.len() > r.max_events_per_run
            || (log.bytes > r.max_bytes_per_run && log.events.len() > 1)
        {
            *total_bytes -= log.pop_front();
        }
        Ok(seqs)
    }

    async fn watch(&self, run: &RunId) -> Result<Watch, BusError> {
        let mut store = self.lock();
        let log = Self::log_mut(&mut store.runs, run, self.inner.retention.max_runs)?;
        // Subscribing and reading `head` under the same lock is what makes the
        // watch seamless: every event with seq > head reaches this receiver.
        Ok(Watch {
            head: log.head,
            feed: Box::new(BroadcastFeed(log.live.subscribe())),
        })
    }

    async fn read(&self, run: &RunId, from: u64, limit: usize) -> Result<Page, BusError> {
        let store = self.lock();
        let Some(log) = store.runs.get(run) else {
            return Ok(Page {
                events: Vec::new(),
                first: 1,
                head: 0,
            });
        };
        let first = log.first_retained();
        let start = from.max(first);
        // Seqs in the deque are contiguous, so the index is arithmetic.
        let skip = (start - first) as usize;
        let events = log.events.iter().skip(skip).take(limit).cloned().collect();
        Ok(Page {
            events,
            first,
            head: log.head,
        })
    }

    async fn state(&self, run: &RunId) -> Result<Option<RunState>, BusError> {
        Ok(self.lock().runs.get(run).and_then(|l| l.state.clone()))
    }

    async fn runs(&self, filter: RunFilter) -> Result<Vec<RunState>, BusError> {
        let mut all: Vec<RunState> = self
            .lock()
            .runs
            .values()
            .filter_map(|l| l.state.as_ref().filter(|s| filter.matches(s)).cloned())
            .collect();
        all.sort_by(|a, b| {
            b.updated_ts
                .cmp(&a.updated_ts)
                .then_with(|| a.run.cmp(&b.run))
        });
        all.truncate(filter.limit);
        Ok(all)
    }

    fn health(&self) -> Result<(), String> {
        Ok(())
    }
}

struct BroadcastFeed(broadcast::Receiver<Arc<Event>>);

#[async_trait]
impl Feed for BroadcastFeed {
    async fn next(&mut self) -> Option<Live> {
        match self.0.recv().await {
            Ok(ev) => Some(Live::Event(ev)),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(Live::Lagged),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runcast_core::EventKind;

    fn ev(i: u64) -> NewEvent {
        NewEvent::json(
            EventKind::Progress,
            &serde_json::json!({ "done": i, "total": 100 }),
        )
        .unwrap()
    }

    fn run(s: &str) -> RunId {
        RunId::parse(s).unwrap()
    }

    #[tokio::test]
    async fn trims_to_max_events_and_reports_first_retained() {
        let bus = EmbeddedBus::new(Retention {
            max_events_per_run: 3,
            ..Retention::default()
        });
        let r = run("r");
        for i in 1..=5 {
            bus.publish(&r, vec![ev(i)]).await.unwrap();
        }
        let page = bus.read(&r, 1, 100).await.unwrap();
        assert_eq!((page.first, page.head), (3, 5));
        assert_eq!(
            page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(
            bus.state(&r).await.unwrap().unwrap().events,
            5,
            "state counts trimmed events too"
        );
    }

    #[tokio::test]
    async fn sweep_forgets_finished_runs_after_ttl_but_not_watched_ones() {
        let bus = EmbeddedBus::new(Retention {
            finished_ttl: Duration::from_secs(10),
            ..Retention::default()
        });
        let (a, b) = (run("a"), run("b"));
        for r in [&a, &b] {
            bus.publish(r, vec![NewEvent::json(EventKind::Complete, &1).unwrap()])
                .await
                .unwrap();
        }
        let _watch = bus.watch(&b).await.unwrap();
        let now = now_millis();
        assert_eq!(bus.sweep(now), 0);
        assert_eq!(bus.sweep(now + 11_000), 1);
        assert!(bus.state(&a).await.unwrap().is_none());
        assert!(
            bus.state(&b).await.unwrap().is_some(),
            "watched run is kept"
        );
    }

    #[tokio::test]
    async fn limits_fail_the_whole_batch() {
        let bus = EmbeddedBus::new(Retention {
            max_runs: 1,
            max_event_bytes: 200,
            ..Retention::default()
        });
        bus.publish(&run("a"), vec![ev(1)]).await.unwrap();
        assert_eq!(
            bus.publish(&run("b"), vec![ev(1)]).await,
            Err(BusError::TooManyRuns(1))
        );
        let big = NewEvent::json(EventKind::Log, &"x".repeat(300)).unwrap();
        assert!(matches!(
            bus.publish(&run("a"), vec![ev(2), big]).await,
            Err(BusError::EventTooLarge { .. })
        ));
        assert_eq!(
            bus.read(&run("a"), 0, 10).await.unwrap().head,
            1,
            "nothing of the failed batch was stored"
        );
    }

    #[tokio::test]
    async fn total_bytes_limit_rejects_and_sweep_releases() {
        let bus = EmbeddedBus::new(Retention {
            max_total_bytes: 1000,
            finished_ttl: Duration::ZERO,
            ..Retention::default()
        });
        let big = || NewEvent::json(EventKind::Complete, &"x".repeat(600)).unwrap();
        bus.publish(&run("a"), vec![big()]).await.unwrap();
        assert_eq!(
            bus.publish(&run("b"), vec![big()]).await,
            Err(BusError::Full(1000))
        );
        bus.sweep(now_millis() + 1);
        bus.publish(&run("b"), vec![big()]).await.unwrap();
    }
}
