//! Distributed tracing across real processes: a `runcast worker` publishing
//! to a real nats-server, a `runcast gateway` delivering to a WebSocket
//! client, both exporting OTLP to a receiver inside the test. One event must
//! be one trace: the worker's `runcast.publish` span, the gateway's
//! `runcast.receive` as its child, then `runcast.fanout` and
//! `runcast.deliver`; and the frame the client gets names that trace.

use std::{collections::HashMap, process::Stdio, sync::Arc, time::Duration};

use runcast_test_support::{
    WsClient, http,
    nats::{NatsServer, free_addr},
    otlp::{OtlpReceiver, Span},
    wait_http_ok,
};
use serde_json::Value;
use tokio::{io::AsyncBufReadExt, process::Command};

const BIN: &str = env!("CARGO_BIN_EXE_runcast");

/// Spawns `runcast <args>` exporting to `otlp`, flushing spans every 100 ms;
/// its stderr is collected into the returned buffer.
fn runcast(args: &[&str], otlp: &str) -> (tokio::process::Child, Arc<std::sync::Mutex<String>>) {
    let mut child = Command::new(BIN)
        .args(args)
        .args(["--otlp-endpoint", otlp, "--log", "info"])
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env_remove("OTEL_SERVICE_NAME")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("runcast starts");
    let log = Arc::new(std::sync::Mutex::new(String::new()));
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let sink = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            let mut s = sink.lock().unwrap();
            s.push_str(&l);
            s.push('\n');
        }
    });
    (child, log)
}

fn trace_id(frame: &Value) -> Option<(String, String)> {
    let mut p = frame["traceparent"].as_str()?.split('-');
    let (_, t, s) = (p.next()?, p.next()?, p.next()?);
    Some((t.to_owned(), s.to_owned()))
}

fn named<'a>(spans: &'a [Span], trace: &str, name: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.trace_id == trace && s.name == name)
        .collect()
}

