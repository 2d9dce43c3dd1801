//! The audit rules of the ledger (docs/design.md, "Ledger: transfers, holds, limits, past balances"),
//! checked against PostgreSQL directly: per wallet, the audit trail written during a
//! scenario must replay to the wallet's balance and held amount, row by row; and money
//! is conserved over the whole database.

use crate::money::decimal_to_cents;
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;
use std::collections::HashMap;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{0} has an amount that is not a whole number of cents")]
    Amount(Uuid),
    #[error("operation {0} has an unknown operation type {1:?}")]
    OpType(Uuid, String),
}

/// The operation types of the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entry {
    Deposit,
    Withdraw,
    TransferOut,
    TransferIn,
    Hold,
    Capture,
    Release,
    OverdraftLimit,
}

impl Entry {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "DEPOSIT" => Entry::Deposit,
            "WITHDRAW" => Entry::Withdraw,
            "TRANSFER_OUT" => Entry::TransferOut,
            "TRANSFER_IN" => Entry::TransferIn,
            "HOLD" => Entry::Hold,
            "CAPTURE" => Entry::Capture,
            "RELEASE" => Entry::Release,
            "OVERDRAFT_LIMIT" => Entry::OverdraftLimit,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Entry::Deposit => "DEPOSIT",
            Entry::Withdraw => "WITHDRAW",
            Entry::TransferOut => "TRANSFER_OUT",
            Entry::TransferIn => "TRANSFER_IN",
            Entry::Hold => "HOLD",
            Entry::Capture => "CAPTURE",
            Entry::Release => "RELEASE",
            Entry::OverdraftLimit => "OVERDRAFT_LIMIT",
        }
    }

    /// Effect of an applied row on the balance.
    pub fn balance_delta(self, cents: i64) -> i64 {
        match self {
            Entry::Deposit | Entry::TransferIn => cents,
            Entry::Withdraw | Entry::TransferOut | Entry::Capture => -cents,
            Entry::Hold | Entry::Release | Entry::OverdraftLimit => 0,
        }
    }

    /// Effect of an applied row on the held amount.
    pub fn held_delta(self, cents: i64) -> i64 {
        match self {
            Entry::Hold => cents,
            Entry::Capture | Entry::Release => -cents,
            _ => 0,
        }
    }
}

/// A wallet row at one moment, in cents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct State {
    pub balance: i64,
    pub held: i64,
    pub limit: i64,
    pub version: i64,
}

/// An audit row, in cents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: Uuid,
    pub wallet: Uuid,
    pub seq: i64,
    pub entry: Entry,
    pub cents: i64,
    pub applied: bool,
    pub balance_after: i64,
    pub held_after: i64,
    pub transfer_id: Option<Uuid>,
    pub hold_id: Option<Uuid>,
}

/// The first problems found, and how many there were.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Problems {
    pub list: Vec<String>,
    pub total: u64,
}

const MAX_PROBLEMS: usize = 30;

