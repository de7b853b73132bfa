//! Run state in a JetStream KV bucket (`RUNCAST_RUNS`, one key per run).
//!
//! Workers only publish events; nobody has to remember to write state. Every
//! gateway runs a [`fold`] task on one shared durable consumer of the events
//! stream. The consumer pins one gateway at a time (a priority group with
//! the pinned-client policy), so normally a single folder sees every event
//! in stream order; when it dies, the pin moves to another gateway after
//! `PIN_TIMEOUT`.
//!
//! The fold is exactly once and in order regardless of who holds the pin:
//! - a run's value is its [`RunState`], whose `seq` says up to which event
//!   it is folded; events at or below it are skipped, so redeliveries and
//!   replays do nothing;
//! - writes are compare-and-set on the key's revision, so two folders can
//!   never both extend the same state;
//! - before folding an event, the folder must know it has seen every event
//!   of the run between the stored `seq` and this one. It knows when its own
//!   deliveries have been contiguous (consumer sequence +1 each time) since
//!   before that `seq`; otherwise (after a failover, a redelivery, another
//!   folder pulling) it reads the run's missing events from the stream.
//!
//! Each gateway also mirrors the bucket in memory through a KV watch, which
//! serves `GET /v1/runs` without a round trip per run.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, PriorityPolicy, pull},
    kv::{self, Operation},
    stream::{DirectGetErrorKind, Stream},
};
use futures_util::StreamExt;
use runcast_bus::BusError;
use runcast_core::{Event, RunId, RunState, subject};

use crate::{
    error::NatsError,
    message::{delivered_event, patiently, to_event},
    stream::StreamSettings,
};

/// How long the pin stays with a folder that stopped pulling.
const PIN_TIMEOUT: Duration = Duration::from_secs(6);
/// Pull expiry: well below `PIN_TIMEOUT`, so a live folder keeps its pin.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// Events folded per batch; a batch costs one write per run in it.
const BATCH: usize = 512;
/// How long a batch gathers events before it is folded.
const FOLD_WINDOW: Duration = Duration::from_millis(100);
/// Runs folded at once within a batch.
const PARALLEL: usize = 32;
/// Cached (revision, state) pairs kept by a folder.
const CACHE_MAX: usize = 20_000;
const GROUP: &str = "fold";

/// Creates the state bucket, or brings an existing one's age limit and
/// replicas in line with the stream's.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<kv::Store, NatsError> {
    let err = |op: &'static str| move |e: String| NatsError::JetStream { op, reason: e };
    match js.get_key_value(&settings.state_bucket).await {
        Ok(store) => {
            let stream_name = format!("KV_{}", settings.state_bucket);
            let mut stream = js
                .get_stream(&stream_name)
                .await
                .map_err(|e| err("state bucket lookup")(e.to_string()))?;
            let have = stream
                .info()
                .await
                .map_err(|e| err("state bucket info")(e.to_string()))?
                .config
                .clone();
            if have.max_age != settings.max_age || have.num_replicas != settings.replicas {
                let want = jetstream::stream::Config {
                    max_age: settings.max_age,
                    num_replicas: settings.replicas,
                    ..have
                };
                js.update_stream(&want)
                    .await
                    .map_err(|e| err("state bucket update")(e.to_string()))?;
                tracing::info!(bucket = %settings.state_bucket, "updated state bucket limits");
            }
            Ok(store)
        }
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: settings.state_bucket.clone(),
                description: "runcast run states, folded from RUNCAST_EVENTS".into(),
                history: 1,
                // A state lives as long after its run's last event as the
                // events themselves.
                max_age: settings.max_age,
                storage: jetstream::stream::StorageType::File,
                num_replicas: settings.replicas,
                // Expiry leaves a marker, so every gateway's mirror forgets
                // the run too.
                limit_markers: Some(Duration::from_secs(60)),
                ..Default::default()
            })
            .await
            .map_err(|e| err("state bucket create")(e.to_string())),
    }
}

