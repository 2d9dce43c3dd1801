//! The one transaction a group of shard batches commits in.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::Row;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::{HoldRecord, OperationRecord, TransferRecord};
use crate::events::NewEvent;

/// The new state of one wallet touched by a batch.
#[derive(Clone, Debug)]
pub struct WalletUpdate {
    pub wallet_id: Uuid,
    pub balance: Decimal,
    pub held: Decimal,
    pub overdraft_limit: Decimal,
    pub version: i64,
    /// When its last operation of the batch was recorded.
    pub updated_at: DateTime<Utc>,
    /// The version the owner's cache was built on; the update only lands if it is still current.
    pub expected_version: i64,
}

/// A shard and the fencing token its batches were planned under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardFence {
    pub shard: u32,
    pub fence: i64,
}

/// Holds and transfers a batch creates or settles, next to its operations.
#[derive(Clone, Debug, Default)]
pub struct LedgerWrites {
    /// Transfers whose debit this batch records: PENDING, or REJECTED.
    pub new_transfers: Vec<TransferRecord>,
    /// PENDING transfers whose credit this batch records.
    pub posted_transfers: Vec<PostedTransfer>,
    /// Holds created (ACTIVE) or refused (REJECTED) by this batch.
    pub new_holds: Vec<HoldRecord>,
    /// ACTIVE holds this batch captures, voids or expires, as they end up.
    pub settled_holds: Vec<HoldRecord>,
    /// The outbox rows of everything above and of the batch's operations.
    pub events: Vec<NewEvent>,
}

/// The credit of a PENDING transfer, recorded by this batch.
#[derive(Clone, Debug)]
pub struct PostedTransfer {
    pub transfer_id: Uuid,
    pub from_wallet_id: Uuid,
    pub posted_at: DateTime<Utc>,
}

impl LedgerWrites {
    pub fn extend(&mut self, other: &LedgerWrites) {
        self.new_transfers
            .extend(other.new_transfers.iter().cloned());
        self.posted_transfers
            .extend(other.posted_transfers.iter().cloned());
        self.new_holds.extend(other.new_holds.iter().cloned());
        self.settled_holds
            .extend(other.settled_holds.iter().cloned());
        self.events.extend(other.events.iter().cloned());
    }
}

pub struct BatchWrite<'a> {
    pub fences: &'a [ShardFence],
    pub operations: &'a [OperationRecord],
    pub wallets: &'a [WalletUpdate],
    pub ledger: &'a LedgerWrites,
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Another node claimed these shards with a newer fence: this node must stop serving them.
    #[error("shards {shards:?} are fenced: another node claimed them")]
    Fenced { shards: Vec<u32> },
    /// A wallet changed under the cache (should not happen while the fence holds).
    #[error("wallet versions changed under the cache")]
    StaleVersion,
    /// A hold or transfer was not in the state the batch was planned on (should not
    /// happen while the fence holds: the owner is their only writer).
    #[error("{0} changed under the plan")]
    StaleLedger(&'static str),
    /// Failed before COMMIT was sent: nothing of the transaction is in the database.
    #[error("the batch transaction failed before its commit")]
    Failed(#[source] StoreError),
    /// COMMIT was sent and no answer came back: the transaction may have committed.
    /// Look it up (`Store::resolve`) before answering anyone.
    #[error("the batch transaction's commit got no answer")]
    Ambiguous(#[source] StoreError),
    /// An ambiguous commit that its look-up found did not happen: safe to plan again.
    #[error("the batch transaction's commit got no answer, and it did not commit")]
    NotCommitted,
}

impl From<StoreError> for CommitError {
    fn from(error: StoreError) -> Self {
        Self::Failed(error)
    }
}

impl From<sqlx::Error> for CommitError {
    fn from(error: sqlx::Error) -> Self {
        Self::Failed(StoreError::Database(error))
    }
}

impl CommitError {
    /// Errors after which the same batch may be planned and tried again: the
    /// transaction did not commit, and nothing about the batch itself was wrong.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::StaleVersion | Self::StaleLedger(_) | Self::NotCommitted => true,
            Self::Failed(error) => error.is_transient(),
            Self::Fenced { .. } | Self::Ambiguous(_) => false,
        }
    }

    /// The `reason` label of `wallet_batch_failures_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Fenced { .. } => "fenced",
            Self::StaleVersion | Self::StaleLedger(_) => "stale_version",
            Self::Ambiguous(_) => "ambiguous",
            Self::NotCommitted => "not_committed",
            Self::Failed(error) if error.is_transient() => "transient",
            Self::Failed(_) => "error",
        }
    }
}

