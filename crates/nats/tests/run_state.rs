//! Run state in the `RUNCAST_RUNS` KV bucket: folded by the gateways from
//! the events stream, exactly once, surviving folder failover and the loss
//! of the events it was folded from.

use std::{collections::HashMap, time::Duration};

use async_nats::jetstream;
use futures_util::StreamExt;
use runcast_bus::Bus;
use runcast_core::{RunId, RunState, RunStatus};
use runcast_nats::{NatsBus, NatsConfig, StreamSettings};
use runcast_test_support::nats::NatsServer;

async fn start_bus(
    server: &NatsServer,
    settings: StreamSettings,
) -> (NatsBus, tokio::task::JoinHandle<()>) {
    let (bus, setup) = NatsBus::start(&NatsConfig::with_urls(server.url()), settings)
        .await
        .unwrap();
    bus.ready(Duration::from_secs(5)).await.expect("ready");
    (bus, setup)
}

/// A bus whose stream keeps 3 messages per subject, and a JetStream client
/// to publish as any NATS client would.
async fn keeping_three_per_subject(
    nats: &NatsServer,
) -> (NatsBus, tokio::task::JoinHandle<()>, jetstream::Context) {
    let settings = StreamSettings {
        max_per_subject: 3,
        ..StreamSettings::default()
    };
    let (bus, setup) = start_bus(nats, settings).await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    (bus, setup, js)
}

