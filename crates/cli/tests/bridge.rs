//! `runcast bridge redis` against a real redis-server (Debian's), with a
//! publisher that is a Python program using redis-py, unchanged from what a
//! team runs today, and a NATS-backed gateway whose clients see the events.

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use runcast_test_support::{
    WsClient, http, metric,
    nats::{NatsServer, free_addr},
    redis::RedisServer,
    wait_http_ok,
};
use serde_json::Value;
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_runcast");

async fn gateway(nats: &NatsServer) -> (SocketAddr, Child) {
    let gw = free_addr();
    let child = Command::new(BIN)
        .args(runcast_test_support::open_gateway_args(gw, &nats.url()))
        .args(["--log", "warn"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("runcast gateway starts");
    wait_http_ok(gw, "/readyz", "gateway").await;
    (gw, child)
}

fn bridge(redis: &RedisServer, nats: &NatsServer, metrics: SocketAddr, args: &[&str]) -> Child {
    Command::new(BIN)
        .args([
            "bridge",
            "redis",
            "--redis",
            &redis.url(),
            "--nats",
            &nats.url(),
        ])
        .args(["--metrics-listen", &metrics.to_string(), "--log", "info"])
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("runcast bridge redis starts")
}

/// Runs a Python program with redis-py against `redis`.
fn python(redis: &RedisServer, program: &str) -> std::process::Child {
    std::process::Command::new("python3")
        .args(["-c", program])
        .env("REDIS_PORT", redis.port.to_string())
        .stdin(Stdio::null())
        .spawn()
        .expect("python3")
}

fn python_ok(redis: &RedisServer, program: &str) {
    let status = python(redis, program).wait().unwrap();
    assert!(status.success(), "the redis-py publisher failed");
}

async fn scrape(addr: SocketAddr) -> String {
    http(addr, "GET", "/metrics", &[], "").await.2
}

async fn wait_metric(addr: SocketAddr, name: &str, at_least: f64, within: Duration) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let v = metric(&scrape(addr).await, name).unwrap_or(0.0);
        if v >= at_least {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {v}, below {at_least}:\n{}",
            scrape(addr).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every stored event of `run`, in order (history pages of 1,000).
async fn history(gw: SocketAddr, run: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut since = 0;
    loop {
        let (status, _, body) = http(
            gw,
            "GET",
            &format!("/v1/runs/{run}/events?since={since}&limit=1000"),
            &[],
            "",
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let page: Value = serde_json::from_str(&body).unwrap();
        let events = page["events"].as_array().unwrap().clone();
        if events.is_empty() {
            return out;
        }
        since = page["next_since"].as_u64().unwrap();
        out.extend(events);
    }
}

/// What `XPENDING optio:events runcast-bridge` says (redis-cli): the
/// count of entries read and not acknowledged, first.
fn pending(redis: &RedisServer) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string()])
        .args(["XPENDING", "optio:events", "runcast-bridge"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn readyz(addr: SocketAddr) -> (u16, String) {
    let (status, _, body) = http(addr, "GET", "/readyz", &[], "").await;
    (status, body)
}

/// The migration's first step: the producers keep `PUBLISH`ing JSON to a
/// Redis channel, and a runcast client sees each message as a progress
/// event, in order. Bad messages are counted by reason and never stop the
/// bridge; a Redis outage shows in /readyz and ends on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_redis_publisher_reaches_runcast_clients() {
    let nats = NatsServer::start().await;
    let mut redis = RedisServer::start();
    let (gw, _gateway) = gateway(&nats).await;
    let m = free_addr();
    let _bridge = bridge(&redis, &nats, m, &["--channel", "optio:progress"]);
    wait_http_ok(m, "/readyz", "bridge").await;

    let mut client = WsClient::connect(&format!("ws://{gw}/v1/ws")).await;
    client.subscribe("r1", Some(0)).await;
    python_ok(
        &redis,
        r#"
import json, os, redis
r = redis.Redis(port=int(os.environ["REDIS_PORT"]))
for i in range(50):
    r.publish("optio:progress", json.dumps({"runId": "r1", "enqueued": 50, "processed": i}))
r.publish("optio:progress", "not json")
r.publish("optio:progress", json.dumps({"processed": 1}))
r.publish("optio:progress", json.dumps({"runId": "bad id!"}))
r.publish("optio:progress", json.dumps({"runId": "r1", "enqueued": 50, "processed": 50}))
"#,
    );
    let mut got = Vec::new();
    while got.len() < 51 {
        let f = tokio::time::timeout(Duration::from_secs(10), client.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} events arrived", got.len()));
        if f["type"] == "event" {
            assert_eq!(f["kind"], "progress", "{f}");
            got.push(f["data"]["processed"].as_u64().unwrap());
        }
    }
    assert_eq!(got, (0..=50).collect::<Vec<_>>(), "every message, in order");
    let scraped = scrape(m).await;
    for (reason, n) in [("not_json", 1.0), ("no_run", 1.0), ("invalid_run", 1.0)] {
        let name = format!("runcast_bridge_bad_messages_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(&scraped, &name), Some(n), "{scraped}");
    }
    assert_eq!(
        metric(&scraped, "runcast_bridge_published_total"),
        Some(51.0)
    );
    runcast_test_support::promtool_check_metrics(&scraped);

    // Redis goes away: not ready, and says why; back, and it resubscribes.
    redis.kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    let why = loop {
        let (status, body) = readyz(m).await;
        if status == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "still ready without Redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(why.contains("Redis"), "{why}");
    redis.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    while readyz(m).await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready again after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    python_ok(
        &redis,
        r#"
import json, os, redis
r = redis.Redis(port=int(os.environ["REDIS_PORT"]))
r.publish("optio:progress", json.dumps({"runId": "r1", "enqueued": 50, "processed": 51}))
"#,
    );
    let f = loop {
        let f = tokio::time::timeout(Duration::from_secs(10), client.recv())
            .await
            .expect("an event after Redis came back");
        if f["type"] == "event" {
            break f;
        }
    };
    assert_eq!(f["data"]["processed"], 51);
    assert!(metric(&scrape(m).await, "runcast_bridge_redis_reconnects_total").unwrap() >= 1.0);
}

/// Redis Streams through a consumer group are at-least-once end to end
/// and exactly-once in runcast: the bridge is killed (-9) while a
/// producer adds entries, a new one with the same consumer name reads
/// what the dead one had read and not acknowledged, and JetStream stores a
/// re-published entry once (its entry ID is the event's idempotency key).
/// Every entry ends in the run once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_bridge_on_a_stream_loses_and_repeats_nothing() {
    let nats = NatsServer::start().await;
    let redis = RedisServer::start();
    let (gw, _gateway) = gateway(&nats).await;
    let m = free_addr();
    let args = [
        "--stream",
        "optio:events",
        "--consumer",
        "bridge-0",
        "--run-pointer",
        "/job",
        "--kind-pointer",
        "/type",
        "--data-pointer",
        "/body",
    ];
    let mut first = bridge(&redis, &nats, m, &args);
    wait_http_ok(m, "/readyz", "bridge").await;
    const N: u64 = 400;
    let mut producer = python(
        &redis,
        &format!(
            r#"
import json, os, time, redis
r = redis.Redis(port=int(os.environ["REDIS_PORT"]))
for i in range({N}):
    r.xadd("optio:events", {{"data": json.dumps({{"job": "s1", "type": "progress", "body": {{"n": i}}}})}})
    if i % 20 == 0:
        time.sleep(0.01)
"#
        ),
    );
    wait_metric(
        m,
        "runcast_bridge_published_total",
        60.0,
        Duration::from_secs(30),
    )
    .await;
    first.start_kill().unwrap(); // kill -9, by PID
    first.wait().await.unwrap();
    eprintln!(
        "killed with pending entries: {}",
        pending(&redis).lines().next().unwrap_or("")
    );
    let _second = bridge(&redis, &nats, m, &args);
    assert!(producer.wait().unwrap().success());
    wait_http_ok(m, "/readyz", "bridge").await;

    let deadline = Instant::now() + Duration::from_secs(60);
    let events = loop {
        let events = history(gw, "s1").await;
        if events.len() as u64 >= N || Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ns: Vec<u64> = events
        .iter()
        .map(|e| e["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, (0..N).collect::<Vec<_>>(), "each entry once, in order");
    // Nothing left pending in the group.
    let pending = pending(&redis);
    assert!(
        pending.starts_with("0\n"),
        "entries left pending: {pending}"
    );
}
