//! Why a publish to NATS failed, told by kind: an event too large for the
//! server or the stream is `EventTooLarge` with the size NATS counts and the
//! limit it is over, a stream with no room is `NoSpace` (a 507 on the HTTP
//! API), and a stopped server is `Unavailable`. Each failure is made real on
//! a nats-server; none is classified by its message.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{
    self,
    stream::{DiscardPolicy, Stream},
};
use runcast_bus::{Bus, BusError};
use runcast_core::{EventKind, NewEvent, RunId};
use runcast_gateway::Config;
use runcast_nats::{NatsBus, NatsConfig, NatsTarget, StreamSettings};
use runcast_test_support::{TestGateway, http, json, nats::NatsServer};
use runcast_worker::{PublishErrorKind, Publisher};

/// A log event whose data (a JSON string) is exactly `len` bytes.
fn data(len: usize) -> NewEvent {
    let raw = format!("\"{}\"", "x".repeat(len - 2));
    NewEvent::new(
        EventKind::Log,
        serde_json::value::RawValue::from_string(raw).unwrap(),
    )
}

async fn ready_bus(server: &NatsServer) -> NatsBus {
    let (bus, _setup) = NatsBus::start(
        &NatsConfig::with_urls(server.url()),
        StreamSettings::default(),
    )
    .await
    .unwrap();
    bus.ready(Duration::from_secs(10))
        .await
        .expect("NATS bus ready");
    bus
}

/// The size of the header block of the message stored at `seq` (only a
/// `Nats-Msg-Id`, as the bus sends events without a traceparent), counted
/// as NATS counts it: `NATS/1.0`, one line per header, a blank line.
async fn header_len(stream: &Stream, seq: u64) -> usize {
    let m = stream.get_raw_message(seq).await.unwrap();
    let id = m
        .headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .expect("every event has a Nats-Msg-Id")
        .as_str()
        .len();
    "NATS/1.0\r\n".len() + "Nats-Msg-Id: ".len() + id + "\r\n".len() + "\r\n".len()
}

async fn events_stream(bus: &NatsBus) -> (jetstream::Context, Stream) {
    let js = jetstream::new(bus.client().clone());
    let stream = js.get_stream("RUNCAST_EVENTS").await.unwrap();
    (js, stream)
}

/// The stream's own limit, lowered behind the bus's back, is enforced by
/// the server: the refusal (JetStream error 10054) is `EventTooLarge` with
/// the message's real size and the stream's limit. Real: one byte less is
/// stored, so the bus counts exactly what the server counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_streams_limit_is_too_large_with_its_real_size_and_that_limit() {
    let server = NatsServer::start().await;
    let bus = ready_bus(&server).await;
    let run = RunId::parse("big").unwrap();
    let first = bus.publish(&run, vec![data(10)]).await.unwrap()[0];
    let (js, mut stream) = events_stream(&bus).await;
    // Ids of the bus's next events have the same length (its counter
    // stays below 10 here).
    let headers = header_len(&stream, first).await;

    let mut config = stream.info().await.unwrap().config.clone();
    config.max_message_size = 1000;
    js.update_stream(&config).await.unwrap();

    let started = std::time::Instant::now();
    let err = bus
        .publish(&run, vec![data(1000 - headers + 1)])
        .await
        .unwrap_err();
    assert_eq!(
        err,
        BusError::EventTooLarge {
            size: 1001,
            limit: Some(1000)
        }
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused without retries: {:?}",
        started.elapsed()
    );
    bus.publish(&run, vec![data(1000 - headers)])
        .await
        .expect("a message of exactly the stream's limit is stored");

    // The SDK's NATS target, which does not know the stream's limit, gets
    // the same refusal as `Rejected`, with the size and the limit.
    let target = Arc::new(NatsTarget::new(bus.client().clone(), "runcast"));
    let fixed_id_headers = "NATS/1.0\r\nNats-Msg-Id: fixed-1\r\n\r\n".len();
    let err = target
        .publish_one(&run, &data(1000 - fixed_id_headers + 1), "fixed-1")
        .await
        .unwrap_err();
    assert_eq!(err.kind, PublishErrorKind::Rejected, "{}", err.message);
    assert!(
        err.message.contains("1001 bytes") && err.message.contains("its limit is 1000 bytes"),
        "{}",
        err.message
    );
    let p = Publisher::new(target, "big").unwrap();
    let e = p.log(&"y".repeat(2000)).await.unwrap_err();
    assert_eq!(e.kind, PublishErrorKind::Rejected, "{}", e.message);
}

