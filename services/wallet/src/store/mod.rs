//! Everything the node reads from and writes to PostgreSQL.
//!
//! Every write is an explicit transaction; money is NUMERIC(20,2) on both sides.

mod batch;
mod directory;
mod events;

mod ledger;
mod webhooks;

pub use batch::{
    BatchWrite, CommitError, LedgerWrites, PostedTransfer, Resolution, ShardFence, WalletUpdate,
};
pub use events::{
    ClaimOutcome, ConsumerClaim, ConsumerLag, EventPage, Horizon, PruneOutcome, ReadEventsError,
};
pub use ledger::{BalanceAt, PastBalance, PointInTime};
pub use webhooks::{
    AttemptRecord, CreatedWebhook, DeliveryCursor, FanOut, RecordedAttempt, RetryDelivery,
    TooManyWebhooks,
};

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use crate::auth::Tenant;
use crate::domain::{OperationRecord, OperationStatus, OperationType, RejectionReason};

/// The schema version this build needs: the newest file in `migrations/`.
pub const REQUIRED_SCHEMA_VERSION: i64 = 6;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// The client-side timeout fired: the server may be slow, or unreachable without
    /// ever saying so (packets dropped).
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("stored row is not valid: {0}")]
    Corrupt(String),
    /// A COMMIT got no answer and looking again did not find out how it ended.
    #[error("could not find out whether {0} committed")]
    Unsettled(&'static str),
}

/// How an attempt at creating a wallet failed.
enum CreateFailed {
    /// Nothing of it is in the database.
    BeforeCommit(StoreError),
    /// COMMIT was sent: it may have committed.
    Commit(StoreError),
}

impl StoreError {
    /// The statement certainly or possibly did not run, and running it again may work.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Timeout(_) => true,
            Self::Corrupt(_) | Self::Unsettled(_) => false,
            Self::Database(error) => match error {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Protocol(_) => true,
                sqlx::Error::Database(db) => matches!(
                    db.code().as_deref(),
                    // serialization_failure, idle-in-transaction timeout (a paused node's
                    // session ended before COMMIT), lock_timeout (a claim held the fence
                    // row), deadlock, admin shutdown / crash recovery / cannot connect now,
                    // connection exceptions, statement timeout
                    Some(
                        "40001"
                            | "25P03"
                            | "55P03"
                            | "40P01"
                            | "57P01"
                            | "57P02"
                            | "57P03"
                            | "57014"
                            | "08000"
                            | "08003"
                            | "08006"
                    )
                ),
                _ => false,
            },
        }
    }
}

/// Client-side bounds of the node's database work.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// One batch transaction, from acquiring its connection to COMMIT's answer.
    pub commit: Duration,
    /// One read (a page of history, a balance).
    pub read: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WalletState {
    pub balance: Decimal,
    /// Funds reserved by ACTIVE holds.
    pub held: Decimal,
    pub overdraft_limit: Decimal,
    pub version: i64,
    pub tenant: Tenant,
    /// When its last operation was recorded: the next one is never recorded earlier, so
    /// a point-in-time look-up by time agrees with the order of the sequence.
    pub updated_at: DateTime<Utc>,
}

impl WalletState {
    /// What may still be spent: `balance - held + overdraft_limit`.
    pub fn available(&self) -> Decimal {
        self.balance - self.held + self.overdraft_limit
    }
}

/// A stored response to a non-operation request (wallet creation).
#[derive(Clone, Debug)]
pub struct StoredResponse {
    pub request_hash: String,
    pub status: u16,
    pub body: serde_json::Value,
}

/// The operation columns, as a literal so queries stay static strings.
macro_rules! operation_columns {
    () => {
        "id, wallet_id, seq, operation_type, amount, status, reason, balance_after, held_after, transfer_id, hold_id, idempotency_key, request_hash, created_at"
    };
}

/// The node's database access, over separate pools so that reads can never starve
/// commits: `commits` serves the executors' batch transactions (and their look-ups),
/// `pool` the API's reads and wallet creation, `deliveries` the webhook workers. Fence
/// claims and readiness have a pool of their own, in the cluster layer.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    commits: PgPool,
    control: PgPool,
    deliveries: PgPool,
    timeouts: Timeouts,
    directory: std::sync::Arc<directory::Directory>,
    /// Whether wallet creation writes its outbox row (`WALLET_EVENTS_ENABLED`).
    events: bool,
}

/// The pools of a node.
#[derive(Clone)]
pub struct Pools {
    /// The API's reads and wallet creation.
    pub reads: PgPool,
    /// Batch transactions, the wallet loads and look-ups of planning.
    pub commits: PgPool,
    /// Fence claims, the health check and the schema check: few connections, never
    /// waiting behind the others.
    pub control: PgPool,
    /// The webhook workers' fan-out, claims and outcomes, committed asynchronously: at
    /// least once survives losing them, and the API's and executors' commits do not wait
    /// behind their WAL flushes.
    pub deliveries: PgPool,
}

