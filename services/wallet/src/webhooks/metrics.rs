use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The `outcome` label of `wallet_webhook_deliveries_total`: what an attempt led to.
pub const OUTCOMES: [&str; 3] = ["delivered", "retry", "failed"];

/// Metrics of webhook deliveries, registered into the node's registry.
#[derive(Clone)]
pub struct WebhookMetrics {
    /// Attempts of this node, by what they led to.
    pub deliveries: IntCounterVec,
    /// Deliveries waiting or in flight, cluster-wide (the same figure on every node).
    pub pending: IntGauge,
    /// Deliveries in the dead-letter list, cluster-wide.
    pub failed: IntGauge,
    /// One attempt: connect, request, answer.
    pub delivery_seconds: Histogram,
    /// From the event's time to its delivery (2xx), retries included.
    pub lag_seconds: Histogram,
    /// Deliveries this node deleted after their retention.
    pub pruned: IntCounter,
}

impl WebhookMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let deliveries = IntCounterVec::new(
            Opts::new(
                "wallet_webhook_deliveries_total",
                "Webhook delivery attempts of this node, by outcome: delivered (2xx), retry (to be tried again), failed (out of retries)",
            ),
            &["outcome"],
        )?;
        // Every outcome from the start, so dashboards and alerts see zeros, not gaps.
        for outcome in OUTCOMES {
            deliveries.with_label_values(&[outcome]);
        }
        let pending = IntGauge::new(
            "wallet_webhook_deliveries_pending",
            "Webhook deliveries waiting for an attempt or in one, in the whole cluster (refreshed every few seconds)",
        )?;
        let failed = IntGauge::new(
            "wallet_webhook_deliveries_failed",
            "Webhook deliveries out of retries (the dead-letter list), in the whole cluster (refreshed every few seconds)",
        )?;
        let delivery_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "wallet_webhook_delivery_seconds",
                "Time of one webhook delivery attempt, whatever its outcome",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )?;
        let lag_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "wallet_webhook_lag_seconds",
                "From an event's occurredAt to its successful webhook delivery",
            )
            .buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0,
            ]),
        )?;
        let pruned = IntCounter::new(
            "wallet_webhook_deliveries_pruned_total",
            "Webhook deliveries this node deleted after their retention (never a PENDING one of a live webhook)",
        )?;
        registry.register(Box::new(deliveries.clone()))?;
        registry.register(Box::new(pruned.clone()))?;
        registry.register(Box::new(pending.clone()))?;
        registry.register(Box::new(failed.clone()))?;
        registry.register(Box::new(delivery_seconds.clone()))?;
        registry.register(Box::new(lag_seconds.clone()))?;
        Ok(Self {
            deliveries,
            pending,
            failed,
            delivery_seconds,
            lag_seconds,
            pruned,
        })
    }
}
