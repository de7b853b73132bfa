//! The clients over TLS, against a gateway that terminates it itself
//! (`--tls-cert`/`--tls-key`, certificates from openssl): `tail` follows a run
//! over wss, `doctor` passes every check over https, `publish` and the SDK's
//! `HttpTarget` publish over https, each trusting the test CA through
//! `--ca-file` (or `RUNCAST_CA_FILE`). A certificate the client cannot trust
//! (no CA given, the wrong CA, a name the certificate does not list), TLS to
//! a plain port and plain text to a TLS port fail at once with what to do,
//! never in a retry loop.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use runcast_bus::Retention;
use runcast_core::{EventKind, NewEvent, RunId};
use runcast_gateway::{
    Config,
    tls::{Tls, TlsFiles},
};
use runcast_test_support::{TestGateway, http, make_certs, nats::TempDir};
use runcast_worker::{
    HttpTarget, PublishErrorKind, Publisher,
    tls::{CertificateDer, PemObject},
};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_runcast");

/// What a finished `runcast` command left: exit success, stdout, stderr and
/// how long it ran.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs `runcast` with `args` (and `env`), failing the test if it runs for
/// more than 30 s: a client stuck retrying is a failure here.
async fn runcast(args: &[&str], env: &[(&str, &str)]) -> Ran {
    let started = Instant::now();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("RUNCAST_CA_FILE")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("runcast {args:?} still running after 30 s"))
        .expect("runcast runs");
    Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    }
}

/// A gateway serving TLS with `<name>.pem`/`<name>.key` from `dir`, on `addr`.
async fn tls_gateway(dir: &Path, name: &str, addr: &str) -> TestGateway {
    let tls = Tls::load(TlsFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
        reload_interval: Duration::from_secs(60),
    })
    .expect("test certificate loads");
    let config = Config {
        tls: Some(tls),
        ..Config::default()
    };
    let bus = Arc::new(runcast_bus::EmbeddedBus::new(Retention::default()));
    TestGateway::on_addr(bus, config, "embedded", addr.parse().expect("addr")).await
}

async fn publish(gw: &TestGateway, run: &str, kind: EventKind, data: serde_json::Value) -> u64 {
    let ev = NewEvent::json(kind, &data).expect("event");
    gw.bus()
        .publish(&RunId::parse(run).expect("run"), vec![ev])
        .await
        .expect("publish")[0]
}

