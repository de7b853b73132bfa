//! Reconcile scenarios against a scripted Kubernetes API server (the
//! `tower-test` pattern kube-rs uses): every request the operator makes must
//! be the next one the script expects, and nothing may follow the script.
//! The gateway pods are real in-process gateways on 127.0.0.1, .2 and .3
//! sharing one port, as pods share a container port; their admin API is
//! what the operator reads and drives.

use std::{sync::Arc, time::Duration};

use http::{Request, Response};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Secret, Service},
    policy::v1::PodDisruptionBudget,
};
use kube::client::Body;
use runcast_bus::{Bus, EmbeddedBus, Retention};
use runcast_gateway::Config;
use runcast_operator::{
    crd::RuncastCluster,
    lease::LeaderElector,
    metrics::OperatorMetrics,
    reconcile::{Context, PodClient, reconcile, status_of},
    served::Served,
};
use runcast_test_support::{TestGateway, WsClient};
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
const TOKEN: &str = "admin-token-for-tests";
const NS: &str = "apps";

/// The scripted API server.
struct Api(Handle);

impl Api {
    /// Takes the next request, which must be `method` on `path` (the query
    /// string is returned for checks), and answers `status` with `body`.
    async fn expect(
        &mut self,
        method: &str,
        path: &str,
        respond: impl FnOnce(&Value) -> (u16, Value),
    ) -> (String, Value) {
        let (req, send) = tokio::time::timeout(Duration::from_secs(10), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request; expected {method} {path}"))
            .expect("the client is gone");
        let uri = req.uri().clone();
        assert_eq!(
            (req.method().as_str(), uri.path()),
            (method, path),
            "unexpected request {} {uri}",
            req.method()
        );
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        let (status, out) = respond(&body);
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&out).unwrap()))
                .unwrap(),
        );
        (uri.query().unwrap_or("").to_owned(), body)
    }

    /// Fails if the operator makes any request the script did not expect.
    async fn nothing_more(&mut self) {
        if let Ok(Some((req, _))) =
            tokio::time::timeout(Duration::from_millis(300), self.0.next_request()).await
        {
            panic!("unexpected request {} {}", req.method(), req.uri());
        }
    }
}

fn not_found() -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

fn echo(b: &Value) -> (u16, Value) {
    (200, b.clone())
}

fn cluster(spec: Value, generation: i64) -> RuncastCluster {
    serde_json::from_value(json!({
        "apiVersion": "runcast.dev/v1alpha1",
        "kind": "RuncastCluster",
        "metadata": {"name": "demo", "namespace": NS, "uid": "uid-1", "generation": generation},
        "spec": spec,
    }))
    .unwrap()
}

fn spec(extra: Value) -> Value {
    let mut s = json!({
        "nats": {"url": "nats://nats:4222"},
        "replicas": {"min": 2, "max": 5},
        "scaling": {"connectionsPerPod": 20, "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 0},
        "drain": {"rate": 200.0, "jitterMs": 0, "gracePeriodSeconds": 60},
    });
    for (k, v) in extra.as_object().unwrap() {
        s[k] = v.clone();
    }
    s
}

fn secret() -> (u16, Value) {
    use std::fmt::Write;
    // base64 of TOKEN, by hand: no base64 dependency for one string.
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in TOKEN.as_bytes().chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.write_char(A[(n >> (18 - 6 * i) & 63) as usize] as char)
                    .unwrap();
            } else {
                out.push('=');
            }
        }
    }
    (
        200,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-admin", "namespace": NS}, "data": {"token": out}}),
    )
}

fn deployment(replicas: i32) -> (u16, Value) {
    (
        200,
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "demo-gateway", "namespace": NS},
               "spec": {"replicas": replicas, "selector": {"matchLabels": {"a": "b"}}, "template": {}}}),
    )
}

fn pods(names_ips: &[(&str, &str, bool)]) -> (u16, Value) {
    let items: Vec<Value> = names_ips
        .iter()
        .map(|(name, ip, ready)| {
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": NS},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if *ready { "True" } else { "False" }}]},
            })
        })
        .collect();
    (
        200,
        json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items}),
    )
}

