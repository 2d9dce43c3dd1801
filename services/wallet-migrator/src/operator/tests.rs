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
        backoff_limit: Some(5),
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
    assert_eq!(spec.backoff_limit, Some(5));
    let rules = spec.pod_failure_policy.expect("podFailurePolicy").rules;
    assert_eq!(rules[0].action, "FailJob");
    assert_eq!(
        rules[0].on_exit_codes.as_ref().map(|c| c.values.clone()),
        Some(vec![super::job::EXIT_PERMANENT])
    );
    assert_eq!(
        job.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(super::job::LABEL_INSTANCE)),
        Some(&"wallet".to_owned()),
        "the Job belongs to the resource's release"
    );
    assert_eq!(
        spec.template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.as_ref())
            .and_then(|l| l.get(super::job::LABEL_INSTANCE)),
        Some(&"wallet".to_owned()),
        "so do its pods"
    );
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
    assert_eq!(
        container.args.as_deref(),
        Some(
            &[
                "--target".to_owned(),
                "1".to_owned(),
                "--termination-log".to_owned(),
                "/dev/termination-log".to_owned()
            ][..]
        )
    );
    assert_eq!(
        container.termination_message_path.as_deref(),
        Some("/dev/termination-log")
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
    let (action, recorded, ctx) = reconcile_once(
        &wm,
        Scenario::JobCompleted(wm.clone(), job, Some("version=3\n".to_owned())),
    )
    .await;
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
            "PodFailurePolicy",
            "Container migrate for pod default/wallet-v1-x exited with exit code 3",
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
    assert!(note.contains("PodFailurePolicy"), "{note}");
    assert!(note.contains("spec.retry"), "{note}");

    let status = recorded.status.expect("status patched");
    assert_eq!(status.phase, Some(Phase::Failed));
    let failed = condition(&status, CONDITION_FAILED);
    assert_eq!(failed.status, "True");
    assert_eq!(failed.reason, "PodFailurePolicy");
    assert!(failed.message.contains("exit code 3"), "{}", failed.message);
    assert_eq!(condition(&status, CONDITION_READY).status, "False");
    assert_eq!(action, Action::await_change());
    assert_eq!(ctx.metrics.jobs.with_label_values(&["failed"]).get(), 1);
}

#[tokio::test]
async fn a_refused_event_does_not_keep_the_status_from_being_written() {
    let wm = WalletMigration::test();
    let job = wm.job(
        0,
        vec![job_condition("Failed", "PodFailurePolicy", "exit code 3")],
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
        "PodFailurePolicy"
    );
}