/// Over the server's max_payload (here 4096), an event is refused before
/// anything is sent: its whole batch stays unstored, and the error gives
/// the message's real size and the server's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_max_payload_is_refused_up_front_with_its_real_size() {
    let server = NatsServer::start_with("max_payload: 4096").await;
    let bus = ready_bus(&server).await;
    let run = RunId::parse("payload").unwrap();
    let first = bus.publish(&run, vec![data(10)]).await.unwrap()[0];
    let (_, mut stream) = events_stream(&bus).await;
    let headers = header_len(&stream, first).await;

    let err = bus
        .publish(&run, vec![data(10), data(4096 - headers + 1)])
        .await
        .unwrap_err();
    assert_eq!(
        err,
        BusError::EventTooLarge {
            size: 4097,
            limit: Some(4096)
        }
    );
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        1,
        "nothing of the refused batch was stored"
    );
    bus.publish(&run, vec![data(4096 - headers)])
        .await
        .expect("a message of exactly max_payload is stored");
}

/// A stream at a limit that refuses new messages (discard-new, its
/// message limit reached: JetStream error 10077) is `NoSpace`, which the
/// gateway's HTTP API answers 507 `capacity`, not a 413 or a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_no_room_is_no_space_and_a_507() {
    let server = NatsServer::start().await;
    let bus = ready_bus(&server)
        .await
        .with_publish_retries(2, Duration::from_secs(2));
    let run = RunId::parse("full").unwrap();
    bus.publish(&run, vec![data(10), data(10)]).await.unwrap();
    let (js, mut stream) = events_stream(&bus).await;
    let mut config = stream.info().await.unwrap().config.clone();
    config.discard = DiscardPolicy::New;
    config.max_messages = 2;
    js.update_stream(&config).await.unwrap();

    let err = bus.publish(&run, vec![data(10)]).await.unwrap_err();
    assert!(matches!(err, BusError::NoSpace(_)), "{err:?}");
    assert!(
        err.to_string().contains("maximum messages"),
        "the server's reason is kept: {err}"
    );

    let gw = TestGateway::on(Arc::new(bus), Config::default(), "nats").await;
    let (status, _, body) = http(
        gw.addr,
        "POST",
        "/v1/runs/full/events",
        &[],
        r#"{"kind":"log","data":1}"#,
    )
    .await;
    assert_eq!(status, 507, "{body}");
    assert_eq!(json(&body)["error"]["code"], "capacity", "{body}");
}

/// A stopped server: every attempt goes unacknowledged, and the publish
/// ends as `Unavailable` (retry), from the bus and through the SDK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_is_unavailable() {
    let mut server = NatsServer::start().await;
    let bus = ready_bus(&server)
        .await
        .with_publish_retries(2, Duration::from_millis(300));
    let run = RunId::parse("stopped").unwrap();
    bus.publish(&run, vec![data(10)]).await.unwrap();

    server.kill();
    let started = std::time::Instant::now();
    let err = bus.publish(&run, vec![data(10)]).await.unwrap_err();
    assert!(matches!(err, BusError::Unavailable(_)), "{err:?}");
    assert!(
        err.to_string().contains("after 2 attempts"),
        "says what was tried: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the retries: {:?}",
        started.elapsed()
    );
    let e = Publisher::on_bus(Arc::new(bus), "stopped")
        .unwrap()
        .progress(1, 2)
        .await
        .unwrap_err();
    assert_eq!(e.kind, PublishErrorKind::Unavailable, "{}", e.message);
}
