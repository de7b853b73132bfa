//! The worker SDK's HTTP publisher retries a publish whose answer was lost,
//! with the same `Idempotency-Key`, and the gateway stores it once.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use runcast_core::{EventKind, NewEvent, RunId};
use runcast_test_support::{TestGateway, http, json, seqs};
use runcast_worker::{HttpTarget, PublishTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A proxy to `upstream` that, for the first `drop_first` connections,
/// passes the request on and then cuts the client off before the answer:
/// the event is stored, and the publisher cannot know.
async fn answer_losing_proxy(
    upstream: SocketAddr,
    drop_first: usize,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut server = tokio::net::TcpStream::connect(upstream).await.unwrap();
                if n < drop_first {
                    // One request (small: headers and body in one read),
                    // passed on; the answer is read and thrown away.
                    let mut buf = vec![0u8; 64 << 10];
                    let got = client.read(&mut buf).await.unwrap_or(0);
                    server.write_all(&buf[..got]).await.unwrap();
                    let _ = server.read(&mut buf).await;
                    drop(client);
                } else {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_whose_answer_was_lost_is_retried_and_stored_once() {
    let gw = TestGateway::start().await;
    let (proxy, connections) = answer_losing_proxy(gw.addr, 1).await;
    let target = HttpTarget::new(&format!("http://{proxy}")).unwrap();
    let run = RunId::parse("retry").unwrap();
    let batch = vec![
        NewEvent::json(EventKind::Log, &"a").unwrap(),
        NewEvent::json(EventKind::Log, &"b").unwrap(),
    ];
    let got = target
        .publish(&run, batch)
        .await
        .expect("the retry succeeds");
    assert_eq!(got, [1, 2], "the retry gets the first copy's seqs");
    assert!(connections.load(Ordering::SeqCst) >= 2, "it was retried");
    let (_, _, text) = http(gw.addr, "GET", "/v1/runs/retry/events", &[], "").await;
    assert_eq!(
        seqs(json(&text)["events"].as_array().unwrap(), "retry"),
        [1, 2],
        "stored once"
    );
    // A later publish is a new one, with a new key.
    let next = target
        .publish(&run, vec![NewEvent::json(EventKind::Log, &"c").unwrap()])
        .await
        .unwrap();
    assert_eq!(next, [3]);
}

/// Without its idempotency key the same retry would store the batch twice:
/// what the key prevents, shown with the gateway's own API.
#[tokio::test]
async fn without_a_key_a_repeated_publish_is_stored_twice() {
    let gw = TestGateway::start().await;
    let body = r#"[{"kind":"log","data":"a"},{"kind":"log","data":"b"}]"#;
    http(gw.addr, "POST", "/v1/runs/twice/events", &[], body).await;
    http(gw.addr, "POST", "/v1/runs/twice/events", &[], body).await;
    let (_, _, text) = http(gw.addr, "GET", "/v1/runs/twice/events", &[], "").await;
    assert_eq!(json(&text)["events"].as_array().unwrap().len(), 4);
}
