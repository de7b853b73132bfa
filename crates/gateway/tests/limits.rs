//! Per-address session limits over real sockets: one address that holds too
//! many sessions, or opens them too fast, gets 429 while another address's
//! client keeps receiving every event. Behind a trusted proxy the address
//! comes from X-Forwarded-For; from anyone else that header is ignored.

use std::time::Duration;

use futures_util::StreamExt;
use runcast_bus::Retention;
use runcast_gateway::Config;
use runcast_test_support::{TestGateway, WsClient, http, json, metric};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn from(gw: &TestGateway, xff: &str) -> Result<Ws, (u16, String)> {
    let mut req = format!("ws://{}/v1/ws", gw.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("x-forwarded-for", HeaderValue::from_str(xff).unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err((
            r.status().as_u16(),
            String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_over_its_cap_is_refused_and_others_are_served() {
    let gw = TestGateway::with(
        Config {
            max_sessions_per_ip: 3,
            trusted_proxies: vec!["127.0.0.0/8".parse().unwrap()],
            ..Config::default()
        },
        Retention::default(),
    )
    .await;
    // A healthy client behind the same proxy, another address.
    let mut healthy = {
        let mut req = format!("ws://{}/v1/ws", gw.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("x-forwarded-for", HeaderValue::from_static("198.51.100.2"));
        let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        ws
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(from(&gw, "203.0.113.1").await.unwrap());
    }
    let (status, body) = from(&gw, "203.0.113.1").await.err().unwrap();
    assert_eq!(status, 429);
    assert_eq!(json(&body)["error"]["code"], "rate_limited");
    // A forged hop left of the trusted proxy's entry does not help.
    assert_eq!(
        from(&gw, "10.9.9.9, 203.0.113.1").await.err().unwrap().0,
        429
    );
    // Closing one frees a slot.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match from(&gw, "203.0.113.1").await {
            Ok(ws) => {
                held.push(ws);
                break;
            }
            Err((429, _)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    // The healthy client got every event meanwhile.
    use futures_util::SinkExt;
    healthy
        .send(tokio_tungstenite::tungstenite::Message::text(
            r#"{"type":"subscribe","run":"ok-run"}"#,
        ))
        .await
        .unwrap();
    // Publish only once subscribed (its state frame came), so every event
    // arrives live.
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), healthy.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if m.to_text().unwrap().contains(r#""type":"state""#) {
            break;
        }
    }
    let p = runcast_worker::Publisher::on_bus(gw.bus(), "ok-run").unwrap();
    for i in 0..20 {
        p.progress(i, 20).await.unwrap();
    }
    let mut seqs = Vec::new();
    while seqs.len() < 20 {
        let m = tokio::time::timeout(Duration::from_secs(5), healthy.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let f: serde_json::Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
        if f["type"] == "event" {
            seqs.push(f["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    let (_, _, scrape) = http(gw.addr, "GET", "/metrics", &[], "").await;
    // Two refusals above, plus any retries while the server noticed the close.
    let refused = metric(
        &scrape,
        r#"runcast_refused_sessions_total{reason="per_ip"}"#,
    )
    .unwrap();
    assert!(refused >= 2.0, "{refused}");
}

#[tokio::test]
async fn an_address_opening_sessions_too_fast_is_slowed_down() {
    let gw = TestGateway::with(
        Config {
            session_rate_per_ip: 2.0,
            ..Config::default()
        },
        Retention::default(),
    )
    .await;
    // No trusted proxy: X-Forwarded-For is ignored, every client is 127.0.0.1.
    let mut ok = 0;
    let mut refused = 0;
    let mut keep = Vec::new();
    for i in 0..8 {
        match from(&gw, &format!("203.0.113.{i}")).await {
            Ok(ws) => {
                ok += 1;
                keep.push(ws);
            }
            Err((429, _)) => refused += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!((ok, refused), (4, 4), "a burst of twice the rate, then 429");
    // SSE sessions count too.
    let (status, h, _) = http(gw.addr, "GET", "/v1/runs/r/stream", &[], "").await;
    assert_eq!(status, 429);
    assert_eq!(h["retry-after"], "1");
    // After a second the address may open sessions again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let _again = WsClient::connect(&gw.ws_url()).await;
}