/// A run's stored state and the revision to compare-and-set against (0: the
/// key does not exist).
#[derive(Clone)]
pub(crate) struct Stored {
    revision: u64,
    pub(crate) state: Option<RunState>,
}

pub(crate) async fn load(kv: &kv::Store, run: &RunId) -> Result<Stored, BusError> {
    let entry = patiently(|| async {
        kv.entry(run.as_str())
            .await
            .map_err(|e| BusError::Unavailable(format!("reading the state of {run}: {e}")))
    })
    .await?;
    Ok(match entry {
        Some(e) if e.operation == Operation::Put => Stored {
            revision: e.revision,
            state: decode(run, &e.value),
        },
        // A deleted or expired key: the next write must name its revision.
        Some(e) => Stored {
            revision: e.revision,
            state: None,
        },
        None => Stored {
            revision: 0,
            state: None,
        },
    })
}

fn decode(run: &RunId, bytes: &[u8]) -> Option<RunState> {
    match serde_json::from_slice::<RunState>(bytes) {
        Ok(s) if s.run == *run => Some(s),
        Ok(s) => {
            tracing::warn!(key = %run, run = %s.run, "state stored under another run's key; ignored");
            None
        }
        Err(e) => {
            tracing::warn!(run = %run, error = %e, "unreadable run state; it will be folded again");
            None
        }
    }
}

/// Reads run `run`'s events from `from` up to and including `to` from the
/// stream, in order, at most `limit` of them.
pub(crate) async fn read_events(
    stream: &Stream,
    prefix: &str,
    run: &RunId,
    (from, to): (u64, u64),
    limit: usize,
) -> Result<Vec<Event>, BusError> {
    let filter = subject::run_wildcard(prefix, run);
    let mut out = Vec::new();
    let mut seq = from.max(1);
    while seq <= to && out.len() < limit {
        let next = patiently(|| async {
            match stream.direct_get_next_for_subject(&filter, Some(seq)).await {
                Ok(m) => Ok(Some(m)),
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
                Err(e) => Err(BusError::Unavailable(format!("reading {filter}: {e}"))),
            }
        })
        .await?;
        match next {
            Some(m) if m.sequence <= to => {
                seq = m.sequence + 1;
                out.extend(to_event(prefix, m));
            }
            _ => break,
        }
    }
    Ok(out)
}

/// Folds `events` (in seq order) onto `state`.
pub(crate) fn fold_onto(state: Option<RunState>, events: &[Event]) -> Option<RunState> {
    let mut it = events.iter();
    let mut state = match state {
        Some(s) => s,
        None => RunState::new(it.next()?),
    };
    for ev in it {
        state.apply(ev);
    }
    Some(state)
}

struct Folder {
    kv: kv::Store,
    stream: Stream,
    prefix: String,
    /// Recently written states, so a busy run costs no read per batch.
    cache: Mutex<HashMap<RunId, Stored>>,
}

/// Where this folder's deliveries have been contiguous since.
#[derive(Default)]
struct Contiguity {
    last_delivery: u64,
    /// The stream seq from which this folder has received every event, or
    /// `None` right after a break in its deliveries.
    since: Option<u64>,
}

impl Contiguity {
    fn observe(&mut self, info: &jetstream::message::Info<'_>) {
        if info.consumer_sequence != self.last_delivery + 1 {
            self.since = None;
        }
        self.last_delivery = info.consumer_sequence;
        // First deliveries go out in stream order; a redelivery is an old
        // event, and says nothing about what came after it.
        if info.delivered == 1 && self.since.is_none() {
            self.since = Some(info.stream_sequence);
        }
    }
}

