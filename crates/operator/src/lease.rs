//! Leader election on a `coordination.k8s.io/v1` Lease, so that two
//! operator replicas never reconcile (and scale, and drain) at once.
//!
//! The holder renews the lease every `duration / 3`. Another replica takes
//! it over only once it has gone `duration` without renewal, and only with
//! a replace conditioned on the lease's resourceVersion: of two replicas
//! racing for an expired lease, exactly one wins.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{Api, api::PostParams};

/// Whether the Lease was renewed within its duration (`fallback` when it
/// names none; without a fallback, such a Lease is not held). What a
/// follower waits out before it takes the Lease, and what tells an operator
/// that another's claim on a cluster still stands.
pub fn renewed_within(spec: &LeaseSpec, fallback: Option<Duration>) -> bool {
    let Some(renewed) = &spec.renew_time else {
        return false;
    };
    let secs = match (spec.lease_duration_seconds, fallback) {
        (Some(s), _) => i64::from(s),
        (None, Some(d)) => d.as_secs() as i64,
        (None, None) => return false,
    };
    renewed
        .0
        .checked_add(SignedDuration::from_secs(secs))
        .is_ok_and(|until| until >= Timestamp::now())
}

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    create: bool,
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            duration,
            create: true,
        }
    }

    /// Whether a missing Lease is created (the default) or waited for.
    pub fn creating(mut self, create: bool) -> Self {
        self.create = create;
        self
    }

    /// How often to call [`try_acquire`](Self::try_acquire).
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Takes or renews the lease; whether this replica now leads.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            if !self.create {
                tracing::warn!(lease = %self.name, "the leader Lease does not exist, and this operator does not create it (RUNCAST_LEASE_CREATE=false): not leading");
                return Ok(false);
            }
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                // Another replica created it first.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let expired = !renewed_within(&spec, Some(self.duration));
        if !mine && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine {
            spec.acquire_time.clone()
        } else {
            None
        };
        lease.spec = Some(self.spec(transitions, acquired));
        // `replace` sends the resourceVersion we read: if anyone changed the
        // lease since, this fails with 409 and we do not lead.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
