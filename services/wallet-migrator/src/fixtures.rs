//! Test helpers: a kube `Client` over `tower_test::mock::pair()` and an
//! `ApiServerVerifier` that answers the calls one scenario expects, in order
//! (the kube-rs/controller-rs pattern). A call the scenario does not expect finds
//! the mock closed and fails the reconcile.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use kube::client::Body;
use kube::runtime::events::Reporter;
use kube::{Client, Resource, ResourceExt};
use prometheus::Registry;

use crate::crd::{SecretKeyRef, WalletMigration, WalletMigrationSpec, WalletMigrationStatus};
use crate::operator::{Context, FIELD_MANAGER, Metrics, job};

pub const NAMESPACE: &str = "default";

impl WalletMigration {
    /// A resource as the API server would hand it to the controller.
    pub fn test() -> Self {
        let mut wm = WalletMigration::new(
            "wallet",
            WalletMigrationSpec {
                target_version: 1,
                image: "registry.example/wallet:1.0.0".to_owned(),
                image_pull_policy: Some("IfNotPresent".to_owned()),
                database_secret_ref: SecretKeyRef {
                    name: "wallet-database".to_owned(),
                    key: "DATABASE_URL".to_owned(),
                },
                job: None,
                retry: None,
                ca_bundle: None,
            },
        );
        let meta = wm.meta_mut();
        meta.namespace = Some(NAMESPACE.to_owned());
        meta.uid = Some("6f1c9a52-0a4e-4c33-9a57-2f0c3d1f8e11".to_owned());
        meta.generation = Some(1);
        meta.labels = Some([(job::LABEL_INSTANCE.to_owned(), "wallet".to_owned())].into());
        wm
    }

    pub fn with_status(mut self, status: WalletMigrationStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// The Job name the operator derives for the current spec (first attempt).
    pub fn expected_job_name(&self) -> String {
        job::job_name(self, 0)
    }

    /// The Job the operator would have created, with `conditions` as its status.
    pub fn job(&self, active: i32, conditions: Vec<JobCondition>) -> Job {
        self.job_at(0, active, conditions)
    }

    /// As `job`, for the operator's attempt `attempt`.
    pub fn job_at(&self, attempt: u32, active: i32, conditions: Vec<JobCondition>) -> Job {
        let mut job = job::build(self, &job::job_name(self, attempt));
        job.status = Some(JobStatus {
            active: Some(active),
            conditions: Some(conditions),
            ..JobStatus::default()
        });
        job
    }
}

pub fn job_condition(type_: &str, reason: &str, message: &str) -> JobCondition {
    JobCondition {
        type_: type_.to_owned(),
        status: "True".to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        ..JobCondition::default()
    }
}

type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
pub struct ApiServerVerifier(ApiServerHandle);

/// The calls one reconcile is expected to make, in order.
pub enum Scenario {
    /// No Job yet: GET (404), POST the Job, POST a Normal Event, PATCH status.
    CreateJob(WalletMigration),
    /// As CreateJob, for the operator's attempt `attempt`.
    CreateJobAt(WalletMigration, u32),
    /// The Job completed: GET, LIST its pods (answered with one pod whose termination
    /// message is given, or none), POST an Event, PATCH status.
    JobCompleted(WalletMigration, Job, Option<String>),
    /// The Job exists and the status must change: GET, PATCH status.
    JobThenStatusPatch(WalletMigration, Job),
    /// The Job finished (Complete or Failed): GET, POST an Event, PATCH status.
    JobThenEventThenStatusPatch(WalletMigration, Job),
    /// As above, but the Event is refused (403, missing RBAC): the status is still written.
    JobThenForbiddenEventThenStatusPatch(WalletMigration, Job),
    /// The Job exists and the status already says so: GET only, no write.
    JobUnchanged(Job),
    /// Nothing at all.
    RadioSilence,
}

/// What the mock API server was sent, for the test to assert on.
#[derive(Default)]
pub struct Recorded {
    pub created_job: Option<Job>,
    pub status: Option<WalletMigrationStatus>,
    pub event: Option<serde_json::Value>,
}

pub async fn timeout_after_1s(handle: tokio::task::JoinHandle<Recorded>) -> Recorded {
    tokio::time::timeout(std::time::Duration::from_secs(1), handle)
        .await
        .expect("timeout on mock apiserver")
        .expect("scenario succeeded")
}

fn json_response<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Body::from(serde_json::to_vec(body).expect("serializable")))
        .expect("valid response")
}

