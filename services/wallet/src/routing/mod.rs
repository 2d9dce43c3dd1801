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
    INTERNAL_OPERATIONS_PATH, INTERNAL_READS_PATH, MAX_FORWARD_BATCH, Peer, ReadBatch, ReadReply,
    ReadResult, WalletRead,
};
pub use metrics::RoutingMetrics;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use wallet_cluster::Cluster;

use crate::auth::Tenant;
use crate::domain::{CommandOutcome, OperationCommand};
use crate::executor::ExecutorPool;
use crate::store::WalletState;
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

    /// A wallet's committed state from this node's memory, when this node may answer
    /// for it: it serves the wallet's shard, its lease is fresh (no other node can have
    /// taken the shard and written since), and the wallet is cached.
    pub fn committed_wallet(&self, wallet_id: &uuid::Uuid) -> Option<WalletState> {
        let shard = self.shard_of(wallet_id);
        self.cluster
            .serves_reads(shard)
            .then(|| self.local.committed_wallet(shard, wallet_id))
            .flatten()
    }

    /// A wallet of `tenant` as its owner committed it, from this node's memory or, one
    /// coalesced internal request away, from the owner's. `Some(None)`: no such wallet of
    /// the tenant. `None` sends the caller to PostgreSQL, which is always right.
    pub async fn read_wallet(
        &self,
        tenant: &Tenant,
        wallet_id: uuid::Uuid,
    ) -> Option<Option<WalletState>> {
        let found = self.read_from_memory(tenant, wallet_id).await;
        let source = match found {
            Some((source, _)) => source,
            None => "database",
        };
        self.metrics.wallet_reads.with_label_values(&[source]).inc();
        found.map(|(_, wallet)| wallet)
    }

    async fn read_from_memory(
        &self,
        tenant: &Tenant,
        wallet_id: uuid::Uuid,
    ) -> Option<(&'static str, Option<WalletState>)> {
        // This node first: it may still serve a shard the view already gives to another.
        if let Some(wallet) = self.committed_wallet(&wallet_id) {
            return Some(("memory", (wallet.tenant == *tenant).then_some(wallet)));
        }
        let owner = self.cluster.owner_of(self.shard_of(&wallet_id))?;
        if owner.id == self.cluster.node_id() {
            return None;
        }
        match self.forwarder.peer(&owner).read(tenant, wallet_id).await {
            ReadResult::Found(wallet) => {
                Some(("owner", (wallet.tenant == *tenant).then_some(wallet)))
            }
            ReadResult::NotFound => Some(("owner", None)),
            ReadResult::NotFromMemory => None,
        }
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