/// Reads event frames of `run` until `n` of them carry a traceparent.
async fn traced_frames(client: &mut WsClient, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} traced event frames within 30 s",
            out.len()
        );
        let f = tokio::time::timeout(Duration::from_secs(30), client.recv())
            .await
            .expect("frames keep coming");
        if f["type"] == "event" && f["traceparent"].is_string() {
            out.push(f);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_is_one_trace_from_worker_to_client() {
    let nats = NatsServer::start().await;
    let otlp = OtlpReceiver::start().await;
    let gw = free_addr();
    let mut args = runcast_test_support::open_gateway_args(gw, &nats.url());
    args.extend(["--slow-event-log".into(), "1us".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_gateway, gateway_log) = runcast(&args, &otlp.endpoint());
    wait_http_ok(gw, "/readyz", "gateway").await;
    let (_worker, _) = runcast(
        &[
            "worker",
            "--nats",
            &nats.url(),
            "--jobs",
            "1",
            "--metrics-listen",
            &free_addr().to_string(),
        ],
        &otlp.endpoint(),
    );

    // Watch the worker's first demo run.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let run = loop {
        let (_, _, body) = http(gw, "GET", "/v1/runs", &[], "").await;
        let runs: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        if let Some(r) = runs["runs"][0]["run"].as_str() {
            break r.to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no demo run: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut client = WsClient::connect(&format!("ws://{gw}/v1/ws")).await;
    client.subscribe(&run, None).await;
    let frames = traced_frames(&mut client, 3).await;
    let live = frames.last().unwrap();
    let (trace, publish_span) = trace_id(live).unwrap();

    let spans = otlp
        .wait_for(Duration::from_secs(20), |s| {
            !named(s, &trace, "runcast.deliver").is_empty()
        })
        .await;
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let publish = named(&spans, &trace, "runcast.publish");
    assert_eq!(publish.len(), 1, "{spans:#?}");
    let publish = publish[0];
    assert_eq!(publish.service, "runcast-worker");
    assert_eq!(
        publish.span_id, publish_span,
        "the frame names the publish span"
    );
    assert_eq!(publish.attributes["runcast.run"], run);

    let receive = named(&spans, &trace, "runcast.receive");
    assert_eq!(receive.len(), 1, "one gateway receives it once: {spans:#?}");
    let receive = receive[0];
    assert_eq!(receive.service, "runcast-gateway");
    assert_eq!(
        receive.parent_span_id, publish.span_id,
        "receive continues publish"
    );
    assert_eq!(receive.attributes["runcast.seq"], live["seq"].to_string());

    let fanout = named(&spans, &trace, "runcast.fanout");
    assert_eq!(fanout.len(), 1);
    assert_eq!(fanout[0].parent_span_id, receive.span_id);
    assert_eq!(fanout[0].attributes["runcast.subscribers"], "1");

    let deliver = named(&spans, &trace, "runcast.deliver");
    assert_eq!(deliver.len(), 1, "one client, one delivery");
    assert_eq!(deliver[0].parent_span_id, fanout[0].span_id);
    assert_eq!(deliver[0].attributes["runcast.transport"], "ws");
    // Every span of the trace hangs off another one of it, up to the publish.
    for s in spans
        .iter()
        .filter(|s| s.trace_id == trace && s.name != "runcast.publish")
    {
        assert!(
            by_id.contains_key(s.parent_span_id.as_str()),
            "orphan {s:?}"
        );
    }

    // A slow delivery (here: any, with a 1 µs threshold) is logged with
    // the trace ID, so a slow histogram bucket leads to a trace.
    let traced: Vec<String> = frames
        .iter()
        .filter_map(|f| trace_id(f).map(|t| t.0))
        .collect();
    let log = gateway_log.lock().unwrap().clone();
    assert!(
        log.lines().any(|l| l.contains("slow event delivery")
            && traced.iter().any(|t| l.contains(&format!("trace_id={t}")))),
        "no slow-event line names {traced:?}:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_continues_an_incoming_trace_and_respects_its_sampling() {
    let otlp = OtlpReceiver::start().await;
    let gw = free_addr();
    let (_up, _) = runcast(&["up", "--listen", &gw.to_string()], &otlp.endpoint());
    wait_http_ok(gw, "/readyz", "runcast up").await;
    let mut client = WsClient::connect(&format!("ws://{gw}/v1/ws")).await;
    client.subscribe("http-traced", None).await;

    let sampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    for tp in [sampled, unsampled] {
        let (status, _, body) = http(
            gw,
            "POST",
            "/v1/runs/http-traced/events",
            &[("traceparent", tp), ("content-type", "application/json")],
            r#"{"kind":"log","data":{"line":"hello"}}"#,
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let frames = traced_frames(&mut client, 2).await;
    let ids: Vec<String> = frames.iter().map(|f| trace_id(f).unwrap().0).collect();
    assert_eq!(
        ids,
        [
            "0af7651916cd43dd8448eb211c80319c",
            "11111111111111111111111111111111"
        ]
    );

    let t = "0af7651916cd43dd8448eb211c80319c";
    let spans = otlp
        .wait_for(Duration::from_secs(20), |s| {
            !named(s, t, "runcast.deliver").is_empty()
        })
        .await;
    let publish = named(&spans, t, "runcast.publish");
    assert_eq!(publish.len(), 1, "{spans:#?}");
    assert_eq!(
        publish[0].parent_span_id, "b7ad6b7169203331",
        "child of the caller's span"
    );
    assert_eq!(publish[0].service, "runcast-gateway");
    // The frame carries the gateway's publish span, the parent of receive.
    let (_, frame_span) = trace_id(&frames[0]).unwrap();
    assert_eq!(frame_span, publish[0].span_id);
    let receive = named(&spans, t, "runcast.receive");
    assert_eq!(receive.len(), 1);
    assert_eq!(receive[0].parent_span_id, publish[0].span_id);
    assert_eq!(named(&spans, t, "runcast.deliver").len(), 1);

    // The caller did not sample the other trace: nothing of it is exported,
    // yet its frame still names it so the caller's own spans line up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        otlp.spans()
            .iter()
            .all(|s| s.trace_id != "11111111111111111111111111111111"),
        "an unsampled trace was exported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_costs_spans_not_events() {
    // A port nothing listens on: exports fail, delivery does not.
    let dead = format!("http://{}", free_addr());
    let gw = free_addr();
    let (mut up, log) = runcast(&["up", "--listen", &gw.to_string()], &dead);
    wait_http_ok(gw, "/readyz", "runcast up").await;
    let mut client = WsClient::connect(&format!("ws://{gw}/v1/ws")).await;
    client.subscribe("no-collector", None).await;
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    for _ in 0..20 {
        let (status, _, body) = http(
            gw,
            "POST",
            "/v1/runs/no-collector/events",
            &[("traceparent", tp)],
            r#"{"kind":"log","data":{"line":"x"}}"#,
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let frames = traced_frames(&mut client, 20).await;
    let seqs: Vec<u64> = frames.iter().map(|f| f["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    // Still serving after the exporter gave up on a few batches.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(http(gw, "GET", "/healthz", &[], "").await.0, 200);
    assert!(
        up.try_wait().unwrap().is_none(),
        "runcast up exited: {}",
        log.lock().unwrap()
    );
}

#[tokio::test]
async fn bad_trace_settings_are_refused_with_a_reason() {
    for (args, env, says) in [
        (
            vec!["--otlp-endpoint", "collector:4317"],
            None,
            "must be a URL",
        ),
        (
            vec![
                "--otlp-endpoint",
                "http://127.0.0.1:4317",
                "--trace-sample-ratio",
                "2",
            ],
            None,
            "outside 0.0..=1.0",
        ),
        (
            vec!["--otlp-endpoint", "http://127.0.0.1:4317"],
            Some(("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")),
            "gRPC only",
        ),
    ] {
        let mut cmd = Command::new(BIN);
        cmd.args(["tail", "some-run", "--url", "http://127.0.0.1:9"])
            .args(&args);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().await.unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