impl Store {
    pub fn new(pools: Pools, timeouts: Timeouts) -> Self {
        Self {
            pool: pools.reads,
            commits: pools.commits,
            control: pools.control,
            deliveries: pools.deliveries,
            timeouts,
            directory: std::sync::Arc::new(directory::Directory::new()),
            events: true,
        }
    }

    /// With `false`, nothing writes to the outbox (`WALLET_EVENTS_ENABLED=false`).
    pub fn with_events(mut self, events: bool) -> Self {
        self.events = events;
        self
    }

    pub fn events_enabled(&self) -> bool {
        self.events
    }

    /// Whether `wallet_id` is a wallet of `tenant`, remembered once found.
    pub async fn wallet_exists(
        &self,
        tenant: &Tenant,
        wallet_id: Uuid,
    ) -> Result<bool, StoreError> {
        if let Some(owner) = self.directory.wallet_tenant(&wallet_id) {
            return Ok(owner == *tenant);
        }
        let owner: Option<String> = self
            .bounded(async {
                Ok(
                    sqlx::query_scalar("SELECT tenant_id FROM wallets WHERE id = $1")
                        .bind(wallet_id)
                        .fetch_optional(&self.pool)
                        .await?,
                )
            })
            .await?;
        let Some(owner) = owner.and_then(|name| Tenant::parse(&name)) else {
            return Ok(false);
        };
        let exists = owner == *tenant;
        self.directory.remember_wallet(wallet_id, owner);
        Ok(exists)
    }

