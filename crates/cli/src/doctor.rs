//! `runcast doctor`: checks every hop between this machine and a gateway,
//! and NATS behind it, the way a person debugging "progress does not show
//! up" would: is anything listening, is it ready, does a WebSocket upgrade
//! survive the proxies in between, does SSE stream without buffering, is
//! NATS there with its stream and bucket, and does an event published now
//! come back through a subscription. Each result is printed with its timing;
//! a failure says what is wrong and how to fix it, and the exit code is 1.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use runcast_worker::tls::{ConnectError, ConnectErrorKind, Dialer};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::{
    args::DoctorArgs,
    connect::{self, UpgradeError, Ws},
};

/// One check's outcome.
struct Check {
    name: &'static str,
    took: Duration,
    result: Result<String, Problem>,
}

/// What failed and what to do about it.
struct Problem {
    what: String,
    fix: String,
}

fn problem(what: impl Into<String>, fix: impl Into<String>) -> Problem {
    Problem {
        what: what.into(),
        fix: fix.into(),
    }
}

struct Report {
    checks: Vec<Check>,
}

impl Report {
    fn record(
        &mut self,
        name: &'static str,
        started: Instant,
        result: Result<String, Problem>,
    ) -> bool {
        let check = Check {
            name,
            took: started.elapsed(),
            result,
        };
        let ms = check.took.as_secs_f64() * 1000.0;
        match &check.result {
            Ok(detail) => println!("ok    {name:<22} {ms:>8.1} ms  {detail}"),
            Err(p) => {
                println!("FAIL  {name:<22} {ms:>8.1} ms  {}", p.what);
                println!("      fix: {}", p.fix);
            }
        }
        let ok = check.result.is_ok();
        self.checks.push(check);
        ok
    }

    fn skip(&mut self, name: &'static str, why: &str) {
        println!("skip  {name:<22} {:>8} ms  {why}", "-");
    }
}

/// Where the gateway is (any URL form, a path prefix kept), how to reach
/// it (TLS and whom to trust), and the credentials for protected gateways:
/// a subscriber token and a publish API key, sent with every request that
/// may need them.
struct Target {
    dialer: Dialer,
    token: Option<String>,
    key: Option<String>,
}

/// Why a request got no HTTP answer.
enum SendError {
    /// No connection: nothing listening, DNS, TLS.
    Connect(ConnectError),
    /// Connected, but no usable HTTP exchange.
    Http(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "{e}"),
            Self::Http(e) => f.write_str(e),
        }
    }
}

/// What to do about a connection that could not be opened.
fn connect_fix(kind: ConnectErrorKind) -> &'static str {
    match kind {
        ConnectErrorKind::Resolve => "check the host name in --url",
        ConnectErrorKind::Unreachable | ConnectErrorKind::Interrupted => {
            "start the gateway, or keep `kubectl port-forward svc/<release>-runcast 8080` running, and check --url"
        }
        ConnectErrorKind::Certificate => {
            "pass the CA that signed the gateway's certificate with --ca-file (RUNCAST_CA_FILE), or use a host name the certificate lists"
        }
        ConnectErrorKind::Handshake => {
            "use http:// for a gateway that serves plain HTTP (no --tls-cert), https:// for one with --tls-cert or behind a TLS proxy"
        }
    }
}

/// Sends one HTTP/1.1 request to the gateway on a fresh connection and
/// returns the response with its body unread (SSE reads only its start),
/// and the TLS version if the connection has TLS.
async fn send(
    t: &Target,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> Result<(hyper::Response<hyper::body::Incoming>, Option<String>), SendError> {
    let stream = t.dialer.connect().await.map_err(SendError::Connect)?;
    let tls = stream.tls_version();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| SendError::Http(format!("handshake: {e}")))?;
    tokio::spawn(conn);
    let url = t.dialer.url();
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(url.path(path))
        .header("host", url.authority());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(tok) = &t.token {
        req = req.header("authorization", format!("Bearer {tok}"));
    }
    if let Some(k) = &t.key {
        req = req.header("x-runcast-key", k.as_str());
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| SendError::Http(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| SendError::Http(e.to_string()))?;
    Ok((resp, tls))
}

/// One whole request and response within `within`: status, body, and the
/// TLS version if any.
async fn request(
    t: &Target,
    method: &str,
    path: &str,
    body: Option<String>,
    within: Duration,
) -> Result<(u16, String, Option<String>), SendError> {
    let exchange = async {
        let (resp, tls) = send(
            t,
            method,
            path,
            &[("content-type", "application/json")],
            body,
        )
        .await?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| SendError::Http(e.to_string()))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned(), tls))
    };
    tokio::time::timeout(within, exchange)
        .await
        .map_err(|_| SendError::Http(format!("no answer within {within:?}")))?
}

