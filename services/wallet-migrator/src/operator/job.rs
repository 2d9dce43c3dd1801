//! The migration Job: its name, its spec and what its status means.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
    PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, EnvVar, EnvVarSource, KeyToPath,
    PodSecurityContext, PodSpec, PodTemplateSpec, SeccompProfile, SecretKeySelector,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::crd::{
    CA_BUNDLE_DIR, CaBundle, DEFAULT_ACTIVE_DEADLINE_SECONDS, DEFAULT_BACKOFF_LIMIT,
    DEFAULT_TTL_SECONDS_AFTER_FINISHED, WalletMigration, WalletMigrationSpec,
};

/// Kubernetes copies the Job name into a pod label, so it must fit a label value.
const MAX_JOB_NAME: usize = 63;
/// Distroless "nonroot"; set explicitly so runAsNonRoot holds whatever the image says.
const NON_ROOT_UID: i64 = 65532;
pub const CONTAINER_NAME: &str = "migrate";
pub const LABEL_MIGRATION: &str = "wallet.dev/walletmigration";
pub const LABEL_TARGET_VERSION: &str = "wallet.dev/target-version";
/// Copied from the WalletMigration, so the Job's pods belong to their release (and the
/// operator of one release watches only its own Jobs).
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
/// Where `apply` writes `version=<N>`: the kubelet copies it into the pod status.
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// `wallet-migrator apply`'s exit code for a failure a retry cannot fix.
pub const EXIT_PERMANENT: i32 = 3;
/// The Failed reason Kubernetes gives a Job failed by its podFailurePolicy: here only
/// `apply`'s EXIT_PERMANENT, so not worth another attempt.
pub const REASON_POD_FAILURE_POLICY: &str = "PodFailurePolicy";

/// A short, stable digest of the spec and its generation: any change to the spec
/// (image, secret, limits, retry) gives a new Job, because a Job's pod template cannot
/// be changed in place; the generation makes a rollback to an earlier spec run a Job of
/// its own instead of finding the old, finished one and reading its stale outcome.
pub fn spec_hash(spec: &WalletMigrationSpec, generation: Option<i64>) -> String {
    // serde_json writes struct fields in declaration order and maps sorted
    // (BTreeMap), so equal specs always hash equal.
    let mut bytes = serde_json::to_vec(spec).unwrap_or_default();
    bytes.extend_from_slice(&generation.unwrap_or(0).to_le_bytes());
    let digest = xxhash_rust::xxh3::xxh3_64(&bytes);
    format!("{:08x}", digest >> 32)
}

/// `<resource>-v<target>-<hash>` and `-a<attempt>` for the operator's own retries, the
/// resource part shortened to fit 63 characters.
pub fn job_name(wm: &WalletMigration, attempt: u32) -> String {
    let spec = &wm.spec;
    let mut suffix = format!(
        "-v{}-{}",
        spec.target_version,
        spec_hash(spec, wm.metadata.generation)
    );
    if attempt > 0 {
        suffix.push_str(&format!("-a{attempt}"));
    }
    let room = MAX_JOB_NAME.saturating_sub(suffix.len());
    let name = wm.name_any();
    let prefix: String = name.chars().take(room).collect();
    format!("{}{suffix}", prefix.trim_end_matches(['-', '.']))
}

