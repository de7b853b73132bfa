//! `runcast bench`: starts (or targets) a gateway, opens real WebSocket
//! clients, publishes through the HTTP API at a fixed rate, and reports what
//! the issue's targets are stated in: delivered messages/s, end-to-end
//! latency (publish call → client receipt) percentiles, lost and duplicated
//! events, and the server's CPU and RSS. Every loop is bounded in count and
//! time, and all traffic stays on loopback.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use runcast_core::{EventKind, NewEvent, RunId};
use runcast_worker::{HttpTarget, PublishTarget};
use serde::Serialize;
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_tungstenite::tungstenite::Message;

use crate::args::BenchArgs;

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub clients: usize,
    pub runs: usize,
    pub rate: u64,
    pub duration_s: f64,
    pub payload: usize,
    pub published: u64,
    pub publish_errors: u64,
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub delivered_per_s: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_p999: f64,
    pub latency_ms_max: f64,
    pub server_cpu_cores: Option<f64>,
    pub server_rss_mib_before: Option<f64>,
    pub server_rss_mib_after: Option<f64>,
    pub idle_bytes_per_connection: Option<f64>,
    pub bench_cpu_cores: Option<f64>,
    /// `ingest`: concurrent publishers and events per request.
    pub publishers: Option<usize>,
    pub batch: Option<usize>,
    /// `ingest`: events/s stored through the gateway's HTTP API.
    pub ingest_per_s: Option<f64>,
    /// `ingest` on NATS: events/s the same publishers store straight to
    /// JetStream (acknowledged), measured in the same run.
    pub ingest_nats_direct_per_s: Option<f64>,
    pub nats_direct_errors: Option<u64>,
    /// `interest`: distinct runs the gateway watches (its metric), and the
    /// gateway's memory per watched run.
    pub watched_runs: Option<u64>,
    pub bytes_per_watched_run: Option<f64>,
    /// `interest`: seconds to open every subscription.
    pub subscribe_s: Option<f64>,
    /// `interest`: subscribe/unsubscribe changes per second made while
    /// measuring `latency_ms_*_churn` (achieved, not asked for).
    pub churn_per_s: Option<f64>,
    pub latency_ms_p50_churn: Option<f64>,
    pub latency_ms_p99_churn: Option<f64>,
}

