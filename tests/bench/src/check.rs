//! The correctness check after each scenario, against PostgreSQL directly: the
//! answers the clients got must be exactly what the audit trail and the balances say.

use crate::engine::{Record, STATUS_ERROR};
use crate::money::decimal_to_cents;
use crate::workload::{Kind, variant};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("wallet {0} has an amount that is not a whole number of cents")]
    Amount(Uuid),
    #[error("wallet {0} has an unknown operation type {1:?}")]
    OpType(Uuid, String),
}

/// Balance and version of a wallet at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalletState {
    pub balance_cents: i64,
    pub version: i64,
}

/// An audit row written after the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub id: Uuid,
    pub wallet: Uuid,
    pub kind: Kind,
    pub cents: i64,
    pub applied: bool,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CheckReport {
    pub ok: bool,
    pub wallets: usize,
    pub acknowledged_applied: u64,
    pub acknowledged_rejected: u64,
    /// Requests whose outcome the client cannot know (no answer, or a 5xx).
    pub unknown: u64,
    /// Audit rows matched to unknown requests (the server did apply or reject them).
    pub unknown_recorded: u64,
    pub audit_rows: u64,
    /// Expected net change of the balances from acknowledged operations only.
    pub acknowledged_net_cents: i64,
    /// Observed net change of the balances.
    pub observed_net_cents: i64,
    /// The first problems found (empty when ok).
    pub problems: Vec<String>,
}

const MAX_PROBLEMS: usize = 20;

fn is_unknown(status: u16) -> bool {
    status == STATUS_ERROR || status >= 500
}

