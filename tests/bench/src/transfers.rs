//! transfers: POST /api/v1/transfers between wallets of any owner, closed loop at
//! saturation over every public port, then the ledger's audit rules: no transfer left
//! PENDING, each POSTED one with exactly one APPLIED TRANSFER_OUT and TRANSFER_IN, each
//! REJECTED one with one REJECTED TRANSFER_OUT, per-wallet balances equal to the audit
//! trail, and money conserved (sum of balances + PENDING = deposits - withdrawals - captures).

use crate::client::{extract_str, extract_uuid};
use crate::driver::{self, Iteration, Session};
use crate::engine::{STATUS_ERROR, STATUS_REFUSED};
use crate::ledger::{self, Conservation, Entry, Problems, Row, State, WalletAudit};
use crate::money::{decimal_to_cents, format_cents};
use crate::report::ScenarioResult;
use crate::rng::Rng;
use crate::scenarios::{self, Ctx};
use crate::setup;
use crate::workload::{Op, REJECT_CENTS};
use anyhow::Context as _;
use bytes::Bytes;
use http::Method;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

pub const PATH: &str = "/api/v1/transfers";
/// What the report compares transfers/s with.
pub const TARGET_PER_S: f64 = 5000.0;
/// Ordinary transfer amounts; with 10,000.00 per wallet none of them runs a wallet dry
/// within a bench run, so the 409s are the deliberate share of oversized transfers.
const AMOUNTS: [i64; 5] = [1, 100, 250, 1000, 5000];
/// Each wallet's deposit in setup.
pub const SEED_CENTS: i64 = 1_000_000;

/// One transfer as the client saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    pub from: u32,
    pub to: u32,
    pub cents: i64,
    pub status: u16,
    /// `transferId` of a 200 or 409 answer.
    pub id: Option<Uuid>,
    /// `status` of the answer body (POSTED, PENDING; REJECTED if a 409 says so).
    pub said: Option<String>,
}

pub struct Transfers {
    pub wallets: Vec<Uuid>,
    pub reject_ratio: f64,
}

impl Transfers {
    /// Source, destination (never the same) and amount.
    pub fn draw(&self, rng: &mut Rng) -> (u32, u32, i64) {
        let n = self.wallets.len() as u64;
        let from = rng.below(n);
        let mut to = rng.below(n.saturating_sub(1).max(1));
        if to >= from {
            to += 1;
        }
        let cents = if rng.next_f64() < self.reject_ratio {
            REJECT_CENTS
        } else {
            AMOUNTS[rng.below(AMOUNTS.len() as u64) as usize]
        };
        (from as u32, to as u32, cents)
    }
}

pub fn body(from: Uuid, to: Uuid, cents: i64) -> String {
    format!(
        r#"{{"fromWalletId":"{from}","toWalletId":"{to}","amount":"{}"}}"#,
        format_cents(cents)
    )
}

impl Iteration for Transfers {
    type Out = Sent;

    async fn run(&self, s: &mut Session, rng: &mut Rng) -> Sent {
        let (from, to, cents) = self.draw(rng);
        let b = body(
            self.wallets[from as usize],
            self.wallets[to as usize],
            cents,
        );
        let tag = Op {
            wallet: from,
            variant: 0,
        };
        let (status, answer) = s.send(Method::POST, PATH, Bytes::from(b), tag).await;
        let id = (status == 200 || status == 409)
            .then(|| extract_uuid(&answer, "transferId"))
            .flatten();
        Sent {
            from,
            to,
            cents,
            status,
            id,
            said: extract_str(&answer, "status").map(str::to_owned),
        }
    }
}

/// A transfers row, in cents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub id: Uuid,
    pub from: Uuid,
    pub to: Uuid,
    pub cents: i64,
    pub status: String,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TransfersCheck {
    pub ok: bool,
    pub wallets: usize,
    pub acknowledged_posted: u64,
    pub acknowledged_pending: u64,
    pub acknowledged_rejected: u64,
    /// No answer, or a 5xx: the transfer may or may not exist.
    pub unknown: u64,
    /// Stored transfers matched to unknown requests.
    pub unknown_recorded: u64,
    pub stored: u64,
    pub stored_posted: u64,
    pub stored_rejected: u64,
    /// Still PENDING after the wait (should be 0).
    pub stored_pending: u64,
    /// How long the check waited for PENDING transfers to be posted.
    pub pending_wait_s: f64,
    pub audit: WalletAudit,
    pub pending_cents: i64,
    /// The wallets' balance change plus PENDING amounts equals DEPOSIT - WITHDRAW - CAPTURE
    /// of their rows (zero here: only transfers among them ran).
    pub scenario_conservation_ok: bool,
    /// The same rule over the whole database, in one snapshot.
    pub global_conservation: Option<Conservation>,
    pub problems: Vec<String>,
    pub problems_total: u64,
}

