//! The node's commit lanes. Shard executors hand over planned batches; a lane merges
//! whatever queued while the other lanes were committing into ONE transaction, so
//! load spread over many shards (each batch holding an operation or two) still commits
//! hundreds of operations per transaction instead of queueing one commit per shard.
//!
//! Two transactions in flight never touch the same wallet: a wallet belongs to one
//! shard and a shard has at most one batch in flight, so lanes cannot deadlock.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument;

use super::ExecutorMetrics;
use crate::domain::OperationRecord;
use crate::store::{BatchWrite, CommitError, LedgerWrites, ShardFence, Store, WalletUpdate};

/// One shard's planned batch.
pub(super) struct ShardCommit {
    pub fence: ShardFence,
    pub records: Vec<OperationRecord>,
    pub updates: Vec<WalletUpdate>,
    pub ledger: LedgerWrites,
    pub reply: oneshot::Sender<Result<(), Arc<CommitError>>>,
}

#[derive(Clone)]
pub(super) struct Committer {
    /// Bounded by the number of shards: a shard has at most one batch in flight, so a
    /// send never waits.
    queue: mpsc::Sender<ShardCommit>,
}

impl Committer {
    pub fn start(
        store: Store,
        lanes: usize,
        max_operations: usize,
        shards: usize,
        metrics: ExecutorMetrics,
    ) -> Self {
        let (queue, commits) = mpsc::channel(shards.max(1));
        tokio::spawn(run(
            store,
            commits,
            lanes.max(1),
            max_operations.max(1),
            metrics,
        ));
        Self { queue }
    }

    /// Commits one shard's batch, possibly together with other shards' batches.
    pub async fn commit(
        &self,
        fence: ShardFence,
        records: Vec<OperationRecord>,
        updates: Vec<WalletUpdate>,
        ledger: LedgerWrites,
    ) -> Result<(), Arc<CommitError>> {
        let (reply, answer) = oneshot::channel();
        let stopped = || {
            Arc::new(CommitError::Failed(crate::store::StoreError::Corrupt(
                "commit lanes stopped".into(),
            )))
        };
        self.queue
            .send(ShardCommit {
                fence,
                records,
                updates,
                ledger,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        // The lane answers every commit it took; without an answer the commit may
        // have been sent, so it counts as ambiguous.
        answer.await.unwrap_or_else(|_| {
            Err(Arc::new(CommitError::Ambiguous(
                crate::store::StoreError::Corrupt("commit lane stopped mid-commit".into()),
            )))
        })
    }
}

async fn run(
    store: Store,
    mut commits: mpsc::Receiver<ShardCommit>,
    lanes: usize,
    max_operations: usize,
    metrics: ExecutorMetrics,
) {
    let free_lanes = Arc::new(Semaphore::new(lanes));
    loop {
        // Take a lane first: while all lanes commit, batches queue up and merge.
        let Ok(lane) = free_lanes.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = commits.recv().await else {
            return;
        };
        let mut operations = first.records.len();
        let mut group = vec![first];
        while operations < max_operations {
            match commits.try_recv() {
                Ok(commit) => {
                    operations += commit.records.len();
                    group.push(commit);
                }
                Err(_) => break,
            }
        }
        let store = store.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            commit_group(&store, group, &metrics).await;
            drop(lane);
        });
    }
}

async fn commit_group(store: &Store, mut group: Vec<ShardCommit>, metrics: &ExecutorMetrics) {
    loop {
        match write(store, &group, metrics).await {
            Ok(()) => {
                for commit in group {
                    let _ = commit.reply.send(Ok(()));
                }
                return;
            }
            Err(CommitError::Fenced { shards }) => {
                // Those shards moved to another node; the others are retried without them.
                let (fenced, rest): (Vec<_>, Vec<_>) = group
                    .into_iter()
                    .partition(|commit| shards.contains(&commit.fence.shard));
                for commit in fenced {
                    let error = CommitError::Fenced {
                        shards: vec![commit.fence.shard],
                    };
                    let _ = commit.reply.send(Err(Arc::new(error)));
                }
                group = rest;
                if group.is_empty() {
                    return;
                }
            }
            // Never split an ambiguous commit: it may have committed as a whole. A batch
            // planned on stale state fails alone too, so the others need no new plan.
            Err(
                error @ (CommitError::Failed(_)
                | CommitError::StaleVersion
                | CommitError::StaleLedger(_)),
            ) if group.len() > 1
                && (!error.is_transient()
                    || matches!(
                        error,
                        CommitError::StaleVersion | CommitError::StaleLedger(_)
                    )) =>
            {
                // Something in one shard's batch breaks the transaction: commit each shard
                // alone, so the others do not fail with it.
                tracing::warn!(error = %error, shards = group.len(), "group commit failed; committing shards one by one");
                for commit in group {
                    Box::pin(commit_group(store, vec![commit], metrics)).await;
                }
                return;
            }
            Err(error) => {
                let error = Arc::new(error);
                for commit in group {
                    let _ = commit.reply.send(Err(error.clone()));
                }
                return;
            }
        }
    }
}

async fn write(
    store: &Store,
    group: &[ShardCommit],
    metrics: &ExecutorMetrics,
) -> Result<(), CommitError> {
    let fences: Vec<ShardFence> = group.iter().map(|commit| commit.fence).collect();
    let operations: Vec<OperationRecord> = group
        .iter()
        .flat_map(|commit| commit.records.iter().cloned())
        .collect();
    let wallets: Vec<WalletUpdate> = group
        .iter()
        .flat_map(|commit| commit.updates.iter().cloned())
        .collect();
    let mut ledger = LedgerWrites::default();
    for commit in group {
        ledger.extend(&commit.ledger);
    }
    let started = Instant::now();
    store
        .commit_batch(BatchWrite {
            fences: &fences,
            operations: &operations,
            wallets: &wallets,
            ledger: &ledger,
        })
        .instrument(tracing::info_span!(
            "commit",
            shards = fences.len(),
            operations = operations.len()
        ))
        .await?;
    metrics
        .commit_duration
        .observe(started.elapsed().as_secs_f64());
    metrics.batch_size.observe(operations.len() as f64);
    Ok(())
}
