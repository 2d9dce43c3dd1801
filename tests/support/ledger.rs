//! The ledger audit in PostgreSQL, after the ledger's invariants in docs/design.md
//! (`wallets`, `operations`, `transfers`, `holds`):
//! - conservation: sum(balance) + PENDING transfers = deposits - withdrawals - captures;
//! - per wallet: seq gap-free 1..version, every row's balance_after and held_after follow
//!   from the APPLIED rows before it, available (balance_after - held_after + the limit
//!   then) never below zero, and the last row equal to the `wallets` row;
//! - every transfer has exactly the rows its status calls for (POSTED: one APPLIED
//!   TRANSFER_OUT and one APPLIED TRANSFER_IN; PENDING: the TRANSFER_OUT only; REJECTED:
//!   one REJECTED TRANSFER_OUT), every hold too, and no row names an unknown one.
//!
//! Everything is read in one REPEATABLE READ snapshot, so it may run while nodes work.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// Broken rules spelled out in a report; the rest are only counted.
const MAX_PROBLEMS: usize = 25;

/// The totals conservation compares, from one snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conservation {
    pub balances: Decimal,
    pub pending: Decimal,
    pub pending_count: usize,
    pub deposits: Decimal,
    pub withdrawals: Decimal,
    pub captures: Decimal,
}

impl Conservation {
    /// (sum of balances + PENDING) - (deposits - withdrawals - captures): zero when money
    /// is conserved.
    pub fn difference(&self) -> Decimal {
        self.balances + self.pending - (self.deposits - self.withdrawals - self.captures)
    }

    pub fn holds(&self) -> bool {
        self.difference().is_zero()
    }
}

/// Conservation in one statement (one snapshot), cheap enough to sample under load;
/// with the count and the age (seconds) of the oldest PENDING transfer.
pub async fn conservation(pool: &PgPool) -> anyhow::Result<(Conservation, Option<f64>)> {
    let row = sqlx::query(
        "SELECT \
           (SELECT COALESCE(sum(balance), 0) FROM wallets) AS balances, \
           (SELECT COALESCE(sum(amount), 0) FROM transfers WHERE status = 'PENDING') AS pending, \
           (SELECT count(*) FROM transfers WHERE status = 'PENDING') AS pending_count, \
           (SELECT EXTRACT(EPOCH FROM clock_timestamp() - min(created_at))::float8 \
              FROM transfers WHERE status = 'PENDING') AS oldest_pending, \
           (SELECT COALESCE(sum(amount), 0) FROM operations \
              WHERE status = 'APPLIED' AND operation_type = 'DEPOSIT') AS deposits, \
           (SELECT COALESCE(sum(amount), 0) FROM operations \
              WHERE status = 'APPLIED' AND operation_type = 'WITHDRAW') AS withdrawals, \
           (SELECT COALESCE(sum(amount), 0) FROM operations \
              WHERE status = 'APPLIED' AND operation_type = 'CAPTURE') AS captures",
    )
    .fetch_one(pool)
    .await?;
    let pending_count: i64 = row.get("pending_count");
    Ok((
        Conservation {
            balances: row.get("balances"),
            pending: row.get("pending"),
            pending_count: usize::try_from(pending_count)?,
            deposits: row.get("deposits"),
            withdrawals: row.get("withdrawals"),
            captures: row.get("captures"),
        },
        row.get("oldest_pending"),
    ))
}

/// One row of `operations`.
#[derive(Clone, Debug)]
pub struct OperationRow {
    pub id: Uuid,
    pub wallet: Uuid,
    pub seq: i64,
    pub kind: String,
    pub amount: Decimal,
    pub status: String,
    pub reason: Option<String>,
    pub balance_after: Decimal,
    pub held_after: Decimal,
    pub transfer_id: Option<Uuid>,
    pub hold_id: Option<Uuid>,
}

const OPERATION_COLUMNS: &str = "id, wallet_id, seq, operation_type, amount, status, reason, \
     balance_after, held_after, transfer_id, hold_id";

fn operation_row(row: &sqlx::postgres::PgRow) -> OperationRow {
    OperationRow {
        id: row.get("id"),
        wallet: row.get("wallet_id"),
        seq: row.get("seq"),
        kind: row.get("operation_type"),
        amount: row.get("amount"),
        status: row.get("status"),
        reason: row.get("reason"),
        balance_after: row.get("balance_after"),
        held_after: row.get("held_after"),
        transfer_id: row.get("transfer_id"),
        hold_id: row.get("hold_id"),
    }
}

