//! The objects one `RuncastCluster` owns, as server-side-apply bodies:
//! the gateways' ConfigMap, Deployment, Service and PodDisruptionBudget,
//! and when asked for, an Ingress, a ServiceMonitor and a PrometheusRule.
//! Each carries an owner reference to the cluster, so deleting the cluster
//! deletes them (no finalizer needed: nothing outside Kubernetes to clean).

use std::collections::BTreeMap;

use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::crd::RuncastCluster;

/// The port every gateway container listens on.
pub const GATEWAY_PORT: u16 = 8080;
/// Key of the admin token in the `<cluster>-admin` Secret.
pub const ADMIN_TOKEN_KEY: &str = "token";
/// Seconds of the grace period kept for the process to exit after its drain.
const EXIT_MARGIN_SECS: i64 = 10;

/// The alert and recording rules shipped in `observability/`.
const RULES_YAML: &str = include_str!("../../../observability/prometheus/runcast-rules.yaml");

pub fn labels(rc: &RuncastCluster) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "runcast".into()),
        ("app.kubernetes.io/instance".into(), rc.name_any()),
        ("app.kubernetes.io/component".into(), "gateway".into()),
    ])
}

/// `app.kubernetes.io/instance=<name>,...`, to list the gateway pods.
pub fn selector(rc: &RuncastCluster) -> String {
    labels(rc)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn gateway_name(rc: &RuncastCluster) -> String {
    format!("{}-gateway", rc.name_any())
}

pub fn admin_secret_name(rc: &RuncastCluster) -> String {
    format!("{}-admin", rc.name_any())
}

fn meta(rc: &RuncastCluster, name: String) -> Value {
    let owner = rc.owner_ref(&()).map(|mut o| {
        o.controller = Some(true);
        o.block_owner_deletion = Some(true);
        o
    });
    let mut labels = labels(rc);
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "runcast-operator".into(),
    );
    json!({
        "name": name,
        "namespace": rc.namespace(),
        "labels": labels,
        "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
    })
}

/// Settings the operator derives from the spec (or owns, like the listen
/// address its probes and Service point at). `gateway.env` may not set
/// them: an override would silently undo the spec field, or break the
/// probes, and the spec field is the one documented place for each.
const OPERATOR_ENV: &[(&str, &str)] = &[
    (
        "RUNCAST_LISTEN",
        "the operator sets it: the Service, the probes and the admin API use port 8080",
    ),
    ("RUNCAST_NATS_URL", "set spec.nats.url instead"),
    (
        "RUNCAST_NATS_REPLICAS",
        "set spec.nats.streamReplicas instead",
    ),
    (
        "RUNCAST_NATS_CREDS",
        "set spec.nats.credentialsSecret instead",
    ),
    (
        "RUNCAST_DRAIN_DELAY",
        "the operator sets it (5s: readiness fails before clients are moved)",
    ),
    (
        "RUNCAST_DRAIN_TIMEOUT",
        "set spec.drain.gracePeriodSeconds instead",
    ),
    ("RUNCAST_DRAIN_RATE", "set spec.drain.rate instead"),
    ("RUNCAST_DRAIN_JITTER", "set spec.drain.jitterMs instead"),
    (
        "RUNCAST_ADMIN_TOKEN",
        "the operator sets it from Secret <name>-admin",
    ),
    (
        "RUNCAST_ALLOW_ANONYMOUS",
        "set spec.auth.allowAnonymous instead",
    ),
    ("RUNCAST_PUBLISH_KEYS", "set spec.auth.publishKeys instead"),
    (
        "RUNCAST_ALLOW_ANONYMOUS_PUBLISH",
        "set spec.auth.allowAnonymousPublish instead",
    ),
    ("RUNCAST_AUTH_AUDIENCE", "set spec.auth.audience instead"),
    ("RUNCAST_AUTH_ISSUER", "set spec.auth.issuer instead"),
    ("RUNCAST_AUTH_JWKS", "set spec.auth.jwksSecretRef instead"),
    (
        "RUNCAST_AUTH_HS256_SECRET",
        "set spec.auth.hs256SecretRef instead",
    ),
    (
        "RUNCAST_OTLP_ENDPOINT",
        "set spec.observability.otlpEndpoint instead",
    ),
    (
        "RUNCAST_TRACE_SAMPLE_RATIO",
        "set spec.observability.traceSampleRatio instead",
    ),
];

/// A `gateway.env` key is a gateway setting: `RUNCAST_` and upper-case
/// letters, digits and underscores, and not one the operator sets.
pub fn check_env_key(key: &str) -> Result<(), String> {
    let setting = key.strip_prefix("RUNCAST_").unwrap_or("");
    if setting.is_empty()
        || !setting
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!(
            "gateway.env key {:?} is not a gateway setting: keys are RUNCAST_ followed by upper-case letters, digits or underscores (see `runcast gateway --help`; the log filter is RUNCAST_LOG)",
            key.chars().take(64).collect::<String>()
        ));
    }
    if let Some((_, owner)) = OPERATOR_ENV.iter().find(|(k, _)| *k == key) {
        return Err(format!("gateway.env may not set {key}: {owner}"));
    }
    Ok(())
}

