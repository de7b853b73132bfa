//! The controller glue: for one `RuncastCluster`, apply the objects it
//! owns, read every gateway pod's load, let the [`policy`](crate::policy)
//! decide, carry out its plan (replicas, drains, sheds) and report status.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Pod, Secret, Service},
    },
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, ListParams, Patch, PatchParams, PostParams},
    runtime::controller::Action,
};
use runcast_core::admin::{Drain, PodStats, Shed};
use serde_json::{Value, json};
use tracing::Instrument;

use crate::{
    crd::{PodLoadStatus, RuncastCluster, RuncastClusterStatus},
    metrics::OperatorMetrics,
    policy::{self, History, PodLoad, Targets},
    resources::{self, ADMIN_TOKEN_KEY},
    served::{self, Served},
};

/// The field manager of every server-side apply.
pub const MANAGER: &str = "runcast-operator";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("RuncastCluster has no namespace")]
    NoNamespace,
    #[error("invalid spec: {0}")]
    Spec(String),
}

impl Error {
    /// The `reason` label of `runcast_operator_reconcile_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::NoNamespace => "no_namespace",
            Self::Spec(_) => "spec",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub pods: PodClient,
    pub metrics: Arc<OperatorMetrics>,
    /// How often a cluster is looked at without any change.
    pub sync_period: Duration,
    /// Scaling recommendations per cluster (`namespace/name`), for the
    /// stabilization windows. In memory: a new leader starts with empty
    /// windows, which only delays its first scaling decision.
    history: Mutex<HashMap<String, History>>,
    /// Consecutive failures per cluster, for the error backoff.
    failures: Mutex<HashMap<String, u32>>,
    started: Instant,
    /// What the API server serves of the optional kinds (see [`served`]).
    served: served::Cache,
    /// Optional objects a cluster's spec does not want and that are known
    /// to be absent (checked, or deleted), per cluster and kind: a spec
    /// that turns one off costs one GET, not one per reconcile.
    absent: Mutex<std::collections::HashSet<(String, &'static str)>>,
    /// This operator's claim on the clusters it reconciles: its leader
    /// Lease as `namespace/name`, and the Lease's duration. `None` (tests
    /// against a scripted server): no claims are written or honoured.
    claim: Option<(String, Duration)>,
    /// Clusters left to another operator (their metrics are not ours).
    elsewhere: Mutex<std::collections::HashSet<String>>,
}

impl Context {
    pub fn new(client: Client, pods: PodClient, metrics: Arc<OperatorMetrics>) -> Self {
        Self {
            client,
            pods,
            metrics,
            sync_period: Duration::from_secs(10),
            history: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            started: Instant::now(),
            served: served::Cache::default(),
            absent: Mutex::new(Default::default()),
            claim: None,
            elsewhere: Mutex::new(Default::default()),
        }
    }

    /// Claims each reconciled cluster for the operator whose leader Lease
    /// is `lease` (`namespace/name`), and leaves alone clusters another
    /// operator claims while that operator's Lease is held.
    pub fn claiming(mut self, lease: String, duration: Duration) -> Self {
        self.claim = Some((lease, duration));
        self
    }

    /// The clusters' keys (`namespace/name`) whose metrics stay: call with
    /// the clusters that exist; the series of the others are dropped.
    pub fn forget_clusters_except(&self, keep: &std::collections::HashSet<String>) {
        let elsewhere = self.elsewhere.lock().unwrap_or_else(|p| p.into_inner());
        let keep = keep
            .iter()
            .filter(|k| !elsewhere.contains(*k))
            .cloned()
            .collect();
        self.metrics.retain(&keep);
    }

