//! `runcast bridge redis`: existing publishers keep publishing. The bridge
//! subscribes to Redis pub/sub channels and patterns, or reads Redis
//! Streams through a consumer group, maps each message to a run, a kind and
//! data ([`mapping`]), and publishes it into runcast through any
//! [`PublishTarget`] (JetStream, or a gateway's HTTP API).
//!
//! - Pub/sub keeps nothing: what is published while the bridge is
//!   disconnected is lost, as it is for every pub/sub subscriber. Order is
//!   kept (one connection, one message at a time).
//! - Streams are at-least-once: an entry is acknowledged only once runcast
//!   stored it (or it was counted as bad), entries a killed bridge had read
//!   are read again from the group's pending list when it starts, and
//!   entries left pending by a consumer that is gone are claimed after
//!   `claim_idle`. Each event carries the entry's ID as its idempotency key,
//!   so a re-read entry is stored once.

pub mod mapping;
pub mod resp;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};
use runcast_bus::{PublishErrorKind, PublishTarget};
use runcast_core::{NewEvent, RunId};
use tokio::sync::watch;

use crate::{
    mapping::{Bad, Mapping},
    resp::{Conn, Limits, RedisUrl, RespError, Value},
};

/// What to read from Redis.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// Pub/sub channels (`SUBSCRIBE`).
    pub channels: Vec<String>,
    /// Pub/sub patterns (`PSUBSCRIBE`).
    pub patterns: Vec<String>,
    /// Stream keys, read through `group`.
    pub streams: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct StreamSettings {
    pub group: String,
    /// This bridge's consumer name in the group (stable across restarts
    /// keeps its own pending entries its own).
    pub consumer: String,
    /// Where a group made by the bridge starts: `$` (new entries) or `0`.
    pub start: String,
    /// The entry field that holds the message; an entry without it is
    /// taken as a JSON object of all its fields.
    pub field: String,
    /// Entries pending this long with another consumer are claimed.
    pub claim_idle: Duration,
    /// Entries per read.
    pub batch: usize,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub redis: RedisUrl,
    pub sources: Sources,
    pub mapping: Mapping,
    pub stream: StreamSettings,
    /// The largest message the bridge reads; a larger reply from Redis is
    /// a protocol error that drops the connection.
    pub max_message_bytes: usize,
}

pub struct BridgeMetrics {
    registry: Registry,
    pub received: IntCounterVec,
    pub published: IntCounter,
    pub bad: IntCounterVec,
    pub retries: IntCounter,
    pub redis_up: IntGauge,
    pub reconnects: IntCounter,
}

impl Default for BridgeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl BridgeMetrics {
    pub fn new() -> Self {
        let m = runcast_telemetry::metrics::Registrar::new();
        Self {
            received: m.counter_vec(
                "runcast_bridge_received_total",
                "Messages read from Redis, by source (pubsub, stream).",
                "source",
                &["pubsub", "stream"],
            ),
            published: m.counter(
                "runcast_bridge_published_total",
                "Messages stored in runcast as events.",
            ),
            bad: m.counter_vec(
                "runcast_bridge_bad_messages_total",
                "Messages not published, by reason (each also logged with its channel).",
                "reason",
                Bad::REASONS,
            ),
            retries: m.counter(
                "runcast_bridge_publish_retries_total",
                "Publishes retried because runcast was unavailable.",
            ),
            redis_up: m.gauge(
                "runcast_bridge_redis_connections",
                "Redis connections up (one for pub/sub, one per stream).",
            ),
            reconnects: m.counter(
                "runcast_bridge_redis_reconnects_total",
                "Redis connections lost and made again.",
            ),
            registry: m.into_registry(),
        }
    }

    pub fn render(&self) -> String {
        runcast_telemetry::metrics::render(&self.registry)
    }
}

/// What `/readyz` says: ready while every Redis connection is up and
/// runcast takes what the bridge publishes.
#[derive(Default)]
pub struct Health {
    wanted: AtomicUsize,
    up: AtomicUsize,
    target_failing: AtomicBool,
    last_error: Mutex<String>,
}