/// Starts `reconcile` on a mocked client; returns the scripted server.
fn start(
    rc: RuncastCluster,
    port: u16,
) -> (
    Api,
    tokio::task::JoinHandle<
        Result<kube::runtime::controller::Action, runcast_operator::reconcile::Error>,
    >,
    Arc<Context>,
) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, NS);
    // A current cluster with the Prometheus Operator: what 1.20 cannot
    // show (policy/v1) is tested here; discovery itself, and a cluster
    // without those APIs, against a real API server (cli/tests/kubernetes.rs).
    let ctx = Arc::new(
        Context::new(
            client,
            PodClient::new(port),
            Arc::new(OperatorMetrics::new()),
        )
        .assume_served(Served::everything()),
    );
    let task = tokio::spawn(reconcile(Arc::new(rc), ctx.clone()));
    (Api(handle), task, ctx)
}

fn mock() -> (Api, kube::Client) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Api(handle), kube::Client::new(svc, NS))
}

/// The reads every reconcile of an existing cluster starts with: the admin
/// Secret, the ConfigMap apply (returned), the Deployment at `replicas`,
/// and the pod list.
async fn reads(api: &mut Api, replicas: i32, pods: (u16, Value)) -> Value {
    api.expect(
        "GET",
        &format!("/api/v1/namespaces/{NS}/secrets/demo-admin"),
        |_| secret(),
    )
    .await;
    let (_, cm) = api
        .expect(
            "PATCH",
            &format!("/api/v1/namespaces/{NS}/configmaps/demo-gateway"),
            echo,
        )
        .await;
    api.expect(
        "GET",
        &format!("/apis/apps/v1/namespaces/{NS}/deployments/demo-gateway"),
        |_| deployment(replicas),
    )
    .await;
    api.expect("GET", &format!("/api/v1/namespaces/{NS}/pods"), move |_| {
        pods
    })
    .await;
    cm
}

/// The SSA calls every reconcile makes after reading, in order; with
/// `monitoring` the caller takes the ServiceMonitor and PrometheusRule
/// applies, without it they are looked for (to delete) and not found. The
/// Ingress, off in every test here, is looked for too.
async fn applies(api: &mut Api, monitoring: bool) -> (Value, Value) {
    let out = core_applies(api, true).await;
    if !monitoring {
        for kind in ["servicemonitors", "prometheusrules"] {
            api.expect(
                "GET",
                &format!("/apis/monitoring.coreos.com/v1/namespaces/{NS}/{kind}/demo"),
                |_| not_found(),
            )
            .await;
        }
    }
    out
}

/// The Deployment, Service and PodDisruptionBudget applies, and (unless a
/// reconcile before found none) the look for an Ingress, off in every test
/// here.
async fn core_applies(api: &mut Api, ingress: bool) -> (Value, Value) {
    let (q, dep) = api
        .expect(
            "PATCH",
            &format!("/apis/apps/v1/namespaces/{NS}/deployments/demo-gateway"),
            echo,
        )
        .await;
    assert!(
        q.contains("fieldManager=runcast-operator") && q.contains("force=true"),
        "{q}"
    );
    let (_, svc) = api
        .expect(
            "PATCH",
            &format!("/api/v1/namespaces/{NS}/services/demo"),
            echo,
        )
        .await;
    let (_, pdb) = api
        .expect(
            "PATCH",
            &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/demo-gateway"),
            echo,
        )
        .await;
    let pdb: PodDisruptionBudget = serde_json::from_value(pdb).unwrap();
    assert!(pdb.spec.unwrap().max_unavailable.is_some());
    if ingress {
        api.expect(
            "GET",
            &format!("/apis/networking.k8s.io/v1/namespaces/{NS}/ingresses/demo"),
            |_| not_found(),
        )
        .await;
    }
    (dep, svc)
}

async fn status_patch(api: &mut Api, rc: &RuncastCluster) -> Value {
    let rc_json = serde_json::to_value(rc).unwrap();
    let (_, body) = api
        .expect(
            "PATCH",
            &format!("/apis/runcast.dev/v1alpha1/namespaces/{NS}/runcastclusters/demo/status"),
            move |b| {
                let mut o = rc_json.clone();
                o["status"] = b["status"].clone();
                (200, o)
            },
        )
        .await;
    body
}

