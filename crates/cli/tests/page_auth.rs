//! The watch page at `/` on a gateway that requires subscriber tokens, in a
//! real headless Chromium against a `runcast up` process with an HS256
//! secret. Everything is checked from the outside: what the page shows, the
//! address bar, the gateway's `runcast_auth_failures_total`.
//!
//! - no token: an "unauthorized" state with a token box, and a bounded
//!   number of refused requests instead of a reconnect loop;
//! - `#token=<jwt>`: runs and live events, and the token leaves the URL;
//! - a token pasted into the box recovers from the unauthorized state;
//! - a token that does not cover a run: forbidden on that run only;
//! - `refresh`: the page asks for a fresh token and renews in place;
//! - close 4003 (no fresh token in time): unauthorized, then a new token
//!   resumes every run from its cursor without loss or duplicates;
//! - WebSockets refused while HTTP gets through: SSE with `access_token`.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use jsonwebtoken::{EncodingKey, Header, encode};
use runcast_test_support::{browser::Browser, http, nats::free_addr, wait_http_ok};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_runcast");
const SECRET: &str = "page-auth-test-shared-secret-32-bytes!";

/// `runcast up` with an HS256 secret: every reader needs a token. HTTP
/// publishing stays open (no publish keys), so tests publish freely.
async fn gateway() -> (Child, SocketAddr) {
    gateway_with(&[]).await
}