    /// Bounds `work` by the read timeout.
    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeouts.read, work)
            .await
            .map_err(|_| StoreError::Timeout("a read"))?
    }

    /// Highest applied migration, or `None` when the migrator never ran.
    pub async fn schema_version(&self) -> Result<Option<i64>, StoreError> {
        self.bounded(async {
            let exists: bool =
                sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations') IS NOT NULL")
                    .fetch_one(&self.control)
                    .await?;
            if !exists {
                return Ok(None);
            }
            let version: Option<i64> =
                sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                    .fetch_one(&self.control)
                    .await?;
            Ok(version)
        })
        .await
    }

    /// Creates a wallet; with an idempotency key the first response is stored in the
    /// same transaction, and a later request with the key gets that response back.
    /// Creates the wallet once, or answers the key's first answer. A COMMIT that got
    /// no answer is settled by creating again until `settle_until`: the wallet id is
    /// new, so finding it (or the key's answer naming it) means the first COMMIT went
    /// through, and the repeated INSERTs wait for that transaction if it is still on
    /// the server. `Unsettled` if the outcome is still unknown then.
    pub async fn create_wallet(
        &self,
        tenant: &Tenant,
        wallet_id: Uuid,
        idempotency: Option<(&str, &str)>,
        response_body: &serde_json::Value,
        settle_until: tokio::time::Instant,
    ) -> Result<Option<StoredResponse>, StoreError> {
        let mut unsettled = false;
        let mut backoff = Duration::from_millis(50);
        loop {
            let last = match self
                .try_create_wallet(tenant, wallet_id, idempotency, response_body)
                .await
            {
                Ok(created) => return Ok(created),
                // Nothing was written: safe to try again while there is time.
                Err(CreateFailed::BeforeCommit(error)) if unsettled || error.is_transient() => {
                    tracing::warn!(error = %error, %wallet_id, "creating a wallet failed; trying again");
                    error
                }
                Err(CreateFailed::BeforeCommit(error)) => return Err(error),
                Err(CreateFailed::Commit(error)) => {
                    tracing::warn!(error = %error, %wallet_id, "creating a wallet got no COMMIT answer; settling it");
                    unsettled = true;
                    error
                }
            };
            if tokio::time::Instant::now() + backoff >= settle_until {
                return Err(if unsettled {
                    StoreError::Unsettled("a wallet creation")
                } else {
                    last
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    async fn try_create_wallet(
        &self,
        tenant: &Tenant,
        wallet_id: Uuid,
        idempotency: Option<(&str, &str)>,
        response_body: &serde_json::Value,
    ) -> Result<Option<StoredResponse>, CreateFailed> {
        let prepared = self.bounded(async {
            let mut tx = self.pool.begin().await?;
            if let Some((key, request_hash)) = idempotency {
                let inserted = sqlx::query(
                    "INSERT INTO idempotency_keys (tenant_id, scope, idempotency_key, request_hash, response_status, response_body) \
                     VALUES ($4, 'create-wallet', $1, $2, 201, $3) ON CONFLICT (tenant_id, scope, idempotency_key) DO NOTHING",
                )
                .bind(key)
                .bind(request_hash)
                .bind(response_body)
                .bind(tenant.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 0 {
                    let row = sqlx::query(
                        "SELECT request_hash, response_status, response_body FROM idempotency_keys \
                         WHERE tenant_id = $2 AND scope = 'create-wallet' AND idempotency_key = $1",
                    )
                    .bind(key)
                    .bind(tenant.as_str())
                    .fetch_one(&mut *tx)
                    .await?;
                    tx.rollback().await?;
                    let status: i16 = row.try_get("response_status")?;
                    let stored = StoredResponse {
                        request_hash: row.try_get("request_hash")?,
                        status: u16::try_from(status)
                            .map_err(|_| StoreError::Corrupt(format!("status {status}")))?,
                        body: row.try_get("response_body")?,
                    };
                    // Our own earlier attempt's answer: that COMMIT went through.
                    let ours = stored.body == *response_body;
                    return Ok(Err((!ours).then_some(stored)));
                }
            }
            // Conflicts only with an earlier attempt of this request: the id is new.
            if self.events {
                // Its wallet.created event only with the row itself, never twice.
                let event = crate::events::wallet_created(tenant, wallet_id, Utc::now());
                sqlx::query(
                    "WITH created AS (INSERT INTO wallets (id, tenant_id, balance, version) VALUES ($1, $2, 0, 0) \
                     ON CONFLICT (id) DO NOTHING RETURNING id, tenant_id) \
                     INSERT INTO events (ordinal, event_id, tenant_id, wallet_id, sequence, event_type, occurred_at, data) \
                     SELECT 0, $3, tenant_id, id, 0, $4, $5, $6::json FROM created",
                )
                .bind(wallet_id)
                .bind(tenant.as_str())
                .bind(event.event_id)
                .bind(event.event_type.as_str())
                .bind(event.occurred_at)
                .bind(&event.data)
                .execute(&mut *tx)
                .await?;
            } else {
                sqlx::query(
                    "INSERT INTO wallets (id, tenant_id, balance, version) VALUES ($1, $2, 0, 0) ON CONFLICT (id) DO NOTHING",
                )
                .bind(wallet_id)
                .bind(tenant.as_str())
                .execute(&mut *tx)
                .await?;
            }
            Ok(Ok(tx))
        })
        .await
        .map_err(CreateFailed::BeforeCommit)?;
        let tx = match prepared {
            Ok(tx) => tx,
            Err(answered) => return Ok(answered),
        };
        match tokio::time::timeout(self.timeouts.commit, tx.commit()).await {
            Ok(Ok(())) => Ok(None),
            Ok(Err(error)) => Err(CreateFailed::Commit(error.into())),
            Err(_) => Err(CreateFailed::Commit(StoreError::Timeout(
                "a wallet creation's COMMIT",
            ))),
        }
    }

    /// A wallet of `tenant`; another tenant's wallet is not found.
    pub async fn wallet(
        &self,
        tenant: &Tenant,
        wallet_id: Uuid,
    ) -> Result<Option<WalletState>, StoreError> {
        self.bounded(async {
            let row = sqlx::query(
                "SELECT balance, held, overdraft_limit, version, updated_at FROM wallets WHERE id = $1 AND tenant_id = $2",
            )
            .bind(wallet_id)
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await?;
            row.map(|row| wallet_from_row(&row, tenant.clone())).transpose()
        })
        .await
    }

    pub async fn wallets(
        &self,
        wallet_ids: &[Uuid],
    ) -> Result<Vec<(Uuid, WalletState)>, StoreError> {
        self.bounded(async {
            let rows = sqlx::query(
                "SELECT id, tenant_id, balance, held, overdraft_limit, version, updated_at FROM wallets WHERE id = ANY($1)",
            )
            .bind(wallet_ids)
            .fetch_all(&self.commits)
            .await?;
            // One shared name per tenant of the load, not one per cached wallet.
            let mut tenants: HashMap<String, Tenant> = HashMap::new();
            rows.iter()
                .map(|row| {
                    let name: String = row.try_get("tenant_id")?;
                    let tenant = match tenants.get(&name) {
                        Some(tenant) => tenant.clone(),
                        None => {
                            let tenant = Tenant::parse(&name)
                                .ok_or_else(|| StoreError::Corrupt(format!("tenant {name:?}")))?;
                            tenants.insert(name, tenant.clone());
                            tenant
                        }
                    };
                    Ok((row.try_get("id")?, wallet_from_row(row, tenant)?))
                })
                .collect()
        })
        .await
    }

    /// Operations already recorded under one of `operation_ids`, or under one of the
    /// (wallet, idempotency key) pairs.
    pub async fn existing_operations(
        &self,
        operation_ids: &[Uuid],
        keyed: &[(Uuid, String)],
    ) -> Result<Vec<OperationRecord>, StoreError> {
        self.bounded(async {
            let (key_wallets, keys): (Vec<Uuid>, Vec<String>) = keyed.iter().cloned().unzip();
            let rows = sqlx::query(concat!(
                "SELECT ",
                operation_columns!(),
                " FROM operations WHERE id = ANY($1) ",
                "UNION SELECT ",
                operation_columns!(),
                " FROM operations ",
                "WHERE (wallet_id, idempotency_key) IN (SELECT * FROM UNNEST($2::uuid[], $3::text[]))"
            ))
            .bind(operation_ids)
            .bind(&key_wallets)
            .bind(&keys)
            .fetch_all(&self.commits)
            .await?;
            rows.iter().map(operation_from_row).collect()
        })
        .await
    }

    /// An operation of a wallet of `tenant`.
    pub async fn operation(
        &self,
        tenant: &Tenant,
        wallet_id: Uuid,
        operation_id: Uuid,
    ) -> Result<Option<OperationRecord>, StoreError> {
        self.bounded(async {
            let row = sqlx::query(concat!(
                "SELECT ",
                operation_columns!(),
                " FROM operations WHERE wallet_id = $1 AND id = $2 ",
                "AND EXISTS (SELECT 1 FROM wallets w WHERE w.id = $1 AND w.tenant_id = $3)"
            ))
            .bind(wallet_id)
            .bind(operation_id)
            .bind(tenant.as_str())
            .fetch_optional(&self.pool)
            .await?;
            row.as_ref().map(operation_from_row).transpose()
        })
        .await
    }

    /// A page of a wallet's operations, newest first, strictly before `before_seq`.
    /// The per-wallet sequence only grows, so new operations never shift a page.
    pub async fn operations_page(
        &self,
        wallet_id: Uuid,
        before_seq: Option<i64>,
        limit: i64,
    ) -> Result<Vec<OperationRecord>, StoreError> {
        self.bounded(async {
            let rows = sqlx::query(concat!(
                "SELECT ",
                operation_columns!(),
                " FROM operations WHERE wallet_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
            ))
            .bind(wallet_id)
            .bind(before_seq.unwrap_or(i64::MAX))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(operation_from_row).collect()
        })
        .await
    }
}

/// Takes the transaction's advisory lock named `key` unless another session holds it:
/// `false` then, without waiting.
pub(super) async fn try_xact_lock(
    conn: &mut sqlx::PgConnection,
    key: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(key)
        .fetch_one(conn)
        .await
}

/// Money as stored, with its two decimals: PostgreSQL sends a NUMERIC zero without
/// digits, which would otherwise read back as "0" instead of "0.00".
pub(crate) fn money(row: &PgRow, column: &str) -> Result<Decimal, StoreError> {
    let mut value: Decimal = row.try_get(column)?;
    value.rescale(2);
    Ok(value)
}

fn wallet_from_row(row: &PgRow, tenant: Tenant) -> Result<WalletState, StoreError> {
    Ok(WalletState {
        balance: money(row, "balance")?,
        held: money(row, "held")?,
        overdraft_limit: money(row, "overdraft_limit")?,
        version: row.try_get("version")?,
        tenant,
        updated_at: row.try_get("updated_at")?,
    })
}

pub(crate) fn operation_from_row(row: &PgRow) -> Result<OperationRecord, StoreError> {
    let operation_type: String = row.try_get("operation_type")?;
    let status: String = row.try_get("status")?;
    let reason: Option<String> = row.try_get("reason")?;
    let created_at: DateTime<Utc> = row.try_get("created_at")?;
    Ok(OperationRecord {
        operation_id: row.try_get("id")?,
        wallet_id: row.try_get("wallet_id")?,
        seq: row.try_get("seq")?,
        operation_type: OperationType::parse(&operation_type)
            .ok_or_else(|| StoreError::Corrupt(format!("operation_type {operation_type}")))?,
        amount: money(row, "amount")?,
        status: OperationStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("status {status}")))?,
        reason: reason
            .map(|reason| {
                RejectionReason::parse(&reason)
                    .ok_or_else(|| StoreError::Corrupt(format!("reason {reason}")))
            })
            .transpose()?,
        balance_after: money(row, "balance_after")?,
        held_after: money(row, "held_after")?,
        transfer_id: row.try_get("transfer_id")?,
        hold_id: row.try_get("hold_id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        request_hash: row.try_get("request_hash")?,
        created_at,
    })
}
