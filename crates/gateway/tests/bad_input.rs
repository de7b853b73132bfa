//! The bad input table: every malformed frame, run ID, cursor and request
//! gets a clear error, the connection and server survive where that makes
//! sense, and nothing already accepted is lost.

use runcast_bus::Retention;
use runcast_core::{EventKind, NewEvent, RunId};
use runcast_gateway::Config;
use runcast_test_support::{TestGateway, WsClient, http, json, seqs};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

async fn publish(gw: &TestGateway, run: &str, i: u64) {
    gw.bus()
        .publish(
            &RunId::parse(run).unwrap(),
            vec![NewEvent::json(EventKind::Progress, &json!({"i": i})).unwrap()],
        )
        .await
        .unwrap();
}

/// Reads until an error frame; event frames seen on the way are collected.
async fn expect_error(c: &mut WsClient, events: &mut Vec<Value>) -> Value {
    loop {
        let f = c.recv().await;
        match f["type"].as_str() {
            Some("error") => return f,
            Some("event") => events.push(f),
            _ => panic!("expected an error frame, got {f}"),
        }
    }
}

#[tokio::test]
async fn websocket_bad_frames_get_error_frames_and_the_connection_stays_usable() {
    let config = Config {
        max_subscriptions: 3,
        max_frame_bytes: 1024,
        hard_frame_bytes: 64 << 10,
        ..Config::default()
    };
    let gw = TestGateway::with(config, Retention::default()).await;
    let mut c = WsClient::connect(&gw.ws_url()).await;
    c.subscribe("good", None).await;
    let mut events = Vec::new();
    let mut seq = 0;

    let long_id = "x".repeat(129);
    let big = format!(
        r#"{{"type":"subscribe","run":"r","pad":"{}"}}"#,
        "p".repeat(2000)
    );
    let rows: Vec<(&str, String, &str)> = vec![
        ("invalid JSON", "{not json".into(), "invalid_json"),
        ("not an object", "[1,2,3]".into(), "invalid_frame"),
        ("no type", r#"{"run":"good"}"#.into(), "invalid_frame"),
        (
            "unknown frame type",
            r#"{"type":"launch"}"#.into(),
            "unknown_type",
        ),
        (
            "missing run ID",
            r#"{"type":"subscribe"}"#.into(),
            "invalid_run_id",
        ),
        (
            "run ID a.b",
            r#"{"type":"subscribe","run":"a.b"}"#.into(),
            "invalid_run_id",
        ),
        (
            "run ID *",
            r#"{"type":"subscribe","run":"*"}"#.into(),
            "invalid_run_id",
        ),
        (
            "run ID >",
            r#"{"type":"subscribe","run":">"}"#.into(),
            "invalid_run_id",
        ),
        (
            "empty run ID",
            r#"{"type":"subscribe","run":""}"#.into(),
            "invalid_run_id",
        ),
        (
            "129-char run ID",
            format!(r#"{{"type":"subscribe","run":"{long_id}"}}"#),
            "invalid_run_id",
        ),
        (
            "non-ASCII run ID",
            r#"{"type":"subscribe","run":"prüfung"}"#.into(),
            "invalid_run_id",
        ),
        (
            "since in the future",
            r#"{"type":"subscribe","run":"other","since":99}"#.into(),
            "since_out_of_range",
        ),
        (
            "negative since",
            r#"{"type":"subscribe","run":"other","since":-1}"#.into(),
            "invalid_since",
        ),
        (
            "non-number since",
            r#"{"type":"subscribe","run":"other","since":"5"}"#.into(),
            "invalid_since",
        ),
        ("frame over the size limit", big, "too_large"),
        (
            "subscribe twice",
            r#"{"type":"subscribe","run":"good"}"#.into(),
            "already_subscribed",
        ),
        (
            "unsubscribe unknown",
            r#"{"type":"unsubscribe","run":"nope"}"#.into(),
            "not_subscribed",
        ),
    ];
    for (what, frame, code) in &rows {
        // Events keep flowing between bad frames.
        seq += 1;
        publish(&gw, "good", seq).await;
        c.send_text(frame).await;
        let err = expect_error(&mut c, &mut events).await;
        assert_eq!(err["code"], *code, "row {what:?}: {err}");
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "row {what:?} has a message"
        );
    }
    // The run ID is echoed (cut to a bounded length) so clients know which subscription failed.
    c.send_text(r#"{"type":"subscribe","run":"a.b"}"#).await;
    assert_eq!(expect_error(&mut c, &mut events).await["run"], "a.b");

    // Binary frames are refused the same way.
    seq += 1;
    publish(&gw, "good", seq).await;
    futures_util::SinkExt::send(&mut c.ws, Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(
        expect_error(&mut c, &mut events).await["code"],
        "binary_not_supported"
    );

    // Subscription cap: "good" plus two more, then refused.
    c.subscribe("s2", None).await;
    c.subscribe("s3", None).await;
    c.send(json!({"type":"subscribe","run":"s4"})).await;
    assert_eq!(
        expect_error(&mut c, &mut events).await["code"],
        "too_many_subscriptions"
    );

    // Nothing sent to "good" was lost along the way.
    seq += 1;
    publish(&gw, "good", seq).await;
    while seqs(&events, "good").len() < seq as usize {
        let f = c.recv().await;
        if f["type"] == "event" {
            events.push(f);
        }
    }
    assert_eq!(seqs(&events, "good"), (1..=seq).collect::<Vec<u64>>());
    let m = gw.gw.metrics.render();
    assert!(
        m.contains(r#"runcast_protocol_errors_total{code="invalid_run_id"} 8"#),
        "{m}"
    );
}

#[tokio::test]
async fn frames_over_the_hard_limit_close_with_1009_and_the_server_survives() {
    let config = Config {
        max_frame_bytes: 1024,
        hard_frame_bytes: 8 << 10,
        ..Config::default()
    };
    let gw = TestGateway::with(config, Retention::default()).await;
    let mut c = WsClient::connect(&gw.ws_url()).await;
    c.send_text(&"z".repeat(20 << 10)).await;
    let (code, _) = c.read_until_close().await;
    assert_eq!(code, Some(1009));
    let mut other = WsClient::connect(&gw.ws_url()).await;
    other.subscribe("still-fine", None).await;
}

#[tokio::test]
async fn http_bad_requests_get_clear_errors_and_lose_nothing() {
    let config = Config {
        max_publish_bytes: 4096,
        max_batch: 3,
        ..Config::default()
    };
    let gw = TestGateway::with(
        config,
        Retention {
            max_runs: 3,
            ..Retention::default()
        },
    )
    .await;
    let addr = gw.addr;
    let ok = http(
        addr,
        "POST",
        "/v1/runs/job/events",
        &[],
        r#"{"kind":"progress","data":{"done":1,"total":4}}"#,
    )
    .await;
    assert_eq!(
        (ok.0, json(&ok.2)["seqs"].clone()),
        (200, json!([1])),
        "{}",
        ok.2
    );

    let big = format!(r#"{{"kind":"log","data":"{}"}}"#, "b".repeat(5000));
    let rows: Vec<(&str, &str, String, String, u16, &str)> = vec![
        ("body not JSON", "POST", "/v1/runs/job/events".into(), "kind=progress".into(), 400, "invalid_json"),
        ("body a JSON number", "POST", "/v1/runs/job/events".into(), "17".into(), 400, "invalid_event"),
        ("no data", "POST", "/v1/runs/job/events".into(), r#"{"kind":"log"}"#.into(), 400, "invalid_event"),
        ("empty array", "POST", "/v1/runs/job/events".into(), "[]".into(), 400, "invalid_event"),
        ("body over the limit", "POST", "/v1/runs/job/events".into(), big, 413, "too_large"),
        ("unknown kind format", "POST", "/v1/runs/job/events".into(), r#"{"kind":"Bad Kind!","data":1}"#.into(), 400, "invalid_kind"),
        ("kind not a string", "POST", "/v1/runs/job/events".into(), r#"{"kind":3,"data":1}"#.into(), 400, "invalid_kind"),
        (
            "batch over the limit",
            "POST",
            "/v1/runs/job/events".into(),
            r#"[{"kind":"log","data":1},{"kind":"log","data":2},{"kind":"log","data":3},{"kind":"log","data":4}]"#.into(),
            413,
            "too_many_events",
        ),
        (
            "half-bad batch",
            "POST",
            "/v1/runs/job/events".into(),
            r#"[{"kind":"log","data":1},{"kind":"NO","data":2}]"#.into(),
            400,
            "invalid_kind",
        ),
        ("invalid run ID in path", "POST", "/v1/runs/a.b/events".into(), r#"{"kind":"log","data":1}"#.into(), 400, "invalid_run_id"),
        ("run ID with *", "GET", "/v1/runs/*".into(), String::new(), 400, "invalid_run_id"),
        ("run ID too long", "GET", format!("/v1/runs/{}", "x".repeat(129)), String::new(), 400, "invalid_run_id"),
        ("unknown run", "GET", "/v1/runs/never".into(), String::new(), 404, "run_not_found"),
        ("history since not a number", "GET", "/v1/runs/job/events?since=abc".into(), String::new(), 400, "invalid_since"),
        ("history since negative", "GET", "/v1/runs/job/events?since=-3".into(), String::new(), 400, "invalid_since"),
        ("history since in the future", "GET", "/v1/runs/job/events?since=50".into(), String::new(), 400, "since_out_of_range"),
        ("history limit negative", "GET", "/v1/runs/job/events?limit=-1".into(), String::new(), 400, "invalid_query"),
        ("history limit zero", "GET", "/v1/runs/job/events?limit=0".into(), String::new(), 400, "invalid_query"),
        ("run list limit negative", "GET", "/v1/runs?limit=-1".into(), String::new(), 400, "invalid_query"),
        ("run list limit not a number", "GET", "/v1/runs?limit=ten".into(), String::new(), 400, "invalid_query"),
        ("run list unknown status", "GET", "/v1/runs?status=sleeping".into(), String::new(), 400, "invalid_query"),
        ("data nested too deep", "POST", "/v1/runs/job/events".into(), format!(r#"{{"kind":"status","data":{}{}}}"#, "[".repeat(65), "]".repeat(65)), 400, "data_too_deep"),
        ("unknown route", "GET", "/v2/everything".into(), String::new(), 404, "not_found"),
        ("wrong method on events", "DELETE", "/v1/runs/job/events".into(), String::new(), 405, "method_not_allowed"),
        ("wrong method on runs", "POST", "/v1/runs".into(), String::new(), 405, "method_not_allowed"),
        ("wrong method on state", "PUT", "/v1/runs/job".into(), String::new(), 405, "method_not_allowed"),
        ("websocket without upgrade", "GET", "/v1/ws".into(), String::new(), 426, "invalid_frame"),
    ];
    for (what, method, path, body, status, code) in rows {
        let (got, headers, text) = http(addr, method, &path, &[], body).await;
        assert_eq!(got, status, "row {what:?}: {text}");
        let v = json(&text);
        assert_eq!(v["error"]["code"], code, "row {what:?}: {text}");
        if path.contains("limit=") {
            let m = v["error"]["message"].as_str().unwrap_or("");
            assert!(
                m.contains("limit") && !m.contains("cursor"),
                "row {what:?}: the message is about the limit: {m}"
            );
        }
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "row {what:?} has a message"
        );
        if status == 405 {
            assert!(
                headers.contains_key("allow"),
                "row {what:?}: 405 names the allowed methods"
            );
        }
    }
    // Capacity: the bus holds at most 3 runs.
    for r in ["r2", "r3"] {
        let (s, _, _) = http(
            addr,
            "POST",
            &format!("/v1/runs/{r}/events"),
            &[],
            r#"{"kind":"log","data":1}"#,
        )
        .await;
        assert_eq!(s, 200);
    }
    let (s, _, text) = http(
        addr,
        "POST",
        "/v1/runs/r4/events",
        &[],
        r#"{"kind":"log","data":1}"#,
    )
    .await;
    assert_eq!(
        (s, json(&text)["error"]["code"].as_str()),
        (507, Some("capacity")),
        "{text}"
    );

    // Nothing accepted was lost, and no rejected event got in: the next seq is 2.
    let (s, _, text) = http(
        addr,
        "POST",
        "/v1/runs/job/events",
        &[],
        r#"{"kind":"complete","data":{"ok":true}}"#,
    )
    .await;
    assert_eq!((s, json(&text)["seqs"].clone()), (200, json!([2])));
    let (_, _, text) = http(addr, "GET", "/v1/runs/job/events?since=0", &[], "").await;
    let v = json(&text);
    assert_eq!(v["events"].as_array().unwrap().len(), 2);
    assert_eq!(v["events"][0]["data"], json!({"done":1,"total":4}));
    let (_, _, text) = http(addr, "GET", "/v1/runs/job", &[], "").await;
    assert_eq!(json(&text)["status"], "completed");
}

#[tokio::test]
async fn http_api_happy_paths() {
    let gw = TestGateway::start().await;
    let addr = gw.addr;
    let (s, _, text) = http(
        addr,
        "POST",
        "/v1/runs/api-run/events",
        &[(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )],
        r#"[{"kind":"status","data":{"state":"go"}},{"kind":"progress","data":{"percent":40}}]"#,
    )
    .await;
    assert_eq!(
        (s, json(&text)["seqs"].clone()),
        (200, json!([1, 2])),
        "{text}"
    );
    let (_, _, text) = http(addr, "GET", "/v1/runs", &[], "").await;
    let runs = json(&text);
    assert_eq!(runs["runs"][0]["run"], "api-run");
    assert_eq!(runs["runs"][0]["percent"], 40.0);
    // Timestamps are in milliseconds: make "most recent" unambiguous.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    http(
        addr,
        "POST",
        "/v1/runs/done-run/events",
        &[],
        r#"{"kind":"complete","data":{}}"#,
    )
    .await;
    let (_, _, text) = http(addr, "GET", "/v1/runs?status=running", &[], "").await;
    let running: Vec<Value> = json(&text)["runs"].as_array().unwrap().clone();
    assert_eq!(running.len(), 1, "{text}");
    assert_eq!(running[0]["run"], "api-run");
    let (_, _, text) = http(addr, "GET", "/v1/runs?limit=1", &[], "").await;
    assert_eq!(
        json(&text)["runs"][0]["run"],
        "done-run",
        "most recently updated first, limited"
    );
    assert_eq!(json(&text)["runs"].as_array().unwrap().len(), 1);
    let (s, _, _) = http(addr, "GET", "/v1/runs?status=sleeping", &[], "").await;
    assert_eq!(s, 400);
    let (_, _, text) = http(
        addr,
        "GET",
        "/v1/runs/api-run/events?since=1&limit=10",
        &[],
        "",
    )
    .await;
    let page = json(&text);
    assert_eq!(page["events"][0]["seq"], 2);
    assert_eq!(
        page["events"][0]["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(
        (page["head"].as_u64(), page["next_since"].as_u64()),
        (Some(2), Some(2))
    );
    let (s, _, text) = http(addr, "GET", "/healthz", &[], "").await;
    assert_eq!((s, text.as_str()), (200, "ok\n"));
    let (s, _, text) = http(addr, "GET", "/metrics", &[], "").await;
    assert_eq!(s, 200);
    assert!(text.contains("runcast_events_published_total 3"), "{text}");
    let (s, h, text) = http(addr, "GET", "/", &[], "").await;
    assert_eq!(s, 200);
    assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(text.contains("runcast"));
    // The page's client: the very file the npm package ships, as a module
    // browsers accept, revalidated so it never outlives the gateway.
    let (s, h, text) = http(addr, "GET", "/v1/client.js", &[], "").await;
    assert_eq!(s, 200);
    assert_eq!(h["content-type"], "text/javascript; charset=utf-8");
    assert_eq!(h["cache-control"], "no-cache");
    let shipped = include_str!("../../../clients/js/runcast-client.js");
    assert!(
        text == shipped,
        "/v1/client.js is not clients/js/runcast-client.js"
    );
    assert!(text.contains("export function connect("));
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_with_503() {
    let config = Config {
        max_connections: 2,
        ..Config::default()
    };
    let gw = TestGateway::with(config, Retention::default()).await;
    let _a = WsClient::connect(&gw.ws_url()).await;
    let _b = WsClient::connect(&gw.ws_url()).await;
    let (s, _, text) = http(gw.addr, "GET", "/healthz", &[], "").await;
    assert_eq!(
        (s, json(&text)["error"]["code"].as_str()),
        (503, Some("capacity"))
    );
    // Counted like every other error response (found by an outside tester).
    let m = gw.gw.metrics.render();
    assert_eq!(
        runcast_test_support::metric(&m, r#"runcast_protocol_errors_total{code="capacity"}"#),
        Some(1.0),
        "{m}"
    );
    drop(_a);
    // The slot frees once the first socket is gone.
    let mut ok = false;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if http(gw.addr, "GET", "/healthz", &[], "").await.0 == 200 {
            ok = true;
            break;
        }
    }
    assert!(ok, "a closed connection gives its slot back");
}

/// A publish whose Content-Length is over the limit is refused from its
/// headers: no `100 Continue`, nothing of the body read, and the connection
/// closed. (An outside client saw a 10 MiB publish answered with 100
/// Continue and 1 MiB read before the 413.)
#[tokio::test]
async fn an_oversized_publish_is_refused_from_its_content_length() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = TestGateway::start().await;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/runs/big/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nexpect: 100-continue\r\n\r\n",
        10 << 20
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    // No body is sent: the answer must come from the headers alone.
    let mut resp = Vec::new();
    let read = tokio::time::timeout(runcast_test_support::WAIT, tcp.read_to_end(&mut resp)).await;
    assert!(
        read.is_ok(),
        "the gateway answered and closed without waiting for the body"
    );
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(!text.contains("100 Continue"), "{text}");
    assert!(
        text.contains("too_large") && text.contains("Content-Length"),
        "{text}"
    );
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    // Without `Expect`, a client sends its body right after the headers; the
    // gateway discards it so the client can read the 413 rather than have
    // its connection reset mid-send (the conformance suite found the reset).
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let len = 16 << 20;
    let head =
        format!("POST /v1/runs/big/events HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'x'; 64 << 10];
    for _ in 0..len / chunk.len() {
        tcp.write_all(&chunk)
            .await
            .expect("the body is taken, not reset");
    }
    let mut resp = Vec::new();
    let read = tokio::time::timeout(runcast_test_support::WAIT, tcp.read_to_end(&mut resp)).await;
    assert!(read.is_ok(), "closed after the body");
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}

/// method, path, headers, expected status, expected code
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], u16, &'a str);

/// Every error response, whichever route or layer answers it (router
/// fallbacks, extractors, handlers, the WebSocket handshake), has the JSON
/// error body with the status its code maps to and is counted once by code.
#[tokio::test]
async fn every_error_response_is_json_and_counted_by_code() {
    let gw = TestGateway::with(
        Config {
            auth: std::sync::Arc::new({
                let mut a = runcast_gateway::auth::Auth::default();
                a.add_hs256_secret(None, b"a-secret-that-is-long-enough-for-hs256")
                    .unwrap();
                a
            }),
            ..Config::default()
        },
        runcast_bus::Retention::default(),
    )
    .await;
    let cases: &[Case] = &[
        ("GET", "/nowhere", &[], 404, "not_found"),
        ("DELETE", "/v1/runs", &[], 405, "method_not_allowed"),
        ("PUT", "/v1/admin/drain", &[], 405, "method_not_allowed"),
        ("GET", "/v1/runs", &[], 401, "unauthorized"),
        ("GET", "/v1/runs/a%20b/stream", &[], 400, "invalid_run_id"),
        ("GET", "/v1/ws", &[], 426, "invalid_frame"),
        ("GET", "/v1/admin/stats", &[], 401, "unauthorized"),
        ("POST", "/v1/runs/r/events", &[], 400, "invalid_json"),
        (
            "GET",
            "/v1/runs/r/stream",
            &[("last-event-id", "x")],
            400,
            "invalid_since",
        ),
    ];
    let before = gw.gw.metrics.render();
    for (method, path, headers, status, code) in cases {
        let (got, h, body) = http(gw.addr, method, path, headers, "").await;
        assert_eq!(got, *status, "{method} {path}: {body}");
        assert_eq!(h["content-type"], "application/json", "{method} {path}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], *code, "{method} {path}: {body}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    let after = gw.gw.metrics.render();
    let count = |m: &str, code: &str| {
        runcast_test_support::metric(
            m,
            &format!(r#"runcast_protocol_errors_total{{code="{code}"}}"#),
        )
        .unwrap_or(0.0)
    };
    for code in [
        "not_found",
        "method_not_allowed",
        "unauthorized",
        "invalid_run_id",
        "invalid_frame",
        "invalid_since",
        "invalid_json",
    ] {
        let want = cases.iter().filter(|c| c.4 == code).count() as f64;
        assert_eq!(
            count(&after, code) - count(&before, code),
            want,
            "{code} counted once per response"
        );
    }
}

/// Query values are percent-decoded like path segments (found by an outside
/// tester: `?since=%31` was a 400 while `/v1/runs/r%31` worked).
#[tokio::test]
async fn query_values_are_percent_decoded() {
    let gw = TestGateway::start().await;
    let run = RunId::parse("pct").unwrap();
    for i in 0..3 {
        gw.bus()
            .publish(
                &run,
                vec![NewEvent::json(EventKind::Log, &json!(i)).unwrap()],
            )
            .await
            .unwrap();
    }
    let (s, _, text) = http(
        gw.addr,
        "GET",
        "/v1/runs/pct/events?since=%31&limit=%31",
        &[],
        "",
    )
    .await;
    assert_eq!(s, 200, "{text}");
    let page = runcast_test_support::json(&text);
    assert_eq!(seqs(page["events"].as_array().unwrap(), "pct"), [2]);
    let (s, _, text) = http(gw.addr, "GET", "/v1/runs?st%61tus=runn%69ng", &[], "").await;
    assert_eq!(s, 200, "{text}");
    let (s, _, text) = http(gw.addr, "GET", "/v1/runs?status=nope%20at%20all", &[], "").await;
    assert_eq!(s, 400);
    assert!(text.contains("nope at all"), "{text}");
    let (status, mut sse) =
        runcast_test_support::SseReader::open(gw.addr, "/v1/runs/pct/stream?since=%32", None).await;
    assert_eq!(status, 200);
    let (_, state) = sse.next().await.unwrap();
    assert_eq!(state["type"], "state");
    let (id, ev) = sse.next().await.unwrap();
    assert_eq!((id, ev["seq"].as_u64()), (Some(3), Some(3)));
}

/// HEAD is answered on the read routes, but not on the SSE route, where it
/// would open a session for nothing (found by an outside tester).
#[tokio::test]
async fn head_is_not_a_session() {
    let gw = TestGateway::start().await;
    let (s, h, _) = http(gw.addr, "HEAD", "/v1/runs/r/stream", &[], "").await;
    assert_eq!(s, 405);
    assert_eq!(h["allow"], "GET");
    let (s, _, _) = http(gw.addr, "HEAD", "/healthz", &[], "").await;
    assert_eq!(s, 200);
}

/// `Idempotency-Key` (or an event's own `id`) makes a retried publish safe:
/// the retry gets the first seqs back and history holds one copy. A bad
/// key is a 400 before anything is stored.
#[tokio::test]
async fn a_retried_publish_with_an_idempotency_key_is_stored_once() {
    let gw = TestGateway::start().await;
    let post = |key: &'static str, body: &'static str| {
        let addr = gw.addr;
        async move {
            let headers: &[(&str, &str)] = if key.is_empty() {
                &[]
            } else {
                &[("idempotency-key", key)]
            };
            http(addr, "POST", "/v1/runs/idem/events", headers, body).await
        }
    };
    let batch = r#"[{"kind":"log","data":"a"},{"kind":"log","data":"b"}]"#;
    let (s, _, first) = post("req-1", batch).await;
    assert_eq!(s, 200, "{first}");
    let (_, _, again) = post("req-1", batch).await;
    assert_eq!(json(&first)["seqs"], json(&again)["seqs"]);
    assert_eq!(json(&first)["seqs"], json!([1, 2]));
    // An event's own id, without the header.
    let one = r#"{"kind":"log","data":"c","id":"evt-9"}"#;
    let (_, _, a) = post("", one).await;
    let (_, _, b) = post("", one).await;
    assert_eq!(json(&a)["seqs"], json!([3]));
    assert_eq!(json(&b)["seqs"], json!([3]));
    let (_, _, hist) = http(gw.addr, "GET", "/v1/runs/idem/events", &[], "").await;
    let hist = json(&hist);
    assert_eq!(seqs(hist["events"].as_array().unwrap(), "idem"), [1, 2, 3]);
    assert!(
        hist["events"][2].get("id").is_none(),
        "ids stay with the publisher"
    );
    for (key, body) in [
        ("has space", one),
        ("", r#"{"kind":"log","data":1,"id":""}"#),
        ("", r#"{"kind":"log","data":1,"id":7}"#),
    ] {
        let (s, _, text) = post(key, body).await;
        assert_eq!(s, 400, "{key:?} {body}: {text}");
        assert_eq!(json(&text)["error"]["code"], "invalid_event");
    }
}
