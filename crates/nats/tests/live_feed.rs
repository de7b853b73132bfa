//! The live path's exactness on a real nats-server: a gateway follows runs
//! through the copies the stream republishes, which core NATS may lose.
//! These tests make the stream store events without republishing them (its
//! republish rule taken away for a moment, as a lost copy looks to a
//! gateway) and check that clients still get every event once, in order:
//! through the per-subject chain when a later copy arrives, and through the
//! quiet check when the lost one was the run's last.

use std::{sync::Arc, time::Duration};

use runcast_gateway::Config;
use runcast_nats::{NatsBus, NatsConfig, StreamSettings, async_nats::jetstream};
use runcast_test_support::{TestGateway, WsClient, http, metric, nats::NatsServer};
use runcast_worker::Publisher;
use serde_json::Value;

async fn nats_gateway(server: &NatsServer) -> TestGateway {
    let (bus, _setup) = NatsBus::start(
        &NatsConfig::with_urls(server.url()),
        StreamSettings::default(),
    )
    .await
    .unwrap();
    bus.ready(Duration::from_secs(5))
        .await
        .expect("NATS bus ready");
    TestGateway::on(Arc::new(bus), Config::default(), "nats").await
}

/// Turns the events stream's republish rule off (`false`) or back on.
async fn republishing(
    server: &NatsServer,
    on: bool,
    rule: &mut Option<jetstream::stream::Republish>,
) {
    let js = jetstream::new(
        runcast_nats::async_nats::connect(server.url())
            .await
            .unwrap(),
    );
    let mut stream = js.get_stream("RUNCAST_EVENTS").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    if on {
        config.republish = rule.take();
        assert!(config.republish.is_some(), "a rule to restore");
    } else {
        *rule = config.republish.take();
        assert!(rule.is_some(), "the stream republishes to begin with");
    }
    js.update_stream(&config).await.unwrap();
}