#[tokio::test]
async fn finished_resource_reconciles_again_without_any_api_call() {
    let wm = WalletMigration::test();
    let job = wm.job(
        0,
        vec![job_condition("Complete", "CompletionsReached", "done")],
    );
    let (_, first, _) = reconcile_once(
        &wm,
        Scenario::JobCompleted(wm.clone(), job, Some("version=1".to_owned())),
    )
    .await;
    let succeeded = wm
        .clone()
        .with_status(first.status.expect("status patched"));
    let (action, second, _) = reconcile_once(&succeeded, Scenario::RadioSilence).await;
    assert!(second.status.is_none());
    assert_eq!(action, Action::await_change());

    let job = wm.job(
        0,
        vec![job_condition("Failed", "PodFailurePolicy", "exit code 3")],
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
        Scenario::JobCompleted(old.clone(), job, Some("version=1".to_owned())),
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
async fn failed_spec_is_retried_after_spec_retry_is_raised() {
    let wm = WalletMigration::test();
    let job = wm.job(
        0,
        vec![job_condition("Failed", "PodFailurePolicy", "exit code 3")],
    );
    let (_, first, _) =
        reconcile_once(&wm, Scenario::JobThenEventThenStatusPatch(wm.clone(), job)).await;
    let mut fixed = wm
        .clone()
        .with_status(first.status.expect("status patched"));
    // Nothing else changes: the database (or its Secret) was fixed outside the spec.
    fixed.spec.retry = Some(1);
    fixed.metadata.generation = Some(2);
    assert_ne!(fixed.expected_job_name(), wm.expected_job_name());

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
        selector: None,
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

#[tokio::test]
async fn a_rollback_reports_the_version_the_database_really_has() {
    // An older release (target 1) meets a database a newer one migrated to 2: its
    // `apply --target 1` succeeds and reports version 2, and so must the status.
    let wm = WalletMigration::test();
    let job = wm.job(
        0,
        vec![job_condition("Complete", "CompletionsReached", "done")],
    );
    let (_, recorded, _) = reconcile_once(
        &wm,
        Scenario::JobCompleted(wm.clone(), job, Some("version=2\n".to_owned())),
    )
    .await;
    let status = recorded.status.expect("status patched");
    assert_eq!(status.phase, Some(Phase::Succeeded));
    assert_eq!(status.applied_version, Some(2));
    let ready = condition(&status, CONDITION_READY);
    assert!(
        ready.message.contains("schema at version 2, target 1"),
        "{}",
        ready.message
    );
}

#[tokio::test]
async fn a_rollback_to_an_earlier_spec_runs_a_job_of_its_own() {
    // Same spec as generation 1's, so without the generation in the name the operator
    // would find generation 1's finished Job and report its outcome.
    let first = WalletMigration::test();
    let mut rolled_back = first.clone();
    rolled_back.metadata.generation = Some(3);
    assert_ne!(rolled_back.expected_job_name(), first.expected_job_name());
    let (_, recorded, _) =
        reconcile_once(&rolled_back, Scenario::CreateJob(rolled_back.clone())).await;
    assert_eq!(
        recorded.created_job.map(|j| j.name_any()),
        Some(rolled_back.expected_job_name())
    );
}

#[tokio::test]
async fn a_transient_failure_is_retried_by_the_operator_with_backoff() {
    let wm = WalletMigration::test();
    let job = wm.job(
        0,
        vec![job_condition(
            "Failed",
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        )],
    );
    let (action, recorded, _) =
        reconcile_once(&wm, Scenario::JobThenEventThenStatusPatch(wm.clone(), job)).await;
    let event = recorded.event.expect("event published");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "MigrationRetrying");
    let note = event["note"].as_str().unwrap_or_default();
    assert!(note.contains("attempt 2 of 5 in 30s"), "{note}");
    let status = recorded.status.expect("status patched");
    assert_eq!(status.phase, Some(Phase::Retrying));
    assert_eq!(
        condition(&status, CONDITION_READY).reason,
        "MigrationRetrying"
    );
    assert_eq!(condition(&status, CONDITION_FAILED).status, "False");
    assert!(status.next_attempt_time.is_some());
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));

    // Before the time: nothing happens, the wait goes on.
    let waiting = wm.clone().with_status(status.clone());
    let (action, quiet, _) = reconcile_once(&waiting, Scenario::RadioSilence).await;
    assert!(quiet.status.is_none() && quiet.created_job.is_none());
    assert_ne!(action, Action::await_change());

    // At the time: the next attempt is a Job of its own.
    let mut due = status;
    due.next_attempt_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
    ));
    let due = wm.clone().with_status(due);
    let (_, recorded, _) = reconcile_once(&due, Scenario::CreateJobAt(due.clone(), 1)).await;
    let created = recorded.created_job.expect("a second Job");
    assert_eq!(created.name_any(), format!("{}-a1", wm.expected_job_name()));
    let status = recorded.status.expect("status patched");
    assert_eq!(status.phase, Some(Phase::Pending));
    assert_eq!(status.attempt, Some(1));
    assert_eq!(status.next_attempt_time, None);
}

#[tokio::test]
async fn the_last_attempt_failing_is_final() {
    let wm = WalletMigration::test();
    let last = super::MAX_ATTEMPTS - 1;
    let job_name = super::job::job_name(&wm, last);
    let wm = wm.with_status(WalletMigrationStatus {
        phase: Some(Phase::Running),
        attempt: Some(last),
        observed_generation: Some(1),
        job_name: Some(job_name),
        ..WalletMigrationStatus::default()
    });
    let job = wm.job_at(
        last,
        0,
        vec![job_condition("Failed", "DeadlineExceeded", "slow")],
    );
    let (action, recorded, _) =
        reconcile_once(&wm, Scenario::JobThenEventThenStatusPatch(wm.clone(), job)).await;
    assert_eq!(recorded.event.expect("event")["reason"], "MigrationFailed");
    let status = recorded.status.expect("status patched");
    assert_eq!(status.phase, Some(Phase::Failed));
    assert!(
        condition(&status, CONDITION_READY)
            .message
            .contains("5 attempts failed"),
        "{status:?}"
    );
    assert_eq!(action, Action::await_change());
}

#[test]
fn retry_delays_double_and_are_capped() {
    assert_eq!(super::retry_delay(0), Duration::from_secs(30));
    assert_eq!(super::retry_delay(1), Duration::from_secs(60));
    assert_eq!(super::retry_delay(10), Duration::from_secs(600));
}

