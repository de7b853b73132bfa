//! Subscriber auth from the command line: `runcast gateway` will not start
//! without a choice about who may watch, `runcast up` with keys requires
//! tokens, and `runcast tail --token` follows a protected run while a
//! missing token fails at once instead of retrying forever.

use std::{process::Stdio, time::Duration};

use jsonwebtoken::{EncodingKey, Header, encode};
use runcast_test_support::{http, nats::free_addr, wait_http_ok};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_runcast");
const SECRET: &str = "cli-auth-test-shared-secret-32-bytes!";

/// Runs a command that must fail to start; returns what it said.
async fn refused(cmd: &mut Command) -> String {
    let out = cmd.output().await.unwrap();
    assert!(!out.status.success(), "{cmd:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn a_gateway_without_an_auth_choice_refuses_to_start() {
    let listen = free_addr().to_string();
    let err = refused(Command::new(BIN).args([
        "gateway",
        "--nats",
        "nats://127.0.0.1:1",
        "--listen",
        &listen,
    ]))
    .await;
    assert!(
        err.contains("--allow-anonymous") && err.contains("--auth-hs256-secret"),
        "{err}"
    );
    // A secret too short to be safe is refused too.
    let err = refused(Command::new(BIN).args([
        "up",
        "--auth-hs256-secret",
        "short",
        "--listen",
        &listen,
    ]))
    .await;
    assert!(err.contains("at least 32 bytes"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_a_protected_run_with_its_token() {
    let addr = free_addr();
    let _up = Command::new(BIN)
        .args(["up", "--listen", &addr.to_string(), "--log", "warn"])
        .env("RUNCAST_AUTH_HS256_SECRET", SECRET)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_http_ok(addr, "/readyz", "runcast up").await;
    // Up with keys: no anonymous access.
    assert_eq!(http(addr, "GET", "/v1/runs", &[], "").await.0, 401);
    for (i, kind) in ["progress", "complete"].iter().enumerate() {
        let body = format!(r#"{{"kind":"{kind}","data":{{"done":{i}}}}}"#);
        assert_eq!(
            http(addr, "POST", "/v1/runs/secret-run/events", &[], body)
                .await
                .0,
            200
        );
    }
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    let token = encode(
        &Header::default(),
        &serde_json::json!({"exp": exp, "runs": ["secret-run"]}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let url = format!("http://{addr}");
    let ok = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new(BIN)
            .args([
                "tail",
                "secret-run",
                "--since",
                "0",
                "--url",
                &url,
                "--token",
                &token,
            ])
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("complete"));

    let refused = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new(BIN)
            .args(["tail", "secret-run", "--url", &url])
            .output(),
    )
    .await
    .expect("no retry loop on 401")
    .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--token"));

    // doctor: without a token it says what is missing; with one that covers
    // its probe runs, every check passes.
    let doctor = |token: Option<String>| {
        let mut c = Command::new(BIN);
        c.args(["doctor", "--url", &url, "--timeout", "5s"]);
        if let Some(t) = token {
            c.args(["--token", &t]);
        }
        c.output()
    };
    let out = doctor(None).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("requires a subscriber token") && text.contains("--token"),
        "{text}"
    );
    let probe_token = encode(
        &Header::default(),
        &serde_json::json!({"exp": exp, "run_prefixes": ["doctor-"]}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let out = doctor(Some(probe_token)).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_keys_from_publish_key_work_with_publish_key_flags() {
    let out = Command::new(BIN)
        .args(["publish-key", "ci", "build-"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |p: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(p))
            .unwrap()
            .trim()
            .to_owned()
    };
    let (key, entry) = (field("key:"), field("entry:"));
    assert!(
        entry.starts_with("ci:") && entry.ends_with(":build-"),
        "{entry}"
    );
    assert!(
        !entry.contains(&key),
        "the entry holds a digest, not the key"
    );

    let addr = free_addr();
    let _up = Command::new(BIN)
        .args([
            "up",
            "--listen",
            &addr.to_string(),
            "--log",
            "warn",
            "--publish-key",
            &entry,
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_http_ok(addr, "/readyz", "runcast up").await;
    let url = format!("http://{addr}");
    let publish = |run: &str, key: Option<&str>| {
        let mut c = Command::new(BIN);
        c.args(["publish", run, "--data", "{}", "--url", &url]);
        if let Some(k) = key {
            c.args(["--key", k]);
        }
        c.output()
    };
    let ok = publish("build-9", Some(&key)).await.unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "1");
    let missing = publish("build-9", None).await.unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("API key"));
    let outside = publish("deploy-9", Some(&key)).await.unwrap();
    assert!(!outside.status.success());
    assert!(String::from_utf8_lossy(&outside.stderr).contains("may not publish"));
    // doctor names the fix for each refusal of its probe publish, not "the
    // bus refused" (an outside tester found that advice for a 403).
    let doctor = |key: Option<&str>| {
        let mut c = Command::new(BIN);
        c.args(["doctor", "--url", &url, "--timeout", "5s"]);
        if let Some(k) = key {
            c.args(["--key", k]);
        }
        c.output()
    };
    for (key, fix) in [
        (None, "needs a publish API key"),
        (Some(key.as_str()), "does not cover the probe run"),
    ] {
        let out = doctor(key).await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success());
        assert!(text.contains(fix), "{fix}: {text}");
    }
}

/// `runcast gateway` without publish keys takes no HTTP publishes (workers
/// publish over NATS), says how to open it, and opens only when asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_publish_keys_refuses_http_publishes_unless_opened() {
    let nats = runcast_test_support::nats::NatsServer::start().await;
    let url = nats.url();
    for open in [false, true] {
        let addr = free_addr();
        let mut args = vec!["gateway", "--allow-anonymous", "--nats", &url, "--listen"];
        let listen = addr.to_string();
        args.push(&listen);
        if open {
            args.push("--allow-anonymous-publish");
        }
        let _gw = Command::new(BIN)
            .args(&args)
            .args(["--log", "warn"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        wait_http_ok(addr, "/readyz", "runcast gateway").await;
        let (status, _, body) = http(
            addr,
            "POST",
            "/v1/runs/open-or-not/events",
            &[],
            r#"{"kind":"progress","data":{}}"#,
        )
        .await;
        if open {
            assert_eq!(status, 200, "{body}");
        } else {
            assert_eq!(status, 401, "{body}");
            assert!(body.contains("--allow-anonymous-publish"), "{body}");
        }
    }
}

/// `runcast up --tls-cert/--tls-key` serves HTTPS that a stock TLS client
/// (openssl s_client, trusting only the test CA) verifies and talks HTTP
/// over; a key that does not match the certificate stops it at startup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_https_with_the_given_certificate() {
    let dir = runcast_test_support::nats::TempDir::new("runcast-cli-tls");
    let d = dir.path();
    runcast_test_support::make_certs(d, &["gw", "other"]);
    let err = refused(
        Command::new(BIN)
            .args(["up", "--listen", &free_addr().to_string()])
            .arg("--tls-cert")
            .arg(d.join("gw.pem"))
            .arg("--tls-key")
            .arg(d.join("other.key")),
    )
    .await;
    assert!(err.contains("do not make a usable pair"), "{err}");

    let addr = free_addr();
    let _up = Command::new(BIN)
        .args(["up", "--listen", &addr.to_string(), "--log", "warn"])
        .env("RUNCAST_TLS_CERT", d.join("gw.pem"))
        .env("RUNCAST_TLS_KEY", d.join("gw.key"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut s_client = Command::new("openssl")
            .args(["s_client", "-quiet", "-verify_return_error", "-connect"])
            .arg(addr.to_string())
            .arg("-CAfile")
            .arg(d.join("ca.pem"))
            .args(["-verify_ip", "127.0.0.1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        use tokio::io::AsyncWriteExt;
        let mut stdin = s_client.stdin.take().unwrap();
        let _ = stdin
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let out = tokio::time::timeout(Duration::from_secs(10), s_client.wait_with_output())
            .await
            .expect("s_client finished")
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if text.starts_with("HTTP/1.1 200") {
            assert!(text.ends_with("ok\n"), "{text}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no HTTPS answer: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
