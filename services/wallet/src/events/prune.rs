//! Housekeeping of the outbox on every node: pruning delivered events after their
//! retention (one node at a time, by an advisory lock), and the consumers' lag gauge.
//! The webhook deliveries' pruning runs the same rounds ([`prune_every`]).

use std::time::Duration;

use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;

use super::EventsMetrics;
use crate::store::{PruneOutcome, Store, StoreError};

/// How often every node reads the consumers' lag: one cheap statement.
pub const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// Batches one round deletes at most; the rest waits for the next round, so a backlog
/// (the first round after a long outage of a consumer) never holds the node's pool long.
const MAX_BATCHES_PER_ROUND: usize = 100;

#[derive(Clone, Copy, Debug)]
pub struct PruneSettings {
    pub retention: Duration,
    pub interval: Duration,
    pub batch: usize,
}

/// Prunes every `interval` until `stop` fires.
pub async fn prune_until_stopped(
    store: Store,
    settings: PruneSettings,
    metrics: EventsMetrics,
    stop: CancellationToken,
) {
    prune_every(
        settings.interval,
        "outbox events",
        &metrics.pruned,
        &stop,
        || store.prune_events(settings.retention, settings.batch),
    )
    .await;
}

/// Every `interval` until `stop` fires, runs `prune` batch after batch while it says
/// there is more, counting the rows it deleted into `pruned`.
pub(crate) async fn prune_every<F, Fut>(
    interval: Duration,
    what: &'static str,
    pruned: &IntCounter,
    stop: &CancellationToken,
    mut prune: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<PruneOutcome, StoreError>>,
{
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        for _ in 0..MAX_BATCHES_PER_ROUND {
            match prune().await {
                Ok(PruneOutcome::Deleted { rows, more }) => {
                    pruned.inc_by(rows);
                    if rows > 0 {
                        tracing::debug!(rows, "pruned {what}");
                    }
                    if !more || stop.is_cancelled() {
                        break;
                    }
                }
                Ok(PruneOutcome::Busy) => break,
                Err(error) => {
                    tracing::warn!(error = %error, "pruning {what} failed; next round in {interval:?}");
                    break;
                }
            }
        }
    }
}

/// Refreshes `wallet_events_outbox_lag_seconds` every [`LAG_INTERVAL`] until `stop` fires.
pub async fn lag_until_stopped(store: Store, metrics: EventsMetrics, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(LAG_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match store.consumer_lags().await {
            Ok(lags) => metrics.set_lags(&lags),
            // The last figures stay: a database outage is reported elsewhere.
            Err(error) => tracing::debug!(error = %error, "reading the consumers' lag failed"),
        }
    }
}