/// The audit trail of one wallet in seq order.
pub async fn operations_of(pool: &PgPool, wallet: Uuid) -> anyhow::Result<Vec<OperationRow>> {
    Ok(sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {OPERATION_COLUMNS} FROM operations WHERE wallet_id = $1 ORDER BY seq"
    )))
    .bind(wallet)
    .fetch_all(pool)
    .await?
    .iter()
    .map(operation_row)
    .collect())
}

/// One row of `transfers`.
#[derive(Clone, Debug)]
pub struct TransferRow {
    pub id: Uuid,
    pub from: Uuid,
    pub to: Uuid,
    pub amount: Decimal,
    pub status: String,
    pub to_shard: i32,
}

pub async fn transfers(pool: &PgPool) -> anyhow::Result<Vec<TransferRow>> {
    Ok(sqlx::query(
        "SELECT id, from_wallet_id, to_wallet_id, amount, status, to_shard FROM transfers",
    )
    .fetch_all(pool)
    .await?
    .iter()
    .map(transfer_row)
    .collect())
}

fn transfer_row(row: &sqlx::postgres::PgRow) -> TransferRow {
    TransferRow {
        id: row.get("id"),
        from: row.get("from_wallet_id"),
        to: row.get("to_wallet_id"),
        amount: row.get("amount"),
        status: row.get("status"),
        to_shard: row.get("to_shard"),
    }
}

/// A transfer still PENDING, and for how long (seconds since its created_at).
#[derive(Clone, Debug)]
pub struct PendingTransfer {
    pub id: Uuid,
    pub from: Uuid,
    pub to: Uuid,
    pub amount: Decimal,
    pub to_shard: i32,
    pub age_secs: f64,
}

pub async fn pending_transfers(pool: &PgPool) -> anyhow::Result<Vec<PendingTransfer>> {
    Ok(sqlx::query(
        "SELECT id, from_wallet_id, to_wallet_id, amount, to_shard, \
           EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8 AS age \
         FROM transfers WHERE status = 'PENDING' ORDER BY created_at",
    )
    .fetch_all(pool)
    .await?
    .iter()
    .map(|row| PendingTransfer {
        id: row.get("id"),
        from: row.get("from_wallet_id"),
        to: row.get("to_wallet_id"),
        amount: row.get("amount"),
        to_shard: row.get("to_shard"),
        age_secs: row.get("age"),
    })
    .collect())
}