impl Health {
    pub fn readiness(&self) -> Result<(), String> {
        let (wanted, up) = (
            self.wanted.load(Ordering::Relaxed),
            self.up.load(Ordering::Relaxed),
        );
        let last = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if up < wanted {
            return Err(format!("{up} of {wanted} Redis connections up: {last}"));
        }
        if self.target_failing.load(Ordering::Relaxed) {
            return Err(format!("runcast is not taking events: {last}"));
        }
        Ok(())
    }

    fn error(&self, e: impl std::fmt::Display) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e.to_string();
    }
}

pub struct Bridge {
    cfg: Config,
    target: Arc<dyn PublishTarget>,
    pub metrics: Arc<BridgeMetrics>,
    pub health: Arc<Health>,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BLOCK: Duration = Duration::from_secs(2);
/// A pub/sub connection is pinged this often; one that answers nothing for
/// two periods is taken as dead (a half-open TCP connection says nothing).
const PING_EVERY: Duration = Duration::from_secs(10);

enum Outcome {
    Stored,
    Bad,
    Stopped,
}

impl Bridge {
    pub fn new(cfg: Config, target: Arc<dyn PublishTarget>) -> Result<Self, String> {
        let s = &cfg.sources;
        if s.channels.is_empty() && s.patterns.is_empty() && s.streams.is_empty() {
            return Err("nothing to read: give --channel, --pattern or --stream".into());
        }
        Ok(Self {
            cfg,
            target,
            metrics: Arc::new(BridgeMetrics::new()),
            health: Arc::new(Health::default()),
        })
    }

