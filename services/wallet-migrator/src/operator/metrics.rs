//! Operator metrics, registered into a registry the caller owns.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};
use tokio::time::Instant;

#[derive(Clone)]
pub struct Metrics {
    /// `result`: ok | error.
    pub reconciles: IntCounterVec,
    pub reconcile_duration: Histogram,
    /// `outcome`: created | succeeded | failed.
    pub jobs: IntCounterVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let reconciles = IntCounterVec::new(
            Opts::new(
                "wallet_migrator_reconciles_total",
                "WalletMigration reconciles by result",
            ),
            &["result"],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "wallet_migrator_reconcile_duration_seconds",
                "Time spent in one WalletMigration reconcile",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let jobs = IntCounterVec::new(
            Opts::new(
                "wallet_migrator_jobs_total",
                "Migration Jobs by outcome (created, succeeded, failed)",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(jobs.clone()))?;
        Ok(Self {
            reconciles,
            reconcile_duration,
            jobs,
        })
    }

    /// Observes the reconcile duration when dropped, whichever way reconcile returns.
    pub fn measure(&self) -> ReconcileTimer {
        ReconcileTimer {
            started: Instant::now(),
            histogram: self.reconcile_duration.clone(),
        }
    }
}

pub struct ReconcileTimer {
    started: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}
