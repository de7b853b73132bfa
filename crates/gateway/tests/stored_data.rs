//! Whatever a publisher manages to store, every reader of every run keeps
//! working: the run list, a run's state, history, and WebSocket and SSE
//! subscriptions. An outside client found that one `status` event nested
//! 130 levels deep took the run list down for every viewer; these tests hold
//! both ends of the fix: deep data is refused at publish with a coded error,
//! and data that reached the bus anyway (NATS takes any bytes) is served.

use runcast_core::{EventKind, MAX_DATA_DEPTH, NewEvent, RunId};
use runcast_test_support::{SseReader, TestGateway, WsClient, http, json};
use serde_json::{json, value::RawValue};

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// Valid JSON of any depth (a `RawValue` parse does not recurse), for
/// bodies too deep for a `serde_json::Value`.
fn is_json(text: &str) -> bool {
    serde_json::from_str::<&RawValue>(text).is_ok()
}

#[tokio::test]
async fn data_nested_past_the_limit_is_refused_at_publish_and_nothing_is_stored() {
    let gw = TestGateway::start().await;
    let body =
        |kind: &str, depth: usize| format!(r#"{{"kind":"{kind}","data":{}}}"#, nested(depth));

    // The outside repro: 130 levels in a status event.
    for kind in ["status", "progress", "complete", "log"] {
        let (status, _, resp) = http(
            gw.addr,
            "POST",
            "/v1/runs/evil/events",
            &[],
            body(kind, 130),
        )
        .await;
        assert_eq!(status, 400, "{kind}: {resp}");
        let v = json(&resp);
        assert_eq!(v["error"]["code"], "data_too_deep", "{resp}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("64"),
            "the message names the limit: {resp}"
        );
    }
    // One level past the limit is refused, the limit itself is accepted.
    let (status, _, _) = http(
        gw.addr,
        "POST",
        "/v1/runs/edge/events",
        &[],
        body("status", MAX_DATA_DEPTH + 1),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _, resp) = http(
        gw.addr,
        "POST",
        "/v1/runs/edge/events",
        &[],
        body("status", MAX_DATA_DEPTH),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    // Brackets inside strings are text, not nesting.
    let text = format!(
        r#"{{"kind":"log","data":{{"line":"{}"}}}}"#,
        "[".repeat(500)
    );
    let (status, _, resp) = http(gw.addr, "POST", "/v1/runs/edge/events", &[], text).await;
    assert_eq!(status, 200, "{resp}");
    // A batch is all or nothing: a deep event refuses its good neighbours.
    let batch = format!(
        r#"[{{"kind":"log","data":1}},{{"kind":"status","data":{}}}]"#,
        nested(100)
    );
    let (status, _, resp) = http(gw.addr, "POST", "/v1/runs/batch/events", &[], batch).await;
    assert_eq!(status, 400, "{resp}");
    assert!(resp.contains("event 1"), "names the event: {resp}");
    let (status, _, _) = http(gw.addr, "GET", "/v1/runs/batch", &[], "").await;
    assert_eq!(status, 404, "nothing of the batch was stored");
    let (status, _, _) = http(gw.addr, "GET", "/v1/runs/evil", &[], "").await;
    assert_eq!(status, 404);

    let (status, _, list) = http(gw.addr, "GET", "/v1/runs", &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(json(&list)["runs"][0]["run"], "edge");
}

#[tokio::test]
async fn data_a_publisher_stored_never_breaks_a_run_or_the_run_list() {
    let gw = TestGateway::start().await;
    let bus = gw.bus();
    let deep = nested(300);
    let raw = |t: &str| RawValue::from_string(t.to_owned()).unwrap();
    // Straight onto the bus, past the publish API's checks, as any NATS
    // client can store it.
    let evil = RunId::parse("evil").unwrap();
    bus.publish(
        &evil,
        vec![
            NewEvent::new(EventKind::Status, raw(&deep)),
            NewEvent::new(EventKind::Progress, raw(&deep)),
            NewEvent::new(EventKind::Complete, raw(&deep)),
            // Valid JSON that a `serde_json::Value` cannot hold (found by an
            // outside client too): out-of-range numbers.
            NewEvent::new(EventKind::Progress, raw(r#"{"done":-1e400,"total":1e999}"#)),
            NewEvent::new(EventKind::Status, raw(r#"{"n":-1e400}"#)),
        ],
    )
    .await
    .unwrap();
    let good = RunId::parse("good").unwrap();
    bus.publish(
        &good,
        vec![NewEvent::json(EventKind::Progress, &json!({"done": 1, "total": 2})).unwrap()],
    )
    .await
    .unwrap();

    // The run list: both runs, valid JSON.
    let (status, _, list) = http(gw.addr, "GET", "/v1/runs", &[], "").await;
    assert_eq!(status, 200, "{list}");
    assert!(is_json(&list), "run list is JSON");
    assert!(list.contains(r#""run":"good""#) && list.contains(r#""run":"evil""#));
    for path in ["/v1/runs/evil", "/v1/runs/evil/events?since=0"] {
        let (status, _, body) = http(gw.addr, "GET", path, &[], "").await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(is_json(&body) && body.contains(&deep), "{path}");
    }

    // A WebSocket subscription to the run gets its state and replay, and the
    // connection still serves another run.
    let mut c = WsClient::connect(&gw.ws_url()).await;
    c.send(json!({"type":"subscribe","run":"evil","since":0}))
        .await;
    let mut texts = Vec::new();
    while texts.len() < 4 {
        match c.next_message().await {
            Some(tokio_tungstenite::tungstenite::Message::Text(t)) => texts.push(t.to_string()),
            Some(_) => {}
            None => panic!("connection dropped after {} frames", texts.len()),
        }
    }
    assert!(texts[0].starts_with(r#"{"type":"state","run":"evil","seq":5"#));
    for (i, t) in texts[1..].iter().enumerate() {
        assert!(is_json(t) && t.contains(&deep), "event {i}");
        assert!(t.contains(&format!(r#""seq":{}"#, i + 1)));
    }
    for _ in 0..2 {
        match c.next_message().await {
            Some(tokio_tungstenite::tungstenite::Message::Text(t)) => {
                assert!(is_json(&t) && t.contains("e400"), "{t}")
            }
            other => panic!("connection dropped: {other:?}"),
        }
    }
    c.subscribe("good", None).await;
    bus.publish(
        &good,
        vec![NewEvent::json(EventKind::Log, &json!("after")).unwrap()],
    )
    .await
    .unwrap();
    let ev = c.recv().await;
    assert_eq!(
        (ev["run"].as_str(), ev["seq"].as_u64()),
        (Some("good"), Some(2))
    );

    // SSE: the state and every event, resumable ids.
    let (status, mut s) = SseReader::open(gw.addr, "/v1/runs/evil/stream?since=0", None).await;
    assert_eq!(status, 200);
    let mut ids = Vec::new();
    for _ in 0..6 {
        let (id, data) = s.next_raw().await.expect("message");
        assert!(is_json(&data));
        ids.push(id.unwrap());
    }
    assert_eq!(ids, ["0", "1", "2", "3", "4", "5"]);
}

#[tokio::test]
async fn pretty_printed_data_arrives_whole_over_sse_with_resumable_ids() {
    let gw = TestGateway::start().await;
    let value = json!({"done": 3, "total": 10, "files": ["a", "b"], "note": "line\nbreak"});
    // What Python's json.dumps(..., indent=2) sends, and the CRLF variant.
    let pretty = serde_json::to_string_pretty(&value).unwrap();
    let crlf = pretty.replace('\n', "\r\n");
    for data in [&pretty, &crlf] {
        let body = format!(r#"{{"kind":"progress","data":{data}}}"#);
        let (status, _, resp) = http(gw.addr, "POST", "/v1/runs/pretty/events", &[], body).await;
        assert_eq!(status, 200, "{resp}");
    }
    let (_, mut s) = SseReader::open(gw.addr, "/v1/runs/pretty/stream?since=0", None).await;
    let (_, state) = s.next().await.unwrap();
    assert_eq!(state["state"]["progress"], value);
    for want in 1..=2 {
        let (id, ev) = s.next().await.unwrap();
        assert_eq!((id, ev["seq"].as_u64()), (Some(want), Some(want)));
        assert_eq!(ev["data"], value, "data survives SSE");
    }
    // The WebSocket carries the data verbatim, whitespace included.
    let mut c = WsClient::connect(&gw.ws_url()).await;
    c.send(json!({"type":"subscribe","run":"pretty","since":1}))
        .await;
    let _state = c.next_message().await;
    match c.next_message().await {
        Some(tokio_tungstenite::tungstenite::Message::Text(t)) => {
            assert!(t.contains(&crlf), "verbatim: {t}");
        }
        other => panic!("{other:?}"),
    }
}

/// The fuzz target's seeds (fuzz/seeds/stored_events: the outside repro
/// over HTTP and over NATS, pretty-printed and non-JSON payloads) run on
/// every test run, not only when fuzzing.
#[test]
fn the_stored_events_fuzz_seeds_pass() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fuzz/seeds/stored_events"
    );
    let mut n = 0;
    for entry in std::fs::read_dir(dir).expect("seeds") {
        let input = std::fs::read(entry.unwrap().path()).unwrap();
        runcast_gateway::fuzzing::stored_events(&input);
        n += 1;
    }
    assert!(n >= 4, "{n} seeds");
}
