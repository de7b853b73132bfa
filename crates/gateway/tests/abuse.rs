//! Abuse alongside a healthy client. While events are published to one run,
//! other addresses try every abuse the gateway limits: a foreign Origin, too
//! many sessions, sessions opened too fast, too many subscriptions, frames
//! over both size limits, silent and trickling connections (slow loris), a
//! trickled publish body and an oversized one. Each gets its documented
//! answer, counted in metrics, and the healthy client, on its own address,
//! receives every event in order without a disconnect.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use runcast_bus::Retention;
use runcast_core::{EventKind, NewEvent, RunId};
use runcast_gateway::Config;
use runcast_test_support::{TestGateway, WsClient, json, metric, seqs, tcp_from};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ORIGIN: &str = "https://app.example";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Reads until the server closes the connection; returns what it sent and
/// how long that took. Panics if it stays open for 10 s.
async fn until_closed(tcp: &mut tokio::net::TcpStream) -> (String, Duration) {
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await {
            Err(_) => panic!("connection still open after 10 s"),
            Ok(Ok(0) | Err(_)) => {
                return (String::from_utf8_lossy(&got).into_owned(), t0.elapsed());
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Slow loris in three forms, each on its own connections from `src`: some
/// send nothing, some send their headers a byte at a time, one trickles a
/// publish body. Every one is cut off near its timeout (1 s here).
async fn slow_loris(src: IpAddr, addr: SocketAddr) {
    let silent = (0..20).map(|_| async move {
        let mut tcp = tcp_from(src, addr).await;
        until_closed(&mut tcp).await
    });
    let trickling = (0..20).map(|_| async move {
        let t0 = Instant::now();
        let mut tcp = tcp_from(src, addr).await;
        tcp.write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        // One byte every 250 ms; a write fails soon after the server hangs up.
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if tcp.write_all(b"X").await.is_err() {
                break;
            }
        }
        let (got, _) = until_closed(&mut tcp).await;
        (got, t0.elapsed())
    });
    let (silent, trickling) = tokio::join!(
        futures_util::future::join_all(silent),
        futures_util::future::join_all(trickling)
    );
    for (got, took) in silent {
        assert!(got.is_empty(), "a silent connection got {got:?}");
        assert!(
            took < Duration::from_secs(3),
            "silent connection open {took:?}"
        );
    }
    for (_, took) in trickling {
        assert!(
            took < Duration::from_secs(4),
            "trickling connection open {took:?}"
        );
    }

    // A publish whose body arrives 10 bytes every 300 ms: 408, then closed.
    let mut tcp = tcp_from(src, addr).await;
    tcp.write_all(
        b"POST /v1/runs/loris/events HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n",
    )
    .await
    .unwrap();
    let t0 = Instant::now();
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        for _ in 0..30 {
            if wr.write_all(b"          ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf)).await {
            Err(_) => panic!("trickled publish still open after 10 s"),
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    writer.abort();
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("request_timeout"), "{got}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_abuse_gets_its_answer_and_a_healthy_client_loses_nothing() {
    let gw = TestGateway::with(
        Config {
            allowed_origins: vec![ORIGIN.into()],
            max_sessions_per_ip: 3,
            session_rate_per_ip: 2.0,
            max_subscriptions: 4,
            max_frame_bytes: 1024,
            hard_frame_bytes: 8 << 10,
            max_publish_bytes: 4096,
            header_read_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            ..Config::default()
        },
        Retention::default(),
    )
    .await;
    let addr = gw.addr;
    let run = RunId::parse("healthy").unwrap();

    let mut healthy = WsClient::connect_from(ip("127.0.0.2"), addr, &[("origin", ORIGIN)])
        .await
        .unwrap();
    healthy.subscribe("healthy", None).await;

    // Publishes every 5 ms until the abuse is over (at most 4,000 events).
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (bus, stop, published, run) = (gw.bus(), stop.clone(), published.clone(), run.clone());
        tokio::spawn(async move {
            for i in 0..4000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let ev = NewEvent::json(EventKind::Progress, &json!({ "i": i })).unwrap();
                bus.publish(&run, vec![ev]).await.unwrap();
                published.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // The healthy client reads all along, so its queue never backs up.
    let reader = tokio::spawn(async move {
        let mut frames = Vec::new();
        loop {
            let f = healthy.recv().await;
            if f["type"] == "event" {
                let done = f["data"]["i"] == "stop";
                frames.push(f);
                if done {
                    return frames;
                }
            } else {
                panic!("the healthy client got {f}");
            }
        }
    });

    // Cross-site WebSocket hijacking: 403 before the upgrade.
    let (status, _, body) =
        WsClient::connect_from(ip("127.0.0.3"), addr, &[("origin", "https://evil.example")])
            .await
            .err()
            .unwrap();
    assert_eq!(
        (status, json(&body)["error"]["code"].clone()),
        (403, json!("forbidden"))
    );

    // Per-address cap: the fourth session from one address gets 429.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            WsClient::connect_from(ip("127.0.0.4"), addr, &[])
                .await
                .unwrap(),
        );
    }
    let (status, headers, body) = WsClient::connect_from(ip("127.0.0.4"), addr, &[])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 429, "{body}");
    assert_eq!(json(&body)["error"]["code"], "rate_limited");
    assert!(headers.contains_key("retry-after"));
    drop(held);

    // Connection rate: 2/s with a burst of 4; the fifth quick one is refused.
    let mut refused = 0;
    for _ in 0..8 {
        match WsClient::connect_from(ip("127.0.0.5"), addr, &[]).await {
            Ok(c) => drop(c),
            Err((status, _, body)) => {
                assert_eq!(status, 429, "{body}");
                refused += 1;
            }
        }
    }
    assert!(refused >= 3, "{refused} of 8 refused");

    // Subscription cap: the fifth subscription is refused, the session stays.
    let mut subs = WsClient::connect_from(ip("127.0.0.6"), addr, &[])
        .await
        .unwrap();
    for r in ["s1", "s2", "s3", "s4"] {
        subs.subscribe(r, None).await;
    }
    subs.send(json!({"type": "subscribe", "run": "s5"})).await;
    assert_eq!(subs.recv().await["code"], "too_many_subscriptions");
    subs.send(json!({"type": "unsubscribe", "run": "s1"})).await;
    assert_eq!(subs.recv().await["type"], "unsubscribed");
    subs.subscribe("s5", None).await;

    // Frames: over the soft limit an error frame, over the hard one close 1009.
    let mut big = WsClient::connect_from(ip("127.0.0.7"), addr, &[])
        .await
        .unwrap();
    big.send_text(&format!(
        r#"{{"type":"subscribe","run":"x","pad":"{}"}}"#,
        "p".repeat(2000)
    ))
    .await;
    assert_eq!(big.recv().await["code"], "too_large");
    big.subscribe("still-usable", None).await;
    big.send_text(&"z".repeat(20 << 10)).await;
    assert_eq!(big.read_until_close().await.0, Some(1009));

    // A publish body over the limit: 413, and the healthy run is untouched.
    let (status, _, body) = runcast_test_support::http(
        addr,
        "POST",
        "/v1/runs/flood/events",
        &[("content-type", "application/json")],
        format!(r#"{{"kind":"log","data":"{}"}}"#, "f".repeat(8000)),
    )
    .await;
    assert_eq!(
        (status, json(&body)["error"]["code"].clone()),
        (413, json!("too_large"))
    );

    slow_loris(ip("127.0.0.8"), addr).await;

    stop.store(true, Ordering::Relaxed);
    publisher.await.unwrap();
    let last = NewEvent::json(EventKind::Complete, &json!({ "i": "stop" })).unwrap();
    gw.bus().publish(&run, vec![last]).await.unwrap();
    let n = published.load(Ordering::Relaxed) + 1;
    let frames = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the healthy client got the last event")
        .unwrap();
    assert!(n > 300, "only {n} events were published during the abuse");
    assert_eq!(seqs(&frames, "healthy"), (1..=n).collect::<Vec<u64>>());

    let m = gw.gw.metrics.render();
    let count = |name: &str| metric(&m, name).unwrap_or(0.0);
    assert!(
        count(r#"runcast_refused_sessions_total{reason="per_ip"}"#) >= 1.0,
        "{m}"
    );
    assert!(
        count(r#"runcast_refused_sessions_total{reason="rate"}"#) >= 3.0,
        "{m}"
    );
    assert!(
        count(r#"runcast_protocol_errors_total{code="forbidden"}"#) >= 1.0,
        "{m}"
    );
    assert!(count(r#"runcast_protocol_errors_total{code="too_many_subscriptions"}"#) >= 1.0);
    assert!(count(r#"runcast_protocol_errors_total{code="too_large"}"#) >= 1.0);
    assert!(count(r#"runcast_closes_total{code="1009"}"#) >= 1.0, "{m}");
    assert!(
        count(r#"runcast_timeouts_total{stage="handshake"}"#) >= 20.0,
        "{m}"
    );
    assert_eq!(
        count(r#"runcast_timeouts_total{stage="request_body"}"#),
        1.0,
        "{m}"
    );
}

/// The handshake deadline runs from accept, so a connection that has sent
/// nothing is closed after `handshake_timeout` even when the header timeout
/// is long; one that sent a request in time is not cut off by it.
#[tokio::test]
async fn a_silent_connection_is_closed_at_the_handshake_timeout() {
    let gw = TestGateway::with(
        Config {
            header_read_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_millis(500),
            ..Config::default()
        },
        Retention::default(),
    )
    .await;
    let mut silent = tcp_from(ip("127.0.0.1"), gw.addr).await;
    let (_, took) = until_closed(&mut silent).await;
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // A WebSocket that upgraded in time lives on past the deadline.
    let mut c = WsClient::connect(&gw.ws_url()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    c.subscribe("after-deadline", None).await;
}