fn unknown(status: u16) -> bool {
    status == STATUS_ERROR || status >= 500
}

/// The pure part of the check. `wallets[i]` is the wallet of index i in `sent`.
pub fn verify(
    wallets: &[Uuid],
    sent: &[Sent],
    stored: &[Stored],
    rows: &[Row],
    before: &HashMap<Uuid, State>,
    after: &HashMap<Uuid, State>,
) -> TransfersCheck {
    let mut p = Problems::default();
    let mut c = TransfersCheck {
        wallets: wallets.len(),
        stored: stored.len() as u64,
        ..TransfersCheck::default()
    };
    let ours: HashSet<&Uuid> = wallets.iter().collect();
    let by_id: HashMap<Uuid, &Stored> = stored.iter().map(|t| (t.id, t)).collect();

    // The audit rows of each transfer.
    let mut legs: HashMap<Uuid, Vec<&Row>> = HashMap::new();
    for r in rows {
        match r.transfer_id {
            Some(t) => legs.entry(t).or_default().push(r),
            None => p.push(format!(
                "audit row {} ({} {}c on {}) has no transferId: only transfers ran",
                r.id,
                r.entry.as_str(),
                r.cents,
                r.wallet
            )),
        }
    }
    for (t, rs) in &legs {
        if !by_id.contains_key(t) {
            p.push(format!(
                "{} audit rows name transfer {t}, which is not among the wallets' transfers",
                rs.len()
            ));
        }
    }

    for t in stored {
        if !ours.contains(&t.to) {
            p.push(format!(
                "transfer {} goes to {}, not one of the scenario's wallets",
                t.id, t.to
            ));
        }
        let rs = legs.get(&t.id).map(Vec::as_slice).unwrap_or_default();
        let count = |entry: Entry, applied: bool, wallet: Uuid| {
            rs.iter()
                .filter(|r| {
                    r.entry == entry
                        && r.applied == applied
                        && r.wallet == wallet
                        && r.cents == t.cents
                })
                .count()
        };
        let out_applied = count(Entry::TransferOut, true, t.from);
        let in_applied = count(Entry::TransferIn, true, t.to);
        let out_rejected = count(Entry::TransferOut, false, t.from);
        let expected: (usize, usize, usize) = match t.status.as_str() {
            "POSTED" => {
                c.stored_posted += 1;
                (1, 1, 0)
            }
            "REJECTED" => {
                c.stored_rejected += 1;
                (0, 0, 1)
            }
            "PENDING" => {
                c.stored_pending += 1;
                c.pending_cents += t.cents;
                p.push(format!("transfer {} is still PENDING", t.id));
                (1, 0, 0)
            }
            other => {
                p.push(format!(
                    "transfer {} has the unknown status {other:?}",
                    t.id
                ));
                continue;
            }
        };
        let got = (out_applied, in_applied, out_rejected);
        if got != expected || rs.len() != expected.0 + expected.1 + expected.2 {
            p.push(format!(
                "{} transfer {} ({}c): {} APPLIED TRANSFER_OUT, {} APPLIED TRANSFER_IN, {} REJECTED TRANSFER_OUT, {} rows in all; expected {}, {}, {}",
                t.status, t.id, t.cents, got.0, got.1, got.2, rs.len(), expected.0, expected.1, expected.2
            ));
        }
    }

    // Acknowledged transfers must be stored as answered; the others must be explained
    // by requests whose outcome the client does not know.
    let mut acked: HashSet<Uuid> = HashSet::new();
    let mut unknown_by_key: HashMap<(Uuid, Uuid, i64), u64> = HashMap::new();
    for s in sent {
        let (from, to) = (wallets[s.from as usize], wallets[s.to as usize]);
        if unknown(s.status) {
            c.unknown += 1;
            *unknown_by_key.entry((from, to, s.cents)).or_insert(0) += 1;
            continue;
        }
        if s.status != 200 && s.status != 409 {
            // Refused, or a 4xx other than 409: nothing may be stored.
            continue;
        }
        let Some(id) = s.id else {
            p.push(format!(
                "a {} answer ({from} -> {to}, {}c) carried no transferId",
                s.status, s.cents
            ));
            continue;
        };
        if !acked.insert(id) {
            p.push(format!("transfer id {id} was answered twice"));
            continue;
        }
        match s.status {
            200 => match s.said.as_deref() {
                Some("POSTED") => c.acknowledged_posted += 1,
                Some("PENDING") => c.acknowledged_pending += 1,
                other => p.push(format!("transfer {id} answered 200 with status {other:?}")),
            },
            _ => c.acknowledged_rejected += 1,
        }
        let Some(t) = by_id.get(&id) else {
            p.push(format!(
                "acknowledged transfer {id} (HTTP {}) is not stored",
                s.status
            ));
            continue;
        };
        if (t.from, t.to, t.cents) != (from, to, s.cents) {
            p.push(format!(
                "transfer {id} is stored as {} -> {} {}c, the request was {from} -> {to} {}c",
                t.from, t.to, t.cents, s.cents
            ));
        }
        let want = if s.status == 200 {
            "POSTED"
        } else {
            "REJECTED"
        };
        if t.status != want && !(s.status == 200 && t.status == "PENDING") {
            p.push(format!(
                "transfer {id} answered {} is stored as {}",
                s.status, t.status
            ));
        }
    }
    for t in stored {
        if acked.contains(&t.id) {
            continue;
        }
        match unknown_by_key.get_mut(&(t.from, t.to, t.cents)) {
            Some(n) if *n > 0 => {
                *n -= 1;
                c.unknown_recorded += 1;
            }
            _ => p.push(format!(
                "stored transfer {} ({} -> {} {}c, {}) matches no request this run sent without an answer",
                t.id, t.from, t.to, t.cents, t.status
            )),
        }
    }

    c.audit = ledger::audit_wallets(wallets, before, after, rows, &mut p);
    c.scenario_conservation_ok =
        c.audit.balance_change_cents + c.pending_cents == c.audit.external_cents;
    if !c.scenario_conservation_ok {
        p.push(format!(
            "conservation over the scenario's wallets: balances moved {}c, PENDING {}c, but deposits - withdrawals - captures are {}c",
            c.audit.balance_change_cents, c.pending_cents, c.audit.external_cents
        ));
    }
    c.ok = p.is_empty();
    c.problems = p.list;
    c.problems_total = p.total;
    c
}