/// The Job that runs `wallet-migrator apply` for `wm`, owned by it.
pub fn build(wm: &WalletMigration, name: &str) -> Job {
    let spec = &wm.spec;
    let settings = spec.job.clone().unwrap_or_default();
    let mut labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "wallet-migrator".to_owned(),
        ),
        (
            "app.kubernetes.io/component".to_owned(),
            "migration".to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "wallet-migrator".to_owned(),
        ),
        (LABEL_MIGRATION.to_owned(), wm.name_any()),
        (
            LABEL_TARGET_VERSION.to_owned(),
            spec.target_version.to_string(),
        ),
    ]);
    if let Some(instance) = wm.labels().get(LABEL_INSTANCE) {
        labels.insert(LABEL_INSTANCE.to_owned(), instance.clone());
    }
    let container = Container {
        name: CONTAINER_NAME.to_owned(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.clone(),
        command: Some(vec!["wallet-migrator".to_owned(), "apply".to_owned()]),
        args: Some(vec![
            "--target".to_owned(),
            spec.target_version.to_string(),
            "--termination-log".to_owned(),
            TERMINATION_LOG.to_owned(),
        ]),
        termination_message_path: Some(TERMINATION_LOG.to_owned()),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        env: Some(env(spec)),
        volume_mounts: spec.ca_bundle.as_ref().map(|_| {
            vec![VolumeMount {
                name: CA_BUNDLE_VOLUME.to_owned(),
                mount_path: CA_BUNDLE_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            }]
        }),
        resources: settings.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Job {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: wm.namespace(),
            labels: Some(labels.clone()),
            owner_references: wm.controller_owner_ref(&()).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(settings.backoff_limit.unwrap_or(DEFAULT_BACKOFF_LIMIT)),
            ttl_seconds_after_finished: Some(
                settings
                    .ttl_seconds_after_finished
                    .unwrap_or(DEFAULT_TTL_SECONDS_AFTER_FINISHED),
            ),
            active_deadline_seconds: Some(
                settings
                    .active_deadline_seconds
                    .unwrap_or(DEFAULT_ACTIVE_DEADLINE_SECONDS),
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_owned()),
                    service_account_name: settings.service_account_name.clone(),
                    // The migration talks to PostgreSQL only, never to the API server.
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(NON_ROOT_UID),
                        run_as_group: Some(NON_ROOT_UID),
                        seccomp_profile: Some(runtime_default_seccomp()),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: spec.ca_bundle.as_ref().map(|ca| vec![ca_bundle_volume(ca)]),
                    image_pull_secrets: non_empty(settings.image_pull_secrets),
                    node_selector: non_empty_map(settings.node_selector),
                    tolerations: non_empty(settings.tolerations),
                    affinity: settings.affinity,
                    priority_class_name: settings.priority_class_name,
                    ..PodSpec::default()
                }),
            },
            pod_failure_policy: Some(pod_failure_policy()),
            ..JobSpec::default()
        }),
        ..Job::default()
    }
}

const CA_BUNDLE_VOLUME: &str = "ca-bundle";

fn env(spec: &WalletMigrationSpec) -> Vec<EnvVar> {
    let mut env = vec![
        EnvVar {
            name: "DATABASE_URL".to_owned(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: spec.database_secret_ref.name.clone(),
                    key: spec.database_secret_ref.key.clone(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
        EnvVar {
            name: "RUST_LOG".to_owned(),
            value: Some("info".to_owned()),
            ..EnvVar::default()
        },
    ];
    if let Some(ca) = &spec.ca_bundle {
        // sqlx reads both; a `sslmode`/`sslrootcert` in the URL still wins.
        env.push(EnvVar {
            name: "PGSSLROOTCERT".to_owned(),
            value: Some(format!("{CA_BUNDLE_DIR}/{}", ca.key)),
            ..EnvVar::default()
        });
        env.push(EnvVar {
            name: "PGSSLMODE".to_owned(),
            value: Some(ca.ssl_mode.clone()),
            ..EnvVar::default()
        });
    }
    env
}

fn ca_bundle_volume(ca: &CaBundle) -> Volume {
    let items = Some(vec![KeyToPath {
        key: ca.key.clone(),
        path: ca.key.clone(),
        ..KeyToPath::default()
    }]);
    Volume {
        name: CA_BUNDLE_VOLUME.to_owned(),
        secret: ca.secret_name.as_ref().map(|name| SecretVolumeSource {
            secret_name: Some(name.clone()),
            items: items.clone(),
            ..SecretVolumeSource::default()
        }),
        config_map: ca
            .config_map_name
            .as_ref()
            .map(|name| ConfigMapVolumeSource {
                name: name.clone(),
                items: items.clone(),
                ..ConfigMapVolumeSource::default()
            }),
        ..Volume::default()
    }
}

/// A migration that fails by itself fails the same way on every pod retry: fail the Job
/// at once. A pod evicted or preempted is not the migration's fault: not counted.
fn pod_failure_policy() -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "FailJob".to_owned(),
                on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                    container_name: Some(CONTAINER_NAME.to_owned()),
                    operator: "In".to_owned(),
                    values: vec![EXIT_PERMANENT],
                }),
                on_pod_conditions: None,
            },
            PodFailurePolicyRule {
                action: "Ignore".to_owned(),
                on_exit_codes: None,
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                    type_: "DisruptionTarget".to_owned(),
                    status: "True".to_owned(),
                }]),
            },
        ],
    }
}

fn non_empty<T>(items: Vec<T>) -> Option<Vec<T>> {
    (!items.is_empty()).then_some(items)
}

fn non_empty_map(map: BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!map.is_empty()).then_some(map)
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        ..SeccompProfile::default()
    }
}

/// A Job as the operator reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Not finished: pods pending, running or being retried.
    Running,
    Complete,
    Failed {
        reason: String,
        message: String,
    },
}

