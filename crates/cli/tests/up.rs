//! `runcast up` as a process: SIGTERM drains it (readiness fails first,
//! clients get a resumable close, the process exits in bounded time), and
//! the demo page renders live runs in a real headless browser.

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use runcast_test_support::{WsClient, browser::Browser, http, json};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_runcast");

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn start(args: &[&str]) -> (Child, SocketAddr) {
    let addr = free_addr();
    let child = Command::new(BIN)
        .args(["up", "--listen", &addr.to_string(), "--log", "warn"])
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return (child, addr);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("runcast up did not listen on {addr}");
}

/// Sends SIGTERM to the child, by PID.
async fn sigterm(child: &Child) {
    let pid = child.id().expect("child running").to_string();
    let st = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(st.success());
}

#[tokio::test]
async fn sigterm_fails_readiness_then_closes_clients_resumably_and_exits() {
    let (mut child, addr) = start(&["--drain-delay", "400ms", "--drain-timeout", "3s"]).await;
    assert_eq!(http(addr, "GET", "/readyz", &[], "").await.0, 200);
    let mut c = WsClient::connect(&format!("ws://{addr}/v1/ws")).await;
    c.subscribe("r", None).await;
    let t0 = Instant::now();
    sigterm(&child).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _, body) = http(addr, "GET", "/readyz", &[], "").await;
    assert_eq!(
        (status, json(&body)["error"]["code"].as_str()),
        (503, Some("draining"))
    );
    let (code, _) = c.read_until_close().await;
    assert_eq!(code, Some(1001));
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "clients leave only after the drain delay"
    );
    let exit = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("exits in time")
        .unwrap();
    assert!(exit.success(), "clean exit: {exit:?}");
    assert!(t0.elapsed() < Duration::from_secs(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_shows_live_runs_in_a_headless_browser() {
    let (_child, addr) = start(&["--demo", "--demo-jobs", "3"]).await;
    let mut page = Browser::open(&format!("http://{addr}/")).await;
    page.wait_for(
        "a live connection",
        "document.getElementById('conn').className === 'up'",
    )
    .await;
    for run in ["loadtest-1", "batch-2", "codegen-3"] {
        page.wait_for(
            &format!("{run} listed"),
            &format!("document.querySelector('[data-run=\"{run}\"]')"),
        )
        .await;
    }
    page.wait_for(
        "the selected run's events",
        "document.getElementById('log').innerText.includes('#1 ')",
    )
    .await;
    let dom = page.eval("document.documentElement.outerHTML").await;
    let dom = dom.as_str().expect("the page's HTML");
    assert!(dom.contains("running"), "runs show their status:\n{dom}");
    assert!(dom.contains(" events"), "runs show event counts:\n{dom}");
    // `runcast up` without keys is anonymous, and the page says so.
    assert!(
        dom.contains(r#"<p id="anon" class="warn">Anonymous access"#),
        "the page warns about anonymous access:\n{dom}"
    );
    // ...and asks for no token.
    assert!(
        dom.contains(r#"<div id="auth" hidden="">"#),
        "the token box stays hidden:\n{dom}"
    );
}

/// Behind a proxy that serves runcast under a path prefix (an ingress path
/// of /runcast), the page reaches the API, the WebSocket and SSE under that
/// prefix too. (An outside tester found it asking the host's root, getting
/// 404s and showing "No runs yet".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_works_behind_a_proxy_under_a_path_prefix() {
    let (_child, addr) = start(&["--demo", "--demo-jobs", "2"]).await;
    let nginx = runcast_test_support::nginx::Nginx::proxy(addr, "/runcast").await;
    let mut page = Browser::open(&format!("{}/", nginx.url())).await;
    page.wait_for(
        "a live WebSocket through the proxy",
        "document.getElementById('conn').className === 'up' \
         && document.getElementById('conn').textContent === 'live'",
    )
    .await;
    page.wait_for(
        "a run listed",
        "document.querySelector('[data-run]') !== null",
    )
    .await;
    page.wait_for(
        "the selected run's events",
        "document.getElementById('log').innerText.includes('#1 ')",
    )
    .await;
    // The live WebSocket went through the proxy (nginx logs it only when it
    // closes); the reads did too, and nothing asked the host's root.
    let log = nginx.access_log();
    assert!(
        log.contains("GET /runcast/v1/runs"),
        "the page asked under the prefix:\n{log}"
    );
    assert!(!log.contains("GET /v1/"), "nothing asked the root:\n{log}");
}