/// Gateways on 127.0.0.1..=n sharing one port and one bus.
async fn gateways(n: u8) -> (u16, Vec<TestGateway>) {
    let bus: Arc<dyn Bus> = Arc::new(EmbeddedBus::new(Retention::default()));
    'retry: for _ in 0..10 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        for i in 1..=n {
            if std::net::TcpListener::bind(("127.0.0.".to_string() + &i.to_string(), port)).is_err()
            {
                continue 'retry;
            }
        }
        let mut out = Vec::new();
        for i in 1..=n {
            let config = Config {
                admin_token: Some(TOKEN.into()),
                ..Config::default()
            };
            let addr = format!("127.0.0.{i}:{port}").parse().unwrap();
            out.push(TestGateway::on_addr(bus.clone(), config, "embedded", addr).await);
        }
        return (port, out);
    }
    panic!("no free port on 127.0.0.1-{n}");
}

async fn connect(gw: &TestGateway, n: usize) -> Vec<WsClient> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut c = WsClient::connect(&gw.ws_url()).await;
        c.subscribe(&format!("run-{i}"), None).await;
        out.push(c);
    }
    out
}

#[tokio::test]
async fn create_applies_every_owned_object_with_owner_references() {
    let rc = cluster(
        spec(json!({"observability": {"serviceMonitor": true, "prometheusRule": true}})),
        1,
    );
    let (mut api, task, _) = start(rc.clone(), 1);
    api.expect(
        "GET",
        &format!("/api/v1/namespaces/{NS}/secrets/demo-admin"),
        |_| not_found(),
    )
    .await;
    let (_, secret) = api
        .expect("POST", &format!("/api/v1/namespaces/{NS}/secrets"), echo)
        .await;
    let secret: Secret = serde_json::from_value(secret).unwrap();
    let token = &secret.string_data.as_ref().unwrap()["token"];
    assert_eq!(token.len(), 64, "a 32-byte random token");
    let (q, cm) = api
        .expect(
            "PATCH",
            &format!("/api/v1/namespaces/{NS}/configmaps/demo-gateway"),
            echo,
        )
        .await;
    assert!(q.contains("fieldManager=runcast-operator"), "{q}");
    let cm: ConfigMap = serde_json::from_value(cm).unwrap();
    let data = cm.data.unwrap();
    assert_eq!(data["RUNCAST_NATS_URL"], "nats://nats:4222");
    assert_eq!(
        data["RUNCAST_DRAIN_TIMEOUT"], "50s",
        "within the 60 s grace period"
    );
    api.expect(
        "GET",
        &format!("/apis/apps/v1/namespaces/{NS}/deployments/demo-gateway"),
        |_| not_found(),
    )
    .await;
    let (q, _) = api
        .expect("GET", &format!("/api/v1/namespaces/{NS}/pods"), |_| {
            pods(&[])
        })
        .await;
    assert!(
        q.contains("app.kubernetes.io%2Finstance%3Ddemo")
            || q.contains("app.kubernetes.io/instance=demo"),
        "{q}"
    );
    let (dep, svc) = applies(&mut api, true).await;
    let sm = api
        .expect(
            "PATCH",
            &format!("/apis/monitoring.coreos.com/v1/namespaces/{NS}/servicemonitors/demo"),
            echo,
        )
        .await
        .1;
    let rule = api
        .expect(
            "PATCH",
            &format!("/apis/monitoring.coreos.com/v1/namespaces/{NS}/prometheusrules/demo"),
            echo,
        )
        .await
        .1;
    let status = status_patch(&mut api, &rc).await;
    task.await.unwrap().unwrap();
    api.nothing_more().await;

    // Every object parses as its Kubernetes type and is owned by the cluster.
    let dep: Deployment = serde_json::from_value(dep).unwrap();
    let _: Service = serde_json::from_value(svc).unwrap();
    let d = dep.spec.as_ref().unwrap();
    assert_eq!(d.replicas, Some(2), "a new cluster starts at min");
    let pod = d.template.spec.as_ref().unwrap();
    assert_eq!(pod.termination_grace_period_seconds, Some(60));
    let c = &pod.containers[0];
    assert_eq!(c.args.as_deref(), Some(&["gateway".to_string()][..]));
    assert_eq!(
        c.security_context
            .as_ref()
            .unwrap()
            .read_only_root_filesystem,
        Some(true)
    );
    let owner = &dep.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("RuncastCluster", "uid-1", Some(true))
    );
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    assert!(
        rule["spec"]["groups"]
            .as_array()
            .is_some_and(|g| !g.is_empty()),
        "the shipped rules"
    );
    let st = status_of(&status).unwrap();
    assert_eq!(
        (st.replicas, st.desired_replicas, st.observed_generation),
        (0, 2, Some(1))
    );
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "False");
}

