//! `runcast doctor` against a healthy gateway (embedded and NATS-backed) and
//! against broken setups: nothing listening, NATS down, and a reverse proxy
//! that drops the WebSocket upgrade and buffers responses.

use std::{convert::Infallible, net::SocketAddr, process::Stdio, time::Duration};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use runcast_test_support::{
    http,
    nats::{NatsServer, free_addr},
};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_runcast");

/// A gateway process (`up` on the embedded bus, or `gateway --nats`), ready
/// or not, stopped by PID on drop.
async fn gateway(listen: SocketAddr, nats: Option<&str>, wait_ready: bool) -> Child {
    let mut cmd = Command::new(BIN);
    match nats {
        Some(url) => cmd.args(runcast_test_support::open_gateway_args(listen, url)),
        None => cmd.args(["up", "--listen", &listen.to_string()]),
    };
    let child = cmd
        .args(["--log", "warn"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let path = if wait_ready { "/readyz" } else { "/healthz" };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(listen).await.is_ok()
            && http(listen, "GET", path, &[], "").await.0 == 200
        {
            return child;
        }
        assert!(tokio::time::Instant::now() < deadline, "gateway up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `runcast doctor` with `args`; its exit code and stdout.
async fn doctor(args: &[&str]) -> (i32, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(BIN).arg("doctor").args(args).output(),
    )
    .await
    .expect("doctor finishes")
    .expect("doctor runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_gateway_passes_every_check() {
    let gw = free_addr();
    let _up = gateway(gw, None, true).await;
    let (code, out) = doctor(&["--url", &format!("http://{gw}")]).await;
    assert_eq!(code, 0, "{out}");
    for line in [
        "ok    gateway reachable",
        "ok    gateway ready",
        "ok    websocket upgrade",
        "ok    sse stream",
        "skip  nats",
        "ok    publish round trip",
        "all 5 checks passed",
    ] {
        assert!(out.contains(line), "{line:?} in:\n{out}");
    }
    assert!(out.contains("publish -> subscriber"), "{out}");
    // The probe's trace ID is printed, and the client frame carried it.
    let trace = out
        .split(", trace ")
        .nth(1)
        .and_then(|r| r.get(..32))
        .unwrap_or_default();
    assert!(
        trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit()),
        "{out}"
    );
    assert!(!out.contains("not carried"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_checks_pass_then_fail_precisely_when_nats_goes_away() {
    let mut nats = NatsServer::start().await;
    let gw = free_addr();
    let _gateway = gateway(gw, Some(&nats.url()), true).await;
    let url = format!("http://{gw}");
    let (code, out) = doctor(&["--url", &url, "--nats", &nats.url()]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ok    nats") && out.contains("RUNCAST_RUNS"),
        "{out}"
    );

    nats.kill();
    let (code, out) = doctor(&["--url", &url, "--nats", &nats.url(), "--timeout", "2s"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL  gateway ready"), "{out}");
    assert!(out.contains("cannot use NATS"), "{out}");
    assert!(out.contains("FAIL  nats"), "{out}");
    assert!(out.contains("skip  publish round trip"), "{out}");
}

#[tokio::test]
async fn nothing_listening_is_named_as_such() {
    let (code, out) = doctor(&["--url", &format!("http://{}", free_addr())]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("nothing is listening"), "{out}");
    assert!(out.contains("port-forward"), "{out}");
}

/// A reverse proxy as many are misconfigured: it forwards each request
/// without the hop-by-hop headers (so `Upgrade` never reaches the gateway)
/// and buffers each response whole before sending it on.
async fn buffering_proxy(upstream: SocketAddr) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                    Ok::<_, Infallible>(forward(upstream, req).await)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    at
}

async fn forward(
    upstream: SocketAddr,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let hop_by_hop = [
        "connection",
        "upgrade",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
    ];
    let mut out = Request::builder()
        .method(req.method())
        .uri(req.uri().clone());
    for (k, v) in req.headers() {
        if !hop_by_hop.contains(&k.as_str()) {
            out = out.header(k, v);
        }
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let tcp = tokio::net::TcpStream::connect(upstream).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(out.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    // Buffered whole: an endless SSE stream never gets through.
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Response::from_parts(parts, Full::new(body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_drops_the_upgrade_and_buffers_is_diagnosed() {
    let gw = free_addr();
    let _up = gateway(gw, None, true).await;
    let proxy = buffering_proxy(gw).await;
    let (code, out) = doctor(&["--url", &format!("http://{proxy}"), "--timeout", "2s"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("ok    gateway reachable"), "{out}");
    assert!(out.contains("FAIL  websocket upgrade"), "{out}");
    assert!(
        out.contains("strips the Upgrade and Connection headers"),
        "{out}"
    );
    assert!(out.contains("FAIL  sse stream"), "{out}");
    assert!(out.contains("buffered"), "{out}");
}