async fn event_frames(c: &mut WsClient, n: usize, within: Duration) -> Vec<Value> {
    let mut got = Vec::new();
    tokio::time::timeout(within, async {
        while got.len() < n {
            let f = c.recv().await;
            if f["type"] == "event" {
                got.push(f);
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} of {n} events within {within:?}: {got:?}", got.len()));
    got
}

async fn resyncs(gw: &TestGateway) -> f64 {
    let (_, _, m) = http(gw.addr, "GET", "/metrics", &[], "").await;
    metric(&m, "runcast_bus_live_resyncs_total").unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_copy_is_found_by_the_next_on_its_subject() {
    let nats = NatsServer::start().await;
    let gw = nats_gateway(&nats).await;
    let mut c = WsClient::connect(&gw.ws_url()).await;
    c.subscribe("chain", None).await;
    let publisher = Publisher::on_bus(gw.bus(), "chain").unwrap();
    publisher.log("one").await.unwrap();
    let first = event_frames(&mut c, 1, Duration::from_secs(5)).await;

    let mut rule = None;
    republishing(&nats, false, &mut rule).await;
    publisher.log("two, never republished").await.unwrap();
    republishing(&nats, true, &mut rule).await;
    let started = std::time::Instant::now();
    publisher.log("three").await.unwrap();

    // "three" names "two" as its predecessor on the run's log subject: the
    // feed resyncs at once, well before its quiet check.
    let rest = event_frames(&mut c, 2, Duration::from_secs(5)).await;
    let elapsed = started.elapsed();
    let lines: Vec<_> = first
        .iter()
        .chain(&rest)
        .map(|f| f["data"]["line"].clone())
        .collect();
    assert_eq!(
        lines,
        ["one", "two, never republished", "three"].map(Value::from),
        "every event once, in order"
    );
    assert!(
        elapsed < Duration::from_millis(900),
        "repaired by the chain, not the 1 s quiet check: {elapsed:?}"
    );
    assert_eq!(resyncs(&gw).await, 1.0, "one resync, counted");
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), c.recv())
            .await
            .is_err(),
        "nothing more: no repeat"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_last_event_is_found_by_the_quiet_check() {
    let nats = NatsServer::start().await;
    let gw = nats_gateway(&nats).await;
    let mut c = WsClient::connect(&gw.ws_url()).await;
    c.subscribe("tail", None).await;
    let publisher = Publisher::on_bus(gw.bus(), "tail").unwrap();
    publisher.progress(1, 2).await.unwrap();
    event_frames(&mut c, 1, Duration::from_secs(5)).await;

    let mut rule = None;
    republishing(&nats, false, &mut rule).await;
    // A kind this feed has not seen yet, and nothing after it.
    publisher
        .complete(&serde_json::json!({"ok": true}))
        .await
        .unwrap();
    republishing(&nats, true, &mut rule).await;
    let last = event_frames(&mut c, 1, Duration::from_secs(4)).await;
    assert_eq!(last[0]["kind"], "complete", "{last:?}");
    assert_eq!(resyncs(&gw).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_republishes_elsewhere_is_refused_not_changed() {
    let nats = NatsServer::start().await;
    let js = jetstream::new(runcast_nats::async_nats::connect(nats.url()).await.unwrap());
    js.create_stream(jetstream::stream::Config {
        name: "RUNCAST_EVENTS".into(),
        subjects: vec!["runcast.runs.>".into()],
        storage: jetstream::stream::StorageType::File,
        republish: Some(jetstream::stream::Republish {
            source: "runcast.runs.>".into(),
            destination: "audit.>".into(),
            headers_only: true,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let err = runcast_nats::ensure_stream(&js, "runcast", &StreamSettings::default())
        .await
        .expect_err("someone else's republish rule");
    let msg = err.to_string();
    assert!(
        msg.contains("audit.>") && msg.contains("runcast.live.>"),
        "says what is there and what runcast needs: {msg}"
    );
    let mut stream = js.get_stream("RUNCAST_EVENTS").await.unwrap();
    let kept = stream.info().await.unwrap().config.republish.clone();
    assert_eq!(
        kept.map(|r| r.destination),
        Some("audit.>".into()),
        "left as it was"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_republish_rule_edited_away_while_running_makes_the_gateway_not_ready() {
    let nats = NatsServer::start().await;
    let gw = nats_gateway(&nats).await;
    assert_eq!(http(gw.addr, "GET", "/readyz", &[], "").await.0, 200);
    let mut rule = None;
    republishing(&nats, false, &mut rule).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, body) = http(gw.addr, "GET", "/readyz", &[], "").await;
        if status == 503 {
            assert!(body.contains("no longer republishes"), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    republishing(&nats, true, &mut rule).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while http(gw.addr, "GET", "/readyz", &[], "").await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ready again once restored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The limit of the chains: a copy lost with no signal (no reconnect, no
/// slow consumer, no leader change), followed only by events of *other*
/// kinds, cannot be put back in order: later events already went out. The
/// feed's check finds it once the run goes quiet (or within 5 s while it
/// streams) and counts it, so it is never silent; the event is in history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_lost_behind_events_of_other_kinds_is_counted_not_silent() {
    let nats = NatsServer::start().await;
    let gw = nats_gateway(&nats).await;
    let mut c = WsClient::connect(&gw.ws_url()).await;
    c.subscribe("behind", None).await;
    let publisher = Publisher::on_bus(gw.bus(), "behind").unwrap();
    publisher.log("one").await.unwrap();
    event_frames(&mut c, 1, Duration::from_secs(5)).await;
    let missed = |gw: &TestGateway| {
        let addr = gw.addr;
        async move {
            let (_, _, m) = http(addr, "GET", "/metrics", &[], "").await;
            metric(&m, "runcast_bus_live_missed_total").unwrap_or(-1.0)
        }
    };
    assert_eq!(missed(&gw).await, 0.0);

    let mut rule = None;
    republishing(&nats, false, &mut rule).await;
    let lost = publisher.log("two, never republished").await.unwrap();
    republishing(&nats, true, &mut rule).await;
    publisher.progress(1, 2).await.unwrap();
    publisher.progress(2, 2).await.unwrap();
    let live = event_frames(&mut c, 2, Duration::from_secs(5)).await;
    assert!(live.iter().all(|f| f["kind"] == "progress"), "{live:?}");

    let t = std::time::Instant::now();
    while missed(&gw).await < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(6),
            "the lost copy was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(missed(&gw).await, 1.0, "counted once");
    // Still in history, where a client can read it.
    let (status, _, body) = http(gw.addr, "GET", "/v1/runs/behind/events?since=0", &[], "").await;
    assert_eq!(status, 200, "{body}");
    let page: Value = serde_json::from_str(&body).unwrap();
    assert!(
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["seq"] == lost),
        "{page}"
    );
}

/// The outside tester's finding: a message published by hand on a live
/// subject with the stream's sequence headers was taken as an event. One
/// that names another stream in `Nats-Stream` (or none) is now ignored;
/// the run goes on exactly as stored. (One that copies every header can
/// only be kept out by permissions: docs/security.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_names_another_stream_is_ignored() {
    let nats = NatsServer::start().await;
    let gw = nats_gateway(&nats).await;
    let mut c = WsClient::connect(&gw.ws_url()).await;
    c.subscribe("forged", None).await;
    let publisher = Publisher::on_bus(gw.bus(), "forged").unwrap();
    publisher.log("one").await.unwrap();
    let first = event_frames(&mut c, 1, Duration::from_secs(5)).await;
    let seq = first[0]["seq"].as_u64().unwrap();

    let forger = runcast_nats::async_nats::connect(nats.url()).await.unwrap();
    for stream in [Some("OTHER"), None] {
        let mut h = runcast_nats::async_nats::HeaderMap::new();
        if let Some(s) = stream {
            h.insert("Nats-Stream", s);
        }
        h.insert("Nats-Subject", "runcast.runs.forged.log");
        h.insert("Nats-Sequence", (seq + 1000).to_string().as_str());
        h.insert("Nats-Last-Sequence", seq.to_string().as_str());
        forger
            .publish_with_headers("runcast.live.forged.log", h, r#"{"line":"forged"}"#.into())
            .await
            .unwrap();
    }
    forger.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    publisher.log("two").await.unwrap();
    let rest = event_frames(&mut c, 1, Duration::from_secs(5)).await;
    assert_eq!(rest[0]["data"]["line"], "two", "the real next event, live");
    assert!(rest[0]["seq"].as_u64().unwrap() < seq + 1000);
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), c.recv())
            .await
            .is_err(),
        "nothing more"
    );
}

/// An outside tester's finding: a publisher with only the worker's
/// permission (publish on runcast.runs.>) stored an event carrying a
/// `Nats-Sequence` header of its own. The stream's republished copy then
/// had two, the publisher's first, and the feed took that one: every
/// client got the event twice (as its seq and as 999999999) and the real
/// events after it never came live. The stream's own header, the last,
/// is the one that counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_message_with_its_own_sequence_header_cannot_move_the_feed() {
    let nats = NatsServer::start().await;
    let gw = nats_gateway(&nats).await;
    let mut c = WsClient::connect(&gw.ws_url()).await;
    c.subscribe("smuggled", None).await;
    let publisher = Publisher::on_bus(gw.bus(), "smuggled").unwrap();
    publisher.log("one").await.unwrap();
    let first = event_frames(&mut c, 1, Duration::from_secs(5)).await;
    let seq = first[0]["seq"].as_u64().unwrap();

    let worker = runcast_nats::async_nats::connect(nats.url()).await.unwrap();
    let js = runcast_nats::async_nats::jetstream::new(worker);
    let mut h = runcast_nats::async_nats::HeaderMap::new();
    for (k, v) in [
        ("Nats-Sequence", "999999999"),
        ("Nats-Last-Sequence", "0"),
        ("Nats-Stream", "RUNCAST_EVENTS"),
        ("Nats-Subject", "runcast.runs.smuggled.log"),
    ] {
        h.insert(k, v);
    }
    js.publish_with_headers(
        "runcast.runs.smuggled.log",
        h,
        r#"{"line":"smuggled"}"#.into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    for line in ["three", "four"] {
        publisher.log(line).await.unwrap();
    }
    let rest = event_frames(&mut c, 3, Duration::from_secs(5)).await;
    let got: Vec<(u64, &str)> = rest
        .iter()
        .map(|f| {
            (
                f["seq"].as_u64().unwrap(),
                f["data"]["line"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [(seq + 1, "smuggled"), (seq + 2, "three"), (seq + 3, "four")],
        "the stream's seqs, once each, live"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), c.recv())
            .await
            .is_err(),
        "nothing more"
    );
}