/// Server-side apply never deletes an object that an apply stops sending:
/// a ServiceMonitor the spec turned off is deleted if this cluster owns
/// it, a PrometheusRule of the same name owned by something else is left
/// alone, and the next reconcile looks for neither again.
#[tokio::test]
async fn an_optional_object_turned_off_is_deleted_only_if_the_cluster_owns_it() {
    let rc = cluster(spec(json!({})), 2);
    let (mut api, task, ctx) = start(rc.clone(), 1);
    let owned_by = |uid: &str, kind: &str| {
        (
            200,
            json!({
                "apiVersion": "monitoring.coreos.com/v1", "kind": kind,
                "metadata": {"name": "demo", "namespace": NS, "ownerReferences": [{
                    "apiVersion": "runcast.dev/v1alpha1", "kind": "RuncastCluster",
                    "name": "demo", "uid": uid, "controller": true,
                }]},
            }),
        )
    };
    reads(&mut api, 2, pods(&[])).await;
    core_applies(&mut api, true).await;
    let sm_path = format!("/apis/monitoring.coreos.com/v1/namespaces/{NS}/servicemonitors/demo");
    api.expect("GET", &sm_path, |_| owned_by("uid-1", "ServiceMonitor"))
        .await;
    api.expect("DELETE", &sm_path, |_| {
        (
            200,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        )
    })
    .await;
    api.expect(
        "GET",
        &format!("/apis/monitoring.coreos.com/v1/namespaces/{NS}/prometheusrules/demo"),
        |_| owned_by("someone-else", "PrometheusRule"),
    )
    .await;
    status_patch(&mut api, &rc).await;
    task.await.unwrap().unwrap();
    api.nothing_more().await;

    let task = tokio::spawn(reconcile(Arc::new(rc.clone()), ctx));
    reads(&mut api, 2, pods(&[])).await;
    core_applies(&mut api, false).await;
    status_patch(&mut api, &rc).await;
    task.await.unwrap().unwrap();
    api.nothing_more().await;
}

