//! The chart and the operator against a real Kubernetes control plane:
//! etcd, kube-apiserver (TLS, token auth, RBAC), controller-manager and
//! scheduler (and the persistent volume binder), built from Debian's source package (1.20.2, the only
//! Kubernetes source these machines reach; see scripts/k8s-control-plane.sh).
//!
//! What cannot run here is a kubelet and a container runtime: the
//! scheduler binds pods to a fake Node and nothing starts them. Where a test
//! needs running pods it plays the kubelet: it sets the pods Running and
//! Ready with a 127.0.0.0/8 podIP and starts a real `runcast gateway` on
//! that address, and it finishes the deletion of pods the API server marked
//! terminating (a kubelet deletes them with grace period 0 once their
//! containers stopped).

use std::time::Duration;

use runcast_test_support::k8s::{ControlPlane, wait_for};
use serde_json::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../charts/runcast");

/// (kubectl resource, name, namespace) of every object in a rendered manifest.
fn objects(manifest: &str) -> Vec<(String, String, Option<String>)> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for doc in serde_norway::Deserializer::from_str(manifest) {
        let v = Value::deserialize(doc).expect("manifest YAML");
        if v.is_null() {
            continue;
        }
        let kind = v["kind"].as_str().expect("kind");
        let api = v["apiVersion"].as_str().expect("apiVersion");
        // kubectl's TYPE.VERSION.GROUP names the exact API the chart used.
        let resource = match api.split_once('/') {
            Some((group, version)) => format!("{kind}.{version}.{group}"),
            None => kind.to_owned(),
        };
        out.push((
            resource,
            v["metadata"]["name"].as_str().expect("name").to_owned(),
            v["metadata"]["namespace"].as_str().map(str::to_owned),
        ));
    }
    out
}

fn get_object(
    cp: &ControlPlane,
    (resource, name, ns): &(String, String, Option<String>),
) -> Option<Value> {
    match ns {
        Some(ns) => cp.get(&[resource, name, "-n", ns]),
        None => cp.get(&[resource, name]),
    }
}

/// What a kubelet would do for pods the API server marked for deletion:
/// confirm it (grace period 0) once the containers are gone, which here
/// they always are.
fn reap_terminating_pods(cp: &ControlPlane, ns: &str) {
    let Some(pods) = cp.get(&["pods", "-n", ns]) else {
        return;
    };
    for p in pods["items"].as_array().into_iter().flatten() {
        if p["metadata"]["deletionTimestamp"].is_string() {
            let name = p["metadata"]["name"].as_str().unwrap();
            let _ = cp.kubectl(&[
                "delete",
                "pod",
                name,
                "-n",
                ns,
                "--grace-period=0",
                "--force",
            ]);
        }
    }
}

fn established(cp: &ControlPlane, crd: &str) -> bool {
    cp.get(&["crd", crd]).is_some_and(|c| {
        c["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Established" && c["status"] == "True")
    })
}

