//! Subscriber tokens on the wire: how a client presents its token (header,
//! WebSocket subprotocol, query parameter), what it may watch, and what
//! happens when the token expires on a live connection: a refresh keeps the
//! subscription without loss, no refresh closes with 4003 and the client
//! resumes with a fresh token.

use std::{sync::Arc, time::Duration};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header, encode};
use runcast_bus::Retention;
use runcast_gateway::{Config, auth::Auth};
use runcast_test_support::{SseReader, TestGateway, http, json, metric};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest, http::HeaderValue};

const SECRET: &[u8] = b"subscriber-auth-test-secret-32bytes!";

fn now() -> u64 {
    runcast_core::now_millis() / 1000
}

fn token(ttl: u64, runs: &[&str], prefixes: &[&str]) -> String {
    encode(
        &Header::default(),
        &json!({"sub": "u1", "exp": now() + ttl, "runs": runs, "run_prefixes": prefixes}),
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

async fn gateway() -> TestGateway {
    let mut auth = Auth::default();
    auth.add_hs256_secret(None, SECRET).unwrap();
    TestGateway::with(
        Config {
            auth: Arc::new(auth),
            ..Config::default()
        },
        Retention::default(),
    )
    .await
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects with `header` set; the handshake's HTTP status on refusal.
async fn ws(
    gw: &TestGateway,
    path: &str,
    header: Option<(&'static str, String)>,
) -> Result<(Ws, Option<String>), u16> {
    let mut req = format!("ws://{}{path}", gw.addr)
        .into_client_request()
        .unwrap();
    if let Some((k, v)) = header {
        req.headers_mut()
            .insert(k, HeaderValue::from_str(&v).unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, resp)) => Ok((
            ws,
            resp.headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap().to_owned()),
        )),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next JSON frame, or the close code.
async fn next(ws: &mut Ws) -> Result<Value, Option<u16>> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Ok(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(Message::Close(c)))) => return Err(c.map(|c| u16::from(c.code))),
            Ok(Some(Ok(_))) => {}
            Ok(_) => return Err(None),
            Err(_) => panic!("no frame within 10 s"),
        }
    }
}

/// A WebSocket with `token` in its Authorization header, subscribed to
/// `run` (its state frame read).
async fn subscribed(gw: &TestGateway, token: &str, run: &str) -> Ws {
    let (mut w, _) = ws(
        gw,
        "/v1/ws",
        Some(("authorization", format!("Bearer {token}"))),
    )
    .await
    .unwrap();
    until(&mut w, "hello").await;
    send(&mut w, json!({"type": "subscribe", "run": run})).await;
    until(&mut w, "state").await;
    w
}

async fn until(ws: &mut Ws, ty: &str) -> Value {
    loop {
        let f = next(ws)
            .await
            .unwrap_or_else(|c| panic!("closed with {c:?} waiting for {ty}"));
        if f["type"] == ty {
            return f;
        }
    }
}

