//! The admin API the operator drives (`/v1/admin/*`): its bearer token,
//! the load a pod reports, and paced reconnect hints (shed and drain).

use std::time::{Duration, Instant};

use runcast_bus::Retention;
use runcast_gateway::Config;
use runcast_test_support::{TestGateway, WsClient, http, json, metric};
use serde_json::Value;

const TOKEN: &str = "s3cret-admin";

async fn gateway() -> TestGateway {
    TestGateway::with(
        Config {
            admin_token: Some(TOKEN.into()),
            ..Config::default()
        },
        Retention::default(),
    )
    .await
}

async fn admin(gw: &TestGateway, method: &str, op: &str, body: &str) -> (u16, Value) {
    let auth = format!("Bearer {TOKEN}");
    let (status, _, b) = http(
        gw.addr,
        method,
        &format!("/v1/admin/{op}"),
        &[("authorization", &auth)],
        body.to_owned(),
    )
    .await;
    (status, json(&b))
}

async fn clients(gw: &TestGateway, n: usize, runs: usize) -> Vec<WsClient> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut c = WsClient::connect(&gw.ws_url()).await;
        c.subscribe(&format!("run-{}", i % runs), None).await;
        out.push(c);
    }
    out
}

#[tokio::test]
async fn the_admin_api_needs_its_token() {
    let off = TestGateway::start().await;
    let (status, _, body) = http(off.addr, "GET", "/v1/admin/stats", &[], "").await;
    assert_eq!(status, 401);
    assert!(body.contains("--admin-token"), "{body}");

    let gw = gateway().await;
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("s3cret-admin"),
        Some("Bearer "),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let (status, _, body) = http(gw.addr, "GET", "/v1/admin/stats", &headers, "").await;
        assert_eq!(status, 401, "{auth:?}");
        assert_eq!(json(&body)["error"]["code"], "unauthorized");
    }
    assert_eq!(admin(&gw, "GET", "stats", "").await.0, 200);
    // Unauthorized requests change nothing: the gateway is not draining.
    let (status, _, _) = http(gw.addr, "POST", "/v1/admin/drain", &[], "").await;
    assert_eq!(status, 401);
    assert_eq!(http(gw.addr, "GET", "/readyz", &[], "").await.0, 200);
}

