//! Group commit: one task per owned shard applies queued operations in arrival order
//! against cached balances and commits each batch in one PostgreSQL transaction.
//!
//! A request is answered only after its batch committed, and the cache is only
//! updated after a commit, so it is never ahead of the database.

mod committer;
mod metrics;
mod shard;

pub use metrics::ExecutorMetrics;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::domain::{CommandOutcome, OperationCommand};
use crate::store::Store;
use committer::Committer;
use shard::ShardExecutor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ExecutionError {
    /// This node does not (or no longer) serve the shard; the caller should re-route.
    #[error("this node does not own the shard")]
    NotOwner,
    /// The batch could not be committed after the retries that are safe.
    #[error("the operation could not be committed")]
    Unavailable,
}

pub(crate) struct Pending {
    command: OperationCommand,
    reply: oneshot::Sender<Result<CommandOutcome, ExecutionError>>,
}

struct ShardHandle {
    queue: mpsc::UnboundedSender<Pending>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// The shards this node serves, each with its executor task.
pub struct ExecutorPool {
    store: Store,
    committer: Committer,
    batch_max: usize,
    metrics: ExecutorMetrics,
    shards: RwLock<HashMap<u32, ShardHandle>>,
    /// Tells the cluster layer that a shard's fence moved on, so it drops the lease.
    fence_lost: mpsc::UnboundedSender<u32>,
}

impl ExecutorPool {
    /// Needs a Tokio runtime: it starts `commit_lanes` commit lanes.
    pub fn new(
        store: Store,
        batch_max: usize,
        commit_lanes: usize,
        metrics: ExecutorMetrics,
        fence_lost: mpsc::UnboundedSender<u32>,
    ) -> Arc<Self> {
        // A transaction takes up to this many operations from the batches of many shards.
        let committer =
            Committer::start(store.clone(), commit_lanes, batch_max * 4, metrics.clone());
        Arc::new(Self {
            store,
            committer,
            batch_max,
            metrics,
            shards: RwLock::new(HashMap::new()),
            fence_lost,
        })
    }

    /// Queues `command` on its shard's executor and waits for the committed outcome.
    pub async fn execute(
        &self,
        shard: u32,
        command: OperationCommand,
    ) -> Result<CommandOutcome, ExecutionError> {
        let (reply, answer) = oneshot::channel();
        let queue = {
            let shards = self
                .shards
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            shards.get(&shard).map(|handle| handle.queue.clone())
        };
        let queue = queue.ok_or(ExecutionError::NotOwner)?;
        queue
            .send(Pending { command, reply })
            .map_err(|_| ExecutionError::NotOwner)?;
        answer.await.unwrap_or(Err(ExecutionError::NotOwner))
    }

    fn take(&self, shard: u32) -> Option<ShardHandle> {
        self.shards
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&shard)
    }

    /// Stops a shard's executor: the batch in flight finishes, the rest is answered "not owner".
    async fn stop(handle: ShardHandle) {
        handle.stop.cancel();
        drop(handle.queue);
        if let Err(error) = handle.task.await {
            tracing::error!(error = %error, "shard executor task failed");
        }
    }

    /// Stops every shard; used when the node shuts down without a cluster handoff.
    pub async fn stop_all(&self) {
        let handles: Vec<ShardHandle> = {
            let mut shards = self
                .shards
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            shards.drain().map(|(_, handle)| handle).collect()
        };
        for handle in handles {
            Self::stop(handle).await;
        }
    }
}

#[async_trait::async_trait]
impl wallet_cluster::ShardHost for ExecutorPool {
    async fn activate(&self, shard: u32, fence: i64) {
        if let Some(previous) = self.take(shard) {
            Self::stop(previous).await;
        }
        let (queue, receiver) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let executor = ShardExecutor::new(
            shard,
            fence,
            self.store.clone(),
            self.committer.clone(),
            self.batch_max,
            self.metrics.clone(),
            self.fence_lost.clone(),
        );
        let task = tokio::spawn(executor.run(receiver, stop.clone()));
        self.shards
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(shard, ShardHandle { queue, stop, task });
        tracing::info!(shard, fence, "serving shard");
    }

    async fn deactivate(&self, shard: u32) {
        if let Some(handle) = self.take(shard) {
            Self::stop(handle).await;
            tracing::info!(shard, "stopped serving shard");
        }
    }
}
