//! History reads on NATS are coalesced: callers asking for the same page of
//! a run while it is being read share one JetStream read, so a storm of
//! clients resuming one run costs about one read, not one per client. A
//! caller that gives up does not break the read for the others.

use std::time::Duration;

use futures_util::{FutureExt, StreamExt, future::join_all};
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

/// Resuming clients arrive over a second or so, not all while the first
/// read of their run is in flight: a finished read answers the reads it
/// covers for a moment, but only while the run's live feed has seen nothing
/// past its head (a page a moment old must not hide a finished run's last
/// events), and never for a run this gateway does not watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_read_answers_what_it_covers_until_the_feed_sees_more() {
    let nats = NatsServer::start().await;
    let bus = bus(&nats).await;
    let run = RunId::parse("resumers").unwrap();
    let events = (0..20)
        .map(|i| NewEvent::json(EventKind::Log, &i).unwrap())
        .collect();
    let seqs = bus.publish(&run, events).await.unwrap();
    let head = *seqs.last().unwrap();
    let mut watch = bus.watch(&run).await.unwrap();
    assert_eq!(watch.head, head);

    let s0 = bus.stats();
    let page = bus.read(&run, seqs[0], 500).await.unwrap();
    assert_eq!(page.events.len(), 20);
    // Later cursors inside the page, and the cursor at its head: answered.
    let later = bus.read(&run, seqs[10], 500).await.unwrap();
    let got: Vec<u64> = later.events.iter().map(|e| e.seq).collect();
    assert_eq!(got, seqs[10..]);
    let short = bus.read(&run, seqs[3], 2).await.unwrap();
    let got: Vec<u64> = short.events.iter().map(|e| e.seq).collect();
    assert_eq!(got, seqs[3..5]);
    let none = bus.read(&run, head + 1, 500).await.unwrap();
    assert!(none.events.is_empty());
    assert_eq!(none.head, head);
    let s1 = bus.stats();
    assert_eq!(s1.history_reads - s0.history_reads, 1, "one read sent");
    assert_eq!(s1.history_reads_joined - s0.history_reads_joined, 3);
    // A head-only read (a cursor checked against the head) is never a stale one.
    bus.read(&run, head + 1, 0).await.unwrap();
    assert_eq!(bus.stats().history_reads - s1.history_reads, 1);

    // Once the feed has seen a newer event, the page is stale: read again.
    let more = bus
        .publish(&run, vec![NewEvent::json(EventKind::Log, &"late").unwrap()])
        .await
        .unwrap()[0];
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match watch.feed.next().await.unwrap() {
                runcast_bus::Live::Event(e) | runcast_bus::Live::Unproven(e) => break e.seq,
                runcast_bus::Live::Lagged => {}
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(seen, more);
    let s2 = bus.stats();
    let fresh = bus.read(&run, head + 1, 500).await.unwrap();
    assert_eq!(
        fresh.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [more]
    );
    assert_eq!(bus.stats().history_reads - s2.history_reads, 1);

    // A run nobody watches here: every read goes to JetStream.
    let other = RunId::parse("unwatched").unwrap();
    bus.publish(&other, vec![NewEvent::json(EventKind::Log, &1).unwrap()])
        .await
        .unwrap();
    let s3 = bus.stats();
    bus.read(&other, 1, 500).await.unwrap();
    bus.read(&other, 1, 500).await.unwrap();
    assert_eq!(bus.stats().history_reads - s3.history_reads, 2);

    // Once the watch is gone, so is the shortcut.
    drop(watch);
    let s4 = bus.stats();
    bus.read(&run, head + 1, 500).await.unwrap();
    bus.read(&run, head + 1, 500).await.unwrap();
    assert_eq!(bus.stats().history_reads - s4.history_reads, 2);
}

/// A head-only read (how a gateway checks a cursor before refusing it as
/// past the head) is answered by the stream's leader, with a stream
/// message get on the run's wildcard: the outside tester found valid
/// cursors refused after a failover, because a direct get was answered by
/// a replica still a few events behind. The head must be right whatever
/// kinds the run's last events have, and 0 for a run without events.
/// It is one request: the stream info that finds where history starts is
/// for pages with events, not for a cursor check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_only_read_asks_the_stream_leader() {
    let nats = NatsServer::start().await;
    let bus = bus(&nats).await;
    let run = RunId::parse("cursor-check").unwrap();
    let mut last = 0;
    for kind in [
        EventKind::Progress,
        EventKind::Log,
        EventKind::Status,
        EventKind::Log,
    ] {
        last = bus
            .publish(&run, vec![NewEvent::json(kind, &1).unwrap()])
            .await
            .unwrap()[0];
    }
    let sniffer = runcast_nats::async_nats::connect(nats.url()).await.unwrap();
    let mut api = sniffer.subscribe("$JS.API.>").await.unwrap();
    sniffer.flush().await.unwrap();
    let page = bus.read(&run, last + 1, 0).await.unwrap();
    assert_eq!(page.head, last);
    assert!(page.events.is_empty());
    let empty = bus
        .read(&RunId::parse("never-published").unwrap(), 1, 0)
        .await
        .unwrap();
    assert_eq!(empty.head, 0);
    let mut subjects = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), api.next()).await {
        subjects.push(m.subject.to_string());
    }
    assert!(
        subjects
            .iter()
            .any(|s| s.starts_with("$JS.API.STREAM.MSG.GET.")),
        "no leader read: {subjects:?}"
    );
    assert!(
        !subjects
            .iter()
            .any(|s| s.starts_with("$JS.API.DIRECT.GET.RUNCAST_EVENTS")),
        "a head-only read went to a replica: {subjects:?}"
    );
    // And it costs one request per check: a head-only read does not ask
    // for the stream's info to find where the run's history starts.
    // (The state bucket's requests come from folding the publishes.)
    let on_events: Vec<_> = subjects
        .iter()
        .filter(|s| !s.contains("KV_RUNCAST_RUNS"))
        .collect();
    assert_eq!(
        on_events.len(),
        2,
        "one request per head-only read: {subjects:?}"
    );

    // A cursor past the whole stream is past the run's head for sure:
    // answered at once (one stream info more), not waited on the way a
    // cursor within the stream is while a new leader catches up.
    let started = std::time::Instant::now();
    let page = bus.read(&run, last + 5, 0).await.unwrap();
    assert_eq!(page.head, last);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
