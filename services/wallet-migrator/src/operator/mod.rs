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
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::crd::{Phase, WalletMigration, WalletMigrationStatus};
use job::JobState;
use leader::{LeaderElector, LeaseConfig};
pub use metrics::Metrics;

/// Field manager for server-side apply of the status.
pub const FIELD_MANAGER: &str = "wallet-migrator";
/// How often a running migration is looked at even without a Job event.
const RUNNING_REQUEUE: Duration = Duration::from_secs(10);
const BACKOFF_BASE: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

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
    let job_name = job::job_name(&name, &wm.spec);
    let current = wm.status.clone().unwrap_or_default();
    let this_spec = current.observed_generation == generation;

    // A failed spec stays failed: retrying the same Job spec would fail the same
    // way and hide the first failure; a spec change is what retries.
    if this_spec && current.phase == Some(Phase::Failed) {
        return Ok(Action::await_change());
    }
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
                    tracing::info!(migration = %name, job = %job_name, target = wm.spec.target_version, "created migration Job");
                }
                // Created by us a moment ago and not yet visible to get: same Job.
                Err(kube::Error::Api(s)) if s.is_already_exists() => {}
                Err(e) => return Err(e.into()),
            }
            Observed::Created
        }
    };

    let desired = desired_status(&current, wm, &job_name, &observed, Timestamp::now());
    if desired == current {
        return Ok(next_action(&desired));
    }
    let transition = desired.phase != current.phase || desired.job_name != current.job_name;
    if transition {
        let target = wm.spec.target_version;
        let event = match &observed {
            Observed::Created if created => Some((
                EventType::Normal,
                "JobCreated",
                format!("Created Job {job_name} to migrate the schema to version {target}"),
            )),
            Observed::Job(JobState::Complete) => {
                ctx.metrics.jobs.with_label_values(&["succeeded"]).inc();
                tracing::info!(migration = %name, job = %job_name, version = target, "migration succeeded");
                Some((
                    EventType::Normal,
                    "MigrationSucceeded",
                    format!("Schema at version {target} (Job {job_name})"),
                ))
            }
            Observed::Job(JobState::Failed { reason, message }) => {
                ctx.metrics.jobs.with_label_values(&["failed"]).inc();
                tracing::warn!(migration = %name, job = %job_name, %reason, %message, "migration failed");
                Some((
                    EventType::Warning,
                    "MigrationFailed",
                    format!(
                        "Job {job_name} failed migrating to version {target}: {reason}: {message}"
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
    Ok(next_action(&desired))
}

fn next_action(status: &WalletMigrationStatus) -> Action {
    match status.phase {
        Some(Phase::Succeeded | Phase::Failed) => Action::await_change(),
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

fn desired_status(
    current: &WalletMigrationStatus,
    wm: &WalletMigration,
    job_name: &str,
    observed: &Observed,
    now: Timestamp,
) -> WalletMigrationStatus {
    let generation = wm.metadata.generation;
    let target = wm.spec.target_version;
    let condition = |type_: &str, status: bool, reason: &str, message: String| Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: Time(now),
    };
    let (phase, conditions) = match observed {
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
        Observed::Job(JobState::Complete) => (
            Phase::Succeeded,
            vec![condition(
                CONDITION_READY,
                true,
                "MigrationSucceeded",
                format!("schema at version {target} (Job {job_name})"),
            )],
        ),
        Observed::Job(JobState::Failed { reason, message }) => (
            Phase::Failed,
            vec![
                condition(
                    CONDITION_READY,
                    false,
                    "MigrationFailed",
                    format!("Job {job_name} failed; the schema is not at version {target}"),
                ),
                condition(CONDITION_FAILED, true, reason, message.clone()),
            ],
        ),
    };
    let applied_version = if phase == Phase::Succeeded {
        Some(target)
    } else {
        current.applied_version
    };
    WalletMigrationStatus {
        phase: Some(phase),
        conditions: keep_transition_times(&current.conditions, conditions),
        applied_version,
        job_name: Some(job_name.to_owned()),
        observed_generation: generation,
    }
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
        .list(&kube::api::ListParams::default().limit(1))
        .await
        .map_err(Error::CrdNotQueryable)?;

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
        let controller =
            run_controller(client.clone(), &config.namespace, ctx.clone(), term.clone());
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

async fn run_controller(
    client: Client,
    namespace: &str,
    ctx: Arc<Context>,
    stop: CancellationToken,
) {
    let migrations: Api<WalletMigration> = Api::namespaced(client.clone(), namespace);
    let jobs: Api<Job> = Api::namespaced(client, namespace);
    Controller::new(migrations, watcher::Config::default())
        .owns(
            jobs,
            watcher::Config::default().labels("app.kubernetes.io/managed-by=wallet-migrator"),
        )
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