/// The gateways under test: child processes (killed by PID on drop), or
/// one already running gateway (`--target`).
struct Fleet {
    addrs: Vec<SocketAddr>,
    pids: Vec<u32>,
    children: Vec<std::process::Child>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Fleet {
    fn cpu_seconds(&self) -> Option<f64> {
        self.pids.iter().map(|&p| cpu_seconds(p)).sum()
    }
    fn rss_mib(&self) -> Option<f64> {
        self.pids.iter().map(|&p| rss_mib(p)).sum()
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts `runcast up` (embedded bus), or `--gateways` × `runcast gateway`
/// on the NATS at `--nats`, and waits until each answers `/readyz`.
async fn start_fleet(a: &BenchArgs) -> anyhow::Result<Fleet> {
    let exe = std::env::current_exe()?;
    let mut fleet = Fleet {
        addrs: Vec::new(),
        pids: Vec::new(),
        children: Vec::new(),
    };
    let count = if a.nats.is_some() {
        a.gateways.max(1)
    } else {
        1
    };
    for _ in 0..count {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mut cmd = std::process::Command::new(&exe);
        match &a.nats {
            Some(url) => cmd.args([
                "gateway",
                "--allow-anonymous",
                "--allow-anonymous-publish",
                "--nats",
                url,
            ]),
            None => cmd.arg("up"),
        };
        let child = cmd
            .args(["--listen", &addr.to_string(), "--log", "warn"])
            .args(["--max-connections", &(a.clients + 1000).to_string()])
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("starting a gateway")?;
        fleet.pids.push(child.id());
        fleet.children.push(child);
        fleet.addrs.push(addr);
    }
    for &addr in &fleet.addrs {
        let mut ready = false;
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok()
                && http_status(addr, "/readyz").await == Some(200)
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !ready {
            bail!("gateway at {addr} was not ready within 10s");
        }
    }
    Ok(fleet)
}

/// Status of a GET, by a bare HTTP/1.1 exchange.
async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = vec![0; 64];
    let n = s.read(&mut buf).await.ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Where the bench publishes: straight to NATS (as a worker would) when
/// benchmarking NATS-backed gateways, else the first gateway's HTTP API.
async fn publish_target(a: &BenchArgs, fleet: &Fleet) -> anyhow::Result<Arc<dyn PublishTarget>> {
    Ok(match &a.nats {
        Some(url) => {
            let client =
                runcast_nats::connect(&runcast_nats::NatsConfig::with_urls(url.as_str()), false)
                    .await?;
            Arc::new(runcast_nats::NatsTarget::new(client, "runcast"))
        }
        None => Arc::new(HttpTarget::new(&format!("http://{}", fleet.addrs[0]))?),
    })
}

/// (utime + stime) seconds of a process, from /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields after ')' are fixed.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0) // USER_HZ is 100 on Linux
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Reads the number after `key` in `text` without a full JSON parse: the
/// bench client must not be the bottleneck it is measuring.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let i = text.find(key)? + key.len();
    let digits: &str = &text[i..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

#[derive(Default)]
struct ClientStats {
    received: u64,
    duplicated: u64,
    latencies_us: Vec<u32>,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect_and_subscribe(url: &str, run: &str) -> anyhow::Result<Ws> {
    // A small read buffer: tungstenite zero-fills the whole buffer on every
    // read, and the default 128 KiB would make the load generator, not the
    // gateway, the bottleneck.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(8 << 10);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .context("websocket connect")?;
    let sub = format!(r#"{{"type":"subscribe","run":"{run}"}}"#);
    ws.send(Message::Text(sub.into())).await?;
    // hello, then state
    let mut seen_state = false;
    while !seen_state {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                if t.contains(r#""type":"error""#) {
                    bail!("subscribe to {run} refused: {t}");
                }
                seen_state = t.contains(r#""type":"state""#);
            }
            Ok(Some(Ok(_))) => {}
            other => bail!("subscribe failed: {other:?}"),
        }
    }
    Ok(ws)
}

/// The peer: a client of nats-server's own websocket listener, speaking the
/// NATS protocol, subscribed to `bench.<run>` (what the runcast client does
/// with a `subscribe` frame). Returns once the server answered a PING, so
/// the subscription is in place.
async fn connect_nats_ws(url: &str, run: &str) -> anyhow::Result<Ws> {
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(8 << 10);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .context("websocket connect to nats-server")?;
    let hello = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1}}\r\nSUB bench.{run} 1\r\nPING\r\n"
    );
    ws.send(Message::Binary(hello.into_bytes().into())).await?;
    let mut text = String::new();
    while !text.contains("PONG\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => text.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(Message::Text(t)))) => text.push_str(&t),
            Ok(Some(Ok(_))) => {}
            other => bail!("nats-server websocket: {other:?}"),
        }
        if text.contains("-ERR") {
            bail!("nats-server refused: {text}");
        }
    }
    Ok(ws)
}

/// Splits what nats-server sends over a websocket into `MSG` payloads. Its
/// frames carry protocol text, any number of messages in one frame and a
/// message split over two.
#[derive(Default)]
struct NatsWsReader {
    buf: Vec<u8>,
}

impl NatsWsReader {
    /// Appends `data`; returns the payloads now complete, and whether the
    /// server sent a PING (to be answered with a PONG).
    fn feed(&mut self, data: &[u8]) -> (Vec<String>, bool) {
        self.buf.extend_from_slice(data);
        let (mut out, mut ping, mut at) = (Vec::new(), false, 0);
        while let Some(nl) = self.buf[at..].windows(2).position(|w| w == b"\r\n") {
            let line = &self.buf[at..at + nl];
            if let Some(rest) = line.strip_prefix(b"MSG ") {
                // MSG <subject> <sid> [reply] <size>
                let size: usize = std::str::from_utf8(rest)
                    .ok()
                    .and_then(|r| r.split(' ').next_back()?.parse().ok())
                    .unwrap_or(0);
                let start = at + nl + 2;
                if self.buf.len() < start + size + 2 {
                    break;
                }
                out.push(String::from_utf8_lossy(&self.buf[start..start + size]).into_owned());
                at = start + size + 2;
            } else {
                ping |= line == b"PING";
                at += nl + 2;
            }
        }
        self.buf.drain(..at);
        (out, ping)
    }
}

/// Client `i` watches run `i mod runs` through gateway `i mod gateways`.
async fn connect_all(
    addrs: &[SocketAddr],
    clients: usize,
    runs: &[String],
    peer: bool,
) -> anyhow::Result<Vec<Ws>> {
    let gate = Arc::new(Semaphore::new(100));
    let mut set = JoinSet::new();
    for i in 0..clients {
        let (run, gate) = (runs[i % runs.len()].clone(), gate.clone());
        let addr = addrs[i % addrs.len()];
        set.spawn(async move {
            let _p = gate.acquire_owned().await;
            let ws = if peer {
                connect_nats_ws(&format!("ws://{addr}"), &run).await
            } else {
                connect_and_subscribe(&format!("ws://{addr}/v1/ws"), &run).await
            };
            (i, ws)
        });
    }
    let mut out: Vec<Option<Ws>> = (0..clients).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, ws) = r?;
        out[i] = Some(ws.with_context(|| format!("client {i}"))?);
    }
    Ok(out
        .into_iter()
        .map(|w| w.expect("every client connected"))
        .collect())
}

pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    let fleet = match a.target {
        Some(addr) => Fleet {
            addrs: vec![addr],
            pids: a.server_pid.into_iter().collect(),
            children: Vec::new(),
        },
        None => start_fleet(&a).await?,
    };
    let report = match a.scenario.as_str() {
        "fanout" | "nats-ws" => fanout(&a, &fleet).await?,
        "idle" => idle(&a, &fleet).await?,
        "ingest" => ingest(&a, &fleet).await?,
        "interest" => interest(&a, &fleet).await?,
        other => {
            bail!("unknown scenario {other:?}; use fanout, nats-ws, idle, ingest or interest")
        }
    };
    drop(fleet);
    print_report(&report);
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = &a.out {
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if report.lost > 0 || report.duplicated > 0 {
        bail!(
            "{} events lost and {} duplicated",
            report.lost,
            report.duplicated
        );
    }
    Ok(())
}

fn run_names(n: usize) -> Vec<String> {
    let stamp = now_nanos() % 1_000_000;
    (0..n.max(1))
        .map(|i| format!("bench-{stamp}-{i}"))
        .collect()
}

/// `fanout`, and `nats-ws`: the same load on the peer, nats-server's own
/// websocket listener (`--target`), published with core NATS (`--nats`).
/// The peer's events carry their per-run number in the payload, where
/// runcast's carry the seq it assigned.
async fn fanout(a: &BenchArgs, fleet: &Fleet) -> anyhow::Result<Report> {
    let peer = a.scenario == "nats-ws";
    if peer && (a.nats.is_none() || a.target.is_none()) {
        bail!("the nats-ws scenario needs --target (nats-server's websocket listener) and --nats");
    }
    let runs = run_names(a.runs);
    crate::say!(
        "connecting {} clients over {} runs to {:?} ...",
        a.clients,
        runs.len(),
        fleet.addrs
    );
    let clients = connect_all(&fleet.addrs, a.clients, &runs, peer).await?;
    let rss_before = fleet.rss_mib();

    // Receivers: each counts, checks order and records latency.
    let stop_at = Arc::new(AtomicU64::new(u64::MAX));
    let mut receivers = JoinSet::new();
    for (i, mut ws) in clients.into_iter().enumerate() {
        let run_idx = i % runs.len();
        let stop_at = stop_at.clone();
        receivers.spawn(async move {
            let mut st = ClientStats::default();
            let mut last = 0u64;
            let mut reader = NatsWsReader::default();
            loop {
                let deadline = stop_at.load(Ordering::Relaxed);
                let wait = if deadline == u64::MAX {
                    Duration::from_secs(60)
                } else {
                    Duration::from_millis(500)
                };
                let msg = match tokio::time::timeout(wait, ws.next()).await {
                    Ok(Some(Ok(m))) => m,
                    _ => break,
                };
                let recv = now_nanos();
                let texts = match msg {
                    Message::Text(t) if !peer => vec![t.as_str().to_owned()],
                    Message::Binary(b) if peer => {
                        let (texts, ping) = reader.feed(&b);
                        if ping {
                            let pong = Message::Binary(b"PONG\r\n".to_vec().into());
                            if ws.send(pong).await.is_err() {
                                break;
                            }
                        }
                        texts
                    }
                    _ => continue,
                };
                for t in texts {
                    let (Some(seq), Some(sent)) =
                        (number_after(&t, r#""seq":"#), number_after(&t, r#""t":"#))
                    else {
                        continue;
                    };
                    if seq <= last {
                        st.duplicated += 1;
                        continue;
                    }
                    last = seq;
                    st.received += 1;
                    st.latencies_us
                        .push((recv.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32);
                }
                if deadline != u64::MAX && now_nanos() > deadline {
                    break;
                }
            }
            (run_idx, st)
        });
    }

    // Publishers: up to 8 tasks, each owning a slice of the runs (so per-run
    // order is the publish order) and its share of the rate.
    let tasks = runs.len().min(8);
    let published: Arc<Vec<AtomicU64>> =
        Arc::new((0..runs.len()).map(|_| AtomicU64::new(0)).collect());
    let errors = Arc::new(AtomicU64::new(0));
    let cpu_before = fleet.cpu_seconds();
    let target = publish_target(a, fleet).await?;
    let core = match (&a.nats, peer) {
        (Some(url), true) => Some(
            runcast_nats::connect(&runcast_nats::NatsConfig::with_urls(url.as_str()), false)
                .await?,
        ),
        _ => None,
    };
    let bench_cpu_before = cpu_seconds(std::process::id());
    let started = Instant::now();
    let mut pubs = JoinSet::new();
    let pad = "x".repeat(a.payload);
    for k in 0..tasks {
        let mine: Vec<(usize, RunId)> = runs
            .iter()
            .enumerate()
            .filter(|(i, _)| i % tasks == k)
            .map(|(i, r)| (i, RunId::parse(r).expect("valid")))
            .collect();
        let share = a.rate as f64 / tasks as f64;
        let (target, core) = (target.clone(), core.clone());
        let (published, errors, pad, duration) =
            (published.clone(), errors.clone(), pad.clone(), a.duration);
        pubs.spawn(async move {
            let mut next = 0usize;
            let mut sent = 0u64;
            let start = Instant::now();
            while start.elapsed() < duration {
                // Publish whatever the schedule says is due, then sleep 1 ms.
                let due = (start.elapsed().as_secs_f64() * share) as u64;
                while sent < due {
                    let (idx, run) = &mine[next % mine.len()];
                    next += 1;
                    sent += 1;
                    if let Some(core) = &core {
                        // Core NATS, as a worker publishes to the raw broker.
                        let n = published[*idx].load(Ordering::Relaxed) + 1;
                        let data = format!(r#"{{"seq":{n},"t":{},"pad":"{pad}"}}"#, now_nanos());
                        match core.publish(format!("bench.{run}"), data.into()).await {
                            Ok(()) => published[*idx].fetch_add(1, Ordering::Relaxed),
                            Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                        };
                        continue;
                    }
                    let data = format!(r#"{{"t":{},"pad":"{pad}"}}"#, now_nanos());
                    let ev = NewEvent::new(
                        EventKind::Progress,
                        serde_json::value::RawValue::from_string(data).expect("json"),
                    );
                    // Traced like a worker's publish when the bench exports
                    // traces (RUNCAST_OTLP_ENDPOINT), a no-op otherwise.
                    match runcast_worker::publish_traced(&*target, run, vec![ev]).await {
                        Ok(_) => {
                            published[*idx].fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
    }
    while let Some(r) = pubs.join_next().await {
        r?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = fleet.cpu_seconds();
    let bench_cpu_after = cpu_seconds(std::process::id());
    // Let in-flight events land, then tell receivers to stop once idle.
    stop_at.store(now_nanos() + 5_000_000_000, Ordering::Relaxed);

    if let Some(core) = &core {
        core.flush().await?;
    }
    let mut report = Report {
        scenario: a.scenario.clone(),
        clients: a.clients,
        runs: runs.len(),
        rate: a.rate,
        duration_s: elapsed,
        payload: a.payload,
        ..Report::default()
    };
    let mut lat: Vec<u32> = Vec::new();
    let per_run: Vec<u64> = published
        .iter()
        .map(|p| p.load(Ordering::Relaxed))
        .collect();
    report.published = per_run.iter().sum();
    report.publish_errors = errors.load(Ordering::Relaxed);
    while let Some(r) = receivers.join_next().await {
        let (run_idx, st) = r?;
        report.expected_deliveries += per_run[run_idx];
        report.delivered += st.received;
        report.duplicated += st.duplicated;
        report.lost += per_run[run_idx].saturating_sub(st.received);
        lat.extend(st.latencies_us);
    }
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |&us| us as f64 / 1000.0)
    };
    report.latency_ms_p50 = pct(0.50);
    report.latency_ms_p99 = pct(0.99);
    report.latency_ms_p999 = pct(0.999);
    report.latency_ms_max = lat.last().map_or(0.0, |&us| us as f64 / 1000.0);
    report.delivered_per_s = report.delivered as f64 / elapsed;
    report.server_cpu_cores = cpu_before.zip(cpu_after).map(|(b, a)| (a - b) / elapsed);
    report.bench_cpu_cores = bench_cpu_before
        .zip(bench_cpu_after)
        .map(|(b, a)| (a - b) / elapsed);
    report.server_rss_mib_before = rss_before;
    report.server_rss_mib_after = fleet.rss_mib();
    Ok(report)
}

async fn idle(a: &BenchArgs, fleet: &Fleet) -> anyhow::Result<Report> {
    let runs = run_names(a.runs);
    // Give every run a first event so subscribers get real state.
    let target = publish_target(a, fleet).await?;
    for r in &runs {
        let run = RunId::parse(r)?;
        target
            .publish(
                &run,
                vec![NewEvent::json(
                    EventKind::Status,
                    &serde_json::json!({"state": "idle"}),
                )?],
            )
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = fleet.rss_mib();
    crate::say!(
        "opening {} idle connections over {} runs ...",
        a.clients,
        runs.len()
    );
    let clients = connect_all(&fleet.addrs, a.clients, &runs, false).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = fleet.rss_mib();
    // Prove they are alive: one event per run must reach every client.
    for r in &runs {
        let run = RunId::parse(r)?;
        let data = format!(r#"{{"t":{}}}"#, now_nanos());
        target
            .publish(
                &run,
                vec![NewEvent::new(
                    EventKind::Progress,
                    serde_json::value::RawValue::from_string(data)?,
                )],
            )
            .await?;
    }
    let mut set = JoinSet::new();
    for mut ws in clients {
        set.spawn(async move {
            loop {
                match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) if t.contains(r#""type":"event""#) => {
                        return 1u64;
                    }
                    Ok(Some(Ok(_))) => continue,
                    _ => return 0,
                }
            }
        });
    }
    let mut delivered = 0;
    while let Some(r) = set.join_next().await {
        delivered += r?;
    }
    Ok(Report {
        scenario: "idle".into(),
        clients: a.clients,
        runs: runs.len(),
        published: runs.len() as u64,
        expected_deliveries: a.clients as u64,
        delivered,
        lost: a.clients as u64 - delivered,
        server_rss_mib_before: before,
        server_rss_mib_after: after,
        idle_bytes_per_connection: before
            .zip(after)
            .map(|(b, after)| (after - b) * 1048576.0 / a.clients as f64),
        ..Report::default()
    })
}

/// Events/s that `--publishers` concurrent publishers store through the
/// gateway's HTTP publish API, `--batch` events a request, each publisher
/// sending its next request as soon as the last is answered. On NATS the
/// same publishers then publish straight to JetStream (acknowledged, as a
/// worker does) for as long, so both rates come from one run.
async fn ingest(a: &BenchArgs, fleet: &Fleet) -> anyhow::Result<Report> {
    if a.publishers == 0 || a.batch == 0 {
        bail!("--publishers and --batch must be at least 1");
    }
    let http: Arc<dyn PublishTarget> =
        Arc::new(HttpTarget::new(&format!("http://{}", fleet.addrs[0]))?.with_attempts(1));
    crate::say!(
        "ingest: {} publishers, {} events a request, {:?}, through {} ...",
        a.publishers,
        a.batch,
        a.duration,
        fleet.addrs[0]
    );
    let cpu0 = fleet.cpu_seconds();
    let (stored, errors, secs) = flat_out(http, a).await?;
    let cpu1 = fleet.cpu_seconds();
    let direct = match &a.nats {
        Some(url) => {
            let client =
                runcast_nats::connect(&runcast_nats::NatsConfig::with_urls(url.as_str()), false)
                    .await?;
            crate::say!("ingest: the same, straight to JetStream ...");
            let t: Arc<dyn PublishTarget> =
                Arc::new(runcast_nats::NatsTarget::new(client, "runcast"));
            Some(flat_out(t, a).await?)
        }
        None => None,
    };
    Ok(Report {
        scenario: "ingest".into(),
        runs: a.runs,
        duration_s: secs,
        payload: a.payload,
        published: stored,
        publish_errors: errors,
        server_cpu_cores: cpu0.zip(cpu1).map(|(b, e)| (e - b) / secs),
        publishers: Some(a.publishers),
        batch: Some(a.batch),
        ingest_per_s: Some(stored as f64 / secs),
        ingest_nats_direct_per_s: direct.map(|(n, _, s)| n as f64 / s),
        nats_direct_errors: direct.map(|(_, e, _)| e),
        ..Report::default()
    })
}

/// Reads frames until `n` state frames (answers to subscribes) arrived.
async fn states(ws: &mut Ws, n: usize) -> anyhow::Result<()> {
    let mut seen = 0;
    while seen < n {
        match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                if t.contains(r#""type":"error""#) {
                    bail!("subscribe refused: {t}");
                }
                seen += usize::from(t.contains(r#""type":"state""#));
            }
            Ok(Some(Ok(_))) => {}
            other => bail!("while subscribing: {other:?}"),
        }
    }
    Ok(())
}

/// A gateway's NATS interest at scale: `--clients` connections subscribe to
/// `--subs` distinct runs each (no events), and the gateway's memory per
/// watched run is reported. Then `--runs` hot runs, one client each, get
/// `--rate` events/s for `--duration`, first alone and then while another
/// connection makes `--churn` subscribe/unsubscribe changes per second on
/// runs of its own: the p99 of the hot runs' events, without and with churn.
async fn interest(a: &BenchArgs, fleet: &Fleet) -> anyhow::Result<Report> {
    if a.nats.is_none() {
        bail!("the interest scenario needs --nats");
    }
    let url = format!("ws://{}/v1/ws", fleet.addrs[0]);
    let base = std::process::id();
    let rss0 = fleet.rss_mib();
    crate::say!(
        "interest: {} connections x {} runs each ...",
        a.clients,
        a.subs
    );
    let started = Instant::now();
    let mut set = JoinSet::new();
    let gate = Arc::new(Semaphore::new(50));
    for c in 0..a.clients {
        let (url, subs, gate) = (url.clone(), a.subs, gate.clone());
        set.spawn(async move {
            let _p = gate.acquire_owned().await;
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
            for k in 0..subs {
                let sub = format!(r#"{{"type":"subscribe","run":"i{base}-{c}-{k}"}}"#);
                ws.send(Message::Text(sub.into())).await?;
            }
            states(&mut ws, subs).await?;
            anyhow::Ok(ws)
        });
    }
    let mut idle = Vec::new();
    while let Some(r) = set.join_next().await {
        idle.push(r??);
    }
    let subscribe_s = started.elapsed().as_secs_f64();
    // Let the watches' first checks (1 s after each opens) finish.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss1 = fleet.rss_mib();
    let watched = metric_of(fleet.addrs[0], "runcast_watched_runs").await;
    crate::say!(
        "interest: {watched:?} watched runs after {subscribe_s:.1}s; RSS {rss0:?} -> {rss1:?} MiB"
    );

    // Hot runs: one client each, events at --rate in all.
    let hot = run_names(a.runs);
    let mut hot_clients = Vec::new();
    for r in &hot {
        hot_clients.push(connect_and_subscribe(&url, r).await?);
    }
    let churning = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let quiet_lat = Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let churn_lat = Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let mut readers = JoinSet::new();
    for mut ws in hot_clients {
        let (churning, quiet_lat, churn_lat) =
            (churning.clone(), quiet_lat.clone(), churn_lat.clone());
        readers.spawn(async move {
            while let Ok(Some(Ok(m))) =
                tokio::time::timeout(Duration::from_secs(10), ws.next()).await
            {
                let Message::Text(t) = m else { continue };
                if let Some(sent) = number_after(&t, r#""t":"#) {
                    let us = (now_nanos().saturating_sub(sent) / 1000) as u32;
                    let into = if churning.load(Ordering::Relaxed) {
                        &churn_lat
                    } else {
                        &quiet_lat
                    };
                    into.lock().unwrap_or_else(|p| p.into_inner()).push(us);
                }
            }
        });
    }
    let target = publish_target(a, fleet).await?;
    let publish_for = |d: Duration| {
        let (target, hot) = (target.clone(), hot.clone());
        let every = Duration::from_secs_f64(1.0 / a.rate.max(1) as f64);
        async move {
            let mut tick = tokio::time::interval(every);
            let end = Instant::now() + d;
            let mut i = 0usize;
            while Instant::now() < end {
                tick.tick().await;
                let run = RunId::parse(&hot[i % hot.len()]).expect("valid");
                let data = format!(r#"{{"t":{}}}"#, now_nanos());
                let ev = NewEvent::new(
                    EventKind::Progress,
                    serde_json::value::RawValue::from_string(data).expect("json"),
                );
                let _ = target.publish(&run, vec![ev]).await;
                i += 1;
            }
        }
    };
    crate::say!(
        "interest: {} hot runs at {} ev/s, no churn ...",
        hot.len(),
        a.rate
    );
    publish_for(a.duration).await;
    churning.store(true, Ordering::Relaxed);
    crate::say!("interest: the same, with {} changes/s ...", a.churn);
    let churn_for = a.duration;
    let churn = {
        let (url, rate) = (url.clone(), a.churn.max(1));
        tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
            // Each step subscribes to a new run and unsubscribes the one
            // before it: two changes. Steps are paced in batches of 10.
            let steps_per_s = (rate / 2).max(1);
            let mut tick =
                tokio::time::interval(Duration::from_secs_f64(10.0 / steps_per_s as f64));
            let end = Instant::now() + churn_for;
            let (mut k, mut changes) = (0u64, 0u64);
            let started = Instant::now();
            while Instant::now() < end {
                tick.tick().await;
                for _ in 0..10 {
                    let sub = format!(r#"{{"type":"subscribe","run":"c{base}-{k}"}}"#);
                    ws.send(Message::Text(sub.into())).await?;
                    if k > 0 {
                        let unsub =
                            format!(r#"{{"type":"unsubscribe","run":"c{base}-{}"}}"#, k - 1);
                        ws.send(Message::Text(unsub.into())).await?;
                        changes += 1;
                    }
                    changes += 1;
                    k += 1;
                }
                // Drain answers so the gateway never sees a slow reader.
                while let Ok(Some(Ok(_))) =
                    tokio::time::timeout(Duration::from_micros(1), ws.next()).await
                {
                }
            }
            anyhow::Ok(changes as f64 / started.elapsed().as_secs_f64())
        })
    };
    publish_for(a.duration).await;
    let churn_per_s = churn.await??;
    tokio::time::sleep(Duration::from_secs(1)).await;
    readers.abort_all();
    drop(idle);
    let pct = |v: &std::sync::Mutex<Vec<u32>>, p: f64| {
        let mut v = v.lock().unwrap_or_else(|p| p.into_inner()).clone();
        v.sort_unstable();
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .map_or(0.0, |&us| us as f64 / 1000.0)
    };
    let watched_runs = watched.map(|w| w as u64);
    Ok(Report {
        scenario: "interest".into(),
        clients: a.clients,
        runs: a.runs,
        rate: a.rate,
        duration_s: a.duration.as_secs_f64(),
        published: quiet_lat.lock().map_or(0, |v| v.len()) as u64,
        delivered: churn_lat.lock().map_or(0, |v| v.len()) as u64,
        latency_ms_p50: pct(&quiet_lat, 0.5),
        latency_ms_p99: pct(&quiet_lat, 0.99),
        latency_ms_p50_churn: Some(pct(&churn_lat, 0.5)),
        latency_ms_p99_churn: Some(pct(&churn_lat, 0.99)),
        churn_per_s: Some(churn_per_s),
        server_rss_mib_before: rss0,
        server_rss_mib_after: rss1,
        watched_runs,
        bytes_per_watched_run: rss0
            .zip(rss1)
            .zip(watched_runs.filter(|&w| w > 0))
            .map(|((b, a), w)| (a - b) * 1048576.0 / w as f64),
        subscribe_s: Some(subscribe_s),
        ..Report::default()
    })
}

/// A gauge or counter from a gateway's `/metrics`.
async fn metric_of(addr: SocketAddr, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Publishes from `--publishers` tasks until `--duration` is up; returns
/// the events stored, the failed requests and the seconds it took.
async fn flat_out(
    target: Arc<dyn PublishTarget>,
    a: &BenchArgs,
) -> anyhow::Result<(u64, u64, f64)> {
    let runs: Vec<RunId> = run_names(a.runs)
        .iter()
        .map(|r| RunId::parse(r))
        .collect::<Result<_, _>>()?;
    let pad = "x".repeat(a.payload);
    let started = Instant::now();
    let deadline = started + a.duration;
    let mut set = JoinSet::new();
    for p in 0..a.publishers {
        let (target, run, pad, batch) = (
            target.clone(),
            runs[p % runs.len()].clone(),
            pad.clone(),
            a.batch,
        );
        set.spawn(async move {
            let (mut stored, mut errors) = (0u64, 0u64);
            while Instant::now() < deadline {
                let events = (0..batch)
                    .map(|i| {
                        let data = format!(r#"{{"p":{p},"i":{i},"pad":"{pad}"}}"#);
                        NewEvent::new(
                            EventKind::Progress,
                            serde_json::value::RawValue::from_string(data).expect("json"),
                        )
                    })
                    .collect();
                match target.publish(&run, events).await {
                    Ok(seqs) => stored += seqs.len() as u64,
                    Err(e) => {
                        errors += 1;
                        if errors == 1 {
                            crate::say!("publisher {p}: {e}");
                        }
                    }
                }
            }
            (stored, errors)
        });
    }
    let (mut stored, mut errors) = (0, 0);
    while let Some(r) = set.join_next().await {
        let (s, e) = r?;
        stored += s;
        errors += e;
    }
    Ok((stored, errors, started.elapsed().as_secs_f64()))
}

fn print_report(r: &Report) {
    crate::say!("--- runcast bench: {} ---", r.scenario);
    if r.scenario == "interest" {
        crate::say!(
            "{} watched runs ({} connections x subscriptions) opened in {:.1}s; gateway RSS {:.1} -> {:.1} MiB: {:.0} bytes per watched run",
            r.watched_runs.unwrap_or(0),
            r.clients,
            r.subscribe_s.unwrap_or(0.0),
            r.server_rss_mib_before.unwrap_or(0.0),
            r.server_rss_mib_after.unwrap_or(0.0),
            r.bytes_per_watched_run.unwrap_or(0.0)
        );
        crate::say!(
            "{} hot runs at {} ev/s: p50 {:.2} / p99 {:.2} ms ({} events); with {:.0} subscribe/unsubscribe changes/s: p50 {:.2} / p99 {:.2} ms ({} events)",
            r.runs,
            r.rate,
            r.latency_ms_p50,
            r.latency_ms_p99,
            r.published,
            r.churn_per_s.unwrap_or(0.0),
            r.latency_ms_p50_churn.unwrap_or(0.0),
            r.latency_ms_p99_churn.unwrap_or(0.0),
            r.delivered
        );
        return;
    }
    if r.scenario == "ingest" {
        crate::say!(
            "{} publishers x {} events a request for {:.1}s, payload {} B, {} runs",
            r.publishers.unwrap_or(0),
            r.batch.unwrap_or(0),
            r.duration_s,
            r.payload,
            r.runs
        );
        crate::say!(
            "HTTP publish API: {} events stored ({:.0}/s), {} failed requests, gateway CPU {:.2} cores",
            r.published,
            r.ingest_per_s.unwrap_or(0.0),
            r.publish_errors,
            r.server_cpu_cores.unwrap_or(0.0)
        );
        if let Some(d) = r.ingest_nats_direct_per_s {
            crate::say!(
                "straight to JetStream: {d:.0}/s ({} failed)",
                r.nats_direct_errors.unwrap_or(0)
            );
        }
        return;
    }
    crate::say!(
        "clients {} over {} runs, {} events/s for {:.1}s, payload {} B",
        r.clients,
        r.runs,
        r.rate,
        r.duration_s,
        r.payload
    );
    crate::say!(
        "published {} (errors {}), delivered {}/{} ({:.0} msg/s), lost {}, duplicated {}",
        r.published,
        r.publish_errors,
        r.delivered,
        r.expected_deliveries,
        r.delivered_per_s,
        r.lost,
        r.duplicated
    );
    crate::say!(
        "latency ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        r.latency_ms_p50,
        r.latency_ms_p99,
        r.latency_ms_p999,
        r.latency_ms_max
    );
    if let Some(c) = r.server_cpu_cores {
        crate::say!(
            "server CPU {:.2} cores (bench clients {:.2})",
            c,
            r.bench_cpu_cores.unwrap_or(0.0)
        );
    }
    if let (Some(b), Some(a)) = (r.server_rss_mib_before, r.server_rss_mib_after) {
        crate::say!("server RSS {b:.1} MiB -> {a:.1} MiB");
    }
    if let Some(b) = r.idle_bytes_per_connection {
        crate::say!(
            "memory per idle connection: {:.0} bytes ({:.1} KiB)",
            b,
            b / 1024.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_ws_frames_are_split_into_payloads_across_frame_boundaries() {
        let mut r = NatsWsReader::default();
        let (got, ping) = r.feed(b"INFO {}\r\nMSG bench.a 1 5\r\nhello\r\nMSG bench.a 1 11\r\nhel");
        assert_eq!(got, ["hello"]);
        assert!(!ping);
        let (got, ping) = r.feed(b"lo world\r\nPING\r\nMSG bench.a 1 r 2\r\nok\r\n");
        assert_eq!(got, ["hello world", "ok"]);
        assert!(ping);
        assert!(r.buf.is_empty());
    }

    #[test]
    fn numbers_are_found_without_parsing() {
        let t = r#"{"type":"event","run":"r","seq":42,"kind":"progress","data":{"t":1700,"pad":"x"},"ts":5}"#;
        assert_eq!(number_after(t, r#""seq":"#), Some(42));
        assert_eq!(number_after(t, r#""t":"#), Some(1700));
        assert_eq!(number_after(t, r#""nope":"#), None);
    }
}
