//! Built-in TLS over real sockets: a WebSocket client that trusts the test CA
//! gets its events over TLS; replacing the certificate files changes what new
//! connections see while open ones keep streaming; a bad replacement is
//! refused and counted, the previous certificate stays; bad files at start
//! are clear errors; a silent TLS client is cut off at the handshake timeout.

use std::{path::Path, sync::Arc, time::Duration};

use runcast_bus::Retention;
use runcast_core::{EventKind, NewEvent, RunId};
use runcast_gateway::{
    Config,
    tls::{Tls, TlsFiles},
};
use runcast_test_support::{TestGateway, make_certs, metric, nats::TempDir};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio_rustls::{
    TlsConnector,
    rustls::{
        ClientConfig, RootCertStore,
        pki_types::{CertificateDer, ServerName, pem::PemObject},
    },
};
use tokio_tungstenite::tungstenite::Message;

type TlsWs =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

fn connector(ca: &Path) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // A resumed session reports the certificate of the session it resumed,
    // not the one the server holds now.
    config.resumption = tokio_rustls::rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

/// Opens a WebSocket over TLS; returns it, the hello frame and the leaf
/// certificate the server presented.
async fn wss(gw: &TestGateway, tls: &TlsConnector) -> (TlsWs, Value, CertificateDer<'static>) {
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let stream = tls.connect(name, tcp).await.expect("TLS handshake");
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    let url = format!("wss://127.0.0.1:{}/v1/ws", gw.addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    let hello = next_json(&mut ws).await;
    (ws, hello, leaf)
}

async fn next_json(ws: &mut TlsWs) -> Value {
    use futures_util::StreamExt;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).unwrap(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

async fn send(ws: &mut TlsWs, v: Value) {
    use futures_util::SinkExt;
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

fn der(pem: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(pem).unwrap()
}

/// Replaces a file the way a Kubernetes Secret volume or certbot does:
/// write elsewhere, then rename over it.
fn replace(dir: &Path, from: &str, to: &str) {
    let tmp = dir.join(format!("{to}.tmp"));
    std::fs::copy(dir.join(from), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join(to)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_works_and_certificates_reload_without_dropping_clients() {
    let dir = TempDir::new("runcast-gw-tls");
    let d = dir.path();
    make_certs(d, &["one", "two"]);
    replace(d, "one.pem", "tls.crt");
    replace(d, "one.key", "tls.key");
    let tls = Tls::load(TlsFiles {
        cert: d.join("tls.crt"),
        key: d.join("tls.key"),
        reload_interval: Duration::from_millis(100),
    })
    .unwrap();
    let gw = TestGateway::with(
        Config {
            tls: Some(tls),
            handshake_timeout: Duration::from_millis(700),
            ..Config::default()
        },
        Retention::default(),
    )
    .await;
    let client = connector(&d.join("ca.pem"));
    let run = RunId::parse("secure").unwrap();
    let publish = |i: u64| {
        let bus = gw.bus();
        let run = run.clone();
        async move {
            let ev = NewEvent::json(EventKind::Progress, &serde_json::json!({ "i": i })).unwrap();
            bus.publish(&run, vec![ev]).await.unwrap()[0]
        }
    };

    let (mut first, hello, leaf) = wss(&gw, &client).await;
    assert_eq!(hello["type"], "hello");
    assert_eq!(leaf, der(&d.join("one.pem")));
    send(
        &mut first,
        serde_json::json!({"type": "subscribe", "run": "secure"}),
    )
    .await;
    assert_eq!(next_json(&mut first).await["type"], "state");
    publish(1).await;
    assert_eq!(next_json(&mut first).await["seq"], 1);

    // Plain HTTP to the TLS port gets nothing back and is counted.
    let (status_line, _) = {
        let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        use tokio::io::AsyncWriteExt;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
        (String::from_utf8_lossy(&buf).into_owned(), ())
    };
    assert!(!status_line.contains("200 OK"), "{status_line}");

    // New files: new connections see the new certificate within a few polls.
    replace(d, "two.key", "tls.key");
    replace(d, "two.pem", "tls.crt");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_ws, _, leaf) = wss(&gw, &client).await;
        if leaf == der(&d.join("two.pem")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "certificate not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection opened before the reload still streams.
    publish(2).await;
    assert_eq!(next_json(&mut first).await["seq"], 2);

    // A broken replacement is refused; the last good certificate stays.
    std::fs::write(
        d.join("tls.crt"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = gw.gw.metrics.render();
        if metric(&m, r#"runcast_tls_reloads_total{result="error"}"#).unwrap_or(0.0) >= 1.0 {
            assert!(metric(&m, r#"runcast_tls_reloads_total{result="ok"}"#).unwrap() >= 1.0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "bad file not noticed: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_ws, _, leaf) = wss(&gw, &client).await;
    assert_eq!(leaf, der(&d.join("two.pem")));

    // A client that opens TCP and never says hello is closed at the deadline.
    let t0 = std::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    let m = gw.gw.metrics.render();
    assert!(metric(&m, r#"runcast_timeouts_total{stage="handshake"}"#).unwrap() >= 1.0);
    assert!(
        metric(&m, "runcast_tls_handshake_failures_total").unwrap() >= 1.0,
        "{m}"
    );
}

#[test]
fn bad_certificate_files_are_refused_with_the_reason() {
    let dir = TempDir::new("runcast-gw-tls-bad");
    let d = dir.path();
    make_certs(d, &["one", "two"]);
    let load = |cert: &str, key: &str| {
        Tls::load(TlsFiles {
            cert: d.join(cert),
            key: d.join(key),
            reload_interval: Duration::from_secs(10),
        })
        .err()
        .unwrap_or_else(|| panic!("{cert} + {key} was accepted"))
    };
    let e = load("one.pem", "two.key");
    assert!(e.contains("do not make a usable pair"), "{e}");
    let e = load("missing.pem", "one.key");
    assert!(e.contains("missing.pem"), "{e}");
    std::fs::write(d.join("empty.pem"), "").unwrap();
    let e = load("empty.pem", "one.key");
    assert!(e.contains("no CERTIFICATE"), "{e}");
    let e = load("one.pem", "one.pem");
    assert!(e.contains("TLS key"), "{e}");
    assert!(
        Tls::load(TlsFiles {
            cert: d.join("one.pem"),
            key: d.join("one.key"),
            reload_interval: Duration::from_secs(10),
        })
        .is_ok()
    );
}
