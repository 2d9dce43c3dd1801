//! The migration Job: its name, its spec and what its status means.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EnvVarSource, PodSecurityContext, PodSpec, PodTemplateSpec,
    SeccompProfile, SecretKeySelector, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::crd::{
    DEFAULT_ACTIVE_DEADLINE_SECONDS, DEFAULT_BACKOFF_LIMIT, DEFAULT_TTL_SECONDS_AFTER_FINISHED,
    WalletMigration, WalletMigrationSpec,
};

/// Kubernetes copies the Job name into a pod label, so it must fit a label value.
const MAX_JOB_NAME: usize = 63;
/// Distroless "nonroot"; set explicitly so runAsNonRoot holds whatever the image says.
const NON_ROOT_UID: i64 = 65532;
pub const CONTAINER_NAME: &str = "migrate";
pub const LABEL_MIGRATION: &str = "wallet.dev/walletmigration";
pub const LABEL_TARGET_VERSION: &str = "wallet.dev/target-version";

/// A short, stable digest of the spec: any change to it (image, secret, limits)
/// gives a new Job, because a Job's pod template cannot be changed in place.
pub fn spec_hash(spec: &WalletMigrationSpec) -> String {
    // serde_json writes struct fields in declaration order and maps sorted
    // (BTreeMap), so equal specs always hash equal.
    let bytes = serde_json::to_vec(spec).unwrap_or_default();
    let digest = xxhash_rust::xxh3::xxh3_64(&bytes);
    format!("{:08x}", digest >> 32)
}

/// `<resource>-v<target>-<spec hash>`, the resource part shortened to fit 63 characters.
pub fn job_name(resource_name: &str, spec: &WalletMigrationSpec) -> String {
    let suffix = format!("-v{}-{}", spec.target_version, spec_hash(spec));
    let room = MAX_JOB_NAME.saturating_sub(suffix.len());
    let prefix: String = resource_name.chars().take(room).collect();
    format!("{}{suffix}", prefix.trim_end_matches(['-', '.']))
}

/// The Job that runs `wallet-migrator apply` for `wm`, owned by it.
pub fn build(wm: &WalletMigration, name: &str) -> Job {
    let spec = &wm.spec;
    let settings = spec.job.clone().unwrap_or_default();
    let labels = BTreeMap::from([
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
    let container = Container {
        name: CONTAINER_NAME.to_owned(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.clone(),
        command: Some(vec!["wallet-migrator".to_owned(), "apply".to_owned()]),
        env: Some(vec![
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
        ]),
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
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    }
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
        }
    }

    #[test]
    fn job_name_carries_version_and_changes_with_the_spec() {
        let a = job_name("wallet", &spec(3));
        assert!(a.starts_with("wallet-v3-"), "{a}");
        assert_eq!(a, job_name("wallet", &spec(3)), "stable for one spec");
        let mut other_image = spec(3);
        other_image.image = "wallet:1.0.1".to_owned();
        assert_ne!(a, job_name("wallet", &other_image));
    }

    #[test]
    fn job_name_fits_a_label_value() {
        let long = "w".repeat(80);
        let name = job_name(&long, &spec(12));
        assert_eq!(name.len(), MAX_JOB_NAME);
        assert!(name.ends_with(&format!("-v12-{}", spec_hash(&spec(12)))));
    }
}
