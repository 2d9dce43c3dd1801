//! Sends each command to its shard's owner through the one submission interface:
//! the local executor pool when this node owns the shard, a forwarder peer otherwise,
//! retrying across ownership changes until the command's deadline.
//!
//! The router never abandons an attempt in flight: it waits for every attempt's
//! answer, each of which arrives in bounded time. A command one attempt may have
//! committed is retried with `may_exist`, so the owner looks it up first; the router
//! answers "not applied" only when no attempt may have committed it, or when the owner
//! looked it up after its deadline (when no copy can be planned any more) and did not
//! find it.

mod forward;
mod metrics;

pub use forward::{
    ForwardBatch, ForwardReply, ForwardResult, ForwardTimeouts, ForwardedCommand, Forwarder,
    INTERNAL_OPERATIONS_PATH, MAX_FORWARD_BATCH, Peer,
};
pub use metrics::RoutingMetrics;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use wallet_cluster::Cluster;

use crate::domain::{CommandOutcome, OperationCommand};
use crate::executor::ExecutorPool;
use crate::submit::{NotApplied, Submit, Undelivered};

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// Certainly not applied, now or later.
    #[error("shard {shard}: not applied: {reason}")]
    NotApplied { shard: u32, reason: NotApplied },
    /// An attempt may have committed the command and no owner could say within the
    /// resolution window. Only a broken connection may answer this.
    #[error("shard {shard}: the outcome could not be found out in time")]
    Unresolved { shard: u32 },
}

pub struct OperationRouter {
    cluster: Arc<Cluster>,
    local: Arc<ExecutorPool>,
    forwarder: Forwarder,
    /// How long after its deadline a command that may exist is still looked up.
    resolve_window: Duration,
    metrics: RoutingMetrics,
}

impl OperationRouter {
    pub fn new(
        cluster: Arc<Cluster>,
        local: Arc<ExecutorPool>,
        forwarder: Forwarder,
        resolve_window: Duration,
        metrics: RoutingMetrics,
    ) -> Self {
        forwarder.follow(cluster.watch_members());
        Self {
            cluster,
            local,
            forwarder,
            resolve_window,
            metrics,
        }
    }

    pub fn shard_of(&self, wallet_id: &uuid::Uuid) -> u32 {
        self.cluster.shard_of(wallet_id)
    }

    /// Peers with a forwarding task now.
    pub fn peer_count(&self) -> usize {
        self.forwarder.peer_count()
    }

    pub async fn execute(
        &self,
        mut command: OperationCommand,
    ) -> Result<CommandOutcome, RoutingError> {
        let shard = self.shard_of(&command.wallet_id);
        let resolve_by = Instant::now() + command.deadline.remaining() + self.resolve_window;
        let mut backoff = Duration::from_millis(5);
        loop {
            match self.attempt(shard, &command).await {
                Ok(outcome) => return Ok(outcome),
                Err(Undelivered::MayExist(reason)) => {
                    tracing::debug!(%reason, "an attempt may have committed; looking it up next");
                    command.may_exist = true;
                }
                Err(Undelivered::NotApplied(reason))
                    if !command.may_exist || reason.settles_earlier_attempts() =>
                {
                    match reason {
                        NotApplied::Overloaded | NotApplied::Expired => {
                            return Err(self.not_applied(shard, reason));
                        }
                        // Another owner, or the same one a moment later, may manage.
                        NotApplied::CommitFailed | NotApplied::Unreachable => {}
                    }
                }
                // Says nothing about earlier attempts: keep looking.
                Err(Undelivered::NotApplied(_)) => {}
                Err(Undelivered::NotOwner) => self.cluster.refresh(),
            }
            if !command.may_exist && command.deadline.has_passed() {
                return Err(self.not_applied(shard, NotApplied::Expired));
            }
            if command.may_exist && Instant::now() >= resolve_by {
                self.metrics.unresolved.inc();
                return Err(RoutingError::Unresolved { shard });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    fn not_applied(&self, shard: u32, reason: NotApplied) -> RoutingError {
        if reason == NotApplied::Expired {
            self.metrics.deadline_exceeded.inc();
        }
        RoutingError::NotApplied { shard, reason }
    }

    async fn attempt(
        &self,
        shard: u32,
        command: &OperationCommand,
    ) -> Result<CommandOutcome, Undelivered> {
        let Some(owner) = self.cluster.owner_of(shard) else {
            return Err(Undelivered::NotOwner);
        };
        if owner.id == self.cluster.node_id() {
            return self.local.submit(shard, command.clone()).await;
        }
        let started = std::time::Instant::now();
        let result = self
            .forwarder
            .peer(&owner)
            .submit(shard, command.clone())
            .await;
        self.metrics
            .forward_duration
            .observe(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(_) => "ok",
            Err(Undelivered::NotOwner) => "not_owner",
            Err(Undelivered::NotApplied(_)) => "not_applied",
            Err(Undelivered::MayExist(_)) => "may_exist",
        };
        self.metrics.forwards.with_label_values(&[outcome]).inc();
        if let Err(undelivered) = &result {
            tracing::debug!(owner = %owner.id, %undelivered, "forward did not complete");
        }
        result
    }
}