    /// Takes `served` as the API server's answer instead of asking it (for
    /// tests against a scripted server).
    pub fn assume_served(self, served: Served) -> Self {
        self.served.pin(served);
        self
    }
}

fn key(rc: &RuncastCluster) -> String {
    format!("{}/{}", rc.namespace().unwrap_or_default(), rc.name_any())
}

/// Requeue with exponential backoff per cluster: 1 s, 2 s, 4 s ... up to 256 s.
pub fn error_policy(rc: Arc<RuncastCluster>, err: &Error, ctx: Arc<Context>) -> Action {
    let n = {
        let mut f = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.entry(key(&rc)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[err.reason()])
        .inc();
    let wait =
        Duration::from_secs(1u64 << n.min(9).saturating_sub(1)).min(Duration::from_secs(300));
    tracing::warn!(cluster = %key(&rc), error = %err, retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

pub async fn reconcile(rc: Arc<RuncastCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    // Exported like the other roles' spans when the operator has an OTLP
    // endpoint: one trace per reconcile, API calls and pod requests inside.
    let span = tracing::info_span!(
        target: runcast_telemetry::TARGET,
        "runcast.reconcile",
        runcast.cluster = %key(&rc),
        runcast.generation = rc.metadata.generation.unwrap_or(0),
    );
    let r = reconcile_inner(&rc, &ctx).instrument(span).await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    ctx.metrics.reconciles.inc();
    if let Err(e @ Error::Kube(_)) = &r {
        report_failure(&rc, &ctx, e).await;
    }
    if r.is_ok() {
        ctx.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key(&rc));
    }
    r
}

/// A failed step (an apply the API server refused, a missing permission)
/// is written where the user looks, as `Reconciled=False` with the API
/// server's words, keeping the other conditions as they were: the log of
/// an operator pod is not where anyone sees why nothing changes. Best
/// effort: when the API server refuses this too, the log has it.
async fn report_failure(rc: &RuncastCluster, ctx: &Context, e: &Error) {
    let Some(ns) = rc.namespace() else { return };
    let mut conditions = rc
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut message = e.to_string();
    if message.len() > 1024 {
        let mut end = 1024;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    let failed = condition(
        "Reconciled",
        false,
        "KubernetesAPIError",
        message,
        rc.metadata.generation,
    );
    set_condition(&mut conditions, failed);
    keep_transition_times(rc, &mut conditions);
    if rc.status.as_ref().map(|s| &s.conditions) == Some(&conditions) {
        return;
    }
    let r = Api::<RuncastCluster>::namespaced(ctx.client.clone(), &ns)
        .patch_status(
            &rc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": conditions}})),
        )
        .await;
    if let Err(e) = r {
        tracing::warn!(cluster = %key(rc), error = %e, "could not write the failure into the cluster's status");
    }
}

fn set_condition(conditions: &mut Vec<Condition>, c: Condition) {
    match conditions.iter_mut().find(|p| p.type_ == c.type_) {
        Some(p) => *p = c,
        None => conditions.push(c),
    }
}

/// Whether the operator whose leader Lease is `lease` (`namespace/name`)
/// still runs: its Lease exists and was renewed within its duration. A
/// Lease this operator may not read counts as held: two operators acting
/// on one cluster fight over its Deployment, which is worse than one
/// that waits for a user to move the claim.
async fn claim_is_held(ctx: &Context, lease: &str) -> bool {
    use k8s_openapi::api::coordination::v1::Lease;
    let Some((ns, name)) = lease.split_once('/') else {
        return false;
    };
    match Api::<Lease>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await
    {
        Ok(None) => false,
        Ok(Some(l)) => {
            let spec = l.spec.unwrap_or_default();
            let holder = spec.holder_identity.as_ref().is_some_and(|h| !h.is_empty());
            holder && crate::lease::renewed_within(&spec, None)
        }
        Err(e) => {
            tracing::warn!(%lease, error = %e, "cannot read another operator's Lease; leaving its clusters to it");
            true
        }
    }
}

async fn reconcile_inner(rc: &RuncastCluster, ctx: &Context) -> Result<Action, Error> {
    let ns = rc.namespace().ok_or(Error::NoNamespace)?;
    if let Some((me, _)) = &ctx.claim {
        let other = rc.status.as_ref().and_then(|s| s.operator.as_deref());
        match other {
            Some(other) if other != me && claim_is_held(ctx, other).await => {
                let new = ctx
                    .elsewhere
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key(rc));
                if new {
                    tracing::warn!(cluster = %key(rc), operator = %other, "another operator reconciles this cluster; leaving it alone (clear status.operator or stop that operator to move it here)");
                }
                return Ok(Action::requeue(ctx.sync_period));
            }
            Some(other) if other != me => {
                tracing::warn!(cluster = %key(rc), operator = %other, "taking over this cluster: the operator that reconciled it no longer holds its Lease");
            }
            _ => {}
        }
        ctx.elsewhere
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key(rc));
    }
    if let Err(Error::Spec(why)) = check_spec(rc) {
        // Refused where the user looks (`kubectl get`/`describe`), once
        // per change of the spec: retrying cannot fix it, so there is no
        // backoff loop, and nothing of the last good spec is touched.
        tracing::warn!(cluster = %key(rc), %why, "invalid spec; waiting for a change");
        Api::<RuncastCluster>::namespaced(ctx.client.clone(), &ns)
            .patch_status(
                &rc.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "conditions": [condition(
                        "Ready",
                        false,
                        "InvalidSpec",
                        why,
                        rc.metadata.generation,
                    )],
                    "operator": ctx.claim.as_ref().map(|(me, _)| me),
                }})),
            )
            .await?;
        ctx.metrics
            .reconcile_errors
            .with_label_values(&["spec"])
            .inc();
        return Ok(Action::await_change());
    }
    let pass = Pass {
        rc,
        ctx,
        ns,
        apply: PatchParams::apply(MANAGER).force(),
    };
    let served = ctx.served.get(&ctx.client).await?;
    let token = pass.admin_token().await?;
    // The pods read the token from the Secret when they start: a new token
    // (the Secret deleted and made again, or edited) must roll them, or the
    // operator's requests carry a token the running gateways refuse.
    let config_hash = resources::hash(&json!([
        pass.apply_config().await?,
        resources::hash(&json!(token)),
    ]));
    let fleet = pass.observe(&token).await?;
    let plan = pass.decide(&fleet);
    let missing = pass
        .apply_objects(plan.replicas, &config_hash, &served)
        .await?;
    pass.move_clients(&token, &plan, &fleet.addrs).await?;
    pass.report(&fleet, &plan, &missing).await?;
    let busy = !plan.drain.is_empty() || !plan.shed.is_empty() || plan.replicas != fleet.current;
    Ok(Action::requeue(if busy {
        // Follow a drain or rebalance closely.
        Duration::from_secs(2)
    } else {
        ctx.sync_period
    }))
}

