//! Behaviour every [`Bus`] must show. Each function takes a fresh, empty bus
//! and panics with what went wrong; each bus implementation's test file calls
//! all of them (see `tests/embedded_bus.rs`).

use std::sync::Arc;

use runcast_bus::{Bus, Live, RunFilter};
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

/// Seqs strictly increase within a run, and reading a run gives back exactly
/// its own events. (The embedded bus also numbers each run 1, 2, 3, …; NATS
/// numbers events across all runs, so seqs of one run may skip.)
pub async fn seqs_increase_per_run(bus: Arc<dyn Bus>) {
    let (a, b) = (run("seq-a"), run("seq-b"));
    let s1 = bus.publish(&a, vec![progress(1)]).await.unwrap();
    let s23 = bus
        .publish(&a, vec![progress(2), progress(3)])
        .await
        .unwrap();
    let t1 = bus.publish(&b, vec![progress(1)]).await.unwrap();
    assert_eq!((s1.len(), s23.len(), t1.len()), (1, 2, 1));
    assert!(
        s1[0] < s23[0] && s23[0] < s23[1],
        "increasing: {s1:?} {s23:?}"
    );
    let page = bus.read(&a, 0, 10).await.unwrap();
    let got: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
    assert_eq!(
        got,
        vec![s1[0], s23[0], s23[1]],
        "run a holds exactly its events"
    );
    assert_eq!(page.head, s23[1]);
    assert!(page.events.iter().all(|e| e.run == a));
}

