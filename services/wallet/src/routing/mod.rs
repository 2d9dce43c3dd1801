//! Sends each operation to the executor of its shard's owner: in-process when this
//! node owns the shard, over the internal port otherwise, retrying across ownership
//! changes until the request deadline.

mod forward;
mod metrics;

pub use forward::{
    ForwardBatch, ForwardError, ForwardReply, ForwardResult, ForwardedCommand, Forwarder,
    INTERNAL_OPERATIONS_PATH,
};
pub use metrics::RoutingMetrics;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use wallet_cluster::Cluster;

use crate::domain::{CommandOutcome, OperationCommand};
use crate::executor::{ExecutionError, ExecutorPool};

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("no owner of shard {shard} answered within the request deadline")]
    DeadlineExceeded { shard: u32 },
}

pub struct OperationRouter {
    cluster: Arc<Cluster>,
    executors: Arc<ExecutorPool>,
    forwarder: Forwarder,
    deadline: Duration,
    /// Longest wait for one forward: a paused or silently dead owner loses its shards
    /// after a lease TTL, so waiting longer than that for it only delays the retry.
    attempt_timeout: Duration,
    metrics: RoutingMetrics,
}

/// Why one attempt did not produce an outcome.
struct Retry {
    /// The operation may have been committed: the next attempt must look it up first.
    maybe_applied: bool,
}

impl OperationRouter {
    pub fn new(
        cluster: Arc<Cluster>,
        executors: Arc<ExecutorPool>,
        forwarder: Forwarder,
        deadline: Duration,
        attempt_timeout: Duration,
        metrics: RoutingMetrics,
    ) -> Self {
        Self {
            cluster,
            executors,
            forwarder,
            deadline,
            attempt_timeout,
            metrics,
        }
    }

    pub fn shard_of(&self, wallet_id: &uuid::Uuid) -> u32 {
        self.cluster.shard_of(wallet_id)
    }

    pub async fn execute(
        &self,
        mut command: OperationCommand,
    ) -> Result<CommandOutcome, RoutingError> {
        let shard = self.shard_of(&command.wallet_id);
        let deadline = Instant::now() + self.deadline;
        let mut backoff = Duration::from_millis(5);
        loop {
            match self.attempt(shard, &command, deadline).await {
                Ok(outcome) => return Ok(outcome),
                Err(retry) => {
                    command.resubmitted |= retry.maybe_applied;
                    self.cluster.refresh();
                }
            }
            if Instant::now() + backoff >= deadline {
                self.metrics.deadline_exceeded.inc();
                return Err(RoutingError::DeadlineExceeded { shard });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    async fn attempt(
        &self,
        shard: u32,
        command: &OperationCommand,
        deadline: Instant,
    ) -> Result<CommandOutcome, Retry> {
        let Some(owner) = self.cluster.owner_of(shard) else {
            return Err(Retry {
                maybe_applied: false,
            });
        };
        if owner.id == self.cluster.node_id() {
            return match tokio::time::timeout_at(
                deadline,
                self.executors.execute(shard, command.clone()),
            )
            .await
            {
                Ok(Ok(outcome)) => Ok(outcome),
                // Not serving yet (the lease is still being taken over) or any more.
                Ok(Err(ExecutionError::NotOwner)) => Err(Retry {
                    maybe_applied: false,
                }),
                Ok(Err(ExecutionError::Unavailable)) | Err(_) => Err(Retry {
                    maybe_applied: true,
                }),
            };
        }
        let started = std::time::Instant::now();
        let attempt_deadline = deadline.min(Instant::now() + self.attempt_timeout);
        let result = self
            .forwarder
            .forward(&owner, command, attempt_deadline)
            .await;
        self.metrics
            .forward_duration
            .observe(started.elapsed().as_secs_f64());
        let outcome_label = match &result {
            Ok(_) => "ok",
            Err(ForwardError::Misdirected) => "misdirected",
            Err(ForwardError::Unreachable(_)) => "unreachable",
            Err(_) => "error",
        };
        self.metrics
            .forwards
            .with_label_values(&[outcome_label])
            .inc();
        match result {
            Ok(outcome) => Ok(outcome),
            Err(error) => {
                tracing::debug!(owner = %owner.id, error = %error, "forward did not complete");
                Err(Retry {
                    maybe_applied: error.maybe_applied(),
                })
            }
        }
    }
}
