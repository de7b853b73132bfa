//! [`NatsBus`]: the [`Bus`] on NATS JetStream, for gateways that scale out.
//!
//! History is the `RUNCAST_EVENTS` stream itself, read with direct gets that
//! any replica can serve. Live events for every watched run come through a
//! core subscription per run to the stream's republished copies (see
//! [`crate::watch`]), which prove they missed nothing or resync from
//! history. Run state lives
//! in the `RUNCAST_RUNS` KV bucket, folded from the stream by the gateways
//! themselves (see [`crate::state`]); reading a run's state adds whatever
//! the bucket has not folded yet, so it is never behind the stream.

use std::sync::{Arc, Mutex, OnceLock};

use async_nats::jetstream::{
    self,
    stream::{DirectGetErrorKind, Stream},
};
use async_trait::async_trait;
use runcast_bus::{Bus, BusError, BusStats, Page, RunFilter, Watch};
use runcast_core::{NewEvent, RunId, RunState, subject};
use tokio::task::JoinHandle;

use crate::{
    config::{NatsConfig, connect_observed},
    error::NatsError,
    message::patiently,
    publish::{NatsTarget, StoreErrorKind},
    state::{self, Mirror},
    stream::{StreamSettings, ensure_stream},
    watch::{LiveShared, RunFeed},
};

/// Most events a state read folds on top of the stored state; a bucket
/// further behind than this (its folder down) gives an older, still
/// consistent state, and subscribers replay the rest from history.
const TAIL_MAX: usize = 256;

/// How long a run state read is reused.
const STATE_TTL: std::time::Duration = std::time::Duration::from_secs(1);
/// Most cached run states.
const STATE_CACHE_MAX: usize = 10_000;

/// How long a finished history read answers later reads it covers.
const RECENT_TTL: std::time::Duration = std::time::Duration::from_secs(1);
/// Most runs with a recent read kept, and the largest page kept.
const RECENT_MAX: usize = 4096;
const RECENT_PAGE_BYTES: usize = 1 << 20;

/// How often readiness asks JetStream whether the stream answers.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Clone)]
pub struct NatsBus {
    inner: Arc<Inner>,
    /// Publishes for [`Bus::publish`]; outside `inner` so that
    /// [`NatsBus::with_publish_retries`] can replace it.
    target: Arc<NatsTarget>,
}

struct Inner {
    client: async_nats::Client,
    prefix: String,
    /// Set once the stream exists and is verified.
    stream: OnceLock<Stream>,
    /// Why the stream is not ready (for readiness and errors); empty when it is.
    setup_error: Mutex<String>,
    /// The state bucket, once it exists.
    kv: OnceLock<async_nats::jetstream::kv::Store>,
    /// What the live feeds share (see [`crate::watch`]).
    live: Arc<LiveShared>,
    /// Every run's stored state, as the bucket's watch last reported it.
    mirror: Arc<Mirror>,
    /// Recently read run states (see `Inner::cached_state`).
    states: Mutex<std::collections::HashMap<RunId, (std::time::Instant, RunState)>>,
    /// The stream's largest message, as set up.
    max_message_size: usize,
    /// History reads in flight, shared by every caller asking the same.
    reads: Mutex<std::collections::HashMap<ReadKey, SharedRead>>,
    /// Reads sent to JetStream, and reads answered by joining one in flight.
    reads_sent: std::sync::atomic::AtomicU64,
    reads_joined: std::sync::atomic::AtomicU64,
    /// The last finished read of each run, for a moment (see `Recent`).
    recent: Mutex<std::collections::HashMap<RunId, Recent>>,
    /// The stream's oldest seq, as last read (see `Bus::gone_before`).
    gone_before: Mutex<Option<(std::time::Instant, u64)>>,
}

/// A finished history read, kept for [`RECENT_TTL`]. Clients resuming
/// after a gateway died do not all arrive while the first read of their
/// run is in flight: they come over a second or so, and with cursors a
/// seq or two apart. Any read that starts inside what this page covers is
/// answered from it. A page a moment old is as safe as a shared one: what
/// came after its head reaches the session live, and the session reads
/// again when a live frame's predecessor is past its cursor.
struct Recent {
    at: std::time::Instant,
    from: u64,
    /// Every event of the run in `from..=covered` is in `page`.
    covered: u64,
    page: Page,
}