async fn pending(pool: &PgPool, wallets: &[Uuid]) -> Result<i64, sqlx::Error> {
    // The partial index transfers_pending keeps this cheap however many are POSTED.
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM transfers WHERE status = 'PENDING' AND from_wallet_id = ANY($1)",
    )
    .bind(wallets)
    .fetch_one(pool)
    .await?;
    Ok(n)
}

async fn stored(pool: &PgPool, wallets: &[Uuid]) -> anyhow::Result<Vec<Stored>> {
    let rows: Vec<(Uuid, Uuid, Uuid, Decimal, String)> = sqlx::query_as(
        "SELECT id, from_wallet_id, to_wallet_id, amount, status FROM transfers WHERE from_wallet_id = ANY($1)",
    )
    .bind(wallets)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(id, from, to, amount, status)| {
            Ok(Stored {
                id,
                from,
                to,
                cents: decimal_to_cents(amount).with_context(|| {
                    format!("transfer {id}: amount {amount} is not whole cents")
                })?,
                status,
            })
        })
        .collect()
}

/// Waits for the in-flight outcomes, then reads everything the check needs.
pub async fn check(
    pool: &PgPool,
    wallets: &[Uuid],
    before: &HashMap<Uuid, State>,
    sent: &[Sent],
    pending_max: Duration,
    settle_max: Duration,
) -> anyhow::Result<TransfersCheck> {
    if sent.iter().any(|s| unknown(s.status)) {
        // Answers the client gave up on may still commit until the server's deadline.
        crate::check::settle(pool, wallets, Duration::from_secs(1), settle_max).await?;
    }
    let waited = Instant::now();
    loop {
        let n = pending(pool, wallets).await?;
        if n == 0 || waited.elapsed() >= pending_max {
            if n > 0 {
                scenarios::log(&format!(
                    "transfers: {n} transfers still PENDING after {:.1} s",
                    waited.elapsed().as_secs_f64()
                ));
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pending_wait_s = waited.elapsed().as_secs_f64();
    let after = ledger::snapshot(pool, wallets).await?;
    let rows = ledger::rows_since(pool, before).await?;
    let stored = stored(pool, wallets).await?;
    let mut c = verify(wallets, sent, &stored, &rows, before, &after);
    c.pending_wait_s = scenarios::round1(pending_wait_s);
    let global = ledger::global_conservation(pool)
        .await
        .context("the conservation sums over the whole database")?;
    if !global.ok {
        c.ok = false;
        c.problems_total += 1;
        c.problems.push(format!(
            "conservation over the whole database: balances {} + PENDING {} != deposits {} - withdrawals {} - captures {} (off by {})",
            global.balances, global.pending_transfers, global.deposits, global.withdrawals, global.captures, global.difference
        ));
    }
    c.global_conservation = Some(global);
    Ok(c)
}

/// The figures of the transfers row.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TransfersReport {
    pub wallets: usize,
    pub seed_cents_each: i64,
    /// Valid answers (200 POSTED/PENDING and 409 insufficient funds) per second.
    pub transfers_per_s: f64,
    /// 200 answers per second.
    pub posted_per_s: f64,
    pub target_per_s: f64,
    pub target_met: bool,
    pub answered_posted: u64,
    pub answered_pending: u64,
    pub rejected_409: u64,
    /// 5xx answers: failures.
    pub failed_5xx: u64,
    pub unanswered: u64,
    pub refused: u64,
    pub other_4xx: u64,
    pub setup_s: f64,
}

/// Transfers with a valid answer: 200 (POSTED or PENDING) and 409 (insufficient funds).
pub fn acknowledged(sent: &[Sent]) -> u64 {
    sent.iter()
        .filter(|s| s.status == 200 || s.status == 409)
        .count() as u64
}

pub fn summarize(
    sent: &[Sent],
    elapsed: Duration,
    wallets: usize,
    setup_s: f64,
) -> TransfersReport {
    let secs = elapsed.as_secs_f64();
    let per_s = |n: u64| {
        if secs > 0.0 {
            scenarios::round1(n as f64 / secs)
        } else {
            0.0
        }
    };
    let count = |f: &dyn Fn(&Sent) -> bool| sent.iter().filter(|s| f(s)).count() as u64;
    let ok = count(&|s| s.status == 200);
    let rejected = count(&|s| s.status == 409);
    let transfers_per_s = per_s(acknowledged(sent));
    TransfersReport {
        wallets,
        seed_cents_each: SEED_CENTS,
        transfers_per_s,
        posted_per_s: per_s(ok),
        target_per_s: TARGET_PER_S,
        target_met: transfers_per_s >= TARGET_PER_S,
        answered_posted: count(&|s| s.status == 200 && s.said.as_deref() == Some("POSTED")),
        answered_pending: count(&|s| s.status == 200 && s.said.as_deref() == Some("PENDING")),
        rejected_409: rejected,
        failed_5xx: count(&|s| s.status >= 500),
        unanswered: count(&|s| s.status == STATUS_ERROR),
        refused: count(&|s| s.status == STATUS_REFUSED),
        other_4xx: count(&|s| (400..500).contains(&s.status) && s.status != 409),
        setup_s,
    }
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<ScenarioResult> {
    let s = ctx.settings.clone();
    anyhow::ensure!(
        s.transfers_wallets >= 2,
        "--transfers-wallets must be at least 2"
    );
    scenarios::log(&format!(
        "transfers: creating {} wallets with {} each",
        s.transfers_wallets,
        format_cents(SEED_CENTS)
    ));
    let setup_started = Instant::now();
    let wallets = setup::create_wallets(
        &ctx.load.targets,
        s.transfers_wallets,
        SEED_CENTS,
        64,
        ctx.load.timeout,
    )
    .await?;
    let setup_s = scenarios::round1(setup_started.elapsed().as_secs_f64());
    let before = match &ctx.pool {
        Some(pool) => Some(
            ledger::snapshot(pool, &wallets)
                .await
                .context("snapshot before the run")?,
        ),
        None => None,
    };
    let work = Arc::new(Transfers {
        wallets: wallets.clone(),
        reject_ratio: s.mix.reject_ratio,
    });
    let cpu_before = scenarios::cpu_now(ctx);
    let start = Instant::now();
    scenarios::log(&format!(
        "running transfers: {} wallets, {} connections over {} targets, {:?}",
        wallets.len(),
        s.transfers_connections,
        ctx.load.targets.len(),
        s.transfers_duration
    ));
    let (out, sent) = driver::closed(
        &ctx.load.targets,
        ctx.load.timeout,
        s.transfers_connections,
        s.transfers_duration,
        start,
        ctx.load.seed ^ 0x7a4e_5fe5,
        work,
    )
    .await;
    let cpu_after = scenarios::cpu_now(ctx);
    let report = summarize(&sent, out.elapsed, wallets.len(), setup_s);
    scenarios::log(&format!(
        "transfers: {:.0} transfers/s (200 + 409; target >= {:.0}/s: {}), {:.0} posted/s",
        report.transfers_per_s,
        TARGET_PER_S,
        if report.target_met { "met" } else { "NOT met" },
        report.posted_per_s
    ));
    let check = match (&ctx.pool, &before) {
        (Some(pool), Some(before)) => {
            scenarios::log("checking the transfers against PostgreSQL");
            let c = check(
                pool,
                &wallets,
                before,
                &sent,
                s.transfers_pending_wait,
                s.settle_max,
            )
            .await?;
            for p in &c.problems {
                scenarios::log(&format!("consistency: {p}"));
            }
            Some(c)
        }
        _ => None,
    };
    let mut r = scenarios::base_result(
        ctx,
        "transfers",
        &out,
        None,
        s.transfers_connections,
        wallets.len(),
    );
    scenarios::set_cpu(&mut r, &cpu_before, &cpu_after, acknowledged(&sent));
    if let Some(c) = &check {
        r.consistency_ok = c.ok;
        r.consistency = serde_json::to_value(c).unwrap_or(serde_json::Value::Null);
    }
    r.transfers = Some(report);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(i: u128) -> Uuid {
        Uuid::from_u128(i + 1)
    }

    fn leg(
        wallet: Uuid,
        seq: i64,
        entry: Entry,
        cents: i64,
        applied: bool,
        after: i64,
        t: Uuid,
    ) -> Row {
        Row {
            id: Uuid::new_v4(),
            wallet,
            seq,
            entry,
            cents,
            applied,
            balance_after: after,
            held_after: 0,
            transfer_id: Some(t),
            hold_id: None,
        }
    }

    fn states(a: i64, b: i64, va: i64, vb: i64) -> HashMap<Uuid, State> {
        HashMap::from([
            (
                w(0),
                State {
                    balance: a,
                    held: 0,
                    limit: 0,
                    version: va,
                },
            ),
            (
                w(1),
                State {
                    balance: b,
                    held: 0,
                    limit: 0,
                    version: vb,
                },
            ),
        ])
    }

    /// 0 -> 1 of 2.50 posted; 1 -> 0 of REJECT_CENTS rejected.
    fn happy() -> (Vec<Sent>, Vec<Stored>, Vec<Row>) {
        let (t1, t2) = (Uuid::from_u128(0x71), Uuid::from_u128(0x72));
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
                cents: REJECT_CENTS,
                status: 409,
                id: Some(t2),
                said: None,
            },
            Sent {
                from: 0,
                to: 1,
                cents: 1,
                status: 404,
                id: None,
                said: None,
            },
        ];
        let stored = vec![
            Stored {
                id: t1,
                from: w(0),
                to: w(1),
                cents: 250,
                status: "POSTED".into(),
            },
            Stored {
                id: t2,
                from: w(1),
                to: w(0),
                cents: REJECT_CENTS,
                status: "REJECTED".into(),
            },
        ];
        let rows = vec![
            leg(w(0), 2, Entry::TransferOut, 250, true, 750, t1),
            leg(w(1), 2, Entry::TransferIn, 250, true, 1250, t1),
            leg(w(1), 3, Entry::TransferOut, REJECT_CENTS, false, 1250, t2),
        ];
        (sent, stored, rows)
    }

    #[test]
    fn posted_and_rejected_transfers_with_their_legs_pass() {
        let (sent, stored, rows) = happy();
        let c = verify(
            &[w(0), w(1)],
            &sent,
            &stored,
            &rows,
            &states(1000, 1000, 1, 1),
            &states(750, 1250, 2, 3),
        );
        assert!(c.ok, "{:?}", c.problems);
        assert_eq!(
            (
                c.acknowledged_posted,
                c.acknowledged_rejected,
                c.stored_posted,
                c.stored_rejected
            ),
            (1, 1, 1, 1)
        );
        assert!(c.scenario_conservation_ok);
    }

    #[test]
    fn a_missing_credit_or_a_lingering_pending_fails() {
        let (sent, mut stored, mut rows) = happy();
        rows.remove(1);
        let c = verify(
            &[w(0), w(1)],
            &sent,
            &stored,
            &rows,
            &states(1000, 1000, 1, 1),
            &states(750, 1000, 2, 2),
        );
        assert!(!c.ok);
        assert!(
            c.problems
                .iter()
                .any(|p| p.contains("0 APPLIED TRANSFER_IN")),
            "{:?}",
            c.problems
        );
        assert!(
            c.problems.iter().any(|p| p.contains("conservation")),
            "{:?}",
            c.problems
        );

        stored[0].status = "PENDING".into();
        let c = verify(
            &[w(0), w(1)],
            &sent,
            &stored,
            &rows,
            &states(1000, 1000, 1, 1),
            &states(750, 1000, 2, 2),
        );
        assert!(
            c.problems.iter().any(|p| p.contains("still PENDING")),
            "{:?}",
            c.problems
        );
        // PENDING money counts as in flight: the scenario's conservation holds.
        assert!(c.scenario_conservation_ok, "{:?}", c.problems);
    }

    #[test]
    fn unknown_outcomes_may_be_stored_and_strangers_may_not() {
        let (mut sent, stored, rows) = happy();
        sent[0].status = STATUS_ERROR;
        sent[0].id = None;
        let c = verify(
            &[w(0), w(1)],
            &sent,
            &stored,
            &rows,
            &states(1000, 1000, 1, 1),
            &states(750, 1250, 2, 3),
        );
        assert!(c.ok, "{:?}", c.problems);
        assert_eq!((c.unknown, c.unknown_recorded), (1, 1));

        sent[0].status = 422;
        let c = verify(
            &[w(0), w(1)],
            &sent,
            &stored,
            &rows,
            &states(1000, 1000, 1, 1),
            &states(750, 1250, 2, 3),
        );
        assert!(
            c.problems.iter().any(|p| p.contains("matches no request")),
            "{:?}",
            c.problems
        );
    }

    #[test]
    fn acknowledged_transfers_are_200_and_409() {
        let (mut sent, _, _) = happy();
        assert_eq!(acknowledged(&sent), 2);
        sent[0].status = 503;
        sent[1].status = STATUS_ERROR;
        assert_eq!(acknowledged(&sent), 0);
    }

    #[test]
    fn draws_never_pick_the_same_wallet_twice() {
        let t = Transfers {
            wallets: (0..3).map(w).collect(),
            reject_ratio: 0.1,
        };
        let mut rng = Rng::new(5);
        let mut seen = HashSet::new();
        let mut rejects = 0;
        for _ in 0..10_000 {
            let (from, to, cents) = t.draw(&mut rng);
            assert_ne!(from, to);
            assert!(from < 3 && to < 3);
            seen.insert((from, to));
            if cents == REJECT_CENTS {
                rejects += 1;
            }
        }
        assert_eq!(seen.len(), 6);
        assert!((800..1200).contains(&rejects), "{rejects}");
        let json: serde_json::Value = serde_json::from_str(&body(w(0), w(1), 250)).expect("json");
        assert_eq!(json["amount"], "2.50");
        assert_eq!(json["fromWalletId"], w(0).to_string());
    }
}