/// Data is stored verbatim and history reads page in order.
pub async fn history_is_verbatim_and_pages(bus: Arc<dyn Bus>) {
    let r = run("hist");
    let raw = serde_json::value::RawValue::from_string(r#"{ "spaced" : [1, 2] }"#.into()).unwrap();
    let mut seqs = bus
        .publish(&r, vec![NewEvent::new(EventKind::Log, raw)])
        .await
        .unwrap();
    for i in 2..=10 {
        seqs.extend(bus.publish(&r, vec![progress(i)]).await.unwrap());
    }
    let p1 = bus.read(&r, 0, 4).await.unwrap();
    assert_eq!(
        p1.events[0].data.get(),
        r#"{ "spaced" : [1, 2] }"#,
        "data must be verbatim"
    );
    assert_eq!(
        p1.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        seqs[..4].to_vec()
    );
    assert!(
        p1.first <= seqs[0],
        "nothing lost: complete from {} (first event {})",
        p1.first,
        seqs[0]
    );
    assert_eq!(p1.head, seqs[9]);
    let p2 = bus.read(&r, seqs[8], 4).await.unwrap();
    assert_eq!(
        p2.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        seqs[8..].to_vec()
    );
    let empty = bus.read(&r, seqs[9] + 1, 4).await.unwrap();
    assert!(empty.events.is_empty());
    let unknown = bus.read(&run("never-published"), 0, 4).await.unwrap();
    assert_eq!((unknown.events.len(), unknown.head), (0, 0));
}

/// A watch sees exactly the events after its head, in order.
pub async fn watch_is_seamless(bus: Arc<dyn Bus>) {
    let r = run("watched");
    let before = bus
        .publish(&r, vec![progress(1), progress(2)])
        .await
        .unwrap();
    let mut w = bus.watch(&r).await.unwrap();
    assert_eq!(w.head, before[1]);
    let mut want = bus.publish(&r, vec![progress(3)]).await.unwrap();
    want.extend(
        bus.publish(&r, vec![progress(4), progress(5)])
            .await
            .unwrap(),
    );
    let mut got = Vec::new();
    while got.len() < 3 {
        match tokio::time::timeout(crate::WAIT, w.feed.next())
            .await
            .expect("live event in time")
        {
            Some(Live::Event(e) | Live::Unproven(e)) => got.push(e.seq),
            other => panic!("unexpected live item {other:?}"),
        }
    }
    assert_eq!(got, want);
    // A watch on a run with no events yet starts at head 0.
    let mut fresh = bus.watch(&run("not-yet")).await.unwrap();
    assert_eq!(fresh.head, 0);
    let first = bus
        .publish(&run("not-yet"), vec![progress(1)])
        .await
        .unwrap();
    match tokio::time::timeout(crate::WAIT, fresh.feed.next())
        .await
        .expect("in time")
    {
        Some(Live::Event(e) | Live::Unproven(e)) => assert_eq!(
            (e.seq, e.run.as_str(), e.data.get()),
            (first[0], "not-yet", r#"{"done":1,"total":10}"#)
        ),
        other => panic!("unexpected live item {other:?}"),
    }
}

/// State folds events; `runs` lists runs with events, newest first.
pub async fn state_and_runs(bus: Arc<dyn Bus>) {
    let (a, b) = (run("state-a"), run("state-b"));
    assert!(bus.state(&a).await.unwrap().is_none());
    let sa_seq = bus.publish(&a, vec![progress(5)]).await.unwrap()[0];
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    bus.publish(
        &b,
        vec![NewEvent::json(EventKind::Error, &serde_json::json!({"message": "boom"})).unwrap()],
    )
    .await
    .unwrap();
    let sa = bus.state(&a).await.unwrap().expect("state of a");
    assert_eq!(
        (sa.seq, sa.status, sa.percent, sa.events),
        (sa_seq, RunStatus::Running, Some(50.0), 1)
    );
    let sb = bus.state(&b).await.unwrap().expect("state of b");
    assert_eq!(sb.status, RunStatus::Failed);
    assert_eq!(
        sb.result.as_ref().map(|r| r.get()),
        Some(r#"{"message":"boom"}"#)
    );
    let _ = bus.watch(&run("watch-only")).await.unwrap();
    let names = |runs: Vec<runcast_core::RunState>| {
        runs.iter().map(|s| s.run.to_string()).collect::<Vec<_>>()
    };
    // The list may trail publishes by a moment (NATS folds it into a KV
    // bucket); a state read never does.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let all = loop {
        let all = names(bus.runs(RunFilter::default()).await.unwrap());
        if all.len() >= 2 || std::time::Instant::now() > deadline {
            break all;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        all,
        vec!["state-b", "state-a"],
        "runs with events only, most recent first"
    );
    let one = names(
        bus.runs(RunFilter {
            limit: 1,
            ..RunFilter::default()
        })
        .await
        .unwrap(),
    );
    assert_eq!(one, vec!["state-b"], "limit keeps the most recent");
    let running = names(
        bus.runs(RunFilter {
            status: Some(RunStatus::Running),
            limit: 10,
        })
        .await
        .unwrap(),
    );
    assert_eq!(running, vec!["state-a"], "status filter");
}

/// Concurrent publishers to one run get distinct seqs, each publisher's in
/// increasing order, and history holds all of them in seq order.
pub async fn concurrent_publishers_get_distinct_ordered_seqs(bus: Arc<dyn Bus>) {
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
    all.dedup();
    assert_eq!(all.len(), 400, "distinct seqs");
    let mut stored = Vec::new();
    let mut from = 0;
    loop {
        let page = bus.read(&r, from, 64).await.unwrap();
        let Some(last) = page.events.last() else {
            break;
        };
        from = last.seq + 1;
        stored.extend(page.events.iter().map(|e| e.seq));
    }
    assert_eq!(stored, all, "history holds every event in seq order");
}

/// Runs every behaviour test, each on a fresh bus from `make`.
pub async fn all<F: Fn() -> Arc<dyn Bus>>(make: F) {
    seqs_increase_per_run(make()).await;
    history_is_verbatim_and_pages(make()).await;
    watch_is_seamless(make()).await;
    state_and_runs(make()).await;
    concurrent_publishers_get_distinct_ordered_seqs(make()).await;
}

/// An event published again with the same `id` (a publisher retrying after
/// a lost response) is stored once: the retry gets the first seq back, and
/// history holds one copy. Ids are per run; events without one are never
/// deduplicated; a batch mixing old and new ids stores only the new.
pub async fn retried_ids_are_stored_once(bus: Arc<dyn Bus>) {
    let (a, b) = (run("idem-a"), run("idem-b"));
    let first = bus
        .publish(&a, vec![progress(1).with_id("job-7/step-1")])
        .await
        .unwrap();
    let again = bus
        .publish(&a, vec![progress(1).with_id("job-7/step-1")])
        .await
        .unwrap();
    assert_eq!(first, again, "the retry gets the first seq");
    let other_run = bus
        .publish(&b, vec![progress(1).with_id("job-7/step-1")])
        .await
        .unwrap();
    let no_id = bus.publish(&a, vec![progress(2)]).await.unwrap();
    let no_id_again = bus.publish(&a, vec![progress(2)]).await.unwrap();
    assert_ne!(no_id, no_id_again, "events without an id are all stored");
    let mixed = bus
        .publish(
            &a,
            vec![
                progress(1).with_id("job-7/step-1"),
                progress(3).with_id("job-7/step-3"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(mixed[0], first[0]);
    assert!(mixed[1] > no_id_again[0]);
    let page = bus.read(&a, 0, 100).await.unwrap();
    let got: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
    assert_eq!(
        got,
        vec![first[0], no_id[0], no_id_again[0], mixed[1]],
        "history holds each id once"
    );
    assert_eq!(bus.read(&b, 0, 100).await.unwrap().events.len(), 1);
    assert_eq!(other_run.len(), 1);
}