/// Waits up to `within` until no transfer is PENDING: how long that took, or those
/// still PENDING at the end.
pub async fn wait_no_pending(
    pool: &PgPool,
    within: Duration,
) -> anyhow::Result<Result<Duration, Vec<PendingTransfer>>> {
    let started = Instant::now();
    loop {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM transfers WHERE status = 'PENDING'")
                .fetch_one(pool)
                .await?;
        if pending == 0 {
            return Ok(Ok(started.elapsed()));
        }
        if started.elapsed() >= within {
            return Ok(Err(pending_transfers(pool).await?));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What `audit_ledger` found.
#[derive(Debug, Default)]
pub struct LedgerAudit {
    pub wallets: usize,
    pub rows: usize,
    /// Transfers and holds by status.
    pub transfers: BTreeMap<String, usize>,
    pub holds: BTreeMap<String, usize>,
    pub conservation: Conservation,
    /// The lowest balance_after - held_after + limit of any committed row.
    pub lowest_available: Option<Decimal>,
    /// The lowest balance_after of any committed row (below zero: an overdraft in use).
    pub lowest_balance: Option<Decimal>,
    /// Every broken rule; the first `MAX_PROBLEMS` spelled out.
    pub problems: Vec<String>,
    pub problem_count: usize,
}

impl LedgerAudit {
    fn problem(&mut self, text: String) {
        self.problem_count += 1;
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(text);
        }
    }

    pub fn is_clean(&self) -> bool {
        self.problem_count == 0
    }

    /// Fails with every problem found (PENDING transfers are no problem here; whether
    /// any may remain is the caller's rule).
    pub fn ensure_clean(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.is_clean(),
            "ledger audit: {} problems ({}); first: {:#?}",
            self.problem_count,
            self.summary(),
            self.problems
        );
        Ok(())
    }

    pub fn summary(&self) -> String {
        format!(
            "{} wallets, {} rows, transfers {:?}, holds {:?}, conservation {:?} (difference {}), \
             lowest available {:?}, lowest balance {:?}, problems {}",
            self.wallets,
            self.rows,
            self.transfers,
            self.holds,
            self.conservation,
            self.conservation.difference(),
            self.lowest_available,
            self.lowest_balance,
            self.problem_count,
        )
    }
}

struct WalletRow {
    id: Uuid,
    balance: Decimal,
    held: Decimal,
    overdraft_limit: Decimal,
    version: i64,
}

struct HoldRow {
    id: Uuid,
    wallet: Uuid,
    amount: Decimal,
    captured: Decimal,
    status: String,
}

/// The whole audit of the database, from one snapshot.
pub async fn audit_ledger(pool: &PgPool) -> anyhow::Result<LedgerAudit> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let wallets: Vec<WalletRow> =
        sqlx::query("SELECT id, balance, held, overdraft_limit, version FROM wallets")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|row| WalletRow {
                id: row.get("id"),
                balance: row.get("balance"),
                held: row.get("held"),
                overdraft_limit: row.get("overdraft_limit"),
                version: row.get("version"),
            })
            .collect();
    let rows: Vec<OperationRow> = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {OPERATION_COLUMNS} FROM operations ORDER BY wallet_id, seq"
    )))
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(operation_row)
    .collect();
    let transfers: Vec<TransferRow> = sqlx::query(
        "SELECT id, from_wallet_id, to_wallet_id, amount, status, to_shard FROM transfers",
    )
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(transfer_row)
    .collect();
    let holds: Vec<HoldRow> =
        sqlx::query("SELECT id, wallet_id, amount, captured_amount, status FROM holds")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|row| HoldRow {
                id: row.get("id"),
                wallet: row.get("wallet_id"),
                amount: row.get("amount"),
                captured: row.get("captured_amount"),
                status: row.get("status"),
            })
            .collect();
    let outbox = crate::events::outbox_problems(&mut tx).await?;
    tx.commit().await?;

    let mut report = LedgerAudit {
        wallets: wallets.len(),
        rows: rows.len(),
        ..LedgerAudit::default()
    };
    for problem in outbox {
        report.problem(format!("outbox: {problem}"));
    }
    check_wallets(&mut report, &wallets, &rows);
    check_transfers(&mut report, &transfers, &rows);
    check_holds(&mut report, &holds, &wallets, &rows);

    let applied = |kind: &str| -> Decimal {
        rows.iter()
            .filter(|row| row.status == "APPLIED" && row.kind == kind)
            .map(|row| row.amount)
            .sum()
    };
    let pending: Vec<&TransferRow> = transfers.iter().filter(|t| t.status == "PENDING").collect();
    report.conservation = Conservation {
        balances: wallets.iter().map(|w| w.balance).sum(),
        pending: pending.iter().map(|t| t.amount).sum(),
        pending_count: pending.len(),
        deposits: applied("DEPOSIT"),
        withdrawals: applied("WITHDRAW"),
        captures: applied("CAPTURE"),
    };
    if !report.conservation.holds() {
        let text = format!(
            "money not conserved: balances {} + PENDING {} != deposits {} - withdrawals {} - captures {} (off by {})",
            report.conservation.balances,
            report.conservation.pending,
            report.conservation.deposits,
            report.conservation.withdrawals,
            report.conservation.captures,
            report.conservation.difference()
        );
        report.problem(text);
    }
    Ok(report)
}

