//! The WalletMigration controller: one Job per (target version, spec), followed to
//! the end, with the outcome written to the resource's status and, on failure, an
//! Event.

pub mod admin;
pub mod job;
pub mod leader;
pub mod metrics;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::crd::{
    CRD_NAME, CRD_REVISION, CRD_REVISION_ANNOTATION, Phase, WalletMigration, WalletMigrationStatus,
};
use job::JobState;
use leader::{LeaderElector, LeaseConfig};
pub use metrics::Metrics;

/// Field manager for server-side apply of the status.
pub const FIELD_MANAGER: &str = "wallet-migrator";
/// How often a running migration is looked at even without a Job event.
const RUNNING_REQUEUE: Duration = Duration::from_secs(10);
const BACKOFF_BASE: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Jobs per spec before a transient failure is final (then `spec.retry` starts over).
pub const MAX_ATTEMPTS: u32 = 5;
/// Wait before the operator's next attempt: 30 s, 60 s, 120 s ... capped at 10 minutes.
const RETRY_BASE: Duration = Duration::from_secs(30);
const RETRY_MAX: Duration = Duration::from_secs(600);

pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_FAILED: &str = "Failed";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("WalletMigration {0} has no namespace")]
    MissingNamespace(String),
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("the WalletMigration CRD is not installed or not readable: {0}")]
    CrdNotQueryable(#[source] kube::Error),
    #[error(
        "the WalletMigration CRD in the cluster is revision {found}, this operator needs revision {wanted}; helm upgrade does not update CRDs: run `kubectl apply --server-side -f charts/wallet/crds/` (or apply k8s/crds) and restart the operator"
    )]
    CrdOutdated { found: String, wanted: &'static str },
}

/// The wait before attempt `attempt + 1` after a transient failure.
pub fn retry_delay(attempt: u32) -> Duration {
    RETRY_BASE
        .saturating_mul(2u32.saturating_pow(attempt))
        .min(RETRY_MAX)
}

/// What reconcile needs, shared by every reconcile of this process.
pub struct Context {
    pub client: Client,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// Consecutive failures per object, for error_policy's backoff.
    failures: Mutex<HashMap<ObjectRef<WalletMigration>, u32>>,
}

