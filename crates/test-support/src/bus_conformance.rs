//! Behaviour every [`Bus`] must show. Each function takes a fresh, empty bus
//! and panics with what went wrong; each bus implementation's test file calls
//! all of them (see `tests/embedded_bus.rs`).

use std::sync::Arc;

use runcast_bus::{Bus, Live};
use runcast_core::{EventKind, NewEvent, RunId, RunStatus};

fn run(s: &str) -> RunId {
    RunId::parse(s).expect("valid run")
}

fn progress(done: u64) -> NewEvent {
    NewEvent::json(
        EventKind::Progress,
        &serde_json::json!({ "done": done, "total": 10 }),
    )
    .expect("json")
}

/// Seqs start at 1, increase by one, and are per run.
pub async fn seqs_start_at_one_per_run(bus: Arc<dyn Bus>) {
    let (a, b) = (run("seq-a"), run("seq-b"));
    assert_eq!(bus.publish(&a, vec![progress(1)]).await.unwrap(), vec![1]);
    assert_eq!(
        bus.publish(&a, vec![progress(2), progress(3)])
            .await
            .unwrap(),
        vec![2, 3]
    );
    assert_eq!(
        bus.publish(&b, vec![progress(1)]).await.unwrap(),
        vec![1],
        "runs have independent seqs"
    );
}

/// Data is stored verbatim and history reads page in order.
pub async fn history_is_verbatim_and_pages(bus: Arc<dyn Bus>) {
    let r = run("hist");
    let raw = serde_json::value::RawValue::from_string(r#"{ "spaced" : [1, 2] }"#.into()).unwrap();
    bus.publish(&r, vec![NewEvent::new(EventKind::Log, raw)])
        .await
        .unwrap();
    for i in 2..=10 {
        bus.publish(&r, vec![progress(i)]).await.unwrap();
    }
    let p1 = bus.read(&r, 1, 4).await.unwrap();
    assert_eq!(
        p1.events[0].data.get(),
        r#"{ "spaced" : [1, 2] }"#,
        "data must be verbatim"
    );
    assert_eq!(
        p1.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!((p1.first, p1.head), (1, 10));
    let p2 = bus.read(&r, 9, 4).await.unwrap();
    assert_eq!(
        p2.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![9, 10]
    );
    let empty = bus.read(&r, 11, 4).await.unwrap();
    assert!(empty.events.is_empty());
    let unknown = bus.read(&run("never-published"), 1, 4).await.unwrap();
    assert_eq!((unknown.events.len(), unknown.head), (0, 0));
}

/// A watch sees exactly the events after its head, in order.
pub async fn watch_is_seamless(bus: Arc<dyn Bus>) {
    let r = run("watched");
    bus.publish(&r, vec![progress(1), progress(2)])
        .await
        .unwrap();
    let mut w = bus.watch(&r).await.unwrap();
    assert_eq!(w.head, 2);
    bus.publish(&r, vec![progress(3)]).await.unwrap();
    bus.publish(&r, vec![progress(4), progress(5)])
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        match tokio::time::timeout(crate::WAIT, w.feed.next())
            .await
            .expect("live event in time")
        {
            Some(Live::Event(e)) => got.push(e.seq),
            other => panic!("unexpected live item {other:?}"),
        }
    }
    assert_eq!(got, vec![3, 4, 5]);
    // A watch on a run with no events yet starts at head 0.
    let mut fresh = bus.watch(&run("not-yet")).await.unwrap();
    assert_eq!(fresh.head, 0);
    bus.publish(&run("not-yet"), vec![progress(1)])
        .await
        .unwrap();
    match tokio::time::timeout(crate::WAIT, fresh.feed.next())
        .await
        .expect("in time")
    {
        Some(Live::Event(e)) => assert_eq!(e.seq, 1),
        other => panic!("unexpected live item {other:?}"),
    }
}

/// State folds events; `runs` lists runs with events, newest first.
pub async fn state_and_runs(bus: Arc<dyn Bus>) {
    let (a, b) = (run("state-a"), run("state-b"));
    assert!(bus.state(&a).await.unwrap().is_none());
    bus.publish(&a, vec![progress(5)]).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    bus.publish(
        &b,
        vec![NewEvent::json(EventKind::Error, &serde_json::json!({"message": "boom"})).unwrap()],
    )
    .await
    .unwrap();
    let sa = bus.state(&a).await.unwrap().expect("state of a");
    assert_eq!(
        (sa.seq, sa.status, sa.percent),
        (1, RunStatus::Running, Some(50.0))
    );
    let sb = bus.state(&b).await.unwrap().expect("state of b");
    assert_eq!(sb.status, RunStatus::Failed);
    let _ = bus.watch(&run("watch-only")).await.unwrap();
    let runs: Vec<String> = bus
        .runs()
        .await
        .unwrap()
        .iter()
        .map(|s| s.run.to_string())
        .collect();
    assert_eq!(
        runs,
        vec!["state-b", "state-a"],
        "runs with events only, most recent first"
    );
}

/// Concurrent publishers to one run get distinct, gap-free seqs.
pub async fn concurrent_publishers_get_contiguous_seqs(bus: Arc<dyn Bus>) {
    let r = run("contended");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (bus, r) = (bus.clone(), r.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..50 {
                mine.extend(bus.publish(&r, vec![progress(i)]).await.unwrap());
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let mine = t.await.unwrap();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "one publisher's seqs must increase"
        );
        all.extend(mine);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=400).collect::<Vec<u64>>());
}

/// Runs every behaviour test, each on a fresh bus from `make`.
pub async fn all<F: Fn() -> Arc<dyn Bus>>(make: F) {
    seqs_start_at_one_per_run(make()).await;
    history_is_verbatim_and_pages(make()).await;
    watch_is_seamless(make()).await;
    state_and_runs(make()).await;
    concurrent_publishers_get_contiguous_seqs(make()).await;
}