/// Pure part of the check. `wallets[i]` is the wallet of `Op::wallet == i`.
pub fn verify(
    wallets: &[Uuid],
    before: &HashMap<Uuid, WalletState>,
    after: &HashMap<Uuid, WalletState>,
    rows: &[AuditRow],
    records: &[Record],
) -> CheckReport {
    let mut rep = CheckReport {
        wallets: wallets.len(),
        audit_rows: rows.len() as u64,
        ..CheckReport::default()
    };
    let mut problems = Vec::new();
    let mut problem = |p: String| {
        if problems.len() < MAX_PROBLEMS {
            problems.push(p);
        }
    };

    let by_id: HashMap<Uuid, &AuditRow> = rows.iter().map(|r| (r.id, r)).collect();
    if by_id.len() != rows.len() {
        problem("the audit trail holds the same operation id twice".to_owned());
    }
    let mut seen_ids = HashSet::with_capacity(records.len());
    let mut matched = HashSet::with_capacity(records.len());
    // Unknown requests by (wallet, kind, cents): rows not acknowledged must be among them.
    let mut unknown: HashMap<(Uuid, Kind, i64), u64> = HashMap::new();

    for rec in records {
        let wallet = wallets[rec.op.wallet as usize];
        let (kind, cents) = variant(rec.op.variant);
        let acked_applied = (200..300).contains(&rec.status);
        let acked_rejected = rec.status == 409;
        if is_unknown(rec.status) {
            rep.unknown += 1;
            *unknown.entry((wallet, kind, cents)).or_insert(0) += 1;
            continue;
        }
        if !acked_applied && !acked_rejected {
            // 4xx other than 409, or never sent: nothing may have been recorded.
            continue;
        }
        let Some(id) = rec.op_id else {
            problem(format!(
                "a {} answer for wallet {wallet} carried no operationId",
                rec.status
            ));
            continue;
        };
        if !seen_ids.insert(id) {
            problem(format!("operation id {id} was returned twice"));
            continue;
        }
        match by_id.get(&id) {
            None => problem(format!(
                "acknowledged operation {id} ({} {cents}c, HTTP {}) has no audit row",
                kind.as_str(),
                rec.status
            )),
            Some(row) => {
                matched.insert(id);
                if row.wallet != wallet || row.kind != kind || row.cents != cents {
                    problem(format!(
                        "audit row {id} does not match the request ({} {} {}c)",
                        wallet,
                        kind.as_str(),
                        cents
                    ));
                }
                if acked_applied && !row.applied {
                    problem(format!(
                        "operation {id} was answered {} but is recorded as REJECTED",
                        rec.status
                    ));
                }
                if acked_rejected && row.applied {
                    problem(format!(
                        "operation {id} was answered 409 but is recorded as APPLIED"
                    ));
                }
            }
        }
        if acked_applied {
            rep.acknowledged_applied += 1;
            rep.acknowledged_net_cents += kind.signed(cents);
        } else {
            rep.acknowledged_rejected += 1;
        }
    }

    // Every other row must be explained by a request whose answer was lost.
    let mut net_by_wallet: HashMap<Uuid, i64> = HashMap::new();
    let mut rows_by_wallet: HashMap<Uuid, i64> = HashMap::new();
    for row in rows {
        *rows_by_wallet.entry(row.wallet).or_insert(0) += 1;
        if row.applied {
            *net_by_wallet.entry(row.wallet).or_insert(0) += row.kind.signed(row.cents);
        }
        if matched.contains(&row.id) {
            continue;
        }
        match unknown.get_mut(&(row.wallet, row.kind, row.cents)) {
            Some(n) if *n > 0 => {
                *n -= 1;
                rep.unknown_recorded += 1;
            }
            _ => problem(format!(
                "audit row {} ({} {} {}c) matches no request this run sent without an answer",
                row.id,
                row.wallet,
                row.kind.as_str(),
                row.cents
            )),
        }
    }

    let wallet_set: HashSet<&Uuid> = wallets.iter().collect();
    for w in wallet_set {
        let (Some(b), Some(a)) = (before.get(w), after.get(w)) else {
            problem(format!("wallet {w} is missing from the database"));
            continue;
        };
        let net = net_by_wallet.get(w).copied().unwrap_or(0);
        rep.observed_net_cents += a.balance_cents - b.balance_cents;
        if a.balance_cents != b.balance_cents + net {
            problem(format!(
                "wallet {w}: balance {}c != {}c before + {}c of applied audit rows",
                a.balance_cents, b.balance_cents, net
            ));
        }
        let n_rows = rows_by_wallet.get(w).copied().unwrap_or(0);
        if a.version - b.version != n_rows {
            problem(format!(
                "wallet {w}: version moved by {} but {} audit rows were written",
                a.version - b.version,
                n_rows
            ));
        }
    }
    if rep.unknown == 0 && rep.observed_net_cents != rep.acknowledged_net_cents {
        problem(format!(
            "balances moved by {}c but acknowledged operations add up to {}c",
            rep.observed_net_cents, rep.acknowledged_net_cents
        ));
    }

    rep.ok = problems.is_empty();
    rep.problems = problems;
    rep
}

fn states(rows: Vec<(Uuid, Decimal, i64)>) -> Result<HashMap<Uuid, WalletState>, CheckError> {
    rows.into_iter()
        .map(|(id, balance, version)| {
            let balance_cents = decimal_to_cents(balance).ok_or(CheckError::Amount(id))?;
            Ok((
                id,
                WalletState {
                    balance_cents,
                    version,
                },
            ))
        })
        .collect()
}

pub async fn snapshot(
    pool: &PgPool,
    wallets: &[Uuid],
) -> Result<HashMap<Uuid, WalletState>, CheckError> {
    let rows: Vec<(Uuid, Decimal, i64)> =
        sqlx::query_as("SELECT id, balance, version FROM wallets WHERE id = ANY($1)")
            .bind(wallets)
            .fetch_all(pool)
            .await?;
    states(rows)
}

