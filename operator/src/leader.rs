//! Leader election through a `coordination.k8s.io/v1` Lease, so only one operator replica
//! reconciles at a time.
//!
//! The holder renews every `duration / 3`; another replica takes over only after
//! `renewTime + leaseDurationSeconds` has passed. Every write carries the Lease's
//! resourceVersion, so two candidates cannot both win (the loser gets 409). A leader that cannot
//! renew before its lease runs out steps down (the caller exits and Kubernetes restarts it).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("failed to read Lease {name}")]
    ReadLease {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to write Lease {name}")]
    WriteLease {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("lost the leader Lease {name} (not renewed for {secs}s)")]
    Lost { name: String, secs: u64 },
}

/// What to do with the Lease as it is now.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// No Lease yet: create it holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Free or expired: take it over.
    TakeOver,
    /// Someone else holds a live lease.
    Wait,
}

/// Pure decision from the Lease, our identity and the time.
pub fn decide(lease: Option<&Lease>, identity: &str, now: Timestamp) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    match spec.holder_identity.as_deref() {
        Some(h) if h == identity => Decision::Renew,
        None | Some("") => Decision::TakeOver,
        Some(_) => {
            let dur =
                SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
            match spec.renew_time.or(spec.acquire_time) {
                Some(MicroTime(t)) if t + dur > now => Decision::Wait,
                _ => Decision::TakeOver,
            }
        }
    }
}

/// A candidate for the operator's leader Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaderElector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    fn spec(&self, now: Timestamp, acquire: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.duration.as_secs()).unwrap_or(15)),
            acquire_time: Some(MicroTime(acquire)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One attempt; `Ok(true)` when we hold the Lease afterwards.
    ///
    /// Errors: API failures other than a lost race (409), which is `Ok(false)`.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, LeaderError> {
        let now = Timestamp::now();
        let current =
            self.api
                .get_opt(&self.name)
                .await
                .map_err(|source| LeaderError::ReadLease {
                    name: self.name.clone(),
                    source,
                })?;
        let write = match (decide(current.as_ref(), &self.identity, now), current) {
            (Decision::Wait, _) => return Ok(false),
            (Decision::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(now, now, 0)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (Decision::Renew, Some(mut lease)) => {
                let old = lease.spec.clone().unwrap_or_default();
                let acquire = old.acquire_time.map(|t| t.0).unwrap_or(now);
                lease.spec = Some(self.spec(now, acquire, old.lease_transitions.unwrap_or(0)));
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
            (Decision::TakeOver, Some(mut lease)) => {
                let old = lease.spec.clone().unwrap_or_default();
                lease.spec = Some(self.spec(now, now, old.lease_transitions.unwrap_or(0) + 1));
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match write {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(source) => Err(LeaderError::WriteLease {
                name: self.name.clone(),
                source,
            }),
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) -> Result<(), LeaderError> {
        let mut tick = tokio::time::interval(self.duration / 3);
        loop {
            tick.tick().await;
            match self.try_acquire_or_renew().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
        }
    }

    /// Renews until a renewal has not succeeded for a whole lease duration; then returns the
    /// reason leadership was lost.
    pub async fn hold(&self) -> LeaderError {
        let mut tick = tokio::time::interval(self.duration / 3);
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    return LeaderError::Lost {
                        name: self.name.clone(),
                        secs: last_ok.elapsed().as_secs(),
                    };
                }
                Err(e) => tracing::warn!(error = %e, "leader lease renewal failed"),
            }
            if last_ok.elapsed() >= self.duration {
                return LeaderError::Lost {
                    name: self.name.clone(),
                    secs: last_ok.elapsed().as_secs(),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed: Timestamp) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(renewed)),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn a_live_lease_held_by_another_replica_is_respected_until_it_expires() {
        let t0 = Timestamp::from_second(1_000_000).unwrap();
        let l = lease("other", t0);
        assert_eq!(
            decide(Some(&l), "me", t0 + SignedDuration::from_secs(14)),
            Decision::Wait
        );
        assert_eq!(
            decide(Some(&l), "me", t0 + SignedDuration::from_secs(16)),
            Decision::TakeOver
        );
        assert_eq!(decide(Some(&l), "other", t0), Decision::Renew);
        assert_eq!(decide(None, "me", t0), Decision::Create);
    }
}
