//! The one transaction a group of shard batches commits in.

use rust_decimal::Decimal;
use sqlx::Row;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::OperationRecord;

/// The new state of one wallet touched by a batch.
#[derive(Clone, Debug)]
pub struct WalletUpdate {
    pub wallet_id: Uuid,
    pub balance: Decimal,
    pub version: i64,
    /// The version the owner's cache was built on; the update only lands if it is still current.
    pub expected_version: i64,
}

/// A shard and the fencing token its batches were planned under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardFence {
    pub shard: u32,
    pub fence: i64,
}

pub struct BatchWrite<'a> {
    pub fences: &'a [ShardFence],
    pub operations: &'a [OperationRecord],
    pub wallets: &'a [WalletUpdate],
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Another node claimed these shards with a newer fence: this node must stop serving them.
    #[error("shards {shards:?} are fenced: another node claimed them")]
    Fenced { shards: Vec<u32> },
    /// A wallet changed under the cache (should not happen while the fence holds).
    #[error("wallet versions changed under the cache")]
    StaleVersion,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for CommitError {
    fn from(error: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(error))
    }
}

impl CommitError {
    /// Errors after which the same batch may be tried again: the transaction
    /// certainly or possibly did not commit, and nothing about the batch was wrong.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Store(StoreError::Database(error)) => match error {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Protocol(_) => true,
                sqlx::Error::Database(db) => matches!(
                    db.code().as_deref(),
                    // serialization_failure, deadlock_detected, idle-in-transaction timeout (a
                    // paused node's session ended before COMMIT), lock_timeout (a claim held
                    // the fence row), admin shutdown / crash recovery, cannot connect now
                    Some(
                        "40001"
                            | "25P03"
                            | "55P03"
                            | "40P01"
                            | "57P01"
                            | "57P02"
                            | "57P03"
                            | "08000"
                            | "08003"
                            | "08006"
                    )
                ),
                _ => false,
            },
            _ => false,
        }
    }
}

impl Store {
    /// Fence check of every shard, every operation, one update per touched wallet: all or nothing.
    pub async fn commit_batch(&self, batch: BatchWrite<'_>) -> Result<(), CommitError> {
        let mut tx = self.pool.begin().await?;
        // FOR SHARE: a concurrent claim of a shard waits for this commit, and a claim that
        // already happened is seen here, so a stale owner can never commit after it.
        let shards = batch
            .fences
            .iter()
            .map(|fence| i32::try_from(fence.shard))
            .collect::<Result<Vec<i32>, _>>()
            .map_err(|_| StoreError::Corrupt("shard number out of range".to_owned()))?;
        let rows =
            sqlx::query("SELECT shard, fence FROM shard_fences WHERE shard = ANY($1) FOR SHARE")
                .bind(&shards)
                .fetch_all(&mut *tx)
                .await?;
        let mut current = std::collections::HashMap::with_capacity(rows.len());
        for row in rows {
            current.insert(
                row.try_get::<i32, _>("shard")?,
                row.try_get::<i64, _>("fence")?,
            );
        }
        let fenced: Vec<u32> = batch
            .fences
            .iter()
            .zip(&shards)
            .filter(|(fence, shard)| current.get(*shard) != Some(&fence.fence))
            .map(|(fence, _)| fence.shard)
            .collect();
        if !fenced.is_empty() {
            return Err(CommitError::Fenced { shards: fenced });
        }

        let ops = batch.operations;
        if !ops.is_empty() {
            sqlx::query(
                "INSERT INTO operations (id, wallet_id, seq, operation_type, amount, status, reason, balance_after, idempotency_key, request_hash, created_at) \
                 SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::numeric[], $6::text[], $7::text[], $8::numeric[], $9::text[], $10::text[], $11::timestamptz[])",
            )
            .bind(ops.iter().map(|op| op.operation_id).collect::<Vec<_>>())
            .bind(ops.iter().map(|op| op.wallet_id).collect::<Vec<_>>())
            .bind(ops.iter().map(|op| op.seq).collect::<Vec<_>>())
            .bind(ops.iter().map(|op| op.operation_type.as_str()).collect::<Vec<_>>())
            .bind(ops.iter().map(|op| op.amount).collect::<Vec<_>>())
            .bind(ops.iter().map(|op| op.status.as_str()).collect::<Vec<_>>())
            .bind(ops.iter().map(|op| op.reason.map(|r| r.as_str())).collect::<Vec<_>>())
            .bind(ops.iter().map(|op| op.balance_after).collect::<Vec<_>>())
            .bind(ops.iter().map(|op| op.idempotency_key.clone()).collect::<Vec<_>>())
            .bind(ops.iter().map(|op| op.request_hash.clone()).collect::<Vec<_>>())
            .bind(ops.iter().map(|op| op.created_at).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }

        let wallets = batch.wallets;
        if !wallets.is_empty() {
            let updated = sqlx::query(
                "UPDATE wallets AS w SET balance = u.balance, version = u.version, updated_at = now() \
                 FROM UNNEST($1::uuid[], $2::numeric[], $3::bigint[], $4::bigint[]) AS u(id, balance, version, expected) \
                 WHERE w.id = u.id AND w.version = u.expected",
            )
            .bind(wallets.iter().map(|w| w.wallet_id).collect::<Vec<_>>())
            .bind(wallets.iter().map(|w| w.balance).collect::<Vec<_>>())
            .bind(wallets.iter().map(|w| w.version).collect::<Vec<_>>())
            .bind(wallets.iter().map(|w| w.expected_version).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated != wallets.len() as u64 {
                return Err(CommitError::StaleVersion);
            }
        }
        tx.commit().await?;
        Ok(())
    }
}
