//! Fault tests with real processes: `runcast gateway` processes in front of
//! a 3-node NATS JetStream cluster. Clients follow runs through gateway
//! crashes (`kill -9`), NATS node loss and a restart of the whole NATS
//! cluster, and must end with every event exactly once, in order.

use std::{net::SocketAddr, process::Stdio, sync::Arc, time::Duration};

use futures_util::{SinkExt, StreamExt};
use runcast_core::{EventKind, NewEvent, RunId};
use runcast_nats::{NatsConfig, NatsTarget, connect};
use runcast_test_support::{http, json, nats::NatsCluster};
use runcast_worker::PublishTarget;
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_runcast");

struct GatewayProc {
    child: Child,
    addr: SocketAddr,
}

impl GatewayProc {
    async fn start(nats_urls: &str) -> Self {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = Command::new(BIN)
            .args(runcast_test_support::open_gateway_args(addr, nats_urls))
            .args(["--nats-replicas", "3", "--log", "warn"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let g = Self { child, addr };
        g.wait_ready(Duration::from_secs(30)).await;
        g
    }

    async fn ready(&self) -> bool {
        tokio::net::TcpStream::connect(self.addr).await.is_ok()
            && http(self.addr, "GET", "/readyz", &[], "").await.0 == 200
    }

    async fn wait_ready(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while !self.ready().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway {} not ready within {within:?}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9`, by PID.
    async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }
}

/// A client that follows one run like `runcast tail`: on any disconnect it
/// moves to the next gateway and resumes from the last seq it saw. Ends at
/// the run's `complete` event; returns every seq it received, in order.
async fn follow(run: String, gateways: Vec<SocketAddr>, start: usize) -> (Vec<u64>, usize) {
    let mut seqs: Vec<u64> = Vec::new();
    let mut since: Option<u64> = None;
    let mut reconnects = 0;
    let mut i = start;
    'outer: loop {
        let url = format!("ws://{}/v1/ws", gateways[i % gateways.len()]);
        i += 1;
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        else {
            reconnects += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut sub = serde_json::json!({"type": "subscribe", "run": run});
        if let Some(s) = since {
            sub["since"] = s.into();
        }
        if ws
            .send(Message::Text(sub.to_string().into()))
            .await
            .is_err()
        {
            reconnects += 1;
            continue;
        }
        loop {
            let msg = match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
                Ok(Some(Ok(m))) => m,
                other => {
                    if std::env::var_os("RUNCAST_DEBUG_FOLLOW").is_some() {
                        eprintln!(
                            "follow {run}: leaving {url} after {} events: {:?}",
                            seqs.len(),
                            other.as_ref().map(|o| o
                                .as_ref()
                                .map(|r| r.as_ref().map(|_| ()).map_err(|e| e.to_string())))
                        );
                    }
                    reconnects += 1;
                    continue 'outer;
                }
            };
            let Message::Text(t) = msg else { continue };
            let f: Value = serde_json::from_str(&t).unwrap();
            match f["type"].as_str() {
                Some("state") if since.is_none() => since = f["seq"].as_u64(),
                Some("event") => {
                    let seq = f["seq"].as_u64().unwrap();
                    seqs.push(seq);
                    since = Some(seq);
                    if f["kind"] == "complete" {
                        return (seqs, reconnects);
                    }
                }
                Some("gap") => panic!("run {run}: unexpected gap {f}"),
                // The documented client behaviour: the bus was briefly
                // unreachable (a NATS node just died); resume from the cursor.
                Some("error") if f["code"] == "unavailable" => {
                    reconnects += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue 'outer;
                }
                Some("error") => panic!("run {run}: error {f}"),
                _ => {}
            }
        }
    }
}

async fn publisher(urls: &str) -> Arc<NatsTarget> {
    let client = connect(&NatsConfig::with_urls(urls), false).await.unwrap();
    Arc::new(NatsTarget::new(client, "runcast").with_retries(60, Duration::from_millis(1000)))
}

async fn publish(target: &NatsTarget, run: &str, kind: EventKind, i: u64) -> u64 {
    let ev = NewEvent::json(kind, &serde_json::json!({"i": i})).unwrap();
    target
        .publish(&RunId::parse(run).unwrap(), vec![ev])
        .await
        .unwrap()[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_through_gateway_crashes_and_nats_node_loss() {
    const RUNS: usize = 30;
    const CLIENTS: usize = 300;
    const EVENTS: u64 = 40;
    let mut nats = NatsCluster::start(3).await;
    let urls = nats.urls();
    let mut gateways = Vec::new();
    for _ in 0..3 {
        gateways.push(GatewayProc::start(&urls).await);
    }
    let addrs: Vec<SocketAddr> = gateways.iter().map(|g| g.addr).collect();

    // 300 clients over 3 gateways and 30 runs, subscribed before publishing.
    let mut followers = Vec::new();
    for c in 0..CLIENTS {
        let run = format!("job-{}", c % RUNS);
        followers.push((run.clone(), tokio::spawn(follow(run, addrs.clone(), c % 3))));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let t0 = std::time::Instant::now();
    // Workers publish 40 events per run, then `complete`.
    let target = publisher(&urls).await;
    let mut published: Vec<Vec<u64>> = vec![Vec::new(); RUNS];
    for i in 1..=EVENTS {
        for (r, seqs) in published.iter_mut().enumerate() {
            seqs.push(publish(&target, &format!("job-{r}"), EventKind::Progress, i).await);
        }
        if i == 10 {
            gateways[0].kill().await; // its 100 clients move to the others
        }
        if i == 20 {
            nats.nodes[1].kill(); // replicas 3: the other two keep quorum
        }
        if i == 30 {
            nats.nodes[1].restart().await;
            eprintln!("node back at {:?}", t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (r, seqs) in published.iter_mut().enumerate() {
        seqs.push(publish(&target, &format!("job-{r}"), EventKind::Complete, 0).await);
    }

    eprintln!("published all at {:?}", t0.elapsed());
    let mut moved = 0;
    for (run, f) in followers {
        let (got, reconnects) = tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("client finished")
            .unwrap();
        let r: usize = run.trim_start_matches("job-").parse().unwrap();
        assert_eq!(
            got, published[r],
            "{run}: every event exactly once, in order"
        );
        moved += usize::from(reconnects > 0);
    }
    eprintln!("all followers done at {:?}", t0.elapsed());
    assert!(
        moved >= CLIENTS / 3,
        "the crashed gateway's clients resumed elsewhere ({moved} reconnected)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_state_survive_a_restart_of_the_whole_nats_cluster() {
    let mut nats = NatsCluster::start(3).await;
    let urls = nats.urls();
    let gw = GatewayProc::start(&urls).await;
    let target = publisher(&urls).await;
    let mut published = Vec::new();
    for i in 1..=10 {
        published.push(publish(&target, "long-job", EventKind::Progress, i).await);
    }
    let follower = tokio::spawn(follow("long-job".into(), vec![gw.addr], 0));
    tokio::time::sleep(Duration::from_millis(500)).await;

    nats.kill_all();
    // The gateway stays up and says it is not ready.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _, body) = http(gw.addr, "GET", "/readyz", &[], "").await;
        if status == 503 {
            assert!(body.contains("NATS"), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness reports the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nats.start_all().await;
    gw.wait_ready(Duration::from_secs(60)).await;

    // History and state survived; the gateway recovered without a restart.
    let (status, _, body) = http(gw.addr, "GET", "/v1/runs/long-job", &[], "").await;
    assert_eq!(status, 200, "ready means the state answers: {body}");
    assert_eq!(json(&body)["seq"].as_u64(), published.last().copied());
    for i in 11..=20 {
        published.push(publish(&target, "long-job", EventKind::Progress, i).await);
    }
    published.push(publish(&target, "long-job", EventKind::Complete, 0).await);
    let (got, _) = tokio::time::timeout(Duration::from_secs(60), follower)
        .await
        .expect("client finished")
        .unwrap();
    // The client joined after seq 10 (state first), then followed live across the outage.
    assert_eq!(
        got,
        published[10..].to_vec(),
        "no loss across the NATS restart"
    );
}

/// Which node leads the events stream, by its server name (`n1`, …).
async fn stream_leader(nats: &NatsCluster) -> usize {
    for _ in 0..100 {
        for n in &nats.nodes {
            if tokio::net::TcpStream::connect(n.monitor()).await.is_err() {
                continue;
            }
            let jsz = n.monitor_json("/jsz?streams=true").await;
            let leader = jsz["account_details"][0]["stream_detail"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["name"] == "RUNCAST_EVENTS")
                .and_then(|s| s["cluster"]["leader"].as_str())
                .map(str::to_owned);
            if let Some(l) = leader {
                return l.trim_start_matches('n').parse::<usize>().unwrap() - 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no leader for RUNCAST_EVENTS");
}

/// Failover in an R3 cluster, measured: a run gets an event every 20 ms
/// while first the stream's leader and then the node the gateway is
/// connected to are killed. The client stays on one gateway; the test
/// reports how long live delivery stalled after each kill, and checks that
/// it got every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_nats_node_stalls_live_delivery_briefly_and_loses_nothing() {
    let mut nats = NatsCluster::start(3).await;
    // The gateway is given one node that does not lead the stream, and
    // learns the others from it; the publisher talks to the other two.
    let probe = GatewayProc::start(&nats.urls()).await; // creates the stream
    let leader = stream_leader(&nats).await;
    drop(probe);
    let home = (leader + 1) % 3;
    let urls: String = (0..3)
        .filter(|&n| n != home)
        .map(|n| nats.nodes[n].url())
        .collect::<Vec<_>>()
        .join(",");
    let gateway = GatewayProc::start(&nats.nodes[home].url()).await;
    let run = "failover".to_string();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let client = {
        let (addr, run) = (gateway.addr, run.clone());
        tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws"))
                .await
                .unwrap();
            // From seq 0: a subscription without a cursor starts at the
            // head it finds, and on a loaded machine the first events can
            // be stored before the gateway has opened the watch.
            let sub = serde_json::json!({"type": "subscribe", "run": run, "since": 0});
            ws.send(Message::Text(sub.to_string().into()))
                .await
                .unwrap();
            while let Some(Ok(m)) = ws.next().await {
                let Message::Text(t) = m else { continue };
                let f: Value = serde_json::from_str(&t).unwrap();
                if f["type"] == "event" {
                    let _ = tx.send((std::time::Instant::now(), f["seq"].as_u64().unwrap()));
                    if f["kind"] == "complete" {
                        return;
                    }
                } else if f["type"] == "error" || f["type"] == "gap" {
                    panic!("{f}");
                }
            }
            panic!("the gateway closed the client");
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let target_client = connect(&NatsConfig::with_urls(&urls), false).await.unwrap();
    let target = NatsTarget::new(target_client.clone(), "runcast")
        .with_retries(200, Duration::from_millis(200));
    let mut published = Vec::new();
    let mut kills = Vec::new();
    // When each publish was sent and acknowledged: the part of a stall that
    // is JetStream not storing (no leader yet), not the gateway.
    let mut stored = Vec::new();
    let mut ldm = None;
    for i in 0..500u64 {
        if i == 350 {
            nats.nodes[home].respawn();
        }
        if i == 395 {
            nats.nodes[home].wait_healthy().await;
        }
        if i == 400 {
            // A rolling restart: the NATS chart's preStop puts the node in
            // lame duck mode, and its stream leaderships move away at once.
            let leader = stream_leader(&nats).await;
            kills.push((
                "the stream leader, gracefully (lame duck mode)",
                std::time::Instant::now(),
            ));
            nats.nodes[leader].signal("USR2");
            ldm = Some(leader);
        }
        if i == 100 {
            kills.push(("stream leader", std::time::Instant::now()));
            nats.nodes[leader].kill();
        }
        // Restarts do not hold up the publisher (its pauses would count as
        // stalls); each node is waited for just before the next fault.
        if i == 200 {
            nats.nodes[leader].respawn();
        }
        if i == 280 {
            nats.nodes[leader].wait_healthy().await;
        }
        if i == 290 && stream_leader(&nats).await == home {
            // Keep the next kill about the gateway's connection, not an
            // election: move the leader away gracefully first.
            let js = runcast_nats::async_nats::jetstream::new(target_client.clone());
            let _: Value = js
                .request("STREAM.LEADER.STEPDOWN.RUNCAST_EVENTS".to_string(), &())
                .await
                .unwrap();
        }
        if i == 300 {
            kills.push(("the gateway's node", std::time::Instant::now()));
            nats.nodes[home].kill();
        }
        let started = std::time::Instant::now();
        published.push(publish(&target, &run, EventKind::Progress, i).await);
        stored.push((started, std::time::Instant::now()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    published.push(publish(&target, &run, EventKind::Complete, 0).await);
    if let Some(n) = ldm {
        nats.nodes[n].restart().await;
    }
    tokio::time::timeout(Duration::from_secs(30), client)
        .await
        .expect("the client got the complete event")
        .unwrap();
    let mut arrivals = Vec::new();
    let mut got = Vec::new();
    while let Ok((at, seq)) = rx.try_recv() {
        arrivals.push(at);
        got.push(seq);
    }
    assert_eq!(got, published, "every event exactly once, in order");
    // Measured per event, not as gaps between arrivals: a gap also counts
    // the moments the publisher itself paused (waiting for a restarted node
    // before the next fault), which are no stall of delivery, and it once
    // failed this test for a 2.2 s wait that was the publisher's.
    for (k, (what, at)) in kills.iter().enumerate() {
        let until = kills
            .iter()
            .map(|(_, t)| *t)
            .filter(|t| t > at)
            .min()
            .unwrap_or(*at + Duration::from_secs(10))
            .min(*at + Duration::from_secs(10));
        // The events whose delivery the fault could touch: from a moment
        // before it (their copies may have been in flight) until the next.
        let touched = stored
            .iter()
            .zip(&arrivals)
            .filter(|((sent, _), _)| *sent + Duration::from_millis(200) > *at && sent < &until);
        let (mut delivery, mut store, mut added) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for ((sent, acked), arrived) in touched {
            // Sent to received: what a watcher waited.
            delivery = delivery.max(arrived.saturating_duration_since(*sent));
            // Sent to acknowledged: JetStream storing nothing without a
            // leader (an election after a kill -9 takes nats-server seconds).
            store = store.max(*acked - *sent);
            // Stored to received: what the gateway and the copy's route add.
            added = added.max(arrived.saturating_duration_since(*acked));
        }
        eprintln!(
            "failover {k}: after killing {what}, events took up to {} ms from publish to client; JetStream took up to {} ms to store one; the gateway added up to {} ms after storing",
            delivery.as_millis(),
            store.as_millis(),
            added.as_millis()
        );
        // Loose bounds, so that a loaded CI machine does not fail them; the
        // measured figures are in docs/benchmarks.md.
        assert!(
            added < Duration::from_secs(2),
            "{what}: an event reached the client {added:?} after JetStream stored it"
        );
        assert!(
            delivery < Duration::from_secs(15),
            "{what}: an event took {delivery:?}"
        );
    }
}