async fn gateway_with(args: &[&str]) -> (Child, SocketAddr) {
    let addr = free_addr();
    let child = Command::new(BIN)
        .args(["up", "--listen", &addr.to_string(), "--log", "warn"])
        .args(args)
        .env("RUNCAST_AUTH_HS256_SECRET", SECRET)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_http_ok(addr, "/readyz", "runcast up").await;
    (child, addr)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token valid for `ttl` seconds that covers the runs `scope` names
/// (`runs` and/or `run_prefixes` claims).
fn token(ttl: u64, scope: Value) -> String {
    let mut claims = scope;
    claims["exp"] = (now() + ttl).into();
    claims["sub"] = "page-test".into();
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn publish(addr: SocketAddr, run: &str, kind: &str, data: Value) {
    let body = json!({"kind": kind, "data": data}).to_string();
    let (status, _, resp) = http(addr, "POST", &format!("/v1/runs/{run}/events"), &[], body).await;
    assert_eq!(status, 200, "publish to {run}: {resp}");
}

/// The sum of a counter's series (every label value) in `/metrics`.
/// A `progress` event of `done` out of 10 for `run`.
async fn progress(addr: SocketAddr, run: &str, done: u64) {
    publish(addr, run, "progress", json!({"done": done, "total": 10})).await;
}

async fn counter(addr: SocketAddr, series: &str) -> u64 {
    let (_, _, scrape) = http(addr, "GET", "/metrics", &[], "").await;
    scrape
        .lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Refused tokens so far, over every reason: each request the page makes
/// without a valid token adds one.
async fn auth_failures(addr: SocketAddr) -> u64 {
    counter(addr, "runcast_auth_failures_total{").await
}

const UNAUTHORIZED: &str = "document.getElementById('conn').textContent === 'unauthorized' \
     && !document.getElementById('auth').hidden \
     && document.getElementById('token').offsetParent !== null";
const LIVE: &str = "document.getElementById('conn').className === 'up' \
     && document.getElementById('auth').hidden";

/// The status line of `run` in the page's run list ("" if not listed).
fn run_status(run: &str) -> String {
    format!("(document.querySelector('[data-run=\"{run}\"] .st')?.textContent ?? '')")
}

fn log_has(text: &str) -> String {
    format!("document.getElementById('log').innerText.includes({text:?})")
}

/// Waits until the page shows team-a-1's first event, then publishes the log
/// line `line` and waits until it appears live (`how` names the transport in
/// a failure).
async fn history_then_live(page: &mut Browser, addr: SocketAddr, line: &str, how: &str) {
    page.wait_for("team-a-1's history", &log_has("#1 ")).await;
    publish(addr, "team-a-1", "log", json!({ "line": line })).await;
    page.wait_for(how, &log_has(line)).await;
}

/// Pastes `token` into the token box and submits it, as a user would.
async fn paste_token(page: &mut Browser, token: &str) {
    page.eval("document.getElementById('token').focus()").await;
    page.insert_text(token).await;
    page.eval("document.querySelector('#tokenform button[type=submit]').click()")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_page_shows_unauthorized_and_stops_trying() {
    let (_gw, addr) = gateway().await;
    progress(addr, "team-a-1", 1).await;
    assert_eq!(auth_failures(addr).await, 0);

    let mut page = Browser::open(&format!("http://{addr}/")).await;
    page.wait_for("the unauthorized state with a token box", UNAUTHORIZED)
        .await;
    let msg = page
        .eval("document.getElementById('authmsg').textContent")
        .await;
    assert!(
        msg.as_str().unwrap().contains("needs a token"),
        "the page says a token is needed: {msg}"
    );
    assert_eq!(
        page.eval("document.querySelectorAll('.run').length").await,
        0,
        "nothing is listed without a token"
    );
    // Requests in flight when the state appeared land first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tried = auth_failures(addr).await;
    // The WebSocket upgrade, the run list and the probe that tells a 401
    // from a network failure.
    assert!(
        (1..=4).contains(&tried),
        "{tried} refused requests to reach the unauthorized state"
    );
    // Longer than the longest reconnect backoff (5 s) and two run-list polls.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let later = auth_failures(addr).await;
    assert_eq!(
        later, tried,
        "the page kept knocking after it showed the unauthorized state"
    );
    assert_eq!(
        page.eval("document.getElementById('conn').textContent")
            .await,
        "unauthorized"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_the_link_lists_runs_and_live_events_and_leaves_the_address_bar() {
    let (_gw, addr) = gateway().await;
    progress(addr, "team-a-1", 1).await;
    progress(addr, "team-a-2", 5).await;
    let tok = token(300, json!({"run_prefixes": ["team-a-"]}));

    let mut page = Browser::open(&format!("http://{addr}/#token={tok}")).await;
    page.wait_for("a live connection", LIVE).await;
    for run in ["team-a-1", "team-a-2"] {
        page.wait_for(&format!("{run} listed"), &run_status(run))
            .await;
    }
    let href = page.eval("location.href").await;
    let href = href.as_str().unwrap();
    assert!(
        !href.contains(&tok) && !href.contains("token") && !href.contains('#'),
        "the token stays in the address bar: {href}"
    );
    assert_eq!(
        page.eval("sessionStorage.getItem('runcast.token')").await,
        tok.as_str(),
        "the token is kept for the tab"
    );
    assert_eq!(
        page.eval("localStorage.length").await,
        0,
        "nothing outlives the tab"
    );
    assert_eq!(
        page.eval("document.getElementById('anon').hidden").await,
        true,
        "a token is not anonymous access"
    );

    page.eval("document.querySelector('[data-run=\"team-a-1\"]').click()")
        .await;
    history_then_live(&mut page, addr, "live-line-from-test", "a live event").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pasting_a_token_recovers_from_the_unauthorized_state() {
    let (_gw, addr) = gateway().await;
    progress(addr, "team-a-1", 1).await;
    let mut page = Browser::open(&format!("http://{addr}/")).await;
    page.wait_for("the unauthorized state", UNAUTHORIZED).await;

    // Something that is not a token is refused by the page itself.
    paste_token(&mut page, "not a token").await;
    page.wait_for(
        "that the paste is not a token",
        "document.getElementById('authmsg').textContent.includes('not a token')",
    )
    .await;
    assert_eq!(
        page.eval("document.getElementById('conn').textContent")
            .await,
        "unauthorized"
    );
    page.eval("document.getElementById('token').value = ''")
        .await;

    let tok = token(300, json!({"runs": ["team-a-1"]}));
    paste_token(&mut page, &tok).await;
    page.wait_for("a live connection", LIVE).await;
    page.wait_for("team-a-1 listed", &run_status("team-a-1"))
        .await;
    history_then_live(&mut page, addr, "after-the-paste", "a live event").await;
    assert_eq!(
        page.eval("sessionStorage.getItem('runcast.token')").await,
        tok.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_does_not_cover_a_run_shows_forbidden_on_that_run_only() {
    let (_gw, addr) = gateway().await;
    progress(addr, "team-a-1", 1).await;
    progress(addr, "team-b-1", 1).await;
    let tok = token(300, json!({"run_prefixes": ["team-a-"]}));

    // A link to a run the token does not cover.
    let mut page = Browser::open(&format!("http://{addr}/#run=team-b-1&token={tok}")).await;
    page.wait_for(
        "team-b-1 forbidden",
        &format!("{}.startsWith('forbidden')", run_status("team-b-1")),
    )
    .await;
    page.wait_for("why, in team-b-1's events", &log_has("forbidden"))
        .await;
    assert_eq!(
        page.eval("location.hash").await,
        "#run=team-b-1",
        "the token left the address bar, the run stayed"
    );
    // The rest of the page works.
    page.wait_for("a live connection", LIVE).await;
    page.wait_for("team-a-1 listed", &run_status("team-a-1"))
        .await;
    progress(addr, "team-a-1", 7).await;
    page.wait_for(
        "team-a-1's live progress",
        &format!("{}.includes('70%')", run_status("team-a-1")),
    )
    .await;
    assert_ne!(
        page.eval("document.body.dataset.auth").await,
        "unauthorized"
    );
    let a = page.eval(&run_status("team-a-1")).await;
    assert!(!a.as_str().unwrap().contains("forbidden"), "team-a-1: {a}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_asks_for_a_fresh_token_and_the_connection_goes_on() {
    let (_gw, addr) = gateway().await;
    progress(addr, "team-a-1", 1).await;
    // The gateway sends `refresh` 5 s before `exp`: about 3 s in.
    let short = token(8, json!({"runs": ["team-a-1"]}));
    let expiry = now() + 8;
    let mut page = Browser::open(&format!("http://{addr}/#token={short}")).await;
    page.wait_for("a live connection", LIVE).await;
    page.wait_for(
        "that the token expires soon",
        "document.body.dataset.auth === 'expiring' \
         && !document.getElementById('auth').hidden \
         && document.getElementById('authmsg').textContent.includes('expires at')",
    )
    .await;

    // A token the gateway refuses (another key) leaves the old one in use.
    let forged = encode(
        &Header::default(),
        &json!({"exp": now() + 300, "runs": ["team-a-1"]}),
        &EncodingKey::from_secret(b"not-the-gateway-secret-but-32-bytes-long"),
    )
    .unwrap();
    paste_token(&mut page, &forged).await;
    page.wait_for(
        "that the gateway refused the token",
        "document.getElementById('authmsg').textContent.includes('refused that token')",
    )
    .await;
    assert_eq!(
        page.eval("sessionStorage.getItem('runcast.token')").await,
        short.as_str(),
        "a refused token replaced the working one"
    );
    page.eval("document.getElementById('token').value = ''")
        .await;

    let fresh = token(300, json!({"runs": ["team-a-1"]}));
    paste_token(&mut page, &fresh).await;
    page.wait_for("the new token accepted", LIVE).await;
    assert_eq!(
        page.eval("sessionStorage.getItem('runcast.token')").await,
        fresh.as_str()
    );
    // Past the first token's expiry (and the gateway's 5 s leeway does not
    // apply to live connections): still the same live connection.
    let wait = expiry.saturating_sub(now()) + 2;
    tokio::time::sleep(Duration::from_secs(wait)).await;
    page.wait_for("a live connection", LIVE).await;
    history_then_live(&mut page, addr, "after-the-old-exp", "a live event").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_connection_shows_unauthorized_and_a_new_token_resumes_without_loss() {
    let (_gw, addr) = gateway().await;
    progress(addr, "team-a-1", 1).await;
    let short = token(7, json!({"runs": ["team-a-1"]}));
    let mut page = Browser::open(&format!("http://{addr}/#token={short}")).await;
    page.wait_for("a live connection", LIVE).await;
    page.wait_for(
        "team-a-1 with 1 event",
        &format!("{}.includes('· 1 events')", run_status("team-a-1")),
    )
    .await;
    // No fresh token: the gateway closes with 4003 at `exp`.
    page.wait_for("the unauthorized state after 4003", UNAUTHORIZED)
        .await;
    let msg = page
        .eval("document.getElementById('authmsg').textContent")
        .await;
    assert!(msg.as_str().unwrap().contains("expired"), "{msg}");
    for i in 2..=4 {
        publish(
            addr,
            "team-a-1",
            "progress",
            json!({"done": i, "total": 10}),
        )
        .await;
    }
    let fresh = token(300, json!({"runs": ["team-a-1"]}));
    paste_token(&mut page, &fresh).await;
    page.wait_for("a live connection", LIVE).await;
    // Resumed from the cursor: the three missed events, each counted once.
    page.wait_for(
        "team-a-1 with all 4 events",
        &format!("{}.includes('40% · 4 events')", run_status("team-a-1")),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = page.eval(&run_status("team-a-1")).await;
    assert!(
        st.as_str().unwrap().contains("· 4 events"),
        "duplicates: {st}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_websockets_are_refused_the_page_streams_over_sse_with_its_token() {
    // The gateway refuses WebSockets from the page's origin, as a proxy
    // that drops upgrades would; HTTP reads and SSE still get through.
    let (_gw, addr) = gateway_with(&["--allowed-origin", "http://elsewhere.invalid"]).await;
    progress(addr, "team-a-1", 1).await;
    let tok = token(300, json!({"runs": ["team-a-1"]}));
    let mut page = Browser::open(&format!("http://{addr}/#token={tok}")).await;
    page.wait_for(
        "a live SSE stream",
        "document.getElementById('conn').textContent === 'live (SSE)'",
    )
    .await;
    history_then_live(&mut page, addr, "over-sse", "a live event over SSE").await;
    page.wait_for(
        "team-a-1 with both events",
        &format!("{}.includes('· 2 events')", run_status("team-a-1")),
    )
    .await;
    // The token went with every request, the stream's included.
    assert_eq!(auth_failures(addr).await, 0);
    // The page (its client, @runcast/client) gave up on WebSockets after
    // two refused upgrades while HTTP got through.
    let refusals = "runcast_protocol_errors_total{code=\"forbidden\"}";
    let tried = counter(addr, refusals).await;
    assert_eq!(tried, 2, "refused WebSocket upgrades");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        counter(addr, refusals).await,
        tried,
        "the page went on trying WebSockets"
    );
}