impl Recent {
    fn new(from: u64, limit: usize, page: &Page) -> Self {
        let covered = if page.events.len() < limit {
            page.head
        } else {
            page.events.last().map_or(page.head, |e| e.seq)
        };
        Self {
            at: std::time::Instant::now(),
            from,
            covered,
            page: page.clone(),
        }
    }

    /// The page for a read of `limit` events from `from`, if this one holds
    /// all of it and the run's live feed has seen nothing past its head
    /// (`seen`; `None` when the run is not watched here, and then a page a
    /// moment old could hide a finished run's last events: no live copy
    /// would come to show them).
    fn answer(&self, from: u64, limit: usize, seen: Option<u64>) -> Option<Page> {
        if self.at.elapsed() >= RECENT_TTL
            || seen.is_none_or(|s| s > self.page.head)
            || from < self.from
            || from > self.covered + 1
        {
            return None;
        }
        let events: Vec<_> = self
            .page
            .events
            .iter()
            .filter(|e| e.seq >= from)
            .take(limit)
            .cloned()
            .collect();
        // A shorter page means "nothing more up to the head": only when
        // this page reached the head.
        (events.len() == limit || self.covered == self.page.head).then_some(Page {
            events,
            first: self.page.first,
            head: self.page.head,
        })
    }
}

/// A history read: run, first seq, page size.
type ReadKey = (RunId, u64, usize);
type SharedRead =
    futures_util::future::Shared<futures_util::future::BoxFuture<'static, Result<Page, BusError>>>;

/// Forgets a read in flight when its first caller is done with it or gives
/// up (a caller that disconnects drops its future): later callers start a
/// fresh read instead of joining a finished or abandoned one. Callers that
/// joined keep polling their clone, which drives the read to its end.
struct ReadGuard<'a> {
    inner: &'a Inner,
    key: ReadKey,
    read: SharedRead,
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        let mut reads = self.inner.reads.lock().unwrap_or_else(|p| p.into_inner());
        if reads.get(&self.key).is_some_and(|r| r.ptr_eq(&self.read)) {
            reads.remove(&self.key);
        }
    }
}

/// The bus's publisher: on its prefix, refusing events over the stream's limit.
fn publisher(inner: &Inner) -> NatsTarget {
    NatsTarget::new(inner.client.clone(), &inner.prefix)
        .with_max_message_size(inner.max_message_size)
}

