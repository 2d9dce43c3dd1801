//! One poller per node that notices new events, so that long polls, streams and the
//! node's own consumers wait on a channel instead of each querying PostgreSQL.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::{Horizon, Store};

/// The outbox's horizon as last seen; changes when events may have become readable.
#[derive(Clone)]
pub struct EventTail {
    horizon: watch::Receiver<Option<Horizon>>,
}

impl EventTail {
    /// Polls every `interval` until `stop` fires.
    pub fn start(store: Store, interval: Duration, stop: CancellationToken) -> Self {
        let (sender, horizon) = watch::channel(None);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                match store.events_horizon().await {
                    // Only a change wakes anyone: new events, or older ones now below the horizon.
                    Ok(seen) => {
                        sender.send_if_modified(|last| {
                            let changed = last.is_none_or(|last: Horizon| {
                                last.newest != seen.newest
                                    || seen.newest.is_some_and(|newest| {
                                        (last.xmin <= newest) != (seen.xmin <= newest)
                                    })
                            });
                            *last = Some(seen);
                            changed
                        });
                    }
                    Err(error) => tracing::debug!(error = %error, "polling the outbox failed"),
                }
            }
        });
        Self { horizon }
    }

    /// A tail that never reports anything (events are off, or in unit tests).
    pub fn idle() -> Self {
        let (_sender, horizon) = watch::channel(None);
        Self { horizon }
    }

    /// Waits until the outbox may have changed, or `timeout` passes.
    pub async fn changed(
        &self,
        subscription: &mut watch::Receiver<Option<Horizon>>,
        timeout: Duration,
    ) {
        if let Ok(Err(_)) = tokio::time::timeout(timeout, subscription.changed()).await {
            // No poller (stopped, or idle): nothing will ever say; waiting is all there is.
            tokio::time::sleep(timeout).await;
        }
    }

    /// A subscription to call [`EventTail::changed`] with; it sees changes from now on.
    pub fn subscribe(&self) -> watch::Receiver<Option<Horizon>> {
        let mut subscription = self.horizon.clone();
        subscription.mark_unchanged();
        subscription
    }
}
