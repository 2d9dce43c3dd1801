//! Reads of holds, transfers and past balances, and the owner's look-ups of work left
//! to do (holds past their expiry, transfers still PENDING).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use super::batch::shard_params;
use super::{Store, StoreError, money};
use crate::auth::Tenant;
use crate::domain::{HoldRecord, HoldStatus, TransferRecord, TransferStatus};

macro_rules! hold_columns {
    () => {
        "id, tenant_id, wallet_id, shard, amount, captured_amount, status, expires_at, created_at, updated_at"
    };
}

macro_rules! transfer_columns {
    () => {
        "id, tenant_id, from_wallet_id, to_wallet_id, amount, status, to_shard, created_at, posted_at"
    };
}

/// Which point of a wallet's history a balance is asked for.
#[derive(Clone, Copy, Debug)]
pub enum PointInTime {
    /// After the last operation recorded at or before this moment.
    At(DateTime<Utc>),
    /// After the operation with this sequence number (or the last one before it).
    Sequence(i64),
}

/// What a point-in-time look-up found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PastBalance {
    /// No such wallet (for this tenant).
    NoWallet,
    /// The wallet was created after that moment.
    NotYet,
    At(BalanceAt),
}

/// What a wallet held at a point of its history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalanceAt {
    pub balance: Decimal,
    pub held: Decimal,
    /// The last operation at or before the point; 0 before the first one.
    pub sequence: i64,
    /// When that operation was recorded (the wallet's creation for sequence 0).
    pub as_of: DateTime<Utc>,
}

pub(super) fn tenant_of(row: &PgRow) -> Result<Tenant, StoreError> {
    let name: String = row.try_get("tenant_id")?;
    Tenant::parse(&name).ok_or_else(|| StoreError::Corrupt(format!("tenant {name:?}")))
}

fn shard_of(row: &PgRow, column: &str) -> Result<u32, StoreError> {
    let shard: i32 = row.try_get(column)?;
    u32::try_from(shard).map_err(|_| StoreError::Corrupt(format!("{column} {shard}")))
}

pub(crate) fn hold_from_row(row: &PgRow) -> Result<HoldRecord, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(HoldRecord {
        hold_id: row.try_get("id")?,
        tenant: tenant_of(row)?,
        wallet_id: row.try_get("wallet_id")?,
        shard: shard_of(row, "shard")?,
        amount: money(row, "amount")?,
        captured_amount: money(row, "captured_amount")?,
        status: HoldStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("hold status {status}")))?,
        expires_at: row.try_get("expires_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn transfer_from_row(row: &PgRow) -> Result<TransferRecord, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(TransferRecord {
        transfer_id: row.try_get("id")?,
        tenant: tenant_of(row)?,
        from_wallet_id: row.try_get("from_wallet_id")?,
        to_wallet_id: row.try_get("to_wallet_id")?,
        amount: money(row, "amount")?,
        status: TransferStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("transfer status {status}")))?,
        to_shard: shard_of(row, "to_shard")?,
        created_at: row.try_get("created_at")?,
        posted_at: row.try_get("posted_at")?,
    })
}

impl Store {
    /// The wallet of a hold of `tenant`, remembered once found (a hold never moves).
    pub async fn hold_wallet(
        &self,
        tenant: &Tenant,
        hold_id: Uuid,
    ) -> Result<Option<Uuid>, StoreError> {
        if let Some((owner, wallet_id)) = self.directory.hold_wallet(&hold_id) {
            return Ok((owner == *tenant).then_some(wallet_id));
        }
        let row: Option<(String, Uuid)> = self
            .bounded(async {
                Ok(
                    sqlx::query_as("SELECT tenant_id, wallet_id FROM holds WHERE id = $1")
                        .bind(hold_id)
                        .fetch_optional(&self.pool)
                        .await?,
                )
            })
            .await?;
        let Some((owner, wallet_id)) =
            row.and_then(|(name, wallet)| Some((Tenant::parse(&name)?, wallet)))
        else {
            return Ok(None);
        };
        let found = (owner == *tenant).then_some(wallet_id);
        self.directory.remember_hold(hold_id, owner, wallet_id);
        Ok(found)
    }

    /// Remembers a hold this node just created, so its capture needs no read here.
    pub fn remember_hold(&self, hold_id: Uuid, tenant: &Tenant, wallet_id: Uuid) {
        self.directory
            .remember_hold(hold_id, tenant.clone(), wallet_id);
    }

    /// A hold of `tenant`; another tenant's hold is not found.
    pub async fn hold(
        &self,
        tenant: &Tenant,
        hold_id: Uuid,
    ) -> Result<Option<HoldRecord>, StoreError> {
        self.bounded(async {
            let row = sqlx::query(concat!(
                "SELECT ",
                hold_columns!(),
                " FROM holds WHERE id = $1 AND tenant_id = $2"
            ))
            .bind(hold_id)
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await?;
            row.as_ref().map(hold_from_row).transpose()
        })
        .await
    }

