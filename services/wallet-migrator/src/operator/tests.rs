//! Reconcile against a mocked API server (see fixtures.rs): each test pins the
//! exact calls one reconcile makes for one situation.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::controller::Action;

use super::{CONDITION_FAILED, CONDITION_READY, Context, Error, error_policy, reconcile};
use crate::crd::{JobSettings, Phase, WalletMigration, WalletMigrationStatus};
use crate::fixtures::{Recorded, Scenario, job_condition, timeout_after_1s};

fn condition<'a>(
    status: &'a WalletMigrationStatus,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status:?}"))
}

/// Reconciles `wm` once against `scenario`; returns what the API server saw.
async fn reconcile_once(
    wm: &WalletMigration,
    scenario: Scenario,
) -> (Action, Recorded, Arc<Context>) {
    let (ctx, fakeserver, _registry) = Context::test();
    let mocksrv = fakeserver.run(scenario);
    let action = reconcile(Arc::new(wm.clone()), ctx.clone())
        .await
        .expect("reconciler");
    (action, timeout_after_1s(mocksrv).await, ctx)
}

#[tokio::test]
async fn new_resource_creates_the_migration_job() {
    let mut wm = WalletMigration::test();
    wm.spec.job = Some(JobSettings {
        backoff_limit: Some(4),
        ..JobSettings::default()
    });
    let (action, recorded, ctx) = reconcile_once(&wm, Scenario::CreateJob(wm.clone())).await;

    let job = recorded.created_job.expect("a Job was created");
    assert_eq!(job.name_any(), wm.expected_job_name());
    assert!(
        job.name_any().starts_with("wallet-v1-"),
        "{}",
        job.name_any()
    );
    let owner = &job.owner_references()[0];
    assert_eq!(owner.kind, "WalletMigration");
    assert_eq!(owner.api_version, "wallet.dev/v1alpha1");
    assert_eq!(owner.name, "wallet");
    assert_eq!(owner.uid, wm.uid().expect("uid"));
    assert_eq!(owner.controller, Some(true));

    let spec = job.spec.expect("job spec");
    assert_eq!(spec.backoff_limit, Some(4));
    assert_eq!(spec.ttl_seconds_after_finished, Some(86_400));
    assert_eq!(spec.active_deadline_seconds, Some(600));
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    let pod_security = pod.security_context.expect("pod security context");
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_eq!(
        pod_security.seccomp_profile.map(|p| p.type_).as_deref(),
        Some("RuntimeDefault")
    );
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example/wallet:1.0.0")
    );
    assert_eq!(
        container.command.as_deref(),
        Some(&["wallet-migrator".to_owned(), "apply".to_owned()][..])
    );
    let env = container.env.as_deref().unwrap_or_default();
    let url = env
        .iter()
        .find(|e| e.name == "DATABASE_URL")
        .expect("DATABASE_URL env");
    let secret = url
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .expect("DATABASE_URL from a Secret");
    assert_eq!(secret.name, "wallet-database");
    assert_eq!(secret.key, "DATABASE_URL");
    assert!(url.value.is_none(), "the URL never appears in the Job spec");
    let security = container
        .security_context
        .as_ref()
        .expect("container security context");
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_owned()])
    );

    let event = recorded.event.expect("event published");
    assert_eq!(event["type"], "Normal");
    assert_eq!(event["reason"], "JobCreated");

    let status = recorded.status.expect("status patched");
    assert_eq!(status.phase, Some(Phase::Pending));
    assert_eq!(
        status.job_name.as_deref(),
        Some(wm.expected_job_name().as_str())
    );
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(condition(&status, CONDITION_READY).status, "False");
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    assert_eq!(ctx.metrics.jobs.with_label_values(&["created"]).get(), 1);
    assert_eq!(ctx.metrics.reconciles.with_label_values(&["ok"]).get(), 1);
}

