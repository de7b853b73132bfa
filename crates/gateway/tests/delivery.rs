//! Delivery guarantees over real sockets: order, exactly-once, resume, gaps,
//! late joiners, many clients, slow consumers, SSE and shutdown.

use std::{sync::Arc, time::Duration};

use runcast_bus::{Bus, Retention};
use runcast_core::{EventKind, NewEvent, RunId};
use runcast_gateway::Config;
use runcast_test_support::{SseReader, TestGateway, WAIT, WsClient, http, json, seqs};
use runcast_worker::Publisher;
use serde_json::{Value, json};

fn run(s: &str) -> RunId {
    RunId::parse(s).unwrap()
}

async fn publish_n(bus: &Arc<dyn Bus>, r: &str, from: u64, to: u64) {
    let r = run(r);
    for i in from..=to {
        bus.publish(
            &r,
            vec![NewEvent::json(EventKind::Progress, &json!({"i": i})).unwrap()],
        )
        .await
        .unwrap();
    }
}

/// Reads frames until `n` events of `run` arrived (ignoring other frames).
async fn collect_events(c: &mut WsClient, want: &[(&str, usize)]) -> Vec<Value> {
    let mut frames = Vec::new();
    let total: usize = want.iter().map(|(_, n)| n).sum();
    let mut got = 0;
    while got < total {
        let f = c.recv().await;
        assert_ne!(f["type"], "error", "unexpected error frame {f}");
        if f["type"] == "event" {
            got += 1;
        }
        frames.push(f);
    }
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_clients_get_every_event_once_in_order_across_runs_and_publishers() {
    let gw = TestGateway::start().await;
    let runs = ["alpha", "beta", "gamma"];
    let mut clients = Vec::new();
    for i in 0..6 {
        let mut c = WsClient::connect(&gw.ws_url()).await;
        // Client i watches two of the three runs on one connection.
        let mine = [runs[i % 3], runs[(i + 1) % 3]];
        for r in mine {
            let st = c.subscribe(r, None).await;
            assert_eq!(st["seq"], 0);
            assert_eq!(st["state"], Value::Null, "no events yet");
        }
        clients.push((c, mine));
    }
    // Two publishers per run, interleaving.
    const PER_PUBLISHER: u64 = 150;
    let mut pubs = Vec::new();
    for r in runs {
        for p in 0..2 {
            let publ = Publisher::on_bus(gw.bus(), r).unwrap();
            pubs.push(tokio::spawn(async move {
                for i in 0..PER_PUBLISHER {
                    publ.custom("tick", &json!({"publisher": p, "i": i}))
                        .await
                        .unwrap();
                }
            }));
        }
    }
    for p in pubs {
        p.await.unwrap();
    }
    let n = (2 * PER_PUBLISHER) as usize;
    for (c, mine) in &mut clients {
        let frames = collect_events(c, &[(mine[0], n), (mine[1], n)]).await;
        for r in mine.iter() {
            assert_eq!(
                seqs(&frames, r),
                (1..=n as u64).collect::<Vec<_>>(),
                "run {r}: every seq once, in order"
            );
            // Each publisher's own events keep their order.
            for p in 0..2 {
                let is: Vec<u64> = frames
                    .iter()
                    .filter(|f| f["run"] == *r && f["data"]["publisher"] == p)
                    .map(|f| f["data"]["i"].as_u64().unwrap())
                    .collect();
                assert_eq!(is, (0..PER_PUBLISHER).collect::<Vec<_>>());
            }
        }
    }
    let metrics = gw.gw.metrics.render();
    assert!(metrics.contains("runcast_watched_runs 3"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_disconnect_loses_and_duplicates_nothing() {
    let gw = TestGateway::start().await;
    let bus = gw.bus();
    publish_n(&bus, "job", 1, 10).await;
    let mut c = WsClient::connect(&gw.ws_url()).await;
    c.subscribe("job", Some(0)).await;
    let first = collect_events(&mut c, &[("job", 10)]).await;
    let last = *seqs(&first, "job").last().unwrap();
    assert_eq!(last, 10);
    // Keep publishing while the client is away, and while it reconnects.
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move { publish_n(&bus, "job", 11, 400).await })
    };
    c.ws.close(None).await.unwrap();
    drop(c);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut c = WsClient::connect(&gw.ws_url()).await;
    c.subscribe("job", Some(last)).await;
    let rest = collect_events(&mut c, &[("job", 390)]).await;
    publisher.await.unwrap();
    let mut all = seqs(&first, "job");
    all.extend(seqs(&rest, "job"));
    assert_eq!(
        all,
        (1..=400).collect::<Vec<u64>>(),
        "resume must be seamless"
    );
    // Nothing extra arrives afterwards.
    c.send(json!({"type":"ping"})).await;
    assert_eq!(
        c.recv().await["type"],
        "pong",
        "no duplicate events after the last one"
    );
}

#[tokio::test]
async fn resume_past_retention_gets_an_explicit_gap() {
    let gw = TestGateway::with(
        Config::default(),
        Retention {
            max_events_per_run: 5,
            ..Retention::default()
        },
    )
    .await;
    publish_n(&gw.bus(), "short", 1, 20).await;
    let mut c = WsClient::connect(&gw.ws_url()).await;
    c.subscribe("short", Some(2)).await;
    let gap = c.recv().await;
    assert_eq!(
        (
            gap["type"].as_str(),
            gap["from"].as_u64(),
            gap["to"].as_u64()
        ),
        (Some("gap"), Some(3), Some(15)),
        "{gap}"
    );
    let frames = collect_events(&mut c, &[("short", 5)]).await;
    assert_eq!(seqs(&frames, "short"), vec![16, 17, 18, 19, 20]);
    // HTTP history reports the same gap.
    let (status, _, body) = http(gw.addr, "GET", "/v1/runs/short/events?since=2", &[], "").await;
    let v = json(&body);
    assert_eq!(status, 200);
    assert_eq!(v["gap"], json!({"from": 3, "to": 15}));
    assert_eq!(v["events"][0]["seq"], 16);
    assert!(
        gw.gw
            .metrics
            .render()
            .contains("runcast_gap_notices_total 1")
    );
}

#[tokio::test]
async fn late_joiner_receives_current_state_first() {
    let gw = TestGateway::start().await;
    let p = Publisher::on_bus(gw.bus(), "build-7").unwrap();
    p.status("compiling").await.unwrap();
    for d in 1..=3 {
        p.progress(d, 10).await.unwrap();
    }
    let mut c = WsClient::connect(&gw.ws_url()).await;
    let st = c.subscribe("build-7", None).await;
    assert_eq!(st["seq"], 4);
    assert_eq!(st["state"]["percent"], 30.0);
    assert_eq!(st["state"]["status"], "running");
    assert_eq!(st["state"]["progress"], json!({"done": 3, "total": 10}));
    assert_eq!(st["state"]["last_status"], json!({"state": "compiling"}));
    p.progress(4, 10).await.unwrap();
    let ev = c.recv().await;
    assert_eq!(
        (ev["type"].as_str(), ev["seq"].as_u64()),
        (Some("event"), Some(5)),
        "live continues after state: {ev}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_on_one_run_all_receive_every_event() {
    let gw = TestGateway::start().await;
    let url = gw.ws_url();
    let mut clients = Vec::new();
    for _ in 0..1000 {
        let mut c = WsClient::connect(&url).await;
        c.subscribe("popular", None).await;
        clients.push(c);
    }
    assert_eq!(
        gw.gw.hub.watched_runs(),
        1,
        "one bus watch for 1,000 subscribers"
    );
    publish_n(&gw.bus(), "popular", 1, 50).await;
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let frames = collect_events(&mut c, &[("popular", 50)]).await;
                seqs(&frames, "popular")
            })
        })
        .collect();
    for r in readers {
        assert_eq!(r.await.unwrap(), (1..=50).collect::<Vec<u64>>());
    }
    let m = gw.gw.metrics.render();
    assert!(m.contains("runcast_events_delivered_total 50000"), "{m}");
    assert!(
        m.contains("runcast_events_received_total{source=\"embedded\"} 50"),
        "{m}"
    );
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_cut_off_with_resumable_code_and_resumes_without_loss() {
    let config = Config {
        queue_messages: 1024,
        queue_bytes: 1 << 20,
        close_timeout: Duration::from_secs(30),
        ..Config::default()
    };
    // History keeps 2,000 events (8 MiB) so the slow client can resume.
    let gw = TestGateway::with(
        config,
        Retention {
            max_events_per_run: 2000,
            ..Retention::default()
        },
    )
    .await;
    let mut slow = WsClient::connect(&gw.ws_url()).await;
    slow.subscribe("firehose", None).await;
    let mut fast = WsClient::connect(&gw.ws_url()).await;
    fast.subscribe("firehose", None).await;

    let before = rss_kib();
    const N: u64 = 20_000;
    let payload = "x".repeat(4000);
    let bus = gw.bus();
    let publisher = tokio::spawn(async move {
        let r = run("firehose");
        for i in 1..=N {
            bus.publish(
                &r,
                vec![NewEvent::json(EventKind::Log, &json!({"i": i, "pad": payload})).unwrap()],
            )
            .await
            .unwrap();
            // ~20,000 events/s (80 MB/s): fast, but a rate a reading client sustains.
            if i % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    // The fast client keeps up with all 20,000 (80 MB) while `slow` reads nothing.
    let mut next = 1;
    let mut peak = 0;
    while next <= N {
        let f = fast.recv().await;
        if f["type"] == "event" {
            assert_eq!(f["seq"], next, "fast client must see every event in order");
            next += 1;
            if next % 1000 == 0 {
                peak = peak.max(rss_kib());
            }
        }
    }
    publisher.await.unwrap();
    let growth_mib = peak.saturating_sub(before) / 1024;
    assert!(
        growth_mib < 64,
        "RSS grew {growth_mib} MiB while 80 MB flowed past a stalled client"
    );
    let m = gw.gw.metrics.render();
    assert!(
        m.contains("runcast_slow_consumer_disconnects_total 1"),
        "{m}"
    );

    let (code, frames) = slow.read_until_close().await;
    assert_eq!(code, Some(4000), "slow consumer close code");
    let got = seqs(&frames, "firehose");
    let last = *got
        .last()
        .expect("the slow client got some events before it stalled");
    assert_eq!(
        got,
        (1..=last).collect::<Vec<u64>>(),
        "what it got is contiguous"
    );
    assert!(last < N);

    // It resumes from its cursor: retention holds the last 2,000 events, so
    // a client this far behind gets an explicit gap, then the rest.
    let mut again = WsClient::connect(&gw.ws_url()).await;
    again.subscribe("firehose", Some(last)).await;
    let first = again.recv().await;
    let mut expect = last + 1;
    if first["type"] == "gap" {
        assert_eq!(first["from"], last + 1);
        expect = first["to"].as_u64().unwrap() + 1;
    } else {
        assert_eq!(first["seq"], expect);
        expect += 1;
    }
    while expect <= N {
        let f = again.recv().await;
        assert_eq!(f["seq"], expect, "resumed stream is contiguous");
        expect += 1;
    }
}

#[tokio::test]
async fn resume_within_retention_after_slow_disconnect_has_no_gap() {
    let config = Config {
        queue_messages: 16,
        queue_bytes: 1 << 20,
        close_timeout: Duration::from_secs(30),
        ..Config::default()
    };
    let gw = TestGateway::with(config, Retention::default()).await;
    let mut slow = WsClient::connect(&gw.ws_url()).await;
    slow.subscribe("r", None).await;
    // Enough to overflow 16 queued frames and the socket buffers.
    let big = "y".repeat(16 << 10);
    let bus = gw.bus();
    for i in 1..=400u64 {
        bus.publish(
            &run("r"),
            vec![NewEvent::json(EventKind::Log, &json!({"i": i, "pad": big})).unwrap()],
        )
        .await
        .unwrap();
        tokio::task::yield_now().await;
    }
    let (code, frames) = slow.read_until_close().await;
    assert_eq!(code, Some(4000));
    let last = seqs(&frames, "r").last().copied().unwrap_or(0);
    let mut again = WsClient::connect(&gw.ws_url()).await;
    again.subscribe("r", Some(last)).await;
    let rest = collect_events(&mut again, &[("r", (400 - last) as usize)]).await;
    assert!(
        rest.iter().all(|f| f["type"] == "event"),
        "no gap within retention"
    );
    assert_eq!(seqs(&rest, "r"), ((last + 1)..=400).collect::<Vec<u64>>());
}

#[tokio::test]
async fn heartbeat_closes_a_silent_peer_with_resumable_code() {
    let config = Config {
        heartbeat_interval: Duration::from_millis(100),
        heartbeat_timeout: Duration::from_millis(100),
        ..Config::default()
    };
    let gw = TestGateway::with(config, Retention::default()).await;
    // A peer that never reads never answers pings.
    let mut c = WsClient::connect(&gw.ws_url()).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (code, _) = c.read_until_close().await;
    assert_eq!(code, Some(4001));
    // A peer that reads (and so answers pings) stays connected.
    let mut alive = WsClient::connect(&gw.ws_url()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(600);
    let mut pings = 0;
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(m)) = tokio::time::timeout(
            Duration::from_millis(50),
            futures_util::StreamExt::next(&mut alive.ws),
        )
        .await
        {
            match m.unwrap() {
                tokio_tungstenite::tungstenite::Message::Ping(_) => pings += 1,
                tokio_tungstenite::tungstenite::Message::Close(c) => {
                    panic!("live peer closed: {c:?}")
                }
                _ => {}
            }
        }
    }
    assert!(pings >= 3, "server pings every interval (saw {pings})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_state_and_events_and_resumes_with_last_event_id() {
    let gw = TestGateway::start().await;
    publish_n(&gw.bus(), "sse-run", 1, 5).await;
    let (status, mut s) = SseReader::open(gw.addr, "/v1/runs/sse-run/stream", None).await;
    assert_eq!(status, 200);
    let (id, state) = s.next().await.unwrap();
    assert_eq!(
        (id, state["type"].as_str(), state["seq"].as_u64()),
        (Some(5), Some("state"), Some(5))
    );
    publish_n(&gw.bus(), "sse-run", 6, 10).await;
    let mut last = 0;
    for want in 6..=10 {
        let (id, ev) = s.next().await.unwrap();
        assert_eq!((id, ev["seq"].as_u64()), (Some(want), Some(want)));
        last = want;
    }
    drop(s); // the browser loses the connection
    publish_n(&gw.bus(), "sse-run", 11, 20).await;
    let (_, mut s) = SseReader::open(gw.addr, "/v1/runs/sse-run/stream", Some(last)).await;
    assert_eq!(s.next().await.unwrap().1["type"], "state");
    for want in 11..=20 {
        let (id, ev) = s.next().await.unwrap();
        assert_eq!(
            (id, ev["type"].as_str(), ev["seq"].as_u64()),
            (Some(want), Some("event"), Some(want)),
            "{ev}"
        );
    }
    // A bad cursor is a clear 400, not a stream.
    let (status, _, body) = http(
        gw.addr,
        "GET",
        "/v1/runs/sse-run/stream",
        &[("last-event-id", "abc")],
        "",
    )
    .await;
    assert_eq!(
        (status, json(&body)["error"]["code"].as_str()),
        (400, Some("invalid_since"))
    );
    // So is a cursor past the run's head, by header or query, before any
    // stream starts (an outside client got a 200 stream with an error).
    for (path, header) in [
        ("/v1/runs/sse-run/stream", Some("21")),
        ("/v1/runs/sse-run/stream?since=99", None),
    ] {
        let headers: Vec<(&str, &str)> = header.map(|h| ("last-event-id", h)).into_iter().collect();
        let (status, hdrs, body) = http(gw.addr, "GET", path, &headers, "").await;
        assert_eq!(
            (status, json(&body)["error"]["code"].as_str()),
            (400, Some("since_out_of_range")),
            "{path} {header:?}: {body}"
        );
        assert_ne!(hdrs["content-type"], "text/event-stream");
    }
    let (status, _, body) = http(gw.addr, "GET", "/v1/runs/a.b/stream", &[], "").await;
    assert_eq!(
        (status, json(&body)["error"]["code"].as_str()),
        (400, Some("invalid_run_id"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_fails_readiness_closes_clients_resumably_and_finishes_in_time() {
    let config = Config {
        drain_delay: Duration::from_millis(300),
        drain_timeout: Duration::from_secs(3),
        ..Config::default()
    };
    let mut gw = TestGateway::with(config, Retention::default()).await;
    let (status, _, _) = http(gw.addr, "GET", "/readyz", &[], "").await;
    assert_eq!(status, 200);
    let mut c = WsClient::connect(&gw.ws_url()).await;
    c.subscribe("r", None).await;
    let (_, mut sse) = SseReader::open(gw.addr, "/v1/runs/r/stream", None).await;
    assert_eq!(sse.next().await.unwrap().1["type"], "state");

    let started = tokio::time::Instant::now();
    let done = gw.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // During the drain delay: still accepting, but not ready.
    let (status, _, body) = http(gw.addr, "GET", "/readyz", &[], "").await;
    assert_eq!(
        (status, json(&body)["error"]["code"].as_str()),
        (503, Some("draining"))
    );
    let (code, _) = c.read_until_close().await;
    assert_eq!(code, Some(1001), "clients are told to reconnect and resume");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "clients are closed only after the drain delay"
    );
    assert!(
        sse.next().await.is_none(),
        "SSE streams end so EventSource reconnects"
    );
    tokio::time::timeout(Duration::from_secs(5), done)
        .await
        .expect("shutdown within bounds")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        tokio::net::TcpStream::connect(gw.addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_interest_follows_distinct_runs_not_clients() {
    let gw = TestGateway::start().await;
    let mut clients = Vec::new();
    for i in 0..50 {
        let mut c = WsClient::connect(&gw.ws_url()).await;
        c.subscribe(&format!("run-{}", i % 5), None).await;
        clients.push(c);
    }
    assert_eq!(
        gw.gw.hub.watched_runs(),
        5,
        "50 clients on 5 runs hold 5 bus watches"
    );
    assert!(gw.gw.metrics.render().contains("runcast_subscriptions 50"));

    // Unsubscribing stops delivery for that run only.
    let c = &mut clients[0];
    c.send(json!({"type": "unsubscribe", "run": "run-0"})).await;
    assert_eq!(
        c.recv().await,
        json!({"type": "unsubscribed", "run": "run-0"})
    );
    c.subscribe("run-1", None).await;
    publish_n(&gw.bus(), "run-0", 1, 3).await;
    publish_n(&gw.bus(), "run-1", 1, 1).await;
    let f = c.recv().await;
    assert_eq!(
        (f["run"].as_str(), f["seq"].as_u64()),
        (Some("run-1"), Some(1)),
        "nothing from run-0 after unsubscribe: {f}"
    );

    // When every client is gone, every watch is released.
    for c in clients {
        drop(c);
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while gw.gw.hub.watched_runs() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watches not released: {}",
            gw.gw.hub.watched_runs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let m = gw.gw.metrics.render();
    assert!(
        m.contains("runcast_subscriptions 0") && m.contains("runcast_watched_runs 0"),
        "{m}"
    );
}

/// Every `id:` an SSE stream sends is a safe cursor: cut the stream right
/// after any message, resume with the last id received, and every event
/// still arrives exactly once, in order. An outside client found that a
/// resume's state message carried the run's head as its id before the
/// replay, so a cut right after it lost the replayed events silently.
#[tokio::test]
async fn sse_cut_after_any_message_resumes_exactly_once_in_order() {
    let gw = TestGateway::start().await;
    publish_n(&gw.bus(), "cuts", 1, 10).await;
    // Every starting point: fresh, and resumes from each cursor.
    for start in [None, Some(0), Some(3), Some(6), Some(9)] {
        // Messages a first connection reads before it is cut: 1 is right
        // after the state message.
        let total = 1 + 10 - start.unwrap_or(10) as usize;
        for cut_after in 1..=total {
            let path = match start {
                Some(s) => format!("/v1/runs/cuts/stream?since={s}"),
                None => "/v1/runs/cuts/stream".to_owned(),
            };
            let (_, mut s) = SseReader::open(gw.addr, &path, None).await;
            let mut got = Vec::new();
            let mut last_id = None;
            for _ in 0..cut_after {
                let (id, f) = s.next().await.expect("message before the cut");
                if f["type"] == "event" {
                    got.push(f["seq"].as_u64().unwrap());
                }
                last_id = id.or(last_id);
            }
            drop(s);
            let last_id = last_id.expect("every message carries an id");
            let (_, mut s) = SseReader::open(gw.addr, "/v1/runs/cuts/stream", Some(last_id)).await;
            let (_, state) = s.next().await.unwrap();
            assert_eq!(state["type"], "state");
            while got.last().copied().unwrap_or(start.unwrap_or(10)) < 10 {
                let (_, f) = s.next().await.expect("replayed event");
                assert_eq!(f["type"], "event", "{f}");
                got.push(f["seq"].as_u64().unwrap());
            }
            let want: Vec<u64> = (start.unwrap_or(10) + 1..=10).collect();
            assert_eq!(
                got, want,
                "start {start:?}, cut after message {cut_after}, resumed from id {last_id}"
            );
        }
    }
}

/// A client's close frame is answered with a close frame, which completes
/// the closing handshake (RFC 6455 §5.5.1) instead of dropping the socket
/// (found by an outside tester).
#[tokio::test]
async fn a_client_close_is_echoed() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{
        Message,
        protocol::{CloseFrame, frame::coding::CloseCode},
    };
    let gw = TestGateway::start().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(gw.ws_url()).await.unwrap();
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    let mut echoed = None;
    while let Ok(Some(msg)) = tokio::time::timeout(WAIT, ws.next()).await {
        match msg {
            Ok(Message::Close(f)) => {
                echoed = Some(f.map(|f| u16::from(f.code)));
                break;
            }
            Ok(_) => continue,
            Err(e) => panic!("the socket failed instead of closing: {e}"),
        }
    }
    assert_eq!(echoed, Some(Some(1000)), "the server echoes the close");
}

/// The embedded bus, with history reads that fail while `failing` is set
/// (JetStream not answering during a NATS leader election).
struct FlakyReads {
    inner: runcast_bus::EmbeddedBus,
    failing: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Bus for FlakyReads {
    async fn publish(
        &self,
        run: &RunId,
        events: Vec<NewEvent>,
    ) -> Result<Vec<u64>, runcast_bus::BusError> {
        self.inner.publish(run, events).await
    }
    async fn watch(&self, run: &RunId) -> Result<runcast_bus::Watch, runcast_bus::BusError> {
        self.inner.watch(run).await
    }
    async fn read(
        &self,
        run: &RunId,
        from: u64,
        limit: usize,
    ) -> Result<runcast_bus::Page, runcast_bus::BusError> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(runcast_bus::BusError::Unavailable(
                "JetStream did not answer".into(),
            ));
        }
        self.inner.read(run, from, limit).await
    }
    async fn state(
        &self,
        run: &RunId,
    ) -> Result<Option<runcast_core::RunState>, runcast_bus::BusError> {
        self.inner.state(run).await
    }
    async fn runs(
        &self,
        f: runcast_bus::RunFilter,
    ) -> Result<Vec<runcast_core::RunState>, runcast_bus::BusError> {
        self.inner.runs(f).await
    }
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
}

/// An outside tester's finding, across a NATS leader kill: a subscribe
/// whose replay read failed got `unavailable`, yet stayed registered, so
/// live events that came next moved its cursor past the events the replay
/// should have sent (lost without a gap), and the resubscribe that
/// protocol.md prescribes was refused as `already_subscribed`. Now the
/// failed subscription ends with the error frame: nothing of the run comes
/// after it, and subscribing again from the cursor gets every event.
#[tokio::test]
async fn a_subscribe_whose_replay_fails_ends_and_a_resubscribe_gets_everything() {
    let flaky = Arc::new(FlakyReads {
        inner: runcast_bus::EmbeddedBus::new(Retention::default()),
        failing: std::sync::atomic::AtomicBool::new(false),
    });
    let bus: Arc<dyn Bus> = flaky.clone();
    let gw = TestGateway::on(bus.clone(), Config::default(), "embedded").await;
    publish_n(&bus, "r", 1, 5).await;
    flaky
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut c = WsClient::connect(&gw.ws_url()).await;
    c.send(json!({"type": "subscribe", "run": "r", "since": 2}))
        .await;
    let mut frames = Vec::new();
    let error = loop {
        let f = c.recv().await;
        if f["type"] == "error" {
            break f;
        }
        frames.push(f);
    };
    assert_eq!(error["code"], "unavailable", "{error}");
    // Live events while reads still fail: none reaches the ended subscription.
    publish_n(&bus, "r", 6, 8).await;
    let quiet = tokio::time::timeout(Duration::from_millis(500), c.recv()).await;
    assert!(quiet.is_err(), "a frame after the error: {:?}", quiet.ok());
    flaky
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let resumed = c.subscribe("r", Some(2)).await;
    assert_eq!(resumed["type"], "state", "{resumed}");
    let events = collect_events(&mut c, &[("r", 6)]).await;
    assert_eq!(seqs(&events, "r"), [3, 4, 5, 6, 7, 8], "nothing skipped");
}