impl Inner {
    fn set_problem(&self, why: String) {
        *self.setup_error.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// Why the bus is not ready; empty when it is.
    fn problem(&self) -> String {
        self.setup_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl NatsBus {
    /// Connects and returns at once; the connection and the stream are set
    /// up in the background (the returned task), retrying every second, so
    /// a gateway starts while NATS is unreachable and reports why it is not
    /// ready until it is.
    pub async fn start(
        cfg: &NatsConfig,
        settings: StreamSettings,
    ) -> Result<(Self, JoinHandle<()>), NatsError> {
        let live = Arc::new(LiveShared::default());
        let client = {
            let live = live.clone();
            connect_observed(cfg, true, move |event| live.on_client_event(&event)).await?
        };
        let inner = Arc::new(Inner {
            max_message_size: settings.max_message_size.max(0) as usize,
            client: client.clone(),
            prefix: cfg.prefix.clone(),
            stream: OnceLock::new(),
            kv: OnceLock::new(),
            mirror: Arc::new(Mirror::default()),
            live,
            setup_error: Mutex::new("connecting to NATS".into()),
            states: Mutex::new(std::collections::HashMap::new()),
            reads: Mutex::new(std::collections::HashMap::new()),
            reads_sent: Default::default(),
            reads_joined: Default::default(),
            recent: Default::default(),
            gone_before: Default::default(),
        });
        let setup = {
            let inner = inner.clone();
            let js = jetstream::new(client);
            tokio::spawn(async move {
                loop {
                    let ready = async {
                        let stream = ensure_stream(&js, &inner.prefix, &settings).await?;
                        let kv = state::ensure_bucket(&js, &settings).await?;
                        Ok::<_, NatsError>((stream, kv))
                    };
                    match ready.await {
                        Ok((stream, kv)) => {
                            let _ = inner.stream.set(stream);
                            let _ = inner.kv.set(kv);
                            tracing::info!(stream = %settings.name, bucket = %settings.state_bucket, "NATS stream and state bucket ready");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "NATS stream not ready; retrying");
                            inner.set_problem(e.to_string());
                        }
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                inner.set_problem(String::new());
                // Being connected is not enough: after an outage JetStream
                // answers "temporarily unavailable" until its raft groups
                // recover. Readiness follows what the stream actually answers.
                let stream = inner.stream.get().expect("set above").clone();
                let kv = inner.kv.get().expect("set above").clone();
                let folder = state::fold(
                    stream.clone(),
                    kv.clone(),
                    inner.prefix.clone(),
                    settings.state_bucket.clone(),
                );
                let mirror = inner.mirror.clone().follow(kv);
                // A new stream leader may not have republished what the old
                // one stored last (copies in flight on a route when it
                // died): no connection event shows that, JetStream's
                // advisory does. Every feed checks its run, as after a
                // reconnect.
                let leaders = async {
                    let subject =
                        format!("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{}", settings.name);
                    match inner.client.subscribe(subject.clone()).await {
                        Ok(mut elected) => {
                            while futures_util::StreamExt::next(&mut elected).await.is_some() {
                                tracing::info!(stream = %settings.name, "the stream has a new leader; checking every live feed");
                                inner.live.may_have_lost();
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, %subject, "cannot follow stream leader changes")
                        }
                    }
                };
                let probe = async {
                    loop {
                        tokio::time::sleep(PROBE_EVERY).await;
                        // Both paths reads use: the stream's info and a direct
                        // get (answered by the stream's servers themselves).
                        let any_event = format!("{}.runs.>", inner.prefix);
                        let probe = tokio::time::timeout(PROBE_EVERY * 2, async {
                            let info = stream.get_info().await.map_err(|e| e.to_string())?;
                            // Live feeds depend on the stream's republish
                            // rule; someone editing it away (or to headers
                            // only) must show, not silently stop delivery.
                            crate::stream::check_republish(&inner.prefix, &info.config)?;
                            match stream.direct_get_last_for_subject(any_event).await {
                                Ok(_) => Ok(()),
                                Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(()),
                                Err(e) => Err(e.to_string()),
                            }
                        })
                        .await;
                        inner.set_problem(match probe {
                            Ok(Ok(())) => String::new(),
                            Ok(Err(e)) => format!("JetStream not answering: {e}"),
                            Err(_) => "JetStream not answering within 2s".into(),
                        });
                    }
                };
                tokio::join!(probe, folder, mirror, leaders);
            })
        };
        let target = Arc::new(publisher(&inner));
        Ok((Self { inner, target }, setup))
    }

    /// Sets how many times [`Bus::publish`] tries each event and how long
    /// each acknowledgement may take (default: 5 attempts, 5 s), for this
    /// handle and the clones made from it afterwards.
    pub fn with_publish_retries(mut self, attempts: u32, ack_timeout: std::time::Duration) -> Self {
        self.target = Arc::new(publisher(&self.inner).with_retries(attempts, ack_timeout));
        self
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// Waits until the bus is ready (connected, stream answering), up to
    /// `within`; the reason it is not, otherwise.
    pub async fn ready(&self, within: std::time::Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.health() {
                Ok(()) => return Ok(()),
                Err(why) if tokio::time::Instant::now() >= deadline => return Err(why),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(25)).await,
            }
        }
    }

    fn stream(&self) -> Result<&Stream, BusError> {
        self.inner.stream.get().ok_or_else(|| {
            let why = self.inner.problem();
            BusError::Unavailable(format!("NATS stream not ready: {why}"))
        })
    }

    fn filter(&self, run: &RunId) -> String {
        subject::run_wildcard(&self.inner.prefix, run)
    }

    /// The seq from which the run's history (`filter`: its subjects) is
    /// complete. Limits retention drops the stream's oldest messages, so
    /// everything from the stream's oldest seq on is kept; but the limit of
    /// messages per subject (`--history-events`) drops the oldest events of
    /// one kind while older events of other kinds stay, a hole in the middle
    /// of the run that seqs alone cannot show (they are shared by all runs).
    /// So for each of the run's subjects at that limit, history counts as
    /// complete only from its oldest kept message on; what lies before is
    /// announced as a gap, never skipped in silence.
    async fn complete_from(&self, stream: &Stream, filter: &str) -> Result<u64, BusError> {
        use futures_util::TryStreamExt;
        let (info, full) = patiently(|| async {
            let mut subjects = stream
                .info_with_subjects(filter)
                .await
                .map_err(unavailable)?;
            let limit = subjects.info.config.max_messages_per_subject;
            let mut full = Vec::new();
            while let Some((subject, count)) = subjects.try_next().await.map_err(unavailable)? {
                if limit > 0 && count as i64 >= limit {
                    full.push(subject);
                }
            }
            Ok((subjects.info.state.first_sequence, full))
        })
        .await?;
        let mut first = info.max(1);
        for subject in full {
            let oldest = patiently(|| async {
                match stream.direct_get_first_for_subject(subject.as_str()).await {
                    Ok(m) => Ok(Some(m.sequence)),
                    Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
                    Err(e) => Err(unavailable(format!("reading {subject}: {e}"))),
                }
            })
            .await?;
            first = first.max(oldest.unwrap_or(0));
        }
        Ok(first)
    }

    /// The run's head for a cursor check (a read from `from` = cursor + 1),
    /// from the stream leader. A head below the cursor is asked again for
    /// up to [`CURSOR_CHECK_PATIENCE`] while the cursor is within the
    /// stream's own last seq: an outside tester saw a leader elected after
    /// a kill -9 answer a run's head a few events old for a while, and a
    /// valid cursor refused as since_out_of_range, which tells a client to
    /// stop. A cursor past the whole stream is refused at once.
    async fn cursor_head(
        &self,
        stream: &Stream,
        filter: &str,
        from: u64,
    ) -> Result<Option<u64>, BusError> {
        let cursor = from.saturating_sub(1);
        let started = std::time::Instant::now();
        loop {
            let head = crate::message::leader_last_seq(stream, filter).await?;
            if head.unwrap_or(0) >= cursor {
                return Ok(head);
            }
            let stream_last = patiently(|| async {
                stream
                    .get_info()
                    .await
                    .map(|i| i.state.last_sequence)
                    .map_err(unavailable)
            })
            .await?;
            if stream_last < cursor || started.elapsed() >= CURSOR_CHECK_PATIENCE {
                return Ok(head);
            }
            tracing::info!(
                filter,
                cursor,
                head = head.unwrap_or(0),
                stream_last,
                "a cursor past the run's head but within the stream: asking the leader again"
            );
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }

    /// The stream sequence of the last message on `subject` (may be a
    /// wildcard), if any is retained. The message need not be a readable
    /// event: any NATS client can store a message on a subject that is not
    /// one (`runcast.runs.r1.Complete`), and the events before it must not
    /// disappear from history behind it. Its seq is a skipped number, which
    /// readers already take in stride.
    async fn last_seq(&self, subject: &str) -> Result<Option<u64>, BusError> {
        crate::message::last_seq(self.stream()?, subject).await
    }
}

impl Inner {
    fn remember(&self, run: &RunId, from: u64, limit: usize, page: &Page) {
        if limit == 0 || page.events.iter().map(|e| e.size()).sum::<usize>() > RECENT_PAGE_BYTES {
            return;
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded like the state cache: expired pages go when it is full.
        if recent.len() >= RECENT_MAX && !recent.contains_key(run) {
            recent.retain(|_, r| r.at.elapsed() < RECENT_TTL);
            if recent.len() >= RECENT_MAX {
                recent.clear();
            }
        }
        recent.insert(run.clone(), Recent::new(from, limit, page));
    }

    /// A state read less than `STATE_TTL` ago. A slightly old state is
    /// safe: a subscriber's cursor starts at its seq and the session replays
    /// whatever came after from history, so it only costs a replay, never a
    /// lost or repeated event. It spares NATS six requests per subscribe when
    /// many clients join the same run at once.
    fn cached_state(&self, run: &RunId) -> Option<RunState> {
        let cache = self.states.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(run)
            .filter(|(at, _)| at.elapsed() < STATE_TTL)
            .map(|(_, s)| s.clone())
    }

    fn cache_state(&self, state: RunState) {
        let mut cache = self.states.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: expired entries go whenever the cache reaches its limit.
        if cache.len() >= STATE_CACHE_MAX {
            cache.retain(|_, (at, _)| at.elapsed() < STATE_TTL);
            if cache.len() >= STATE_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(state.run.clone(), (std::time::Instant::now(), state));
    }
}

impl NatsBus {
    async fn open_watch(&self, run: &RunId) -> Result<Watch, BusError> {
        let stream = self.stream()?.clone();
        let live = subject::live_wildcard(&self.inner.prefix, run);
        let sub = self
            .inner
            .client
            .subscribe(live.clone())
            .await
            .map_err(|e| unavailable(format!("subscribing to {live}: {e}")))?;
        // The server has the subscription once the flush returns, so every
        // event stored after the head read below is republished to it (the
        // feed's checks cover the moment it takes to reach the stream
        // leader's server).
        self.inner
            .client
            .flush()
            .await
            .map_err(|e| unavailable(format!("subscribing to {live}: {e}")))?;
        let head = self.last_seq(&self.filter(run)).await?.unwrap_or(0);
        Ok(Watch {
            head,
            feed: Box::new(RunFeed::new(
                sub,
                run,
                head,
                &self.inner.prefix,
                stream,
                self.inner.live.clone(),
                self.inner.client.clone(),
            )),
        })
    }
}

/// How long a cursor check waits for a stream leader to catch up (a kill
/// -9 election takes 4.7-7.9 s here) before a cursor past the run's head
/// is refused.
// Zero for now: 10 s made every refusal of a cursor within the stream take
// 10 s (the conformance suite's since_out_of_range test timed out). The wait
// belongs only after a leader change the gateway saw; until then, refused at once.
const CURSOR_CHECK_PATIENCE: std::time::Duration = std::time::Duration::ZERO;

impl NatsBus {
    async fn read_page(&self, run: &RunId, from: u64, limit: usize) -> Result<Page, BusError> {
        let stream = self.stream()?;
        let filter = self.filter(run);
        // A head-only read checks a client's cursor before it is refused
        // as past the head: ask the leader. A direct get may be answered
        // by a replica still catching up after a failover, and a head a few
        // events old turned valid cursors into since_out_of_range.
        let head = if limit == 0 {
            self.cursor_head(stream, &filter, from).await?
        } else {
            self.last_seq(&filter).await?
        }
        .unwrap_or(0);
        // A head-only read wants nothing but the head, and a first of 1
        // claims nothing is gone (the trait allows it): spare the stream
        // info that `complete_from` costs on every cursor check.
        let first = if head == 0 || limit == 0 {
            1
        } else {
            self.complete_from(stream, &filter).await?
        };
        let events = state::read_events(
            stream,
            &self.inner.prefix,
            run,
            (from.max(first), head),
            limit,
        )
        .await?
        .into_iter()
        .map(Arc::new)
        .collect();
        Ok(Page {
            events,
            first,
            head,
        })
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, run: &RunId, events: Vec<NewEvent>) -> Result<Vec<u64>, BusError> {
        self.stream()?;
        // The target checks each whole message (NATS counts the headers in
        // its size) against the stream's limit and the server's
        // max_payload before sending any, so a too-large event gets a 413
        // here instead of failing at the server, where retrying never helps.
        self.target
            .store_all(run, &events)
            .await
            .map_err(|e| match e.kind {
                StoreErrorKind::TooLarge { size, limit } => BusError::EventTooLarge { size, limit },
                StoreErrorKind::NoSpace => BusError::NoSpace(e.message),
                // The stream was set up on this prefix, so it makes valid
                // subjects; were it not, nothing could be published.
                StoreErrorKind::InvalidSubject | StoreErrorKind::Unavailable => {
                    BusError::Unavailable(e.message)
                }
            })
    }

    async fn watch(&self, run: &RunId) -> Result<Watch, BusError> {
        // Each call has its own timeout, but a watch is a subscribe, a flush
        // and a read (retried through a NATS failover): bound the whole.
        let started = std::time::Instant::now();
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), self.open_watch(run)).await;
        let elapsed = started.elapsed();
        if elapsed > std::time::Duration::from_millis(500) {
            tracing::warn!(run = %run, ms = elapsed.as_millis() as u64, "slow NATS watch");
        }
        r.map_err(|_| unavailable(format!("opening a NATS watch for {run} took over 5s")))?
    }

    /// Reads are coalesced: callers asking for the same page of the same
    /// run while a read of it is in flight share that read. After a
    /// gateway dies, its clients resume on the others at once, most of them
    /// from the same cursor of their run (they were live), so a storm costs
    /// JetStream about one read per run instead of one per client. A shared
    /// page may be a moment old; that is safe, because a session compares
    /// each live frame's predecessor with its cursor and reads again when
    /// something lies between them.
    async fn read(&self, run: &RunId, from: u64, limit: usize) -> Result<Page, BusError> {
        use futures_util::FutureExt;
        use std::sync::atomic::Ordering::Relaxed;
        let key: ReadKey = (run.clone(), from, limit);
        // A head-only read (limit 0) checks a cursor against the run's
        // current head: never from a page a moment old.
        if limit > 0 {
            let recent = self.inner.recent.lock().unwrap_or_else(|p| p.into_inner());
            let seen = self.inner.live.seen(run);
            if let Some(page) = recent.get(run).and_then(|r| r.answer(from, limit, seen)) {
                self.inner.reads_joined.fetch_add(1, Relaxed);
                return Ok(page);
            }
        }
        let (read, guard) = {
            let mut reads = self.inner.reads.lock().unwrap_or_else(|p| p.into_inner());
            match reads.get(&key) {
                Some(read) => {
                    self.inner.reads_joined.fetch_add(1, Relaxed);
                    (read.clone(), None)
                }
                None => {
                    self.inner.reads_sent.fetch_add(1, Relaxed);
                    let (bus, run) = (self.clone(), run.clone());
                    let read = async move {
                        let page = bus.read_page(&run, from, limit).await?;
                        bus.inner.remember(&run, from, limit, &page);
                        Ok(page)
                    }
                    .boxed()
                    .shared();
                    reads.insert(key.clone(), read.clone());
                    (read.clone(), Some(read))
                }
            }
        };
        let _guard = guard.map(|read| ReadGuard {
            inner: &self.inner,
            key,
            read,
        });
        read.await
    }

    async fn state(&self, run: &RunId) -> Result<Option<RunState>, BusError> {
        if let Some(hit) = self.inner.cached_state(run) {
            return Ok(Some(hit));
        }
        let stream = self.stream()?;
        let stored = match (self.inner.mirror.get(run), self.inner.kv.get()) {
            (Some(s), _) => Some(s),
            (None, Some(kv)) => state::load(kv, run).await?.state,
            (None, None) => None,
        };
        // The bucket is folded a moment after each publish (or much later,
        // with no gateway folding): add what it lacks from the stream.
        let state = match self.last_seq(&self.filter(run)).await? {
            Some(last) if stored.as_ref().is_none_or(|s| s.seq < last) => {
                let from = stored.as_ref().map_or(1, |s| s.seq + 1);
                let tail =
                    state::read_events(stream, &self.inner.prefix, run, (from, last), TAIL_MAX)
                        .await?;
                state::fold_onto(stored, &tail)
            }
            _ => stored,
        };
        if let Some(s) = &state {
            self.inner.cache_state(s.clone());
        }
        Ok(state)
    }

    /// The stream's oldest retained seq: limits retention drops messages
    /// oldest first, so every seq below it is gone.
    ///
    /// Reused for [`RECENT_TTL`]: every resuming session whose page ends
    /// before the state it was told asks this, and an older (lower) answer
    /// only ever proves less gone, never announces a gap that is not one.
    async fn gone_before(&self) -> Result<u64, BusError> {
        let cached = *self
            .inner
            .gone_before
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((at, first)) = cached
            && at.elapsed() < RECENT_TTL
        {
            return Ok(first);
        }
        let stream = self.stream()?;
        let info = patiently(|| async { stream.get_info().await.map_err(unavailable) }).await?;
        let first = info.state.first_sequence;
        *self
            .inner
            .gone_before
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((std::time::Instant::now(), first));
        Ok(first)
    }

    /// From the mirrored bucket: runs appear once folded, a moment after
    /// their first event.
    async fn runs(&self, filter: RunFilter) -> Result<Vec<RunState>, BusError> {
        self.stream()?;
        Ok(self.inner.mirror.list(|s| filter.matches(s), filter.limit))
    }

    fn stats(&self) -> BusStats {
        let connects = self
            .inner
            .client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        let live = &self.inner.live;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        BusStats {
            reconnects: connects.saturating_sub(1),
            live_checks: load(&live.checks_made),
            live_resyncs: load(&live.resyncs),
            live_missed: load(&live.missed),
            history_reads: load(&self.inner.reads_sent),
            history_reads_joined: load(&self.inner.reads_joined),
        }
    }

    fn health(&self) -> Result<(), String> {
        if self.inner.client.connection_state() != async_nats::connection::State::Connected {
            return Err("NATS disconnected; reconnecting".into());
        }
        self.stream().map_err(|e| e.to_string())?;
        let problem = self.inner.problem();
        if problem.is_empty() {
            Ok(())
        } else {
            Err(problem)
        }
    }
}
