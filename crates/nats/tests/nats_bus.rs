//! The shared bus behaviour tests against the NATS bus on a real
//! nats-server, plus what only NATS adds: readiness while NATS is away,
//! history that survives a server restart, and plain `nats pub` events.

use std::{sync::Arc, time::Duration};

use runcast_bus::Bus;
use runcast_core::RunId;
use runcast_nats::{NatsBus, NatsConfig, StreamSettings};
use runcast_test_support::{bus_conformance as c, nats::NatsServer};

async fn bus(server: &NatsServer) -> Arc<dyn Bus> {
    let (bus, _setup) = NatsBus::start(
        &NatsConfig::with_urls(server.url()),
        StreamSettings::default(),
    )
    .await
    .unwrap();
    wait_ready(&bus).await;
    Arc::new(bus)
}

async fn wait_ready(bus: &NatsBus) {
    bus.ready(Duration::from_secs(5))
        .await
        .expect("NATS bus ready");
}

#[tokio::test]
async fn seqs_increase_per_run() {
    let s = NatsServer::start().await;
    c::seqs_increase_per_run(bus(&s).await).await;
}

#[tokio::test]
async fn history_is_verbatim_and_pages() {
    let s = NatsServer::start().await;
    c::history_is_verbatim_and_pages(bus(&s).await).await;
}

#[tokio::test]
async fn watch_is_seamless() {
    let s = NatsServer::start().await;
    c::watch_is_seamless(bus(&s).await).await;
}

#[tokio::test]
async fn state_and_runs() {
    let s = NatsServer::start().await;
    c::state_and_runs(bus(&s).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_get_distinct_ordered_seqs() {
    let s = NatsServer::start().await;
    c::concurrent_publishers_get_distinct_ordered_seqs(bus(&s).await).await;
}

#[tokio::test]
async fn not_ready_while_nats_is_away_then_ready_and_history_survives_a_restart() {
    let mut s = NatsServer::start().await;
    let port = s.port;
    s.kill();
    // Starts anyway, says why it is not ready.
    let (bus, _setup) = NatsBus::start(
        &NatsConfig::with_urls(format!("nats://127.0.0.1:{port}")),
        StreamSettings::default(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let why = bus.health().unwrap_err();
    assert!(why.contains("NATS"), "{why}");
    let run = RunId::parse("durable").unwrap();
    let err = bus
        .publish(
            &run,
            vec![runcast_core::NewEvent::json(runcast_core::EventKind::Log, &1).unwrap()],
        )
        .await;
    assert!(
        matches!(err, Err(runcast_bus::BusError::Unavailable(_))),
        "{err:?}"
    );

    s.restart().await;
    wait_ready(&bus).await;
    // Started with retries; the first connection is not a reconnect.
    assert_eq!(bus.stats().reconnects, 0, "{:?}", bus.stats());
    let p = runcast_worker::Publisher::on_bus(Arc::new(bus.clone()), "durable").unwrap();
    p.progress(1, 2).await.unwrap();
    let done = p.complete(&serde_json::json!({"ok": true})).await.unwrap();

    // File storage: a restart of NATS keeps history and state.
    s.restart().await;
    wait_ready(&bus).await;
    assert_eq!(bus.stats().reconnects, 1, "the restart is counted once");
    let state = bus.state(&run).await.unwrap().expect("state after restart");
    assert_eq!(
        (state.seq, state.events, state.status),
        (done, 2, runcast_core::RunStatus::Completed)
    );
    assert_eq!(bus.read(&run, 0, 10).await.unwrap().events.len(), 2);
}

#[tokio::test]
async fn plain_nats_publishes_become_events_and_non_json_is_kept_as_a_string() {
    let s = NatsServer::start().await;
    let (bus, _setup) = NatsBus::start(&NatsConfig::with_urls(s.url()), StreamSettings::default())
        .await
        .unwrap();
    wait_ready(&bus).await;
    let run = RunId::parse("r1").unwrap();
    let mut w = bus.watch(&run).await.unwrap();
    let client = bus.client().clone();
    client
        .publish(
            "runcast.runs.r1.progress",
            r#"{"done":3,"total":10}"#.into(),
        )
        .await
        .unwrap();
    client
        .publish("runcast.runs.r1.log", "plain text, not JSON".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), w.feed.next())
            .await
            .unwrap()
        {
            Some(runcast_bus::Live::Event(e) | runcast_bus::Live::Unproven(e)) => {
                got.push((e.kind.to_string(), e.data.get().to_owned()))
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        got[0],
        ("progress".into(), r#"{"done":3,"total":10}"#.into())
    );
    assert_eq!(got[1], ("log".into(), r#""plain text, not JSON""#.into()));
    let state = bus.state(&run).await.unwrap().unwrap();
    assert_eq!(state.percent, Some(30.0));
}

#[tokio::test]
async fn retried_ids_are_stored_once() {
    let s = NatsServer::start().await;
    c::retried_ids_are_stored_once(bus(&s).await).await;
}
