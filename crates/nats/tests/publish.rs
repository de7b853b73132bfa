//! Publishing to a real nats-server: the stream is created or refused with
//! a clear reason, events land verbatim on `runcast.runs.<run>.<kind>` with
//! their headers, a repeated `Nats-Msg-Id` is stored once, plain core-NATS
//! publishes are captured too, and an outage is retried, then reported.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{self, stream::Config};
use runcast_core::{EventKind, NewEvent, RunId};
use runcast_nats::{NatsConfig, NatsError, NatsTarget, StreamSettings, connect, ensure_stream};
use runcast_test_support::nats::NatsServer;
use runcast_worker::{PublishErrorKind, Publisher};

fn run(s: &str) -> RunId {
    RunId::parse(s).unwrap()
}

async fn setup(server: &NatsServer) -> (async_nats::Client, jetstream::stream::Stream) {
    let client = connect(&NatsConfig::with_urls(server.url()), false)
        .await
        .expect("connect");
    let js = jetstream::new(client.clone());
    let stream = ensure_stream(&js, "runcast", &StreamSettings::default())
        .await
        .expect("stream");
    (client, stream)
}

#[tokio::test]
async fn ensure_stream_creates_verifies_updates_and_refuses_incompatible_streams() {
    let server = NatsServer::start().await;
    let client = connect(&NatsConfig::with_urls(server.url()), false)
        .await
        .unwrap();
    let js = jetstream::new(client);
    let mut s = ensure_stream(&js, "runcast", &StreamSettings::default())
        .await
        .unwrap();
    let info = s.info().await.unwrap();
    assert_eq!(info.config.subjects, vec!["runcast.runs.>"]);
    assert!(info.config.allow_direct);
    // nats-server 2.15 caps streams without an explicit limit at 1,000
    // consumers; one per watched run per gateway needs more.
    assert_eq!(info.config.max_consumers, 100_000);

    // Same settings again: verified, unchanged. New limits: updated in place.
    ensure_stream(&js, "runcast", &StreamSettings::default())
        .await
        .unwrap();
    let shorter = StreamSettings {
        max_age: Duration::from_secs(600),
        ..StreamSettings::default()
    };
    let mut s = ensure_stream(&js, "runcast", &shorter).await.unwrap();
    assert_eq!(
        s.info().await.unwrap().config.max_age,
        Duration::from_secs(600)
    );

    // A stream of that name capturing other subjects is refused, not changed.
    js.create_stream(Config {
        name: "OTHER".into(),
        subjects: vec!["other.>".into()],
        ..Config::default()
    })
    .await
    .unwrap();
    let err = ensure_stream(
        &js,
        "runcast",
        &StreamSettings {
            name: "OTHER".into(),
            ..StreamSettings::default()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, NatsError::IncompatibleStream { .. }), "{err}");
    assert!(
        err.to_string().contains("runcast.runs.>"),
        "says what runcast needs: {err}"
    );
}