impl Context {
    pub fn new(client: Client, metrics: Metrics, reporter: Reporter) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            failures: Mutex::default(),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<WalletMigration>, u32>> {
        // A poisoned map only holds backoff counters; keep using it.
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub async fn reconcile(wm: Arc<WalletMigration>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.measure();
    let result = reconcile_migration(&wm, &ctx).await;
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics.reconciles.with_label_values(&[label]).inc();
    if result.is_ok() {
        ctx.failures().remove(&ObjectRef::from_obj(wm.as_ref()));
    }
    result
}

/// Exponential backoff per object: 5s, 10s, 20s ... capped at 5 minutes.
pub fn error_policy(wm: Arc<WalletMigration>, error: &Error, ctx: Arc<Context>) -> Action {
    let attempts = {
        let mut failures = ctx.failures();
        let n = failures
            .entry(ObjectRef::from_obj(wm.as_ref()))
            .or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = BACKOFF_BASE
        .saturating_mul(2u32.saturating_pow(attempts.saturating_sub(1)))
        .min(BACKOFF_MAX);
    tracing::warn!(
        migration = %wm.name_any(),
        error = %error,
        attempts,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

async fn reconcile_migration(wm: &WalletMigration, ctx: &Context) -> Result<Action, Error> {
    let name = wm.name_any();
    let ns = wm
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(name.clone()))?;
    let generation = wm.metadata.generation;
    let current = wm.status.clone().unwrap_or_default();
    let this_spec = current.observed_generation == generation;
    let now = Timestamp::now();

    // A failed spec stays failed: retrying the same Job spec would fail the same
    // way and hide the first failure; a spec change (spec.retry) is what retries.
    if this_spec && current.phase == Some(Phase::Failed) {
        return Ok(Action::await_change());
    }
    let mut attempt = if this_spec {
        current.attempt.unwrap_or(0)
    } else {
        0
    };
    if this_spec && current.phase == Some(Phase::Retrying) {
        if let Some(at) = &current.next_attempt_time
            && at.0 > now
        {
            return Ok(Action::requeue(until(at, now)));
        }
        attempt = attempt.saturating_add(1);
    }
    let job_name = job::job_name(wm, attempt);
    // Finished for this spec; the Job may already be gone (ttlSecondsAfterFinished).
    if this_spec
        && current.phase == Some(Phase::Succeeded)
        && current.job_name.as_deref() == Some(job_name.as_str())
    {
        return Ok(Action::await_change());
    }

    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let mut created = false;
    let observed = match jobs.get_opt(&job_name).await? {
        Some(existing) => Observed::Job(job::observe(&existing)),
        None => {
            match jobs
                .create(&PostParams::default(), &job::build(wm, &job_name))
                .await
            {
                Ok(_) => {
                    created = true;
                    ctx.metrics.jobs.with_label_values(&["created"]).inc();
                    tracing::info!(migration = %name, job = %job_name, target = wm.spec.target_version, attempt, "created migration Job");
                }
                // Created by us a moment ago and not yet visible to get: same Job.
                Err(kube::Error::Api(s)) if s.is_already_exists() => {}
                Err(e) => return Err(e.into()),
            }
            Observed::Created
        }
    };
    let database_version = if observed == Observed::Job(JobState::Complete) {
        reported_version(ctx, &ns, &job_name).await
    } else {
        None
    };

    let found = Found {
        job_name: &job_name,
        attempt,
        observed: &observed,
        database_version,
    };
    let desired = desired_status(&current, wm, &found, now);
    if desired == current {
        return Ok(next_action(&desired, now));
    }
    let transition = desired.phase != current.phase || desired.job_name != current.job_name;
    if transition {
        let target = wm.spec.target_version;
        let event = match (&observed, desired.phase) {
            (Observed::Created, _) if created => Some((
                EventType::Normal,
                "JobCreated",
                format!("Created Job {job_name} to migrate the schema to version {target}"),
            )),
            (Observed::Job(JobState::Complete), _) => {
                ctx.metrics.jobs.with_label_values(&["succeeded"]).inc();
                let version = desired.applied_version.unwrap_or(target);
                tracing::info!(migration = %name, job = %job_name, version, target, "migration succeeded");
                Some((
                    EventType::Normal,
                    "MigrationSucceeded",
                    format!("Schema at version {version}, target {target} (Job {job_name})"),
                ))
            }
            (Observed::Job(JobState::Failed { reason, message }), Some(Phase::Retrying)) => {
                ctx.metrics.jobs.with_label_values(&["failed"]).inc();
                let delay = retry_delay(attempt);
                tracing::warn!(migration = %name, job = %job_name, %reason, %message, attempt, retry_in = ?delay, "migration failed; retrying");
                Some((
                    EventType::Warning,
                    "MigrationRetrying",
                    format!(
                        "Job {job_name} failed migrating to version {target}: {reason}: {message}; attempt {} of {MAX_ATTEMPTS} in {}s",
                        attempt + 2,
                        delay.as_secs()
                    ),
                ))
            }
            (Observed::Job(JobState::Failed { reason, message }), _) => {
                ctx.metrics.jobs.with_label_values(&["failed"]).inc();
                tracing::warn!(migration = %name, job = %job_name, %reason, %message, "migration failed");
                Some((
                    EventType::Warning,
                    "MigrationFailed",
                    format!(
                        "Job {job_name} failed migrating to version {target}: {reason}: {message}; raise spec.retry to run it again"
                    ),
                ))
            }
            _ => None,
        };
        if let Some((type_, reason, note)) = event {
            publish(ctx, wm, type_, reason, note).await;
        }
    }
    let api: Api<WalletMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = Patch::Apply(json!({
        "apiVersion": "wallet.dev/v1alpha1",
        "kind": "WalletMigration",
        "status": desired,
    }));
    api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &patch)
        .await?;
    Ok(next_action(&desired, now))
}

fn until(at: &Time, now: Timestamp) -> Duration {
    let millis = at.0.as_millisecond().saturating_sub(now.as_millisecond());
    Duration::from_millis(u64::try_from(millis).unwrap_or(0))
}

/// The version the Job's `apply` found in the database (`version=<N>` in its
/// termination message). The database may be above the target, after a rollback to an
/// older release; the status says what the database has. `None` when the pod is gone or
/// unreadable: the Job completed, so the database is at the target or above.
async fn reported_version(ctx: &Context, ns: &str, job_name: &str) -> Option<i64> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let selector = format!("batch.kubernetes.io/job-name={job_name}");
    let list = match pods.list(&ListParams::default().labels(&selector)).await {
        Ok(list) => list,
        Err(e) => {
            tracing::warn!(job = %job_name, error = %e, "cannot read the migration pod's termination message");
            return None;
        }
    };
    list.items
        .iter()
        .filter_map(|pod| pod.status.as_ref()?.container_statuses.as_ref())
        .flatten()
        .filter(|c| c.name == job::CONTAINER_NAME)
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.as_deref())
        .find_map(|message| message.trim().strip_prefix("version=")?.parse().ok())
}

fn next_action(status: &WalletMigrationStatus, now: Timestamp) -> Action {
    match (status.phase, &status.next_attempt_time) {
        (Some(Phase::Succeeded | Phase::Failed), _) => Action::await_change(),
        (Some(Phase::Retrying), Some(at)) => Action::requeue(until(at, now)),
        _ => Action::requeue(RUNNING_REQUEUE),
    }
}

/// Events are for people reading `kubectl describe`; the status is the record, so
/// a failed publish (say, missing RBAC) is logged and does not fail the reconcile.
async fn publish(
    ctx: &Context,
    wm: &WalletMigration,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        // The API server rejects notes over 1 kB.
        note: Some(truncate(&note, 1024)),
        action: "Migrate".to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &wm.object_ref(&())).await {
        tracing::warn!(migration = %wm.name_any(), reason, error = %e, "publishing an event failed");
    }
}
/// What the reconcile found for this spec's Job.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Observed {
    Created,
    Job(JobState),
}