    fn limits(&self) -> Limits {
        Limits {
            max_bulk: self.cfg.max_message_bytes,
            max_array: self.cfg.stream.batch.max(64) * 2 + 1024,
        }
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let mut tasks = tokio::task::JoinSet::new();
        let s = &self.cfg.sources;
        if !s.channels.is_empty() || !s.patterns.is_empty() {
            self.health.wanted.fetch_add(1, Ordering::Relaxed);
            tasks.spawn(self.clone().pubsub(shutdown.clone()));
        }
        for key in s.streams.clone() {
            self.health.wanted.fetch_add(1, Ordering::Relaxed);
            tasks.spawn(self.clone().stream(key, shutdown.clone()));
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Publishes one event, retrying while runcast is unavailable (with
    /// backoff, until it takes it or the bridge stops). What retrying
    /// cannot fix is a bad message.
    async fn deliver(
        &self,
        channel: &str,
        mapped: Result<(RunId, NewEvent), Bad>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Outcome {
        let (run, event) = match mapped {
            Ok(m) => m,
            Err(bad) => return self.bad(channel, bad),
        };
        let mut wait = Duration::from_millis(100);
        loop {
            match self.target.publish(&run, vec![event.clone()]).await {
                Ok(_) => {
                    self.metrics.published.inc();
                    self.health.target_failing.store(false, Ordering::Relaxed);
                    return Outcome::Stored;
                }
                Err(e)
                    if matches!(
                        e.kind,
                        PublishErrorKind::Unavailable | PublishErrorKind::Tls
                    ) =>
                {
                    self.health.target_failing.store(true, Ordering::Relaxed);
                    self.health.error(&e);
                    self.metrics.retries.inc();
                    tracing::warn!(run = %run, error = %e, retry_in = ?wait, "runcast unavailable; holding the message and retrying");
                    tokio::select! {
                        () = stopped(shutdown) => return Outcome::Stopped,
                        () = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => return self.bad(channel, Bad::Rejected(e.message)),
            }
        }
    }

    fn bad(&self, channel: &str, bad: Bad) -> Outcome {
        self.metrics.bad.with_label_values(&[bad.reason()]).inc();
        tracing::warn!(%channel, reason = bad.reason(), error = %bad, "message not published");
        Outcome::Bad
    }

    async fn connect(&self, what: &str, shutdown: &mut watch::Receiver<bool>) -> Option<Conn> {
        let mut wait = Duration::from_millis(250);
        loop {
            if *shutdown.borrow() {
                return None;
            }
            match Conn::connect(&self.cfg.redis, self.limits(), CONNECT_TIMEOUT).await {
                Ok(c) => return Some(c),
                Err(e) => {
                    self.health.error(format!("{}: {e}", self.cfg.redis));
                    tracing::warn!(redis = %self.cfg.redis, %what, error = %e, retry_in = ?wait, "cannot reach Redis; retrying");
                }
            }
            tokio::select! {
                () = stopped(shutdown) => return None,
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    fn up(&self, up: bool) {
        if up {
            self.health.up.fetch_add(1, Ordering::Relaxed);
            self.metrics.redis_up.inc();
        } else {
            self.health.up.fetch_sub(1, Ordering::Relaxed);
            self.metrics.redis_up.dec();
            self.metrics.reconnects.inc();
        }
    }

    async fn pubsub(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let Some(mut conn) = self.connect("pub/sub", &mut shutdown).await else {
                return;
            };
            let r = self.subscribe(&mut conn).await;
            let r = match r {
                Ok(()) => {
                    self.up(true);
                    tracing::info!(redis = %self.cfg.redis, channels = ?self.cfg.sources.channels, patterns = ?self.cfg.sources.patterns, "subscribed");
                    let r = self.read_pubsub(conn, &mut shutdown).await;
                    self.up(false);
                    r
                }
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => return,
                Err(e) => {
                    self.health.error(&e);
                    tracing::warn!(error = %e, "Redis pub/sub connection lost; messages published until it is back are lost (pub/sub keeps nothing: use --stream for at-least-once)");
                }
            }
        }
    }

    async fn subscribe(&self, conn: &mut Conn) -> Result<(), RespError> {
        let s = &self.cfg.sources;
        for (cmd, names) in [("SUBSCRIBE", &s.channels), ("PSUBSCRIBE", &s.patterns)] {
            if names.is_empty() {
                continue;
            }
            let mut args: Vec<&[u8]> = vec![cmd.as_bytes()];
            args.extend(names.iter().map(|n| n.as_bytes()));
            conn.send(&args).await?;
            for _ in names {
                let v = tokio::time::timeout(CONNECT_TIMEOUT, conn.read())
                    .await
                    .map_err(|_| RespError::Timeout(CONNECT_TIMEOUT))??;
                if let Value::Error(message) = v {
                    return Err(RespError::Refused {
                        command: cmd.into(),
                        message,
                    });
                }
            }
        }
        Ok(())
    }

    async fn read_pubsub(
        &self,
        conn: Conn,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), RespError> {
        // Replies are read in a task of their own (a read is not
        // cancel-safe), one at a time: while a publish is retried the
        // reader waits, and Redis holds what arrives meanwhile (up to its
        // client-output-buffer-limit for pub/sub, then it drops the
        // connection, which the log reports).
        let (mut reader, mut writer) = conn.into_split();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Value, RespError>>(1);
        let reading = tokio::spawn(async move {
            loop {
                let v = reader.read().await;
                let failed = v.is_err();
                if tx.send(v).await.is_err() || failed {
                    return;
                }
            }
        });
        let _stop_reading = AbortOnDrop(reading);
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let mut silent = 0u32;
        loop {
            let v = tokio::select! {
                () = stopped(shutdown) => return Ok(()),
                _ = ping.tick() => {
                    silent += 1;
                    if silent > 2 {
                        return Err(RespError::Timeout(PING_EVERY * 2));
                    }
                    writer.send(&[b"PING"]).await?;
                    continue;
                }
                v = rx.recv() => v.ok_or(RespError::Closed)??,
            };
            silent = 0;
            let items = v.items();
            let kind = items.first().and_then(Value::as_str).unwrap_or("");
            let (channel, payload) = match (kind, items.len()) {
                ("message", 3) => (&items[1], &items[2]),
                ("pmessage", 4) => (&items[2], &items[3]),
                _ => continue, // pong, (p)subscribe confirmations
            };
            let (Some(channel), Some(payload)) = (channel.as_str(), payload.as_bytes()) else {
                continue;
            };
            self.metrics.received.with_label_values(&["pubsub"]).inc();
            let mapped = self.cfg.mapping.map(channel, payload, None);
            if let Outcome::Stopped = self.deliver(channel, mapped, shutdown).await {
                return Ok(());
            }
        }
    }

    async fn stream(self: Arc<Self>, key: String, mut shutdown: watch::Receiver<bool>) {
        loop {
            let Some(mut conn) = self.connect(&key, &mut shutdown).await else {
                return;
            };
            self.up(true);
            let r = self.read_stream(&mut conn, &key, &mut shutdown).await;
            self.up(false);
            match r {
                Ok(()) => return,
                Err(e) => {
                    self.health.error(&e);
                    tracing::warn!(stream = %key, error = %e, "Redis stream connection lost; reconnecting (unacknowledged entries are read again)");
                }
            }
        }
    }

    async fn read_stream(
        &self,
        conn: &mut Conn,
        key: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), RespError> {
        let st = &self.cfg.stream;
        let call = CONNECT_TIMEOUT;
        match conn
            .call_within(
                &[
                    b"XGROUP",
                    b"CREATE",
                    key.as_bytes(),
                    st.group.as_bytes(),
                    st.start.as_bytes(),
                    b"MKSTREAM",
                ],
                call,
            )
            .await
        {
            Ok(_) => {
                tracing::info!(stream = %key, group = %st.group, start = %st.start, "made the consumer group")
            }
            Err(RespError::Refused { message, .. }) if message.starts_with("BUSYGROUP") => {}
            Err(e) => return Err(e),
        }
        let batch = st.batch.to_string();
        // What this consumer read before and never acknowledged (it was
        // killed, or lost its connection): first, in order.
        loop {
            let reply = conn
                .call_within(&read_group(st, &batch, None, key, "0"), call)
                .await?;
            let entries = stream_entries(&reply, &st.field);
            if entries.is_empty() {
                break;
            }
            if !self.process(conn, key, entries, shutdown).await? {
                return Ok(());
            }
        }
        let block = BLOCK.as_millis().to_string();
        let mut next_claim = tokio::time::Instant::now();
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            // Entries another consumer of the group read and never
            // acknowledged for claim_idle: that consumer is gone.
            if tokio::time::Instant::now() >= next_claim {
                let idle = st.claim_idle.as_millis().to_string();
                let mut cursor = "0-0".to_owned();
                loop {
                    let reply = conn
                        .call_within(
                            &[
                                b"XAUTOCLAIM",
                                key.as_bytes(),
                                st.group.as_bytes(),
                                st.consumer.as_bytes(),
                                idle.as_bytes(),
                                cursor.as_bytes(),
                                b"COUNT",
                                batch.as_bytes(),
                            ],
                            call,
                        )
                        .await?;
                    let items = reply.items();
                    let entries = items
                        .get(1)
                        .map(|v| entry_list(v, &st.field))
                        .unwrap_or_default();
                    if !entries.is_empty() {
                        tracing::warn!(stream = %key, entries = entries.len(), "claimed entries another consumer left unacknowledged");
                    }
                    if !self.process(conn, key, entries, shutdown).await? {
                        return Ok(());
                    }
                    match items.first().and_then(Value::as_str) {
                        Some(next) if next != "0-0" => cursor = next.to_owned(),
                        _ => break,
                    }
                }
                next_claim =
                    tokio::time::Instant::now() + st.claim_idle.max(Duration::from_secs(1));
            }
            let read = read_group(st, &batch, Some(&block), key, ">");
            let reply = tokio::select! {
                () = stopped(shutdown) => return Ok(()),
                r = conn.call_within(&read, BLOCK + call) => r?,
            };
            let entries = stream_entries(&reply, &st.field);
            if !self.process(conn, key, entries, shutdown).await? {
                return Ok(());
            }
        }
    }

    /// Publishes entries in order and acknowledges each once it is stored
    /// (or counted as bad). `false`: the bridge is stopping.
    async fn process(
        &self,
        conn: &mut Conn,
        key: &str,
        entries: Vec<(String, Option<Vec<u8>>)>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool, RespError> {
        for (id, payload) in entries {
            if let Some(payload) = payload {
                self.metrics.received.with_label_values(&["stream"]).inc();
                let source_id = entry_key(key, &id);
                let mapped = self.cfg.mapping.map(key, &payload, Some(&source_id));
                if let Outcome::Stopped = self.deliver(key, mapped, shutdown).await {
                    return Ok(false);
                }
            }
            // Also an entry deleted from the stream meanwhile (no fields).
            conn.call_within(
                &[
                    b"XACK",
                    key.as_bytes(),
                    self.cfg.stream.group.as_bytes(),
                    id.as_bytes(),
                ],
                CONNECT_TIMEOUT,
            )
            .await?;
        }
        Ok(true)
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An XREADGROUP of this bridge's group and consumer on `key` from `id`
/// (`0`: its own pending entries; `>`: new ones), blocking for `block` ms.
fn read_group<'a>(
    st: &'a StreamSettings,
    batch: &'a str,
    block: Option<&'a str>,
    key: &'a str,
    id: &'a str,
) -> Vec<&'a [u8]> {
    let mut args: Vec<&[u8]> = vec![
        b"XREADGROUP",
        b"GROUP",
        st.group.as_bytes(),
        st.consumer.as_bytes(),
        b"COUNT",
        batch.as_bytes(),
    ];
    if let Some(ms) = block {
        args.extend([&b"BLOCK"[..], ms.as_bytes()]);
    }
    args.extend([&b"STREAMS"[..], key.as_bytes(), id.as_bytes()]);
    args
}

/// Resolves once the bridge is told to stop (the guard `wait_for` returns
/// is not held across an await).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// The idempotency key of a stream entry: the stream and the entry's ID
/// (unique within the stream), shortened to fit for very long keys.
fn entry_key(key: &str, id: &str) -> String {
    let k = format!("{key}/{id}");
    if runcast_core::valid_event_id(&k) {
        return k;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    let k = format!("{h:016x}/{id}");
    if runcast_core::valid_event_id(&k) {
        k
    } else {
        id.to_owned()
    }
}

/// The entries of an XREADGROUP reply (one stream): `[[key, entries]]`.
fn stream_entries(reply: &Value, field: &str) -> Vec<(String, Option<Vec<u8>>)> {
    reply
        .items()
        .first()
        .and_then(|s| s.items().get(1))
        .map(|v| entry_list(v, field))
        .unwrap_or_default()
}

/// `[[id, [field, value, ...]], ...]` as (id, message): the message field,
/// or, without it, a JSON object of all the fields. `None` for an entry
/// that no longer exists (its fields are nil).
fn entry_list(v: &Value, field: &str) -> Vec<(String, Option<Vec<u8>>)> {
    v.items()
        .iter()
        .filter_map(|e| {
            let id = e.items().first()?.as_str()?.to_owned();
            let fields = e.items().get(1)?;
            if matches!(fields, Value::Array(None)) {
                return Some((id, None));
            }
            Some((id, Some(message_of(fields.items(), field))))
        })
        .collect()
}

fn message_of(fields: &[Value], field: &str) -> Vec<u8> {
    let pairs: Vec<(&[u8], &[u8])> = fields
        .chunks(2)
        .filter_map(|p| Some((p.first()?.as_bytes()?, p.get(1)?.as_bytes()?)))
        .collect();
    if let Some((_, v)) = pairs.iter().find(|(k, _)| *k == field.as_bytes()) {
        return v.to_vec();
    }
    let object: serde_json::Map<String, serde_json::Value> = pairs
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                serde_json::Value::String(String::from_utf8_lossy(v).into_owned()),
            )
        })
        .collect();
    serde_json::to_vec(&object).unwrap_or_default()
}
