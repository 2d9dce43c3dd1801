//! Metrics of the outbox's own consumers, registered into the node's registry.

use std::collections::BTreeSet;

use prometheus::{GaugeVec, IntCounter, IntCounterVec, Opts, Registry};

/// What a published event's acknowledgement said, the `outcome` of
/// `wallet_events_published_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    /// Stored by JetStream.
    Stored,
    /// JetStream had it already (same `Nats-Msg-Id` within the duplicate window).
    Duplicate,
    /// No acknowledgement: the page is published again.
    Failed,
}

impl Published {
    pub const ALL: [Published; 3] = [Self::Stored, Self::Duplicate, Self::Failed];

    pub fn label(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Duplicate => "duplicate",
            Self::Failed => "failed",
        }
    }
}

#[derive(Clone)]
pub struct EventsMetrics {
    /// By consumer name (`nats`, `webhooks`: the rows of `event_consumers`, a fixed set).
    outbox_lag: GaugeVec,
    published: IntCounterVec,
    pub pruned: IntCounter,
    /// The consumers the lag gauge has a series for, so vanished ones are removed.
    lagging: std::sync::Arc<std::sync::Mutex<BTreeSet<String>>>,
}

impl EventsMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let outbox_lag = GaugeVec::new(
            Opts::new(
                "wallet_events_outbox_lag_seconds",
                "Now minus the time of the oldest outbox event a consumer has not passed yet (0 when caught up), refreshed every few seconds",
            ),
            &["consumer"],
        )?;
        let published = IntCounterVec::new(
            Opts::new(
                "wallet_events_published_total",
                "Outbox events this node published to NATS JetStream, by outcome: stored, duplicate (JetStream had the Nats-Msg-Id already), failed (published again)",
            ),
            &["outcome"],
        )?;
        // Every outcome from the start: dashboards and alerts see zeros, not gaps.
        for outcome in Published::ALL {
            published.with_label_values(&[outcome.label()]);
        }
        let pruned = IntCounter::new(
            "wallet_events_pruned_total",
            "Outbox events this node deleted after their retention, once every consumer had passed them",
        )?;
        registry.register(Box::new(outbox_lag.clone()))?;
        registry.register(Box::new(published.clone()))?;
        registry.register(Box::new(pruned.clone()))?;
        Ok(Self {
            outbox_lag,
            published,
            pruned,
            lagging: Default::default(),
        })
    }

    pub fn published(&self, outcome: Published, events: u64) {
        self.published
            .with_label_values(&[outcome.label()])
            .inc_by(events);
    }

    /// Sets the lag of each consumer listed, and drops the series of any other.
    pub fn set_lags(&self, lags: &[crate::store::ConsumerLag]) {
        let Ok(mut lagging) = self.lagging.lock() else {
            return;
        };
        let now: BTreeSet<String> = lags.iter().map(|lag| lag.name.clone()).collect();
        for gone in lagging.difference(&now) {
            let _ = self.outbox_lag.remove_label_values(&[gone]);
        }
        for lag in lags {
            self.outbox_lag
                .with_label_values(&[&lag.name])
                .set(lag.seconds);
        }
        *lagging = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ConsumerLag;

    #[test]
    fn a_consumer_that_is_gone_loses_its_lag_series() {
        let registry = Registry::new();
        let metrics = EventsMetrics::register(&registry).expect("register");
        let lag = |name: &str, seconds| ConsumerLag {
            name: name.to_owned(),
            seconds,
        };
        metrics.set_lags(&[lag("nats", 3.0), lag("webhooks", 0.0)]);
        metrics.set_lags(&[lag("nats", 1.5)]);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .expect("encode");
        assert!(
            text.contains("wallet_events_outbox_lag_seconds{consumer=\"nats\"} 1.5"),
            "{text}"
        );
        assert!(!text.contains("consumer=\"webhooks\""), "{text}");
        assert!(
            text.contains("wallet_events_published_total{outcome=\"duplicate\"} 0"),
            "{text}"
        );
    }
}