fn ca(dir: &Path) -> String {
    dir.join("ca.pem").display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_a_run_over_wss_trusting_the_ca_file() {
    let dir = TempDir::new("runcast-cli-tls-tail");
    make_certs(dir.path(), &["gw"]);
    let gw = tls_gateway(dir.path(), "gw", "127.0.0.1:0").await;
    publish(
        &gw,
        "secure-1",
        EventKind::Log,
        serde_json::json!({"line": "one"}),
    )
    .await;
    publish(
        &gw,
        "secure-1",
        EventKind::Complete,
        serde_json::json!({"ok": true}),
    )
    .await;
    let port = gw.addr.port();
    // --ca-file with a wss URL, and RUNCAST_CA_FILE with a base https URL.
    let by_flag = runcast(
        &[
            "tail",
            "secure-1",
            "--since",
            "0",
            "--url",
            &format!("wss://127.0.0.1:{port}/v1/ws"),
            "--ca-file",
            &ca(dir.path()),
        ],
        &[],
    )
    .await;
    assert!(by_flag.ok, "{}", by_flag.stderr);
    let by_env = runcast(
        &[
            "tail",
            "secure-1",
            "--since",
            "0",
            "--url",
            &format!("https://localhost:{port}"),
        ],
        &[("RUNCAST_CA_FILE", &ca(dir.path()))],
    )
    .await;
    assert!(by_env.ok, "{}", by_env.stderr);
    for out in [&by_flag.stdout, &by_env.stdout] {
        let seqs: Vec<u64> = out
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        assert_eq!(seqs, [1, 2], "{out}");
        assert!(out.contains(r#"{"line":"one"}"#), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_every_check_over_https() {
    let dir = TempDir::new("runcast-cli-tls-doctor");
    make_certs(dir.path(), &["gw"]);
    let gw = tls_gateway(dir.path(), "gw", "127.0.0.1:0").await;
    let url = format!("https://127.0.0.1:{}", gw.addr.port());
    let out = runcast(
        &["doctor", "--url", &url, "--ca-file", &ca(dir.path())],
        &[],
    )
    .await;
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    for line in [
        "ok    gateway reachable",
        "certificate trusted",
        "ok    gateway ready",
        "ok    websocket upgrade",
        "wss://127.0.0.1",
        "ok    sse stream",
        "ok    publish round trip",
        "all 5 checks passed",
    ] {
        assert!(out.stdout.contains(line), "{line:?} in:\n{}", out.stdout);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_http_target_publish_over_https() {
    let dir = TempDir::new("runcast-cli-tls-publish");
    make_certs(dir.path(), &["gw"]);
    let gw = tls_gateway(dir.path(), "gw", "127.0.0.1:0").await;
    let url = format!("https://127.0.0.1:{}", gw.addr.port());
    let out = runcast(
        &[
            "publish",
            "tls-pub",
            "--kind",
            "log",
            "--data",
            r#"{"line":"over tls"}"#,
            "--url",
            &url,
            "--ca-file",
            &ca(dir.path()),
        ],
        &[],
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "1");

    // The SDK: a CA file, and the same CA handed over as DER certificates.
    let by_file = HttpTarget::new(&url)
        .unwrap()
        .with_ca_file(&dir.path().join("ca.pem"))
        .unwrap();
    let p = Publisher::new(Arc::new(by_file), "tls-pub").unwrap();
    assert_eq!(p.log("from the sdk").await.unwrap(), 2);
    let der = CertificateDer::from_pem_file(dir.path().join("ca.pem")).unwrap();
    let by_roots = HttpTarget::new(&format!("wss://localhost:{}/v1/ws", gw.addr.port()))
        .unwrap()
        .with_root_certs([der])
        .unwrap();
    let p = Publisher::new(Arc::new(by_roots), "tls-pub").unwrap();
    assert_eq!(p.log("with root certs").await.unwrap(), 3);
    let state = gw
        .bus()
        .state(&RunId::parse("tls-pub").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.events, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_fails_at_once_saying_to_pass_the_ca() {
    let dir = TempDir::new("runcast-cli-tls-untrusted");
    let other = TempDir::new("runcast-cli-tls-other-ca");
    make_certs(dir.path(), &["gw"]);
    make_certs(other.path(), &[]);
    let gw = tls_gateway(dir.path(), "gw", "127.0.0.1:0").await;
    publish(&gw, "locked", EventKind::Log, serde_json::json!("x")).await;
    let url = format!("wss://127.0.0.1:{}", gw.addr.port());
    let wrong_ca = ca(other.path());

    // The system's roots do not know the test CA; a CA file with another CA
    // does not either. Both stop at once, naming what to do.
    for (extra, says) in [
        (vec![], "--ca-file"),
        (
            vec!["--ca-file", wrong_ca.as_str()],
            "not signed by the CA in",
        ),
    ] {
        let mut args = vec!["tail", "locked", "--url", url.as_str()];
        args.extend(&extra);
        let out = runcast(&args, &[]).await;
        assert!(!out.ok, "{extra:?}: {}", out.stdout);
        assert!(
            out.stderr.contains("not trusted"),
            "{extra:?}: {}",
            out.stderr
        );
        assert!(out.stderr.contains(says), "{extra:?}: {}", out.stderr);
        assert!(
            !out.stderr.contains("resuming"),
            "a certificate problem is not retried: {}",
            out.stderr
        );
        assert!(out.took < Duration::from_secs(5), "took {:?}", out.took);

        let mut args = vec!["doctor", "--url", url.as_str()];
        args.extend(&extra);
        let out = runcast(&args, &[]).await;
        assert!(!out.ok);
        assert!(
            out.stdout.contains("FAIL  gateway reachable"),
            "{}",
            out.stdout
        );
        assert!(out.stdout.contains("not trusted"), "{}", out.stdout);
        assert!(out.stdout.contains("fix: pass the CA"), "{}", out.stdout);

        let mut args = vec!["publish", "locked", "--data", "1", "--url", url.as_str()];
        args.extend(&extra);
        let out = runcast(&args, &[]).await;
        assert!(!out.ok);
        assert!(
            out.stderr.contains("not trusted") && out.stderr.contains(says),
            "{}",
            out.stderr
        );
    }
    let target = HttpTarget::new(&url)
        .unwrap()
        .with_ca_file(&other.path().join("ca.pem"))
        .unwrap();
    let err = Publisher::new(Arc::new(target), "locked")
        .unwrap()
        .log("no")
        .await
        .unwrap_err();
    assert_eq!(err.kind, PublishErrorKind::Tls, "{}", err.message);
    // Nothing got through.
    assert_eq!(
        gw.bus()
            .state(&RunId::parse("locked").unwrap())
            .await
            .unwrap()
            .unwrap()
            .events,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_is_refused_naming_the_name() {
    let dir = TempDir::new("runcast-cli-tls-name");
    make_certs(dir.path(), &["gw"]);
    // The certificate lists 127.0.0.1 and localhost, not 127.0.0.2.
    let gw = tls_gateway(dir.path(), "gw", "127.0.0.2:0").await;
    let url = format!("https://127.0.0.2:{}", gw.addr.port());
    let out = runcast(
        &["tail", "r", "--url", &url, "--ca-file", &ca(dir.path())],
        &[],
    )
    .await;
    assert!(!out.ok);
    assert!(
        out.stderr.contains("not valid for the name 127.0.0.2"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("resuming"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheme_that_does_not_match_the_port_fails_at_once() {
    let dir = TempDir::new("runcast-cli-tls-scheme");
    make_certs(dir.path(), &["gw"]);
    // TLS to a plain port: the gateway answers the ClientHello in HTTP.
    let plain = TestGateway::start().await;
    let out = runcast(
        &[
            "tail",
            "r",
            "--url",
            &format!("wss://{}", plain.addr),
            "--ca-file",
            &ca(dir.path()),
        ],
        &[],
    )
    .await;
    assert!(!out.ok);
    assert!(
        out.stderr.contains("does not answer in TLS") && out.stderr.contains("ws://"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("resuming"), "{}", out.stderr);
    let err = Publisher::http(&format!("https://{}", plain.addr), "r")
        .unwrap()
        .log("no")
        .await
        .unwrap_err();
    assert_eq!(err.kind, PublishErrorKind::Tls, "{}", err.message);
    // The same gateway over plain HTTP is fine: the failure was the scheme.
    let (status, _, body) = http(plain.addr, "GET", "/healthz", &[], "").await;
    assert_eq!(status, 200, "{body}");

    // Plain text to a TLS port: it answers with a TLS alert, not HTTP.
    let tls = tls_gateway(dir.path(), "gw", "127.0.0.1:0").await;
    let out = runcast(&["tail", "r", "--url", &format!("ws://{}", tls.addr)], &[]).await;
    assert!(!out.ok);
    assert!(
        out.stderr.contains("did not answer in HTTP") && out.stderr.contains("wss://"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("resuming"), "{}", out.stderr);
    assert!(out.took < Duration::from_secs(5), "took {:?}", out.took);
}