    /// The holds a batch acts on, as committed: read by the shard's owner, the only writer.
    pub async fn holds(&self, hold_ids: &[Uuid]) -> Result<Vec<HoldRecord>, StoreError> {
        self.bounded(async {
            let rows = sqlx::query(concat!(
                "SELECT ",
                hold_columns!(),
                " FROM holds WHERE id = ANY($1)"
            ))
            .bind(hold_ids)
            .fetch_all(&self.commits)
            .await?;
            rows.iter().map(hold_from_row).collect()
        })
        .await
    }

    /// A transfer of `tenant`; another tenant's transfer is not found.
    pub async fn transfer(
        &self,
        tenant: &Tenant,
        transfer_id: Uuid,
    ) -> Result<Option<TransferRecord>, StoreError> {
        self.bounded(async {
            let row = sqlx::query(concat!(
                "SELECT ",
                transfer_columns!(),
                " FROM transfers WHERE id = $1 AND tenant_id = $2"
            ))
            .bind(transfer_id)
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await?;
            row.as_ref().map(transfer_from_row).transpose()
        })
        .await
    }

    /// ACTIVE holds of `shards` whose expiry has passed, the most overdue first.
    pub async fn due_holds(
        &self,
        shards: &[u32],
        limit: i64,
    ) -> Result<Vec<HoldRecord>, StoreError> {
        let shards = shard_params(shards)?;
        self.bounded(async {
            let rows = sqlx::query(concat!(
                "SELECT ",
                hold_columns!(),
                " FROM holds WHERE shard = ANY($1) AND status = 'ACTIVE' AND expires_at IS NOT NULL ",
                "AND expires_at <= now() ORDER BY expires_at LIMIT $2"
            ))
            .bind(&shards)
            .bind(limit)
            .fetch_all(&self.commits)
            .await?;
            rows.iter().map(hold_from_row).collect()
        })
        .await
    }

    /// PENDING transfers into `shards` older than `older_than`, the oldest first: the
    /// fast path's credit did not make it (or is still on its way).
    pub async fn pending_transfers(
        &self,
        shards: &[u32],
        older_than: std::time::Duration,
        limit: i64,
    ) -> Result<Vec<TransferRecord>, StoreError> {
        let shards = shard_params(shards)?;
        let older_than = chrono::Duration::from_std(older_than)
            .map_err(|_| StoreError::Corrupt("pending age out of range".to_owned()))?;
        self.bounded(async {
            let rows = sqlx::query(concat!(
                "SELECT ",
                transfer_columns!(),
                " FROM transfers WHERE to_shard = ANY($1) AND status = 'PENDING' ",
                "AND created_at <= $2 ORDER BY created_at LIMIT $3"
            ))
            .bind(&shards)
            .bind(Utc::now() - older_than)
            .bind(limit)
            .fetch_all(&self.commits)
            .await?;
            rows.iter().map(transfer_from_row).collect()
        })
        .await
    }

    /// What a wallet of `tenant` held at `point`, from the audit trail.
    pub async fn balance_at(
        &self,
        tenant: &Tenant,
        wallet_id: Uuid,
        point: PointInTime,
    ) -> Result<PastBalance, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let created: Option<DateTime<Utc>> = sqlx::query_scalar(
                "SELECT created_at FROM wallets WHERE id = $1 AND tenant_id = $2",
            )
            .bind(wallet_id)
            .bind(tenant.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            let Some(created) = created else {
                return Ok(PastBalance::NoWallet);
            };
            // Operations are recorded at non-decreasing times in sequence order, so the
            // last by time is the last by sequence; both use an index.
            let row = match point {
                PointInTime::At(at) if at < created => return Ok(PastBalance::NotYet),
                PointInTime::At(at) => sqlx::query(
                    "SELECT seq, balance_after, held_after, created_at FROM operations \
                     WHERE wallet_id = $1 AND created_at <= $2 ORDER BY created_at DESC, seq DESC LIMIT 1",
                )
                .bind(wallet_id)
                .bind(at)
                .fetch_optional(&mut *tx)
                .await?,
                PointInTime::Sequence(sequence) => sqlx::query(
                    "SELECT seq, balance_after, held_after, created_at FROM operations \
                     WHERE wallet_id = $1 AND seq <= $2 ORDER BY seq DESC LIMIT 1",
                )
                .bind(wallet_id)
                .bind(sequence)
                .fetch_optional(&mut *tx)
                .await?,
            };
            tx.commit().await?;
            Ok(PastBalance::At(match row {
                Some(row) => BalanceAt {
                    balance: money(&row, "balance_after")?,
                    held: money(&row, "held_after")?,
                    sequence: row.try_get("seq")?,
                    as_of: row.try_get("created_at")?,
                },
                None => BalanceAt {
                    balance: Decimal::new(0, 2),
                    held: Decimal::new(0, 2),
                    sequence: 0,
                    as_of: created,
                },
            }))
        })
        .await
    }
}
