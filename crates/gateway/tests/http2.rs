//! HTTP/2 with real clients: many SSE streams share one connection (curl
//! over TLS with ALPN `h2`, hyper's HTTP/2 client in plain text with prior
//! knowledge, and Chromium over TLS), WebSockets over HTTP/2 (RFC 8441), and
//! errors that are the same JSON over HTTP/2 as over HTTP/1.1.

use std::{path::Path, process::Command, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Method, Request, StatusCode, body::Incoming, client::conn::http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use runcast_bus::Retention;
use runcast_core::{EventKind, NewEvent, RunId};
use runcast_gateway::{
    Config,
    tls::{Tls, TlsFiles},
};
use runcast_test_support::{TestGateway, browser::Browser, make_certs, nats::TempDir};
use serde_json::{Value, json};

async fn publish(gw: &TestGateway, run: &str, i: u64) -> u64 {
    let ev = NewEvent::json(EventKind::Progress, &json!({ "done": i, "total": 10 })).unwrap();
    gw.bus()
        .publish(&RunId::parse(run).unwrap(), vec![ev])
        .await
        .unwrap()[0]
}

async fn tls_gateway(dir: &Path, config: Config) -> TestGateway {
    make_certs(dir, &["gw"]);
    let tls = Tls::load(TlsFiles {
        cert: dir.join("gw.pem"),
        key: dir.join("gw.key"),
        reload_interval: Duration::from_secs(60),
    })
    .unwrap();
    TestGateway::with(
        Config {
            tls: Some(tls),
            ..config
        },
        Retention::default(),
    )
    .await
}

/// Runs curl with `args`; returns its stdout. Transfers that are SSE streams
/// end at `--max-time` (exit 28), which is expected.
fn curl(args: &[String]) -> String {
    let out = Command::new("curl")
        .args(args)
        .output()
        .expect("curl runs (scripts/test.sh installs it)");
    let code = out.status.code();
    assert!(
        matches!(code, Some(0 | 28)),
        "curl {args:?} exited {code:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The SSE `data:` payloads of a stream's bytes, as JSON.
fn sse_frames(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|msg| {
            let data: Vec<&str> = msg
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            (!data.is_empty()).then(|| serde_json::from_str(&data.join("\n")).unwrap())
        })
        .collect()
}

const RUNS: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_tls_multiplexes_many_sse_streams_on_one_connection() {
    let dir = TempDir::new("runcast-h2-curl");
    let gw = tls_gateway(dir.path(), Config::default()).await;
    for r in 0..RUNS {
        publish(&gw, &format!("h2-{r}"), 1).await;
    }
    let mut args: Vec<String> = [
        "-sS",
        "--http2",
        "--parallel",
        "--parallel-max",
        "50",
        "--max-time",
        "3",
        "-w",
        "%{http_version} %{num_connects}\\n",
        "--cacert",
    ]
    .map(str::to_owned)
    .to_vec();
    args.push(dir.path().join("ca.pem").display().to_string());
    for r in 0..RUNS {
        args.push("-o".into());
        args.push(dir.path().join(format!("out{r}")).display().to_string());
        args.push(format!(
            "https://127.0.0.1:{}/v1/runs/h2-{r}/stream?since=0",
            gw.addr.port()
        ));
    }
    let summary = curl(&args);
    let lines: Vec<&str> = summary.lines().collect();
    assert_eq!(lines.len(), RUNS, "{summary}");
    assert!(
        lines.iter().all(|l| l.starts_with("2 ")),
        "every stream is HTTP/2: {summary}"
    );
    let connects: u32 = lines
        .iter()
        .map(|l| l.split(' ').nth(1).unwrap().parse::<u32>().unwrap())
        .sum();
    assert_eq!(
        connects, 1,
        "{RUNS} streams share one TCP connection: {summary}"
    );
    for r in 0..RUNS {
        let text = std::fs::read_to_string(dir.path().join(format!("out{r}"))).unwrap();
        let frames = sse_frames(&text);
        assert_eq!(frames[0]["type"], "state", "{text}");
        assert_eq!(frames[1]["type"], "event", "{text}");
        assert_eq!(frames[1]["run"], format!("h2-{r}"));
        assert_eq!(frames[1]["seq"], 1);
    }
}

/// Plain-text HTTP/2 ("h2c") needs prior knowledge: browsers never use it,
/// proxies and service meshes do. (curl 7.88, Debian 12's, fails to reuse a
/// prior-knowledge connection for a second transfer, curl issue #10634, so
/// curl checks one transfer at a time here and hyper's client checks
/// multiplexing below.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_prior_knowledge_speaks_h2c() {
    let gw = TestGateway::start().await;
    publish(&gw, "h2c", 1).await;
    let base = format!("http://127.0.0.1:{}", gw.addr.port());
    let get = |path: &str, extra: &[&str]| {
        let mut args: Vec<String> = [
            "-sS",
            "--http2-prior-knowledge",
            "--max-time",
            "2",
            "-w",
            "\\n%{http_version} %{http_code}",
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(format!("{base}{path}"));
        curl(&args)
    };
    assert!(get("/healthz", &[]).ends_with("ok\n\n2 200"));
    let stream = get("/v1/runs/h2c/stream?since=0", &[]);
    let frames = sse_frames(&stream);
    assert_eq!(frames[1]["seq"], 1, "{stream}");
    assert!(stream.ends_with("\n2 200"));
    // Errors are the same JSON, with the same status, over HTTP/2.
    let (body, tail) = get("/v1/runs", &["-X", "DELETE", "-i"])
        .rsplit_once('\n')
        .map(|(b, t)| (b.to_owned(), t.to_owned()))
        .unwrap();
    assert_eq!(tail, "2 405");
    assert!(body.contains("allow: GET"), "{body}");
    assert!(body.contains(r#""code":"method_not_allowed""#), "{body}");
    let nope = get("/v1/runs/bad%20id/events", &[]);
    assert!(nope.contains(r#""code":"invalid_run_id""#), "{nope}");
    assert!(nope.ends_with("2 400"));
}

/// An HTTP/2 connection in plain text (prior knowledge) with hyper's client.
async fn h2c(gw: &TestGateway) -> http2::SendRequest<Full<Bytes>> {
    h2c_with(gw, &http2::Builder::new(TokioExecutor::new())).await
}

/// The same, with the client settings of `builder` and request bodies of
/// type `B`.
async fn h2c_with<B>(
    gw: &TestGateway,
    builder: &http2::Builder<TokioExecutor>,
) -> http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (send, conn) = builder
        .handshake(TokioIo::new(tcp))
        .await
        .expect("h2c handshake");
    tokio::spawn(conn);
    send
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://127.0.0.1{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// An SSE response body and what has arrived on it so far.
struct Stream {
    body: Incoming,
    text: String,
}

impl Stream {
    /// Reads until `n` data frames have arrived in all; returns them all.
    async fn frames(&mut self, n: usize) -> Vec<Value> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let frames = sse_frames(&self.text);
                if frames.len() >= n {
                    return frames;
                }
                let chunk = self.body.frame().await.expect("stream open").unwrap();
                if let Some(d) = chunk.data_ref() {
                    self.text.push_str(std::str::from_utf8(d).unwrap());
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} frames did not arrive: {}", self.text))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_multiplexed_over_h2c_get_live_events() {
    let gw = TestGateway::start().await;
    let mut send = h2c(&gw).await;
    let mut bodies = Vec::new();
    for r in 0..RUNS {
        let resp = send
            .send_request(get(&format!("/v1/runs/live-{r}/stream")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        let mut stream = Stream {
            body: resp.into_body(),
            text: String::new(),
        };
        assert_eq!(stream.frames(1).await[0]["type"], "state");
        bodies.push(stream);
    }
    // One TCP connection, twelve sessions.
    let m = gw.gw.metrics.render();
    let sample = |name: &str| runcast_test_support::metric(&m, name);
    assert_eq!(sample("runcast_tcp_connections"), Some(1.0), "{m}");
    assert_eq!(
        sample(r#"runcast_connections{transport="sse"}"#),
        Some(RUNS as f64)
    );
    // Published over the same connection, delivered live on every stream.
    for r in 0..RUNS {
        let req = Request::post(format!("http://127.0.0.1/v1/runs/live-{r}/events"))
            .body(Full::new(Bytes::from(
                r#"{"kind":"log","data":"over h2"}"#.to_string(),
            )))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    for (r, stream) in bodies.iter_mut().enumerate() {
        let frames = stream.frames(2).await;
        assert_eq!(frames[1]["run"], format!("live-{r}"));
        assert_eq!(frames[1]["data"], "over h2");
    }
    // Closing one stream (RST_STREAM) ends its session, not the others'.
    drop(bodies.pop());
    publish(&gw, "live-0", 2).await;
    assert_eq!(bodies[0].frames(3).await[2]["seq"], 2);
}

/// The next text frame of a WebSocket, as JSON.
async fn next_json<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).unwrap(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_http2_extended_connect() {
    use futures_util::SinkExt;
    use tokio_tungstenite::{WebSocketStream, tungstenite::Message, tungstenite::protocol::Role};

    let gw = TestGateway::start().await;
    let mut send: http2::SendRequest<Empty<Bytes>> =
        h2c_with(&gw, &http2::Builder::new(TokioExecutor::new())).await;
    // A plain GET on /v1/ws over HTTP/2 is not a WebSocket.
    let plain = send
        .send_request(
            Request::get("http://127.0.0.1/v1/ws")
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    // 400, not 426: a 426 must carry `Upgrade`, which HTTP/2 forbids.
    assert_eq!(plain.status(), StatusCode::BAD_REQUEST);
    let body = plain.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("extended CONNECT"),
        "the advice fits HTTP/2: {body:?}"
    );

    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri("http://127.0.0.1/v1/ws")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-protocol", "runcast.v1")
        .body(Empty::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let mut resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["sec-websocket-protocol"], "runcast.v1");
    let upgraded = hyper::upgrade::on(&mut resp).await.unwrap();
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    assert_eq!(next_json(&mut ws).await["type"], "hello");
    ws.send(Message::Text(
        json!({"type": "subscribe", "run": "ws-h2"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "state");
    publish(&gw, "ws-h2", 1).await;
    let event = next_json(&mut ws).await;
    assert_eq!(event["type"], "event");
    assert_eq!(event["seq"], 1);
    // The WebSocket is one stream: the connection still serves requests.
    let health = send
        .send_request(
            Request::get("http://127.0.0.1/healthz")
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

/// A browser over TLS negotiates HTTP/2, and its streams share one
/// connection: with room for only two TCP connections, a dozen
/// `EventSource`s and a WebSocket all work (over HTTP/1.1 each would need
/// its own connection and most would be refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_over_tls_shares_one_connection_between_many_streams() {
    let dir = TempDir::new("runcast-h2-chromium");
    let gw = Arc::new(
        tls_gateway(
            dir.path(),
            Config {
                max_connections: 2,
                ..Config::default()
            },
        )
        .await,
    );
    for r in 0..RUNS {
        publish(&gw, &format!("page-{r}"), 1).await;
    }
    let url = format!("https://127.0.0.1:{}/", gw.addr.port());
    let mut page = Browser::open_with(&url, &["--ignore-certificate-errors"]).await;
    page.wait_for("the page", "document.readyState === 'complete'")
        .await;
    let proto = page
        .eval("performance.getEntriesByType('navigation')[0].nextHopProtocol")
        .await;
    assert_eq!(proto, "h2");
    page.eval(&format!(
        r#"(() => {{
        window.got = {{}};
        for (let r = 0; r < {RUNS}; r++) {{
            const es = new EventSource('/v1/runs/page-' + r + '/stream?since=0');
            es.onmessage = (m) => {{
                const f = JSON.parse(m.data);
                if (f.type === 'event') (window.got[f.run] = window.got[f.run] || []).push(f.seq);
            }};
        }}
        window.wsFrames = [];
        const socket = new WebSocket('wss://' + location.host + '/v1/ws');
        socket.onmessage = (m) => window.wsFrames.push(JSON.parse(m.data).type);
        return true;
        }})()"#
    ))
    .await;
    page.wait_for(
        "one event on every stream",
        &format!("Object.values(window.got).filter(s => s.length >= 1).length === {RUNS}"),
    )
    .await;
    for r in 0..RUNS {
        publish(&gw, &format!("page-{r}"), 2).await;
    }
    page.wait_for(
        "a live event on every stream",
        &format!("Object.values(window.got).filter(s => s.join() === '1,2').length === {RUNS}"),
    )
    .await;
    page.wait_for("the WebSocket's hello", "window.wsFrames.includes('hello')")
        .await;
}

/// An HTTP/2 connection with nothing in flight is closed after the idle
/// period (GOAWAY), as an idle HTTP/1.1 keep-alive connection is; one with
/// an open stream is not. (Found by an outside tester: idle HTTP/2
/// connections that answer pings held `--max-connections` slots for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed_busy_ones_are_not() {
    let gw = TestGateway::with(
        Config {
            header_read_timeout: Duration::from_millis(300),
            heartbeat_interval: Duration::from_millis(100),
            ..Config::default()
        },
        Retention::default(),
    )
    .await;
    let mut idle = h2c(&gw).await;
    let resp = idle.send_request(get("/healthz")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut busy = h2c(&gw).await;
    let resp = busy
        .send_request(get("/v1/runs/idle/stream"))
        .await
        .unwrap();
    let mut stream = Stream {
        body: resp.into_body(),
        text: String::new(),
    };
    assert_eq!(stream.frames(1).await[0]["type"], "state");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(idle.is_closed(), "an idle HTTP/2 connection is closed");
    assert!(!busy.is_closed(), "a connection with an open stream stays");
    publish(&gw, "idle", 1).await;
    assert_eq!(stream.frames(2).await[1]["seq"], 1);
}

/// Ways to keep an HTTP/2 connection from counting as idle, found by an
/// outside tester, each of which held a `--max-connections` slot for ever:
/// a response stalled behind a zero flow-control window, and a publish
/// whose body never comes (each timed-out stream renewed by the next).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_responses_and_slow_bodies_do_not_hold_an_http2_connection() {
    use http_body_util::StreamBody;
    let gw = TestGateway::with(
        Config {
            header_read_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_millis(300),
            ..Config::default()
        },
        Retention::default(),
    )
    .await;

    // A client that never opens its receive window.
    let mut stalled: http2::SendRequest<Empty<Bytes>> = h2c_with(
        &gw,
        http2::Builder::new(TokioExecutor::new()).initial_stream_window_size(0),
    )
    .await;
    // Its response's headers come (they need no window); its body cannot.
    let stalled_resp = stalled
        .send_request(
            Request::get("http://127.0.0.1/metrics")
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(stalled_resp.status(), StatusCode::OK);

    // A publish whose body never arrives.
    type Never = StreamBody<
        futures_util::stream::Pending<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>,
    >;
    let mut slow: http2::SendRequest<Never> =
        h2c_with(&gw, &http2::Builder::new(TokioExecutor::new())).await;
    let req = Request::post("http://127.0.0.1/v1/runs/slow/events")
        .body(StreamBody::new(futures_util::stream::pending()))
        .unwrap();
    let answered = slow.send_request(req).await.unwrap();
    assert_eq!(answered.status(), StatusCode::REQUEST_TIMEOUT);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !slow.is_closed() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(slow.is_closed(), "a timed-out body closes the connection");
    while !stalled.is_closed() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        stalled.is_closed(),
        "a stalled response does not keep the connection"
    );
    drop(stalled_resp);
}
