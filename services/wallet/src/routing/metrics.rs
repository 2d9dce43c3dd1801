use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

#[derive(Clone)]
pub struct RoutingMetrics {
    pub forwards: IntCounterVec,
    pub forward_duration: Histogram,
    pub deadline_exceeded: IntCounter,
    pub unresolved: IntCounter,
    /// Wallet reads by where they were answered from.
    pub wallet_reads: IntCounterVec,
}

impl RoutingMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let forwards = IntCounterVec::new(
            Opts::new(
                "wallet_forwards_total",
                "Operations forwarded to the shard owner, by outcome",
            ),
            &["outcome"],
        )?;
        let forward_duration = Histogram::with_opts(
            HistogramOpts::new(
                "wallet_forward_duration_seconds",
                "Time of one forward to the shard owner",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let deadline_exceeded = IntCounter::new(
            "wallet_deadline_exceeded_total",
            "Requests answered 503 (not applied) because their deadline passed before an owner planned them",
        )?;
        let unresolved = IntCounter::new(
            "wallet_outcome_unresolved_total",
            "Requests whose outcome no owner could look up in time: the connection was closed without an answer",
        )?;
        registry.register(Box::new(unresolved.clone()))?;
        let wallet_reads = IntCounterVec::new(
            Opts::new(
                "wallet_wallet_reads_total",
                "Wallet reads by source: this node's memory as the owner, the owner's memory one internal request away, or PostgreSQL",
            ),
            &["source"],
        )?;
        for source in ["memory", "owner", "database"] {
            wallet_reads.with_label_values(&[source]);
        }
        registry.register(Box::new(wallet_reads.clone()))?;
        // Every outcome from the start, so dashboards and alerts see zeros, not gaps.
        for outcome in ["ok", "not_owner", "not_applied", "may_exist"] {
            forwards.with_label_values(&[outcome]);
        }
        registry.register(Box::new(forwards.clone()))?;
        registry.register(Box::new(forward_duration.clone()))?;
        registry.register(Box::new(deadline_exceeded.clone()))?;
        Ok(Self {
            forwards,
            forward_duration,
            deadline_exceeded,
            unresolved,
            wallet_reads,
        })
    }
}