/// Per wallet: gap-free seq, balances and held amounts that follow row by row, available
/// never below zero, the last row equal to the `wallets` row.
fn check_wallets(report: &mut LedgerAudit, wallets: &[WalletRow], rows: &[OperationRow]) {
    let mut by_wallet: HashMap<Uuid, Vec<&OperationRow>> = HashMap::new();
    for row in rows {
        by_wallet.entry(row.wallet).or_default().push(row);
    }
    for wallet in wallets {
        let trail = by_wallet.remove(&wallet.id).unwrap_or_default();
        let (mut balance, mut held, mut limit) = (Decimal::ZERO, Decimal::ZERO, Decimal::ZERO);
        let mut expected_seq = 0;
        for row in trail {
            expected_seq += 1;
            if row.seq != expected_seq {
                report.problem(format!(
                    "wallet {}: seq {} where {expected_seq} was due",
                    wallet.id, row.seq
                ));
                expected_seq = row.seq;
            }
            match row.status.as_str() {
                "APPLIED" => match row.kind.as_str() {
                    "DEPOSIT" | "TRANSFER_IN" => balance += row.amount,
                    "WITHDRAW" | "TRANSFER_OUT" => balance -= row.amount,
                    "HOLD" => held += row.amount,
                    "CAPTURE" => {
                        balance -= row.amount;
                        held -= row.amount;
                    }
                    "RELEASE" => held -= row.amount,
                    "OVERDRAFT_LIMIT" => limit = row.amount,
                    other => report.problem(format!(
                        "wallet {} seq {}: unknown operation type {other}",
                        wallet.id, row.seq
                    )),
                },
                "REJECTED" => {}
                other => report.problem(format!(
                    "wallet {} seq {}: unknown status {other}",
                    wallet.id, row.seq
                )),
            }
            if row.balance_after != balance || row.held_after != held {
                report.problem(format!(
                    "wallet {} seq {} ({} {} {}): stored balance_after {} held_after {}, \
                     the rows before add up to balance {balance} held {held}",
                    wallet.id,
                    row.seq,
                    row.kind,
                    row.status,
                    row.amount,
                    row.balance_after,
                    row.held_after
                ));
                // Go on from what was stored, so one bad row is reported once.
                balance = row.balance_after;
                held = row.held_after;
            }
            if held < Decimal::ZERO {
                report.problem(format!(
                    "wallet {} seq {}: held {held} below zero",
                    wallet.id, row.seq
                ));
            }
            let available = row.balance_after - row.held_after + limit;
            if available < Decimal::ZERO {
                report.problem(format!(
                    "wallet {} seq {} ({} {} {}): balance_after {} - held_after {} + limit {limit} = {available} < 0",
                    wallet.id,
                    row.seq,
                    row.kind,
                    row.status,
                    row.amount,
                    row.balance_after,
                    row.held_after
                ));
            }
            report.lowest_available = Some(
                report
                    .lowest_available
                    .map_or(available, |low| low.min(available)),
            );
            report.lowest_balance = Some(
                report
                    .lowest_balance
                    .map_or(row.balance_after, |low| low.min(row.balance_after)),
            );
        }
        if wallet.version != expected_seq {
            report.problem(format!(
                "wallet {}: version {} but {expected_seq} rows",
                wallet.id, wallet.version
            ));
        }
        if wallet.balance != balance || wallet.held != held || wallet.overdraft_limit != limit {
            report.problem(format!(
                "wallet {}: row says balance {} held {} limit {}, its audit trail {balance} {held} {limit}",
                wallet.id, wallet.balance, wallet.held, wallet.overdraft_limit
            ));
        }
    }
    for (wallet, trail) in by_wallet {
        report.problem(format!(
            "{} operations of wallet {wallet}, which has no wallets row",
            trail.len()
        ));
    }
}

/// Every transfer has the rows its status calls for, every transfer row a transfer.
fn check_transfers(report: &mut LedgerAudit, transfers: &[TransferRow], rows: &[OperationRow]) {
    let mut by_transfer: HashMap<Uuid, Vec<&OperationRow>> = HashMap::new();
    for row in rows {
        let is_transfer_row = matches!(row.kind.as_str(), "TRANSFER_OUT" | "TRANSFER_IN");
        match row.transfer_id {
            Some(id) => by_transfer.entry(id).or_default().push(row),
            None if is_transfer_row => report.problem(format!(
                "{} row {} (wallet {} seq {}) has no transfer_id",
                row.kind, row.id, row.wallet, row.seq
            )),
            None => {}
        }
    }
    for transfer in transfers {
        *report.transfers.entry(transfer.status.clone()).or_default() += 1;
        let trail = by_transfer.remove(&transfer.id).unwrap_or_default();
        let count = |kind: &str, status: &str, wallet: Uuid| {
            trail
                .iter()
                .filter(|row| {
                    row.kind == kind
                        && row.status == status
                        && row.wallet == wallet
                        && row.amount == transfer.amount
                })
                .count()
        };
        let expected: &[(&str, &str, Uuid)] = match transfer.status.as_str() {
            "POSTED" => &[
                ("TRANSFER_OUT", "APPLIED", transfer.from),
                ("TRANSFER_IN", "APPLIED", transfer.to),
            ],
            "PENDING" => &[("TRANSFER_OUT", "APPLIED", transfer.from)],
            "REJECTED" => &[("TRANSFER_OUT", "REJECTED", transfer.from)],
            other => {
                report.problem(format!("transfer {}: unknown status {other}", transfer.id));
                continue;
            }
        };
        let matched = expected
            .iter()
            .all(|(kind, status, wallet)| count(kind, status, *wallet) == 1);
        if !matched || trail.len() != expected.len() {
            let seen: Vec<String> = trail
                .iter()
                .map(|row| {
                    format!(
                        "{} {} {} on {} seq {}",
                        row.kind, row.status, row.amount, row.wallet, row.seq
                    )
                })
                .collect();
            report.problem(format!(
                "transfer {} {} ({} -> {}, {}): rows {seen:?}, expected {expected:?}",
                transfer.id, transfer.status, transfer.from, transfer.to, transfer.amount
            ));
        }
    }
    for (id, trail) in by_transfer {
        report.problem(format!(
            "{} rows name transfer {id}, which is not in transfers",
            trail.len()
        ));
    }
}

