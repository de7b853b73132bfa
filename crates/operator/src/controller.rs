//! Runtime wiring: leader election, then the kube-rs `Controller` that
//! calls [`reconcile`] for every `RuncastCluster` when it or anything it
//! owns changes, and at least every sync period.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use k8s_openapi::api::{apps::v1::Deployment, coordination::v1::Lease, core::v1::Service};
use kube::{
    Api, Client,
    api::DynamicObject,
    runtime::{Controller, WatchStreamExt, predicates, reflector, watcher},
};

use crate::{
    crd::RuncastCluster,
    lease::LeaderElector,
    metrics::OperatorMetrics,
    reconcile::{Context, PodClient, error_policy, reconcile},
    served::Served,
};

/// Where the operator works and how it elects a leader.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Watch RuncastClusters in this namespace only; `None`: all namespaces.
    pub namespace: Option<String>,
    /// The Lease's namespace and name.
    pub lease_namespace: String,
    pub lease_name: String,
    /// Create the Lease when it is missing (off when the chart makes it).
    pub lease_create: bool,
    /// This replica's identity in the Lease (its pod name).
    pub identity: String,
    pub lease_duration: Duration,
    /// The gateways' container port, where their admin API answers.
    pub gateway_port: u16,
}

/// Runs until `shutdown` completes, or fails if leadership is lost (the
/// process then exits and restarts as a follower, the usual pattern: a
/// replica that may have stale state never keeps acting).
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<OperatorMetrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let elector = LeaderElector::new(
        Api::<Lease>::namespaced(client.clone(), &settings.lease_namespace),
        &settings.lease_name,
        &settings.identity,
        settings.lease_duration,
    )
    .creating(settings.lease_create);
    tokio::pin!(shutdown);
    // Follow until this replica holds the lease.
    loop {
        match elector.try_acquire().await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "leader election failed; retrying"),
        }
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(elector.renew_every()) => {}
        }
    }
    tracing::info!(identity = %settings.identity, "leading: reconciling RuncastClusters");
    metrics.leader.set(1);

    let ctx = Arc::new(
        Context::new(
            client.clone(),
            PodClient::new(settings.gateway_port),
            metrics.clone(),
        )
        .claiming(
            format!("{}/{}", settings.lease_namespace, settings.lease_name),
            settings.lease_duration,
        ),
    );
    let clusters: Api<RuncastCluster> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (deployments, services) = match &settings.namespace {
        Some(ns) => (
            Api::<Deployment>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    // Reconciles follow changes of a cluster's spec (its generation), not
    // of its status: the operator's own status writes changed the object,
    // each change triggered a reconcile, and each reconcile wrote status
    // again, a loop an outside tester measured at ~50 writes a second with
    // kube-apiserver near 100% CPU. Owned objects and the periodic requeue
    // still trigger as before.
    let (reader, writer) = reflector::store();
    let trigger = watcher(clusters, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    // Deleted clusters are never reconciled again: their per-cluster
    // series are dropped here, against the clusters the watch still has.
    let sweep = {
        let (store, ctx) = (reader.clone(), ctx.clone());
        async move {
            let mut every = tokio::time::interval(ctx.sync_period);
            loop {
                every.tick().await;
                let keep = store
                    .state()
                    .iter()
                    .map(|rc| {
                        use kube::ResourceExt;
                        format!("{}/{}", rc.namespace().unwrap_or_default(), rc.name_any())
                    })
                    .collect();
                ctx.forget_clusters_except(&keep);
            }
        }
    };
    let mut controller = Controller::for_stream(trigger, reader)
        .owns(deployments, watcher::Config::default())
        .owns(services, watcher::Config::default());
    // PodDisruptionBudgets in the version the server serves (policy/v1beta1
    // before Kubernetes 1.21); a watch of an API the server lacks would
    // only fail and retry forever.
    match Served::discover(&client).await {
        Ok(Served { pdb: Some(ar), .. }) => {
            let pdbs = match &settings.namespace {
                Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar),
                None => Api::all_with(client.clone(), &ar),
            };
            controller = controller.owns_with(pdbs, ar, watcher::Config::default());
        }
        Ok(_) => tracing::warn!(
            "this cluster serves no PodDisruptionBudget API; gateways run without one"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "API discovery failed; not watching PodDisruptionBudgets (the periodic resync still repairs them)")
        }
    }
    let controller = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile stream");
            }
        });
    tokio::pin!(controller);
    let sweep = tokio::spawn(sweep);

    let mut renew = tokio::time::interval(elector.renew_every());
    let mut failing_since: Option<tokio::time::Instant> = None;
    let result = loop {
        tokio::select! {
            () = &mut shutdown => break Ok(()),
            () = &mut controller => break Err("the controller stopped".to_string()),
            _ = renew.tick() => match elector.try_acquire().await {
                Ok(true) => failing_since = None,
                Ok(false) => break Err("lost the leader lease to another replica".into()),
                Err(e) => {
                    // Keep leading through short API outages, never past
                    // the lease's own duration.
                    let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                    tracing::warn!(error = %e, "could not renew the leader lease");
                    if since.elapsed() >= settings.lease_duration {
                        break Err(format!("could not renew the leader lease: {e}"));
                    }
                }
            },
        }
    };
    sweep.abort();
    metrics.leader.set(0);
    result
}