fn message_of(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| {
            v["error"]["message"]
                .as_str()
                .or(v["message"].as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| body.trim().chars().take(200).collect())
}

pub async fn run(a: DoctorArgs) -> anyhow::Result<ExitCode> {
    let dialer = connect::dialer(&a.url, a.tls.ca_file.as_deref())?;
    let url = dialer.url().clone();
    let addr = tokio::net::lookup_host((url.host(), url.port()))
        .await
        .with_context(|| format!("cannot resolve {}", url.host()))?
        .next()
        .with_context(|| format!("{} resolves to no address", url.host()))?;
    let t = Target {
        dialer,
        token: a.subscriber.token.clone(),
        key: a.publisher.key.clone(),
    };
    let within = a.timeout;
    let mut r = Report { checks: Vec::new() };
    println!("runcast doctor: {} ({addr})", a.url);

    // 1. Anything listening, answering HTTP (over TLS for https)?
    let started = Instant::now();
    let reachable = match request(&t, "GET", "/healthz", None, within).await {
        Ok((200, _, tls)) => Ok(match tls {
            Some(version) => format!("GET /healthz -> 200 over {version}, certificate trusted"),
            None => "GET /healthz -> 200".to_owned(),
        }),
        Ok((status, body, _)) => Err(problem(
            format!(
                "GET {} -> {status}: {}",
                url.path("/healthz"),
                message_of(&body)
            ),
            "this URL reaches something that is not a runcast gateway; check the port, the path prefix and your ingress routes",
        )),
        Err(SendError::Connect(e)) if e.kind == ConnectErrorKind::Unreachable => Err(problem(
            format!("nothing is listening at {addr} ({e})"),
            connect_fix(e.kind),
        )),
        Err(SendError::Connect(e)) => Err(problem(e.to_string(), connect_fix(e.kind))),
        Err(SendError::Http(e)) => Err(problem(
            format!("no HTTP answer: {e}"),
            if url.is_tls() {
                "something accepts TLS connections but does not answer HTTP; check what listens on this port"
            } else {
                "something accepts connections but does not answer HTTP; if it serves TLS, use an https:// URL"
            },
        )),
    };
    if !r.record("gateway reachable", started, reachable) {
        return Ok(finish(&r));
    }

    // 2. Ready?
    let started = Instant::now();
    let ready = match request(&t, "GET", "/readyz", None, within).await {
        Ok((200, _, _)) => Ok("GET /readyz -> 200".to_owned()),
        Ok((status, body, _)) => {
            let why = message_of(&body);
            let fix = if why.contains("NATS") || why.contains("bus") {
                "the gateway cannot use NATS: check that NATS runs, that --nats points at it, and the credentials; `runcast doctor --nats <url>` checks NATS directly"
            } else if why.contains("drain") {
                "the gateway is shutting down; clients will move to another pod"
            } else {
                "see the gateway's log for the reason"
            };
            Err(problem(format!("GET /readyz -> {status}: {why}"), fix))
        }
        Err(e) => Err(problem(
            format!("GET /readyz: {e}"),
            "see the gateway's log",
        )),
    };
    let ready = r.record("gateway ready", started, ready);

    // 3. WebSocket upgrade through whatever lies in between.
    let ws_url = url.ws_url();
    let started = Instant::now();
    let mut ws: Option<Ws> = None;
    let authorization = connect::bearer(t.token.as_deref())?;
    let upgraded = match connect::websocket(&t.dialer, authorization.as_ref(), within).await {
        Err(UpgradeError::TimedOut(_)) => Err(problem(
            format!("no upgrade answer within {within:?}"),
            "a proxy holds the upgrade request; check its WebSocket support and timeouts",
        )),
        Err(UpgradeError::Answered { status, .. }) if matches!(status, 401 | 403) => Err(problem(
            format!(
                "GET /v1/ws answered {status}: the gateway requires a subscriber token{}",
                if t.token.is_some() {
                    " and refused the one given"
                } else {
                    ""
                }
            ),
            "pass a valid token with --token (docs/security.md says how tokens are issued)",
        )),
        Err(UpgradeError::Answered { status, .. }) => Err(problem(
            format!(
                "GET /v1/ws answered {status} instead of 101 Switching Protocols: the Upgrade request did not reach the gateway intact"
            ),
            "a proxy strips the Upgrade and Connection headers. ingress-nginx: WebSockets work by default, check custom configuration snippets; plain nginx: proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\"; see docs/observability.md (runcast doctor)",
        )),
        Err(UpgradeError::Connect(e)) => Err(problem(e.to_string(), connect_fix(e.kind))),
        Err(e @ UpgradeError::Broken(_)) => Err(problem(
            e.explain(&url),
            "check the URL and any proxy in between",
        )),
        Ok(mut socket) => {
            // The gateway greets first; a buffering proxy holds the greeting.
            match tokio::time::timeout(within, socket.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if t.contains(r#""type":"hello""#) => {
                    ws = Some(socket);
                    Ok(format!(
                        "101 Switching Protocols, hello received ({ws_url})"
                    ))
                }
                Ok(other) => Err(problem(
                    format!("upgraded, but the first frame was not hello: {other:?}"),
                    "something other than a runcast gateway answers /v1/ws",
                )),
                Err(_) => Err(problem(
                    format!("upgraded, but no frame within {within:?}"),
                    "a proxy buffers WebSocket traffic; disable buffering for /v1/ws",
                )),
            }
        }
    };
    r.record("websocket upgrade", started, upgraded);

    // 4. SSE, and whether it streams or is buffered.
    let probe = format!("doctor-{}", std::process::id());
    let started = Instant::now();
    let sse = sse_check(&t, &probe, within).await;
    r.record("sse stream", started, sse);

    // 5. NATS itself.
    match &a.nats {
        Some(url) => {
            let started = Instant::now();
            let nats = nats_check(url, &a.nats_stream, &a.nats_kv, within).await;
            r.record("nats", started, nats);
        }
        None => r.skip("nats", "no --nats given"),
    }

    // 6. An event published now comes back through a subscription.
    match ws {
        Some(ws) if ready => {
            let started = Instant::now();
            let round = round_trip(&t, ws, &probe, within).await;
            r.record("publish round trip", started, round);
        }
        _ => r.skip(
            "publish round trip",
            "needs a ready gateway and a WebSocket",
        ),
    }
    Ok(finish(&r))
}

fn finish(r: &Report) -> ExitCode {
    let failed: Vec<&str> = r
        .checks
        .iter()
        .filter(|c| c.result.is_err())
        .map(|c| c.name)
        .collect();
    if failed.is_empty() {
        println!("all {} checks passed", r.checks.len());
        ExitCode::SUCCESS
    } else {
        println!(
            "{} of {} checks failed: {}",
            failed.len(),
            r.checks.len(),
            failed.join(", ")
        );
        ExitCode::from(1)
    }
}

async fn sse_check(t: &Target, run: &str, within: Duration) -> Result<String, Problem> {
    let route = format!("/v1/runs/{run}/stream");
    // As the user's URL spells it, for the messages.
    let path = t.dialer.url().path(&route);
    let first_bytes = async {
        let (resp, _) = send(t, "GET", &route, &[("accept", "text/event-stream")], None)
            .await
            .map_err(|e| problem(e.to_string(), "check the URL"))?;
        let status = resp.status().as_u16();
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        if status != 200 || !ctype.starts_with("text/event-stream") {
            return Err(problem(
                format!("GET {path} -> {status} ({ctype})"),
                "something other than the gateway answers the SSE route; check the ingress paths",
            ));
        }
        let mut body = resp.into_body();
        match body.frame().await {
            Some(Ok(_)) => Ok(format!(
                "200 text/event-stream, first bytes streamed ({path})"
            )),
            _ => Err(problem("the stream ended at once", "see the gateway's log")),
        }
    };
    match tokio::time::timeout(within, first_bytes).await {
        Ok(r) => r,
        Err(_) => Err(problem(
            format!("no bytes from {path} within {within:?}: the stream is being buffered"),
            "turn off response buffering for SSE: nginx proxy_buffering off; (the gateway also sends X-Accel-Buffering: no)",
        )),
    }
}

async fn nats_check(
    url: &str,
    stream: &str,
    kv: &str,
    within: Duration,
) -> Result<String, Problem> {
    let cfg = runcast_nats::NatsConfig {
        connect_timeout: within,
        ..runcast_nats::NatsConfig::with_urls(url)
    };
    let client = runcast_nats::connect(&cfg, false).await.map_err(|e| {
        problem(
            e.to_string(),
            "check that NATS runs and that the URL and credentials are right",
        )
    })?;
    let js = runcast_nats::async_nats::jetstream::new(client);
    let checks = async {
        js.get_stream(stream).await.map_err(|e| {
            problem(
                format!("stream {stream}: {e}"),
                "JetStream must be enabled (nats-server -js); a gateway creates the stream when it starts",
            )
        })?;
        js.get_key_value(kv).await.map_err(|e| {
            problem(
                format!("KV bucket {kv}: {e}"),
                "a gateway creates the bucket when it starts; check its log",
            )
        })?;
        Ok(format!("{url}: stream {stream} and KV bucket {kv} present"))
    };
    tokio::time::timeout(within, checks)
        .await
        .unwrap_or_else(|_| {
            Err(problem(
                format!("JetStream did not answer within {within:?}"),
                "check the NATS servers' health (nats server report jetstream)",
            ))
        })
}

async fn round_trip(
    t: &Target,
    mut ws: Ws,
    run: &str,
    within: Duration,
) -> Result<String, Problem> {
    let sub = serde_json::json!({"type": "subscribe", "run": run}).to_string();
    ws.send(Message::Text(sub.into()))
        .await
        .map_err(|e| problem(e.to_string(), "the WebSocket closed"))?;
    // Wait for the state frame: the subscription is live.
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(f)))) if f.contains(r#""type":"state""#) => break,
            Ok(Some(Ok(Message::Text(f)))) if f.contains(r#""type":"error""#) => {
                return Err(problem(
                    format!("subscribe refused: {f}"),
                    "see the error code in docs/protocol.md",
                ));
            }
            Ok(Some(Ok(_))) => {}
            _ => {
                return Err(problem(
                    "no state frame after subscribing",
                    "see the gateway's log",
                ));
            }
        }
    }
    let sent = Instant::now();
    // The probe starts a trace of its own, so that the gateways' spans for
    // it (when they export traces) can be found by the printed trace ID.
    let tp = runcast_telemetry::new_traceparent();
    let trace = runcast_telemetry::trace_id(&tp)
        .unwrap_or_default()
        .to_owned();
    let body = serde_json::json!({"kind": "log", "data": {"doctor": "probe"}, "traceparent": tp})
        .to_string();
    let seq = match request(
        t,
        "POST",
        &format!("/v1/runs/{run}/events"),
        Some(body),
        within,
    )
    .await
    {
        Ok((200, b, _)) => serde_json::from_str::<Value>(&b)
            .ok()
            .and_then(|v| v["seqs"][0].as_u64())
            .unwrap_or(0),
        Ok((status, b, _)) => {
            let fix = match status {
                401 => {
                    "the gateway needs a publish API key: pass --key (runcast publish-key makes one)"
                }
                403 => {
                    "the publish key does not cover the probe run: give doctor a key whose prefixes include \"doctor-\""
                }
                429 => "the publish key is over its --publish-rate-per-key; try again in a moment",
                _ => "the bus refused the probe event; see the gateway's log",
            };
            return Err(problem(
                format!("publish -> {status}: {}", message_of(&b)),
                fix,
            ));
        }
        Err(e) => return Err(problem(format!("publish: {e}"), "see the gateway's log")),
    };
    let acked = sent.elapsed();
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(f)))) if f.contains(r#""type":"event""#) => {
                let got = sent.elapsed();
                let _ = ws.close(None).await;
                let frame: Value = serde_json::from_str(&f).unwrap_or_default();
                let carried = frame["traceparent"]
                    .as_str()
                    .and_then(runcast_telemetry::trace_id)
                    == Some(trace.as_str());
                return Ok(format!(
                    "probe seq {seq} on run {run}: publish -> ack {:.1} ms, publish -> subscriber {:.1} ms, trace {trace}{}",
                    acked.as_secs_f64() * 1000.0,
                    got.as_secs_f64() * 1000.0,
                    if carried {
                        ""
                    } else {
                        " (not carried to the client: the gateway predates tracing)"
                    }
                ));
            }
            Ok(Some(Ok(_))) => {}
            _ => {
                return Err(problem(
                    format!("published seq {seq}, but it did not come back within {within:?}"),
                    "the gateway stores events but does not deliver them live: check runcast_bus_up and runcast_bus_live_resyncs_total in /metrics, that the RUNCAST_EVENTS stream republishes runcast.runs.> to runcast.live.> (nats stream info RUNCAST_EVENTS), and that the gateway's NATS user may subscribe to runcast.live.>",
                ));
            }
        }
    }
}