#[tokio::test]
async fn update_rolls_the_new_spec_out_at_the_current_size() {
    let mut s = spec(json!({}));
    s["gateway"] = json!({"image": "registry.example/runcast:2.0"});
    s["nats"]["url"] = json!("nats://other:4222");
    s["auth"] = json!({
        "allowAnonymous": true,
        "hs256SecretRef": {"name": "runcast-auth", "key": "hs256-secret"},
        "jwksSecretRef": {"name": "runcast-auth", "key": "jwks.json"},
        "audience": "runcast",
        "publishKeys": ["ci:abababababababababababababababababababababababababababababababab:build-", "ops:cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd"],
    });
    let rc = cluster(s, 2);
    let (mut api, task, _) = start(rc.clone(), 1);
    // Four ready pods whose admin API does not answer (nothing listens on
    // port 1).
    let cm = reads(
        &mut api,
        4,
        pods(&[
            ("gw-a", "127.0.0.1", true),
            ("gw-b", "127.0.0.2", true),
            ("gw-c", "127.0.0.3", true),
            ("gw-d", "127.0.0.4", true),
        ]),
    )
    .await;
    let (dep, _) = applies(&mut api, false).await;
    let status = status_patch(&mut api, &rc).await;
    task.await.unwrap().unwrap();
    api.nothing_more().await;
    let st = status_of(&status).unwrap();
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.status == "True"),
        "{st:?}"
    );
    assert_eq!(cm["data"]["RUNCAST_NATS_URL"], "nats://other:4222");
    assert_eq!(cm["data"]["RUNCAST_ALLOW_ANONYMOUS"], "true");
    assert_eq!(cm["data"]["RUNCAST_AUTH_AUDIENCE"], "runcast");
    assert_eq!(
        cm["data"]["RUNCAST_PUBLISH_KEYS"],
        "ci:abababababababababababababababababababababababababababababababab:build-,ops:cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd"
    );
    assert!(cm["data"].get("RUNCAST_ALLOW_ANONYMOUS_PUBLISH").is_none());
    assert_eq!(
        cm["data"]["RUNCAST_AUTH_JWKS"],
        "/etc/runcast/auth/jwks.json"
    );
    let dep: Deployment = serde_json::from_value(dep).unwrap();
    let d = dep.spec.unwrap();
    let t = d.template;
    let pod = t.spec.clone().unwrap();
    let env = pod.containers[0].env.clone().unwrap();
    let secret = env
        .iter()
        .find(|e| e.name == "RUNCAST_AUTH_HS256_SECRET")
        .and_then(|e| e.value_from.as_ref()?.secret_key_ref.clone())
        .expect("the HS256 secret comes from its Secret");
    assert_eq!(
        (secret.name.as_str(), secret.key.as_str()),
        ("runcast-auth", "hs256-secret")
    );
    assert!(pod.volumes.unwrap().iter().any(|v| {
        v.secret
            .as_ref()
            .is_some_and(|s| s.secret_name.as_deref() == Some("runcast-auth"))
    }));
    assert_eq!(
        t.spec.unwrap().containers[0].image.as_deref(),
        Some("registry.example/runcast:2.0")
    );
    // Pods that cannot be asked keep the fleet as it is (no blind scale-down).
    assert_eq!(d.replicas, Some(4));
    // The config hash in the pod template changes with the ConfigMap.
    let hash = &t.metadata.unwrap().annotations.unwrap()["runcast.dev/config-hash"];
    assert_eq!(hash.len(), 16);
    assert_eq!(st.observed_generation, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_up_then_rebalance_onto_the_new_pod() {
    let (port, gws) = gateways(3).await;
    let _a = connect(&gws[0], 30).await;
    let _b = connect(&gws[1], 30).await;
    let rc = cluster(spec(json!({})), 1);

    // 60 connections at 20 per pod: 2 pods become 3.
    let (mut api, task, _) = start(rc.clone(), port);
    reads(
        &mut api,
        2,
        pods(&[("gw-a", "127.0.0.1", true), ("gw-b", "127.0.0.2", true)]),
    )
    .await;
    let (dep, _) = applies(&mut api, false).await;
    let status = status_patch(&mut api, &rc).await;
    task.await.unwrap().unwrap();
    api.nothing_more().await;
    assert_eq!(dep["spec"]["replicas"], 3);
    let st = status_of(&status).unwrap();
    assert_eq!((st.connections, st.desired_replicas), (60, 3));
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Scaling" && c.status == "True")
    );

    // The new pod is ready and empty: the old ones shed to the fair share.
    // (Stabilization windows are 0 here, so a fresh context decides the same.)
    let (mut api, task, _) = start(rc.clone(), port);
    reads(
        &mut api,
        3,
        pods(&[
            ("gw-a", "127.0.0.1", true),
            ("gw-b", "127.0.0.2", true),
            ("gw-c", "127.0.0.3", true),
        ]),
    )
    .await;
    let (dep, _) = applies(&mut api, false).await;
    status_patch(&mut api, &rc).await;
    task.await.unwrap().unwrap();
    api.nothing_more().await;
    assert_eq!(dep["spec"]["replicas"], 3);
    // Each old pod was asked to move 10 clients (real gateways, real closes).
    for gw in &gws[..2] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while gw.gw.stats().connections > 20 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                gw.gw.stats()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(gw.gw.stats().connections, 20);
    }
    assert_eq!(
        gws[2].gw.stats().connections,
        0,
        "the new pod was not asked to shed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_drains_first_then_removes_exactly_the_drained_pods() {
    let (port, gws) = gateways(3).await;
    let _a = connect(&gws[0], 5).await;
    let _b = connect(&gws[1], 5).await;
    let _c = connect(&gws[2], 6).await;
    let mut s = spec(json!({}));
    s["replicas"] = json!({"min": 1, "max": 5});
    let rc = cluster(s, 1);

    // 16 connections fit in 1 pod: drain the two least loaded.
    let (mut api, task, _) = start(rc.clone(), port);
    let three = [
        ("gw-a", "127.0.0.1", true),
        ("gw-b", "127.0.0.2", true),
        ("gw-c", "127.0.0.3", true),
    ];
    reads(&mut api, 3, pods(&three)).await;
    let (dep, _) = applies(&mut api, false).await;
    for pod in ["gw-a", "gw-b"] {
        let (_, patch) = api
            .expect(
                "PATCH",
                &format!("/api/v1/namespaces/{NS}/pods/{pod}"),
                |_| {
                    (
                        200,
                        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod}}),
                    )
                },
            )
            .await;
        assert_eq!(
            patch["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"],
            "-1000"
        );
    }
    let status = status_patch(&mut api, &rc).await;
    task.await.unwrap().unwrap();
    api.nothing_more().await;
    assert_eq!(
        dep["spec"]["replicas"], 3,
        "nothing removed before it is drained"
    );
    assert_eq!(status_of(&status).unwrap().desired_replicas, 1);
    assert!(gws[0].gw.is_draining() && gws[1].gw.is_draining() && !gws[2].gw.is_draining());

    // Once they are empty, replicas drop to 1: the ReplicaSet removes the
    // two marked pods.
    for gw in &gws[..2] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while gw.gw.stats().connections > 0 || gw.gw.stats().pending_hints > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                gw.gw.stats()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // (Stabilization windows are 0 here, so a fresh context decides the same.)
    let (mut api, task, _) = start(rc.clone(), port);
    reads(&mut api, 3, pods(&three)).await;
    let (dep, _) = applies(&mut api, false).await;
    let status = status_patch(&mut api, &rc).await;
    task.await.unwrap().unwrap();
    api.nothing_more().await;
    assert_eq!(dep["spec"]["replicas"], 1);
    let st = status_of(&status).unwrap();
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Draining" && c.status == "True")
    );
    assert_eq!(st.pods.iter().filter(|p| p.draining).count(), 2);
}

