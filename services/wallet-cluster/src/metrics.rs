use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Metrics of the cluster layer, registered into the node's registry.
///
/// Cheap to clone: every field is a handle to the same shared metric.
#[derive(Clone, Debug)]
pub struct ClusterMetrics {
    owned_shards: IntGauge,
    cluster_members: IntGauge,
    lease_acquisitions: IntCounter,
    lease_losses: IntCounter,
    fence_rejections: IntCounter,
    redis_errors: IntCounterVec,
    member_entries_rejected: IntCounterVec,
}

impl ClusterMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self {
            owned_shards: IntGauge::new("wallet_owned_shards", "Shards this node owns and serves")?,
            cluster_members: IntGauge::new(
                "wallet_cluster_members",
                "Live members in this node's view of the cluster",
            )?,
            lease_acquisitions: IntCounter::new(
                "wallet_lease_acquisitions_total",
                "Shard leases acquired and claimed in PostgreSQL",
            )?,
            lease_losses: IntCounter::new(
                "wallet_lease_losses_total",
                "Shards lost involuntarily (lease taken by another node or fence moved)",
            )?,
            fence_rejections: IntCounter::new(
                "wallet_fence_rejections_total",
                "Batches refused because the PostgreSQL fence moved on (counted by the executor)",
            )?,
            redis_errors: IntCounterVec::new(
                Opts::new(
                    "wallet_cluster_redis_errors_total",
                    "Failed Redis calls of the cluster layer, by operation",
                ),
                &["operation"],
            )?,
            member_entries_rejected: IntCounterVec::new(
                Opts::new(
                    "wallet_member_entries_rejected_total",
                    "Entries of the Redis member set ignored (unsigned, bad signature, malformed), each counted once while it stays",
                ),
                &["reason"],
            )?,
        };
        registry.register(Box::new(metrics.owned_shards.clone()))?;
        registry.register(Box::new(metrics.cluster_members.clone()))?;
        registry.register(Box::new(metrics.lease_acquisitions.clone()))?;
        registry.register(Box::new(metrics.lease_losses.clone()))?;
        registry.register(Box::new(metrics.fence_rejections.clone()))?;
        registry.register(Box::new(metrics.redis_errors.clone()))?;
        registry.register(Box::new(metrics.member_entries_rejected.clone()))?;
        for reason in ["malformed", "unsigned", "bad_signature"] {
            // Present from the start, so an alert on it has a series to watch.
            metrics.member_entries_rejected.with_label_values(&[reason]);
        }
        Ok(metrics)
    }

    /// Incremented by the executor when a batch finds the fence moved.
    pub fn fence_rejections(&self) -> &IntCounter {
        &self.fence_rejections
    }

    pub(crate) fn set_owned_shards(&self, n: usize) {
        self.owned_shards.set(n as i64);
    }

    pub(crate) fn set_members(&self, n: usize) {
        self.cluster_members.set(n as i64);
    }

    pub(crate) fn lease_acquired(&self) {
        self.lease_acquisitions.inc();
    }

    pub(crate) fn lease_lost(&self) {
        self.lease_losses.inc();
    }

    /// `operation` is one of a few fixed names (membership, lease).
    pub(crate) fn redis_error(&self, operation: &'static str) {
        self.redis_errors.with_label_values(&[operation]).inc();
    }

    /// `reason` is one of malformed, unsigned, bad_signature.
    pub(crate) fn member_entry_rejected(&self, reason: &'static str) {
        self.member_entries_rejected
            .with_label_values(&[reason])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_the_documented_names() {
        let registry = Registry::new();
        let m = ClusterMetrics::register(&registry).expect("register");
        m.redis_error("lease");
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        for name in [
            "wallet_owned_shards",
            "wallet_cluster_members",
            "wallet_lease_acquisitions_total",
            "wallet_lease_losses_total",
            "wallet_fence_rejections_total",
            "wallet_cluster_redis_errors_total",
            "wallet_member_entries_rejected_total",
        ] {
            assert!(
                names.iter().any(|n| n == name),
                "{name} missing from {names:?}"
            );
        }
        // A second registration into the same registry is an error, not a silent duplicate.
        assert!(ClusterMetrics::register(&registry).is_err());
    }
}