/// Publishes `data` on `runcast.runs.<run>.<kind>` with a JetStream ack, as
/// any NATS client would; returns the stream seq.
async fn publish(js: &jetstream::Context, run: &str, kind: &str, data: String) -> u64 {
    js.publish(format!("runcast.runs.{run}.{kind}"), data.into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

/// The state stored in the bucket, read with a client of its own.
async fn stored(js: &jetstream::Context, run: &str) -> Option<RunState> {
    let kv = js.get_key_value("RUNCAST_RUNS").await.ok()?;
    let value = kv.get(run).await.unwrap()?;
    Some(serde_json::from_slice(&value).expect("a stored state is a RunState"))
}

/// Waits until the bucket holds `run` folded up to `seq`.
async fn stored_at(js: &jetstream::Context, run: &str, seq: u64, within: Duration) -> RunState {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let s = stored(js, run).await;
        if let Some(s) = &s
            && s.seq >= seq
        {
            return s.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{run} not folded up to {seq} within {within:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_any_client_are_folded_into_the_bucket() {
    let nats = NatsServer::start().await;
    let (bus, _setup) = start_bus(&nats, StreamSettings::default()).await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    publish(&js, "kv1", "status", r#"{"state":"starting"}"#.into()).await;
    for done in 1..=8 {
        publish(
            &js,
            "kv1",
            "progress",
            format!(r#"{{"done":{done},"total":10}}"#),
        )
        .await;
    }
    let last = publish(&js, "kv1", "complete", r#"{"ok":true}"#.into()).await;

    let s = stored_at(&js, "kv1", last, Duration::from_secs(5)).await;
    assert_eq!(
        (s.seq, s.events, s.status, s.percent),
        (last, 10, RunStatus::Completed, Some(100.0))
    );
    assert_eq!(
        s.last_status.as_ref().map(|r| r.get()),
        Some(r#"{"state":"starting"}"#)
    );
    assert_eq!(
        s.progress.as_ref().map(|r| r.get()),
        Some(r#"{"done":8,"total":10}"#)
    );
    // The bus answers with the same state, and lists the run.
    let run = RunId::parse("kv1").unwrap();
    let from_bus = bus.state(&run).await.unwrap().unwrap();
    assert_eq!(
        serde_json::to_value(&from_bus).unwrap(),
        serde_json::to_value(&s).unwrap()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while bus.runs(Default::default()).await.unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "listed from the mirror"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// With the events' retention far shorter than the run, the state still
/// counts every event and keeps when the run started: it is stored, not
/// derived from what the stream still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_outlives_the_events_it_was_folded_from() {
    let nats = NatsServer::start().await;
    let (bus, _setup, js) = keeping_three_per_subject(&nats).await;
    let mut last = 0;
    for done in 1..=30 {
        last = publish(
            &js,
            "long",
            "progress",
            format!(r#"{{"done":{done},"total":30}}"#),
        )
        .await;
        if done == 1 {
            // Let the first event be folded before it is dropped.
            stored_at(&js, "long", last, Duration::from_secs(5)).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let s = stored_at(&js, "long", last, Duration::from_secs(5)).await;
    assert_eq!((s.events, s.percent), (30, Some(100.0)));
    let first_kept = bus
        .read(&RunId::parse("long").unwrap(), 0, 10)
        .await
        .unwrap();
    assert_eq!(first_kept.events.len(), 3, "the stream kept 3 events");
    assert!(
        s.started_ts < first_kept.events[0].ts,
        "started when the first event was published, not the oldest kept"
    );
}

/// Three gateways' folders share the work; two of them stop mid-stream
/// (the pinned one among them, whichever it is). Every run's state still
/// counts each event exactly once and ends at its last seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folding_is_exactly_once_across_folder_failover() {
    let nats = NatsServer::start().await;
    let mut folders = Vec::new();
    for _ in 0..3 {
        folders.push(start_bus(&nats, StreamSettings::default()).await);
    }
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let runs = 20;
    let mut last: HashMap<String, u64> = HashMap::new();
    let publish_round = |round: u64| {
        let js = js.clone();
        async move {
            let mut acks = Vec::new();
            for r in 0..runs {
                let ack = js
                    .publish(
                        format!("runcast.runs.fo-{r}.progress"),
                        format!(r#"{{"done":{round}}}"#).into(),
                    )
                    .await
                    .unwrap();
                acks.push((format!("fo-{r}"), ack));
            }
            let mut out = Vec::new();
            for (run, ack) in acks {
                out.push((run, ack.await.unwrap().sequence));
            }
            out
        }
    };
    for round in 1..=50 {
        for (run, seq) in publish_round(round).await {
            last.insert(run, seq);
        }
    }
    // Stop two of the three folders while events keep coming.
    for (_, setup) in folders.drain(..2) {
        setup.abort();
    }
    for round in 51..=100 {
        for (run, seq) in publish_round(round).await {
            last.insert(run, seq);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (run, seq) in &last {
        // The pin moves after the pinned folder's timeout (6 s).
        let s = stored_at(&js, run, *seq, Duration::from_secs(30)).await;
        assert_eq!((s.seq, s.events), (*seq, 100), "{run}: {s:?}");
    }
    drop(folders);
}

/// An expired state leaves a marker, and every gateway's list forgets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_run_leaves_the_list() {
    let nats = NatsServer::start().await;
    let settings = StreamSettings {
        max_age: Duration::from_secs(2),
        ..StreamSettings::default()
    };
    let (bus, _setup) = start_bus(&nats, settings).await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let seq = publish(&js, "brief", "log", r#""hello""#.into()).await;
    stored_at(&js, "brief", seq, Duration::from_secs(2)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listed = bus.runs(Default::default()).await.unwrap();
        if listed.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still listed 10 s after a 2 s max age: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        stored(&js, "brief").await.is_none(),
        "gone from the bucket too"
    );
    let mut keys = js
        .get_key_value("RUNCAST_RUNS")
        .await
        .unwrap()
        .keys()
        .await
        .unwrap();
    assert!(keys.next().await.is_none());
}

/// The limit of messages per subject drops one kind's oldest events while
/// older events of other kinds stay: a hole in the middle of the run. An
/// outside client found it skipped in silence (a run of progress, six logs,
/// progress, at 3 per subject, replayed as 1, 5, 6, 7, 8). History now
/// counts as complete only from the full subject's oldest kept event, and
/// everything before it is announced as a gap. Likewise a message on a
/// subject that is no event kind must not hide the events before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_kind_retention_and_stray_subjects_never_lose_events_in_silence() {
    let nats = NatsServer::start().await;
    let (bus, _setup, js) = keeping_three_per_subject(&nats).await;
    let mut seqs = vec![publish(&js, "holes", "progress", r#"{"done":1}"#.into()).await];
    for i in 0..6 {
        seqs.push(publish(&js, "holes", "log", format!(r#"{{"line":{i}}}"#)).await);
    }
    seqs.push(publish(&js, "holes", "progress", r#"{"done":2}"#.into()).await);
    let run = RunId::parse("holes").unwrap();
    let page = bus.read(&run, 1, 100).await.unwrap();
    let kept: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
    // The log subject kept its last 3 (seqs[4..7]); history is complete from
    // the first of them: the old progress event is before it and goes with
    // the dropped logs into the gap.
    assert_eq!(page.first, seqs[4], "{kept:?}");
    assert_eq!(kept, seqs[4..], "no event from before the hole");

    // A message on a subject that is no event kind (a typo) after them.
    publish(&js, "holes", "Complete", "{}".into()).await;
    let page = bus.read(&run, seqs[4], 100).await.unwrap();
    let kept: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
    assert_eq!(kept, seqs[4..], "the stray message hides nothing");
    assert!(page.head > seqs[7]);
}
