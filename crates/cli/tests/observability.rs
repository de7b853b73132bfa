//! What ships in `observability/`, proven against the real system: two
//! `runcast gateway` processes and a `runcast worker` on a real nats-server,
//! clients watching the worker's demo runs, and a real Prometheus scraping
//! all three. Every rule must evaluate without error, every recording rule
//! and every dashboard panel's query must return series, and the dashboards
//! must be well formed (unique panel ids, a `${datasource}` variable, no
//! hard-coded data source).

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use runcast_test_support::{
    WsClient, http, json,
    nats::{NatsServer, TempDir, free_addr},
    wait_http_ok,
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_runcast");

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = repo("observability/grafana");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p.display().to_string(), json(&text))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!out.is_empty(), "no dashboards in {}", dir.display());
    out
}

/// A child process stopped by PID when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command) -> Proc {
    Proc(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}")),
    )
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Grafana's variables, as a dashboard would fill them in.
fn as_grafana_would(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("${instance}", ".*")
        .replace("$instance", ".*")
}

#[test]
fn promtool_accepts_the_rules() {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo("observability/prometheus/runcast-rules.yaml"))
        .output()
        .expect("promtool on PATH (scripts/test.sh installs Debian's prometheus package)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every `datasource` object in a dashboard, at any depth.
fn datasources(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "datasource" && v.is_object() {
                    out.push(v.clone());
                } else {
                    datasources(v, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| datasources(v, out)),
        _ => {}
    }
}

#[test]
fn dashboards_are_well_formed() {
    for (path, d) in dashboards() {
        let vars = d["templating"]["list"].as_array().expect("templating");
        assert!(
            vars.iter()
                .any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
            "{path}: a datasource variable"
        );
        let panels = d["panels"].as_array().expect("panels");
        let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
        ids.sort_unstable();
        let n = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), n, "{path}: unique panel ids");
        // Every data source reference, anywhere, is the variable.
        let mut refs = Vec::new();
        datasources(&d, &mut refs);
        assert!(!refs.is_empty(), "{path}: panels name their data source");
        for r in refs {
            assert_eq!(
                r,
                serde_json::json!({"type": "prometheus", "uid": "${datasource}"}),
                "{path}: a hard-coded data source"
            );
        }
        for p in panels {
            let targets = p["targets"].as_array().expect("targets");
            assert!(
                !targets.is_empty(),
                "{path}: panel {} has a query",
                p["title"]
            );
            for t in targets {
                assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_dashboards_work_against_a_live_cluster() {
    let nats = NatsServer::start().await;
    let (ga, gb, worker_metrics, prom) = (free_addr(), free_addr(), free_addr(), free_addr());
    let _gateways: Vec<Proc> = [ga, gb]
        .iter()
        .map(|a| {
            spawn(
                Command::new(BIN)
                    .args(runcast_test_support::open_gateway_args(*a, &nats.url()))
                    .args(["--log", "warn"]),
            )
        })
        .collect();
    let _worker = spawn(Command::new(BIN).args([
        "worker",
        "--nats",
        &nats.url(),
        "--jobs",
        "3",
        "--metrics-listen",
        &worker_metrics.to_string(),
        "--log",
        "warn",
    ]));
    for (a, what) in [(ga, "gateway a"), (gb, "gateway b")] {
        wait_http_ok(a, "/readyz", what).await;
    }
    wait_http_ok(worker_metrics, "/healthz", "worker").await;

    // Clients on both gateways watch the worker's running jobs.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let runs: Vec<String> = loop {
        let (_, _, body) = http(ga, "GET", "/v1/runs?status=running", &[], "").await;
        let runs: Vec<String> = json(&body)["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["run"].as_str().map(str::to_owned))
            .collect();
        if runs.len() >= 2 {
            break runs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker's runs appear"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut clients = Vec::new();
    for gw in [ga, gb] {
        for run in &runs[..2] {
            let mut c = WsClient::connect(&format!("ws://{gw}/v1/ws")).await;
            c.subscribe(run, None).await;
            clients.push(c);
        }
    }
    // Something for the error and close panels: a bad run ID (an error
    // frame) and an oversized frame (close 1009).
    let mut rude = WsClient::connect(&format!("ws://{ga}/v1/ws")).await;
    rude.send(serde_json::json!({"type": "subscribe", "run": "not.valid"}))
        .await;
    assert_eq!(rude.recv().await["type"], "error");
    // The gateway may close while the frame is still being written, so
    // this one goes out on a raw socket whose errors are expected.
    {
        use futures_util::SinkExt;
        let (mut raw, _) = tokio_tungstenite::connect_async(format!("ws://{ga}/v1/ws"))
            .await
            .expect("connect");
        let big = format!(r#"{{"type":"subscribe","run":"{}"}}"#, "x".repeat(2 << 20));
        let _ = raw
            .send(tokio_tungstenite::tungstenite::Message::Text(big.into()))
            .await;
    }

    // Prometheus scrapes the gateways and the worker every second.
    let dir = TempDir::new("runcast-prometheus");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files: ['{}']\n\
         scrape_configs:\n  - job_name: runcast\n    static_configs:\n      - targets: ['{ga}', '{gb}', '{worker_metrics}']\n",
        repo("observability/prometheus/runcast-rules.yaml").display(),
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let _prometheus = spawn(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap()),
    );
    wait_http_ok(prom, "/-/ready", "Prometheus").await;

    let query = |expr: String| async move {
        let (status, _, body) = http(
            prom,
            "GET",
            &format!("/api/v1/query?query={}", encode(&expr)),
            &[],
            "",
        )
        .await;
        (status, json(&body))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let mut pending = Vec::new();
        // Rules: loaded, evaluated without error; recording rules have series.
        let (_, rules) = query_path(prom, "/api/v1/rules").await;
        let all: Vec<Value> = rules["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        // As many as the file defines (alerts and recording rules).
        let defined = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../observability/prometheus/runcast-rules.yaml"
        ))
        .unwrap()
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("- alert:") || l.starts_with("- record:")
        })
        .count();
        assert!(defined >= 15, "rules found in the file: {defined}");
        assert_eq!(all.len(), defined, "every rule loaded: {rules}");
        for rule in &all {
            let name = rule["name"].as_str().unwrap_or("?").to_owned();
            assert_ne!(rule["health"], "err", "{name}: {}", rule["lastError"]);
            if rule["health"] != "ok" {
                pending.push(format!("rule {name}: not evaluated yet"));
            } else if rule["type"] == "recording" {
                let (_, q) = query(name.clone()).await;
                if q["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
                    pending.push(format!("rule {name}: no series"));
                }
            }
        }
        // Dashboards: every panel's every query is valid and has series.
        for (path, d) in dashboards() {
            for p in d["panels"].as_array().unwrap() {
                for t in p["targets"].as_array().unwrap() {
                    let expr = as_grafana_would(t["expr"].as_str().unwrap());
                    let (status, q) = query(expr.clone()).await;
                    assert_eq!(status, 200, "{path}, panel {}: {expr}: {q}", p["title"]);
                    if q["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
                        pending.push(format!("{path}, panel {}: {expr}: no series", p["title"]));
                    }
                }
            }
        }
        if pending.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "without results after 90 s:\n{}",
            pending.join("\n")
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    drop(clients);
}

async fn query_path(prom: SocketAddr, path: &str) -> (u16, Value) {
    let (status, _, body) = http(prom, "GET", path, &[], "").await;
    (status, json(&body))
}

/// The OpenTelemetry Collector example: valid YAML, an OTLP/gRPC receiver
/// on 4317 (where `--otlp-endpoint` points), a traces pipeline whose every
/// component is defined and comes from the collector's core distribution,
/// and an OTLP exporter towards Tempo or Jaeger.
#[test]
fn the_collector_config_is_complete() {
    let path = repo("observability/otel-collector/collector.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let c: Value = serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        c["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
            .as_str()
            .is_some_and(|e| e.ends_with(":4317")),
        "OTLP/gRPC receiver on 4317"
    );
    let core = ["otlp", "memory_limiter", "batch", "debug"];
    let traces = &c["service"]["pipelines"]["traces"];
    for (section, key) in [
        ("receivers", "receivers"),
        ("processors", "processors"),
        ("exporters", "exporters"),
    ] {
        let used = traces[key]
            .as_array()
            .unwrap_or_else(|| panic!("traces.{key}"));
        assert!(!used.is_empty(), "traces.{key} is empty");
        for name in used {
            let name = name.as_str().unwrap();
            assert!(
                c[section].get(name).is_some(),
                "{name} is not defined in {section}"
            );
            let kind = name.split('/').next().unwrap();
            assert!(
                core.contains(&kind),
                "{name}: not a core-distribution component"
            );
        }
        // Nothing defined and left unused.
        for name in c[section].as_object().unwrap().keys() {
            assert!(
                used.iter().any(|u| u == name),
                "{name} is defined but unused"
            );
        }
    }
    let exporters = traces["exporters"].as_array().unwrap();
    assert!(
        exporters
            .iter()
            .any(|e| e == "otlp/tempo" || e == "otlp/jaeger"),
        "traces go to Tempo or Jaeger"
    );
    for e in exporters
        .iter()
        .filter_map(|e| e.as_str())
        .filter(|e| e.starts_with("otlp/"))
    {
        assert!(
            c["exporters"][e]["endpoint"].is_string(),
            "{e} has an endpoint"
        );
    }
}

/// A fresh `runcast up` that no client has touched exports every metric
/// family with at least one series, and every label value known in advance
/// at 0, so dashboards and alerts show 0 rather than "no data" on an idle
/// pod. (An outside client found `runcast_connections` missing until the
/// first connection.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_process_exports_every_known_series_at_zero() {
    let addr = free_addr();
    let _up = spawn(Command::new(BIN).args(["up", "--listen", &addr.to_string(), "--log", "warn"]));
    wait_http_ok(addr, "/healthz", "runcast up").await;
    let (_, _, scrape) = http(addr, "GET", "/metrics", &[], "").await;

    // The class: a family declared with # TYPE has at least one sample.
    let families: Vec<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(families.len() > 20, "{scrape}");
    for f in &families {
        let has_sample = scrape.lines().any(|l| {
            !l.starts_with('#')
                && l.strip_prefix(f)
                    .is_some_and(|rest| rest.starts_with(['{', ' ', '_']))
        });
        assert!(has_sample, "{f} has no series on a fresh process");
    }

    // The instances: every label value known in advance, at 0.
    let zero = |name: &str, label: &str, value: &str| {
        let series = format!("{name}{{{label}=\"{value}\"}} 0");
        assert!(
            scrape.lines().any(|l| l == series),
            "{series} missing on a fresh process"
        );
    };
    // The label values the docs name are the ones exported (an outside
    // tester found the docs saying `ws`).
    let docs = std::fs::read_to_string(repo("docs/observability.md")).unwrap();
    let row = docs
        .lines()
        .find(|l| l.starts_with("| `runcast_connections{transport}`"))
        .expect("runcast_connections in docs/observability.md");
    for t in ["websocket", "sse"] {
        zero("runcast_connections", "transport", t);
        assert!(row.contains(&format!("`{t}`")), "{row}");
    }
    for c in runcast_core::ErrorCode::ALL {
        zero("runcast_protocol_errors_total", "code", c.as_str());
    }
    for c in runcast_core::CloseCode::ALL {
        zero("runcast_closes_total", "code", &c.code().to_string());
    }
    for k in runcast_gateway::auth::AuthErrorKind::ALL {
        zero("runcast_auth_failures_total", "reason", k.as_str());
    }
    for s in ["handshake", "upgrade", "request_body"] {
        zero("runcast_timeouts_total", "stage", s);
    }
    for r in ["shutdown", "drain", "rebalance"] {
        zero("runcast_reconnect_hints_total", "reason", r);
    }
    for r in ["per_ip", "rate"] {
        zero("runcast_refused_sessions_total", "reason", r);
    }
    for r in ["ok", "error"] {
        zero("runcast_tls_reloads_total", "result", r);
    }
    for hop in ["publish_to_receive", "receive_to_write", "publish_to_write"] {
        zero("runcast_event_latency_seconds_count", "hop", hop);
    }
}
