//! The clients through a real TLS-terminating reverse proxy: nginx serves the
//! gateway at `https://127.0.0.1:<port>/runcast/` with a certificate from the
//! test CA and proxies to the gateway's plain HTTP, configured as the docs
//! say (WebSocket upgrade headers, `proxy_buffering off`). `publish`, the
//! SDK's `HttpTarget`, `tail` (https and wss URL forms) and every `doctor`
//! check work through it with `--ca-file`; a URL without the prefix fails at
//! once saying to check it.

use std::{sync::Arc, time::Duration};

use runcast_test_support::{TestGateway, make_certs, metric, nats::TempDir, nginx::Nginx};
use runcast_worker::{HttpTarget, Publisher};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_runcast");

/// Runs `runcast` to the end (at most 60 s); exit success, stdout, stderr.
async fn runcast(args: &[&str]) -> (bool, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(BIN)
            .args(args)
            .env_remove("RUNCAST_CA_FILE")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("runcast {args:?} did not finish within 60 s"))
    .expect("runcast runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_doctor_and_publish_work_through_a_tls_terminating_nginx() {
    let dir = TempDir::new("runcast-cli-nginx");
    make_certs(dir.path(), &["proxy"]);
    let gw = TestGateway::start().await;
    let nginx = Nginx::tls_proxy(
        gw.addr,
        &dir.path().join("proxy.pem"),
        &dir.path().join("proxy.key"),
        "/runcast",
    )
    .await;
    let base = nginx.url();
    let ca = dir.path().join("ca.pem");
    let ca_arg = ca.display().to_string();
    let fail = |what: &str, out: &str, err: &str| {
        format!(
            "{what}\nstdout:\n{out}\nstderr:\n{err}\nnginx error log:\n{}\naccess log:\n{}",
            nginx.log(),
            nginx.access_log()
        )
    };

    // publish: the CLI, then the SDK.
    let (ok, out, err) = runcast(&[
        "publish",
        "proxied",
        "--kind",
        "log",
        "--data",
        r#"{"line":"via nginx"}"#,
        "--url",
        &base,
        "--ca-file",
        &ca_arg,
    ])
    .await;
    assert!(ok && out.trim() == "1", "{}", fail("publish", &out, &err));
    let target = HttpTarget::new(&base).unwrap().with_ca_file(&ca).unwrap();
    let p = Publisher::new(Arc::new(target), "proxied").unwrap();
    assert_eq!(p.progress(1, 2).await.unwrap(), 2);

    // tail follows live events through the proxy's WebSocket upgrade: it
    // starts on a running run, and the completion is published after.
    let ws_form = format!("{}/v1/ws", base.replacen("https://", "wss://", 1));
    let tails: Vec<_> = [base.clone(), ws_form]
        .into_iter()
        .map(|url| {
            let ca_arg = ca_arg.clone();
            tokio::spawn(async move {
                let r = runcast(&[
                    "tail",
                    "proxied",
                    "--since",
                    "0",
                    "--url",
                    &url,
                    "--ca-file",
                    &ca_arg,
                ])
                .await;
                (url, r)
            })
        })
        .collect();
    // Both tails are subscribed through nginx before the run completes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while metric(&gw.gw.metrics.render(), "runcast_subscriptions").unwrap_or(0.0) < 2.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            fail("the tails did not subscribe through nginx", "", "")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        p.complete(&serde_json::json!({"ok": true})).await.unwrap(),
        3
    );
    for t in tails {
        let (url, (ok, out, err)) = t.await.unwrap();
        assert!(ok, "{}", fail(&format!("tail --url {url}"), &out, &err));
        let seqs: Vec<u64> = out
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        assert_eq!(seqs, [1, 2, 3], "{}", fail(&url, &out, &err));
        assert!(out.contains("via nginx"), "{out}");
    }

    // doctor: every hop, SSE streaming through (proxy_buffering off).
    let (ok, out, err) = runcast(&["doctor", "--url", &base, "--ca-file", &ca_arg]).await;
    assert!(ok, "{}", fail("doctor", &out, &err));
    for line in [
        "certificate trusted",
        "ok    websocket upgrade",
        "ok    sse stream",
        "/runcast/v1/runs/",
        "ok    publish round trip",
        "all 5 checks passed",
    ] {
        assert!(out.contains(line), "{line:?} in:\n{out}");
    }

    // Without the prefix nginx has nothing there: 404 at once, not a retry loop.
    let (ok, _, err) = runcast(&[
        "tail",
        "proxied",
        "--url",
        &format!("https://127.0.0.1:{}", nginx.port),
        "--ca-file",
        &ca_arg,
    ])
    .await;
    assert!(!ok);
    assert!(
        err.contains("404") && err.contains("path prefix") && !err.contains("resuming"),
        "{err}"
    );
}