#[tokio::test]
async fn tokens_travel_three_ways_and_scope_what_a_client_sees() {
    let gw = gateway().await;
    let t = token(300, &["r-1"], &["team-a-"]);

    // No token: refused before the upgrade; counted.
    assert_eq!(ws(&gw, "/v1/ws", None).await.err(), Some(401));
    assert_eq!(
        ws(
            &gw,
            "/v1/ws",
            Some(("authorization", "Bearer garbage".into()))
        )
        .await
        .err(),
        Some(401)
    );
    // Header.
    let (mut a, _) = ws(
        &gw,
        "/v1/ws",
        Some(("authorization", format!("Bearer {t}"))),
    )
    .await
    .unwrap();
    // The scheme is case-insensitive (RFC 7235): `bearer` and `BEARER` work
    // on the WebSocket, SSE and the read API alike.
    for scheme in ["bearer", "BEARER"] {
        let auth = format!("{scheme} {t}");
        assert!(
            ws(&gw, "/v1/ws", Some(("authorization", auth.clone())))
                .await
                .is_ok(),
            "{scheme}"
        );
        let (status, _) = SseReader::open_with(
            gw.addr,
            "/v1/runs/r-1/stream",
            &[("authorization", auth.as_str())],
        )
        .await;
        assert_eq!(status, 200, "{scheme} on SSE");
        let (status, _, body) = http(
            gw.addr,
            "GET",
            "/v1/runs",
            &[("authorization", auth.as_str())],
            "",
        )
        .await;
        assert_eq!(status, 200, "{scheme} on the read API: {body}");
    }
    // Subprotocol (browsers): runcast.v1 is selected, the token not echoed.
    let (mut b, proto) = ws(
        &gw,
        "/v1/ws",
        Some((
            "sec-websocket-protocol",
            format!("runcast.v1, runcast.bearer.{t}"),
        )),
    )
    .await
    .unwrap();
    assert_eq!(proto.as_deref(), Some("runcast.v1"));
    // Query parameter.
    let (mut c, _) = ws(&gw, &format!("/v1/ws?access_token={t}"), None)
        .await
        .unwrap();

    for w in [&mut a, &mut b, &mut c] {
        assert_eq!(until(w, "hello").await["anonymous"], false);
        send(w, json!({"type": "subscribe", "run": "r-1"})).await;
        assert_eq!(until(w, "state").await["run"], "r-1");
        send(w, json!({"type": "subscribe", "run": "team-a-build"})).await;
        until(w, "state").await;
        // Outside the scope: an error frame, the connection stays.
        send(w, json!({"type": "subscribe", "run": "r-2"})).await;
        let e = until(w, "error").await;
        assert_eq!(
            (e["code"].as_str(), e["run"].as_str()),
            (Some("forbidden"), Some("r-2"))
        );
        send(w, json!({"type": "ping"})).await;
        until(w, "pong").await;
    }

    // The HTTP read API and SSE follow the same rules.
    let bearer = format!("Bearer {t}");
    let auth = [("authorization", bearer.as_str())];
    let p = runcast_worker::Publisher::on_bus(gw.bus(), "r-1").unwrap();
    p.log("x").await.unwrap();
    runcast_worker::Publisher::on_bus(gw.bus(), "r-2")
        .unwrap()
        .log("y")
        .await
        .unwrap();
    assert_eq!(http(gw.addr, "GET", "/v1/runs/r-1", &[], "").await.0, 401);
    assert_eq!(http(gw.addr, "GET", "/v1/runs/r-1", &auth, "").await.0, 200);
    assert_eq!(http(gw.addr, "GET", "/v1/runs/r-2", &auth, "").await.0, 403);
    assert_eq!(
        http(gw.addr, "GET", "/v1/runs/r-2/events", &auth, "")
            .await
            .0,
        403
    );
    let (_, _, list) = http(gw.addr, "GET", "/v1/runs", &auth, "").await;
    let names: Vec<String> = json(&list)["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["r-1"], "only the runs the token covers are listed");
    assert_eq!(
        http(gw.addr, "GET", "/v1/runs/r-2/stream", &auth, "")
            .await
            .0,
        403
    );
    assert_eq!(
        http(gw.addr, "GET", "/v1/runs/r-1/stream", &[], "").await.0,
        401
    );

    let (_, _, scrape) = http(gw.addr, "GET", "/metrics", &[], "").await;
    assert!(metric(&scrape, r#"runcast_auth_failures_total{reason="missing"}"#).unwrap() >= 3.0);
    assert_eq!(
        metric(
            &scrape,
            r#"runcast_auth_failures_total{reason="malformed"}"#
        ),
        Some(1.0)
    );
    assert!(!scrape.contains(&t), "no token in the metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_token_keeps_the_subscription_without_loss() {
    let gw = gateway().await;
    // Expires in 6 s: the server asks for a fresh token about 5 s before.
    let mut w = subscribed(&gw, &token(6, &["live"], &[]), "live").await;
    let bus = gw.bus();
    let publisher = tokio::spawn(async move {
        let p = runcast_worker::Publisher::on_bus(bus, "live").unwrap();
        for i in 0..90u64 {
            p.progress(i, 90).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut seqs = Vec::new();
    let mut refreshed = false;
    while seqs.len() < 90 {
        let f = next(&mut w)
            .await
            .unwrap_or_else(|c| panic!("closed with {c:?} after {} events", seqs.len()));
        match f["type"].as_str() {
            Some("event") => seqs.push(f["seq"].as_u64().unwrap()),
            Some("refresh") => {
                assert!(!refreshed, "asked once");
                refreshed = true;
                // A token with a narrower scope than asked for: still fine.
                send(
                    &mut w,
                    json!({"type": "auth", "token": token(600, &["live"], &[])}),
                )
                .await;
            }
            Some("authenticated") => assert!(f["expires"].as_u64().unwrap() > now() + 500),
            _ => {}
        }
    }
    publisher.await.unwrap();
    assert!(refreshed);
    assert_eq!(
        seqs,
        (1..=90).collect::<Vec<_>>(),
        "nothing lost or repeated across the refresh"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_closes_with_4003_and_the_client_resumes() {
    let gw = gateway().await;
    let mut w = subscribed(&gw, &token(2, &["exp"], &[]), "exp").await;
    let p = runcast_worker::Publisher::on_bus(gw.bus(), "exp").unwrap();
    for i in 0..5 {
        p.progress(i, 10).await.unwrap();
    }
    let mut last = 0;
    // Not answering the refresh: closed with 4003 at expiry.
    let code = loop {
        match next(&mut w).await {
            Ok(f) if f["type"] == "event" => last = f["seq"].as_u64().unwrap(),
            Ok(_) => {}
            Err(code) => break code,
        }
    };
    assert_eq!(code, Some(4003));
    assert!(runcast_core::CloseCode::should_resume(4003));
    for i in 5..10 {
        p.progress(i, 10).await.unwrap();
    }
    // A fresh token and the cursor: the rest, exactly once.
    let (mut w, _) = ws(
        &gw,
        "/v1/ws",
        Some((
            "authorization",
            format!("Bearer {}", token(60, &["exp"], &[])),
        )),
    )
    .await
    .unwrap();
    send(
        &mut w,
        json!({"type": "subscribe", "run": "exp", "since": last}),
    )
    .await;
    let mut seqs = Vec::new();
    while seqs.len() < (10 - last) as usize {
        let f = next(&mut w).await.unwrap();
        if f["type"] == "event" {
            seqs.push(f["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(seqs, (last + 1..=10).collect::<Vec<_>>());
    // An invalid fresh token is refused without closing.
    send(&mut w, json!({"type": "auth", "token": "garbage"})).await;
    assert_eq!(until(&mut w, "error").await["code"], "unauthorized");
    send(&mut w, json!({"type": "ping"})).await;
    until(&mut w, "pong").await;
}

#[tokio::test]
async fn websocket_origins_and_cors_follow_the_allow_list() {
    let gw = TestGateway::with(
        Config {
            allowed_origins: vec!["https://app.example".into()],
            ..Config::default()
        },
        Retention::default(),
    )
    .await;
    // Cross-site WebSocket hijacking: refused before the upgrade.
    assert_eq!(
        ws(
            &gw,
            "/v1/ws",
            Some(("origin", "https://evil.example".into()))
        )
        .await
        .err(),
        Some(403)
    );
    let (mut ok, _) = ws(
        &gw,
        "/v1/ws",
        Some(("origin", "https://app.example".into())),
    )
    .await
    .unwrap();
    until(&mut ok, "hello").await;
    // Clients without an Origin (not browsers) are not affected.
    let (mut cli, _) = ws(&gw, "/v1/ws", None).await.unwrap();
    until(&mut cli, "hello").await;

    let (status, h, _) = http(
        gw.addr,
        "GET",
        "/v1/runs",
        &[("origin", "https://app.example")],
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    let (_, h, _) = http(
        gw.addr,
        "GET",
        "/v1/runs",
        &[("origin", "https://evil.example")],
        "",
    )
    .await;
    assert!(h.get("access-control-allow-origin").is_none());
    let (status, h, _) = http(
        gw.addr,
        "OPTIONS",
        "/v1/runs/r/events",
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
        ],
        "",
    )
    .await;
    // A preflight is answered by tower-http's CORS layer: 200, no body.
    assert_eq!(status, 200);
    assert!(
        h["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("x-runcast-key")
    );
}

/// A token a few seconds past its `exp` is within the clock-skew leeway for
/// HTTP reads, but opens no session: a WebSocket or SSE stream it opened
/// would end at once, and a client reconnecting with it would loop until
/// the leeway ran out (found by the Python client's tests: ~50 reconnects
/// in 5 s). It is refused with 401 up front.
#[tokio::test]
async fn a_token_past_its_exp_opens_no_session_even_within_the_leeway() {
    let gw = gateway().await;
    let stale = encode(
        &Header::default(),
        &json!({"sub": "u1", "exp": now() - 2, "runs": ["r1"]}),
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    let auth = format!("Bearer {stale}");
    assert_eq!(
        ws(&gw, "/v1/ws", Some(("authorization", auth.clone())))
            .await
            .err(),
        Some(401)
    );
    let (status, _, body) = http(
        gw.addr,
        "GET",
        "/v1/runs/r1/stream",
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("expired"), "{body}");
    // A fresh token still opens both.
    let fresh = format!("Bearer {}", token(60, &["r1"], &[]));
    assert!(
        ws(&gw, "/v1/ws", Some(("authorization", fresh)))
            .await
            .is_ok()
    );
}