impl Problems {
    pub fn push(&mut self, p: String) {
        self.total += 1;
        if self.list.len() < MAX_PROBLEMS {
            self.list.push(p);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// What the per-wallet replay covered.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct WalletAudit {
    pub wallets: usize,
    pub rows: u64,
    pub applied_rows: u64,
    pub rejected_rows: u64,
    /// Net balance change of the wallets, observed in the wallet rows.
    pub balance_change_cents: i64,
    /// DEPOSIT - WITHDRAW - CAPTURE among the applied rows (what enters or leaves them).
    pub external_cents: i64,
}

/// Replays each wallet's rows written after `before` (seq > before.version): seq gap-free up
/// to the version in `after`; every row's balance_after / held_after equal to the replay
/// (a rejected row carries the unchanged values); available never below zero at any row;
/// the last row and the replay equal to the wallet row in `after`.
pub fn audit_wallets(
    wallets: &[Uuid],
    before: &HashMap<Uuid, State>,
    after: &HashMap<Uuid, State>,
    rows: &[Row],
    problems: &mut Problems,
) -> WalletAudit {
    let mut by_wallet: HashMap<Uuid, Vec<&Row>> = HashMap::new();
    for r in rows {
        by_wallet.entry(r.wallet).or_default().push(r);
    }
    let mut audit = WalletAudit {
        wallets: wallets.len(),
        rows: rows.len() as u64,
        ..WalletAudit::default()
    };
    for w in wallets {
        let (Some(b), Some(a)) = (before.get(w), after.get(w)) else {
            problems.push(format!("wallet {w} is missing from the database"));
            continue;
        };
        audit.balance_change_cents += a.balance - b.balance;
        let mut mine = by_wallet.remove(w).unwrap_or_default();
        mine.sort_by_key(|r| r.seq);
        let mut s = *b;
        let mut expected_seq = b.version + 1;
        for r in &mine {
            if r.seq != expected_seq {
                problems.push(format!(
                    "wallet {w}: seq {} follows {} (gap or duplicate)",
                    r.seq,
                    expected_seq - 1
                ));
                expected_seq = r.seq;
            }
            expected_seq += 1;
            if r.applied {
                audit.applied_rows += 1;
                s.balance += r.entry.balance_delta(r.cents);
                s.held += r.entry.held_delta(r.cents);
                if r.entry == Entry::OverdraftLimit {
                    s.limit = r.cents;
                }
                audit.external_cents += match r.entry {
                    Entry::Deposit => r.cents,
                    Entry::Withdraw | Entry::Capture => -r.cents,
                    _ => 0,
                };
            } else {
                audit.rejected_rows += 1;
            }
            if r.balance_after != s.balance || r.held_after != s.held {
                problems.push(format!(
                    "wallet {w} seq {} ({} {}c, {}): balance_after/held_after {}c/{}c, the replay gives {}c/{}c",
                    r.seq,
                    r.entry.as_str(),
                    r.cents,
                    if r.applied { "APPLIED" } else { "REJECTED" },
                    r.balance_after,
                    r.held_after,
                    s.balance,
                    s.held
                ));
            }
            if s.balance - s.held + s.limit < 0 {
                problems.push(format!(
                    "wallet {w} seq {}: available {}c - {}c + limit {}c is negative",
                    r.seq, s.balance, s.held, s.limit
                ));
            }
        }
        if let Some(last) = mine.last()
            && (last.balance_after != a.balance || last.held_after != a.held)
        {
            problems.push(format!(
                "wallet {w}: the row with the highest seq ({}) says {}c/{}c, the wallet {}c/{}c",
                last.seq, last.balance_after, last.held_after, a.balance, a.held
            ));
        }
        if a.version != b.version + mine.len() as i64 {
            problems.push(format!(
                "wallet {w}: version moved {} -> {} but {} audit rows were written",
                b.version,
                a.version,
                mine.len()
            ));
        }
        if (s.balance, s.held, s.limit) != (a.balance, a.held, a.limit) {
            problems.push(format!(
                "wallet {w}: balance/held/limit {}c/{}c/{}c, the audit trail replays to {}c/{}c/{}c",
                a.balance, a.held, a.limit, s.balance, s.held, s.limit
            ));
        }
    }
    for (w, rest) in by_wallet {
        problems.push(format!(
            "{} audit rows of wallet {w}, which is not one of the scenario's",
            rest.len()
        ));
    }
    audit
}

fn cents(id: Uuid, d: Decimal) -> Result<i64, LedgerError> {
    decimal_to_cents(d).ok_or(LedgerError::Amount(id))
}

pub async fn snapshot(
    pool: &PgPool,
    wallets: &[Uuid],
) -> Result<HashMap<Uuid, State>, LedgerError> {
    let rows: Vec<(Uuid, Decimal, Decimal, Decimal, i64)> = sqlx::query_as(
        "SELECT id, balance, held, overdraft_limit, version FROM wallets WHERE id = ANY($1)",
    )
    .bind(wallets)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(id, balance, held, limit, version)| {
            Ok((
                id,
                State {
                    balance: cents(id, balance)?,
                    held: cents(id, held)?,
                    limit: cents(id, limit)?,
                    version,
                },
            ))
        })
        .collect()
}

type RawRow = (
    Uuid,
    Uuid,
    i64,
    String,
    Decimal,
    String,
    Decimal,
    Decimal,
    Option<Uuid>,
    Option<Uuid>,
);

/// The audit rows of the wallets of `before` with seq above its version (one index range
/// per wallet on (wallet_id, seq)).
pub async fn rows_since(
    pool: &PgPool,
    before: &HashMap<Uuid, State>,
) -> Result<Vec<Row>, LedgerError> {
    let (ids, versions): (Vec<Uuid>, Vec<i64>) =
        before.iter().map(|(w, s)| (*w, s.version)).unzip();
    let raw: Vec<RawRow> = sqlx::query_as(
        "SELECT o.id, o.wallet_id, o.seq, o.operation_type, o.amount, o.status, o.balance_after, \
                o.held_after, o.transfer_id, o.hold_id \
         FROM unnest($1::uuid[], $2::bigint[]) AS b(id, version) \
         JOIN operations o ON o.wallet_id = b.id AND o.seq > b.version",
    )
    .bind(&ids)
    .bind(&versions)
    .fetch_all(pool)
    .await?;
    raw.into_iter()
        .map(
            |(
                id,
                wallet,
                seq,
                op_type,
                amount,
                status,
                balance_after,
                held_after,
                transfer_id,
                hold_id,
            )| {
                Ok(Row {
                    id,
                    wallet,
                    seq,
                    entry: Entry::parse(&op_type)
                        .ok_or_else(|| LedgerError::OpType(id, op_type.clone()))?,
                    cents: cents(id, amount)?,
                    applied: status == "APPLIED",
                    balance_after: cents(id, balance_after)?,
                    held_after: cents(id, held_after)?,
                    transfer_id,
                    hold_id,
                })
            },
        )
        .collect()
}

/// The conservation rule over the whole database, from one statement (one snapshot, so
/// other clients' writes meanwhile cannot unbalance it: each of them commits balanced).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Conservation {
    pub ok: bool,
    pub balances: Decimal,
    pub pending_transfers: Decimal,
    pub deposits: Decimal,
    pub withdrawals: Decimal,
    pub captures: Decimal,
    /// balances + pending - (deposits - withdrawals - captures); zero when ok.
    pub difference: Decimal,
}