/// Fake gateway pods on 127.0.0.1..=n sharing one port: each answers its
/// admin stats (`connections` open) only `delay` after the request, and
/// notes when the request arrived.
struct SlowPods {
    port: u16,
    arrivals: Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
    _tasks: tokio::task::JoinSet<()>,
}

impl SlowPods {
    async fn start(n: u8, delay: Duration, connections: u64) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
        let body = serde_json::to_string(&runcast_core::admin::PodStats {
            connections,
            ..Default::default()
        })
        .unwrap();
        'retry: for _ in 0..10 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut listeners = Vec::new();
            for i in 1..=n {
                match tokio::net::TcpListener::bind(format!("127.0.0.{i}:{port}")).await {
                    Ok(l) => listeners.push(l),
                    Err(_) => continue 'retry,
                }
            }
            let mut tasks = tokio::task::JoinSet::new();
            for l in listeners {
                let (arrivals, body) = (arrivals.clone(), body.clone());
                tasks.spawn(async move {
                    while let Ok((mut sock, _)) = l.accept().await {
                        let (arrivals, body) = (arrivals.clone(), body.clone());
                        tokio::spawn(async move {
                            let mut req = Vec::new();
                            let mut buf = [0u8; 1024];
                            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                                match sock.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(k) => req.extend_from_slice(&buf[..k]),
                                }
                            }
                            arrivals.lock().unwrap().push(std::time::Instant::now());
                            let req = String::from_utf8_lossy(&req).to_lowercase();
                            let ok = req.starts_with("get /v1/admin/stats ")
                                && req.contains(&format!("authorization: bearer {TOKEN}"));
                            tokio::time::sleep(delay).await;
                            let head = if ok { "200 OK" } else { "401 Unauthorized" };
                            let resp = format!(
                                "HTTP/1.1 {head}\r\ncontent-type: application/json\r\n\
                                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = sock.write_all(resp.as_bytes()).await;
                        });
                    }
                });
            }
            return Self {
                port,
                arrivals,
                _tasks: tasks,
            };
        }
        panic!("no free port on 127.0.0.1-{n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_stats_are_fetched_concurrently() {
    // Five pods whose stats take 400 ms each: 2 s one after another, about
    // 400 ms together (the per-request timeout is 2 s).
    const N: u32 = 5;
    let delay = Duration::from_millis(400);
    let fake = SlowPods::start(N as u8, delay, 20).await;
    let names: Vec<(String, String)> = (1..=N)
        .map(|i| (format!("gw-{i}"), format!("127.0.0.{i}")))
        .collect();
    let list: Vec<(&str, &str, bool)> = names
        .iter()
        .map(|(name, ip)| (name.as_str(), ip.as_str(), true))
        .collect();
    let rc = cluster(spec(json!({})), 1);
    let (mut api, task, _) = start(rc.clone(), fake.port);
    reads(&mut api, N as i32, pods(&list)).await;
    let listed = std::time::Instant::now();
    // The next API call comes once every pod has answered.
    let (dep, _) = applies(&mut api, false).await;
    let waited = listed.elapsed();
    let status = status_patch(&mut api, &rc).await;
    task.await.unwrap().unwrap();
    api.nothing_more().await;

    let st = status_of(&status).unwrap();
    assert_eq!(
        st.connections,
        20 * u64::from(N),
        "every pod's stats were read: {st:?}"
    );
    assert_eq!(dep["spec"]["replicas"], N, "a full, balanced fleet stays");
    let arrivals = fake.arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), N as usize, "one stats request per pod");
    let spread = *arrivals.iter().max().unwrap() - *arrivals.iter().min().unwrap();
    assert!(
        spread < delay,
        "all {N} stats requests should be in flight together, but they arrived over {spread:?} \
         while each takes {delay:?} to answer"
    );
    assert!(
        waited >= delay && waited < delay * N / 2,
        "reading {N} pods that take {delay:?} each took {waited:?}: expected about {delay:?}, \
         well under the {:?} of one at a time",
        delay * N
    );
}

