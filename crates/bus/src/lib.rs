//! The bus: where events are stored, sequenced and announced.
//!
//! Publishers (worker SDK, HTTP API) append events to a run through
//! [`Bus::publish`]; gateways [`Bus::watch`] the runs their clients want and
//! [`Bus::read`] history to replay. The gateway depends only on the [`Bus`]
//! trait, so the embedded in-process bus ([`EmbeddedBus`], for `runcast up`)
//! and the NATS JetStream bus give the same guarantees behind one interface:
//!
//! - `seq` is at least 1 and strictly increases per run, but need not be
//!   consecutive: the embedded bus numbers each run 1, 2, 3, …, while on
//!   NATS it is the stream's sequence, shared by all runs, so a run's seqs
//!   skip the numbers other runs (and stray messages) took. A missing seq is
//!   not a lost event: what retention dropped is told by [`Page::first`]
//!   and [`Bus::gone_before`], and readers announce it as a gap;
//! - history is ordered and kept within configured bounds (events, bytes, age);
//! - a watch delivers every event published after it was opened, in order,
//!   or says that it lagged so the reader can fill in from history;
//! - run state is folded from events and survives as long as the run is retained.

mod embedded;
mod publish;

use async_trait::async_trait;
use runcast_core::{Event, NewEvent, RunId, RunState, RunStatus};
use std::sync::Arc;

pub use embedded::{EmbeddedBus, Retention};
pub use publish::{BusTarget, PublishError, PublishErrorKind, PublishTarget};

/// Why a bus operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The bus already holds `max_runs` runs; a new run cannot start.
    #[error("the bus already holds its maximum of {0} runs")]
    TooManyRuns(usize),
    /// The bus holds as many bytes of history as it may.
    #[error("the bus history is full ({0} bytes); retry after older runs expire")]
    Full(usize),
    /// A single event larger than the bus accepts: `size` bytes as the bus
    /// counts them, over `limit` (`None` when the bus refused it without
    /// saying its limit).
    #[error(
        "event of {size} bytes is over the {}",
        .limit.map_or("bus's limit".to_owned(), |l| format!("limit of {l} bytes"))
    )]
    EventTooLarge { size: usize, limit: Option<usize> },
    /// The bus's storage has no room for new events and will not make room
    /// by dropping old ones (NATS: the account's or server's JetStream
    /// storage is used up, or the stream is at a limit that refuses new
    /// messages). The reason is the bus's own.
    #[error("the bus has no room for the event: {0}")]
    NoSpace(String),
    /// The bus is unreachable, shutting down, or failed to answer; retrying
    /// may work.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// Which runs [`Bus::runs`] lists.
#[derive(Debug, Clone, Copy)]
pub struct RunFilter {
    /// Only runs in this status.
    pub status: Option<RunStatus>,
    /// At most this many, the most recently updated first.
    pub limit: usize,
}

impl Default for RunFilter {
    fn default() -> Self {
        Self {
            status: None,
            limit: usize::MAX,
        }
    }
}

impl RunFilter {
    pub fn matches(&self, s: &RunState) -> bool {
        self.status.is_none_or(|want| s.status == want)
    }
}

/// One page of a run's history.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Events with `seq >= from`, ascending, at most `limit` of them.
    pub events: Vec<Arc<Event>>,
    /// The oldest seq still retained (`head + 1` when nothing is retained).
    /// Anything in `from..first` is gone for good.
    pub first: u64,
    /// The last seq assigned in the run (0 when the run has no events).
    pub head: u64,
}

/// What a live watch yields.
#[derive(Debug, Clone)]
pub enum Live {
    Event(Arc<Event>),
    /// The watcher fell behind and events were skipped; read them from history.
    Lagged,
    /// An event the feed cannot vouch is the run's next one (the first
    /// after the watch opened or after the bus reconnected, when copies may
    /// have been lost unseen): read history up to it first, then take it.
    Unproven(Arc<Event>),
}

/// A live feed of one run's new events.
#[async_trait]
pub trait Feed: Send {
    /// The next live item; `None` when the bus closed the feed.
    async fn next(&mut self) -> Option<Live>;
}

/// A live watch on a run, opened at `head`: every event with `seq > head`
/// comes through `feed` (or a [`Live::Lagged`] marker in its place).
pub struct Watch {
    pub head: u64,
    pub feed: Box<dyn Feed>,
}

/// The store-and-announce interface every bus implements.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Appends `events` to `run` atomically and in order; returns their seqs.
    async fn publish(&self, run: &RunId, events: Vec<NewEvent>) -> Result<Vec<u64>, BusError>;

    /// Opens a live watch on `run` (which need not have events yet).
    async fn watch(&self, run: &RunId) -> Result<Watch, BusError>;

    /// Reads retained history of `run` from seq `from` (inclusive).
    /// `limit` 0 asks for the head alone: a bus may then report `first` as
    /// 1 without looking it up, which claims that nothing is gone.
    async fn read(&self, run: &RunId, from: u64, limit: usize) -> Result<Page, BusError>;

    /// The current state of `run`; `None` if it has no retained events.
    async fn state(&self, run: &RunId) -> Result<Option<RunState>, BusError>;

    /// Every seq below this is gone from history, for every run: what
    /// retention has dropped for sure (0 when the bus cannot tell). A run
    /// whose retained history is empty cannot say whether it ever had events
    /// (NATS seqs are shared by all runs); this can, for seqs a caller knows
    /// the run reached.
    async fn gone_before(&self) -> Result<u64, BusError> {
        Ok(0)
    }

    /// The state of retained runs that match `filter`, most recently updated
    /// first. A bus may stop looking once it has `filter.limit` of them.
    async fn runs(&self, filter: RunFilter) -> Result<Vec<RunState>, BusError>;

    /// Whether the bus can serve requests now; the reason if not.
    fn health(&self) -> Result<(), String>;

    /// Counters about the bus's own machinery, for metrics (zero where a
    /// bus has none of it).
    fn stats(&self) -> BusStats {
        BusStats::default()
    }
}

/// Totals since the bus started; see [`Bus::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Reconnections to the bus (NATS) after the first connection.
    pub reconnects: u64,
    /// Times a live feed was checked against the stored history (NATS: a
    /// direct get of the run's last seq, once a run goes quiet, after a
    /// watch opens and after a reconnect).
    pub live_checks: u64,
    /// Times a live feed found it had missed a message and resynced from
    /// history (NATS: a broken chain of republished copies, or a check that
    /// found the stream ahead).
    pub live_resyncs: u64,
    /// Messages a live feed found lost only after later events of the run
    /// had gone out, so clients did not get them live (NATS: a check that
    /// found a subject's last message never seen). They are in history.
    pub live_missed: u64,
    /// History reads sent to the bus's storage (NATS: a page read from
    /// JetStream, a few requests each).
    pub history_reads: u64,
    /// History reads answered by joining the same read already in flight
    /// (NATS: many clients resuming one run at once).
    pub history_reads_joined: u64,
}
