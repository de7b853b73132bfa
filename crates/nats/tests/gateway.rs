//! Gateways on the NATS bus: any gateway serves any client, a client that
//! leaves one gateway resumes on another without loss or duplicates, and a
//! gateway's NATS interest follows distinct runs, not clients.

use std::{sync::Arc, time::Duration};

use runcast_gateway::Config;
use runcast_nats::{NatsBus, NatsConfig, StreamSettings};
use runcast_test_support::{TestGateway, WsClient, http, json, nats::NatsServer, seqs};
use runcast_worker::Publisher;

/// What NATS itself reports about a gateway's interest: the events stream
/// holds only the run state folder's consumer (one durable shared by all
/// gateways; gateways follow runs without consumers), and each watched run
/// is one core subscription to its republished copies. Returns the live
/// subscriptions' subjects.
async fn watch_filters(nats: &NatsServer) -> Vec<String> {
    let jsz = nats.monitor_json("/jsz?consumers=true&config=true").await;
    let streams = jsz["account_details"][0]["stream_detail"]
        .as_array()
        .unwrap_or_else(|| panic!("no streams: {jsz}"));
    let events = streams
        .iter()
        .find(|s| s["name"] == "RUNCAST_EVENTS")
        .unwrap_or_else(|| panic!("no events stream: {jsz}"));
    let consumers = events["consumer_detail"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let names: Vec<_> = consumers.iter().map(|c| c["name"].clone()).collect();
    assert_eq!(
        names,
        vec![serde_json::Value::from("fold_RUNCAST_RUNS")],
        "the state folder's consumer and no other: {events}"
    );
    let subsz = nats.monitor_json("/subsz?subs=1&limit=100000").await;
    subsz["subscriptions_list"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|s| s["subject"].as_str())
        .filter(|s| s.starts_with("runcast.live."))
        .map(str::to_owned)
        .collect()
}

/// Waits until NATS reports `n` live subscriptions (an unsubscribe reaches
/// the server a moment after the last client leaves).
async fn wait_for_filters(nats: &NatsServer, n: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let filters = watch_filters(nats).await;
        if filters.len() == n || tokio::time::Instant::now() > deadline {
            return filters;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_gateway_without_loss_or_duplicates() {
    let nats = NatsServer::start().await;
    let (gw1, gw2) = (nats_gateway(&nats).await, nats_gateway(&nats).await);
    let mut c = WsClient::connect(&gw1.ws_url()).await;
    let state = c.subscribe("deploy", None).await;
    assert_eq!(state["seq"], 0);

    // A worker publishes through the second gateway's bus connection.
    let publisher = Publisher::on_bus(gw2.bus(), "deploy").unwrap();
    let publishing = tokio::spawn(async move {
        let mut seqs = Vec::new();
        for i in 1..=200u64 {
            seqs.push(publisher.progress(i, 200).await.unwrap());
            if i % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        seqs
    });
    let mut got = Vec::new();
    while got.len() < 60 {
        let f = c.recv().await;
        if f["type"] == "event" {
            got.push(f["seq"].as_u64().unwrap());
        }
    }
    drop(c); // gateway 1 is gone for this client

    let published = publishing.await.unwrap();
    let mut c = WsClient::connect(&gw2.ws_url()).await;
    c.subscribe("deploy", Some(*got.last().unwrap())).await;
    let mut frames = Vec::new();
    while got.len() + seqs(&frames, "deploy").len() < published.len() {
        let f = c.recv().await;
        assert_ne!(f["type"], "gap", "nothing is past retention: {f}");
        frames.push(f);
    }
    got.extend(seqs(&frames, "deploy"));
    assert_eq!(
        got, published,
        "every event once, in publish order, across two gateways"
    );

    // Both gateways report the same state.
    let (_, _, a) = http(gw1.addr, "GET", "/v1/runs/deploy", &[], "").await;
    let (_, _, b) = http(gw2.addr, "GET", "/v1/runs/deploy", &[], "").await;
    let (a, b) = (json(&a), json(&b));
    assert_eq!(a["seq"], b["seq"]);
    assert_eq!(
        (a["events"].as_u64(), a["percent"].as_f64()),
        (Some(200), Some(100.0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_on_ten_runs_hold_ten_nats_watches() {
    let nats = NatsServer::start().await;
    let gw = nats_gateway(&nats).await;
    let mut clients = Vec::new();
    for i in 0..1000 {
        let mut c = WsClient::connect(&gw.ws_url()).await;
        c.subscribe(&format!("run-{}", i % 10), None).await;
        clients.push(c);
    }
    assert_eq!(gw.gw.hub.watched_runs(), 10);
    // One core subscription per run, as NATS itself reports.
    let mut filters = wait_for_filters(&nats, 10).await;
    filters.sort();
    let mut want: Vec<String> = (0..10).map(|r| format!("runcast.live.run-{r}.*")).collect();
    want.sort();
    assert_eq!(
        filters, want,
        "one NATS subscription per run, not per client"
    );

    // And every client still gets its run's events.
    let bus = gw.bus();
    for r in 0..10 {
        Publisher::on_bus(bus.clone(), &format!("run-{r}"))
            .unwrap()
            .log("hello")
            .await
            .unwrap();
    }
    for c in &mut clients {
        let f = c.recv().await;
        assert_eq!(
            (f["type"].as_str(), f["kind"].as_str()),
            (Some("event"), Some("log")),
            "{f}"
        );
    }
    drop(clients);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while gw.gw.hub.watched_runs() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "watches released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And NATS drops the gateway's interest with them.
    assert_eq!(wait_for_filters(&nats, 0).await, Vec::<String>::new());
}

/// `examples/python/publish.py`, the documented worker contract for other
/// languages, run with the official Python client (`pip install nats-py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_worker_publishes_with_the_official_nats_client() {
    let nats = NatsServer::start().await;
    let gw = nats_gateway(&nats).await;
    let mut c = WsClient::connect(&gw.ws_url()).await;
    c.subscribe("py-scan", None).await;

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/python/publish.py"
    );
    let out = tokio::process::Command::new("python3")
        .args([script, &nats.url(), "py-scan", "5"])
        .output()
        .await
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "publish.py failed (scripts/test.sh installs nats-py): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last_seq: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();

    let mut kinds = Vec::new();
    loop {
        let f = c.recv().await;
        assert_eq!(f["type"], "event", "{f}");
        kinds.push(f["kind"].as_str().unwrap().to_owned());
        if kinds.len() == 2 {
            assert_eq!(f["data"], serde_json::json!({"done": 1, "total": 5}));
        }
        if f["kind"] == "complete" {
            assert_eq!(f["seq"].as_u64(), Some(last_seq));
            break;
        }
    }
    assert_eq!(
        kinds.len(),
        12,
        "status, 5 x (progress, log), complete: {kinds:?}"
    );
    let (_, _, body) = http(gw.addr, "GET", "/v1/runs/py-scan", &[], "").await;
    let state = json(&body);
    assert_eq!(
        (state["status"].as_str(), state["percent"].as_f64()),
        (Some("completed"), Some(100.0))
    );
}

/// Run states are cached for a moment; a subscriber must still end up with
/// every event, even when the run finished within that moment and nothing
/// more will ever be published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_briefly_cached_state_never_hides_the_last_events() {
    let nats = NatsServer::start().await;
    let gw = nats_gateway(&nats).await;
    let p = Publisher::on_bus(gw.bus(), "short").unwrap();
    for i in 1..=5 {
        p.progress(i, 8).await.unwrap();
    }
    let mut warm = WsClient::connect(&gw.ws_url()).await;
    warm.subscribe("short", None).await; // derives and caches the state at seq 5
    let mut tail = Vec::new();
    for i in 6..=7 {
        tail.push(p.progress(i, 8).await.unwrap());
    }
    tail.push(p.complete(&serde_json::json!({"ok": true})).await.unwrap());

    // A fresh subscriber, inside the cache window: state, then whatever the
    // state did not include, up to the end.
    let mut fresh = WsClient::connect(&gw.ws_url()).await;
    let state = fresh.subscribe("short", None).await;
    let mut last = state["seq"].as_u64().unwrap();
    while last < *tail.last().unwrap() {
        let f = fresh.recv().await;
        assert_eq!(f["type"], "event", "{f}");
        let seq = f["seq"].as_u64().unwrap();
        assert!(
            seq > last && tail.contains(&seq),
            "only what the state lacked, in order: {f}"
        );
        last = seq;
    }
    // A resume from the start replays all 8, once each.
    let mut resumed = WsClient::connect(&gw.ws_url()).await;
    resumed.subscribe("short", Some(0)).await;
    let mut frames = Vec::new();
    while seqs(&frames, "short").len() < 8 {
        frames.push(resumed.recv().await);
    }
    assert_eq!(seqs(&frames, "short")[5..].to_vec(), tail);
    // And a cursor newer than the cached state is not refused.
    let mut ahead = WsClient::connect(&gw.ws_url()).await;
    ahead.subscribe("short", Some(tail[1])).await;
    let f = ahead.recv().await;
    assert_eq!(
        (f["type"].as_str(), f["seq"].as_u64()),
        (Some("event"), Some(tail[2])),
        "{f}"
    );
}

/// A burst of first subscribers to one run opens one NATS watch, not one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_subscribers_to_a_new_run_opens_one_watch() {
    let nats = NatsServer::start().await;
    let gw = nats_gateway(&nats).await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(WsClient::connect(&gw.ws_url()).await);
    }
    // All subscribe at once.
    for c in &mut clients {
        c.send(serde_json::json!({"type": "subscribe", "run": "burst"}))
            .await;
    }
    for c in &mut clients {
        assert_eq!(c.recv().await["type"], "state");
    }
    assert_eq!(
        wait_for_filters(&nats, 1).await,
        ["runcast.live.burst.*"],
        "one watch for 50 simultaneous first subscribers"
    );
    Publisher::on_bus(gw.bus(), "burst")
        .unwrap()
        .log("all of you")
        .await
        .unwrap();
    for c in &mut clients {
        assert_eq!(c.recv().await["type"], "event");
    }
}

/// A sample the scrape must hold.
fn sample(scrape: &str, name: &str) -> f64 {
    runcast_test_support::metric(scrape, name)
        .unwrap_or_else(|| panic!("no numeric {name} in the scrape:\n{scrape}"))
}

/// Two gateways on one NATS, 3 clients on one and 2 on the other, events
/// published through the first one's HTTP API: each hop's counter balances
/// against the previous one times the subscribers, and each hop's latency
/// histogram has one observation per event it saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_metrics_balance_across_gateways() {
    const EVENTS: usize = 20;
    let nats = NatsServer::start().await;
    let (a, b) = (nats_gateway(&nats).await, nats_gateway(&nats).await);
    let mut clients = Vec::new();
    for (gw, n) in [(&a, 3), (&b, 2)] {
        for _ in 0..n {
            let mut c = WsClient::connect(&gw.ws_url()).await;
            c.subscribe("metered", None).await;
            clients.push(c);
        }
    }
    for i in 0..EVENTS {
        let body = format!(r#"{{"kind":"progress","data":{{"done":{i}}}}}"#);
        let (status, _, text) = http(a.addr, "POST", "/v1/runs/metered/events", &[], body).await;
        assert_eq!(status, 200, "{text}");
    }
    for c in &mut clients {
        for _ in 0..EVENTS {
            assert_eq!(c.recv().await["type"], "event");
        }
    }
    let scrape = |gw: &TestGateway| {
        let addr = gw.addr;
        async move { http(addr, "GET", "/metrics", &[], "").await.2 }
    };
    let (sa, sb) = (scrape(&a).await, scrape(&b).await);
    let published = sample(&sa, "runcast_events_published_total");
    assert_eq!(published, EVENTS as f64, "published through gateway a");
    for (s, clients) in [(&sa, 3.0), (&sb, 2.0)] {
        let received = sample(s, r#"runcast_events_received_total{source="nats"}"#);
        let delivered = sample(s, "runcast_events_delivered_total");
        assert_eq!(
            received, published,
            "each gateway received every event once"
        );
        assert_eq!(
            delivered,
            received * clients,
            "delivered = received × subscribers"
        );
        let count = |hop: &str| {
            sample(
                s,
                &format!(r#"runcast_event_latency_seconds_count{{hop="{hop}"}}"#),
            )
        };
        assert_eq!(count("publish_to_receive"), received);
        assert_eq!(count("receive_to_write"), delivered);
        assert_eq!(count("publish_to_write"), delivered);
        let e2e = sample(
            s,
            r#"runcast_event_latency_seconds_sum{hop="publish_to_write"}"#,
        );
        assert!(
            e2e > 0.0 && e2e / delivered < 1.0,
            "plausible latencies: {e2e}s in all"
        );
        assert_eq!(sample(s, "runcast_ready"), 1.0);
        assert_eq!(sample(s, "runcast_bus_reconnects_total"), 0.0);
        assert_eq!(
            sample(s, "runcast_bus_live_resyncs_total"),
            0.0,
            "nothing was lost, so nothing resynced"
        );
        assert_eq!(sample(s, "runcast_feed_repairs_total"), 0.0);
        assert!(
            sample(s, "runcast_queue_depth_count") >= 1.0,
            "one per written batch"
        );
        assert_eq!(sample(s, "runcast_bus_up"), 1.0);
        assert!(sample(s, "process_resident_memory_bytes") > 0.0);
        assert!(sample(s, "process_open_fds") > 0.0);
        assert!(sample(s, "process_cpu_seconds_total") >= 0.0);
    }
    // Prometheus's own linter accepts the exposition (names, types, units).
    runcast_test_support::promtool_check_metrics(&sa);
}

/// Any NATS client can store any bytes on a run's subject, past every check
/// of the publish API. An outside client stored a `status` event nested 130
/// levels deep and took down the run list, the run's subscriptions and, as
/// the event stayed in the stream, every gateway started later. Now such a
/// payload reaches clients as a JSON string of its text, and everything
/// else about the run and the run list keeps working, on a gateway that was
/// running and on one started afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatever_a_nats_client_stores_every_gateway_still_serves() {
    let nats = NatsServer::start().await;
    let gw = nats_gateway(&nats).await;
    let mut c = WsClient::connect(&gw.ws_url()).await;
    c.subscribe("stored", None).await;

    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let deep = format!("{}{}", "[".repeat(130), "]".repeat(130));
    let pretty = "{\n  \"done\": 2,\r\n  \"total\": 4\n}";
    for (kind, payload) in [
        ("status", deep.as_str()),
        ("progress", pretty),
        ("log", "plain text, not JSON"),
        ("complete", deep.as_str()),
    ] {
        js.publish(
            format!("runcast.runs.stored.{kind}"),
            payload.as_bytes().to_vec().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }

    let mut got = Vec::new();
    let mut got_seq = None;
    while got.len() < 4 {
        let f = c.recv().await;
        assert_eq!(f["type"], "event", "{f}");
        got.push(f["data"].clone());
        got_seq = f["seq"].as_u64();
    }
    assert_eq!(got[0], serde_json::Value::String(deep.clone()));
    assert_eq!(got[1], serde_json::json!({"done": 2, "total": 4}));
    assert_eq!(got[2], "plain text, not JSON");
    assert_eq!(got[3], serde_json::Value::String(deep.clone()));

    // A gateway started after the events were stored serves them too.
    let later = nats_gateway(&nats).await;
    for g in [&gw, &later] {
        // Run states are folded into the KV bucket in the background.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let state = loop {
            // ... and mirrored into each gateway's run list.
            let (status, _, body) = http(g.addr, "GET", "/v1/runs/stored", &[], "").await;
            let (_, _, list) = http(g.addr, "GET", "/v1/runs", &[], "").await;
            if status == 200
                && json(&body)["seq"].as_u64() >= got_seq
                && json(&list)["runs"][0]["seq"].as_u64() >= got_seq
            {
                break json(&body);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "state not folded: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (status, _, list) = http(g.addr, "GET", "/v1/runs", &[], "").await;
        assert_eq!(status, 200, "{list}");
        assert_eq!(json(&list)["runs"][0]["run"], "stored");
        assert_eq!(
            (state["status"].as_str(), state["percent"].as_f64()),
            (Some("completed"), Some(100.0))
        );
        let (status, _, body) =
            http(g.addr, "GET", "/v1/runs/stored/events?since=0", &[], "").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(json(&body)["events"].as_array().unwrap().len(), 4);
    }
    let mut c2 = WsClient::connect(&later.ws_url()).await;
    c2.send(serde_json::json!({"type": "subscribe", "run": "stored", "since": 0}))
        .await;
    assert_eq!(c2.recv().await["type"], "state");
    let replayed: Vec<serde_json::Value> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(c2.recv().await);
        }
        v
    };
    assert_eq!(seqs(&replayed, "stored").len(), 4);
}

/// NATS counts a message's headers in its size. An event whose data fits
/// the limit but whose message does not used to fail at the server after
/// five retries, as a 503 telling the publisher to retry (found by an
/// outside tester); now it is a 413 at once, and an event that fits with
/// its headers is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_too_large_with_its_headers_is_a_413_at_once() {
    let nats = NatsServer::start().await;
    let gw = nats_gateway(&nats).await;
    let body = |data_len: usize| {
        format!(
            r#"{{"kind":"log","data":"{}"}}"#,
            "x".repeat(data_len - 2) // the quotes count as data
        )
    };
    let started = std::time::Instant::now();
    let (status, headers, resp) =
        http(gw.addr, "POST", "/v1/runs/big/events", &[], body(1_048_540)).await;
    assert_eq!(status, 413, "{resp}");
    assert_eq!(json(&resp)["error"]["code"], "too_large");
    assert!(headers.get("retry-after").is_none());
    assert!(started.elapsed() < Duration::from_secs(1), "no retries");
    let (status, _, resp) =
        http(gw.addr, "POST", "/v1/runs/big/events", &[], body(1_000_000)).await;
    assert_eq!(status, 200, "{resp}");
}
