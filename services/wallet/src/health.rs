//! Whether this node can use its database: checked here, not on every probe, so that
//! a brief PostgreSQL blip neither flaps readiness nor moves shards.
//!
//! The database is unusable once no health check has passed for
//! `WALLET_DB_UNUSABLE_AFTER_MS` (each check is bounded, so a black-holed server is
//! noticed on time), or at once when a shard's commit has
//! stalled past `WALLET_COMMIT_STALL_MS`; usable again at the first check that passes
//! with nothing stalled. An unusable node leaves the membership and claims nothing, so
//! the others serve its shards.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::executor::ExecutorPool;
use crate::store::{REQUIRED_SCHEMA_VERSION, Store};

const CHECK_EVERY: Duration = Duration::from_millis(250);

/// What readiness reports about the database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseHealth {
    pub usable: bool,
    /// The schema version last read, `None` before the first read or when not migrated.
    pub schema_version: Option<i64>,
    /// Why the last check failed, if it did.
    pub problem: Option<String>,
}

impl DatabaseHealth {
    pub fn schema_ok(&self) -> bool {
        self.schema_version
            .is_some_and(|version| version >= REQUIRED_SCHEMA_VERSION)
    }
}

pub struct HealthMonitor {
    pub usable: watch::Receiver<bool>,
    pub report: watch::Receiver<DatabaseHealth>,
}

/// Starts the checks (needs a Tokio runtime).
pub fn start(
    store: Store,
    unusable_after: Duration,
    executors: Arc<ExecutorPool>,
    stop: CancellationToken,
) -> HealthMonitor {
    let initial = DatabaseHealth {
        usable: false,
        schema_version: None,
        problem: Some("not checked yet".to_owned()),
    };
    let (usable_tx, usable) = watch::channel(false);
    let (report_tx, report) = watch::channel(initial);
    // A check against a black-holed server would hang until the pool's own timeouts;
    // bounding it keeps the verdict on time.
    let check_timeout = (unusable_after / 2).clamp(Duration::from_millis(100), CHECK_EVERY * 4);
    tokio::spawn(async move {
        let mut last_ok: Option<Instant> = None;
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let checked = tokio::time::timeout(check_timeout, store.schema_version()).await;
            // Read after the check: a shard may have stalled while it ran.
            let stalled = executors.any_stalled();
            let mut next = report_tx.borrow().clone();
            match checked {
                Ok(Ok(version)) => {
                    last_ok = Some(Instant::now());
                    next.schema_version = version;
                    next.problem = stalled.then(|| "a shard's commit stalled".to_owned());
                    next.usable = !stalled;
                }
                failed => {
                    next.problem = Some(match failed {
                        Ok(Err(error)) => error.to_string(),
                        _ => format!("no answer within {check_timeout:?}"),
                    });
                    // A blip keeps a usable database usable; it never makes one usable.
                    let recent = last_ok.is_some_and(|at| at.elapsed() < unusable_after);
                    next.usable = next.usable && !stalled && recent;
                }
            }
            if next.usable != *usable_tx.borrow() {
                if next.usable {
                    tracing::info!("database usable");
                } else {
                    tracing::warn!(problem = ?next.problem, "database unusable: handing shards over until it recovers");
                }
                usable_tx.send_replace(next.usable);
            }
            report_tx.send_if_modified(|current| {
                let changed = *current != next;
                *current = next;
                changed
            });
        }
    });
    HealthMonitor { usable, report }
}