/// Keeps the state bucket folded from the stream, forever. Every gateway
/// runs one; the consumer's pin decides which one does the work.
pub(crate) async fn fold(stream: Stream, kv: kv::Store, prefix: String, bucket: String) {
    let folder = Arc::new(Folder {
        kv,
        stream,
        prefix,
        cache: Mutex::new(HashMap::new()),
    });
    let name = format!("fold_{bucket}");
    loop {
        if let Err(e) = folder.clone().pull(&name).await {
            tracing::warn!(error = %e, "run state folder stopped; restarting");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl Folder {
    async fn pull(self: Arc<Self>, name: &str) -> Result<(), String> {
        let consumer: jetstream::consumer::Consumer<pull::Config> = self
            .stream
            .get_or_create_consumer(
                name,
                pull::Config {
                    durable_name: Some(name.to_owned()),
                    description: Some("runcast: folds run events into run states".into()),
                    filter_subject: format!("{}.runs.>", self.prefix),
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: 20_000,
                    priority_policy: PriorityPolicy::PinnedClient,
                    priority_groups: vec![GROUP.into()],
                    priority_timeout: PIN_TIMEOUT,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("creating the folder consumer: {e}"))?;
        let messages = consumer
            .stream()
            .group(GROUP)
            .max_messages_per_batch(BATCH)
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_EXPIRES / 4)
            .messages()
            .await
            .map_err(|e| format!("pulling: {e}"))?;
        let mut batches = messages.ready_chunks(BATCH);
        let mut seen = Contiguity::default();
        while let Some(mut batch) = batches.next().await {
            // Gather for a moment: a busy run's events then cost one write
            // per window instead of one each. Reads never wait for this:
            // a state read adds what the bucket has not folded yet.
            let until = tokio::time::Instant::now() + FOLD_WINDOW;
            while batch.len() < BATCH {
                match tokio::time::timeout_at(until, batches.next()).await {
                    Ok(Some(more)) => batch.extend(more),
                    Ok(None) | Err(_) => break,
                }
            }
            let mut msgs = Vec::with_capacity(batch.len());
            for m in batch {
                match m {
                    Ok(m) => msgs.push(m),
                    // Missed heartbeats, a lost pin: the stream carries on.
                    Err(e) => tracing::debug!(error = %e, "folder pull"),
                }
            }
            if msgs.is_empty() {
                continue;
            }
            let mut by_run: HashMap<RunId, Vec<Event>> = HashMap::new();
            for m in &msgs {
                let Ok(info) = m.info() else { continue };
                seen.observe(&info);
                if let Some(ev) = delivered_event(&self.prefix, m, &info) {
                    by_run.entry(ev.run.clone()).or_default().push(ev);
                }
            }
            let since = seen.since;
            let results: Vec<Result<(), BusError>> = futures_util::stream::iter(by_run)
                .map(|(run, mut events)| {
                    let me = self.clone();
                    async move {
                        events.sort_by_key(|e| e.seq);
                        me.fold_run(&run, &events, since).await
                    }
                })
                .buffer_unordered(PARALLEL)
                .collect()
                .await;
            if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                // Unacknowledged events come back after the ack wait; the
                // ones already folded are then skipped by seq.
                for m in &msgs {
                    let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                }
                return Err(format!("folding: {e}"));
            }
            for m in &msgs {
                if let Err(e) = m.ack().await {
                    tracing::debug!(error = %e, "folder ack");
                }
            }
        }
        Err("pull stream ended".into())
    }

    /// Folds `events` (one run's, in seq order) into its stored state.
    async fn fold_run(
        &self,
        run: &RunId,
        events: &[Event],
        contiguous_since: Option<u64>,
    ) -> Result<(), BusError> {
        let Some(newest) = events.last().map(|e| e.seq) else {
            return Ok(());
        };
        for _ in 0..8 {
            let cached = self.cache_get(run);
            let stored = match cached {
                Some(s) => s,
                None => load(&self.kv, run).await?,
            };
            let folded_to = stored.state.as_ref().map_or(0, |s| s.seq);
            if folded_to >= newest {
                return Ok(());
            }
            let trusted = contiguous_since.is_some_and(|since| folded_to + 1 >= since);
            let fresh: Vec<Event>;
            let todo: &[Event] = if trusted {
                let skip = events.partition_point(|e| e.seq <= folded_to);
                &events[skip..]
            } else {
                fresh = read_events(
                    &self.stream,
                    &self.prefix,
                    run,
                    (folded_to + 1, newest),
                    usize::MAX,
                )
                .await?;
                &fresh
            };
            let Some(state) = fold_onto(stored.state.clone(), todo) else {
                // Nothing retained to fold (already expired): done.
                return Ok(());
            };
            let value = serde_json::to_vec(&state)
                .map_err(|e| BusError::Unavailable(e.to_string()))?
                .into();
            let written = if stored.revision == 0 {
                self.kv
                    .create(run.as_str(), value)
                    .await
                    .map_err(|e| e.kind() == kv::CreateErrorKind::AlreadyExists)
            } else {
                self.kv
                    .update(run.as_str(), value, stored.revision)
                    .await
                    .map_err(|e| e.kind() == kv::UpdateErrorKind::WrongLastRevision)
            };
            match written {
                Ok(revision) => {
                    self.cache_put(
                        run,
                        Stored {
                            revision,
                            state: Some(state),
                        },
                    );
                    return Ok(());
                }
                // Someone else wrote the key: read it again and redo.
                Err(true) => {
                    self.cache_forget(run);
                }
                Err(false) => {
                    self.cache_forget(run);
                    return Err(BusError::Unavailable(format!(
                        "writing the state of {run} failed"
                    )));
                }
            }
        }
        Err(BusError::Unavailable(format!(
            "the state of {run} kept changing under the folder"
        )))
    }

    fn cache_get(&self, run: &RunId) -> Option<Stored> {
        let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.get(run).cloned()
    }

    fn cache_put(&self, run: &RunId, stored: Stored) {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.len() >= CACHE_MAX {
            c.clear();
        }
        c.insert(run.clone(), stored);
    }

    fn cache_forget(&self, run: &RunId) {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.remove(run);
    }
}

/// Every run's state, kept current by a watch on the bucket.
#[derive(Default)]
pub(crate) struct Mirror {
    states: RwLock<HashMap<RunId, RunState>>,
}

impl Mirror {
    pub(crate) fn get(&self, run: &RunId) -> Option<RunState> {
        let m = self.states.read().unwrap_or_else(|p| p.into_inner());
        m.get(run).cloned()
    }

    /// States matching `keep`, most recently updated first, at most `limit`.
    pub(crate) fn list(&self, keep: impl Fn(&RunState) -> bool, limit: usize) -> Vec<RunState> {
        let m = self.states.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<&RunState> = m.values().filter(|s| keep(s)).collect();
        out.sort_by(|a, b| {
            b.updated_ts
                .cmp(&a.updated_ts)
                .then_with(|| a.run.cmp(&b.run))
        });
        out.into_iter().take(limit).cloned().collect()
    }

    fn apply(&self, entry: kv::Entry) {
        let Ok(run) = RunId::parse(&entry.key) else {
            return;
        };
        let mut m = self.states.write().unwrap_or_else(|p| p.into_inner());
        match entry.operation {
            Operation::Put => match decode(&run, &entry.value) {
                Some(s) => {
                    m.insert(run, s);
                }
                None => {
                    m.remove(&run);
                }
            },
            Operation::Delete | Operation::Purge => {
                m.remove(&run);
            }
        }
    }

    /// Follows the bucket forever, restarting the watch if it ends.
    pub(crate) async fn follow(self: Arc<Self>, kv: kv::Store) {
        loop {
            match kv.watch_with_history(">").await {
                Ok(mut entries) => {
                    while let Some(entry) = entries.next().await {
                        match entry {
                            Ok(e) => self.apply(e),
                            Err(e) => {
                                tracing::warn!(error = %e, "run state watch");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot watch the run state bucket"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
