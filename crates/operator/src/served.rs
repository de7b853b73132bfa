//! Which of the APIs the operator applies this cluster actually serves.
//!
//! A RuncastCluster's core objects (ConfigMap, Secret, Deployment, Service)
//! exist on every Kubernetes the operator supports. The others do not:
//! `policy/v1` PodDisruptionBudgets arrived in 1.21 (1.20 and older serve
//! `policy/v1beta1`, with the same fields the operator sets), and
//! ServiceMonitor and PrometheusRule exist only where the Prometheus
//! Operator's CRDs are installed. Applying a kind the server does not serve
//! fails with a 404, which used to fail the whole reconcile, so the status
//! never said why. Now the operator asks the server's discovery API first,
//! applies what is served, skips what is not, and says what it skipped in
//! the `APIsAvailable` condition; everything else is reconciled as usual.
//!
//! Discovery is re-read every [`TTL`], so installing the Prometheus
//! Operator later is noticed without restarting the operator.

use std::time::{Duration, Instant};

use kube::{Client, api::ApiResource};

/// How long one discovery answer is reused.
pub const TTL: Duration = Duration::from_secs(60);

/// The optional kinds, as the server serves them (`None`: not served).
#[derive(Debug, Clone, Default)]
pub struct Served {
    /// `policy/v1`, else `policy/v1beta1`.
    pub pdb: Option<ApiResource>,
    /// `networking.k8s.io/v1` (Kubernetes 1.19 and later).
    pub ingress: Option<ApiResource>,
    pub service_monitor: Option<ApiResource>,
    pub prometheus_rule: Option<ApiResource>,
}

impl Served {
    /// What a current cluster with the Prometheus Operator serves.
    pub fn everything() -> Self {
        let r = |group: &str, version: &str, kind: &str, plural: &str| {
            Some(ApiResource {
                group: group.into(),
                version: version.into(),
                api_version: format!("{group}/{version}"),
                kind: kind.into(),
                plural: plural.into(),
            })
        };
        Self {
            pdb: r(
                "policy",
                "v1",
                "PodDisruptionBudget",
                "poddisruptionbudgets",
            ),
            ingress: r("networking.k8s.io", "v1", "Ingress", "ingresses"),
            service_monitor: r(
                "monitoring.coreos.com",
                "v1",
                "ServiceMonitor",
                "servicemonitors",
            ),
            prometheus_rule: r(
                "monitoring.coreos.com",
                "v1",
                "PrometheusRule",
                "prometheusrules",
            ),
        }
    }

    /// Asks the server. An error other than "not found" is returned (the
    /// reconcile fails and is retried): not knowing is not the same as a
    /// missing API.
    pub async fn discover(client: &Client) -> Result<Self, kube::Error> {
        let pdb = match find(client, "policy", "v1", "PodDisruptionBudget").await? {
            Some(r) => Some(r),
            None => find(client, "policy", "v1beta1", "PodDisruptionBudget").await?,
        };
        Ok(Self {
            pdb,
            ingress: find(client, "networking.k8s.io", "v1", "Ingress").await?,
            service_monitor: find(client, "monitoring.coreos.com", "v1", "ServiceMonitor").await?,
            prometheus_rule: find(client, "monitoring.coreos.com", "v1", "PrometheusRule").await?,
        })
    }

    /// Every kind `wanted` lists (by kind name) that is not served, as
    /// `group/version Kind` with what to do about it.
    pub fn missing(&self, wanted: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        for kind in wanted {
            let (served, api, hint) = match *kind {
                "PodDisruptionBudget" => (
                    self.pdb.is_some(),
                    "policy/v1 (or v1beta1)",
                    "the gateways run without a disruption budget",
                ),
                "Ingress" => (
                    self.ingress.is_some(),
                    "networking.k8s.io/v1",
                    "needs Kubernetes 1.19 or later; expose the Service another way",
                ),
                "ServiceMonitor" => (
                    self.service_monitor.is_some(),
                    "monitoring.coreos.com/v1",
                    "install the Prometheus Operator's CRDs, or set observability.serviceMonitor to false",
                ),
                "PrometheusRule" => (
                    self.prometheus_rule.is_some(),
                    "monitoring.coreos.com/v1",
                    "install the Prometheus Operator's CRDs, or set observability.prometheusRule to false",
                ),
                _ => continue,
            };
            if !served {
                out.push(format!("{api} {kind} is not served ({hint})"));
            }
        }
        out
    }
}

/// The resource for `kind` in `group/version`, if the server serves it.
async fn find(
    client: &Client,
    group: &str,
    version: &str,
    kind: &str,
) -> Result<Option<ApiResource>, kube::Error> {
    let api_version = format!("{group}/{version}");
    match client.list_api_group_resources(&api_version).await {
        Ok(list) => Ok(list
            .resources
            .iter()
            // Subresources (`poddisruptionbudgets/status`) share the kind.
            .find(|r| r.kind == kind && !r.name.contains('/'))
            .map(|r| ApiResource {
                group: group.into(),
                version: version.into(),
                api_version: api_version.clone(),
                kind: kind.into(),
                plural: r.name.clone(),
            })),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

/// One discovery answer and when it was read (`None`: given, not read, and
/// kept).
#[derive(Debug, Default)]
pub struct Cache(std::sync::Mutex<Option<(Option<Instant>, Served)>>);

impl Cache {
    /// The cached answer while fresh, else a new one.
    pub async fn get(&self, client: &Client) -> Result<Served, kube::Error> {
        if let Some((at, s)) = &*self.0.lock().unwrap_or_else(|p| p.into_inner())
            && at.is_none_or(|at| at.elapsed() < TTL)
        {
            return Ok(s.clone());
        }
        let s = Served::discover(client).await?;
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((Some(Instant::now()), s.clone()));
        Ok(s)
    }

    /// Answers `served` from now on, without asking the server.
    pub fn pin(&self, served: Served) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((None, served));
    }
}