#[tokio::test]
async fn a_bad_spec_is_refused_in_its_status_without_touching_anything() {
    let mut s = spec(json!({}));
    s["replicas"] = json!({"min": 4, "max": 2});
    let rc = cluster(s, 1);
    let (mut api, task, _) = start(rc.clone(), 1);
    let status = status_patch(&mut api, &rc).await;
    let action = task.await.unwrap().unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::await_change(),
        "no retry loop"
    );
    api.nothing_more().await;
    let ready = &status["status"]["conditions"][0];
    assert_eq!(
        (&ready["type"], &ready["status"], &ready["reason"]),
        (&json!("Ready"), &json!("False"), &json!("InvalidSpec"))
    );
    assert!(
        ready["message"].as_str().unwrap().contains("replicas.min"),
        "{ready}"
    );
}

/// `gateway.env` carries gateway settings, not overrides of what the
/// operator sets from other spec fields: an outside tester's
/// `RUNCAST_LISTEN` moved the gateways off the port the Service and the
/// probes use, and keys that are no setting at all went into the pods'
/// environment. Each is refused in the status, naming the key and what
/// to set instead.
#[tokio::test]
async fn gateway_env_may_not_override_what_the_operator_sets() {
    for (key, says) in [
        ("RUNCAST_LISTEN", "port 8080"),
        ("RUNCAST_NATS_URL", "spec.nats.url"),
        ("RUNCAST_ADMIN_TOKEN", "Secret"),
        ("PATH", "not a gateway setting"),
        ("runcast_log", "not a gateway setting"),
        ("RUNCAST_", "not a gateway setting"),
    ] {
        let rc = cluster(spec(json!({"gateway": {"env": {key: "x"}}})), 1);
        let (mut api, task, _) = start(rc.clone(), 1);
        let status = status_patch(&mut api, &rc).await;
        let action = task.await.unwrap().unwrap();
        assert_eq!(action, kube::runtime::controller::Action::await_change());
        api.nothing_more().await;
        let ready = &status["status"]["conditions"][0];
        assert_eq!(ready["reason"], "InvalidSpec", "{key}: {ready}");
        let message = ready["message"].as_str().unwrap();
        assert!(
            message.contains(key) && message.contains(says),
            "{key}: {message}"
        );
    }
}