#[tokio::test]
async fn running_job_sets_phase_running_and_requeues() {
    let wm = WalletMigration::test();
    let job = wm.job(1, vec![]);
    let (action, recorded, _) =
        reconcile_once(&wm, Scenario::JobThenStatusPatch(wm.clone(), job)).await;
    assert!(recorded.created_job.is_none());
    let status = recorded.status.expect("status patched");
    assert_eq!(status.phase, Some(Phase::Running));
    assert_eq!(condition(&status, CONDITION_READY).reason, "JobRunning");
    assert_eq!(status.applied_version, None);
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

#[tokio::test]
async fn running_job_with_status_already_running_makes_no_write() {
    let wm = WalletMigration::test();
    let job = wm.job(1, vec![]);
    let (_, first, _) =
        reconcile_once(&wm, Scenario::JobThenStatusPatch(wm.clone(), job.clone())).await;
    let wm = wm.with_status(first.status.expect("status patched"));

    let (action, second, _) = reconcile_once(&wm, Scenario::JobUnchanged(job)).await;
    assert!(second.status.is_none() && second.created_job.is_none());
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

#[tokio::test]
async fn complete_job_sets_succeeded_and_applied_version() {
    let mut wm = WalletMigration::test();
    wm.spec.target_version = 3;
    let job = wm.job(
        0,
        vec![job_condition("Complete", "CompletionsReached", "done")],
    );
    let (action, recorded, ctx) =
        reconcile_once(&wm, Scenario::JobThenEventThenStatusPatch(wm.clone(), job)).await;
    let event = recorded.event.expect("event published");
    assert_eq!(event["type"], "Normal");
    assert_eq!(event["reason"], "MigrationSucceeded");
    let status = recorded.status.expect("status patched");
    assert_eq!(status.phase, Some(Phase::Succeeded));
    assert_eq!(status.applied_version, Some(3));
    let ready = condition(&status, CONDITION_READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "MigrationSucceeded")
    );
    assert_eq!(action, Action::await_change());
    assert_eq!(ctx.metrics.jobs.with_label_values(&["succeeded"]).get(), 1);
}

#[tokio::test]
async fn failed_job_sets_failed_condition_and_publishes_an_event() {
    let wm = WalletMigration::test();
    let job = wm.job(
        0,
        vec![job_condition(
            "Failed",
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        )],
    );
    let (action, recorded, ctx) =
        reconcile_once(&wm, Scenario::JobThenEventThenStatusPatch(wm.clone(), job)).await;
    assert!(
        recorded.created_job.is_none(),
        "no new Job for a failed spec"
    );

    let event = recorded.event.expect("event published");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "MigrationFailed");
    assert_eq!(event["regarding"]["kind"], "WalletMigration");
    assert_eq!(event["regarding"]["name"], "wallet");
    let note = event["note"].as_str().unwrap_or_default();
    assert!(note.contains("BackoffLimitExceeded"), "{note}");

    let status = recorded.status.expect("status patched");
    assert_eq!(status.phase, Some(Phase::Failed));
    let failed = condition(&status, CONDITION_FAILED);
    assert_eq!(failed.status, "True");
    assert_eq!(failed.reason, "BackoffLimitExceeded");
    assert_eq!(
        failed.message,
        "Job has reached the specified backoff limit"
    );
    assert_eq!(condition(&status, CONDITION_READY).status, "False");
    assert_eq!(action, Action::await_change());
    assert_eq!(ctx.metrics.jobs.with_label_values(&["failed"]).get(), 1);
}

#[tokio::test]
async fn a_refused_event_does_not_keep_the_status_from_being_written() {
    let wm = WalletMigration::test();
    let job = wm.job(
        0,
        vec![job_condition("Failed", "DeadlineExceeded", "too slow")],
    );
    let (_, recorded, _) = reconcile_once(
        &wm,
        Scenario::JobThenForbiddenEventThenStatusPatch(wm.clone(), job),
    )
    .await;
    let status = recorded.status.expect("status patched");
    assert_eq!(status.phase, Some(Phase::Failed));
    assert_eq!(
        condition(&status, CONDITION_FAILED).reason,
        "DeadlineExceeded"
    );
}

#[tokio::test]
async fn finished_resource_reconciles_again_without_any_api_call() {
    let wm = WalletMigration::test();
    let job = wm.job(
        0,
        vec![job_condition("Complete", "CompletionsReached", "done")],
    );
    let (_, first, _) =
        reconcile_once(&wm, Scenario::JobThenEventThenStatusPatch(wm.clone(), job)).await;
    let succeeded = wm
        .clone()
        .with_status(first.status.expect("status patched"));
    let (action, second, _) = reconcile_once(&succeeded, Scenario::RadioSilence).await;
    assert!(second.status.is_none());
    assert_eq!(action, Action::await_change());

    let job = wm.job(
        0,
        vec![job_condition("Failed", "DeadlineExceeded", "too slow")],
    );
    let (_, first, _) =
        reconcile_once(&wm, Scenario::JobThenEventThenStatusPatch(wm.clone(), job)).await;
    let failed = wm.with_status(first.status.expect("status patched"));
    let (action, second, _) = reconcile_once(&failed, Scenario::RadioSilence).await;
    assert!(second.status.is_none() && second.event.is_none());
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn spec_change_creates_a_new_job_for_the_new_version() {
    let old = WalletMigration::test();
    let job = old.job(
        0,
        vec![job_condition("Complete", "CompletionsReached", "done")],
    );
    let (_, first, _) = reconcile_once(
        &old,
        Scenario::JobThenEventThenStatusPatch(old.clone(), job),
    )
    .await;
    let old_status = first.status.expect("status patched");

    // A new release: the chart bumps targetVersion and image; the API server bumps generation.
    let mut new = old.clone().with_status(old_status.clone());
    new.spec.target_version = 2;
    new.spec.image = "registry.example/wallet:1.1.0".to_owned();
    new.metadata.generation = Some(2);
    assert_ne!(new.expected_job_name(), old.expected_job_name());

    let (_, recorded, _) = reconcile_once(&new, Scenario::CreateJob(new.clone())).await;
    let job = recorded.created_job.expect("a new Job");
    assert!(
        job.name_any().starts_with("wallet-v2-"),
        "{}",
        job.name_any()
    );
    let image = job
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.containers[0].image.clone());
    assert_eq!(image.as_deref(), Some("registry.example/wallet:1.1.0"));
    let status = recorded.status.expect("status patched");
    assert_eq!(status.phase, Some(Phase::Pending));
    assert_eq!(status.observed_generation, Some(2));
    assert_eq!(
        status.applied_version,
        Some(1),
        "still the version actually applied"
    );
}

