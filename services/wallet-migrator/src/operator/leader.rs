//! Leader election over a coordination.k8s.io Lease, so that of several operator
//! replicas exactly one creates Jobs and writes status.
//!
//! Like client-go's elector, a candidate judges expiry by its own clock: it takes
//! over only after it has seen the same lease record unchanged for a full lease
//! duration, so clock skew between nodes cannot make two replicas leaders. The
//! leader stops acting once it has failed to renew for `renew_deadline`, which is
//! shorter than the lease duration.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub lease_name: String,
    /// This replica's identity, normally the pod name.
    pub identity: String,
    pub lease_duration: Duration,
    /// The leader gives up when it could not renew for this long.
    pub renew_deadline: Duration,
    /// How often the leader renews and a candidate retries.
    pub retry_period: Duration,
}

impl LeaseConfig {
    pub fn new(lease_name: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            lease_name: lease_name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The part of a lease record that changes on every renewal by anyone.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<Timestamp>,
    resource_version: Option<String>,
}

pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The last record seen and when (by our clock) it was first seen.
    observed: Option<(Record, Instant)>,
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, config: LeaseConfig) -> Self {
        Self {
            api,
            config,
            observed: None,
        }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// One attempt to acquire or renew; `Ok(true)` when we hold the lease now.
    /// Losing a write race (409) is `Ok(false)`, not an error.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.config.lease_name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.lease_name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_duration_seconds: Some(self.lease_seconds()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return accept_race(self.api.create(&PostParams::default(), &lease).await);
        };

        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let record = Record {
            holder: spec.holder_identity.clone(),
            renew_time: spec.renew_time.as_ref().map(|t| t.0),
            resource_version: lease.metadata.resource_version.clone(),
        };
        let first_seen = match &self.observed {
            Some((seen, at)) if *seen == record => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((record.clone(), at));
                at
            }
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if record.holder.as_deref() != Some(self.config.identity.as_str()) {
            let free = record.holder.as_deref().is_none_or(str::is_empty);
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.config.lease_duration, Duration::from_secs);
            if !free && first_seen.elapsed() < duration {
                return Ok(false);
            }
            spec.holder_identity = Some(self.config.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(self.lease_seconds());
        // `replace` sends our resourceVersion: if anyone wrote in between, we get 409.
        let name = self.config.lease_name.clone();
        accept_race(
            self.api
                .replace(&name, &PostParams::default(), &lease)
                .await,
        )
    }

    /// Gives the lease up on shutdown so the next replica need not wait it out.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.lease_name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        let name = self.config.lease_name.clone();
        accept_race(
            self.api
                .replace(&name, &PostParams::default(), &lease)
                .await,
        )
        .map(|_| ())
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&mut self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => tracing::debug!("lease held by another replica"),
                Err(e) => tracing::warn!(error = %e, "acquiring the leader lease failed"),
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    /// Renews until renewal is lost (another holder, or no success for
    /// `renew_deadline`); returns then, and the caller must stop acting at once.
    pub async fn hold(&mut self) {
        let mut last_renewed = Instant::now();
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            let left = self
                .config
                .renew_deadline
                .saturating_sub(last_renewed.elapsed());
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => last_renewed = Instant::now(),
                Ok(Ok(false)) => {
                    tracing::warn!("leader lease taken over by another replica");
                    return;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "renewing the leader lease failed"),
                Err(_) => {}
            }
            if last_renewed.elapsed() >= self.config.renew_deadline {
                tracing::warn!("could not renew the leader lease in time");
                return;
            }
        }
    }
}

fn accept_race<T>(result: Result<T, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}
