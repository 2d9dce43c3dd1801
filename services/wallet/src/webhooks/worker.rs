//! The node's share of the webhook work: a fan-out loop, a delivery loop with a bounded
//! number of attempts in flight, and the gauges' refresh. Every node runs all three; row
//! locks in PostgreSQL keep them from doing the same work twice (see `mod.rs`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::{ClaimedDelivery, Sender, WebhookMetrics, backoff, jitter};
use crate::config::WebhooksConfig;
use crate::events::{EventTail, prune_every};
use crate::store::{AttemptRecord, RecordedAttempt, Store};

/// Webhooks one fan-out transaction claims...
const FAN_OUT_WEBHOOKS: usize = 16;
/// ...and the most events it reads for each.
const FAN_OUT_PAGE: usize = 500;
/// The fan-out looks again this often even if the outbox's tail says nothing.
const FAN_OUT_RECHECK: Duration = Duration::from_secs(1);
/// Retries fall due by time alone: the delivery loop looks this often.
const DUE_RECHECK: Duration = Duration::from_millis(500);
/// How often the pending and failed gauges are counted again.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);
/// After a database error, a loop waits this long before it tries again.
const ERROR_PAUSE: Duration = Duration::from_secs(1);
/// Deliveries one pruning transaction deletes at most.
const PRUNE_BATCH: usize = 5_000;
/// Tries at recording attempts' outcomes; all failing leaves the claims to lapse.
const RECORD_TRIES: u32 = 3;

/// The running loops; [`Workers::stopped`] waits for the attempts in flight.
pub struct Workers {
    delivery: JoinHandle<()>,
    recorder: JoinHandle<()>,
}

impl Workers {
    /// Once the node's stop token fired: waits until the attempts in flight have ended
    /// and been recorded (each is bounded by the delivery timeout).
    pub async fn stopped(self) {
        if let Err(error) = self.delivery.await {
            tracing::error!(error = %error, "the webhook delivery loop panicked");
        }
        if let Err(error) = self.recorder.await {
            tracing::error!(error = %error, "the webhook outcome recorder panicked");
        }
    }
}

/// Starts the loops; they end when `stop` fires.
pub fn start(
    store: Store,
    tail: EventTail,
    sender: Sender,
    settings: WebhooksConfig,
    metrics: WebhookMetrics,
    stop: CancellationToken,
) -> Workers {
    let wake = Arc::new(Notify::new());
    tokio::spawn(fan_out_loop(
        store.clone(),
        tail,
        wake.clone(),
        settings.retry_for,
        stop.clone(),
    ));
    tokio::spawn(gauge_loop(store.clone(), metrics.clone(), stop.clone()));
    tokio::spawn({
        let (store, pruned, stop) = (store.clone(), metrics.pruned.clone(), stop.clone());
        let (interval, retention) = (settings.prune_interval, settings.retention);
        async move {
            prune_every(interval, "webhook deliveries", &pruned, &stop, || {
                store.prune_deliveries(retention, PRUNE_BATCH)
            })
            .await;
        }
    });
    // Each attempt holds a place until its outcome is recorded, so the channel never
    // holds more than the places.
    let (outcomes, finished) = mpsc::channel(settings.max_in_flight.max(1));
    let recorder = tokio::spawn(record_loop(store.clone(), finished, wake.clone()));
    let delivery = tokio::spawn(delivery_loop(
        Delivering {
            store,
            sender,
            settings,
            metrics,
            outcomes,
        },
        wake,
        stop,
    ));
    Workers { delivery, recorder }
}

async fn fan_out_loop(
    store: Store,
    tail: EventTail,
    wake: Arc<Notify>,
    retry_for: Duration,
    stop: CancellationToken,
) {
    let mut subscription = tail.subscribe();
    while !stop.is_cancelled() {
        match store
            .fan_out(FAN_OUT_WEBHOOKS, FAN_OUT_PAGE, retry_for)
            .await
        {
            Ok(report) => {
                if report.deliveries > 0 {
                    tracing::debug!(
                        deliveries = report.deliveries,
                        webhooks = report.webhooks,
                        "webhook deliveries written"
                    );
                    wake.notify_one();
                }
                // More is readable right now: no reason to wait for the tail.
                if report.more || report.webhooks == FAN_OUT_WEBHOOKS {
                    continue;
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, "the webhook fan-out failed; trying again");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(ERROR_PAUSE) => {}
                }
                continue;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tail.changed(&mut subscription, FAN_OUT_RECHECK) => {}
        }
    }
}

async fn gauge_loop(store: Store, metrics: WebhookMetrics, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(GAUGE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match store.delivery_counts().await {
            Ok((pending, failed)) => {
                metrics.pending.set(pending);
                metrics.failed.set(failed);
            }
            Err(error) => tracing::debug!(error = %error, "counting webhook deliveries failed"),
        }
    }
}

/// What an attempt needs besides its delivery.
#[derive(Clone)]
struct Delivering {
    store: Store,
    sender: Sender,
    settings: WebhooksConfig,
    metrics: WebhookMetrics,
    /// Ended attempts, with their places, to the recorder.
    outcomes: mpsc::Sender<Finished>,
}

/// An ended attempt waiting to be recorded, holding its place until then.
struct Finished {
    attempt: RecordedAttempt,
    _place: OwnedSemaphorePermit,
}

