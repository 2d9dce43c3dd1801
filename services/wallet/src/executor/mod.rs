//! Group commit: one task per owned shard applies queued operations in arrival order
//! against cached balances and commits each batch in one PostgreSQL transaction.
//!
//! A request is answered only after its batch committed, and the cache is only
//! updated after a commit, so it is never ahead of the database.

mod cache;
mod committer;
mod metrics;
mod plan;
mod shard;
mod sweep;

pub use metrics::ExecutorMetrics;
pub use sweep::{SweepSettings, sweep_until_stopped};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::domain::{CommandOutcome, OperationCommand};
use crate::store::{Store, WalletState};
use crate::submit::{MayExist, NotApplied, Submit, Undelivered};
use cache::{Caches, FencedCache};
use committer::Committer;
use shard::ShardExecutor;

/// Bounds and sizes of the executors.
#[derive(Clone, Copy, Debug)]
pub struct ExecutorSettings {
    /// Most operations of one shard in one batch.
    pub batch_max: usize,
    /// Commands waiting in one shard's queue; beyond it a command is refused as overloaded.
    pub queue_max: usize,
    /// Transactions committed at once.
    pub commit_lanes: usize,
    /// Wallets the node caches, across all its shards.
    pub cache_wallets: usize,
    /// A shard whose batch has been loading, committing or being looked up this long is stalled:
    /// the cluster layer stops renewing its lease, so another node takes it over.
    pub stall_after: Duration,
    /// Shards of the installation: the bound of the committer's queue, which holds at
    /// most one batch per shard.
    pub shards: u32,
    /// Whether batches write their outbox rows (`WALLET_EVENTS_ENABLED`).
    pub events: bool,
}

pub(crate) struct Pending {
    command: OperationCommand,
    reply: oneshot::Sender<Result<CommandOutcome, Undelivered>>,
}

/// Since when a shard's batch has been in a commit or a look-up (0: it is not).
#[derive(Default)]
pub(crate) struct Stall {
    since_ms: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

impl Stall {
    fn now_ms(&self) -> u64 {
        // +1 so that 0 always means "not committing".
        self.epoch.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
    }

    pub(crate) fn begin(&self) {
        self.since_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    pub(crate) fn end(&self) {
        self.since_ms.store(0, Ordering::Relaxed);
    }

    fn longer_than(&self, limit: Duration) -> bool {
        match self.since_ms.load(Ordering::Relaxed) {
            0 => false,
            since => self.now_ms().saturating_sub(since) > limit.as_millis() as u64,
        }
    }
}

struct ShardHandle {
    /// The fence this tenure of the shard commits under.
    fence: i64,
    queue: mpsc::Sender<Pending>,
    stop: CancellationToken,
    stall: Arc<Stall>,
    task: JoinHandle<()>,
}

/// The shards this node serves, each with its executor task.
pub struct ExecutorPool {
    store: Store,
    committer: Committer,
    settings: ExecutorSettings,
    caches: Arc<Caches>,
    metrics: ExecutorMetrics,
    shards: RwLock<HashMap<u32, ShardHandle>>,
    /// Tells the cluster layer that a shard's fence moved on, so it drops the lease.
    fence_lost: mpsc::Sender<u32>,
}

impl ExecutorPool {
    /// Needs a Tokio runtime: it starts the commit lanes.
    pub fn new(
        store: Store,
        settings: ExecutorSettings,
        metrics: ExecutorMetrics,
        fence_lost: mpsc::Sender<u32>,
    ) -> Arc<Self> {
        // A transaction takes up to this many operations from the batches of many shards.
        let committer = Committer::start(
            store.clone(),
            settings.commit_lanes,
            settings.batch_max * 4,
            settings.shards as usize,
            metrics.clone(),
        );
        Arc::new(Self {
            store,
            committer,
            settings,
            caches: Arc::new(Caches {
                wallets: FencedCache::new(settings.cache_wallets),
                // A hold is smaller than a wallet's state and lives shorter.
                holds: FencedCache::new(settings.cache_wallets),
            }),
            metrics,
            shards: RwLock::new(HashMap::new()),
            fence_lost,
        })
    }

