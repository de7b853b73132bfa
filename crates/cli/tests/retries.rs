//! What `runcast tail` retries and what it does not. Answers that retrying
//! cannot change (a page instead of an upgrade, 404, a redirect, 401/403, an
//! invalid URL) stop it at once with what to do, after a single request;
//! only what can change (503, nothing listening yet) is retried, with the
//! reason, until --max-retries.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use runcast_test_support::{TestGateway, nats::free_addr};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_runcast");

/// An HTTP server that answers every request the same way per first path
/// segment, like the things a wrong URL reaches: `/page` a web page, `/missing`
/// 404, `/moved` a redirect, `/auth` 401, `/busy` 503. Counts requests per
/// segment.
async fn fixed_answers() -> (SocketAddr, Arc<Mutex<HashMap<String, usize>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let segment = req
                            .uri()
                            .path()
                            .trim_start_matches('/')
                            .split('/')
                            .next()
                            .unwrap_or_default()
                            .to_owned();
                        *seen.lock().unwrap().entry(segment.clone()).or_default() += 1;
                        let (status, location, body) = match segment.as_str() {
                            "page" => (200, None, "<html><body>a watch page</body></html>"),
                            "moved" => (301, Some("https://elsewhere.example/runcast"), ""),
                            "auth" => (401, None, r#"{"error":{"code":"unauthorized"}}"#),
                            "busy" => (503, None, "try later"),
                            _ => (404, None, "not found"),
                        };
                        let mut resp = Response::builder().status(status);
                        if let Some(l) = location {
                            resp = resp.header("location", l);
                        }
                        Ok::<_, Infallible>(resp.body(Full::new(Bytes::from(body))).unwrap())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, counts)
}

/// Runs `runcast tail r --url <url>` plus `extra`; exit success, stderr,
/// and how long it took. More than 60 s is a failure: a retry loop.
async fn tail(url: &str, extra: &[&str]) -> (bool, String, Duration) {
    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(BIN)
            .args(["tail", "r", "--url", url])
            .args(extra)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("tail --url {url} still retrying after 60 s"))
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_retrying_cannot_fix_stop_tail_at_once_with_what_to_do() {
    let (addr, seen) = fixed_answers().await;
    for (segment, scheme, says) in [
        ("page", "ws", "instead of 101 Switching Protocols"),
        ("page", "http", "path prefix"),
        ("missing", "ws", "404 Not Found"),
        ("moved", "http", "https://elsewhere.example/runcast"),
        ("auth", "ws", "--token"),
    ] {
        let url = format!("{scheme}://{addr}/{segment}");
        let (ok, err, took) = tail(&url, &[]).await;
        assert!(!ok, "{url}");
        assert!(err.contains(says), "{url}: {says:?} in {err}");
        assert!(err.contains("not retrying"), "{url}: {err}");
        assert!(!err.contains("resuming"), "{url}: {err}");
        assert!(took < Duration::from_secs(5), "{url} took {took:?}");
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.get("page"), Some(&2), "one request per tail: {seen:?}");
    assert_eq!(seen.get("missing"), Some(&1), "{seen:?}");
    assert_eq!(seen.get("moved"), Some(&1), "{seen:?}");
    assert_eq!(seen.get("auth"), Some(&1), "{seen:?}");

    // A real gateway under a path it does not serve: 404, at once.
    let gw = TestGateway::start().await;
    let (ok, err, took) = tail(&format!("ws://{}/not-here", gw.addr), &[]).await;
    assert!(
        !ok && err.contains("404") && err.contains("path prefix"),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // URLs that cannot name a gateway never connect.
    for (url, says) in [
        ("ftp://127.0.0.1:1", "use http, https, ws or wss"),
        ("127.0.0.1:8080", "no scheme"),
        ("http://127.0.0.1:8080/?access_token=x", "--token"),
    ] {
        let (ok, err, _) = tail(url, &[]).await;
        assert!(
            !ok && err.contains("--url") && err.contains(says),
            "{url}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_can_change_is_retried_until_max_retries() {
    let (addr, seen) = fixed_answers().await;
    let (ok, err, _) = tail(&format!("http://{addr}/busy"), &["--max-retries", "2"]).await;
    assert!(!ok);
    assert_eq!(err.matches("resuming").count(), 2, "{err}");
    assert!(err.contains("503"), "{err}");
    assert!(err.contains("giving up after 2 reconnects"), "{err}");
    assert_eq!(seen.lock().unwrap().get("busy"), Some(&3));

    // Nothing listening (yet): retried too.
    let (ok, err, _) = tail(&format!("ws://{}", free_addr()), &["--max-retries", "1"]).await;
    assert!(!ok);
    assert_eq!(err.matches("resuming").count(), 1, "{err}");
    assert!(err.contains("cannot connect"), "{err}");
}