fn check_spec(rc: &RuncastCluster) -> Result<(), Error> {
    let r = &rc.spec.replicas;
    if r.min < 1 || r.max < r.min {
        return Err(Error::Spec(format!(
            "replicas.min ({}) must be at least 1 and at most replicas.max ({})",
            r.min, r.max
        )));
    }
    for key in rc.spec.gateway.env.keys() {
        resources::check_env_key(key).map_err(Error::Spec)?;
    }
    Ok(())
}

/// Stats requests in flight at once. Each waits at most the
/// [`PodClient`]'s timeout (2 s), so a reconcile of a fleet of up to 64 pods
/// waits for its slowest pod rather than the sum of all, and a larger
/// fleet for one timeout per 64 pods at worst, while the operator holds a
/// bounded number of connections.
const STATS_IN_FLIGHT: usize = 64;

/// The gateway fleet as this reconcile found it.
struct Fleet {
    /// The Deployment's replicas (`replicas.min` for a new cluster).
    current: i32,
    /// Every pod not being deleted, in the API server's order, with its load.
    loads: Vec<PodLoad>,
    /// Pod name to IP, for the admin requests.
    addrs: HashMap<String, String>,
}

/// One reconcile of one cluster: what each of its steps needs.
struct Pass<'a> {
    rc: &'a RuncastCluster,
    ctx: &'a Context,
    ns: String,
    /// Server-side apply with the operator's field manager, taking over
    /// fields others changed.
    apply: PatchParams,
}