/// Every wallet with an id in `lo..=hi`: one index range scan instead of an
/// `= ANY` over a million ids (many-wallets numbers its wallets within a prefix).
pub async fn snapshot_range(
    pool: &PgPool,
    lo: Uuid,
    hi: Uuid,
) -> Result<HashMap<Uuid, WalletState>, CheckError> {
    let rows: Vec<(Uuid, Decimal, i64)> =
        sqlx::query_as("SELECT id, balance, version FROM wallets WHERE id BETWEEN $1 AND $2")
            .bind(lo)
            .bind(hi)
            .fetch_all(pool)
            .await?;
    states(rows)
}

type RawRow = (Uuid, Uuid, i64, String, Decimal, String);

fn audit_rows(
    rows: Vec<RawRow>,
    before: &HashMap<Uuid, WalletState>,
) -> Result<Vec<AuditRow>, CheckError> {
    let mut out = Vec::with_capacity(rows.len());
    for (id, wallet, seq, op_type, amount, status) in rows {
        let since = before.get(&wallet).map_or(0, |s| s.version);
        if seq <= since {
            continue;
        }
        let kind =
            Kind::parse(&op_type).ok_or_else(|| CheckError::OpType(wallet, op_type.clone()))?;
        let cents = decimal_to_cents(amount).ok_or(CheckError::Amount(wallet))?;
        out.push(AuditRow {
            id,
            wallet,
            kind,
            cents,
            applied: status == "APPLIED",
        });
    }
    Ok(out)
}

/// Audit rows of `wallets` written after `before` was taken (seq is the wallet's
/// version after the operation).
pub async fn rows_since(
    pool: &PgPool,
    before: &HashMap<Uuid, WalletState>,
) -> Result<Vec<AuditRow>, CheckError> {
    let ids: Vec<Uuid> = before.keys().copied().collect();
    let rows: Vec<RawRow> =
        sqlx::query_as("SELECT id, wallet_id, seq, operation_type, amount, status FROM operations WHERE wallet_id = ANY($1)")
            .bind(&ids)
            .fetch_all(pool)
            .await?;
    audit_rows(rows, before)
}

/// `rows_since` for the wallets with ids in `lo..=hi`.
pub async fn rows_in_range(
    pool: &PgPool,
    lo: Uuid,
    hi: Uuid,
    before: &HashMap<Uuid, WalletState>,
) -> Result<Vec<AuditRow>, CheckError> {
    let rows: Vec<RawRow> =
        sqlx::query_as("SELECT id, wallet_id, seq, operation_type, amount, status FROM operations WHERE wallet_id BETWEEN $1 AND $2")
            .bind(lo)
            .bind(hi)
            .fetch_all(pool)
            .await?;
    audit_rows(rows, before)
}

/// `settle` for the wallets with ids in `lo..=hi`.
pub async fn settle_range(
    pool: &PgPool,
    lo: Uuid,
    hi: Uuid,
    quiet: Duration,
    max: Duration,
) -> Result<(), CheckError> {
    let started = std::time::Instant::now();
    let mut last: Option<i64> = None;
    loop {
        let (now,): (i64,) = sqlx::query_as(
            "SELECT coalesce(sum(version), 0)::bigint FROM wallets WHERE id BETWEEN $1 AND $2",
        )
        .bind(lo)
        .bind(hi)
        .fetch_one(pool)
        .await?;
        if last == Some(now) || started.elapsed() >= max {
            return Ok(());
        }
        last = Some(now);
        tokio::time::sleep(quiet).await;
    }
}

