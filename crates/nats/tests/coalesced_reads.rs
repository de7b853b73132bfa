//! History reads on NATS are coalesced: callers asking for the same page of
//! a run while it is being read share one JetStream read, so a storm of
//! clients resuming one run costs about one read, not one per client. A
//! caller that gives up does not break the read for the others.

use std::time::Duration;

use futures_util::{FutureExt, future::join_all};
use runcast_bus::Bus;
use runcast_core::{EventKind, NewEvent, RunId};
use runcast_nats::{NatsBus, NatsConfig, StreamSettings};
use runcast_test_support::nats::NatsServer;

async fn bus(server: &NatsServer) -> NatsBus {
    let (bus, _setup) = NatsBus::start(
        &NatsConfig::with_urls(server.url()),
        StreamSettings::default(),
    )
    .await
    .unwrap();
    bus.ready(Duration::from_secs(5)).await.unwrap();
    bus
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_identical_reads_cost_one_and_all_get_the_page() {
    let nats = NatsServer::start().await;
    let bus = bus(&nats).await;
    let run = RunId::parse("storm").unwrap();
    let events = (0..20)
        .map(|i| NewEvent::json(EventKind::Log, &i).unwrap())
        .collect();
    let seqs = bus.publish(&run, events).await.unwrap();
    let before = bus.stats();

    let pages = join_all((0..100).map(|_| bus.read(&run, 1, 500))).await;
    let after = bus.stats();
    for page in &pages {
        let got: Vec<u64> = page
            .as_ref()
            .unwrap()
            .events
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(got, seqs, "every caller gets the whole page");
    }
    assert_eq!(
        after.history_reads - before.history_reads,
        1,
        "one read sent"
    );
    assert_eq!(
        after.history_reads_joined - before.history_reads_joined,
        99,
        "the other 99 joined it"
    );

    // Once it is done, the next read is a fresh one (a later caller must
    // see events stored since).
    let more = bus
        .publish(&run, vec![NewEvent::json(EventKind::Log, &"late").unwrap()])
        .await
        .unwrap();
    let page = bus.read(&run, 1, 500).await.unwrap();
    assert_eq!(page.events.last().map(|e| e.seq), Some(more[0]));
    assert_eq!(bus.stats().history_reads - after.history_reads, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_does_not_spoil_the_read_for_the_others() {
    let nats = NatsServer::start().await;
    let bus = bus(&nats).await;
    let run = RunId::parse("quitter").unwrap();
    let events = (0..50)
        .map(|i| NewEvent::json(EventKind::Log, &i).unwrap())
        .collect();
    let seqs = bus.publish(&run, events).await.unwrap();

    // The first caller (the one that started the read) gives up after its
    // first poll; the one that joined still gets the page, and a caller
    // after that starts a read of its own.
    let mut first = Box::pin(bus.read(&run, 1, 500));
    assert!(
        (&mut first).now_or_never().is_none(),
        "the read goes to NATS"
    );
    let mut second = Box::pin(bus.read(&run, 1, 500));
    assert!((&mut second).now_or_never().is_none());
    let joined = bus.stats().history_reads_joined;
    assert_eq!(joined, 1, "the second joined the first");
    drop(first);
    let page = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("not stuck on an abandoned read")
        .unwrap();
    let got: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
    assert_eq!(got, seqs);
    let sent = bus.stats().history_reads;
    bus.read(&run, 1, 500).await.unwrap();
    assert_eq!(bus.stats().history_reads, sent + 1, "a fresh read");
    assert_eq!(bus.stats().history_reads_joined, joined);
}
