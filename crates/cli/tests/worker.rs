//! `runcast worker`: demo jobs published to NATS, with the worker's own
//! metrics served for Prometheus; a worker only publishes, and gateways
//! fold and deliver what it published.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use runcast_test_support::{
    WsClient, http, metric as sample,
    nats::{NatsServer, free_addr},
    promtool_check_metrics, wait_http_ok,
};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_runcast");

/// `runcast worker` running two demo jobs on `nats`, metrics on `metrics`.
fn worker(nats: &NatsServer, metrics: SocketAddr) -> tokio::process::Child {
    Command::new(BIN)
        .args([
            "worker",
            "--nats",
            &nats.url(),
            "--jobs",
            "2",
            "--log",
            "warn",
        ])
        .args(["--metrics-listen", &metrics.to_string()])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("runcast worker starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_publishes_demo_jobs_and_serves_its_metrics() {
    let nats = NatsServer::start().await;
    let metrics: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let _worker = worker(&nats, metrics);

    // Its jobs publish within a few seconds; the metrics say so.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let scrape = loop {
        if let Ok(Ok(tcp)) = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(metrics),
        )
        .await
        {
            drop(tcp);
            let (status, _, body) = http(metrics, "GET", "/metrics", &[], "").await;
            assert_eq!(status, 200, "{body}");
            let acked = sample(&body, "runcast_publish_ack_seconds_count").unwrap_or(0.0);
            if sample(&body, "runcast_events_published_total").unwrap_or(0.0) >= 5.0 && acked > 0.0
            {
                break body;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker published nothing within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        sample(
            &scrape,
            r#"runcast_publish_errors_total{reason="unavailable"}"#
        ),
        Some(0.0)
    );
    assert!(sample(&scrape, "process_resident_memory_bytes").unwrap_or(0.0) > 0.0);
    promtool_check_metrics(&scrape);

    // What the worker published is in the stream, under its own run names.
    let jsz = nats.monitor_json("/jsz?streams=true").await;
    let stored = jsz["account_details"][0]["stream_detail"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "RUNCAST_EVENTS")
        .map(|s| s["state"]["messages"].as_u64().unwrap_or(0))
        .unwrap_or(0);
    assert!(stored >= 5, "events stored: {stored}");

    assert_eq!(http(metrics, "GET", "/healthz", &[], "").await.0, 200);
    assert_eq!(http(metrics, "GET", "/nope", &[], "").await.0, 404);
    assert_eq!(http(metrics, "POST", "/metrics", &[], "").await.0, 405);
}

/// The JSON `/jsz` reports for the stream `name`, if it exists.
async fn stream_detail(nats: &NatsServer, name: &str) -> Option<serde_json::Value> {
    let jsz = nats
        .monitor_json("/jsz?streams=true&consumers=true&config=true")
        .await;
    jsz["account_details"][0]["stream_detail"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
}

fn consumer_names(stream: &serde_json::Value) -> Vec<String> {
    stream["consumer_detail"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A worker pod only publishes (docs/publishing.md: workers never write run
/// state). With the worker alone on NATS, its events are stored, and nothing
/// that belongs to the gateways exists: no run state bucket, no consumer on
/// the events stream (neither the state folder's nor a watch). A gateway
/// started afterwards folds the worker's runs and delivers their events,
/// from the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_only_publishes_and_a_gateway_started_later_folds_and_delivers_its_runs() {
    let nats = NatsServer::start().await;
    let worker = worker(&nats, free_addr());
    let runs_prefix = format!("w{}-", worker.id().expect("the worker runs"));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let events = loop {
        if let Some(s) = stream_detail(&nats, "RUNCAST_EVENTS").await
            && s["state"]["messages"].as_u64().unwrap_or(0) >= 5
        {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker stored no events within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // A bus would have set up its bucket and consumers before its first
    // publish; a moment more, for anything started after it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let events = stream_detail(&nats, "RUNCAST_EVENTS")
        .await
        .unwrap_or(events);
    assert_eq!(
        consumer_names(&events),
        Vec::<String>::new(),
        "a worker creates no consumer: {events}"
    );
    assert_eq!(events["state"]["consumer_count"], 0, "{events}");
    assert!(
        stream_detail(&nats, "KV_RUNCAST_RUNS").await.is_none(),
        "a worker writes no run state, so it needs no bucket"
    );

    // A gateway takes over what gateways do: the bucket, the folder, and
    // the worker's runs, delivered from their first event.
    let gw = free_addr();
    let gateway_started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let _gateway = Command::new(BIN)
        .args(runcast_test_support::open_gateway_args(gw, &nats.url()))
        .args(["--log", "warn"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("runcast gateway starts");
    wait_http_ok(gw, "/readyz", "gateway").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (run, state) = loop {
        let (_, _, body) = http(gw, "GET", "/v1/runs", &[], "").await;
        let listed = serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default();
        let found = listed["runs"].as_array().and_then(|runs| {
            runs.iter()
                .find(|r| {
                    r["run"]
                        .as_str()
                        .is_some_and(|r| r.starts_with(&runs_prefix))
                })
                .cloned()
        });
        if let Some(s) = found {
            break (s["run"].as_str().unwrap().to_owned(), s);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway folded none of the worker's runs ({runs_prefix}*) within 30 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(state["events"].as_u64().unwrap_or(0) >= 1, "{state}");
    let events = stream_detail(&nats, "RUNCAST_EVENTS").await.unwrap();
    assert!(
        consumer_names(&events).contains(&"fold_RUNCAST_RUNS".to_owned()),
        "the gateway folds: {events}"
    );
    assert!(stream_detail(&nats, "KV_RUNCAST_RUNS").await.is_some());

    let mut client = WsClient::connect(&format!("ws://{gw}/v1/ws")).await;
    client.subscribe(&run, Some(0)).await;
    let first = loop {
        let f = tokio::time::timeout(Duration::from_secs(10), client.recv())
            .await
            .expect("the worker's events are delivered");
        if f["type"] == "event" {
            break f;
        }
    };
    assert_eq!(first["run"], run.as_str(), "{first}");
    assert_eq!(
        first["ts"], state["started_ts"],
        "delivered from the run's first event: {first} / {state}"
    );
    assert!(
        first["ts"].as_u64().unwrap() < gateway_started,
        "published while no gateway ran: {first}"
    );
}

/// docs/security.md: the demo worker needs the worker's NATS permissions
/// plus the stream calls it lists, and nothing more. A worker user with
/// exactly those sets up the stream and publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_runs_with_the_documented_nats_permissions() {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/security.md"),
    )
    .unwrap();
    let stream_calls = [
        "$JS.API.STREAM.INFO.RUNCAST_EVENTS",
        "$JS.API.STREAM.CREATE.RUNCAST_EVENTS",
        "$JS.API.STREAM.UPDATE.RUNCAST_EVENTS",
    ];
    for call in stream_calls {
        assert!(
            doc.contains(&format!("`{call}`")),
            "docs/security.md lists {call}"
        );
    }
    let allowed: Vec<String> = std::iter::once("runcast.runs.>")
        .chain(stream_calls)
        .map(|s| format!("\"{s}\""))
        .collect();
    let nats = NatsServer::start_with(&format!(
        "authorization {{ users = [ {{ user: demo, password: \"dpass\", permissions: {{ \
         publish: {{ allow: [{}] }}, subscribe: {{ allow: [\"_INBOX.>\"] }} }} }} ] }}",
        allowed.join(", ")
    ))
    .await;
    let _worker = Command::new(BIN)
        .args([
            "worker",
            "--nats",
            &nats.url(),
            "--jobs",
            "1",
            "--log",
            "warn",
        ])
        .args(["--nats-user", "demo", "--nats-password", "dpass"])
        .args(["--metrics-listen", &free_addr().to_string()])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("runcast worker starts");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stored = stream_detail(&nats, "RUNCAST_EVENTS")
            .await
            .map_or(0, |s| s["state"]["messages"].as_u64().unwrap_or(0));
        if stored >= 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "with the documented permissions the worker stored {stored} events within 30 s; NATS log:\n{}",
            nats.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