/// What this reconcile found.
struct Found<'a> {
    job_name: &'a str,
    attempt: u32,
    observed: &'a Observed,
    /// From the completed Job's termination message.
    database_version: Option<i64>,
}

fn desired_status(
    current: &WalletMigrationStatus,
    wm: &WalletMigration,
    found: &Found<'_>,
    now: Timestamp,
) -> WalletMigrationStatus {
    let generation = wm.metadata.generation;
    let target = wm.spec.target_version;
    let job_name = found.job_name;
    let attempt = found.attempt;
    let condition = |type_: &str, status: bool, reason: &str, message: String| Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: Time(now),
    };
    let mut next_attempt_time = None;
    let (phase, conditions) = match found.observed {
        Observed::Created => (
            Phase::Pending,
            vec![condition(
                CONDITION_READY,
                false,
                "JobCreated",
                format!("created Job {job_name} to migrate to version {target}"),
            )],
        ),
        Observed::Job(JobState::Running) => (
            Phase::Running,
            vec![condition(
                CONDITION_READY,
                false,
                "JobRunning",
                format!("Job {job_name} is migrating to version {target}"),
            )],
        ),
        Observed::Job(JobState::Complete) => {
            let version = found.database_version.unwrap_or(target);
            (
                Phase::Succeeded,
                vec![condition(
                    CONDITION_READY,
                    true,
                    "MigrationSucceeded",
                    format!("schema at version {version}, target {target} (Job {job_name})"),
                )],
            )
        }
        Observed::Job(JobState::Failed { reason, message })
            if reason != job::REASON_POD_FAILURE_POLICY && attempt + 1 < MAX_ATTEMPTS =>
        {
            let delay = retry_delay(attempt);
            let at = now.checked_add(jiff_span(delay)).unwrap_or(now);
            next_attempt_time = Some(Time(at));
            (
                Phase::Retrying,
                vec![
                    condition(
                        CONDITION_READY,
                        false,
                        "MigrationRetrying",
                        format!(
                            "Job {job_name} failed ({reason}: {message}); attempt {} of {MAX_ATTEMPTS} at {at}",
                            attempt + 2
                        ),
                    ),
                    condition(CONDITION_FAILED, false, reason, message.clone()),
                ],
            )
        }
        Observed::Job(JobState::Failed { reason, message }) => {
            let why = if reason == job::REASON_POD_FAILURE_POLICY {
                "the migration itself failed, a retry would fail the same way".to_owned()
            } else {
                format!("{MAX_ATTEMPTS} attempts failed")
            };
            (
                Phase::Failed,
                vec![
                    condition(
                        CONDITION_READY,
                        false,
                        "MigrationFailed",
                        format!(
                            "Job {job_name} failed ({why}); the schema is not at version {target}; raise spec.retry to run it again"
                        ),
                    ),
                    condition(CONDITION_FAILED, true, reason, message.clone()),
                ],
            )
        }
    };
    let applied_version = if phase == Phase::Succeeded {
        Some(found.database_version.unwrap_or(target))
    } else {
        current.applied_version
    };
    WalletMigrationStatus {
        phase: Some(phase),
        conditions: keep_transition_times(&current.conditions, conditions),
        applied_version,
        attempt: (attempt > 0).then_some(attempt),
        next_attempt_time,
        job_name: Some(job_name.to_owned()),
        observed_generation: generation,
    }
}