/// Records ended attempts in batches: all that ended while the previous batch was being
/// written go in one statement, so at a steady rate the outcomes cost a statement per
/// round, not one per delivery. Ends when every sender is gone (the delivery loop and
/// its attempts) and the last batch is recorded.
async fn record_loop(store: Store, mut finished: mpsc::Receiver<Finished>, wake: Arc<Notify>) {
    let mut batch = Vec::new();
    loop {
        if finished.recv_many(&mut batch, 256).await == 0 {
            return;
        }
        let attempts: Vec<RecordedAttempt> = batch.iter().map(|f| f.attempt.clone()).collect();
        record(&store, &attempts).await;
        // The places are free again: claim more.
        batch.clear();
        wake.notify_one();
    }
}

async fn record(store: &Store, attempts: &[RecordedAttempt]) {
    for tried in 0..RECORD_TRIES {
        match store.record_attempts(attempts).await {
            Ok(recorded) => {
                let recorded: HashSet<_> = recorded.into_iter().collect();
                for attempt in attempts {
                    if !recorded.contains(&attempt.delivery_id) {
                        tracing::info!(delivery_id = %attempt.delivery_id, "a webhook attempt's claim had lapsed: another attempt's outcome counts");
                    }
                }
                return;
            }
            Err(error) => {
                tracing::warn!(attempts = attempts.len(), error = %error, "recording webhook attempts failed");
                tokio::time::sleep(ERROR_PAUSE * 2u32.pow(tried)).await;
            }
        }
    }
    // The claims lapse and the deliveries are sent again: at least once, never lost.
    tracing::error!(
        attempts = attempts.len(),
        "webhook attempts' outcomes could not be recorded; they will be sent again"
    );
}

async fn delivery_loop(delivering: Delivering, wake: Arc<Notify>, stop: CancellationToken) {
    let permits = Arc::new(Semaphore::new(delivering.settings.max_in_flight));
    let lease = delivering.settings.claim_lease();
    let mut in_flight = JoinSet::new();
    while !stop.is_cancelled() {
        while in_flight.try_join_next().is_some() {}
        // As many claims as there are free places, no more: the rest stay in PostgreSQL
        // for this node later or for another node now.
        let mut free = Vec::new();
        while let Ok(permit) = permits.clone().try_acquire_owned() {
            free.push(permit);
        }
        let mut maybe_more = false;
        if !free.is_empty() {
            match delivering.store.claim_deliveries(free.len(), lease).await {
                Ok(claims) => {
                    maybe_more = claims.len() == free.len();
                    for (claim, place) in claims.into_iter().zip(free) {
                        let delivering = delivering.clone();
                        in_flight.spawn(async move {
                            let attempt = delivering.attempt(claim).await;
                            // Fails only if the recorder panicked (it outlives every
                            // sender otherwise); the claim then lapses.
                            let _ = delivering
                                .outcomes
                                .send(Finished {
                                    attempt,
                                    _place: place,
                                })
                                .await;
                        });
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error, "claiming webhook deliveries failed; trying again");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(ERROR_PAUSE) => {}
                    }
                    continue;
                }
            }
        }
        if maybe_more {
            continue;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = wake.notified() => {}
            () = tokio::time::sleep(DUE_RECHECK) => {}
        }
    }
    // Stopping: nothing new is claimed; what is in flight ends within the timeout and is
    // recorded (the recorder ends after the last of them), so a clean stop leaves no
    // claim to lapse.
    while in_flight.join_next().await.is_some() {}
}

impl Delivering {
    /// Sends the delivery once and says how it ended.
    async fn attempt(&self, claim: ClaimedDelivery) -> RecordedAttempt {
        let attempt = self.sender.send(&claim).await;
        self.metrics
            .delivery_seconds
            .observe(attempt.elapsed.as_secs_f64());
        let record = if attempt.delivered {
            if let Some(at) = claim.occurred_at {
                let lag = (Utc::now() - at).to_std().unwrap_or_default();
                self.metrics.lag_seconds.observe(lag.as_secs_f64());
            }
            AttemptRecord::Delivered {
                status_code: attempt.status_code.unwrap_or(200),
            }
        } else {
            let error = attempt.error.unwrap_or_else(|| "failed".to_owned());
            let after = backoff(
                claim.attempt,
                self.settings.backoff_base,
                self.settings.backoff_max,
                jitter(),
            );
            let next = Utc::now() + chrono::Duration::from_std(after).unwrap_or_default();
            if next > claim.retry_until {
                AttemptRecord::Failed {
                    status_code: attempt.status_code,
                    error,
                }
            } else {
                AttemptRecord::Retry {
                    after,
                    status_code: attempt.status_code,
                    error,
                }
            }
        };
        let outcome = match &record {
            AttemptRecord::Delivered { .. } => "delivered",
            AttemptRecord::Retry { .. } => "retry",
            AttemptRecord::Failed { .. } => "failed",
        };
        self.metrics.deliveries.with_label_values(&[outcome]).inc();
        if let AttemptRecord::Failed { error, .. } = &record {
            tracing::warn!(delivery_id = %claim.id, event_id = %claim.event_id, attempts = claim.attempt, error = %error, "a webhook delivery is out of retries: FAILED");
        }
        RecordedAttempt {
            delivery_id: claim.id,
            attempt: claim.attempt,
            record,
        }
    }
}
