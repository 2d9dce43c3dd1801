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

#[cfg(test)]
mod tests {
    //! Two electors against one fake Lease API server that, like the real one,
    //! rejects writes carrying a stale resourceVersion. Time is paused and
    //! advanced by tokio, so the lease timings run in virtual time.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use http::{Method, Request, Response, StatusCode};
    use kube::Client;
    use kube::client::Body;
    use tokio::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Store {
        lease: Option<Lease>,
        version: u64,
    }

    struct Replica {
        elector: LeaderElector,
        /// While set, every call of this replica fails as if partitioned.
        partitioned: Arc<AtomicBool>,
        writes: Arc<AtomicU32>,
    }

    fn status(code: StatusCode, reason: &str) -> Response<Body> {
        let body = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": reason, "reason": reason, "code": code.as_u16()
        });
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&body).expect("json")))
            .expect("response")
    }

    fn ok(code: StatusCode, lease: &Lease) -> Response<Body> {
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(lease).expect("json")))
            .expect("response")
    }

    async fn answer(store: &Mutex<Store>, request: Request<Body>) -> Response<Body> {
        let method = request.method().clone();
        let body = request.into_body().collect_bytes().await.expect("body");
        let mut store = store.lock().await;
        match method {
            Method::GET => match &store.lease {
                Some(lease) => ok(StatusCode::OK, lease),
                None => status(StatusCode::NOT_FOUND, "NotFound"),
            },
            Method::POST => {
                if store.lease.is_some() {
                    return status(StatusCode::CONFLICT, "AlreadyExists");
                }
                let mut lease: Lease = serde_json::from_slice(&body).expect("lease");
                store.version += 1;
                lease.metadata.resource_version = Some(store.version.to_string());
                store.lease = Some(lease.clone());
                ok(StatusCode::CREATED, &lease)
            }
            Method::PUT => {
                let mut lease: Lease = serde_json::from_slice(&body).expect("lease");
                let current = store.version.to_string();
                if lease.metadata.resource_version.as_deref() != Some(current.as_str()) {
                    return status(StatusCode::CONFLICT, "Conflict");
                }
                store.version += 1;
                lease.metadata.resource_version = Some(store.version.to_string());
                store.lease = Some(lease.clone());
                ok(StatusCode::OK, &lease)
            }
            _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
        }
    }

    fn replica(store: Arc<Mutex<Store>>, identity: &str) -> Replica {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let partitioned = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU32::new(0));
        let (cut, counted) = (partitioned.clone(), writes.clone());
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                if cut.load(Ordering::SeqCst) {
                    send.send_response(status(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailable",
                    ));
                    continue;
                }
                if request.method() != Method::GET {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                send.send_response(answer(&store, request).await);
            }
        });
        let api = Api::namespaced(Client::new(service, "default"), "default");
        Replica {
            elector: LeaderElector::new(api, LeaseConfig::new("wallet-migrator-leader", identity)),
            partitioned,
            writes,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_lease_held_by_another_replica_is_not_taken() {
        let store = Arc::new(Mutex::new(Store::default()));
        let mut a = replica(store.clone(), "a");
        let mut b = replica(store.clone(), "b");
        assert!(a.elector.try_acquire_or_renew().await.expect("a acquires"));
        assert!(!b.elector.try_acquire_or_renew().await.expect("b asks"));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(a.elector.try_acquire_or_renew().await.expect("a renews"));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !b.elector
                .try_acquire_or_renew()
                .await
                .expect("b asks again")
        );
        assert_eq!(
            b.writes.load(Ordering::SeqCst),
            0,
            "a candidate only reads a held lease"
        );
        let lease = store.lock().await.lease.clone().expect("lease");
        let spec = lease.spec.expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_partitioned_leader_stops_before_another_takes_over() {
        let store = Arc::new(Mutex::new(Store::default()));
        let mut a = replica(store.clone(), "a");
        let mut b = replica(store.clone(), "b");
        a.elector.acquire().await;

        let a_leading = Arc::new(AtomicBool::new(true));
        let a_flag = a_leading.clone();
        let a_cut = a.partitioned.clone();
        let a_task = tokio::spawn(async move {
            a.elector.hold().await;
            a_flag.store(false, Ordering::SeqCst);
        });
        // b campaigns the whole time and must never win while a still acts.
        let b_saw_a_leading = Arc::new(AtomicBool::new(false));
        let b_flag = b_saw_a_leading.clone();
        let a_flag = a_leading.clone();
        let b_task = tokio::spawn(async move {
            b.elector.acquire().await;
            b_flag.store(a_flag.load(Ordering::SeqCst), Ordering::SeqCst);
            b
        });

        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(
            a_leading.load(Ordering::SeqCst),
            "a renews while it can reach the API"
        );
        assert!(
            !b_task.is_finished(),
            "b cannot take a lease that is being renewed"
        );

        a_cut.store(true, Ordering::SeqCst);
        let b = b_task.await.expect("b becomes leader");
        assert!(
            !b_saw_a_leading.load(Ordering::SeqCst),
            "two leaders at once"
        );
        assert!(a_task.is_finished(), "a stopped before b took over");
        let lease = store.lock().await.lease.clone().expect("lease");
        let spec = lease.spec.expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(1));
        drop(b);
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_lease_is_taken_at_once() {
        let store = Arc::new(Mutex::new(Store::default()));
        let mut a = replica(store.clone(), "a");
        let mut b = replica(store.clone(), "b");
        a.elector.acquire().await;
        assert!(!b.elector.try_acquire_or_renew().await.expect("b asks"));
        a.elector.release().await.expect("a releases");
        assert!(
            b.elector
                .try_acquire_or_renew()
                .await
                .expect("b takes the free lease")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn candidates_racing_for_a_free_lease_get_one_leader() {
        for _ in 0..20 {
            let store = Arc::new(Mutex::new(Store::default()));
            let mut a = replica(store.clone(), "a");
            let mut b = replica(store.clone(), "b");
            let (won_a, won_b) = tokio::join!(
                a.elector.try_acquire_or_renew(),
                b.elector.try_acquire_or_renew()
            );
            let (won_a, won_b) = (won_a.expect("a asks"), won_b.expect("b asks"));
            assert!(won_a != won_b, "exactly one winner: a={won_a} b={won_b}");
            let holder = store
                .lock()
                .await
                .lease
                .clone()
                .and_then(|l| l.spec?.holder_identity);
            assert_eq!(holder.as_deref(), Some(if won_a { "a" } else { "b" }));
        }
    }
}