impl Pass<'_> {
    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    /// Step 1: the admin token the gateways and this operator share: read from
    /// its Secret, or made and stored there for a new cluster.
    async fn admin_token(&self) -> Result<String, Error> {
        let rc = self.rc;
        let secrets: Api<Secret> = self.api();
        match secrets.get_opt(&resources::admin_secret_name(rc)).await? {
            Some(s) => read_token(&s).ok_or_else(|| {
                Error::Spec(format!(
                    "Secret {} has no {ADMIN_TOKEN_KEY:?} key",
                    resources::admin_secret_name(rc)
                ))
            }),
            None => {
                let token = new_token();
                let body: Secret = serde_json::from_value(resources::admin_secret(rc, &token))
                    .map_err(|e| Error::Spec(e.to_string()))?;
                secrets.create(&PostParams::default(), &body).await?;
                Ok(token)
            }
        }
    }

    /// Step 2a: the gateways' configuration; returns its hash, which goes into
    /// the pod template so a change rolls the pods.
    async fn apply_config(&self) -> Result<String, Error> {
        let cm = resources::config_map(self.rc);
        let config_hash = resources::hash(&cm["data"]);
        self.api::<ConfigMap>()
            .patch(
                &resources::gateway_name(self.rc),
                &self.apply,
                &Patch::Apply(&cm),
            )
            .await?;
        Ok(config_hash)
    }

    /// Step 2b: what exists now: the Deployment's size, and each live pod's
    /// readiness and load.
    async fn observe(&self, token: &str) -> Result<Fleet, Error> {
        let rc = self.rc;
        let current = self
            .api::<Deployment>()
            .get_opt(&resources::gateway_name(rc))
            .await?
            .and_then(|d| d.spec.and_then(|s| s.replicas))
            .unwrap_or(rc.spec.replicas.min);
        let pods = self
            .api::<Pod>()
            .list(&ListParams::default().labels(&resources::selector(rc)))
            .await?;
        // (name, ready, IP) of every pod not being deleted.
        let live: Vec<(String, bool, Option<String>)> = pods
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| {
                let status = p.status.as_ref();
                let ready = status
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                (p.name_any(), ready, status.and_then(|s| s.pod_ip.clone()))
            })
            .collect();
        let addrs: HashMap<String, String> = live
            .iter()
            .filter_map(|(name, _, ip)| Some((name.clone(), ip.clone()?)))
            .collect();
        // All pods are asked at once (up to STATS_IN_FLIGHT); `buffered`
        // keeps the list's order, which the policy's tie-breaks follow.
        let pods = &self.ctx.pods;
        let loads = futures_util::stream::iter(live)
            .map(|(name, ready, ip)| async move {
                let stats = match ip {
                    Some(ip) => pods.stats(&ip, token).await,
                    None => None,
                };
                PodLoad { name, ready, stats }
            })
            .buffered(STATS_IN_FLIGHT)
            .collect()
            .await;
        Ok(Fleet {
            current,
            loads,
            addrs,
        })
    }

    /// Step 3: decide, against this cluster's stabilization history.
    fn decide(&self, fleet: &Fleet) -> policy::Plan {
        let (rc, ctx) = (self.rc, self.ctx);
        let scaling = &rc.spec.scaling;
        let targets = Targets {
            min: rc.spec.replicas.min,
            max: rc.spec.replicas.max,
            connections_per_pod: scaling.connections_per_pod,
            messages_per_second_per_pod: scaling.messages_per_second_per_pod,
            up_window: Duration::from_secs(scaling.scale_up_stabilization_seconds),
            down_window: Duration::from_secs(scaling.scale_down_stabilization_seconds),
            rebalance: scaling.rebalance,
        };
        let current = fleet.current;
        let plan = {
            let mut h = ctx.history.lock().unwrap_or_else(|p| p.into_inner());
            let history = h.entry(key(rc)).or_default();
            policy::plan(
                &fleet.loads,
                current,
                &targets,
                history,
                ctx.started.elapsed(),
            )
        };
        if plan.replicas != current || !plan.drain.is_empty() || !plan.shed.is_empty() {
            tracing::info!(cluster = %key(rc), current, replicas = plan.replicas, desired = plan.desired, reason = %plan.reason, "scaling");
        }
        plan
    }

    /// Step 4: apply the Deployment at the planned size, and the rest:
    /// the optional kinds the server serves, and a delete of those the spec
    /// no longer wants. Returns what the spec wants that the server does
    /// not serve (the `APIsAvailable` condition says so).
    async fn apply_objects(
        &self,
        replicas: i32,
        config_hash: &str,
        served: &Served,
    ) -> Result<Vec<String>, Error> {
        let (rc, apply) = (self.rc, &self.apply);
        self.api::<Deployment>()
            .patch(
                &resources::gateway_name(rc),
                apply,
                &Patch::Apply(&resources::deployment(rc, replicas, config_hash)),
            )
            .await?;
        self.api::<Service>()
            .patch(
                &rc.name_any(),
                apply,
                &Patch::Apply(&resources::service(rc)),
            )
            .await?;
        let optional = [
            (
                "PodDisruptionBudget",
                &served.pdb,
                resources::gateway_name(rc),
                Some(resources::pdb(rc)),
            ),
            (
                "Ingress",
                &served.ingress,
                rc.name_any(),
                resources::ingress(rc),
            ),
            (
                "ServiceMonitor",
                &served.service_monitor,
                rc.name_any(),
                resources::service_monitor(rc),
            ),
            (
                "PrometheusRule",
                &served.prometheus_rule,
                rc.name_any(),
                resources::prometheus_rule(rc),
            ),
        ];
        let mut wanted = Vec::new();
        for (kind, ar, name, body) in optional {
            if body.is_some() {
                wanted.push(kind);
            }
            let Some(ar) = ar else { continue };
            let api = Api::<DynamicObject>::namespaced_with(self.ctx.client.clone(), &self.ns, ar);
            let memo = (key(rc), kind);
            match body {
                Some(mut body) => {
                    self.ctx
                        .absent
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&memo);
                    // The version the server serves (policy/v1beta1 before
                    // Kubernetes 1.21: the same fields).
                    body["apiVersion"] = json!(ar.api_version);
                    api.patch(&name, apply, &Patch::Apply(&body)).await?;
                }
                None => {
                    if self
                        .ctx
                        .absent
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains(&memo)
                    {
                        continue;
                    }
                    // Server-side apply never removes an object that an
                    // apply no longer sends: turned off, it is deleted
                    // here, if it is this cluster's.
                    if let Some(obj) = api.get_opt(&name).await? {
                        let ours = obj
                            .metadata
                            .owner_references
                            .iter()
                            .flatten()
                            .any(|o| Some(&o.uid) == rc.metadata.uid.as_ref());
                        if ours {
                            api.delete(&name, &Default::default()).await?;
                            tracing::info!(cluster = %key(rc), kind, %name, "deleted: the spec no longer asks for it");
                        } else {
                            tracing::warn!(cluster = %key(rc), kind, %name, "not deleting an object of the same name that this cluster does not own");
                        }
                    }
                    self.ctx
                        .absent
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(memo);
                }
            }
        }
        Ok(served.missing(&wanted))
    }

    /// Step 5: move clients: drain before removal, shed to rebalance.
    async fn move_clients(
        &self,
        token: &str,
        plan: &policy::Plan,
        addrs: &HashMap<String, String>,
    ) -> Result<(), Error> {
        let drain = &self.rc.spec.drain;
        let grace_ms = ((drain.grace_period_seconds - 10).max(1) as u64) * 1000;
        let pods_api: Api<Pod> = self.api();
        for name in &plan.drain {
            // Marked first: should the operator stop here, the ReplicaSet
            // still removes this pod (and no other) when replicas drop.
            pods_api
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(resources::deletion_cost_patch()),
                )
                .await?;
            if let Some(ip) = addrs.get(name) {
                let d = Drain {
                    rate: drain.rate,
                    jitter_ms: drain.jitter_ms,
                    grace_ms: Some(grace_ms),
                };
                if !self.ctx.pods.post(ip, token, "drain", &d).await {
                    tracing::warn!(pod = %name, "drain request failed; retrying next sync");
                }
            }
        }
        for (name, count) in &plan.shed {
            if let Some(ip) = addrs.get(name) {
                let s = Shed {
                    count: *count,
                    rate: drain.rate,
                    jitter_ms: drain.jitter_ms,
                };
                if !self.ctx.pods.post(ip, token, "shed", &s).await {
                    tracing::warn!(pod = %name, "shed request failed; retrying next sync");
                }
            }
        }
        Ok(())
    }

    /// Step 6: status, and the per-cluster metrics.
    async fn report(
        &self,
        fleet: &Fleet,
        plan: &policy::Plan,
        missing: &[String],
    ) -> Result<(), Error> {
        let rc = self.rc;
        let mut status = status(rc, &fleet.loads, plan, fleet.current, missing);
        status.operator = self.ctx.claim.as_ref().map(|(me, _)| me.clone());
        keep_transition_times(rc, &mut status.conditions);
        self.ctx.metrics.record(&key(rc), &status);
        self.api::<RuncastCluster>()
            .patch_status(
                &rc.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await?;
        Ok(())
    }
}

