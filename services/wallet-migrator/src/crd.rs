//! The `WalletMigration` custom resource: the chart renders one per release with the
//! schema version that release needs; the operator turns it into a migration Job.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state: the schema at `targetVersion`, applied by a Job running `image`.
// kube-derive takes one `printcolumn(...)` per column, which clippy sees as repeats.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "wallet.dev",
    version = "v1alpha1",
    kind = "WalletMigration",
    namespaced,
    status = "WalletMigrationStatus",
    shortname = "wm",
    // Must equal CRD_REVISION (the derive takes literals only; a unit test compares them).
    annotation("wallet.dev/crd-revision", "3"),
    printcolumn(name = "Target", type_ = "integer", json_path = ".spec.targetVersion"),
    printcolumn(
        name = "Applied",
        type_ = "integer",
        json_path = ".status.appliedVersion"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Job",
        type_ = "string",
        json_path = ".status.jobName",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct WalletMigrationSpec {
    /// Schema version (the highest migration number) this release needs.
    pub target_version: i64,
    /// Image holding the `wallet-migrator` binary with the migrations embedded.
    pub image: String,
    /// Pull policy for the migration Job's container (Always, IfNotPresent, Never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// Secret holding the PostgreSQL URL the Job migrates.
    pub database_secret_ref: SecretKeyRef,
    /// Settings of the migration Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobSettings>,
    /// Raise to run a failed migration again with an unchanged spec: any change of the
    /// spec gives a new Job, and this counter is the change that means "retry".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<i64>,
    /// CA bundle PostgreSQL's certificate must chain to, mounted into the Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<CaBundle>,
}

/// A PEM CA bundle from a Secret or a ConfigMap (exactly one) of the resource's
/// namespace. The Job mounts it at [`CA_BUNDLE_DIR`] and points `PGSSLROOTCERT` at it;
/// `sslMode` is `PGSSLMODE`, the mode for a database URL that names none.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.secretName) != has(self.configMapName)",
    "message": "caBundle needs exactly one of secretName and configMapName"
}]))]
pub struct CaBundle {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_name: Option<String>,
    /// Key of the bundle in the Secret or ConfigMap (default ca.crt).
    #[serde(default = "default_ca_key")]
    pub key: String,
    /// disable, require, verify-ca or verify-full (default verify-full).
    #[serde(default = "default_ssl_mode")]
    #[schemars(extend("enum" = ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]))]
    pub ssl_mode: String,
}

/// Where the Job (and the chart's API pods) mount the CA bundle.
pub const CA_BUNDLE_DIR: &str = "/etc/wallet/ca";

fn default_ca_key() -> String {
    "ca.crt".to_owned()
}

fn default_ssl_mode() -> String {
    "verify-full".to_owned()
}

/// A key in a Secret of the resource's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    pub name: String,
    #[serde(default = "default_secret_key")]
    pub key: String,
}

fn default_secret_key() -> String {
    "DATABASE_URL".to_owned()
}

/// Job knobs; every field has a default suited to a schema migration.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobSettings {
    /// Pod retries before the Job is Failed (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_limit: Option<i32>,
    /// Seconds a finished Job is kept (default 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<i32>,
    /// Wall-clock limit for the whole Job (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Pull secrets for a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

/// Bumped whenever the schema changes; the operator refuses to run against a CRD in the
/// cluster with another revision, because `helm upgrade` never updates CRDs.
pub const CRD_REVISION: &str = "3";
pub const CRD_REVISION_ANNOTATION: &str = "wallet.dev/crd-revision";
pub const CRD_NAME: &str = "walletmigrations.wallet.dev";

/// Pod retries inside one Job (each after the kubelet's exponential back-off of 10 s,
/// 20 s, 40 s ...); a database that is still starting gets about 2.5 minutes.
pub const DEFAULT_BACKOFF_LIMIT: i32 = 4;
pub const DEFAULT_TTL_SECONDS_AFTER_FINISHED: i32 = 86_400;
pub const DEFAULT_ACTIVE_DEADLINE_SECONDS: i64 = 600;

/// Where the migration stands, as last observed by the operator.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Pending,
    Running,
    /// A Job failed for a reason that may pass (database unreachable, deadline); the
    /// operator starts another attempt at `nextAttemptTime`.
    Retrying,
    Succeeded,
    Failed,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WalletMigrationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// `Ready` (schema at the target) and, after a failed Job, `Failed`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The schema version the database reported after the last successful Job (may be
    /// above the target, after a rollback to an older release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_version: Option<i64>,
    /// The operator's attempt for this spec (0 = the first Job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// When phase is Retrying: when the next Job is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The CRD as YAML, exactly as checked in under charts/ and k8s/.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&WalletMigration::crd())
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    /// The operator compares the cluster's CRD annotation with CRD_REVISION: the
    /// generated CRD must carry that very value.
    #[test]
    fn the_generated_crd_carries_the_revision_the_operator_wants() {
        let crd = WalletMigration::crd();
        let annotations = crd.metadata.annotations.unwrap_or_default();
        assert_eq!(
            annotations.get(CRD_REVISION_ANNOTATION).map(String::as_str),
            Some(CRD_REVISION)
        );
    }
}