fn lease(holder: &str, renewed_secs_ago: i64) -> (u16, Value) {
    let renew = k8s_openapi::jiff::Timestamp::now()
        .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(
            renewed_secs_ago,
        ))
        .unwrap();
    (
        200,
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "runcast-operator", "namespace": NS, "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "renewTime": renew.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(), "leaseTransitions": 3},
        }),
    )
}

#[tokio::test]
async fn leader_election_hands_over_only_an_expired_lease() {
    let path = format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/runcast-operator");
    let elect = |client: kube::Client| {
        LeaderElector::new(
            kube::Api::namespaced(client, NS),
            "runcast-operator",
            "op-2",
            Duration::from_secs(15),
        )
    };

    // No lease yet: create it and lead.
    let (mut api, client) = mock();
    let t = tokio::spawn(async move { elect(client).try_acquire().await });
    api.expect("GET", &path, |_| not_found()).await;
    let (_, created) = api
        .expect(
            "POST",
            &format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"),
            echo,
        )
        .await;
    assert!(t.await.unwrap().unwrap());
    assert_eq!(created["spec"]["holderIdentity"], "op-2");

    // Another replica renewed 2 s ago: follow, and touch nothing.
    let (mut api, client) = mock();
    let t = tokio::spawn(async move { elect(client).try_acquire().await });
    api.expect("GET", &path, |_| lease("op-1", 2)).await;
    assert!(!t.await.unwrap().unwrap());
    api.nothing_more().await;

    // Its lease expired (60 s without renewal): take over, conditionally.
    let (mut api, client) = mock();
    let t = tokio::spawn(async move { elect(client).try_acquire().await });
    api.expect("GET", &path, |_| lease("op-1", 60)).await;
    let (_, replaced) = api.expect("PUT", &path, echo).await;
    assert!(t.await.unwrap().unwrap());
    assert_eq!(replaced["spec"]["holderIdentity"], "op-2");
    assert_eq!(replaced["spec"]["leaseTransitions"], 4);
    assert_eq!(
        replaced["metadata"]["resourceVersion"], "7",
        "a conditional replace"
    );

    // Two replicas race for it and the other one wins: follow.
    let (mut api, client) = mock();
    let t = tokio::spawn(async move { elect(client).try_acquire().await });
    api.expect("GET", &path, |_| lease("op-1", 60)).await;
    api.expect("PUT", &path, |_| {
        (409, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "conflict"}))
    })
    .await;
    assert!(!t.await.unwrap().unwrap());

    // Our own lease: renew it, keeping the transition count.
    let (mut api, client) = mock();
    let t = tokio::spawn(async move { elect(client).try_acquire().await });
    api.expect("GET", &path, |_| lease("op-2", 4)).await;
    let (_, renewed) = api.expect("PUT", &path, echo).await;
    assert!(t.await.unwrap().unwrap());
    assert_eq!(renewed["spec"]["leaseTransitions"], 3);
}

#[tokio::test]
async fn failed_reconciles_back_off_exponentially_per_cluster() {
    let (_api, client) = mock();
    let ctx = Arc::new(Context::new(
        client,
        PodClient::new(1),
        Arc::new(OperatorMetrics::new()),
    ));
    let rc = Arc::new(cluster(spec(json!({})), 1));
    let err = runcast_operator::reconcile::Error::Spec("x".into());
    let waits: Vec<_> = (0..12)
        .map(|_| runcast_operator::reconcile::error_policy(rc.clone(), &err, ctx.clone()))
        .collect();
    use kube::runtime::controller::Action;
    let secs = |s| Action::requeue(Duration::from_secs(s));
    assert_eq!(waits[0], secs(1));
    assert_eq!(waits[1], secs(2));
    assert_eq!(waits[2], secs(4));
    assert_eq!(waits[8], secs(256));
    assert_eq!(waits[11], secs(256), "capped");
    // Another cluster starts from 1 s.
    let other = Arc::new(
        serde_json::from_value::<RuncastCluster>(json!({
            "apiVersion": "runcast.dev/v1alpha1", "kind": "RuncastCluster",
            "metadata": {"name": "other", "namespace": NS}, "spec": spec(json!({})),
        }))
        .unwrap(),
    );
    assert_eq!(
        runcast_operator::reconcile::error_policy(other, &err, ctx),
        secs(1)
    );
}