    /// Whether any shard's commit has stalled past the limit.
    pub fn any_stalled(&self) -> bool {
        self.shards
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .any(|handle| handle.stall.longer_than(self.settings.stall_after))
    }

    /// Brings `wallet_cached_wallets` up to date (before a scrape).
    pub fn set_cached_wallets_gauge(&self) {
        self.metrics
            .cached_wallets
            .set(i64::try_from(self.caches.wallets.len()).unwrap_or(i64::MAX));
    }

    /// A wallet's state as this tenure of its shard committed it, if it is cached. The
    /// cache is updated after each commit and before its answers go out, so what an
    /// acknowledged write did is here; an evicted or never-loaded wallet is not.
    pub fn committed_wallet(&self, shard: u32, wallet_id: &uuid::Uuid) -> Option<WalletState> {
        let fence = self
            .shards
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&shard)
            .map(|handle| handle.fence)?;
        self.caches.wallets.peek(fence, wallet_id)
    }

    /// The shards this node serves now.
    pub fn active_shards(&self) -> Vec<u32> {
        self.shards
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .keys()
            .copied()
            .collect()
    }

    fn take(&self, shard: u32) -> Option<ShardHandle> {
        self.shards
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&shard)
    }

    /// Stops a shard's executor: the batch in flight finishes (or, if its commit cannot
    /// be looked up, is answered "may exist"), the rest is answered "not owner".
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
impl Submit for ExecutorPool {
    /// Queues `command` on its shard's executor and waits for the committed outcome. No
    /// timeout here: a queued command is planned before its deadline or dropped, and a
    /// planned one is answered once its batch's outcome is known.
    async fn submit(
        &self,
        shard: u32,
        command: OperationCommand,
    ) -> Result<CommandOutcome, Undelivered> {
        let (reply, answer) = oneshot::channel();
        let queue = {
            let shards = self
                .shards
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            shards.get(&shard).map(|handle| handle.queue.clone())
        };
        let queue = queue.ok_or(Undelivered::NotOwner)?;
        queue
            .try_send(Pending { command, reply })
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => {
                    self.metrics.overloaded.inc();
                    Undelivered::NotApplied(NotApplied::Overloaded)
                }
                mpsc::error::TrySendError::Closed(_) => Undelivered::NotOwner,
            })?;
        // Every queued command is answered; a dropped reply means the task died
        // mid-batch, after which nobody can say whether the batch committed.
        answer
            .await
            .unwrap_or(Err(Undelivered::MayExist(MayExist::CommitUnresolved)))
    }
}

#[async_trait::async_trait]
impl wallet_cluster::ShardHost for ExecutorPool {
    async fn activate(&self, shard: u32, fence: i64) {
        if let Some(previous) = self.take(shard) {
            Self::stop(previous).await;
        }
        let (queue, receiver) = mpsc::channel(self.settings.queue_max.max(1));
        let stop = CancellationToken::new();
        let stall = Arc::new(Stall::default());
        let executor = ShardExecutor::new(
            shard,
            fence,
            self.store.clone(),
            self.committer.clone(),
            self.caches.clone(),
            self.settings.batch_max,
            self.settings.events,
            self.metrics.clone(),
            self.fence_lost.clone(),
            stall.clone(),
        );
        let task = tokio::spawn(executor.run(receiver, stop.clone()));
        self.shards
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(
                shard,
                ShardHandle {
                    fence,
                    queue,
                    stop,
                    stall,
                    task,
                },
            );
        tracing::info!(shard, fence, "serving shard");
    }

    async fn deactivate(&self, shard: u32) {
        if let Some(handle) = self.take(shard) {
            Self::stop(handle).await;
            tracing::info!(shard, "stopped serving shard");
        }
    }

    fn stalled(&self, shard: u32) -> bool {
        self.shards
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&shard)
            .is_some_and(|handle| handle.stall.longer_than(self.settings.stall_after))
    }
}
