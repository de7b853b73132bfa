//! `runcast worker`: demo jobs published to NATS, with the worker's own
//! metrics served for Prometheus.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use runcast_test_support::{http, metric as sample, nats::NatsServer, promtool_check_metrics};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_runcast");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_publishes_demo_jobs_and_serves_its_metrics() {
    let nats = NatsServer::start().await;
    let metrics: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let _worker = Command::new(BIN)
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
        .expect("runcast worker starts");

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