#[tokio::test]
async fn failed_spec_is_retried_after_a_spec_change() {
    let wm = WalletMigration::test();
    let job = wm.job(
        0,
        vec![job_condition("Failed", "BackoffLimitExceeded", "boom")],
    );
    let (_, first, _) =
        reconcile_once(&wm, Scenario::JobThenEventThenStatusPatch(wm.clone(), job)).await;
    let mut fixed = wm
        .clone()
        .with_status(first.status.expect("status patched"));
    fixed.spec.image = "registry.example/wallet:1.0.1".to_owned();
    fixed.metadata.generation = Some(2);

    let (_, recorded, _) = reconcile_once(&fixed, Scenario::CreateJob(fixed.clone())).await;
    assert!(recorded.created_job.is_some());
    let status = recorded.status.expect("status patched");
    assert_eq!(status.phase, Some(Phase::Pending));
    assert!(
        status
            .conditions
            .iter()
            .all(|c| c.type_ != CONDITION_FAILED),
        "the old failure is cleared for the new spec"
    );
}

#[tokio::test]
async fn reconcile_errors_count_and_back_off_exponentially() {
    let (ctx, fakeserver, _registry) = Context::test();
    let mut wm = WalletMigration::test();
    wm.metadata.namespace = None;
    let wm = Arc::new(wm);
    let mocksrv = fakeserver.run(Scenario::RadioSilence);
    let err = reconcile(wm.clone(), ctx.clone())
        .await
        .expect_err("a resource without namespace cannot be reconciled");
    timeout_after_1s(mocksrv).await;
    assert!(matches!(err, Error::MissingNamespace(_)));
    assert_eq!(
        ctx.metrics.reconciles.with_label_values(&["error"]).get(),
        1
    );

    let delays: Vec<Action> = (0..8)
        .map(|_| error_policy(wm.clone(), &err, ctx.clone()))
        .collect();
    assert_eq!(delays[0], Action::requeue(Duration::from_secs(5)));
    assert_eq!(delays[1], Action::requeue(Duration::from_secs(10)));
    assert_eq!(delays[2], Action::requeue(Duration::from_secs(20)));
    assert_eq!(
        delays[7],
        Action::requeue(Duration::from_secs(300)),
        "capped"
    );
}

#[tokio::test]
async fn run_refuses_to_start_without_the_crd() {
    use http::{Request, Response, StatusCode};
    use kube::client::Body;

    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let apiserver = tokio::spawn(async move {
        let (request, send) = handle.next_request().await.expect("service not called");
        assert_eq!(
            request.uri().path(),
            "/apis/wallet.dev/v1alpha1/namespaces/wallet/walletmigrations"
        );
        // What an API server without the CRD answers: a plain 404.
        send.send_response(
            Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Body::from(b"404 page not found".to_vec()))
                .expect("response"),
        );
    });
    let registry = prometheus::Registry::new();
    let config = super::OperatorConfig {
        namespace: "wallet".to_owned(),
        pod_name: "wallet-migrator-0".to_owned(),
        lease_name: "wallet-migrator-leader".to_owned(),
    };
    let result = super::run(
        kube::Client::new(service, "default"),
        config,
        super::Metrics::register(&registry).expect("metrics"),
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    timeout_after_1s_unit(apiserver).await;
    assert!(
        matches!(result, Err(Error::CrdNotQueryable(_))),
        "{result:?}"
    );
}

async fn timeout_after_1s_unit(handle: tokio::task::JoinHandle<()>) {
    tokio::time::timeout(Duration::from_secs(1), handle)
        .await
        .expect("timeout on mock apiserver")
        .expect("scenario succeeded");
}