fn jobs_path() -> String {
    format!("/apis/batch/v1/namespaces/{NAMESPACE}/jobs")
}

impl ApiServerVerifier {
    /// Runs one scenario (moving self: one scenario per test).
    pub fn run(self, scenario: Scenario) -> tokio::task::JoinHandle<Recorded> {
        tokio::spawn(async move {
            let mut recorded = Recorded::default();
            match scenario {
                Scenario::CreateJob(wm) => {
                    self.handle_job_get_missing(&wm.expected_job_name())
                        .await
                        .handle_job_create(&mut recorded)
                        .await
                        .handle_event_create(&mut recorded)
                        .await
                        .handle_status_patch(&wm, &mut recorded)
                        .await;
                }
                Scenario::CreateJobAt(wm, attempt) => {
                    self.handle_job_get_missing(&job::job_name(&wm, attempt))
                        .await
                        .handle_job_create(&mut recorded)
                        .await
                        .handle_event_create(&mut recorded)
                        .await
                        .handle_status_patch(&wm, &mut recorded)
                        .await;
                }
                Scenario::JobCompleted(wm, job, message) => {
                    let name = job.name_any();
                    self.handle_job_get(job)
                        .await
                        .handle_pods_list(&name, message)
                        .await
                        .handle_event_create(&mut recorded)
                        .await
                        .handle_status_patch(&wm, &mut recorded)
                        .await;
                }
                Scenario::JobThenStatusPatch(wm, job) => {
                    self.handle_job_get(job)
                        .await
                        .handle_status_patch(&wm, &mut recorded)
                        .await;
                }
                Scenario::JobThenEventThenStatusPatch(wm, job) => {
                    self.handle_job_get(job)
                        .await
                        .handle_event_create(&mut recorded)
                        .await
                        .handle_status_patch(&wm, &mut recorded)
                        .await;
                }
                Scenario::JobThenForbiddenEventThenStatusPatch(wm, job) => {
                    self.handle_job_get(job)
                        .await
                        .handle_event_forbidden()
                        .await
                        .handle_status_patch(&wm, &mut recorded)
                        .await;
                }
                Scenario::JobUnchanged(job) => {
                    self.handle_job_get(job).await;
                }
                Scenario::RadioSilence => {}
            }
            recorded
        })
    }