/// `helm install` of the chart with the default values and with each CI
/// value set: every object is accepted by a real API server (schema,
/// admission, the API versions it serves), the CRD becomes Established,
/// and `helm uninstall` leaves nothing behind, pods included.
#[test]
fn the_chart_installs_on_a_real_api_server_and_uninstalls_without_a_trace() {
    let cp = ControlPlane::start();
    // A cluster with the Prometheus Operator's CRDs, which the monitoring
    // value set needs (it asks for a ServiceMonitor of the operator).
    cp.apply(&monitoring_crds());
    let mut sets = vec![("default", None)];
    let mut ci: Vec<_> = std::fs::read_dir(format!("{CHART}/ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    ci.sort();
    for path in &ci {
        let stem = path.file_stem().unwrap().to_str().unwrap();
        sets.push((stem.trim_end_matches("-values"), Some(path.clone())));
    }
    for (name, values) in &sets {
        let ns = format!("chart-{name}");
        let release = format!("rc-{name}");
        let mut args = vec!["install", &release, CHART, "-n", &ns, "--create-namespace"];
        let values_path;
        if let Some(v) = values {
            values_path = v.display().to_string();
            args.extend_from_slice(&["-f", &values_path]);
        }
        // Volumes for the bundled NATS StatefulSet's claims, as a
        // cluster's provisioner would make them (none runs here).
        for i in 0..3 {
            cp.apply(&format!(
                "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: pv-{name}-{i}}}\nspec:\n  capacity: {{storage: 10Gi}}\n  accessModes: [ReadWriteOnce]\n  hostPath: {{path: /tmp/runcast-pv-{name}-{i}}}\n"
            ));
        }
        let out = cp.helm(&args);
        assert!(
            out.status.success(),
            "helm install with {name} values: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            wait_for(Duration::from_secs(30), || established(
                &cp,
                "runcastclusters.runcast.dev"
            )
            .then_some(()))
            .is_some(),
            "the RuncastCluster CRD is not Established"
        );
        let manifest = cp.helm(&["get", "manifest", &release, "-n", &ns]);
        assert!(manifest.status.success());
        let objs = objects(&String::from_utf8_lossy(&manifest.stdout));
        assert!(objs.len() > 5, "{name}: only {} objects", objs.len());
        for o in &objs {
            assert!(
                get_object(&cp, o).is_some(),
                "{name}: {o:?} was not created"
            );
        }
        // The controllers turned the workloads into pods, and the
        // scheduler bound them to the node.
        let bound = wait_for(Duration::from_secs(30), || {
            let pods = cp.get(&["pods", "-n", &ns])?;
            let items = pods["items"].as_array()?.clone();
            (!items.is_empty() && items.iter().all(|p| p["spec"]["nodeName"] == "fake-node"))
                .then_some(items.len())
        });
        assert!(
            bound.is_some(),
            "{name}: no pods, or pods left unscheduled:\n{}",
            cp.logs()
        );

        let out = cp.helm(&["uninstall", &release, "-n", &ns]);
        assert!(
            out.status.success(),
            "helm uninstall {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for o in &objs {
            let gone = wait_for(Duration::from_secs(30), || {
                get_object(&cp, o).is_none().then_some(())
            });
            assert!(
                gone.is_some(),
                "{name}: {o:?} is still there after uninstall"
            );
        }
        // The garbage collector removes what the workloads owned
        // (ReplicaSets, pods).
        let clean = wait_for(Duration::from_secs(60), || {
            reap_terminating_pods(&cp, &ns);
            let left: Vec<String> = ["pods", "replicasets", "controllerrevisions"]
                .iter()
                .flat_map(|r| {
                    cp.get(&[r, "-n", &ns])
                        .map(|l| {
                            l["items"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .map(|i| {
                                    format!("{r}/{}", i["metadata"]["name"].as_str().unwrap_or(""))
                                })
                                .collect::<Vec<_>>()
                        })
                        .unwrap_or_default()
                })
                .collect();
            left.is_empty().then_some(()).or_else(|| {
                std::thread::sleep(Duration::from_millis(400));
                None
            })
        });
        assert!(
            clean.is_some(),
            "{name}: objects left after uninstall:\n{}",
            cp.logs()
        );
    }
}

const BIN: &str = env!("CARGO_BIN_EXE_runcast");
const NS: &str = "apps";

/// `helm install rc` of the chart into [`NS`], as the operator tests use
/// it: NATS from `nats_url` instead of the bundled one, no demo workers,
/// one operator replica (the tests run the operator themselves), plus
/// `sets` (`key=value` each).
fn install_chart(cp: &ControlPlane, nats_url: &str, sets: &[&str]) {
    let url = format!("nats.url={nats_url}");
    let mut args = vec!["install", "rc", CHART, "-n", NS, "--create-namespace"];
    for set in [
        "nats.bundled=false",
        url.as_str(),
        "demo.enabled=false",
        "operator.replicas=1",
    ]
    .iter()
    .chain(sets)
    {
        args.extend_from_slice(&["--set", set]);
    }
    let out = cp.helm(&args);
    assert!(
        out.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A process killed (by PID) when dropped.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port_on(ips: &[String]) -> u16 {
    'retry: for _ in 0..20 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        for ip in ips {
            if std::net::TcpListener::bind((ip.as_str(), port)).is_err() {
                continue 'retry;
            }
        }
        return port;
    }
    panic!("no port free on {ips:?}");
}

/// `runcast operator` as the chart deploys it, but as a process here:
/// authenticated with the token of the chart's own ServiceAccount, so the
/// chart's RBAC decides what it may do.
fn operator(
    cp: &ControlPlane,
    release: &str,
    identity: &str,
    gateway_port: u16,
) -> (Proc, std::path::PathBuf) {
    operator_with(cp, release, identity, gateway_port, None, "127.0.0.1:0")
}

/// [`operator`], on the Lease `lease` (made by the operator) instead of
/// the chart's (which the chart makes, so the operator does not), with its
/// metrics on `metrics`.
fn operator_with(
    cp: &ControlPlane,
    release: &str,
    identity: &str,
    gateway_port: u16,
    lease: Option<&str>,
    metrics: &str,
) -> (Proc, std::path::PathBuf) {
    let sa = format!("{release}-operator");
    let kubeconfig = cp.service_account_kubeconfig(NS, &sa);
    let log = cp.dir().join(format!("operator-{identity}.log"));
    let child = std::process::Command::new(BIN)
        .arg("operator")
        .env("KUBECONFIG", &kubeconfig)
        .env("RUNCAST_WATCH_NAMESPACE", NS)
        .env("POD_NAMESPACE", NS)
        .env("POD_NAME", identity)
        .env("RUNCAST_LEASE_NAME", lease.unwrap_or(&sa))
        .env("RUNCAST_LEASE_CREATE", lease.is_some().to_string())
        .env("RUNCAST_LEASE_DURATION", "6s")
        .env("RUNCAST_GATEWAY_PORT", gateway_port.to_string())
        .env("RUNCAST_METRICS_LISTEN", metrics)
        .env("RUNCAST_LOG", "info,runcast_operator=debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .expect("start runcast operator");
    (Proc(child), log)
}

/// The body of `GET /metrics` at `addr` ("" when it does not answer).
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = c.write_all(b"GET /metrics HTTP/1.0\r\nHost: operator\r\n\r\n");
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

fn operator_log(log: &std::path::Path) -> String {
    let mut s = std::fs::read_to_string(log).unwrap_or_default();
    s.push_str(&std::fs::read_to_string(log.with_extension("err")).unwrap_or_default());
    s
}

/// Plays the kubelet for every gateway pod the ReplicaSet made that has no
/// process yet: starts a real `runcast gateway` on the pod's own address
/// (127.0.0.<10+n>), configured exactly as the pod would be, from the
/// ConfigMap the operator applied and the admin token Secret it made, then
/// reports the pod Running and Ready with that podIP.
fn run_gateway_pods(
    cp: &ControlPlane,
    cluster: &str,
    port: u16,
    running: &mut std::collections::BTreeMap<String, (String, Proc)>,
) {
    let pods = cp
        .get(&[
            "pods",
            "-n",
            NS,
            "-l",
            &format!("app.kubernetes.io/instance={cluster},app.kubernetes.io/component=gateway"),
        ])
        .unwrap();
    let new_pods = pods["items"].as_array().unwrap().iter().any(|p| {
        !running.contains_key(p["metadata"]["name"].as_str().unwrap())
            && !p["metadata"]["deletionTimestamp"].is_string()
    });
    if !new_pods {
        return;
    }
    let config = cp
        .get(&["configmap", &format!("{cluster}-gateway"), "-n", NS])
        .expect("pods exist, so the operator applied the gateways' ConfigMap");
    let secret = cp
        .get(&["secret", &format!("{cluster}-admin"), "-n", NS])
        .expect("the operator made the admin token Secret");
    let token = {
        let b64 = secret["data"]["token"].as_str().unwrap();
        let out = std::process::Command::new("bash")
            .args(["-c", &format!("echo {b64} | base64 -d")])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    for p in pods["items"].as_array().unwrap() {
        let name = p["metadata"]["name"].as_str().unwrap().to_owned();
        if running.contains_key(&name) || p["metadata"]["deletionTimestamp"].is_string() {
            continue;
        }
        assert_eq!(
            p["spec"]["nodeName"], "fake-node",
            "{name} is not scheduled"
        );
        let used: Vec<&str> = running.values().map(|(ip, _)| ip.as_str()).collect();
        let ip = (10..250)
            .map(|n| format!("127.0.0.{n}"))
            .find(|ip| !used.contains(&ip.as_str()))
            .unwrap();
        let mut cmd = std::process::Command::new(BIN);
        cmd.arg("gateway");
        for (k, v) in config["data"].as_object().unwrap() {
            cmd.env(k, v.as_str().unwrap());
        }
        // The pod's own address instead of 0.0.0.0 (every "pod" shares
        // this machine), and the Secret's token as the pod spec maps it.
        cmd.env("RUNCAST_LISTEN", format!("{ip}:{port}"))
            .env("RUNCAST_ADMIN_TOKEN", &token)
            .env("RUNCAST_LOG", "warn")
            .stdin(std::process::Stdio::null());
        let child = Proc(cmd.spawn().expect("start runcast gateway"));
        let ready = wait_for(Duration::from_secs(30), || {
            std::net::TcpStream::connect((ip.as_str(), port)).ok()
        });
        assert!(
            ready.is_some(),
            "gateway for {name} did not listen on {ip}:{port}"
        );
        cp.set_pod_running(NS, &name, &ip);
        running.insert(name, (ip, child));
    }
}

fn condition(rc: &Value, type_: &str) -> Option<(String, String, String)> {
    rc["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_owned(),
                c["reason"].as_str().unwrap_or("").to_owned(),
                c["message"].as_str().unwrap_or("").to_owned(),
            )
        })
}

/// The operator as it runs in the cluster, with the chart's RBAC: it turns
/// the chart's RuncastCluster into a Deployment, whose ReplicaSet's pods
/// the real scheduler binds; with those pods running (real gateways on
/// their podIPs) it reads their load through the admin API and reports it.
/// On 1.20 the PodDisruptionBudget is applied as policy/v1beta1, and the
/// status says so. `helm uninstall` deletes the RuncastCluster, and the
/// garbage collector removes everything the operator made for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_reconciles_the_charts_cluster_with_the_charts_permissions() {
    let nats = runcast_test_support::nats::NatsServer::start().await;
    let cp = ControlPlane::start();
    let release = "rc";
    install_chart(&cp, &nats.url(), &["nats.streamReplicas=1"]);
    let ips: Vec<String> = (10..20).map(|n| format!("127.0.0.{n}")).collect();
    let port = free_port_on(&ips);
    let metrics_port = free_port_on(&["127.0.0.1".to_owned()]);
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let (_op, log) = operator_with(&cp, release, "operator-0", port, None, &metrics_addr);
    let metrics = || scrape(&metrics_addr);

    // Deployment → ReplicaSet → pods bound to the node by the scheduler.
    let bound = wait_for(Duration::from_secs(60), || {
        let d = cp.get(&["deployment", "runcast-gateway", "-n", NS])?;
        let pods = cp.get(&[
            "pods",
            "-n",
            NS,
            "-l",
            "app.kubernetes.io/component=gateway",
        ])?;
        let items = pods["items"].as_array()?;
        (d["spec"]["replicas"] == 2
            && items.len() == 2
            && items.iter().all(|p| p["spec"]["nodeName"] == "fake-node"))
        .then_some(())
    });
    assert!(
        bound.is_some(),
        "no 2 bound gateway pods:\n{}\n{}",
        operator_log(&log),
        cp.logs()
    );

    let mut running = std::collections::BTreeMap::new();
    run_gateway_pods(&cp, "runcast", port, &mut running);

    // Every pod ready and reporting its load through the admin API.
    let status = wait_for(Duration::from_secs(60), || {
        let rc = cp.get(&["runcastcluster", "runcast", "-n", NS])?;
        let ready = condition(&rc, "Ready")?;
        let degraded = condition(&rc, "Degraded")?;
        (rc["status"]["readyReplicas"] == 2 && ready.0 == "True" && degraded.0 == "False")
            .then_some(rc)
    });
    let rc =
        status.unwrap_or_else(|| panic!("the cluster never became Ready:\n{}", operator_log(&log)));
    assert_eq!(
        rc["status"]["pods"].as_array().map(Vec::len),
        Some(2),
        "{rc}"
    );
    assert_eq!(
        rc["status"]["observedGeneration"],
        rc["metadata"]["generation"]
    );
    // 1.20 serves PodDisruptionBudgets only as policy/v1beta1.
    assert!(
        cp.get(&[
            "poddisruptionbudgets.v1beta1.policy",
            "runcast-gateway",
            "-n",
            NS
        ])
        .is_some(),
        "no PodDisruptionBudget:\n{}",
        operator_log(&log)
    );
    let apis = condition(&rc, "APIsAvailable").expect("APIsAvailable condition");
    assert_eq!(apis.0, "True", "{apis:?}");
    let applied = condition(&rc, "Reconciled").expect("Reconciled condition");
    assert_eq!(
        (applied.0.as_str(), applied.1.as_str()),
        ("True", "Applied")
    );
    // Claimed by this operator: the namespace and name of its Lease.
    assert_eq!(rc["status"]["operator"], format!("{NS}/{release}-operator"));
    let series = format!("runcast_operator_replicas{{cluster=\"{NS}/runcast\"}}");
    assert!(metrics().contains(&series), "{}", metrics());

    // A ServiceMonitor asked for on a cluster without the Prometheus
    // Operator's CRDs: said in the status, and the rest still reconciled
    // (the ready pods keep reporting).
    cp.kubectl_ok(&[
        "patch",
        "runcastcluster",
        "runcast",
        "-n",
        NS,
        "--type=merge",
        "-p",
        r#"{"spec":{"observability":{"serviceMonitor":true}}}"#,
    ]);
    let said = wait_for(Duration::from_secs(60), || {
        let rc = cp.get(&["runcastcluster", "runcast", "-n", NS])?;
        let apis = condition(&rc, "APIsAvailable")?;
        (apis.0 == "False" && rc["status"]["observedGeneration"] == rc["metadata"]["generation"])
            .then_some((apis, rc))
    });
    let (apis, rc) =
        said.unwrap_or_else(|| panic!("no APIsAvailable=False:\n{}", operator_log(&log)));
    assert_eq!(apis.1, "NotServed");
    assert!(
        apis.2
            .contains("monitoring.coreos.com/v1 ServiceMonitor is not served"),
        "{apis:?}"
    );
    assert_eq!(condition(&rc, "Ready").unwrap().0, "True", "{rc}");

    // The chart's RBAC refused nothing the operator asked for.
    let text = operator_log(&log);
    assert!(
        !text.contains("forbidden") && !text.contains("Forbidden"),
        "the API server refused the operator something:\n{text}"
    );

    // Uninstall deletes the RuncastCluster; the garbage collector deletes
    // what the operator made for it (owner references).
    let out = cp.helm(&["uninstall", release, "-n", NS]);
    assert!(
        out.status.success(),
        "helm uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let owned = [
        ("deployment", "runcast-gateway"),
        ("service", "runcast"),
        ("configmap", "runcast-gateway"),
        ("secret", "runcast-admin"),
        ("poddisruptionbudgets.v1beta1.policy", "runcast-gateway"),
    ];
    let gone = wait_for(Duration::from_secs(60), || {
        reap_terminating_pods(&cp, NS);
        let left: Vec<_> = owned
            .iter()
            .filter(|(r, n)| cp.get(&[r, n, "-n", NS]).is_some())
            .collect();
        let pods = cp.get(&["pods", "-n", NS])?;
        (left.is_empty() && pods["items"].as_array()?.is_empty()).then_some(())
    });
    assert!(
        gone.is_some(),
        "the operator's objects outlived their cluster:\n{}",
        cp.logs()
    );
    // The chart's Lease went with the release, and the operator (still
    // running here, as a pod in its grace period would) did not make it
    // again; nor does it go on reporting the deleted cluster.
    let after = wait_for(Duration::from_secs(30), || {
        (!metrics().contains(&series)).then_some(())
    });
    assert!(
        after.is_some(),
        "a deleted cluster's series stayed:\n{}",
        metrics()
    );
    assert!(
        cp.get(&["lease", &format!("{release}-operator"), "-n", NS])
            .is_none(),
        "the leader Lease outlived the release:\n{}",
        operator_log(&log)
    );
}