/// A condition's `lastTransitionTime` is when its status last changed, not
/// when it was last written: kept from the stored status while the status
/// stays. (Also what keeps an unchanged status a no-op for the API server.)
fn keep_transition_times(rc: &RuncastCluster, conditions: &mut [Condition]) {
    let Some(before) = rc.status.as_ref() else {
        return;
    };
    for c in conditions {
        if let Some(prev) = before
            .conditions
            .iter()
            .find(|p| p.type_ == c.type_ && p.status == c.status)
        {
            c.last_transition_time = prev.last_transition_time.clone();
        }
    }
}

fn read_token(s: &Secret) -> Option<String> {
    if let Some(b) = s.data.as_ref().and_then(|d| d.get(ADMIN_TOKEN_KEY)) {
        return String::from_utf8(b.0.clone()).ok();
    }
    s.string_data
        .as_ref()
        .and_then(|d| d.get(ADMIN_TOKEN_KEY))
        .cloned()
}

/// 32 random bytes, hex: the admin token. From the OS's generator.
fn new_token() -> String {
    let mut b = [0u8; 32];
    if getrandom::fill(&mut b).is_err() {
        // No OS randomness: fall back to time and address entropy rather
        // than fail; the token only guards the in-cluster admin API.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b[..16].copy_from_slice(&t.to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

fn status(
    rc: &RuncastCluster,
    loads: &[PodLoad],
    plan: &policy::Plan,
    current: i32,
    missing: &[String],
) -> RuncastClusterStatus {
    let gen_ = rc.metadata.generation;
    let ready = loads.iter().filter(|p| p.ready).count() as i32;
    let draining: Vec<&str> = loads
        .iter()
        .filter(|p| p.stats.as_ref().is_some_and(|s| s.draining))
        .map(|p| p.name.as_str())
        .collect();
    let silent: Vec<&str> = loads
        .iter()
        .filter(|p| p.ready && p.stats.is_none())
        .map(|p| p.name.as_str())
        .collect();
    let stats = |f: fn(&PodStats) -> f64| -> f64 {
        // From +0 (a float `sum` of nothing is -0), without odd figures.
        loads
            .iter()
            .filter_map(|p| p.stats.as_ref())
            .map(f)
            .filter(|v| v.is_finite() && *v > 0.0)
            .fold(0.0, |a, b| a + b)
    };
    let scaling = plan.replicas != current || plan.desired != current - draining.len() as i32;
    RuncastClusterStatus {
        observed_generation: gen_,
        replicas: loads.len() as i32,
        ready_replicas: ready,
        desired_replicas: plan.desired,
        connections: stats(|s| s.connections as f64) as u64,
        delivered_per_second: stats(|s| s.delivered_per_sec),
        pods: loads
            .iter()
            .map(|p| PodLoadStatus {
                name: p.name.clone(),
                connections: p.stats.as_ref().map_or(0, |s| s.connections),
                delivered_per_second: p.stats.as_ref().map_or(0.0, |s| s.delivered_per_sec),
                draining: p.stats.as_ref().is_some_and(|s| s.draining),
            })
            .collect(),
        conditions: vec![
            condition(
                "Ready",
                ready >= rc.spec.replicas.min,
                if ready >= rc.spec.replicas.min {
                    "MinimumReplicasReady"
                } else {
                    "TooFewReadyReplicas"
                },
                format!("{ready} of {} gateway pods ready", loads.len()),
                gen_,
            ),
            condition(
                "Scaling",
                scaling,
                if scaling { "Scaling" } else { "Stable" },
                if plan.reason.is_empty() {
                    format!("{} pods", plan.desired)
                } else {
                    plan.reason.clone()
                },
                gen_,
            ),
            condition(
                "Draining",
                !draining.is_empty(),
                if draining.is_empty() {
                    "NoDrain"
                } else {
                    "Draining"
                },
                format!("draining: [{}]", draining.join(", ")),
                gen_,
            ),
            condition(
                "Degraded",
                !silent.is_empty(),
                if silent.is_empty() {
                    "AllPodsReporting"
                } else {
                    "PodsNotReporting"
                },
                format!(
                    "ready pods whose stats did not answer: [{}]",
                    silent.join(", ")
                ),
                gen_,
            ),
            condition(
                "Reconciled",
                true,
                "Applied",
                "every object of this cluster was applied".into(),
                gen_,
            ),
            condition(
                "APIsAvailable",
                missing.is_empty(),
                if missing.is_empty() {
                    "AllServed"
                } else {
                    "NotServed"
                },
                if missing.is_empty() {
                    "every API this cluster's spec uses is served".into()
                } else {
                    format!(
                        "skipped, everything else reconciled: {}",
                        missing.join("; ")
                    )
                },
                gen_,
            ),
        ],
        operator: None,
    }
}

/// Talks to the gateway pods' admin API over plain HTTP inside the
/// cluster, with the shared bearer token. Each request is bounded in time:
/// a pod that does not answer counts as not reporting.
#[derive(Clone)]
pub struct PodClient {
    port: u16,
    timeout: Duration,
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
}

impl PodClient {
    pub fn new(port: u16) -> Self {
        Self {
            port,
            timeout: Duration::from_secs(2),
            http: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http(),
        }
    }

    async fn call(
        &self,
        ip: &str,
        token: &str,
        method: &str,
        op: &str,
        body: String,
    ) -> Option<(u16, bytes::Bytes)> {
        use http_body_util::BodyExt;
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_owned()
        };
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{host}:{}/v1/admin/{op}", self.port))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .ok()?;
        let exchange = async {
            let resp = self.http.request(req).await.ok()?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            Some((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .ok()
            .flatten()
    }

    pub async fn stats(&self, ip: &str, token: &str) -> Option<PodStats> {
        match self.call(ip, token, "GET", "stats", String::new()).await {
            Some((200, b)) => serde_json::from_slice(&b).ok(),
            other => {
                tracing::debug!(%ip, status = ?other.map(|o| o.0), "pod stats unavailable");
                None
            }
        }
    }

    /// POSTs an admin request; whether the pod accepted it (202, or 409 if
    /// the same work is already under way there).
    pub async fn post<T: serde::Serialize>(
        &self,
        ip: &str,
        token: &str,
        op: &str,
        body: &T,
    ) -> bool {
        let body = serde_json::to_string(body).unwrap_or_default();
        matches!(
            self.call(ip, token, "POST", op, body).await,
            Some((202 | 409, _))
        )
    }
}

impl std::fmt::Debug for PodClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodClient")
            .field("port", &self.port)
            .finish()
    }
}

/// The status a cluster reports, serialized as the API server stores it
/// (used by tests to read status patches).
pub fn status_of(v: &Value) -> Option<RuncastClusterStatus> {
    serde_json::from_value(v.get("status")?.clone()).ok()
}