/// Every hold has the rows its status calls for; a wallet's held amount is the sum of
/// its ACTIVE holds.
fn check_holds(
    report: &mut LedgerAudit,
    holds: &[HoldRow],
    wallets: &[WalletRow],
    rows: &[OperationRow],
) {
    let mut by_hold: HashMap<Uuid, Vec<&OperationRow>> = HashMap::new();
    for row in rows {
        let is_hold_row = matches!(row.kind.as_str(), "HOLD" | "CAPTURE" | "RELEASE");
        match row.hold_id {
            Some(id) => by_hold.entry(id).or_default().push(row),
            None if is_hold_row => report.problem(format!(
                "{} row {} (wallet {} seq {}) has no hold_id",
                row.kind, row.id, row.wallet, row.seq
            )),
            None => {}
        }
    }
    let mut active: HashMap<Uuid, Decimal> = HashMap::new();
    for hold in holds {
        *report.holds.entry(hold.status.clone()).or_default() += 1;
        let trail = by_hold.remove(&hold.id).unwrap_or_default();
        let applied = |kind: &str| -> Vec<Decimal> {
            trail
                .iter()
                .filter(|row| {
                    row.kind == kind && row.status == "APPLIED" && row.wallet == hold.wallet
                })
                .map(|row| row.amount)
                .collect()
        };
        let rest = hold.amount - hold.captured;
        let (holds_due, captures_due, releases_due): (Vec<Decimal>, Vec<Decimal>, Vec<Decimal>) =
            match hold.status.as_str() {
                "ACTIVE" => {
                    *active.entry(hold.wallet).or_default() += hold.amount;
                    (vec![hold.amount], vec![], vec![])
                }
                "CAPTURED" => (
                    vec![hold.amount],
                    vec![hold.captured],
                    if rest > Decimal::ZERO {
                        vec![rest]
                    } else {
                        vec![]
                    },
                ),
                "VOIDED" | "EXPIRED" => (vec![hold.amount], vec![], vec![hold.amount]),
                "REJECTED" => (vec![], vec![], vec![]),
                other => {
                    report.problem(format!("hold {}: unknown status {other}", hold.id));
                    continue;
                }
            };
        let applied_rows = trail.iter().filter(|row| row.status == "APPLIED").count();
        let as_due = applied("HOLD") == holds_due
            && applied("CAPTURE") == captures_due
            && applied("RELEASE") == releases_due
            && applied_rows == holds_due.len() + captures_due.len() + releases_due.len();
        let captured_ok = match hold.status.as_str() {
            "CAPTURED" => hold.captured > Decimal::ZERO && hold.captured <= hold.amount,
            _ => hold.captured.is_zero(),
        };
        if !as_due || !captured_ok {
            let seen: Vec<String> = trail
                .iter()
                .map(|row| {
                    format!(
                        "{} {} {} on {} seq {}",
                        row.kind, row.status, row.amount, row.wallet, row.seq
                    )
                })
                .collect();
            report.problem(format!(
                "hold {} {} (wallet {}, amount {}, captured {}): rows {seen:?}, expected \
                 HOLD {holds_due:?} CAPTURE {captures_due:?} RELEASE {releases_due:?}",
                hold.id, hold.status, hold.wallet, hold.amount, hold.captured
            ));
        }
    }
    for (id, trail) in by_hold {
        report.problem(format!(
            "{} rows name hold {id}, which is not in holds",
            trail.len()
        ));
    }
    for wallet in wallets {
        let due = active.get(&wallet.id).copied().unwrap_or_default();
        if wallet.held != due {
            report.problem(format!(
                "wallet {}: held {} but its ACTIVE holds add up to {due}",
                wallet.id, wallet.held
            ));
        }
    }
}