    async fn handle_job_get_missing(mut self, name: &str) -> Self {
        let (request, send) = self.0.next_request().await.expect("service not called");
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri().path(), format!("{}/{name}", jobs_path()));
        let status = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("jobs.batch \"{name}\" not found"), "reason": "NotFound", "code": 404
        });
        send.send_response(json_response(StatusCode::NOT_FOUND, &status));
        self
    }

    async fn handle_job_get(mut self, job: Job) -> Self {
        let (request, send) = self.0.next_request().await.expect("service not called");
        assert_eq!(request.method(), Method::GET);
        assert_eq!(
            request.uri().path(),
            format!("{}/{}", jobs_path(), job.name_any())
        );
        send.send_response(json_response(StatusCode::OK, &job));
        self
    }

    async fn handle_pods_list(mut self, job_name: &str, message: Option<String>) -> Self {
        let (request, send) = self.0.next_request().await.expect("service not called");
        assert_eq!(request.method(), Method::GET);
        assert_eq!(
            request.uri().path(),
            format!("/api/v1/namespaces/{NAMESPACE}/pods")
        );
        let query = request.uri().query().unwrap_or_default().to_owned();
        assert!(
            query.contains(&format!("batch.kubernetes.io%2Fjob-name%3D{job_name}")),
            "{query}"
        );
        let items: Vec<serde_json::Value> = message
            .into_iter()
            .map(|message| {
                serde_json::json!({
                    "metadata": {"name": format!("{job_name}-x7k2p")},
                    "status": {"phase": "Succeeded", "containerStatuses": [{
                        "name": job::CONTAINER_NAME, "image": "wallet-migrator", "imageID": "",
                        "ready": false, "restartCount": 0,
                        "state": {"terminated": {"exitCode": 0, "message": message}}
                    }]}
                })
            })
            .collect();
        let list = serde_json::json!({
            "kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items
        });
        send.send_response(json_response(StatusCode::OK, &list));
        self
    }

    async fn handle_job_create(mut self, recorded: &mut Recorded) -> Self {
        let (request, send) = self.0.next_request().await.expect("service not called");
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri().path(), jobs_path());
        let body = request.into_body().collect_bytes().await.expect("body");
        let job: Job = serde_json::from_slice(&body).expect("a Job was posted");
        send.send_response(json_response(StatusCode::CREATED, &job));
        recorded.created_job = Some(job);
        self
    }

    async fn handle_event_create(mut self, recorded: &mut Recorded) -> Self {
        let (request, send) = self.0.next_request().await.expect("service not called");
        assert_eq!(request.method(), Method::POST);
        assert_eq!(
            request.uri().path(),
            format!("/apis/events.k8s.io/v1/namespaces/{NAMESPACE}/events")
        );
        let body = request.into_body().collect_bytes().await.expect("body");
        let event: serde_json::Value = serde_json::from_slice(&body).expect("an Event was posted");
        send.send_response(json_response(StatusCode::CREATED, &event));
        recorded.event = Some(event);
        self
    }

    async fn handle_event_forbidden(mut self) -> Self {
        let (request, send) = self.0.next_request().await.expect("service not called");
        assert_eq!(request.method(), Method::POST);
        assert!(
            request.uri().path().ends_with("/events"),
            "{}",
            request.uri()
        );
        let status = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "events.events.k8s.io is forbidden", "reason": "Forbidden", "code": 403
        });
        send.send_response(json_response(StatusCode::FORBIDDEN, &status));
        self
    }

    async fn handle_status_patch(mut self, wm: &WalletMigration, recorded: &mut Recorded) -> Self {
        let (request, send) = self.0.next_request().await.expect("service not called");
        assert_eq!(request.method(), Method::PATCH);
        assert_eq!(
            request.uri().path(),
            format!(
                "/apis/wallet.dev/v1alpha1/namespaces/{NAMESPACE}/walletmigrations/{}/status",
                wm.name_any()
            )
        );
        let query = request.uri().query().unwrap_or_default().to_owned();
        assert!(
            query.contains(&format!("fieldManager={FIELD_MANAGER}")),
            "{query}"
        );
        assert!(query.contains("force=true"), "{query}");
        assert_eq!(
            request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some("application/apply-patch+yaml"),
            "status is written with server-side apply"
        );
        let body = request.into_body().collect_bytes().await.expect("body");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("patch is json");
        assert_eq!(json["apiVersion"], "wallet.dev/v1alpha1");
        assert_eq!(json["kind"], "WalletMigration");
        let status: WalletMigrationStatus =
            serde_json::from_value(json["status"].clone()).expect("valid status");
        let response = wm.clone().with_status(status.clone());
        send.send_response(json_response(StatusCode::OK, &response));
        recorded.status = Some(status);
        self
    }
}

impl Context {
    /// A context over a mocked API server, with metrics in a fresh registry.
    pub fn test() -> (Arc<Self>, ApiServerVerifier, Registry) {
        let (mock_service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(mock_service, NAMESPACE);
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).expect("metrics register");
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: Some("wallet-migrator-test".to_owned()),
        };
        let ctx = Context::new(client, metrics, reporter);
        (Arc::new(ctx), ApiServerVerifier(handle), registry)
    }
}
