//! Test support for runcast: a real gateway on a loopback port, protocol
//! clients over real sockets, a tiny HTTP client, a headless browser
//! ([`browser`]), real nginx and nats-server processes, and the bus
//! behaviour tests ([`bus_conformance`]) every bus implementation must pass.

pub mod browser;
pub mod bus_conformance;
pub mod k8s;
pub mod nats;
pub mod nginx;
pub mod otlp;
pub mod redis;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use runcast_bus::{Bus, EmbeddedBus, Retention};
use runcast_gateway::{Config, Gateway};
use serde_json::Value;
use tokio::{net::TcpStream, sync::oneshot, task::JoinHandle};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

/// How long a test waits for any single expected frame before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// A gateway on the embedded bus, listening on `127.0.0.1:0`.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub gw: Arc<Gateway>,
    bus: Arc<dyn Bus>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestGateway {
    pub async fn start() -> Self {
        Self::with(Config::default(), Retention::default()).await
    }

    pub async fn with(config: Config, retention: Retention) -> Self {
        Self::on(Arc::new(EmbeddedBus::new(retention)), config, "embedded").await
    }

    /// A gateway on any bus (e.g. a `NatsBus`); `source` labels its metrics.
    pub async fn on(bus: Arc<dyn Bus>, config: Config, source: &str) -> Self {
        Self::on_addr(bus, config, source, "127.0.0.1:0".parse().expect("addr")).await
    }

    /// On a given address: several gateways can share one port on
    /// 127.0.0.1, 127.0.0.2, ..., like pods sharing a container port.
    pub async fn on_addr(
        bus: Arc<dyn Bus>,
        config: Config,
        source: &str,
        addr: SocketAddr,
    ) -> Self {
        let gw = Gateway::new(bus.clone(), config, source);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(runcast_gateway::run(gw.clone(), listener, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            gw,
            bus,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn bus(&self) -> Arc<dyn Bus> {
        self.bus.clone()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts a graceful shutdown and returns a handle that completes when `run` returns.
    pub fn begin_shutdown(&mut self) -> JoinHandle<std::io::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("shutdown once")
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A protocol client over a real WebSocket.
pub struct WsClient {
    pub ws: Ws,
    pub hello: Value,
}

impl WsClient {
    /// Connects and reads the `hello` frame.
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("websocket connect timed out")
            .expect("websocket connect failed");
        Self::greeted(ws).await
    }

    /// A client on an open WebSocket, once the server's `hello` has come.
    async fn greeted(ws: Ws) -> Self {
        let mut c = Self {
            ws,
            hello: Value::Null,
        };
        c.hello = c.recv().await;
        assert_eq!(
            c.hello["type"], "hello",
            "first frame must be hello, got {}",
            c.hello
        );
        c
    }

    /// Connects from a chosen local address (any of 127.0.0.0/8 on Linux,
    /// so one machine can play many clients) with extra request headers, and
    /// reads `hello`; a refused handshake returns its status, headers and body.
    pub async fn connect_from(
        src: std::net::IpAddr,
        addr: SocketAddr,
        headers: &[(&str, &str)],
    ) -> Result<Self, (u16, hyper::HeaderMap, String)> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let tcp = tcp_from(src, addr).await;
        let mut req = format!("ws://{addr}/v1/ws")
            .into_client_request()
            .expect("request");
        for (k, v) in headers {
            req.headers_mut().insert(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                v.parse().expect("header value"),
            );
        }
        let handshake = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp));
        match tokio::time::timeout(WAIT, handshake)
            .await
            .expect("handshake in time")
        {
            Ok((ws, _)) => Ok(Self::greeted(ws).await),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                let (parts, body) = r.into_parts();
                Err((
                    parts.status.as_u16(),
                    parts.headers,
                    String::from_utf8_lossy(body.as_deref().unwrap_or_default()).into_owned(),
                ))
            }
            Err(e) => panic!("websocket handshake failed: {e}"),
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_text(&mut self, t: &str) {
        self.ws
            .send(Message::Text(t.into()))
            .await
            .expect("send frame");
    }

    /// The next message of any kind (pings included), or `None` when the stream ended.
    pub async fn next_message(&mut self) -> Option<Message> {
        match tokio::time::timeout(WAIT, self.ws.next()).await {
            Err(_) => panic!("no message within {WAIT:?}"),
            Ok(None) => None,
            Ok(Some(Err(e))) => panic!("websocket error: {e}"),
            Ok(Some(Ok(m))) => Some(m),
        }
    }

    /// The next JSON text frame; panics on anything else.
    pub async fn recv(&mut self) -> Value {
        loop {
            match self.next_message().await {
                Some(Message::Text(t)) => {
                    return serde_json::from_str(&t).expect("server sent invalid JSON");
                }
                Some(Message::Ping(_) | Message::Pong(_)) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Subscribes and returns the state frame.
    pub async fn subscribe(&mut self, run: &str, since: Option<u64>) -> Value {
        let mut f = serde_json::json!({"type": "subscribe", "run": run});
        if let Some(s) = since {
            f["since"] = s.into();
        }
        self.send(f).await;
        let state = self.recv().await;
        assert_eq!(
            state["type"], "state",
            "expected state frame after subscribe, got {state}"
        );
        state
    }

    /// Reads until the server closes; returns the close code (None if the
    /// socket ended without a close frame) and the text frames seen before it.
    pub async fn read_until_close(&mut self) -> (Option<u16>, Vec<Value>) {
        let mut frames = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await {
                Err(_) => panic!("connection not closed within {WAIT:?}"),
                Ok(None) | Ok(Some(Err(_))) => return (None, frames),
                Ok(Some(Ok(Message::Close(c)))) => return (c.map(|c| u16::from(c.code)), frames),
                Ok(Some(Ok(Message::Text(t)))) => {
                    frames.push(serde_json::from_str(&t).expect("valid JSON"))
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

/// Makes a throwaway CA (`ca.pem`, `ca.key`) in `dir` with openssl, and for
/// each name a server certificate for 127.0.0.1 and localhost signed by it
/// (`<name>.pem`, `<name>.key`, CN = name). P-256 keys: quick to make.
pub fn make_certs(dir: &std::path::Path, names: &[&str]) {
    let run = |args: &[&str]| openssl(dir, args);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    if !dir.join("ca.pem").exists() {
        run(&[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "1"],
            &["-subj", "/CN=runcast-test-ca"],
        ]
        .concat());
    }
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("write ext.cnf");
    for name in names {
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        let subj = format!("/CN={name}");
        run(&[
            &["req"][..],
            &ec,
            &["-keyout", &key, "-out", &csr, "-subj", &subj],
        ]
        .concat());
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ]);
    }
}

/// The arguments of a `runcast gateway` process for tests that need no
/// auth: anyone may watch and publish over HTTP. One list, so a new
/// mandatory flag changes one place.
pub fn open_gateway_args(listen: SocketAddr, nats: &str) -> Vec<String> {
    [
        "gateway",
        "--allow-anonymous",
        "--allow-anonymous-publish",
        "--listen",
        &listen.to_string(),
        "--nats",
        nats,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Runs `openssl` with `args` in `dir`, failing the test with its stderr.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TCP connection to `addr` from the local address `src`.
pub async fn tcp_from(src: std::net::IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = match src {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .expect("socket");
    socket
        .bind(SocketAddr::new(src, 0))
        .expect("bind source address");
    tokio::time::timeout(WAIT, socket.connect(addr))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// The seqs of event frames for `run` in `frames`.
pub fn seqs(frames: &[Value], run: &str) -> Vec<u64> {
    frames
        .iter()
        .filter(|f| f["type"] == "event" && f["run"] == run)
        .map(|f| f["seq"].as_u64().expect("seq"))
        .collect()
}

/// A minimal HTTP/1.1 request over a fresh connection: status, headers, body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (u16, hyper::HeaderMap, String) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).expect("request");
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .expect("response in time")
        .expect("response");
    let status = resp.status().as_u16();
    let hdrs = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, hdrs, String::from_utf8_lossy(&body).into_owned())
}

/// An SSE client over a real socket that reads messages the way the
/// event-stream format says: several `data:` lines join with LF, and comments (`: heartbeat`) and `retry:` dispatch
/// nothing.
pub struct SseReader {
    body: hyper::body::Incoming,
    buf: String,
}

impl SseReader {
    /// `GET path`, with `Last-Event-ID` when given: the status, and the
    /// reader of the body.
    pub async fn open(
        addr: SocketAddr,
        path: &str,
        last_event_id: Option<u64>,
    ) -> (u16, SseReader) {
        let id = last_event_id.map(|i| i.to_string());
        let headers: Vec<(&str, &str)> = id.iter().map(|i| ("last-event-id", i.as_str())).collect();
        Self::open_with(addr, path, &headers).await
    }

    /// `GET path` with these request headers.
    pub async fn open_with(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, SseReader) {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let mut req = hyper::Request::get(path).header("host", addr.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = tokio::time::timeout(
            WAIT,
            send.send_request(req.body(Full::new(Bytes::new())).expect("request")),
        )
        .await
        .expect("response in time")
        .expect("response");
        let status = resp.status().as_u16();
        (
            status,
            SseReader {
                body: resp.into_body(),
                buf: String::new(),
            },
        )
    }

    /// The next message with data, as (its `id:`, the data parsed as JSON);
    /// `None` when the stream ends.
    pub async fn next(&mut self) -> Option<(Option<u64>, Value)> {
        let (id, data) = self.next_raw().await?;
        let id = id.map(|i| {
            i.parse()
                .unwrap_or_else(|_| panic!("id {i:?} is not a seq"))
        });
        Some((id, json(&data)))
    }

    /// The next message with data, as (its `id:` text, its data text).
    pub async fn next_raw(&mut self) -> Option<(Option<String>, String)> {
        loop {
            // A message ends at a blank line. The gateway ends lines with LF
            // only; a CR before it is tolerated (CRLF), a bare CR is not
            // expected (the conformance suite's parser covers every form).
            if let Some(end) = self.buf.find("\n\n").or_else(|| self.buf.find("\n\r\n")) {
                let msg: String = self.buf.drain(..end).collect();
                let blank = if self.buf.starts_with("\n\n") { 2 } else { 3 };
                self.buf.drain(..blank);
                let (mut id, mut data): (Option<String>, Option<String>) = (None, None);
                for line in msg.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)) {
                    if line.starts_with(':') {
                        continue;
                    }
                    let (field, value) = match line.split_once(':') {
                        Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                        None => (line, ""),
                    };
                    match field {
                        "id" => id = Some(value.to_owned()),
                        "data" => match &mut data {
                            Some(d) => {
                                d.push('\n');
                                d.push_str(value);
                            }
                            None => data = Some(value.to_owned()),
                        },
                        _ => {}
                    }
                }
                match data {
                    Some(d) => return Some((id, d)),
                    None => continue, // retry: or a heartbeat comment
                }
            }
            let frame = tokio::time::timeout(WAIT, self.body.frame())
                .await
                .expect("sse data in time")?;
            if let Ok(data) = frame.expect("sse body").into_data() {
                self.buf
                    .push_str(std::str::from_utf8(&data).expect("utf-8"));
            }
        }
    }
}

/// Waits up to 30 s for `GET path` on `addr` to answer 200 (a process we
/// started coming up); panics naming `what` otherwise.
pub async fn wait_http_ok(addr: SocketAddr, path: &str, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok()
            && http(addr, "GET", path, &[], "").await.0 == 200
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} not up within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Parses a JSON body, failing the test with the body when it is not JSON.
pub fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Runs `promtool check metrics` (installed by scripts/test.sh from
/// Debian's `prometheus` package) on a scrape, and fails the test with what
/// it says unless it accepts the scrape without a remark.
pub fn promtool_check_metrics(scrape: &str) {
    use std::io::Write;
    let mut lint = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool on PATH (scripts/test.sh installs Debian's prometheus package)");
    lint.stdin
        .take()
        .expect("stdin")
        .write_all(scrape.as_bytes())
        .expect("write the scrape");
    let out = lint.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A sample's value in a Prometheus text scrape, e.g.
/// `runcast_event_latency_seconds_count{hop="publish_to_write"}`; `None`
/// if the scrape lacks it or it is not a number.
pub fn metric(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))?
        .trim()
        .parse()
        .ok()
}
