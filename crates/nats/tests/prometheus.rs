//! What ships in `observability/` against the real thing: the rules file
//! passes `promtool check rules`, and loaded into a real Prometheus that
//! scrapes two real NATS-backed gateways under load, every rule evaluates
//! without error and every recording rule yields series.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use runcast_gateway::Config;
use runcast_nats::{NatsBus, NatsConfig, StreamSettings};
use runcast_test_support::{
    TestGateway, WsClient, http, json,
    nats::{NatsServer, TempDir, free_port},
};

fn rules_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../observability/prometheus/runcast-rules.yaml")
}

async fn nats_gateway(server: &NatsServer) -> TestGateway {
    let (bus, _setup) = NatsBus::start(
        &NatsConfig::with_urls(server.url()),
        StreamSettings::default(),
    )
    .await
    .unwrap();
    bus.ready(Duration::from_secs(5)).await.expect("ready");
    TestGateway::on(Arc::new(bus), Config::default(), "nats").await
}

/// A Prometheus server (Debian's `prometheus` package, which
/// scripts/test.sh installs) in a temp dir, stopped by PID on drop.
struct Prometheus {
    child: Child,
    addr: std::net::SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    async fn start(targets: &[std::net::SocketAddr]) -> Self {
        let dir = TempDir::new("runcast-prometheus");
        let targets: Vec<String> = targets.iter().map(|a| format!("'{a}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: ['{}']\n\
             scrape_configs:\n  - job_name: runcast\n    static_configs:\n      - targets: [{}]\n",
            rules_file().display(),
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .spawn()
            .expect("prometheus on PATH (scripts/test.sh installs Debian's prometheus package)");
        let p = Self {
            child,
            addr,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok()
                && http(addr, "GET", "/-/ready", &[], "").await.0 == 200
            {
                return p;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Prometheus ready within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn get(&self, path: &str) -> serde_json::Value {
        let (status, _, body) = http(self.addr, "GET", path, &[], "").await;
        assert_eq!(status, 200, "{path}: {body}");
        json(&body)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn promtool_accepts_the_rules() {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(rules_file())
        .output()
        .expect("promtool on PATH");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_evaluates_against_real_gateways() {
    let nats = NatsServer::start().await;
    let (a, b) = (nats_gateway(&nats).await, nats_gateway(&nats).await);
    let mut clients = Vec::new();
    for gw in [&a, &b] {
        let mut c = WsClient::connect(&gw.ws_url()).await;
        c.subscribe("observed", None).await;
        clients.push(c);
    }
    // Load for as long as the test runs: events through a's HTTP API.
    let addr = a.addr;
    let load = tokio::spawn(async move {
        for i in 0..2_000u32 {
            let body = format!(r#"{{"kind":"progress","data":{{"done":{i}}}}}"#);
            http(addr, "POST", "/v1/runs/observed/events", &[], body).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let prom = Prometheus::start(&[a.addr, b.addr]).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut pending: Vec<String>;
    loop {
        pending = Vec::new();
        let rules = prom.get("/api/v1/rules").await;
        let groups = rules["data"]["groups"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let all: Vec<serde_json::Value> = groups
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        assert_eq!(all.len(), 15, "every rule loaded: {rules}");
        for rule in &all {
            let name = rule["name"].as_str().unwrap_or("?").to_owned();
            // A rule Prometheus cannot evaluate fails at once, with why.
            assert_ne!(rule["health"], "err", "{name}: {}", rule["lastError"]);
            if rule["health"] != "ok" {
                pending.push(format!("{name}: not evaluated yet"));
                continue;
            }
            if rule["type"] == "recording" {
                let q = prom.get(&format!("/api/v1/query?query={name}")).await;
                if q["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
                    pending.push(format!("{name}: no series yet"));
                }
            }
        }
        if pending.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rules without results after 60 s: {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    load.abort();
    drop(clients);
}