/// Reads the terminal conditions only; `SuccessCriteriaMet` and `FailureTarget`
/// come first but the Job is not finished until `Complete` or `Failed`.
pub fn observe(job: &Job) -> JobState {
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    for c in conditions.iter().filter(|c| c.status == "True") {
        match c.type_.as_str() {
            "Complete" => return JobState::Complete,
            "Failed" => {
                return JobState::Failed {
                    reason: c.reason.clone().unwrap_or_else(|| "JobFailed".to_owned()),
                    message: c
                        .message
                        .clone()
                        .unwrap_or_else(|| "the migration Job failed".to_owned()),
                };
            }
            _ => {}
        }
    }
    JobState::Running
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::SecretKeyRef;

    fn spec(target: i64) -> WalletMigrationSpec {
        WalletMigrationSpec {
            target_version: target,
            image: "wallet:1.0.0".to_owned(),
            image_pull_policy: None,
            database_secret_ref: SecretKeyRef {
                name: "wallet-db".to_owned(),
                key: "DATABASE_URL".to_owned(),
            },
            job: None,
            retry: None,
            ca_bundle: None,
        }
    }

    fn wm(name: &str, spec: WalletMigrationSpec, generation: i64) -> WalletMigration {
        let mut wm = WalletMigration::new(name, spec);
        wm.metadata.generation = Some(generation);
        wm
    }

    #[test]
    fn job_name_carries_version_and_changes_with_the_spec() {
        let a = job_name(&wm("wallet", spec(3), 1), 0);
        assert!(a.starts_with("wallet-v3-"), "{a}");
        assert_eq!(
            a,
            job_name(&wm("wallet", spec(3), 1), 0),
            "stable for one spec"
        );
        let mut other_image = spec(3);
        other_image.image = "wallet:1.0.1".to_owned();
        assert_ne!(a, job_name(&wm("wallet", other_image, 1), 0));
        let mut retried = spec(3);
        retried.retry = Some(1);
        assert_ne!(
            a,
            job_name(&wm("wallet", retried, 1), 0),
            "spec.retry gives a new Job"
        );
        assert_ne!(
            a,
            job_name(&wm("wallet", spec(3), 3), 0),
            "a rollback to an earlier spec (a later generation) gives a new Job"
        );
        assert_eq!(job_name(&wm("wallet", spec(3), 1), 2), format!("{a}-a2"));
    }

    #[test]
    fn job_name_fits_a_label_value() {
        let long = "w".repeat(80);
        let name = job_name(&wm(&long, spec(12), 1), 0);
        assert_eq!(name.len(), MAX_JOB_NAME);
        assert!(name.ends_with(&format!("-v12-{}", spec_hash(&spec(12), Some(1)))));
        let retry = job_name(&wm(&long, spec(12), 1), 7);
        assert_eq!(retry.len(), MAX_JOB_NAME);
        assert!(retry.ends_with("-a7"), "{retry}");
    }

    #[test]
    fn a_ca_bundle_is_mounted_and_named_for_sqlx() {
        let plain = build(&wm("w", spec(3), 1), "w-3");
        let pod = plain
            .spec
            .expect("job spec")
            .template
            .spec
            .expect("pod spec");
        assert!(pod.volumes.is_none());
        assert!(pod.containers[0].volume_mounts.is_none());
        let names: Vec<_> = pod.containers[0]
            .env
            .iter()
            .flatten()
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(names, ["DATABASE_URL", "RUST_LOG"]);

        for (secret, config_map) in [(Some("db-ca"), None), (None, Some("db-ca"))] {
            let mut with_ca = spec(3);
            with_ca.ca_bundle = Some(CaBundle {
                secret_name: secret.map(str::to_owned),
                config_map_name: config_map.map(str::to_owned),
                key: "bundle.pem".to_owned(),
                ssl_mode: "verify-ca".to_owned(),
            });
            let job = build(&wm("w", with_ca, 1), "w-3");
            let pod = job.spec.expect("job spec").template.spec.expect("pod spec");
            let volume = &pod.volumes.as_ref().expect("volumes")[0];
            assert_eq!(
                volume
                    .secret
                    .as_ref()
                    .and_then(|s| s.secret_name.as_deref()),
                secret
            );
            assert_eq!(
                volume.config_map.as_ref().map(|c| c.name.as_str()),
                config_map
            );
            let container = &pod.containers[0];
            let mount = &container.volume_mounts.as_ref().expect("mounts")[0];
            assert_eq!(
                (mount.name.as_str(), mount.mount_path.as_str()),
                (volume.name.as_str(), CA_BUNDLE_DIR)
            );
            let env: BTreeMap<_, _> = container
                .env
                .iter()
                .flatten()
                .filter_map(|e| Some((e.name.as_str(), e.value.as_deref()?)))
                .collect();
            assert_eq!(env["PGSSLROOTCERT"], "/etc/wallet/ca/bundle.pem");
            assert_eq!(env["PGSSLMODE"], "verify-ca");
        }
    }
}