/// ServiceMonitor and PrometheusRule CRDs as the Prometheus Operator
/// installs them, reduced to what the API server needs to serve them.
fn monitoring_crds() -> String {
    let crd = |kind: &str, plural: &str| {
        format!(
            "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {{name: {plural}.monitoring.coreos.com}}\nspec:\n  group: monitoring.coreos.com\n  scope: Namespaced\n  names: {{kind: {kind}, plural: {plural}, listKind: {kind}List, singular: {}}}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}\n",
            kind.to_lowercase()
        )
    };
    format!(
        "{}---\n{}",
        crd("ServiceMonitor", "servicemonitors"),
        crd("PrometheusRule", "prometheusrules")
    )
}

fn patch_cluster(cp: &ControlPlane, patch: &str) -> std::process::Output {
    cp.kubectl(&[
        "patch",
        "runcastcluster",
        "runcast",
        "-n",
        NS,
        "--type=merge",
        "-p",
        patch,
    ])
}

/// Waits until the operator has reconciled the cluster's current spec.
fn reconciled(cp: &ControlPlane, log: &std::path::Path) -> Value {
    wait_for(Duration::from_secs(60), || {
        let rc = cp.get(&["runcastcluster", "runcast", "-n", NS])?;
        (rc["status"]["observedGeneration"] == rc["metadata"]["generation"]).then_some(rc)
    })
    .unwrap_or_else(|| {
        panic!(
            "the operator did not reconcile the new spec:\n{}",
            operator_log(log)
        )
    })
}