#[tokio::test]
async fn bad_admin_requests_get_clear_errors() {
    let gw = gateway().await;
    for (method, op, body, status, code) in [
        ("POST", "stats", "", 405, "method_not_allowed"),
        ("GET", "drain", "", 405, "method_not_allowed"),
        ("POST", "nope", "", 404, "not_found"),
        ("POST", "shed", "", 400, "invalid_event"),
        ("POST", "shed", "{", 400, "invalid_json"),
        (
            "POST",
            "shed",
            r#"{"count":1,"rate":0}"#,
            400,
            "invalid_event",
        ),
        ("POST", "drain", r#"{"rate":-5}"#, 400, "invalid_event"),
    ] {
        let (got, v) = admin(&gw, method, op, body).await;
        assert_eq!(
            (got, v["error"]["code"].as_str().unwrap_or("")),
            (status, code),
            "{method} {op} {body}"
        );
    }
    // None of them started a drain.
    assert_eq!(http(gw.addr, "GET", "/readyz", &[], "").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_report_the_pods_load() {
    let gw = gateway().await;
    let mut cs = clients(&gw, 6, 2).await;
    let p = runcast_worker::Publisher::on_bus(gw.bus(), "run-0").unwrap();
    for i in 0..10 {
        p.progress(i, 10).await.unwrap();
    }
    // Each of the 3 clients of run-0 reads its 10 events.
    for c in cs.iter_mut().step_by(2) {
        let mut got = 0;
        while got < 10 {
            if c.recv().await["type"] == "event" {
                got += 1;
            }
        }
    }
    let (status, s) = admin(&gw, "GET", "stats", "").await;
    assert_eq!(status, 200);
    assert_eq!(s["connections"], 6);
    assert_eq!(s["subscriptions"], 6);
    assert_eq!(s["watched_runs"], 2);
    assert_eq!(s["draining"], false);
    assert_eq!(s["pending_hints"], 0);
    assert!(s["delivered_per_sec"].as_f64().unwrap() > 0.0, "{s}");
    assert!((0.0..=1.0).contains(&s["queue_pressure"].as_f64().unwrap()));
    // The rate is over the time since the previous request: nothing since.
    let (_, again) = admin(&gw, "GET", "stats", "").await;
    assert_eq!(again["delivered_per_sec"], 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shed_moves_exactly_the_asked_number_at_the_asked_rate() {
    let gw = gateway().await;
    let cs = clients(&gw, 20, 4).await;
    let start = Instant::now();
    let (status, v) = admin(&gw, "POST", "shed", r#"{"count":10,"rate":20}"#).await;
    assert_eq!((status, v["clients"].as_u64()), (202, Some(10)));
    // A second shed while hints are pending is refused.
    assert_eq!(admin(&gw, "POST", "shed", r#"{"count":1}"#).await.0, 409);

    let mut handles = Vec::new();
    for mut c in cs {
        handles.push(tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(3), c.read_until_close()).await;
            (r.ok().map(|(code, _)| (code, start.elapsed())), c)
        }));
    }
    let mut closed = Vec::new();
    let mut stayed = Vec::new();
    for h in handles {
        match h.await.unwrap() {
            (Some((code, at)), _) => {
                assert_eq!(code, Some(1001));
                closed.push(at);
            }
            (None, c) => stayed.push(c),
        }
    }
    closed.sort();
    assert_eq!(closed.len(), 10, "exactly 10 clients were asked to leave");
    // 10 hints at 20/s: the last one about 450 ms after the first, not at once.
    let spread = closed[9] - closed[0];
    assert!(spread >= Duration::from_millis(350), "{spread:?}");
    assert!(spread <= Duration::from_millis(1500), "{spread:?}");
    let (_, s) = admin(&gw, "GET", "stats", "").await;
    assert_eq!(
        (s["connections"].as_u64(), s["pending_hints"].as_u64()),
        (Some(10), Some(0))
    );
    let (_, _, scrape) = http(gw.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(
        metric(
            &scrape,
            r#"runcast_reconnect_hints_total{reason="rebalance"}"#
        ),
        Some(10.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_turns_readiness_off_and_moves_everyone() {
    let gw = gateway().await;
    let cs = clients(&gw, 8, 2).await;
    let (status, v) = admin(&gw, "POST", "drain", r#"{"rate":40,"jitter_ms":50}"#).await;
    assert_eq!((status, v["clients"].as_u64()), (202, Some(8)));
    assert_eq!(http(gw.addr, "GET", "/readyz", &[], "").await.0, 503);
    assert_eq!(admin(&gw, "POST", "drain", "").await.0, 409);
    assert_eq!(admin(&gw, "POST", "shed", r#"{"count":1}"#).await.0, 409);
    for mut c in cs {
        let (code, _) = tokio::time::timeout(Duration::from_secs(3), c.read_until_close())
            .await
            .expect("every client is asked to leave");
        assert_eq!(code, Some(1001));
    }
    // A client that arrives now is sent on at once.
    let (status, _, body) = http(
        gw.addr,
        "GET",
        "/v1/ws",
        &[
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ],
        "",
    )
    .await;
    assert_eq!(status, 503);
    assert_eq!(json(&body)["error"]["code"], "draining");
    let (_, s) = admin(&gw, "GET", "stats", "").await;
    assert_eq!(s["draining"], true);
    let (_, _, scrape) = http(gw.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(
        metric(&scrape, r#"runcast_reconnect_hints_total{reason="drain"}"#),
        Some(8.0)
    );
}

/// A draining gateway's 503 ends the keep-alive connection it came on, so
/// a client behind a TCP load balancer reaches another pod on its next
/// request. (An outside client found its requests staying on a draining
/// pod: the 503s kept the connection open, and the balancer only picks a
/// pod per connection.)
#[tokio::test]
async fn a_draining_gateways_503_closes_the_keep_alive_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = gateway().await;
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // The connection is in use (keep-alive) before the drain begins.
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    assert_eq!(admin(&gw, "POST", "drain", "").await.0, 202);
    conn.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer))
        .await
        .expect("the gateway closes the connection after its 503")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(answer.contains(r#""code":"draining""#), "{answer}");
}
