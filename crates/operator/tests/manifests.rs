//! What users install: the Helm chart (linted and rendered with its default
//! values and every value set in `charts/runcast/ci/`), the plain manifests
//! in `k8s/` (kustomize base and dev overlay), and the CRD in both, which
//! must be exactly what `runcast crdgen` generates. Every rendered object
//! must parse as its Kubernetes type with no field the type does not know.
//!
//! helm and kubectl come from `scripts/k8s-tools.sh` (the test command runs
//! it); these tests fail, rather than skip, without them.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, StatefulSet},
        core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use runcast_operator::crd::RuncastCluster;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(p)
}

fn tool(name: &str) -> PathBuf {
    let local = repo("target/tools/bin").join(name);
    if local.exists() {
        return local;
    }
    which(name).unwrap_or_else(|| {
        panic!("{name} not found: run `bash scripts/k8s-tools.sh` (the test command does)")
    })
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("bad YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// Every key of `orig` survives a round trip through the typed object: a
/// key the type does not know (a typo, a misplaced field) is dropped by
/// deserialization and shows up here.
fn same_fields(orig: &Value, typed: &Value, path: &str) -> Result<(), String> {
    match (orig, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let empty = v.is_null()
                    || v.as_object().is_some_and(|o| o.is_empty())
                    || v.as_array().is_some_and(|o| o.is_empty());
                match b.get(k) {
                    Some(w) => same_fields(v, w, &format!("{path}.{k}"))?,
                    None if empty => {}
                    None => return Err(format!("unknown field {path}.{k}")),
                }
            }
            Ok(())
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .try_for_each(|(i, (x, y))| same_fields(x, y, &format!("{path}[{i}]"))),
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => Ok(()),
        (a, b) if a == b => Ok(()),
        (a, b) => Err(format!("{path}: {a} became {b}")),
    }
}

fn strict<T: DeserializeOwned + Serialize>(v: &Value) -> Result<(), String> {
    let typed: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    same_fields(v, &serde_json::to_value(&typed).unwrap(), "")
}

/// Parses one rendered object as its type; returns its kind.
fn check(v: &Value) -> String {
    let kind = v["kind"].as_str().unwrap_or("").to_owned();
    let api = v["apiVersion"].as_str().unwrap_or("");
    let r = match (api, kind.as_str()) {
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            strict::<CustomResourceDefinition>(v)
        }
        ("v1", "Namespace") => strict::<Namespace>(v),
        ("v1", "ConfigMap") => strict::<ConfigMap>(v),
        ("v1", "Service") => strict::<Service>(v),
        ("v1", "ServiceAccount") => strict::<ServiceAccount>(v),
        ("apps/v1", "Deployment") => strict::<Deployment>(v),
        ("apps/v1", "StatefulSet") => strict::<StatefulSet>(v),
        ("policy/v1", "PodDisruptionBudget") => strict::<PodDisruptionBudget>(v),
        ("networking.k8s.io/v1", "NetworkPolicy") => strict::<NetworkPolicy>(v),
        ("rbac.authorization.k8s.io/v1", "Role") => strict::<Role>(v),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => strict::<RoleBinding>(v),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => strict::<ClusterRole>(v),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => strict::<ClusterRoleBinding>(v),
        ("runcast.dev/v1alpha1", "RuncastCluster") => strict::<RuncastCluster>(v),
        ("coordination.k8s.io/v1", "Lease") => {
            strict::<k8s_openapi::api::coordination::v1::Lease>(v)
        }
        // The Prometheus Operator's type, not in k8s-openapi: the fields the
        // chart sets, checked by hand (the real API server accepts it in
        // cli/tests/kubernetes.rs).
        ("monitoring.coreos.com/v1", "ServiceMonitor") => {
            let e = &v["spec"]["endpoints"][0];
            if v["spec"]["selector"]["matchLabels"].is_object() && e["port"].is_string() {
                Ok(())
            } else {
                Err(format!(
                    "ServiceMonitor without a selector or endpoint port: {v}"
                ))
            }
        }
        other => Err(format!("no type for {other:?}")),
    };
    if let Err(e) = r {
        panic!("{kind} {}: {e}", v["metadata"]["name"]);
    }
    kind
}

fn helm_template(values: Option<&Path>) -> Vec<Value> {
    let mut cmd = Command::new(tool("helm"));
    cmd.args(["template", "runcast"])
        .arg(repo("charts/runcast"))
        .args(["--namespace", "runcast", "--include-crds"]);
    if let Some(v) = values {
        cmd.arg("-f").arg(v);
    }
    docs(&run(&mut cmd))
}

fn value_sets() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo("charts/runcast/ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    assert!(v.len() >= 3, "three value sets besides the defaults");
    v
}

#[test]
fn the_committed_crds_are_what_crdgen_generates() {
    let generated = runcast_operator::crd_yaml();
    let chart = std::fs::read_to_string(repo("charts/runcast/crds/runcastcluster.yaml")).unwrap();
    assert!(
        chart == generated,
        "charts/runcast/crds/runcastcluster.yaml is stale: run `runcast crdgen > charts/runcast/crds/runcastcluster.yaml` and `bash scripts/render-k8s.sh`"
    );
    let base = std::fs::read_to_string(repo("k8s/base/runcast.yaml")).unwrap();
    let crd = docs(&base)
        .into_iter()
        .find(|d| d["kind"] == "CustomResourceDefinition")
        .expect("k8s/base has the CRD");
    assert_eq!(
        crd,
        docs(&generated)[0],
        "k8s/base's CRD is stale: run scripts/render-k8s.sh"
    );
    check(&crd);
}