/// Spec changes against the real API server, with the chart's RBAC: a new
/// image or config rolls the Deployment (a new ReplicaSet); an Ingress,
/// ServiceMonitor and PrometheusRule appear when asked for and are deleted
/// when turned off (server-side apply alone leaves them behind); the CRD's
/// schema refuses what it can, and a spec it cannot refuse (min above max)
/// is refused in the status, without a crash loop and without touching
/// what runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_changes_roll_the_fleet_and_turned_off_objects_are_deleted() {
    let cp = ControlPlane::start();
    cp.apply(&monitoring_crds());
    for crd in [
        "servicemonitors.monitoring.coreos.com",
        "prometheusrules.monitoring.coreos.com",
    ] {
        assert!(
            wait_for(Duration::from_secs(30), || established(&cp, crd)
                .then_some(()))
            .is_some(),
            "{crd} not Established"
        );
    }
    install_chart(&cp, "nats://127.0.0.1:4222", &[]);
    let (_op, log) = operator(&cp, "rc", "operator-0", 18080);
    reconciled(&cp, &log);
    let template = |cp: &ControlPlane| {
        let d = cp
            .get(&["deployment", "runcast-gateway", "-n", NS])
            .unwrap();
        (
            d["spec"]["template"]["metadata"]["annotations"]["runcast.dev/config-hash"].clone(),
            d["spec"]["template"]["spec"]["containers"][0]["image"].clone(),
        )
    };
    let replicasets = |cp: &ControlPlane| {
        cp.get(&[
            "replicasets",
            "-n",
            NS,
            "-l",
            "app.kubernetes.io/component=gateway",
        ])
        .and_then(|l| l["items"].as_array().map(Vec::len))
        .unwrap_or(0)
    };
    let (hash0, _) = template(&cp);
    assert!(hash0.is_string());
    assert!(
        wait_for(Duration::from_secs(30), || (replicasets(&cp) == 1)
            .then_some(()))
        .is_some(),
        "no ReplicaSet for the gateways"
    );

    // Config and image changes roll the pods: a new ReplicaSet each.
    let out = patch_cluster(
        &cp,
        r#"{"spec":{"gateway":{"env":{"RUNCAST_MAX_CONNECTIONS":"1234"}}}}"#,
    );
    assert!(out.status.success());
    reconciled(&cp, &log);
    let (hash1, _) = template(&cp);
    assert_ne!(hash0, hash1, "a config change must change the pod template");
    let out = patch_cluster(
        &cp,
        r#"{"spec":{"gateway":{"image":"registry.example/runcast:next"}}}"#,
    );
    assert!(out.status.success());
    reconciled(&cp, &log);
    assert_eq!(template(&cp).1, "registry.example/runcast:next");
    assert!(
        wait_for(Duration::from_secs(30), || (replicasets(&cp) == 3)
            .then_some(()))
        .is_some(),
        "each change is a rollout: {} ReplicaSets",
        replicasets(&cp)
    );

    // Where and how the pods run: the pod spec's own fields, passed
    // through (the real API server validates them against the CRD's
    // schema, and the scheduler still places the pods).
    let placement = r#"{"spec":{"gateway":{
        "imagePullSecrets":[{"name":"registry-creds"}],
        "nodeSelector":{"kubernetes.io/os":"linux"},
        "tolerations":[{"key":"dedicated","operator":"Equal","value":"runcast","effect":"NoSchedule"}],
        "topologySpreadConstraints":[{"maxSkew":1,"topologyKey":"kubernetes.io/hostname","whenUnsatisfiable":"ScheduleAnyway","labelSelector":{"matchLabels":{"app.kubernetes.io/component":"gateway"}}}],
        "podSecurityContext":{"runAsNonRoot":true,"runAsUser":10001,"fsGroup":10001},
        "priorityClassName":"runcast-gateways"}}}"#;
    cp.apply("apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {name: runcast-gateways}\nvalue: 1000\n");
    let out = patch_cluster(&cp, placement);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    reconciled(&cp, &log);
    let d = cp
        .get(&["deployment", "runcast-gateway", "-n", NS])
        .unwrap();
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(
        pod["imagePullSecrets"][0]["name"], "registry-creds",
        "{pod}"
    );
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(pod["tolerations"][0]["key"], "dedicated");
    assert_eq!(pod["topologySpreadConstraints"][0]["maxSkew"], 1);
    assert_eq!(pod["securityContext"]["runAsUser"], 10001);
    assert_eq!(pod["priorityClassName"], "runcast-gateways");
    let scheduled = wait_for(Duration::from_secs(30), || {
        let pods = cp.get(&[
            "pods",
            "-n",
            NS,
            "-l",
            "app.kubernetes.io/component=gateway",
        ])?;
        pods["items"]
            .as_array()?
            .iter()
            .any(|p| {
                p["spec"]["priorityClassName"] == "runcast-gateways"
                    && p["spec"]["nodeName"] == "fake-node"
            })
            .then_some(())
    });
    assert!(
        scheduled.is_some(),
        "no pod of the new template was scheduled:\n{}",
        cp.logs()
    );

    // Optional objects: on, then off.
    let on = r#"{"spec":{"ingress":{"host":"progress.example.com","className":"nginx"},"observability":{"serviceMonitor":true,"prometheusRule":true}}}"#;
    assert!(patch_cluster(&cp, on).status.success());
    let optional = [
        ("ingresses.v1.networking.k8s.io", "runcast"),
        ("servicemonitors.v1.monitoring.coreos.com", "runcast"),
        ("prometheusrules.v1.monitoring.coreos.com", "runcast"),
    ];
    let made = wait_for(Duration::from_secs(90), || {
        optional
            .iter()
            .all(|(r, n)| cp.get(&[r, n, "-n", NS]).is_some())
            .then_some(())
    });
    assert!(
        made.is_some(),
        "optional objects not created:\n{}",
        operator_log(&log)
    );
    let rc = reconciled(&cp, &log);
    assert_eq!(condition(&rc, "APIsAvailable").unwrap().0, "True", "{rc}");
    let off = r#"{"spec":{"ingress":null,"observability":{"serviceMonitor":false,"prometheusRule":false}}}"#;
    assert!(patch_cluster(&cp, off).status.success());
    let gone = wait_for(Duration::from_secs(60), || {
        optional
            .iter()
            .all(|(r, n)| cp.get(&[r, n, "-n", NS]).is_none())
            .then_some(())
    });
    assert!(
        gone.is_some(),
        "turned-off objects left behind:\n{}",
        operator_log(&log)
    );

    // The CRD's schema refuses a minimum of 0 at the API server.
    let out = patch_cluster(&cp, r#"{"spec":{"replicas":{"min":0,"max":3}}}"#);
    assert!(!out.status.success(), "replicas.min 0 was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.replicas.min"), "{err}");
    // min above max passes the schema; the operator refuses it.
    let before = template(&cp);
    let replicas = |cp: &ControlPlane| {
        cp.get(&["deployment", "runcast-gateway", "-n", NS])
            .unwrap()["spec"]["replicas"]
            .clone()
    };
    let size = replicas(&cp);
    assert!(
        patch_cluster(&cp, r#"{"spec":{"replicas":{"min":5,"max":2}}}"#)
            .status
            .success()
    );
    let refused = wait_for(Duration::from_secs(60), || {
        let rc = cp.get(&["runcastcluster", "runcast", "-n", NS])?;
        condition(&rc, "Ready").filter(|c| c.1 == "InvalidSpec")
    });
    let refused =
        refused.unwrap_or_else(|| panic!("no InvalidSpec condition:\n{}", operator_log(&log)));
    assert!(refused.2.contains("replicas.min"), "{refused:?}");
    assert_eq!(
        (template(&cp), replicas(&cp)),
        (before, size),
        "an invalid spec changed the fleet"
    );
    // Fixed, it is reconciled again: the operator did not crash or give up.
    assert!(
        patch_cluster(&cp, r#"{"spec":{"replicas":{"min":3,"max":6}}}"#)
            .status
            .success()
    );
    reconciled(&cp, &log);
    let grown = wait_for(Duration::from_secs(30), || {
        (replicas(&cp) == 3).then_some(())
    });
    assert!(
        grown.is_some(),
        "the fixed spec was not applied:\n{}",
        operator_log(&log)
    );

    // The schema's bounds (an outside tester's values, each accepted
    // before and then read by nobody, or stopping every list).
    for bad in [
        r#"{"spec":{"drain":{"rate":0}}}"#,
        r#"{"spec":{"drain":{"gracePeriodSeconds":-5}}}"#,
        r#"{"spec":{"nats":{"streamReplicas":7}}}"#,
        r#"{"spec":{"scaling":{"connectionsPerPod":99999999999999999}}}"#,
        r#"{"spec":{"nats":{"streamReplicas":4}}}"#,
        r#"{"spec":{"observability":{"traceSampleRatio":5}}}"#,
        // int32 in the pod spec types, unbounded there: once stored, the
        // operator could not read the cluster and skipped it silently.
        r#"{"spec":{"gateway":{"topologySpreadConstraints":[{"maxSkew":3000000000,"topologyKey":"k","whenUnsatisfiable":"DoNotSchedule"}]}}}"#,
    ] {
        let out = patch_cluster(&cp, bad);
        assert!(!out.status.success(), "accepted: {bad}");
    }

    // gateway.env may not undo what the operator sets: refused in the
    // status, naming the key and the spec field to use.
    let before = (template(&cp), replicas(&cp));
    assert!(
        patch_cluster(
            &cp,
            r#"{"spec":{"gateway":{"env":{"RUNCAST_LISTEN":"0.0.0.0:9999"}}}}"#
        )
        .status
        .success()
    );
    let refused = wait_for(Duration::from_secs(60), || {
        let rc = cp.get(&["runcastcluster", "runcast", "-n", NS])?;
        condition(&rc, "Ready").filter(|c| c.1 == "InvalidSpec")
    })
    .unwrap_or_else(|| {
        panic!(
            "RUNCAST_LISTEN in gateway.env was not refused:\n{}",
            operator_log(&log)
        )
    });
    assert!(refused.2.contains("RUNCAST_LISTEN"), "{refused:?}");
    assert_eq!((template(&cp), replicas(&cp)), before);
    assert!(
        patch_cluster(
            &cp,
            r#"{"spec":{"gateway":{"env":{"RUNCAST_LISTEN":null}}}}"#
        )
        .status
        .success()
    );
    reconciled(&cp, &log);

    // A spec the CRD's schema accepts but the API server refuses to turn
    // into a Deployment (a node selector key that is no label key): the
    // API server's words reach the status, as Reconciled=False.
    assert!(
        patch_cluster(
            &cp,
            r#"{"spec":{"gateway":{"nodeSelector":{"not a label!":"x"}}}}"#
        )
        .status
        .success()
    );
    let failed = wait_for(Duration::from_secs(60), || {
        let rc = cp.get(&["runcastcluster", "runcast", "-n", NS])?;
        condition(&rc, "Reconciled").filter(|c| c.0 == "False")
    })
    .unwrap_or_else(|| {
        panic!(
            "the refused apply never reached the status:\n{}",
            operator_log(&log)
        )
    });
    assert_eq!(failed.1, "KubernetesAPIError");
    assert!(failed.2.contains("nodeSelector"), "{failed:?}");
    assert!(
        patch_cluster(
            &cp,
            r#"{"spec":{"gateway":{"nodeSelector":{"not a label!":null}}}}"#
        )
        .status
        .success()
    );
    let mended = wait_for(Duration::from_secs(60), || {
        let rc = cp.get(&["runcastcluster", "runcast", "-n", NS])?;
        condition(&rc, "Reconciled").filter(|c| c.0 == "True")
    });
    assert!(
        mended.is_some(),
        "Reconciled stayed False:\n{}",
        operator_log(&log)
    );

    // The admin token Secret deleted: the operator makes a new token, and
    // the pods must roll to it (they read it when they start), or every
    // stats request carries a token the running gateways refuse.
    let (hash_before, _) = template(&cp);
    cp.kubectl_ok(&["delete", "secret", "runcast-admin", "-n", NS]);
    let rolled = wait_for(Duration::from_secs(60), || {
        cp.get(&["secret", "runcast-admin", "-n", NS])?;
        let (hash, _) = template(&cp);
        (hash != hash_before).then_some(())
    });
    assert!(
        rolled.is_some(),
        "a new admin token did not change the pod template:\n{}",
        operator_log(&log)
    );

    let text = operator_log(&log);
    assert!(
        !text.contains("orbidden"),
        "the chart's RBAC refused the operator:\n{text}"
    );
}

/// Leader election on a real Lease: of two operator processes (each with
/// the chart's ServiceAccount token) one leads; `kill -9` of it, and the
/// other takes the Lease once it expires (6 s here, renewed every 2 s, so
/// within 6-8 s of the kill) and reconciles: a spec change made after the
/// kill is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_within_the_lease_duration() {
    let cp = ControlPlane::start();
    install_chart(&cp, "nats://127.0.0.1:4222", &[]);
    let (a, log_a) = operator(&cp, "rc", "operator-a", 18080);
    let (b, log_b) = operator(&cp, "rc", "operator-b", 18080);
    let holder = |cp: &ControlPlane| {
        let l = cp.get(&["lease", "rc-operator", "-n", NS])?;
        Some((
            l["spec"]["holderIdentity"].as_str()?.to_owned(),
            l["spec"]["leaseTransitions"].as_i64().unwrap_or(0),
        ))
    };
    let (first, transitions) =
        wait_for(Duration::from_secs(30), || holder(&cp)).expect("nobody took the Lease");
    reconciled(&cp, &log_a);
    let mut procs = std::collections::HashMap::from([("operator-a", a), ("operator-b", b)]);
    let other = if first == "operator-a" {
        "operator-b"
    } else {
        "operator-a"
    };
    // The follower does not act: only the leader says it leads.
    let (leader_log, follower_log) = if first == "operator-a" {
        (&log_a, &log_b)
    } else {
        (&log_b, &log_a)
    };
    assert!(operator_log(leader_log).contains("leading"));
    assert!(
        !operator_log(follower_log).contains("leading"),
        "two leaders"
    );

    let killed = std::time::Instant::now();
    drop(procs.remove(first.as_str()).unwrap()); // kill -9, by PID
    assert!(
        patch_cluster(&cp, r#"{"spec":{"replicas":{"min":3,"max":6}}}"#)
            .status
            .success()
    );
    let took = wait_for(Duration::from_secs(30), || {
        holder(&cp)
            .filter(|(h, _)| h == other)
            .map(|(_, t)| (killed.elapsed(), t))
    });
    let (after, t) = took.unwrap_or_else(|| {
        panic!(
            "{other} never took the Lease:\n{}",
            operator_log(follower_log)
        )
    });
    eprintln!(
        "leader election: {other} took the Lease {} ms after {first} was killed",
        after.as_millis()
    );
    assert_eq!(t, transitions + 1, "one transition");
    assert!(
        after <= Duration::from_secs(8) + Duration::from_millis(500),
        "took {after:?}"
    );
    let grown = wait_for(Duration::from_secs(30), || {
        let d = cp.get(&["deployment", "runcast-gateway", "-n", NS])?;
        (d["spec"]["replicas"] == 3).then_some(())
    });
    assert!(
        grown.is_some(),
        "the new leader did not reconcile:\n{}",
        operator_log(follower_log)
    );

    // A second operator, on a Lease of its own (another release, say,
    // watching the same namespace): it leaves the cluster to the operator
    // named in its status while that one's Lease is held, and takes it
    // over once that Lease expires.
    let (_c, log_c) = operator_with(
        &cp,
        "rc",
        "elsewhere-0",
        18080,
        Some("elsewhere"),
        "127.0.0.1:0",
    );
    let left = wait_for(Duration::from_secs(30), || {
        operator_log(&log_c)
            .contains("another operator reconciles this cluster")
            .then_some(())
    });
    assert!(
        left.is_some(),
        "no word of leaving it:\n{}",
        operator_log(&log_c)
    );
    let claimed = |cp: &ControlPlane| {
        cp.get(&["runcastcluster", "runcast", "-n", NS])
            .and_then(|rc| rc["status"]["operator"].as_str().map(str::to_owned))
    };
    assert_eq!(
        claimed(&cp).as_deref(),
        Some(format!("{NS}/rc-operator").as_str())
    );
    let ignored = wait_for(Duration::from_secs(12), || {
        (claimed(&cp).as_deref() != Some(format!("{NS}/rc-operator").as_str())).then_some(())
    });
    assert!(
        ignored.is_none(),
        "the second operator took a cluster whose operator runs"
    );
    drop(procs.remove(other)); // the first operator is gone altogether
    assert!(
        patch_cluster(&cp, r#"{"spec":{"replicas":{"min":4,"max":6}}}"#)
            .status
            .success()
    );
    let taken = wait_for(Duration::from_secs(40), || {
        let d = cp.get(&["deployment", "runcast-gateway", "-n", NS])?;
        (claimed(&cp).as_deref() == Some(format!("{NS}/elsewhere").as_str())
            && d["spec"]["replicas"] == 4)
            .then_some(())
    });
    assert!(
        taken.is_some(),
        "the second operator did not take the orphaned cluster over:\n{}",
        operator_log(&log_c)
    );
}

/// The kubelet's part for the gateway pods, in a loop: starts a real
/// gateway for each new pod (`run_gateway_pods`), mirrors each gateway's
/// `/readyz` into its pod's Ready condition (the readiness probe), and for a
/// pod marked for deletion sends its process SIGTERM, waits for it to exit
/// and confirms the deletion. What it sees is shared with the test: the
/// ready endpoints (what a Service would route to) and the pods it deleted.
struct Kubelet {
    endpoints: std::sync::Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
    deleted: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Kubelet {
    fn start(cp: std::sync::Arc<ControlPlane>, port: u16) -> Self {
        use std::sync::{Arc, Mutex, atomic::AtomicBool};
        let endpoints = Arc::new(Mutex::new(Vec::new()));
        let deleted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (e, d, s) = (endpoints.clone(), deleted.clone(), stop.clone());
        let task = tokio::task::spawn_blocking(move || {
            let mut running = std::collections::BTreeMap::new();
            let mut ready_seen: std::collections::HashMap<String, bool> = Default::default();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                run_gateway_pods(&cp, "runcast", port, &mut running);
                let pods = cp
                    .get(&[
                        "pods",
                        "-n",
                        NS,
                        "-l",
                        "app.kubernetes.io/component=gateway",
                    ])
                    .unwrap();
                let mut ready_addrs = Vec::new();
                for p in pods["items"].as_array().unwrap() {
                    let name = p["metadata"]["name"].as_str().unwrap().to_owned();
                    let Some((ip, _)) = running.get(&name) else {
                        continue;
                    };
                    let ip = ip.clone();
                    if p["metadata"]["deletionTimestamp"].is_string() {
                        let (_, mut proc_) = running.remove(&name).unwrap();
                        let pid = proc_.0.id().to_string();
                        let _ = std::process::Command::new("kill")
                            .args(["-TERM", &pid])
                            .status();
                        let exited = wait_for(Duration::from_secs(20), || {
                            proc_.0.try_wait().ok().flatten()
                        });
                        assert!(exited.is_some(), "gateway of {name} ignored SIGTERM");
                        let _ = cp.kubectl(&[
                            "delete",
                            "pod",
                            &name,
                            "-n",
                            NS,
                            "--grace-period=0",
                            "--force",
                        ]);
                        d.lock().unwrap().push(name);
                        continue;
                    }
                    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
                    let ready = std::process::Command::new("curl")
                        .args(["-fsS", "-o", "/dev/null", "--max-time", "1"])
                        .arg(format!("http://{addr}/readyz"))
                        .stderr(std::process::Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success());
                    if ready_seen.get(&name) != Some(&ready) {
                        cp.set_pod_status(NS, &name, &ip, ready);
                        ready_seen.insert(name, ready);
                    }
                    if ready {
                        ready_addrs.push(addr);
                    }
                }
                *e.lock().unwrap() = ready_addrs;
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        Self {
            endpoints,
            deleted,
            stop,
            task: Some(task),
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A client behind a Service: connects to one of the ready endpoints
/// (round robin, as kube-proxy spreads connections), follows `run` from
/// its cursor, and on a close (a drain or rebalance hint, 1001) connects
/// again and resumes. Returns every seq received, in order, at `complete`.
async fn service_client(
    run: String,
    endpoints: std::sync::Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
    pick: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> (Vec<u64>, usize) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut seqs, mut moves) = (Vec::<u64>::new(), 0usize);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{run}: never completed"
        );
        let addr = {
            let e = endpoints.lock().unwrap();
            if e.is_empty() {
                None
            } else {
                Some(e[pick.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % e.len()])
            }
        };
        let Some(addr) = addr else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws")),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut sub = serde_json::json!({"type": "subscribe", "run": run, "since": 0});
        if let Some(s) = seqs.last() {
            sub["since"] = (*s).into();
        }
        if ws
            .send(Message::Text(sub.to_string().into()))
            .await
            .is_err()
        {
            continue;
        }
        while let Some(Ok(m)) = ws.next().await {
            let Message::Text(t) = m else { continue };
            let f: Value = serde_json::from_str(&t).unwrap();
            match f["type"].as_str() {
                Some("event") => {
                    seqs.push(f["seq"].as_u64().unwrap());
                    if f["kind"] == "complete" {
                        return (seqs, moves);
                    }
                }
                Some("error" | "gap") => panic!("{run}: {f}"),
                _ => {}
            }
        }
        moves += 1;
    }
}

/// Publishes one event to `run` through any ready gateway's HTTP API (a
/// draining one answers 503 and the next is tried); returns its seq.
async fn publish_via_service(
    run: &str,
    kind: &str,
    endpoints: &std::sync::Mutex<Vec<std::net::SocketAddr>>,
) -> u64 {
    for attempt in 0..100 {
        let addrs = endpoints.lock().unwrap().clone();
        if !addrs.is_empty() {
            let addr = addrs[attempt % addrs.len()];
            let body = serde_json::json!({"kind": kind, "data": {"n": attempt}}).to_string();
            let (status, _, text) = runcast_test_support::http(
                addr,
                "POST",
                &format!("/v1/runs/{run}/events"),
                &[],
                body,
            )
            .await;
            if status == 200 {
                let v: Value = serde_json::from_str(&text).unwrap();
                return v["seqs"][0]
                    .as_u64()
                    .or(v["seq"].as_u64())
                    .unwrap_or_else(|| panic!("{text}"));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no gateway took an event for {run}");
}

/// Scaling with real objects: load on two gateway pods makes the operator
/// add a third; the ReplicaSet's new pod is bound, started and rebalanced
/// onto. When the load goes, the operator drains the least-loaded pod and
/// lowers the Deployment; the ReplicaSet controller removes exactly that
/// pod. Clients behind a "Service" follow every move and lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_scales_the_fleet_up_and_down_and_no_client_loses_an_event() {
    use std::sync::{Arc, atomic::AtomicUsize};
    let nats = runcast_test_support::nats::NatsServer::start().await;
    let cp = Arc::new(ControlPlane::start());
    install_chart(
        &cp,
        &nats.url(),
        &[
            "nats.streamReplicas=1",
            "cluster.replicas.min=2",
            "cluster.replicas.max=3",
            "cluster.scaling.connectionsPerPod=40",
            "cluster.scaling.scaleUpStabilizationSeconds=0",
            "cluster.scaling.scaleDownStabilizationSeconds=0",
            "cluster.drain.rate=50",
            "cluster.drain.jitterMs=200",
            "cluster.drain.gracePeriodSeconds=15",
            "cluster.auth.allowAnonymousPublish=true",
        ],
    );
    let ips: Vec<String> = (10..20).map(|n| format!("127.0.0.{n}")).collect();
    let port = free_port_on(&ips);
    let (_op, log) = operator(&cp, "rc", "operator-0", port);
    let kubelet = Kubelet::start(cp.clone(), port);
    let two = wait_for(Duration::from_secs(60), || {
        (kubelet.endpoints.lock().unwrap().len() == 2).then_some(())
    });
    assert!(
        two.is_some(),
        "2 gateway pods never ran:\n{}",
        operator_log(&log)
    );

    // 120 clients on 6 runs: 60 per pod, 40 is the target.
    let pick = Arc::new(AtomicUsize::new(0));
    let runs: Vec<String> = (0..6).map(|r| format!("scale-{r}")).collect();
    let mut clients = Vec::new();
    for i in 0..120 {
        let run = runs[i % runs.len()].clone();
        clients.push(tokio::spawn(service_client(
            run,
            kubelet.endpoints.clone(),
            pick.clone(),
        )));
    }
    let publisher = {
        let (runs, endpoints) = (runs.clone(), kubelet.endpoints.clone());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut published: std::collections::HashMap<String, Vec<u64>> = Default::default();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                for run in &runs {
                    let seq = publish_via_service(run, "progress", &endpoints).await;
                    published.entry(run.clone()).or_default().push(seq);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            published
        });
        (stop, task)
    };

    // Up: a third pod, and clients moved onto it.
    let status = |cp: &ControlPlane| cp.get(&["runcastcluster", "runcast", "-n", NS]).unwrap();
    let rebalanced = wait_for(Duration::from_secs(120), || {
        let rc = status(&cp);
        let pods = rc["status"]["pods"].as_array()?.clone();
        (pods.len() == 3
            && pods
                .iter()
                .all(|p| p["connections"].as_u64().unwrap_or(0) >= 25))
        .then_some(pods)
    });
    let pods = rebalanced.unwrap_or_else(|| {
        panic!(
            "no rebalance onto a third pod: {}\n{}",
            status(&cp)["status"],
            operator_log(&log)
        )
    });
    eprintln!("scaled up and rebalanced: {pods:?}");

    // Down: two thirds of the clients finish; 40 connections fit in one
    // pod, but min is 2, so one pod is drained and removed.
    let (stop, task) = publisher;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut published = task.await.unwrap();
    for run in &runs[..4] {
        let seq = publish_via_service(run, "complete", &kubelet.endpoints).await;
        published.get_mut(run).unwrap().push(seq);
    }
    let before: Vec<String> = cp
        .get(&[
            "pods",
            "-n",
            NS,
            "-l",
            "app.kubernetes.io/component=gateway",
        ])
        .unwrap()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    // Which pods the operator marks (deletion cost) before it drains.
    let mut marked = std::collections::BTreeSet::new();
    let removed = wait_for(Duration::from_secs(120), || {
        for p in cp.get(&[
            "pods",
            "-n",
            NS,
            "-l",
            "app.kubernetes.io/component=gateway",
        ])?["items"]
            .as_array()?
        {
            if p["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"]
                .is_string()
            {
                marked.insert(p["metadata"]["name"].as_str()?.to_owned());
            }
        }
        let d = cp.get(&["deployment", "runcast-gateway", "-n", NS])?;
        let deleted = kubelet.deleted.lock().unwrap().clone();
        (d["spec"]["replicas"] == 2 && deleted.len() == 1).then_some(deleted)
    });
    let removed = removed.unwrap_or_else(|| {
        panic!(
            "no scale-down to 2: {}\n{}",
            status(&cp)["status"],
            operator_log(&log)
        )
    });
    assert_eq!(
        marked.iter().cloned().collect::<Vec<_>>(),
        removed,
        "the ReplicaSet removed another pod than the one the operator drained"
    );
    let text = operator_log(&log);
    assert!(text.contains("scaling"), "{text}");
    let still: Vec<String> = cp
        .get(&[
            "pods",
            "-n",
            NS,
            "-l",
            "app.kubernetes.io/component=gateway",
        ])
        .unwrap()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(still.len(), 2, "{still:?}");
    assert!(before.contains(&removed[0]) && !still.contains(&removed[0]));
    for p in &still {
        let pod = cp.get(&["pod", p, "-n", NS]).unwrap();
        assert!(
            pod["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"].is_null(),
            "a pod marked for removal was kept: {p}"
        );
    }
    eprintln!("scaled down: removed {removed:?}, kept {still:?}");

    // The rest finish; every client got every event of its run once, in order.
    for run in &runs[4..] {
        let seq = publish_via_service(run, "complete", &kubelet.endpoints).await;
        published.get_mut(run).unwrap().push(seq);
    }
    let mut moves = 0;
    for (i, c) in clients.into_iter().enumerate() {
        let run = &runs[i % runs.len()];
        let (seqs, m) = tokio::time::timeout(Duration::from_secs(120), c)
            .await
            .unwrap()
            .unwrap();
        moves += m;
        assert_eq!(&seqs, &published[run], "client {i} of {run}");
    }
    eprintln!("120 clients, {moves} moves between pods, no event lost or repeated");
    assert!(
        moves >= 10,
        "the rebalance and the drain moved only {moves} clients"
    );
}