/// What a look-up of an ambiguous commit found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    Committed,
    /// Not committed, and it never will be: the look-up waited for the transaction.
    Absent,
}

impl Store {
    /// Fence check of every shard, every operation, one update per touched wallet: all
    /// or nothing, within the commit timeout. A timeout or a broken connection before
    /// COMMIT is `Failed`; at COMMIT it is `Ambiguous`.
    pub async fn commit_batch(&self, batch: BatchWrite<'_>) -> Result<(), CommitError> {
        let deadline = tokio::time::Instant::now() + self.timeouts.commit;
        let mut conn = tokio::time::timeout_at(deadline, self.commits.acquire())
            .await
            .map_err(|_| StoreError::Timeout("acquiring a commit connection"))??;
        let mut committing = false;
        let result = tokio::time::timeout_at(deadline, async {
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            write_batch(&mut tx, &batch).await?;
            committing = true;
            tx.commit().await.map_err(CommitError::from)
        })
        .await;
        let error = match result {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) => error,
            Err(_) => CommitError::Failed(StoreError::Timeout("the batch transaction")),
        };
        if !matches!(
            error,
            CommitError::Fenced { .. } | CommitError::StaleVersion | CommitError::StaleLedger(_)
        ) {
            // The connection may be mid-statement or dead (a black-holed server): close the
            // socket instead of handing it back to the pool, where the next user would hang.
            drop(conn.detach());
        }
        Err(match error {
            CommitError::Failed(source) if committing => CommitError::Ambiguous(source),
            other => other,
        })
    }

    /// Whether a batch whose commit was ambiguous is in the database. Locks the shards'
    /// fence rows FOR UPDATE first, which waits for any transaction still holding them
    /// FOR SHARE (the ambiguous one, if the server still runs it), so the answer is final.
    pub async fn resolve(
        &self,
        shards: &[u32],
        operation_ids: &[Uuid],
    ) -> Result<Resolution, StoreError> {
        let shards = shard_params(shards)?;
        let work = async {
            let mut tx = self.commits.begin().await?;
            sqlx::query("SELECT shard FROM shard_fences WHERE shard = ANY($1) FOR UPDATE")
                .bind(&shards)
                .fetch_all(&mut *tx)
                .await?;
            let found: i64 =
                sqlx::query_scalar("SELECT count(*) FROM operations WHERE id = ANY($1)")
                    .bind(operation_ids)
                    .fetch_one(&mut *tx)
                    .await?;
            tx.commit().await?;
            Ok::<_, StoreError>(found)
        };
        let found = tokio::time::timeout(self.timeouts.commit, work)
            .await
            .map_err(|_| StoreError::Timeout("looking up an ambiguous commit"))??;
        match found {
            0 => Ok(Resolution::Absent),
            n if n as usize == operation_ids.len() => Ok(Resolution::Committed),
            n => Err(StoreError::Corrupt(format!(
                "{n} of {} operations of one transaction are stored",
                operation_ids.len()
            ))),
        }
    }
}

pub(super) fn shard_params(shards: &[u32]) -> Result<Vec<i32>, StoreError> {
    shards
        .iter()
        .map(|shard| i32::try_from(*shard))
        .collect::<Result<Vec<i32>, _>>()
        .map_err(|_| StoreError::Corrupt("shard number out of range".to_owned()))
}

/// The statements of one batch transaction, in order.
async fn write_batch(
    tx: &mut sqlx::PgConnection,
    batch: &BatchWrite<'_>,
) -> Result<(), CommitError> {
    check_fences(tx, batch.fences).await?;
    // Before the operations: a credit whose transfer is no longer PENDING (it was
    // applied already) fails the batch as stale, and the retry looks it up.
    write_ledger(tx, batch.ledger).await?;
    insert_operations(tx, batch.operations).await?;
    update_wallets(tx, batch.wallets).await?;
    super::events::insert_events(tx, &batch.ledger.events).await?;
    Ok(())
}