fn jiff_span(delay: Duration) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::from_secs(i64::try_from(delay.as_secs()).unwrap_or(i64::MAX))
}

/// A condition's lastTransitionTime moves only when its status flips, so an
/// unchanged status compares equal and causes no write.
fn keep_transition_times(old: &[Condition], mut new: Vec<Condition>) -> Vec<Condition> {
    for c in &mut new {
        if let Some(prev) = old
            .iter()
            .find(|p| p.type_ == c.type_ && p.status == c.status)
        {
            c.last_transition_time = prev.last_transition_time.clone();
        }
    }
    new
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Operator settings from the environment.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    pub namespace: String,
    pub pod_name: String,
    pub lease_name: String,
    /// Label selector of the WalletMigrations this operator owns: two releases in one
    /// namespace each run an operator, and each must act on its own resource only.
    pub selector: Option<String>,
}

/// Runs the controller while this replica holds the leader lease, until `shutdown`.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let migrations: Api<WalletMigration> = Api::namespaced(client.clone(), &config.namespace);
    migrations
        .list(&ListParams::default().limit(1))
        .await
        .map_err(Error::CrdNotQueryable)?;
    check_crd_revision(&client).await?;

    let reporter = Reporter {
        controller: FIELD_MANAGER.to_owned(),
        instance: Some(config.pod_name.clone()),
    };
    let ctx = Arc::new(Context::new(client.clone(), metrics, reporter));
    let mut elector = LeaderElector::new(
        Api::<Lease>::namespaced(client.clone(), &config.namespace),
        LeaseConfig::new(config.lease_name.clone(), config.pod_name.clone()),
    );

    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = elector.acquire() => {}
        }
        tracing::info!(identity = %config.pod_name, lease = %config.lease_name, "became leader");
        let term = shutdown.child_token();
        let controller = run_controller(
            client.clone(),
            &config.namespace,
            config.selector.as_deref(),
            ctx.clone(),
            term.clone(),
        );
        tokio::select! {
            () = controller => {
                if let Err(e) = elector.release().await {
                    tracing::warn!(error = %e, "releasing the leader lease failed");
                }
                return Ok(());
            }
            () = elector.hold() => {
                // Stop acting now: dropping the controller drops in-flight reconciles.
                term.cancel();
                tracing::warn!("lost leadership; controller stopped");
            }
        }
    }
}

/// `helm upgrade` never touches CRDs: an operator newer than its CRD would write fields
/// the API server prunes. Reading the CRD needs a ClusterRole (get on this one CRD); an
/// install without it is warned about, not stopped.
async fn check_crd_revision(client: &Client) -> Result<(), Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match crds.get(CRD_NAME).await {
        Ok(crd) => {
            let found = crd
                .annotations()
                .get(CRD_REVISION_ANNOTATION)
                .cloned()
                .unwrap_or_else(|| "1 (no annotation)".to_owned());
            if found == CRD_REVISION {
                Ok(())
            } else {
                Err(Error::CrdOutdated {
                    found,
                    wanted: CRD_REVISION,
                })
            }
        }
        Err(e) => {
            tracing::warn!(crd = CRD_NAME, error = %e, "cannot read the CRD to check its revision; if the operator misbehaves after an upgrade, run `kubectl apply --server-side -f charts/wallet/crds/`");
            Ok(())
        }
    }
}

async fn run_controller(
    client: Client,
    namespace: &str,
    selector: Option<&str>,
    ctx: Arc<Context>,
    stop: CancellationToken,
) {
    let migrations: Api<WalletMigration> = Api::namespaced(client.clone(), namespace);
    let jobs: Api<Job> = Api::namespaced(client, namespace);
    let mut config = watcher::Config::default();
    let mut job_labels = "app.kubernetes.io/managed-by=wallet-migrator".to_owned();
    if let Some(selector) = selector {
        config = config.labels(selector);
        // Jobs carry their resource's instance label (job::build), so the same selector
        // keeps another release's Jobs out too.
        job_labels = format!("{job_labels},{selector}");
    }
    Controller::new(migrations, config)
        .owns(jobs, watcher::Config::default().labels(&job_labels))
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(migration = %obj.name, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "controller error"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests;