#[tokio::test]
async fn sdk_events_land_verbatim_with_headers_and_seqs_from_the_stream() {
    let server = NatsServer::start().await;
    let (client, stream) = setup(&server).await;
    let target = Arc::new(NatsTarget::new(client, "runcast"));
    let p = Publisher::new(target.clone(), "job-1").unwrap();
    let s1 = p.status("starting").await.unwrap();
    let s2 = p.progress(3, 10).await.unwrap();
    assert!(s2 > s1, "seqs increase: {s1} then {s2}");

    let mut ev = NewEvent::new(
        EventKind::Log,
        serde_json::value::RawValue::from_string(r#"{ "line" : "spaced  as sent" }"#.into())
            .unwrap(),
    );
    ev.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
    let s3 = p.batch(vec![ev]).await.unwrap()[0];

    let msg = stream.get_raw_message(s2).await.unwrap();
    assert_eq!(msg.subject.as_str(), "runcast.runs.job-1.progress");
    assert_eq!(&msg.payload[..], br#"{"done":3,"total":10}"#);
    let msg = stream.get_raw_message(s3).await.unwrap();
    assert_eq!(msg.subject.as_str(), "runcast.runs.job-1.log");
    assert_eq!(
        &msg.payload[..],
        br#"{ "line" : "spaced  as sent" }"#,
        "payload is the data, verbatim"
    );
    let h = msg.headers;
    assert_eq!(
        h.get("traceparent").unwrap().as_str(),
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert!(
        h.get(async_nats::header::NATS_MESSAGE_ID).is_some(),
        "every event carries an idempotency key"
    );
}

#[tokio::test]
async fn the_same_msg_id_is_stored_once() {
    let server = NatsServer::start().await;
    let (client, mut stream) = setup(&server).await;
    let target = NatsTarget::new(client, "runcast");
    let ev = NewEvent::json(EventKind::Progress, &serde_json::json!({"done": 1})).unwrap();
    let a = target
        .publish_one(&run("idem"), &ev, "fixed-id-1")
        .await
        .unwrap();
    let b = target
        .publish_one(&run("idem"), &ev, "fixed-id-1")
        .await
        .unwrap();
    assert_eq!(
        a, b,
        "a repeated Nats-Msg-Id is acknowledged with the original seq"
    );
    let c = target
        .publish_one(&run("idem"), &ev, "fixed-id-2")
        .await
        .unwrap();
    assert!(c > a);
    assert_eq!(stream.info().await.unwrap().state.messages, 2);
}

#[tokio::test]
async fn plain_core_nats_publishes_are_captured_like_any_other() {
    let server = NatsServer::start().await;
    let (client, mut stream) = setup(&server).await;
    // What `nats pub runcast.runs.r1.progress '{"done":3,"total":10}'` sends.
    client
        .publish(
            "runcast.runs.r1.progress",
            r#"{"done":3,"total":10}"#.into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    let mut stored = 0;
    for _ in 0..100 {
        stored = stream.info().await.unwrap().state.messages;
        if stored == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stored, 1);
    let msg = stream
        .direct_get_last_for_subject("runcast.runs.r1.progress")
        .await
        .unwrap();
    assert_eq!(&msg.payload[..], br#"{"done":3,"total":10}"#);
}

#[tokio::test]
async fn an_outage_is_retried_then_reported_and_a_recovery_stores_once() {
    let mut server = NatsServer::start().await;
    let (client, mut stream) = setup(&server).await;
    let target = Arc::new(
        NatsTarget::new(client.clone(), "runcast").with_retries(3, Duration::from_millis(300)),
    );
    let ev = NewEvent::json(EventKind::Log, &serde_json::json!({"line": "x"})).unwrap();

    server.kill();
    let started = std::time::Instant::now();
    let err = target
        .publish_one(&run("outage"), &ev, "outage-1")
        .await
        .unwrap_err();
    assert_eq!(err.kind, PublishErrorKind::Unavailable, "{}", err.message);
    assert!(err.message.contains("3 attempts"), "{}", err.message);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded: {:?}",
        started.elapsed()
    );

    // Publish while down, and bring the server back during the retries:
    // the client reconnects and the event is stored once.
    let patient =
        Arc::new(NatsTarget::new(client, "runcast").with_retries(40, Duration::from_millis(500)));
    let p = patient.clone();
    let ev2 = ev.clone();
    let publishing =
        tokio::spawn(async move { p.publish_one(&run("outage"), &ev2, "outage-2").await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.restart().await;
    let seq = tokio::time::timeout(Duration::from_secs(30), publishing)
        .await
        .unwrap()
        .unwrap()
        .expect("stored after recovery");
    let msg = stream.get_raw_message(seq).await.unwrap();
    assert_eq!(msg.subject.as_str(), "runcast.runs.outage.log");
    // The client buffered the first, failed attempts too and sent them on
    // reconnect; each Nats-Msg-Id is still stored at most once.
    let total = stream.info().await.unwrap().state.messages;
    let mut ids = Vec::new();
    for seq in 1..=stream.info().await.unwrap().state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            ids.push(
                m.headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .unwrap()
                    .to_string(),
            );
        }
    }
    assert_eq!(ids.len() as u64, total);
    assert_eq!(
        ids.iter().filter(|i| *i == "outage-2").count(),
        1,
        "stored exactly once: {ids:?}"
    );
    assert!(
        ids.iter().filter(|i| *i == "outage-1").count() <= 1,
        "never twice: {ids:?}"
    );
}

#[tokio::test]
async fn connect_errors_are_clear() {
    let cfg = NatsConfig {
        connect_timeout: Duration::from_millis(300),
        ..NatsConfig::with_urls("nats://127.0.0.1:1")
    };
    let err = connect(&cfg, false).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot connect to NATS at nats://127.0.0.1:1"),
        "{err}"
    );
    let err = connect(
        &NatsConfig {
            user: Some("u".into()),
            ..NatsConfig::default()
        },
        false,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("user and password must be given together"),
        "{err}"
    );
    let err = connect(
        &NatsConfig {
            tls_ca: Some("/nonexistent/ca.pem".into()),
            ..NatsConfig::default()
        },
        false,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[tokio::test]
async fn user_password_and_token_auth_work_and_wrong_credentials_are_clear() {
    let secured = NatsServer::start_with("authorization { user: runcast, password: s3cret }").await;
    let good = NatsConfig {
        user: Some("runcast".into()),
        password: Some("s3cret".into()),
        ..NatsConfig::with_urls(secured.url())
    };
    let client = connect(&good, false)
        .await
        .expect("right credentials connect");
    let js = jetstream::new(client.clone());
    ensure_stream(&js, "runcast", &StreamSettings::default())
        .await
        .unwrap();
    let seq = NatsTarget::new(client, "runcast")
        .publish_one(
            &run("authed"),
            &NewEvent::json(EventKind::Log, &1).unwrap(),
            "auth-1",
        )
        .await
        .unwrap();
    assert!(seq >= 1);

    let wrong = NatsConfig {
        password: Some("nope".into()),
        connect_timeout: Duration::from_secs(2),
        ..good.clone()
    };
    let err = connect(&wrong, false).await.unwrap_err().to_string();
    assert!(
        err.contains("cannot connect to NATS") && err.to_lowercase().contains("authorization"),
        "{err}"
    );
    let anonymous = NatsConfig {
        connect_timeout: Duration::from_secs(2),
        ..NatsConfig::with_urls(secured.url())
    };
    assert!(
        connect(&anonymous, false).await.is_err(),
        "no credentials, no connection"
    );

    let tokened = NatsServer::start_with("authorization { token: t0ken }").await;
    let ok = NatsConfig {
        token: Some("t0ken".into()),
        ..NatsConfig::with_urls(tokened.url())
    };
    connect(&ok, false).await.expect("right token connects");
    let bad = NatsConfig {
        token: Some("other".into()),
        connect_timeout: Duration::from_secs(2),
        ..ok.clone()
    };
    assert!(connect(&bad, false).await.is_err());
}

#[tokio::test]
async fn tls_with_the_given_ca_works_and_without_it_fails() {
    let certs = runcast_test_support::nats::TempDir::new("runcast-tls");
    runcast_test_support::make_certs(certs.path(), &["server"]);
    let conf = format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\" }}",
        certs.path().join("server.pem").display(),
        certs.path().join("server.key").display()
    );
    let server = NatsServer::start_with(&conf).await;
    let with_ca = NatsConfig {
        tls_ca: Some(certs.path().join("ca.pem")),
        ..NatsConfig::with_urls(server.url())
    };
    let client = connect(&with_ca, false)
        .await
        .expect("TLS with the CA connects");
    ensure_stream(
        &jetstream::new(client),
        "runcast",
        &StreamSettings::default(),
    )
    .await
    .expect("JetStream over TLS");
    let without = NatsConfig {
        connect_timeout: Duration::from_secs(2),
        ..NatsConfig::with_urls(server.url())
    };
    let err = connect(&without, false)
        .await
        .expect_err("an unknown CA is refused");
    assert!(err.to_string().contains("cannot connect to NATS"), "{err}");
}

/// A batch is pipelined (every event sent before the first acknowledgement
/// is awaited): its events are still stored in order, each once, and a
/// retried batch with the same ids gets the same seqs back and stores
/// nothing new.
#[tokio::test]
async fn a_pipelined_batch_is_stored_in_order_once_and_its_retry_is_deduplicated() {
    use runcast_worker::PublishTarget;
    let server = NatsServer::start().await;
    let (client, mut stream) = setup(&server).await;
    let target = NatsTarget::new(client, "runcast");
    let batch = |n: usize| -> Vec<NewEvent> {
        (0..n)
            .map(|i| {
                let mut ev =
                    NewEvent::json(EventKind::Progress, &serde_json::json!({"i": i})).unwrap();
                ev.id = Some(format!("batch/{i}"));
                ev
            })
            .collect()
    };
    let seqs = target.publish(&run("piped"), batch(500)).await.unwrap();
    assert_eq!(seqs.len(), 500);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    for (i, &seq) in seqs.iter().enumerate().step_by(97) {
        let msg = stream.get_raw_message(seq).await.unwrap();
        assert_eq!(
            std::str::from_utf8(&msg.payload).unwrap(),
            format!(r#"{{"i":{i}}}"#)
        );
    }
    let again = target.publish(&run("piped"), batch(500)).await.unwrap();
    assert_eq!(again, seqs, "a retry gets the first copies' seqs");
    assert_eq!(stream.info().await.unwrap().state.messages, 500);
}
