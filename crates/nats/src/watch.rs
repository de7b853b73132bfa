//! Live events for the runs a gateway watches, through **one** ordered
//! consumer per gateway whose `filter_subjects` are exactly those runs.
//!
//! Why one consumer and not one per run: nats-server delivers each consumer
//! from its own goroutine, so when several runs' events are stored at once,
//! one consumer per run means that many goroutines waking together. Measured
//! with `examples/nats_hop.rs` (500 runs, publishes in bursts of 8):
//! publish → subscriber p50 0.99 / p99 1.81 ms with a consumer per run, 0.35
//! / 0.72 ms with one consumer for all of them. An ordered consumer also
//! keeps what a core subscription would lose: it is gap-free and in stream
//! order, and recreates itself from its last sequence after a NATS failure.
//!
//! The consumer is rebuilt whenever the set of runs changes. A rebuilt
//! consumer starts where the previous one stopped, or earlier, back to the
//! point each newly watched run was opened at, so every feed stays
//! continuous: an event a feed already has is skipped by the fan-out. When
//! that point is too far back (or a feed's buffer overflowed), the feed is
//! told it lagged, and the fan-out repairs it from history.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::{
    consumer::{DeliverPolicy, pull},
    stream::Stream,
};
use async_trait::async_trait;
use futures_util::StreamExt;
use runcast_bus::{Feed, Live};
use runcast_core::{Event, RunId, subject};
use tokio::sync::{Notify, mpsc};

use crate::message::delivered_event;

/// Events buffered per watched run before its feed is declared lagged.
const FEED_BUFFER: usize = 4096;
/// How far back (in stream seqs) a rebuild may start to keep a new run
/// continuous; beyond it the run is repaired from history instead.
const MAX_REWIND: u64 = 10_000;
/// Interest changes within this window share one rebuild.
const DEBOUNCE: Duration = Duration::from_millis(2);
/// See the comment where it is used.
const PULL_EXPIRES: Duration = Duration::from_secs(4);
/// How often the consumer checks whether the client has reconnected.
const RECONNECT_CHECK: Duration = Duration::from_millis(500);
/// After this long without a delivery, the consumer checks that the stream
/// has not moved past it.
const QUIET_CHECK: Duration = Duration::from_secs(10);

struct Slot {
    id: u64,
    tx: mpsc::Sender<Live>,
    /// The stream's last seq when the run was opened: the feed misses
    /// nothing if the consumer delivers from right after it.
    opened_at: u64,
    /// Set when an event could not be buffered; the feed gets `Lagged`
    /// before anything else.
    lagged: bool,
}

#[derive(Default)]
pub(crate) struct Watches {
    slots: Mutex<HashMap<RunId, Slot>>,
    changed: Notify,
    next_id: AtomicU64,
    pub(crate) rebuilds: AtomicU64,
}

