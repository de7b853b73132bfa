//! Measures the NATS hop alone: JetStream publish → a subscriber per run, on
//! a stream of its own (`HOP`). It compares the ways a gateway could follow
//! a run (see docs/benchmarks.md, "Why watches are ordered consumers"):
//!
//! - `pull`: an ordered pull consumer per run (what `NatsBus` uses);
//! - `shared`: one ordered pull consumer for all runs (`filter_subjects`);
//! - `republish`: a core subscription to the stream's republished subject,
//!   which is fast but at most once, and carries no per-run predecessor;
//! - `verified`: the same, plus the direct get that would prove each event
//!   follows the previous one of its run.
//!
//! ```sh
//! cargo run --release -p runcast-nats --example nats_hop -- nats://127.0.0.1:4222 pull 8
//! ```
//! The last argument is the burst: that many publishes go out together every
//! that many milliseconds (1000 events/s in all, over 500 runs), like the
//! bench's 8 publisher tasks do.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull},
    stream::{Config, Republish, StorageType, Stream},
};
use futures_util::StreamExt;
use tokio::sync::mpsc::UnboundedSender;

const RUNS: u64 = 500;
const EVENTS: u64 = 10_000;

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn sent_at(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload).ok()?.parse().ok()
}

async fn follow(
    mode: &str,
    client: &async_nats::Client,
    stream: &Stream,
    run: u64,
    tx: UnboundedSender<u64>,
) {
    let filter = format!("hop.runs.r{run}.*");
    if mode == "pull" {
        follow_consumer(stream, vec![filter], tx).await;
        return;
    }
    let verify = mode == "verified";
    let mut sub = client
        .subscribe(format!("hoplive.runs.r{run}.>"))
        .await
        .expect("subscribe");
    let stream = stream.clone();
    tokio::spawn(async move {
        let mut last = 0;
        while let Some(m) = sub.next().await {
            if verify {
                match stream
                    .direct_get_next_for_subject(&filter, Some(last + 1))
                    .await
                {
                    Ok(next) => last = next.sequence,
                    Err(e) => eprintln!("direct get: {e}"),
                }
            }
            if let Some(t) = sent_at(&m.payload) {
                let _ = tx.send(now_micros().saturating_sub(t));
            }
        }
    });
}

/// One ordered consumer on `filters`: one run's (`pull`), or every run's at
/// once (`shared`), as a gateway holds one for all the runs it watches.
async fn follow_consumer(stream: &Stream, filters: Vec<String>, tx: UnboundedSender<u64>) {
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subjects: filters,
            deliver_policy: DeliverPolicy::New,
            max_expires: Duration::from_secs(4),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            if let Some(t) = sent_at(&m.payload) {
                let _ = tx.send(now_micros().saturating_sub(t));
            }
        }
    });
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (url, mode) = (args[1].as_str(), args[2].as_str());
    let burst: u64 = args.get(3).and_then(|b| b.parse().ok()).unwrap_or(1).max(1);
    assert!(
        ["pull", "shared", "republish", "verified"].contains(&mode),
        "mode: pull | shared | republish | verified"
    );
    let client = async_nats::connect(url).await.expect("connect");
    let js = jetstream::new(client.clone());
    let publisher = jetstream::new(async_nats::connect(url).await.expect("connect"));
    let _ = js.delete_stream("HOP").await;
    let stream = js
        .create_stream(Config {
            name: "HOP".into(),
            subjects: vec!["hop.runs.>".into()],
            storage: StorageType::File,
            republish: (mode == "republish" || mode == "verified").then(|| Republish {
                source: "hop.runs.>".into(),
                destination: "hoplive.runs.>".into(),
                headers_only: false,
            }),
            allow_direct: true,
            max_consumers: 10_000,
            ..Default::default()
        })
        .await
        .expect("stream");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    if mode == "shared" {
        let all = (0..RUNS).map(|r| format!("hop.runs.r{r}.*")).collect();
        follow_consumer(&stream, all, tx.clone()).await;
    } else {
        for run in 0..RUNS {
            follow(mode, &client, &stream, run, tx.clone()).await;
        }
    }
    drop(tx);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut tick = tokio::time::interval(Duration::from_millis(burst));
    for round in 0..EVENTS / burst {
        tick.tick().await;
        let mut acks = Vec::new();
        for k in 0..burst {
            let (js, n) = (publisher.clone(), round * burst + k);
            acks.push(tokio::spawn(async move {
                js.publish(
                    format!("hop.runs.r{}.progress", n % RUNS),
                    now_micros().to_string().into(),
                )
                .await
                .expect("publish")
                .await
                .expect("ack");
            }));
        }
        for a in acks {
            a.await.expect("publisher");
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut lat = Vec::new();
    while let Ok(us) = rx.try_recv() {
        lat.push(us);
    }
    lat.sort_unstable();
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    println!(
        "{mode} (burst {burst}): {} of {} events, publish -> subscriber ms: p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
        lat.len(),
        EVENTS / burst * burst,
        q(0.5),
        q(0.99),
        q(0.999),
        q(1.0)
    );
    let _ = js.delete_stream("HOP").await;
}