/// The one fence check: FOR SHARE, so a concurrent claim of a shard waits for this
/// commit, and a claim that already happened is seen here; a stale owner can never
/// commit after it.
async fn check_fences(
    tx: &mut sqlx::PgConnection,
    fences: &[ShardFence],
) -> Result<(), CommitError> {
    let shards = shard_params(&fences.iter().map(|fence| fence.shard).collect::<Vec<_>>())?;
    let rows = sqlx::query("SELECT shard, fence FROM shard_fences WHERE shard = ANY($1) FOR SHARE")
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
    let fenced: Vec<u32> = fences
        .iter()
        .zip(&shards)
        .filter(|(fence, shard)| current.get(*shard) != Some(&fence.fence))
        .map(|(fence, _)| fence.shard)
        .collect();
    if fenced.is_empty() {
        Ok(())
    } else {
        Err(CommitError::Fenced { shards: fenced })
    }
}

async fn insert_operations(
    tx: &mut sqlx::PgConnection,
    ops: &[OperationRecord],
) -> Result<(), CommitError> {
    if ops.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO operations (id, wallet_id, seq, operation_type, amount, status, reason, balance_after, held_after, transfer_id, hold_id, idempotency_key, request_hash, created_at) \
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::numeric[], $6::text[], $7::text[], $8::numeric[], $9::numeric[], $10::uuid[], $11::uuid[], $12::text[], $13::text[], $14::timestamptz[])",
    )
    .bind(ops.iter().map(|op| op.operation_id).collect::<Vec<_>>())
    .bind(ops.iter().map(|op| op.wallet_id).collect::<Vec<_>>())
    .bind(ops.iter().map(|op| op.seq).collect::<Vec<_>>())
    .bind(ops.iter().map(|op| op.operation_type.as_str()).collect::<Vec<_>>())
    .bind(ops.iter().map(|op| op.amount).collect::<Vec<_>>())
    .bind(ops.iter().map(|op| op.status.as_str()).collect::<Vec<_>>())
    .bind(ops.iter().map(|op| op.reason.map(|r| r.as_str())).collect::<Vec<_>>())
    .bind(ops.iter().map(|op| op.balance_after).collect::<Vec<_>>())
    .bind(ops.iter().map(|op| op.held_after).collect::<Vec<_>>())
    .bind(ops.iter().map(|op| op.transfer_id).collect::<Vec<_>>())
    .bind(ops.iter().map(|op| op.hold_id).collect::<Vec<_>>())
    .bind(ops.iter().map(|op| op.idempotency_key.clone()).collect::<Vec<_>>())
    .bind(ops.iter().map(|op| op.request_hash.clone()).collect::<Vec<_>>())
    .bind(ops.iter().map(|op| op.created_at).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// One update per touched wallet, each only if the version the cache was built on is
/// still the stored one.
async fn update_wallets(
    tx: &mut sqlx::PgConnection,
    wallets: &[WalletUpdate],
) -> Result<(), CommitError> {
    if wallets.is_empty() {
        return Ok(());
    }
    let updated = sqlx::query(
        "UPDATE wallets AS w SET balance = u.balance, held = u.held, overdraft_limit = u.overdraft_limit, \
         version = u.version, updated_at = u.updated_at \
         FROM UNNEST($1::uuid[], $2::numeric[], $3::numeric[], $4::numeric[], $5::bigint[], $6::bigint[], $7::timestamptz[]) \
         AS u(id, balance, held, overdraft_limit, version, expected, updated_at) \
         WHERE w.id = u.id AND w.version = u.expected",
    )
    .bind(wallets.iter().map(|w| w.wallet_id).collect::<Vec<_>>())
    .bind(wallets.iter().map(|w| w.balance).collect::<Vec<_>>())
    .bind(wallets.iter().map(|w| w.held).collect::<Vec<_>>())
    .bind(wallets.iter().map(|w| w.overdraft_limit).collect::<Vec<_>>())
    .bind(wallets.iter().map(|w| w.version).collect::<Vec<_>>())
    .bind(wallets.iter().map(|w| w.expected_version).collect::<Vec<_>>())
    .bind(wallets.iter().map(|w| w.updated_at).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == wallets.len() as u64 {
        Ok(())
    } else {
        Err(CommitError::StaleVersion)
    }
}

/// Transfers and holds of the batch. Settling only touches rows still in the state the
/// plan read, and all of them must be: anything else means the plan was stale.
async fn write_ledger(
    tx: &mut sqlx::PgConnection,
    ledger: &LedgerWrites,
) -> Result<(), CommitError> {
    let transfers = &ledger.new_transfers;
    if !transfers.is_empty() {
        sqlx::query(
            "INSERT INTO transfers (id, tenant_id, from_wallet_id, to_wallet_id, amount, status, to_shard, created_at) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::numeric[], $6::text[], $7::int[], $8::timestamptz[])",
        )
        .bind(transfers.iter().map(|t| t.transfer_id).collect::<Vec<_>>())
        .bind(transfers.iter().map(|t| t.tenant.as_str()).collect::<Vec<_>>())
        .bind(transfers.iter().map(|t| t.from_wallet_id).collect::<Vec<_>>())
        .bind(transfers.iter().map(|t| t.to_wallet_id).collect::<Vec<_>>())
        .bind(transfers.iter().map(|t| t.amount).collect::<Vec<_>>())
        .bind(transfers.iter().map(|t| t.status.as_str()).collect::<Vec<_>>())
        .bind(shard_params(&transfers.iter().map(|t| t.to_shard).collect::<Vec<_>>())?)
        .bind(transfers.iter().map(|t| t.created_at).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    let posted = &ledger.posted_transfers;
    if !posted.is_empty() {
        let updated = sqlx::query(
            "UPDATE transfers AS t SET status = 'POSTED', posted_at = u.posted_at \
             FROM UNNEST($1::uuid[], $2::timestamptz[]) AS u(id, posted_at) \
             WHERE t.id = u.id AND t.status = 'PENDING'",
        )
        .bind(posted.iter().map(|p| p.transfer_id).collect::<Vec<_>>())
        .bind(posted.iter().map(|p| p.posted_at).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != posted.len() as u64 {
            return Err(CommitError::StaleLedger("a pending transfer"));
        }
    }
    let holds = &ledger.new_holds;
    if !holds.is_empty() {
        sqlx::query(
            "INSERT INTO holds (id, tenant_id, wallet_id, shard, amount, captured_amount, status, expires_at, created_at, updated_at) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::int[], $5::numeric[], $6::numeric[], $7::text[], $8::timestamptz[], $9::timestamptz[], $10::timestamptz[])",
        )
        .bind(holds.iter().map(|h| h.hold_id).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.tenant.as_str()).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.wallet_id).collect::<Vec<_>>())
        .bind(shard_params(&holds.iter().map(|h| h.shard).collect::<Vec<_>>())?)
        .bind(holds.iter().map(|h| h.amount).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.captured_amount).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.status.as_str()).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.expires_at).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.created_at).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.updated_at).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    let settled = &ledger.settled_holds;
    if !settled.is_empty() {
        let updated = sqlx::query(
            "UPDATE holds AS h SET status = u.status, captured_amount = u.captured_amount, updated_at = u.updated_at \
             FROM UNNEST($1::uuid[], $2::text[], $3::numeric[], $4::timestamptz[]) AS u(id, status, captured_amount, updated_at) \
             WHERE h.id = u.id AND h.status = 'ACTIVE'",
        )
        .bind(settled.iter().map(|h| h.hold_id).collect::<Vec<_>>())
        .bind(settled.iter().map(|h| h.status.as_str()).collect::<Vec<_>>())
        .bind(settled.iter().map(|h| h.captured_amount).collect::<Vec<_>>())
        .bind(settled.iter().map(|h| h.updated_at).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != settled.len() as u64 {
            return Err(CommitError::StaleLedger("an active hold"));
        }
    }
    Ok(())
}