/// The gateways' settings, as `RUNCAST_*` environment variables.
pub fn config_map(rc: &RuncastCluster) -> Value {
    let s = &rc.spec;
    let drain_timeout = (s.drain.grace_period_seconds - EXIT_MARGIN_SECS).max(1);
    let mut data: BTreeMap<String, String> = BTreeMap::from([
        ("RUNCAST_LISTEN".into(), format!("0.0.0.0:{GATEWAY_PORT}")),
        ("RUNCAST_NATS_URL".into(), s.nats.url.clone()),
        (
            "RUNCAST_NATS_REPLICAS".into(),
            s.nats.stream_replicas.to_string(),
        ),
        // Readiness fails first so Services stop routing new clients here,
        // then clients are moved at the drain rate, within the grace period.
        ("RUNCAST_DRAIN_DELAY".into(), "5s".into()),
        ("RUNCAST_DRAIN_TIMEOUT".into(), format!("{drain_timeout}s")),
        ("RUNCAST_DRAIN_RATE".into(), s.drain.rate.to_string()),
        (
            "RUNCAST_DRAIN_JITTER".into(),
            format!("{}ms", s.drain.jitter_ms),
        ),
    ]);
    if s.nats.credentials_secret.is_some() {
        data.insert(
            "RUNCAST_NATS_CREDS".into(),
            "/etc/runcast/nats/creds".into(),
        );
    }
    if s.auth.allow_anonymous {
        data.insert("RUNCAST_ALLOW_ANONYMOUS".into(), "true".into());
    }
    if !s.auth.publish_keys.is_empty() {
        data.insert("RUNCAST_PUBLISH_KEYS".into(), s.auth.publish_keys.join(","));
    }
    if s.auth.allow_anonymous_publish {
        data.insert("RUNCAST_ALLOW_ANONYMOUS_PUBLISH".into(), "true".into());
    }
    if let Some(a) = &s.auth.audience {
        data.insert("RUNCAST_AUTH_AUDIENCE".into(), a.clone());
    }
    if let Some(i) = &s.auth.issuer {
        data.insert("RUNCAST_AUTH_ISSUER".into(), i.clone());
    }
    if s.auth.jwks_secret_ref.is_some() {
        data.insert(
            "RUNCAST_AUTH_JWKS".into(),
            "/etc/runcast/auth/jwks.json".into(),
        );
    }
    if let Some(e) = &s.observability.otlp_endpoint {
        data.insert("RUNCAST_OTLP_ENDPOINT".into(), e.clone());
    }
    if let Some(r) = s.observability.trace_sample_ratio {
        data.insert("RUNCAST_TRACE_SAMPLE_RATIO".into(), r.to_string());
    }
    for (k, v) in &s.gateway.env {
        data.insert(k.clone(), v.clone());
    }
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(rc, gateway_name(rc)),
        "data": data,
    })
}

/// The admin token Secret, created once with a random token.
pub fn admin_secret(rc: &RuncastCluster, token: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta(rc, admin_secret_name(rc)),
        "type": "Opaque",
        "stringData": { ADMIN_TOKEN_KEY: token },
    })
}

/// The gateway Deployment with `replicas` pods. `config_hash` changes when
/// the ConfigMap does, which rolls the pods.
pub fn deployment(rc: &RuncastCluster, replicas: i32, config_hash: &str) -> Value {
    let s = &rc.spec;
    let mut annotations = s.gateway.pod_annotations.clone();
    annotations.insert("runcast.dev/config-hash".into(), config_hash.into());
    let mut volumes = vec![json!({"name": "tmp", "emptyDir": {}})];
    let mut mounts = vec![json!({"name": "tmp", "mountPath": "/tmp"})];
    if let Some(r) = &s.auth.jwks_secret_ref {
        volumes.push(json!({"name": "auth-jwks", "secret": {
            "secretName": r.name, "items": [{"key": r.key, "path": "jwks.json"}],
        }}));
        mounts
            .push(json!({"name": "auth-jwks", "mountPath": "/etc/runcast/auth", "readOnly": true}));
    }
    if let Some(secret) = &s.nats.credentials_secret {
        volumes.push(json!({"name": "nats-creds", "secret": {"secretName": secret}}));
        mounts.push(
            json!({"name": "nats-creds", "mountPath": "/etc/runcast/nats", "readOnly": true}),
        );
    }
    let probe = |path: &str| {
        json!({
            "httpGet": {"path": path, "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        })
    };
    let mut container = json!({
        "name": "gateway",
        "image": s.gateway.image,
        "args": ["gateway"],
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
        "envFrom": [{"configMapRef": {"name": gateway_name(rc)}}],
        "env": [{
            "name": "RUNCAST_ADMIN_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": admin_secret_name(rc), "key": ADMIN_TOKEN_KEY}},
        }],
        "readinessProbe": probe("/readyz"),
        "livenessProbe": probe("/healthz"),
        "securityContext": {
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    });
    if let Some(r) = &s.auth.hs256_secret_ref {
        container["env"]
            .as_array_mut()
            .expect("env is an array")
            .push(json!({
                "name": "RUNCAST_AUTH_HS256_SECRET",
                "valueFrom": {"secretKeyRef": {"name": r.name, "key": r.key}},
            }));
    }
    if let Some(p) = &s.gateway.image_pull_policy {
        container["imagePullPolicy"] = json!(p);
    }
    if let Some(r) = &s.gateway.resources {
        container["resources"] = json!(r);
    }
    if let Some(c) = &s.gateway.security_context {
        container["securityContext"] = json!(c);
    }
    let pod_security = match &s.gateway.pod_security_context {
        Some(c) => json!(c),
        None => json!({
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        }),
    };
    let mut pod = json!({
        "terminationGracePeriodSeconds": s.drain.grace_period_seconds,
        "securityContext": pod_security,
        "containers": [container],
        "volumes": volumes,
    });
    let g = &s.gateway;
    if !g.image_pull_secrets.is_empty() {
        pod["imagePullSecrets"] = json!(g.image_pull_secrets);
    }
    if !g.node_selector.is_empty() {
        pod["nodeSelector"] = json!(g.node_selector);
    }
    if !g.tolerations.is_empty() {
        pod["tolerations"] = json!(g.tolerations);
    }
    if let Some(a) = &g.affinity {
        pod["affinity"] = json!(a);
    }
    if !g.topology_spread_constraints.is_empty() {
        pod["topologySpreadConstraints"] = json!(g.topology_spread_constraints);
    }
    if let Some(p) = &g.priority_class_name {
        pod["priorityClassName"] = json!(p);
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(rc, gateway_name(rc)),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels(rc)},
            "strategy": {
                "type": "RollingUpdate",
                // Never fewer pods than clients need while rolling.
                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0},
            },
            "template": {
                "metadata": {"labels": labels(rc), "annotations": annotations},
                "spec": pod,
            },
        },
    })
}

