use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Why a batch did not commit: the `reason` label of `wallet_batch_failures_total`.
pub const FAILURE_REASONS: [&str; 6] = [
    "fenced",
    "stale_version",
    "transient",
    "ambiguous",
    "not_committed",
    "error",
];

/// Metrics of the group-commit executors, registered into the node's registry.
#[derive(Clone)]
pub struct ExecutorMetrics {
    pub operations: IntCounterVec,
    pub batch_size: Histogram,
    pub commit_duration: Histogram,
    pub batch_failures: IntCounterVec,
    pub fence_rejections: IntCounter,
    /// Commands refused because their shard's queue was full.
    pub overloaded: IntCounter,
    /// Commands dropped unplanned: their deadline passed or their caller left.
    pub dropped: IntCounterVec,
    pub cached_wallets: IntGauge,
    /// Work the owner found left over and did itself: holds expired, transfers posted.
    pub swept: IntCounterVec,
}

impl ExecutorMetrics {
    /// `fence_rejections` is shared with the cluster layer, which registers it.
    pub fn register(registry: &Registry, fence_rejections: IntCounter) -> prometheus::Result<Self> {
        let operations = IntCounterVec::new(
            Opts::new(
                "wallet_operations_total",
                "Operations recorded, by type and result",
            ),
            &["operation_type", "result"],
        )?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("wallet_batch_size", "Operations per committed batch").buckets(
                vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                ],
            ),
        )?;
        let commit_duration = Histogram::with_opts(
            HistogramOpts::new(
                "wallet_commit_duration_seconds",
                "Time to commit one batch transaction",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0,
            ]),
        )?;
        let batch_failures = IntCounterVec::new(
            Opts::new(
                "wallet_batch_failures_total",
                "Batches that failed to commit, by reason",
            ),
            &["reason"],
        )?;
        // Every label value from the start, so dashboards and alerts see zeros, not gaps.
        for operation_type in crate::domain::OperationType::ALL {
            for result in ["applied", "rejected"] {
                operations.with_label_values(&[operation_type.as_str(), result]);
            }
        }
        for reason in FAILURE_REASONS {
            batch_failures.with_label_values(&[reason]);
        }
        let overloaded = IntCounter::new(
            "wallet_shard_queue_full_total",
            "Commands refused (503 overloaded, not applied) because their shard's queue was full",
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "wallet_commands_dropped_total",
                "Commands dropped before they were planned, never applied, by reason",
            ),
            &["reason"],
        )?;
        for reason in ["expired", "caller_gone"] {
            dropped.with_label_values(&[reason]);
        }
        let cached_wallets = IntGauge::new(
            "wallet_cached_wallets",
            "Wallets in the node's cache of committed state",
        )?;
        let swept = IntCounterVec::new(
            Opts::new(
                "wallet_swept_total",
                "Holds expired and PENDING transfers posted by their owner's sweep, by kind",
            ),
            &["kind"],
        )?;
        for kind in ["hold_expired", "transfer_posted"] {
            swept.with_label_values(&[kind]);
        }
        registry.register(Box::new(swept.clone()))?;
        registry.register(Box::new(overloaded.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(cached_wallets.clone()))?;
        registry.register(Box::new(operations.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(commit_duration.clone()))?;
        registry.register(Box::new(batch_failures.clone()))?;
        Ok(Self {
            operations,
            batch_size,
            commit_duration,
            batch_failures,
            fence_rejections,
            overloaded,
            dropped,
            cached_wallets,
            swept,
        })
    }
}