impl Watches {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RunId, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts following `run`. `opened_at` is a seq after which every event
    /// of the run is still to come: the run's last event, or for a run
    /// without events the stream's last seq, read before that.
    pub(crate) fn open(self: &Arc<Self>, run: &RunId, opened_at: u64) -> RunFeed {
        let (tx, rx) = mpsc::channel(FEED_BUFFER);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            run.clone(),
            Slot {
                id,
                tx,
                opened_at,
                lagged: false,
            },
        );
        self.changed.notify_one();
        RunFeed {
            rx,
            run: run.clone(),
            id,
            watches: self.clone(),
        }
    }

    fn deliver(&self, ev: Event) {
        let mut slots = self.lock();
        let Some(slot) = slots.get_mut(&ev.run) else {
            return; // no longer watched; the next rebuild drops its filter
        };
        if slot.lagged {
            if slot.tx.try_send(Live::Lagged).is_err() {
                return;
            }
            slot.lagged = false;
        }
        if slot.tx.try_send(Live::Event(Arc::new(ev))).is_err() {
            slot.lagged = true;
        }
    }

    fn mark_lagged(&self, runs: &[RunId]) {
        let mut slots = self.lock();
        for run in runs {
            if let Some(slot) = slots.get_mut(run) {
                slot.lagged = slot.tx.try_send(Live::Lagged).is_err();
            }
        }
    }

    /// Follows the watched runs forever: builds the consumer, delivers its
    /// events, and rebuilds it when the runs change or it fails.
    pub(crate) async fn follow(
        self: Arc<Self>,
        client: async_nats::Client,
        stream: Stream,
        prefix: String,
    ) {
        let connects = || client.statistics().connects.load(Ordering::Relaxed);
        // Every watched run's events from this seq on are delivered (or
        // will be): where the next consumer must start at the latest.
        let mut cursor: Option<u64> = None;
        let mut built: HashMap<RunId, u64> = HashMap::new();
        let mut consumer_name: Option<String> = None;
        loop {
            let wanted: HashMap<RunId, (u64, u64)> = self
                .lock()
                .iter()
                .map(|(run, s)| (run.clone(), (s.id, s.opened_at)))
                .collect();
            if wanted.is_empty() {
                if let Some(name) = consumer_name.take() {
                    let _ = stream.delete_consumer(&name).await;
                }
                built.clear();
                self.changed.notified().await;
                tokio::time::sleep(DEBOUNCE).await;
                continue;
            }
            // Runs this consumer did not cover yet (or opened anew since).
            let fresh: Vec<(&RunId, u64)> = wanted
                .iter()
                .filter(|(run, (id, _))| built.get(*run) != Some(id))
                .map(|(run, (_, at))| (run, *at))
                .collect();
            let earliest_fresh = fresh.iter().map(|(_, at)| at + 1).min();
            let start = match (cursor, earliest_fresh) {
                (Some(c), Some(f)) => c.min(f.max(c.saturating_sub(MAX_REWIND))),
                (Some(c), None) => c,
                (None, Some(f)) => f,
                (None, None) => 1,
            };
            let repair: Vec<RunId> = fresh
                .iter()
                .filter(|(_, at)| at + 1 < start)
                .map(|(run, _)| (*run).clone())
                .collect();
            let filters: Vec<String> = wanted
                .keys()
                .map(|run| subject::run_wildcard(&prefix, run))
                .collect();
            let created = stream
                .create_consumer(pull::OrderedConfig {
                    filter_subjects: filters,
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: start.max(1),
                    },
                    // Pull requests expire after this and the idle heartbeat
                    // is half of it: a consumer lost with a NATS node is
                    // noticed by missed heartbeats and recreated from its
                    // last seq, so this bounds how long delivery can stall.
                    max_expires: PULL_EXPIRES,
                    ..Default::default()
                })
                .await;
            let consumer = match created {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, runs = wanted.len(), "cannot create the watch consumer; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let name = consumer.cached_info().name.clone();
            let mut messages = match consumer.messages().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot pull from the watch consumer; retrying");
                    let _ = stream.delete_consumer(&name).await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Some(old) = consumer_name.replace(name) {
                let _ = stream.delete_consumer(&old).await;
            }
            cursor = Some(start);
            self.rebuilds.fetch_add(1, Ordering::Relaxed);
            built = wanted
                .iter()
                .map(|(run, (id, _))| (run.clone(), *id))
                .collect();
            self.mark_lagged(&repair);

            // Deliver until the runs change or the consumer gives up, or
            // the client reconnects: after NATS restarts the consumer (R1,
            // in memory) is gone, and rebuilding it at once from the
            // cursor beats waiting for the ordered consumer's own recovery
            // (missed heartbeats, then retries backing off to 10 s).
            let built_on = connects();
            let mut check = tokio::time::interval(RECONNECT_CHECK);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_delivery = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = check.tick() => {
                        if connects() != built_on {
                            tracing::info!("NATS reconnected; rebuilding the watch consumer");
                            break;
                        }
                        // A safety net for a consumer that went quiet while
                        // the stream moved on (seen once after a restart of
                        // the whole NATS cluster): after a quiet spell, ask
                        // the stream where it is, and rebuild if it is past
                        // the cursor. Rebuilding redelivers nothing twice
                        // that matters: the fan-out skips what it has.
                        if last_delivery.elapsed() >= QUIET_CHECK {
                            last_delivery = tokio::time::Instant::now();
                            let behind = match (&cursor, stream.get_info().await) {
                                (Some(c), Ok(info)) => info.state.last_sequence >= *c,
                                _ => false,
                            };
                            if behind {
                                tracing::debug!("watch consumer quiet while the stream moved on; rebuilding");
                                break;
                            }
                        }
                    }
                    next = messages.next() => match next {
                        Some(Ok(msg)) => {
                            last_delivery = tokio::time::Instant::now();
                            let Ok(info) = msg.info() else { continue };
                            cursor = Some(info.stream_sequence + 1);
                            if let Some(ev) = delivered_event(&prefix, &msg, &info) {
                                self.deliver(ev);
                            }
                        }
                        Some(Err(e)) => {
                            // The ordered consumer recreates itself after
                            // most errors; this one ends it: rebuild.
                            tracing::warn!(error = %e, "watch consumer failed; rebuilding");
                            tokio::time::sleep(Duration::from_millis(250)).await;
                            break;
                        }
                        None => break,
                    },
                    () = self.changed.notified() => {
                        tokio::time::sleep(DEBOUNCE).await;
                        break;
                    }
                }
            }
        }
    }
}

/// One run's live events, fed by the gateway's shared consumer.
pub(crate) struct RunFeed {
    rx: mpsc::Receiver<Live>,
    run: RunId,
    id: u64,
    watches: Arc<Watches>,
}

#[async_trait]
impl Feed for RunFeed {
    async fn next(&mut self) -> Option<Live> {
        self.rx.recv().await
    }
}

impl Drop for RunFeed {
    fn drop(&mut self) {
        let mut slots = self.watches.lock();
        if slots.get(&self.run).is_some_and(|s| s.id == self.id) {
            slots.remove(&self.run);
            drop(slots);
            self.watches.changed.notify_one();
        }
    }
}