/// Waits until the wallets' versions stop moving: requests the client gave up on
/// may still be committed by the server until its own deadline has passed.
pub async fn settle(
    pool: &PgPool,
    wallets: &[Uuid],
    quiet: Duration,
    max: Duration,
) -> Result<(), CheckError> {
    let started = std::time::Instant::now();
    let mut last: Option<i64> = None;
    loop {
        let (now,): (i64,) = sqlx::query_as(
            "SELECT coalesce(sum(version), 0)::bigint FROM wallets WHERE id = ANY($1)",
        )
        .bind(wallets)
        .fetch_one(pool)
        .await?;
        if last == Some(now) || started.elapsed() >= max {
            return Ok(());
        }
        last = Some(now);
        tokio::time::sleep(quiet).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::STATUS_REFUSED;
    use crate::workload::{Op, REJECT_CENTS};

    const W: Uuid = Uuid::from_u128(0xaaaa);

    fn op_variant(kind: Kind, cents: i64) -> u8 {
        (0..=255u8)
            .find(|v| variant(*v) == (kind, cents))
            .expect("variant exists")
    }

    fn rec(status: u16, kind: Kind, cents: i64, id: Option<u128>) -> Record {
        Record {
            sched_us: 0,
            latency_us: 1,
            status,
            op: Op {
                wallet: 0,
                variant: op_variant(kind, cents),
            },
            op_id: id.map(Uuid::from_u128),
        }
    }

    fn row(id: u128, kind: Kind, cents: i64, applied: bool) -> AuditRow {
        AuditRow {
            id: Uuid::from_u128(id),
            wallet: W,
            kind,
            cents,
            applied,
        }
    }

    fn states(
        before: (i64, i64),
        after: (i64, i64),
    ) -> (HashMap<Uuid, WalletState>, HashMap<Uuid, WalletState>) {
        let s = |(balance_cents, version)| {
            HashMap::from([(
                W,
                WalletState {
                    balance_cents,
                    version,
                },
            )])
        };
        (s(before), s(after))
    }

    /// Three acknowledged operations: +10.00, -2.50, and a rejected withdrawal.
    fn happy() -> (Vec<Record>, Vec<AuditRow>) {
        let records = vec![
            rec(200, Kind::Deposit, 1000, Some(1)),
            rec(200, Kind::Withdraw, 250, Some(2)),
            rec(409, Kind::Withdraw, REJECT_CENTS, Some(3)),
            rec(422, Kind::Deposit, 100, None),
            rec(STATUS_REFUSED, Kind::Deposit, 1, None),
        ];
        let rows = vec![
            row(1, Kind::Deposit, 1000, true),
            row(2, Kind::Withdraw, 250, true),
            row(3, Kind::Withdraw, REJECT_CENTS, false),
        ];
        (records, rows)
    }

    #[test]
    fn exact_audit_trail_passes() {
        let (records, rows) = happy();
        let (b, a) = states((100_000, 1), (100_750, 4));
        let rep = verify(&[W], &b, &a, &rows, &records);
        assert!(rep.ok, "{:?}", rep.problems);
        assert_eq!(
            (
                rep.acknowledged_applied,
                rep.acknowledged_rejected,
                rep.unknown
            ),
            (2, 1, 0)
        );
        assert_eq!(rep.acknowledged_net_cents, 750);
        assert_eq!(rep.observed_net_cents, 750);
    }

    #[test]
    fn wrong_balance_fails() {
        let (records, rows) = happy();
        let (b, a) = states((100_000, 1), (100_751, 4));
        let rep = verify(&[W], &b, &a, &rows, &records);
        assert!(!rep.ok);
        assert!(
            rep.problems.iter().any(|p| p.contains("balance")),
            "{:?}",
            rep.problems
        );
    }

    #[test]
    fn missing_audit_row_fails() {
        let (records, mut rows) = happy();
        rows.remove(1);
        let (b, a) = states((100_000, 1), (100_750, 4));
        let rep = verify(&[W], &b, &a, &rows, &records);
        assert!(!rep.ok);
        assert!(
            rep.problems.iter().any(|p| p.contains("no audit row")),
            "{:?}",
            rep.problems
        );
    }

    #[test]
    fn rejected_answer_recorded_as_applied_fails() {
        let (records, mut rows) = happy();
        rows[2].applied = true;
        let (b, a) = states((100_000, 1), (100_750 - REJECT_CENTS, 4));
        let rep = verify(&[W], &b, &a, &rows, &records);
        assert!(!rep.ok);
        assert!(
            rep.problems
                .iter()
                .any(|p| p.contains("recorded as APPLIED")),
            "{:?}",
            rep.problems
        );
    }

    #[test]
    fn duplicate_operation_id_in_answers_fails() {
        let (mut records, rows) = happy();
        records.push(rec(200, Kind::Deposit, 1000, Some(1)));
        let (b, a) = states((100_000, 1), (100_750, 4));
        let rep = verify(&[W], &b, &a, &rows, &records);
        assert!(!rep.ok);
        assert!(
            rep.problems.iter().any(|p| p.contains("returned twice")),
            "{:?}",
            rep.problems
        );
    }

    #[test]
    fn unknown_outcomes_may_be_present_or_absent() {
        let (mut records, mut rows) = happy();
        records.push(rec(STATUS_ERROR, Kind::Deposit, 100, None));
        records.push(rec(503, Kind::Withdraw, 100, None));
        // The timed-out deposit was applied after all; the 503 withdrawal was not.
        rows.push(row(9, Kind::Deposit, 100, true));
        let (b, a) = states((100_000, 1), (100_850, 5));
        let rep = verify(&[W], &b, &a, &rows, &records);
        assert!(rep.ok, "{:?}", rep.problems);
        assert_eq!((rep.unknown, rep.unknown_recorded), (2, 1));
    }

    #[test]
    fn unexplained_row_fails() {
        let (records, mut rows) = happy();
        // Nothing was sent without an answer, yet an extra deposit appeared.
        rows.push(row(9, Kind::Deposit, 100, true));
        let (b, a) = states((100_000, 1), (100_850, 5));
        let rep = verify(&[W], &b, &a, &rows, &records);
        assert!(!rep.ok);
        assert!(
            rep.problems
                .iter()
                .any(|p| p.contains("matches no request")),
            "{:?}",
            rep.problems
        );
    }

    #[test]
    fn version_gap_fails() {
        let (records, rows) = happy();
        let (b, a) = states((100_000, 1), (100_750, 5));
        let rep = verify(&[W], &b, &a, &rows, &records);
        assert!(!rep.ok);
        assert!(
            rep.problems.iter().any(|p| p.contains("version moved")),
            "{:?}",
            rep.problems
        );
    }
}

/// The SQL half of the check against a real PostgreSQL (DATABASE_ADMIN_URL from
/// `scripts/stack.sh env`), one fresh database per test.
#[cfg(test)]
pub(crate) mod db_tests {
    use super::*;
    use crate::engine::Record;
    use crate::workload::{Op, REJECT_CENTS, variant};
    use sqlx::Connection as _;
    use sqlx::postgres::PgPoolOptions;

    pub(crate) async fn fresh_db() -> (PgPool, String) {
        let admin = std::env::var("DATABASE_ADMIN_URL")
            .expect("DATABASE_ADMIN_URL must be set: source <(scripts/stack.sh env)");
        // `test_` so scripts/test.sh drops what an interrupted run left behind.
        let name = format!("test_bench_{}", Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("admin connection");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create database");
        let base = admin.rsplit_once('/').expect("url with a database").0;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&format!("{base}/{name}"))
            .await
            .expect("test database");
        // Every migration, as the migrator applies them: the schema the bench meets.
        let migrations =
            std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations"));
        sqlx::migrate::Migrator::new(migrations)
            .await
            .expect("read the migrations")
            .run(&pool)
            .await
            .expect("schema");
        (pool, name)
    }

    pub(crate) async fn drop_db(pool: PgPool, name: String) {
        pool.close().await;
        let admin = std::env::var("DATABASE_ADMIN_URL").expect("DATABASE_ADMIN_URL");
        if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await;
        }
    }

    /// Records an operation the way the service does: audit row plus balance and version.
    async fn apply(pool: &PgPool, wallet: Uuid, id: Uuid, kind: Kind, cents: i64, applied: bool) {
        let amount = Decimal::new(cents, 2);
        let delta = if applied {
            Decimal::new(kind.signed(cents), 2)
        } else {
            Decimal::ZERO
        };
        let mut tx = pool.begin().await.expect("tx");
        let (seq, balance): (i64, Decimal) = sqlx::query_as(
            "UPDATE wallets SET balance = balance + $2, version = version + 1 WHERE id = $1 RETURNING version, balance",
        )
        .bind(wallet)
        .bind(delta)
        .fetch_one(&mut *tx)
        .await
        .expect("update wallet");
        sqlx::query(
            "INSERT INTO operations (id, wallet_id, seq, operation_type, amount, status, reason, balance_after) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(id)
        .bind(wallet)
        .bind(seq)
        .bind(kind.as_str())
        .bind(amount)
        .bind(if applied { "APPLIED" } else { "REJECTED" })
        .bind((!applied).then_some("INSUFFICIENT_FUNDS"))
        .bind(balance)
        .execute(&mut *tx)
        .await
        .expect("insert operation");
        tx.commit().await.expect("commit");
    }

    fn find_variant(kind: Kind, cents: i64) -> u8 {
        (0..=255u8)
            .find(|v| variant(*v) == (kind, cents))
            .expect("variant")
    }

    #[tokio::test]
    async fn check_reads_state_and_audit_rows_written_after_the_snapshot() {
        let (pool, name) = fresh_db().await;
        let wallet = Uuid::new_v4();
        sqlx::query("INSERT INTO wallets (id, tenant_id) VALUES ($1, 'bench')")
            .bind(wallet)
            .execute(&pool)
            .await
            .expect("wallet");
        // The seed deposit happens before the snapshot and must not be counted.
        apply(&pool, wallet, Uuid::new_v4(), Kind::Deposit, 100_000, true).await;
        let before = snapshot(&pool, &[wallet]).await.expect("snapshot");
        assert_eq!(
            before[&wallet],
            WalletState {
                balance_cents: 100_000,
                version: 1
            }
        );

        let (d, w, r) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        apply(&pool, wallet, d, Kind::Deposit, 1000, true).await;
        apply(&pool, wallet, w, Kind::Withdraw, 250, true).await;
        apply(&pool, wallet, r, Kind::Withdraw, REJECT_CENTS, false).await;
        let rec = |status, kind, cents, id| Record {
            sched_us: 0,
            latency_us: 1,
            status,
            op: Op {
                wallet: 0,
                variant: find_variant(kind, cents),
            },
            op_id: Some(id),
        };
        let records = vec![
            rec(200, Kind::Deposit, 1000, d),
            rec(200, Kind::Withdraw, 250, w),
            rec(409, Kind::Withdraw, REJECT_CENTS, r),
        ];

        settle(
            &pool,
            &[wallet],
            Duration::from_millis(10),
            Duration::from_secs(5),
        )
        .await
        .expect("settle");
        let after = snapshot(&pool, &[wallet]).await.expect("snapshot");
        let rows = rows_since(&pool, &before).await.expect("rows");
        assert_eq!(rows.len(), 3);
        let rep = verify(&[wallet], &before, &after, &rows, &records);
        assert!(rep.ok, "{:?}", rep.problems);
        assert_eq!(rep.observed_net_cents, 750);

        // An operation nobody was told about breaks the check.
        apply(&pool, wallet, Uuid::new_v4(), Kind::Deposit, 100, true).await;
        let after = snapshot(&pool, &[wallet]).await.expect("snapshot");
        let rows = rows_since(&pool, &before).await.expect("rows");
        let rep = verify(&[wallet], &before, &after, &rows, &records);
        assert!(!rep.ok);
        drop_db(pool, name).await;
    }
}