#[tokio::test]
async fn the_job_carries_the_pod_placement_and_pull_secrets() {
    use k8s_openapi::api::core::v1::{LocalObjectReference, Toleration};
    let mut wm = WalletMigration::test();
    wm.spec.job = Some(JobSettings {
        image_pull_secrets: vec![LocalObjectReference {
            name: "registry-creds".to_owned(),
        }],
        node_selector: [("pool".to_owned(), "db-clients".to_owned())].into(),
        tolerations: vec![Toleration {
            key: Some("dedicated".to_owned()),
            operator: Some("Exists".to_owned()),
            ..Toleration::default()
        }],
        priority_class_name: Some("wallet-critical".to_owned()),
        ..JobSettings::default()
    });
    let (_, recorded, _) = reconcile_once(&wm, Scenario::CreateJob(wm.clone())).await;
    let pod = recorded
        .created_job
        .and_then(|j| j.spec)
        .and_then(|s| s.template.spec)
        .expect("pod spec");
    assert_eq!(
        pod.image_pull_secrets.map(|s| s[0].name.clone()).as_deref(),
        Some("registry-creds")
    );
    assert_eq!(
        pod.node_selector
            .and_then(|n| n.get("pool").cloned())
            .as_deref(),
        Some("db-clients")
    );
    assert_eq!(
        pod.tolerations.and_then(|t| t[0].key.clone()).as_deref(),
        Some("dedicated")
    );
    assert_eq!(pod.priority_class_name.as_deref(), Some("wallet-critical"));
}

/// Answers the operator's start-up calls: the WalletMigration list, then the CRD.
async fn start_with_crd(crd_revision: Option<&str>) -> Result<(), Error> {
    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;

    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let annotations = match crd_revision {
        Some(r) => serde_json::json!({ crate::crd::CRD_REVISION_ANNOTATION: r }),
        None => serde_json::json!({}),
    };
    let apiserver = tokio::spawn(async move {
        let (request, send) = handle.next_request().await.expect("list");
        assert_eq!(request.method(), Method::GET);
        let list = serde_json::json!({"apiVersion": "wallet.dev/v1alpha1", "kind": "WalletMigrationList", "metadata": {}, "items": []});
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&list).expect("json")))
                .expect("response"),
        );
        let (request, send) = handle.next_request().await.expect("crd get");
        assert_eq!(
            request.uri().path(),
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/walletmigrations.wallet.dev"
        );
        let mut crd = serde_json::to_value(<WalletMigration as kube::CustomResourceExt>::crd())
            .expect("crd json");
        crd["metadata"]["annotations"] = annotations;
        send.send_response(
            Response::builder()
                .status(StatusCode::OK)
                .body(Body::from(serde_json::to_vec(&crd).expect("json")))
                .expect("response"),
        );
    });
    let registry = prometheus::Registry::new();
    let config = super::OperatorConfig {
        namespace: "wallet".to_owned(),
        pod_name: "wallet-migrator-0".to_owned(),
        lease_name: "wallet-migrator-leader".to_owned(),
        selector: None,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    // A current CRD lets run go on to leader election; stop it there.
    shutdown.cancel();
    let result = super::run(
        kube::Client::new(service, "default"),
        config,
        super::Metrics::register(&registry).expect("metrics"),
        shutdown,
    )
    .await;
    timeout_after_1s_unit(apiserver).await;
    result
}

#[tokio::test]
async fn run_refuses_an_outdated_crd_and_says_how_to_update_it() {
    let result = start_with_crd(Some("1")).await;
    let Err(err @ Error::CrdOutdated { .. }) = result else {
        panic!("expected CrdOutdated, got {result:?}");
    };
    let text = err.to_string();
    assert!(
        text.contains("kubectl apply --server-side -f charts/wallet/crds/"),
        "{text}"
    );
    assert!(
        matches!(start_with_crd(None).await, Err(Error::CrdOutdated { .. })),
        "a CRD from before the revision annotation is outdated too"
    );
    let current = start_with_crd(Some(crate::crd::CRD_REVISION)).await;
    assert!(current.is_ok(), "{current:?}");
}

#[tokio::test]
async fn the_controller_watches_only_its_releases_resources_and_jobs() {
    use http::{Request, Response};
    use kube::client::Body;

    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "wallet");
    let (ctx, _unused, _registry) = Context::test();
    let stop = tokio_util::sync::CancellationToken::new();
    let controller = tokio::spawn(super::run_controller(
        client,
        "wallet",
        Some("app.kubernetes.io/instance=blue"),
        ctx,
        stop.clone(),
    ));
    let mut seen = std::collections::BTreeMap::new();
    while seen.len() < 2 {
        let (request, send) = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
            .await
            .expect("the controller lists")
            .expect("request");
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or_default().to_owned();
        let kind = if path.ends_with("/walletmigrations") {
            "WalletMigrationList"
        } else if path.ends_with("/jobs") {
            "JobList"
        } else {
            panic!("unexpected call {path}?{query}");
        };
        seen.insert(kind, query);
        let list = serde_json::json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": []});
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&list).expect("json")))
                .expect("response"),
        );
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), controller).await;
    let selector = "labelSelector=app.kubernetes.io%2Finstance%3Dblue";
    assert!(seen["WalletMigrationList"].contains(selector), "{seen:?}");
    assert!(
        seen["JobList"].contains("app.kubernetes.io%2Finstance%3Dblue"),
        "{seen:?}"
    );
    assert!(seen["JobList"].contains("managed-by"), "{seen:?}");
}
