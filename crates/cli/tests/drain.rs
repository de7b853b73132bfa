//! Draining a gateway without Kubernetes: three `runcast gateway` processes
//! on a real nats-server, 600 WebSocket clients, events published all the
//! while. One gateway is drained through its admin endpoint at a paced
//! rate: every one of its clients is moved to the other two, no client
//! loses or repeats an event, the hints respect the rate, and the drain is
//! over within its grace period.

use std::{
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use runcast_test_support::{
    http, json,
    nats::{NatsServer, free_addr},
    wait_http_ok,
};
use serde_json::Value;
use tokio::{process::Command, sync::Mutex};
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_runcast");
const TOKEN: &str = "drain-test-token";
const CLIENTS: usize = 600;
const RUNS: usize = 20;
const RATE: f64 = 100.0;
const GRACE: Duration = Duration::from_secs(5);

/// What one client saw.
#[derive(Default)]
struct Seen {
    seqs: Vec<u64>,
    /// When the drained gateway asked it to leave (close 1001).
    told_to_leave: Option<Instant>,
    /// Gateways it was connected to, in order.
    gateways: Vec<usize>,
    done: bool,
}

/// Follows `run` until its `complete` event, starting on gateway `first`
/// and moving to the next one whenever the current one closes or refuses.
async fn client(
    addrs: Arc<Vec<std::net::SocketAddr>>,
    first: usize,
    run: String,
    seen: Arc<Mutex<Seen>>,
    ready: tokio::sync::mpsc::Sender<()>,
) {
    let mut gw = first;
    let mut since: Option<u64> = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut announced = false;
    while Instant::now() < deadline {
        let url = format!("ws://{}/v1/ws", addrs[gw]);
        let Ok((mut ws, _)) = tokio_tungstenite::connect_async(&url).await else {
            gw = (gw + 1) % addrs.len();
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        seen.lock().await.gateways.push(gw);
        let mut sub = serde_json::json!({"type": "subscribe", "run": run});
        if let Some(s) = since {
            sub["since"] = s.into();
        }
        if ws.send(Message::text(sub.to_string())).await.is_err() {
            continue;
        }
        loop {
            match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let f: Value = serde_json::from_str(&t).unwrap();
                    match f["type"].as_str() {
                        Some("state") if !announced => {
                            announced = true;
                            let _ = ready.send(()).await;
                        }
                        Some("event") => {
                            let seq = f["seq"].as_u64().unwrap();
                            since = Some(seq);
                            let mut s = seen.lock().await;
                            s.seqs.push(seq);
                            if f["kind"] == "complete" {
                                s.done = true;
                                return;
                            }
                        }
                        Some("gap") => panic!("gap on {run}: {f}"),
                        _ => {}
                    }
                }
                Ok(Some(Ok(Message::Close(c)))) => {
                    if c.is_some_and(|c| u16::from(c.code) == 1001) {
                        let mut s = seen.lock().await;
                        s.told_to_leave.get_or_insert_with(Instant::now);
                    }
                    break;
                }
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        gw = (gw + 1) % addrs.len();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_gateway_moves_its_clients_without_loss_at_its_rate() {
    let nats = NatsServer::start().await;
    let addrs: Vec<_> = (0..3).map(|_| free_addr()).collect();
    let _gateways: Vec<_> = addrs
        .iter()
        .map(|a| {
            Command::new(BIN)
                .args(runcast_test_support::open_gateway_args(*a, &nats.url()))
                .args(["--admin-token", TOKEN, "--log", "warn"])
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("runcast gateway starts")
        })
        .collect();
    for a in &addrs {
        wait_http_ok(*a, "/readyz", "gateway").await;
    }
    let addrs = Arc::new(addrs);

    // 600 clients, 200 per gateway, 30 per run.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(CLIENTS);
    let mut seen = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let s = Arc::new(Mutex::new(Seen::default()));
        seen.push((i % 3, s.clone()));
        tasks.push(tokio::spawn(client(
            addrs.clone(),
            i % 3,
            format!("drain-{}", i % RUNS),
            s,
            ready_tx.clone(),
        )));
    }
    for _ in 0..CLIENTS {
        tokio::time::timeout(Duration::from_secs(30), ready_rx.recv())
            .await
            .expect("every client subscribed");
    }

    // Publish through gateway 1 all along: 20 runs × 10 events/s for 4 s.
    let url = format!("http://{}", addrs[1]);
    let publisher = tokio::spawn(async move {
        let ps: Vec<_> = (0..RUNS)
            .map(|r| runcast_worker::Publisher::http(&url, &format!("drain-{r}")).unwrap())
            .collect();
        for round in 0..40u64 {
            for p in &ps {
                p.progress(round, 40).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for p in &ps {
            p.complete(&serde_json::json!({"ok": true})).await.unwrap();
        }
    });

    tokio::time::sleep(Duration::from_secs(1)).await;
    let drained = addrs[0];
    let auth = format!("Bearer {TOKEN}");
    let started = Instant::now();
    let body = format!(
        r#"{{"rate":{RATE},"jitter_ms":200,"grace_ms":{}}}"#,
        GRACE.as_millis()
    );
    let (status, _, resp) = http(
        drained,
        "POST",
        "/v1/admin/drain",
        &[("authorization", &auth)],
        body,
    )
    .await;
    assert_eq!(status, 202, "{resp}");
    assert_eq!(json(&resp)["clients"], 200);

    // Within the grace period the drained gateway is empty.
    let emptied = loop {
        let (_, _, s) = http(
            drained,
            "GET",
            "/v1/admin/stats",
            &[("authorization", &auth)],
            "",
        )
        .await;
        let s = json(&s);
        if s["connections"] == 0 && s["pending_hints"] == 0 {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < GRACE + Duration::from_secs(2),
            "still {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(emptied <= GRACE + Duration::from_secs(1), "{emptied:?}");

    publisher.await.unwrap();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap();
    }

    // No client lost or repeated an event; the drained one's moved.
    let mut leave_times = Vec::new();
    for (i, (first, s)) in seen.iter().enumerate() {
        let s = s.lock().await;
        assert!(s.done, "client {i} did not see its run complete");
        let want: Vec<u64> = {
            let mut v = s.seqs.clone();
            v.dedup();
            v
        };
        assert_eq!(s.seqs, want, "client {i} got a seq twice");
        assert!(
            s.seqs.windows(2).all(|w| w[0] < w[1]),
            "client {i} out of order"
        );
        assert_eq!(
            s.seqs.len(),
            41,
            "client {i}: {} events, not 41",
            s.seqs.len()
        );
        if *first == 0 {
            let t = s
                .told_to_leave
                .unwrap_or_else(|| panic!("client {i} was not told to leave"));
            leave_times.push(t.duration_since(started));
            assert!(
                s.gateways[1..].iter().all(|&g| g != 0),
                "client {i} came back: {:?}",
                s.gateways
            );
        } else {
            assert!(
                s.told_to_leave.is_none(),
                "client {i} on gateway {first} was moved"
            );
        }
    }
    // The pace: 200 hints at 100/s take about 2 s (plus up to 200 ms of
    // jitter); no second carries much more than the rate.
    leave_times.sort();
    let spread = *leave_times.last().unwrap() - leave_times[0];
    assert!(
        spread >= Duration::from_millis(1600),
        "all at once: {spread:?}"
    );
    let busiest = leave_times
        .iter()
        .map(|&t| {
            leave_times
                .iter()
                .filter(|&&u| u >= t && u < t + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    assert!(
        busiest <= (RATE * 1.25) as usize,
        "{busiest} hints in one second"
    );
    eprintln!(
        "drained 200 clients: emptied after {emptied:?}, hints spread over {spread:?}, at most {busiest} in any second"
    );
}

/// SIGTERM drains at the configured pace instead of dropping everyone at
/// once, and the process still exits within its drain timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_paces_reconnect_hints_within_the_drain_timeout() {
    let addr = free_addr();
    let mut up = Command::new(BIN)
        .args(["up", "--listen", &addr.to_string(), "--log", "warn"])
        .args(["--drain-rate", "50", "--drain-timeout", "10s"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("runcast up starts");
    wait_http_ok(addr, "/readyz", "runcast up").await;
    let mut clients = Vec::new();
    for i in 0..100 {
        let mut c = runcast_test_support::WsClient::connect(&format!("ws://{addr}/v1/ws")).await;
        c.subscribe(&format!("sig-{}", i % 5), None).await;
        clients.push(c);
    }
    let started = Instant::now();
    let pid = up.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut closes = Vec::new();
    let mut tasks = Vec::new();
    for mut c in clients {
        tasks.push(tokio::spawn(async move {
            let (code, _) = tokio::time::timeout(Duration::from_secs(15), c.read_until_close())
                .await
                .expect("closed within the drain timeout");
            (code, started.elapsed())
        }));
    }
    for t in tasks {
        let (code, at) = t.await.unwrap();
        assert_eq!(code, Some(1001));
        closes.push(at);
    }
    closes.sort();
    // 100 hints at 50/s: about 2 s from first to last, not all at once.
    let spread = *closes.last().unwrap() - closes[0];
    assert!(spread >= Duration::from_millis(1600), "{spread:?}");
    assert!(spread <= Duration::from_secs(5), "{spread:?}");
    eprintln!("SIGTERM: 100 hints spread over {spread:?}");
    let status = tokio::time::timeout(Duration::from_secs(12), up.wait())
        .await
        .expect("exits within the drain timeout")
        .unwrap();
    assert!(status.success(), "{status:?}");
}