pub async fn global_conservation(pool: &PgPool) -> Result<Conservation, LedgerError> {
    let (balances, pending, deposits, withdrawals, captures): (
        Decimal,
        Decimal,
        Decimal,
        Decimal,
        Decimal,
    ) = sqlx::query_as(
        "SELECT (SELECT coalesce(sum(balance), 0) FROM wallets), \
                    (SELECT coalesce(sum(amount), 0) FROM transfers WHERE status = 'PENDING'), \
                    coalesce(sum(amount) FILTER (WHERE operation_type = 'DEPOSIT'), 0), \
                    coalesce(sum(amount) FILTER (WHERE operation_type = 'WITHDRAW'), 0), \
                    coalesce(sum(amount) FILTER (WHERE operation_type = 'CAPTURE'), 0) \
             FROM operations WHERE status = 'APPLIED'",
    )
    .fetch_one(pool)
    .await?;
    let difference = balances + pending - (deposits - withdrawals - captures);
    Ok(Conservation {
        ok: difference.is_zero(),
        balances,
        pending_transfers: pending,
        deposits,
        withdrawals,
        captures,
        difference,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Uuid = Uuid::from_u128(0xa);

    fn row(seq: i64, entry: Entry, cents: i64, applied: bool, after: (i64, i64)) -> Row {
        Row {
            id: Uuid::from_u128(1000 + seq as u128),
            wallet: W,
            seq,
            entry,
            cents,
            applied,
            balance_after: after.0,
            held_after: after.1,
            transfer_id: None,
            hold_id: None,
        }
    }

    fn st(balance: i64, held: i64, version: i64) -> HashMap<Uuid, State> {
        HashMap::from([(
            W,
            State {
                balance,
                held,
                limit: 0,
                version,
            },
        )])
    }

    fn good_rows() -> Vec<Row> {
        vec![
            row(3, Entry::Hold, 300, true, (1000, 300)),
            row(4, Entry::Capture, 300, true, (700, 0)),
            row(5, Entry::TransferOut, 5000, false, (700, 0)),
            row(6, Entry::TransferIn, 50, true, (750, 0)),
            row(7, Entry::Hold, 100, true, (750, 100)),
            row(8, Entry::Capture, 60, true, (690, 40)),
            row(9, Entry::Release, 40, true, (690, 0)),
        ]
    }

    #[test]
    fn a_replaying_trail_passes() {
        let mut p = Problems::default();
        let a = audit_wallets(&[W], &st(1000, 0, 2), &st(690, 0, 9), &good_rows(), &mut p);
        assert!(p.is_empty(), "{:?}", p.list);
        assert_eq!((a.rows, a.applied_rows, a.rejected_rows), (7, 6, 1));
        assert_eq!(a.balance_change_cents, -310);
        assert_eq!(a.external_cents, -360);
    }

    #[test]
    fn a_wrong_row_a_gap_or_a_wrong_wallet_fails() {
        let mut rows = good_rows();
        rows[3].balance_after = 751;
        let mut p = Problems::default();
        audit_wallets(&[W], &st(1000, 0, 2), &st(690, 0, 9), &rows, &mut p);
        assert_eq!(p.total, 1, "{:?}", p.list);
        assert!(p.list[0].contains("seq 6"), "{:?}", p.list);

        let mut rows = good_rows();
        rows.remove(2);
        let mut p = Problems::default();
        audit_wallets(&[W], &st(1000, 0, 2), &st(690, 0, 9), &rows, &mut p);
        assert!(p.list.iter().any(|x| x.contains("gap")), "{:?}", p.list);
        assert!(
            p.list.iter().any(|x| x.contains("version moved")),
            "{:?}",
            p.list
        );

        let mut p = Problems::default();
        audit_wallets(&[W], &st(1000, 0, 2), &st(700, 0, 9), &good_rows(), &mut p);
        assert!(
            p.list.iter().any(|x| x.contains("highest seq")),
            "{:?}",
            p.list
        );
        assert!(
            p.list.iter().any(|x| x.contains("replays to")),
            "{:?}",
            p.list
        );
    }

    #[test]
    fn negative_available_fails() {
        let rows = vec![row(1, Entry::Withdraw, 100, true, (-100, 0))];
        let mut p = Problems::default();
        audit_wallets(&[W], &st(0, 0, 0), &st(-100, 0, 1), &rows, &mut p);
        assert!(
            p.list.iter().any(|x| x.contains("negative")),
            "{:?}",
            p.list
        );
    }
}

/// The SQL of the ledger scenarios against a real PostgreSQL with every migration
/// (DATABASE_ADMIN_URL, as check.rs's database tests): the rows the service would write,
/// written by hand, must pass; the seeded history of balance-at must replay.
#[cfg(test)]
mod db_tests {
    use super::*;
    use crate::check::db_tests::{drop_db, fresh_db};
    use std::time::Duration;

    async fn wallet(pool: &PgPool, id: Uuid) {
        sqlx::query("INSERT INTO wallets (id, tenant_id) VALUES ($1, 'bench')")
            .bind(id)
            .execute(pool)
            .await
            .expect("wallet");
    }

    /// Appends a row and moves the wallet the way the service does.
    async fn op(
        pool: &PgPool,
        w: Uuid,
        entry: Entry,
        cents: i64,
        applied: bool,
        transfer: Option<Uuid>,
        hold: Option<Uuid>,
    ) {
        let d = |c: i64| Decimal::new(c, 2);
        let (db, dh) = if applied {
            (entry.balance_delta(cents), entry.held_delta(cents))
        } else {
            (0, 0)
        };
        let mut tx = pool.begin().await.expect("tx");
        let (seq, balance, held): (i64, Decimal, Decimal) = sqlx::query_as(
            "UPDATE wallets SET balance = balance + $2, held = held + $3, version = version + 1 \
             WHERE id = $1 RETURNING version, balance, held",
        )
        .bind(w)
        .bind(d(db))
        .bind(d(dh))
        .fetch_one(&mut *tx)
        .await
        .expect("update wallet");
        sqlx::query(
            "INSERT INTO operations (id, wallet_id, seq, operation_type, amount, status, reason, \
             balance_after, held_after, transfer_id, hold_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(Uuid::new_v4())
        .bind(w)
        .bind(seq)
        .bind(entry.as_str())
        .bind(d(cents))
        .bind(if applied { "APPLIED" } else { "REJECTED" })
        .bind((!applied).then_some("INSUFFICIENT_FUNDS"))
        .bind(balance)
        .bind(held)
        .bind(transfer)
        .bind(hold)
        .execute(&mut *tx)
        .await
        .expect("insert operation");
        tx.commit().await.expect("commit");
    }

    #[tokio::test]
    async fn a_posted_and_a_rejected_transfer_pass_the_transfers_check() {
        use crate::transfers::{Sent, check};
        let (pool, name) = fresh_db().await;
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        wallet(&pool, a).await;
        wallet(&pool, b).await;
        op(&pool, a, Entry::Deposit, 1000, true, None, None).await;
        op(&pool, b, Entry::Deposit, 1000, true, None, None).await;
        let before = snapshot(&pool, &[a, b]).await.expect("snapshot");
        let (t1, t2) = (Uuid::new_v4(), Uuid::new_v4());
        for (id, from, to, cents, status) in
            [(t1, a, b, 250, "POSTED"), (t2, b, a, 5000, "REJECTED")]
        {
            sqlx::query(
                "INSERT INTO transfers (id, tenant_id, from_wallet_id, to_wallet_id, amount, status, to_shard, created_at, posted_at) \
                 VALUES ($1, 'bench', $2, $3, $4, $5, 0, now(), CASE WHEN $5 = 'POSTED' THEN now() END)",
            )
            .bind(id)
            .bind(from)
            .bind(to)
            .bind(Decimal::new(cents, 2))
            .bind(status)
            .execute(&pool)
            .await
            .expect("transfer");
        }
        op(&pool, a, Entry::TransferOut, 250, true, Some(t1), None).await;
        op(&pool, b, Entry::TransferIn, 250, true, Some(t1), None).await;
        op(&pool, b, Entry::TransferOut, 5000, false, Some(t2), None).await;
        let sent = vec![
            Sent {
                from: 0,
                to: 1,
                cents: 250,
                status: 200,
                id: Some(t1),
                said: Some("POSTED".into()),
            },
            Sent {
                from: 1,
                to: 0,
                cents: 5000,
                status: 409,
                id: Some(t2),
                said: None,
            },
        ];
        let c = check(
            &pool,
            &[a, b],
            &before,
            &sent,
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .await
        .expect("check");
        assert!(c.ok, "{:?}", c.problems);
        assert_eq!(
            (c.stored_posted, c.stored_rejected, c.audit.rows),
            (1, 1, 3)
        );
        assert!(c.global_conservation.as_ref().is_some_and(|g| g.ok));

        // A credit nobody made unbalances both the wallet and the whole database.
        op(&pool, b, Entry::TransferIn, 250, true, Some(t1), None).await;
        let c = check(
            &pool,
            &[a, b],
            &before,
            &sent,
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .await
        .expect("check");
        assert!(!c.ok);
        assert!(c.global_conservation.as_ref().is_some_and(|g| !g.ok));
        drop_db(pool, name).await;
    }

    #[tokio::test]
    async fn a_captured_hold_passes_the_holds_check() {
        use crate::holds::{Pair, check};
        let (pool, name) = fresh_db().await;
        let w = Uuid::new_v4();
        wallet(&pool, w).await;
        op(&pool, w, Entry::Deposit, 1000, true, None, None).await;
        let before = snapshot(&pool, &[w]).await.expect("snapshot");
        let h = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO holds (id, tenant_id, wallet_id, shard, amount, captured_amount, status, created_at, updated_at) \
             VALUES ($1, 'bench', $2, 0, 1.00, 1.00, 'CAPTURED', now(), now())",
        )
        .bind(h)
        .bind(w)
        .execute(&pool)
        .await
        .expect("hold");
        op(&pool, w, Entry::Hold, 100, true, None, Some(h)).await;
        op(&pool, w, Entry::Capture, 100, true, None, Some(h)).await;
        let pairs = vec![Pair {
            cents: 100,
            create: 201,
            hold: Some(h),
            create_said: Some("ACTIVE".into()),
            capture: Some(200),
            capture_said: Some("CAPTURED".into()),
        }];
        let c = check(&pool, w, &before, &pairs, Duration::from_secs(1))
            .await
            .expect("check");
        assert!(c.ok, "{:?}", c.problems);
        assert_eq!((c.stored_captured, c.audit.rows), (1, 2));
        drop_db(pool, name).await;
    }

    #[tokio::test]
    async fn the_seeded_history_replays_and_answers_point_in_time_lookups() {
        use crate::balance_at::{Expected, History, Query, delete, expected, seed};
        let (pool, name) = fresh_db().await;
        let h = History {
            wallet: Uuid::new_v4(),
            n: 3000,
            t0_us: 1_700_000_000_000_000,
            step_us: 1_000_000,
        };
        seed(&pool, "bench", &h).await.expect("seed");
        let zero = HashMap::from([(h.wallet, State::default())]);
        let after = snapshot(&pool, &[h.wallet]).await.expect("snapshot");
        assert_eq!(after[&h.wallet].version, 3000);
        let rows = rows_since(&pool, &zero).await.expect("rows");
        assert_eq!(rows.len(), 3000);
        let mut p = Problems::default();
        let a = audit_wallets(&[h.wallet], &zero, &after, &rows, &mut p);
        assert!(p.is_empty(), "{:?}", p.list);
        assert_eq!(a.balance_change_cents, after[&h.wallet].balance);
        assert!(global_conservation(&pool).await.expect("sums").ok);

        let row = |seq: i64| {
            let r = rows.iter().find(|r| r.seq == seq).expect("row");
            Some(Expected {
                seq,
                balance: r.balance_after,
                held: r.held_after,
            })
        };
        let queries = [
            Query::Sequence(1),
            Query::Sequence(3000),
            Query::AsOf(h.at(10)),
            Query::AsOf(h.at(10) + 999_999),
            Query::AsOf(h.at(1) - 1),
        ];
        let e = expected(&pool, h.wallet, &queries).await.expect("lookups");
        assert_eq!(e, [row(1), row(3000), row(10), row(10), None]);

        delete(&pool, h.wallet).await.expect("delete");
        assert!(
            snapshot(&pool, &[h.wallet])
                .await
                .expect("snapshot")
                .is_empty()
        );
        drop_db(pool, name).await;
    }
}