#[test]
fn the_chart_lints_and_renders_typed_objects_with_every_value_set() {
    let chart = repo("charts/runcast");
    run(Command::new(tool("helm")).arg("lint").arg(&chart));
    for values in value_sets() {
        run(Command::new(tool("helm"))
            .arg("lint")
            .arg(&chart)
            .arg("-f")
            .arg(&values));
    }

    let default = helm_template(None);
    let kinds: Vec<String> = default.iter().map(check).collect();
    for k in [
        "CustomResourceDefinition",
        "Deployment",
        "StatefulSet",
        "RuncastCluster",
        "NetworkPolicy",
        "Role",
    ] {
        assert!(
            kinds.iter().any(|x| x == k),
            "defaults render a {k}: {kinds:?}"
        );
    }
    let rc = default
        .iter()
        .find(|d| d["kind"] == "RuncastCluster")
        .unwrap();
    assert!(
        rc["spec"]["nats"]["url"]
            .as_str()
            .unwrap()
            .contains("runcast-nats-0.runcast-nats-headless:4222")
    );
    let workers = default
        .iter()
        .filter(|d| d["metadata"]["name"] == "runcast-demo-worker")
        .count();
    assert_eq!(workers, 1, "the demo worker is on by default");

    for values in value_sets() {
        let objs = helm_template(Some(&values));
        let kinds: Vec<String> = objs.iter().map(check).collect();
        let name = values.file_name().unwrap().to_string_lossy().to_string();
        let rc = objs.iter().find(|d| d["kind"] == "RuncastCluster").unwrap();
        match name.as_str() {
            "external-nats-values.yaml" => {
                assert!(!kinds.iter().any(|k| k == "StatefulSet"), "no bundled NATS");
                assert_eq!(rc["spec"]["nats"]["url"], "nats://nats.nats.svc:4222");
                assert_eq!(
                    rc["spec"]["nats"]["credentialsSecret"],
                    "runcast-nats-creds"
                );
            }
            "ingress-monitoring-values.yaml" => {
                assert_eq!(rc["spec"]["ingress"]["host"], "progress.example.com");
                assert_eq!(rc["spec"]["observability"]["serviceMonitor"], true);
                assert_eq!(rc["spec"]["observability"]["prometheusRule"], true);
                let dash = objs
                    .iter()
                    .find(|d| d["metadata"]["name"] == "runcast-dashboards")
                    .expect("the dashboards ConfigMap");
                assert_eq!(dash["metadata"]["labels"]["grafana_dashboard"], "1");
                for f in ["runcast-overview.json", "runcast-pod.json"] {
                    let shipped =
                        std::fs::read_to_string(repo(&format!("observability/grafana/{f}")))
                            .unwrap();
                    let in_chart: Value =
                        serde_json::from_str(dash["data"][f].as_str().unwrap()).unwrap();
                    assert_eq!(
                        in_chart,
                        serde_json::from_str::<Value>(&shipped).unwrap(),
                        "{f} in the chart differs from observability/"
                    );
                }
            }
            "no-demo-values.yaml" => {
                assert!(
                    !objs
                        .iter()
                        .any(|d| d["metadata"]["name"] == "runcast-demo-worker")
                );
                assert!(
                    kinds.iter().any(|k| k == "ClusterRole"),
                    "watching all namespaces"
                );
                assert!(!kinds.iter().any(|k| k == "NetworkPolicy"));
                assert_eq!(rc["spec"]["replicas"]["max"], 30);
            }
            other => panic!("no expectations for value set {other}"),
        }
    }
}

#[test]
fn bad_values_are_refused_by_the_schema() {
    for (set, says) in [
        ("cluster.replicas.min=0", "minimum"),
        ("nats.streamReplicas=2", "nats"),
        ("clustr.name=x", "clustr"),
        ("nats.bundled=false", "nats.url is required"),
        // A raw key where its digest entry belongs.
        ("cluster.auth.publishKeys={0123456789abcdef}", "publishKeys"),
        // An outside tester's values, each accepted by the schema before and
        // then failing at the API server (names) or in the operator (a
        // Lease renewed in a loop).
        ("operator.leaseDuration=0s", "leaseDuration"),
        ("imagePullSecrets[0]=regcred", "imagePullSecrets"),
        ("fullnameOverride=9x", "fullnameOverride"),
        ("cluster.name=1abc", "name"),
        (
            "fullnameOverride=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "fullnameOverride",
        ),
    ] {
        let out = Command::new(tool("helm"))
            .args(["template", "runcast"])
            .arg(repo("charts/runcast"))
            .args(["--set", set])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{set} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{set}: {err}");
    }
}

#[test]
fn k8s_base_is_the_rendered_chart_and_the_dev_overlay_renders() {
    let base = std::fs::read_to_string(repo("k8s/base/runcast.yaml")).unwrap();
    assert_eq!(
        docs(&base),
        helm_template(None),
        "k8s/base/runcast.yaml is stale: run scripts/render-k8s.sh"
    );

    let dev = docs(&run(Command::new(tool("kubectl"))
        .arg("kustomize")
        .arg(repo("k8s/overlays/dev"))));
    for d in &dev {
        check(d);
        if d["kind"] != "CustomResourceDefinition" && d["kind"] != "Namespace" {
            assert_eq!(
                d["metadata"]["namespace"], "runcast-dev",
                "{}",
                d["metadata"]["name"]
            );
        }
    }
    let rc = dev.iter().find(|d| d["kind"] == "RuncastCluster").unwrap();
    assert_eq!(rc["spec"]["replicas"]["max"], 3);
    let op = dev
        .iter()
        .find(|d| d["metadata"]["name"] == "runcast-operator" && d["kind"] == "Deployment")
        .unwrap();
    assert_eq!(op["spec"]["replicas"], 1);
}