pub fn service(rc: &RuncastCluster) -> Value {
    let s = &rc.spec.service;
    let mut m = meta(rc, rc.name_any());
    if !s.annotations.is_empty() {
        m["annotations"] = json!(s.annotations);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": m,
        "spec": {
            "type": s.type_,
            "selector": labels(rc),
            "ports": [{"name": "http", "port": s.port, "targetPort": "http", "protocol": "TCP"}],
        },
    })
}

/// At most one gateway voluntarily down at a time: node drains move
/// clients one pod at a time.
pub fn pdb(rc: &RuncastCluster) -> Value {
    json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(rc, gateway_name(rc)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(rc)}},
    })
}

/// An Ingress with WebSocket-safe ingress-nginx settings: timeouts far
/// above the heartbeat interval and no response buffering (SSE).
pub fn ingress(rc: &RuncastCluster) -> Option<Value> {
    let i = rc.spec.ingress.as_ref()?;
    let mut annotations = BTreeMap::from([
        (
            "nginx.ingress.kubernetes.io/proxy-read-timeout".to_string(),
            "3600".to_string(),
        ),
        (
            "nginx.ingress.kubernetes.io/proxy-send-timeout".into(),
            "3600".into(),
        ),
        (
            "nginx.ingress.kubernetes.io/proxy-buffering".into(),
            "off".into(),
        ),
    ]);
    annotations.extend(i.annotations.clone());
    let mut m = meta(rc, rc.name_any());
    m["annotations"] = json!(annotations);
    let mut spec = json!({
        "rules": [{
            "host": i.host,
            "http": {"paths": [{
                "path": "/",
                "pathType": "Prefix",
                "backend": {"service": {"name": rc.name_any(), "port": {"name": "http"}}},
            }]},
        }],
    });
    if let Some(c) = &i.class_name {
        spec["ingressClassName"] = json!(c);
    }
    if let Some(t) = &i.tls_secret {
        spec["tls"] = json!([{"hosts": [i.host], "secretName": t}]);
    }
    Some(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": m,
        "spec": spec,
    }))
}

pub fn service_monitor(rc: &RuncastCluster) -> Option<Value> {
    rc.spec.observability.service_monitor.then(|| {
        json!({
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": meta(rc, rc.name_any()),
            "spec": {
                "selector": {"matchLabels": labels(rc)},
                "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}],
            },
        })
    })
}

pub fn prometheus_rule(rc: &RuncastCluster) -> Option<Value> {
    if !rc.spec.observability.prometheus_rule {
        return None;
    }
    // Parsed at build time of the operator's tests; a parse failure here
    // would mean the shipped file is broken, which a test catches first.
    let rules: Value = serde_norway::from_str(RULES_YAML).ok()?;
    Some(json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": meta(rc, rc.name_any()),
        "spec": {"groups": rules["groups"]},
    }))
}

/// A stable hash of the ConfigMap's data, to roll pods when it changes.
pub fn hash(v: &Value) -> String {
    // FNV-1a over the canonical JSON: stable across processes and versions.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in v.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Marks a pod as the one the ReplicaSet removes first on scale-down.
pub fn deletion_cost_patch() -> Value {
    json!({"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "-1000"}}})
}
