//! The NATS permissions example in docs/security.md, run against a real
//! nats-server: a gateway user can set up and serve runcast, a worker user
//! can publish events (and have them acknowledged) and nothing else.

use std::time::Duration;

use async_nats::jetstream;
use runcast_bus::Bus;
use runcast_core::{EventKind, NewEvent, RunId};
use runcast_nats::{NatsBus, NatsConfig, StreamSettings};
use runcast_test_support::nats::NatsServer;

/// The `hcl` block of docs/security.md, with passwords filled in.
fn documented_authorization() -> String {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/security.md"),
    )
    .unwrap();
    let block = doc
        .split("```hcl\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("docs/security.md has an hcl block");
    block
        .replace("$WORKER_PASS", "\"wpass\"")
        .replace("$GATEWAY_PASS", "\"gpass\"")
}

fn user(server: &NatsServer, name: &str, pass: &str) -> NatsConfig {
    NatsConfig {
        user: Some(name.into()),
        password: Some(pass.into()),
        connect_timeout: Duration::from_secs(3),
        ..NatsConfig::with_urls(server.url())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_permissions_let_each_role_do_its_job_and_no_more() {
    let server = NatsServer::start_with(&documented_authorization()).await;

    // The gateway sets up the stream and bucket and serves publishes, reads
    // and state.
    let (bus, _setup) = NatsBus::start(
        &user(&server, "gateway", "gpass"),
        StreamSettings::default(),
    )
    .await
    .unwrap();
    bus.ready(Duration::from_secs(10))
        .await
        .expect("the gateway user can set up runcast");
    let run = RunId::parse("perm-run").unwrap();
    let seqs = bus
        .publish(
            &run,
            vec![NewEvent::json(EventKind::Log, &"from the HTTP API").unwrap()],
        )
        .await
        .expect("the gateway publishes for the HTTP API");

    // A worker publishes with a plain NATS client, acknowledged.
    let worker =
        async_nats::ConnectOptions::with_user_and_password("worker".into(), "wpass".into())
            .connect(server.url())
            .await
            .unwrap();
    let js = jetstream::new(worker.clone());
    let ack = js
        .publish(
            "runcast.runs.perm-run.progress",
            r#"{"done":1,"total":2}"#.into(),
        )
        .await
        .unwrap()
        .await
        .expect("the worker's publish is acknowledged");
    assert!(ack.sequence > seqs[0]);
    // The gateway serves it.
    let page = bus.read(&run, 1, 10).await.unwrap();
    assert_eq!(page.events.len(), 2);

    // Anything else is denied: other subjects, and the JetStream API (here:
    // deleting the stream).
    // A denied request gets no answer: bounded waits, a timeout is a "no".
    let denied =
        tokio::time::timeout(Duration::from_secs(2), js.delete_stream("RUNCAST_EVENTS")).await;
    assert!(
        !matches!(denied, Ok(Ok(_))),
        "a worker must not manage the stream"
    );
    let other = tokio::time::timeout(Duration::from_secs(3), async {
        match js.publish("billing.invoices", "x".into()).await {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(
        !matches!(other, Ok(true)),
        "a worker's publish outside runcast.runs.> must not be stored"
    );
    let info = tokio::time::timeout(
        Duration::from_secs(2),
        jetstream::new(worker).get_stream("RUNCAST_EVENTS"),
    )
    .await;
    assert!(
        !matches!(info, Ok(Ok(_))),
        "a worker cannot read stream info"
    );
    assert!(
        bus.read(&run, 1, 10).await.unwrap().events.len() == 2,
        "the stream is intact"
    );
}
