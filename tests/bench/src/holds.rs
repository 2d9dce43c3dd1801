//! holds: on one hot wallet, each iteration creates a hold
//! (POST /api/v1/wallets/{id}/holds) and captures it (POST /api/v1/holds/{holdId}/capture).
//! Compared with saturate-one, the hot-wallet rate of plain operations in the same run.
//! The check: the wallet's balance and held amount replay from the audit trail, every
//! hold is CAPTURED in full with one HOLD and one CAPTURE row (unless an answer was lost).

use crate::client::{extract_str, extract_uuid};
use crate::driver::{self, Iteration, Session};
use crate::engine::{Record, STATUS_ERROR, STATUS_REFUSED};
use crate::ledger::{self, Entry, Problems, Row, State, WalletAudit};
use crate::money::{decimal_to_cents, format_cents};
use crate::report::ScenarioResult;
use crate::rng::Rng;
use crate::scenarios::{self, Ctx};
use crate::setup;
use crate::stats;
use crate::workload::Op;
use anyhow::Context as _;
use bytes::Bytes;
use http::Method;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// holds' operations/s over saturate-one's must reach this.
pub const TARGET_RATIO: f64 = 0.80;
/// Small amounts: a 30 s run at saturation captures well under the seed.
const AMOUNTS: [i64; 5] = [1, 5, 10, 25, 100];
pub const SEED_CENTS: i64 = 100_000_000;
pub const TAG_CREATE: u8 = 0;
pub const TAG_CAPTURE: u8 = 1;

pub fn create_path(wallet: Uuid) -> String {
    format!("/api/v1/wallets/{wallet}/holds")
}

pub fn capture_path(hold: Uuid) -> String {
    format!("/api/v1/holds/{hold}/capture")
}

/// One iteration as the client saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub cents: i64,
    pub create: u16,
    /// `holdId` of a 2xx or 409 answer.
    pub hold: Option<Uuid>,
    pub create_said: Option<String>,
    /// Status of the capture; None when it was not sent (the hold was not created).
    pub capture: Option<u16>,
    pub capture_said: Option<String>,
}

pub struct Holds {
    path: String,
}

impl Holds {
    pub fn new(wallet: Uuid) -> Self {
        Self {
            path: create_path(wallet),
        }
    }
}

impl Iteration for Holds {
    type Out = Pair;

    async fn run(&self, s: &mut Session, rng: &mut Rng) -> Pair {
        let cents = AMOUNTS[rng.below(AMOUNTS.len() as u64) as usize];
        let body = format!(r#"{{"amount":"{}"}}"#, format_cents(cents));
        let create_tag = Op {
            wallet: 0,
            variant: TAG_CREATE,
        };
        let (create, answer) = s
            .send(Method::POST, &self.path, Bytes::from(body), create_tag)
            .await;
        let hold = ((200..300).contains(&create) || create == 409)
            .then(|| extract_uuid(&answer, "holdId"))
            .flatten();
        let mut pair = Pair {
            cents,
            create,
            hold,
            create_said: extract_str(&answer, "status").map(str::to_owned),
            capture: None,
            capture_said: None,
        };
        if (200..300).contains(&create)
            && let Some(id) = hold
        {
            let capture_tag = Op {
                wallet: 0,
                variant: TAG_CAPTURE,
            };
            let (status, answer) = s
                .send(
                    Method::POST,
                    &capture_path(id),
                    Bytes::from_static(b"{}"),
                    capture_tag,
                )
                .await;
            pair.capture = Some(status);
            pair.capture_said = extract_str(&answer, "status").map(str::to_owned);
        }
        pair
    }
}

/// A holds row, in cents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredHold {
    pub id: Uuid,
    pub cents: i64,
    pub captured: i64,
    pub status: String,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct HoldsCheck {
    pub ok: bool,
    pub iterations: u64,
    pub created: u64,
    pub rejected_409: u64,
    pub create_unknown: u64,
    pub captured: u64,
    pub capture_unknown: u64,
    /// Holds whose capture could not connect anywhere: they stay ACTIVE.
    pub capture_refused: u64,
    pub stored: u64,
    pub stored_captured: u64,
    pub stored_active: u64,
    pub stored_rejected: u64,
    pub stored_other: u64,
    /// Stored holds matched to creations whose answer was lost.
    pub unknown_recorded: u64,
    pub audit: WalletAudit,
    pub problems: Vec<String>,
    pub problems_total: u64,
}

fn unknown(status: u16) -> bool {
    status == STATUS_ERROR || status >= 500
}

fn ok2xx(status: u16) -> bool {
    (200..300).contains(&status)
}

/// The pure part of the check: `pairs` against the holds and audit rows of `wallet`.
pub fn verify(
    wallet: Uuid,
    pairs: &[Pair],
    stored: &[StoredHold],
    rows: &[Row],
    before: &HashMap<Uuid, State>,
    after: &HashMap<Uuid, State>,
) -> HoldsCheck {
    let mut p = Problems::default();
    let mut c = HoldsCheck {
        iterations: pairs.len() as u64,
        stored: stored.len() as u64,
        ..HoldsCheck::default()
    };
    let by_id: HashMap<Uuid, &StoredHold> = stored.iter().map(|h| (h.id, h)).collect();
    let mut rows_of: HashMap<Uuid, Vec<&Row>> = HashMap::new();
    for r in rows {
        match r.hold_id {
            Some(h) => rows_of.entry(h).or_default().push(r),
            None => p.push(format!(
                "audit row {} ({} {}c) has no holdId: only holds ran",
                r.id,
                r.entry.as_str(),
                r.cents
            )),
        }
    }
    for (h, rs) in &rows_of {
        if !by_id.contains_key(h) {
            p.push(format!(
                "{} audit rows name hold {h}, which is not stored for the wallet",
                rs.len()
            ));
        }
    }

    // Holds that may legitimately not be CAPTURED: their capture's outcome is unknown, or
    // it was never sent.
    let mut may_be_active: HashSet<Uuid> = HashSet::new();
    let mut acked: HashSet<Uuid> = HashSet::new();
    let mut unknown_creates: HashMap<i64, u64> = HashMap::new();
    for pair in pairs {
        if unknown(pair.create) {
            c.create_unknown += 1;
            *unknown_creates.entry(pair.cents).or_insert(0) += 1;
            continue;
        }
        if !ok2xx(pair.create) && pair.create != 409 {
            continue;
        }
        let Some(id) = pair.hold else {
            p.push(format!(
                "a {} answer to a hold of {}c carried no holdId",
                pair.create, pair.cents
            ));
            continue;
        };
        if !acked.insert(id) {
            p.push(format!("hold id {id} was answered twice"));
            continue;
        }
        let stored = by_id.get(&id);
        if stored.is_none() {
            p.push(format!(
                "acknowledged hold {id} (HTTP {}) is not stored",
                pair.create
            ));
        }
        if let Some(h) = stored
            && h.cents != pair.cents
        {
            p.push(format!(
                "hold {id} is stored with {}c, the request said {}c",
                h.cents, pair.cents
            ));
        }
        if pair.create == 409 {
            c.rejected_409 += 1;
            if let Some(h) = stored
                && h.status != "REJECTED"
            {
                p.push(format!("hold {id} answered 409 is stored as {}", h.status));
            }
            continue;
        }
        c.created += 1;
        if pair.create != 201 {
            p.push(format!(
                "hold {id} was created with HTTP {} (the contract says 201)",
                pair.create
            ));
        }
        if pair.create_said.as_deref() != Some("ACTIVE") {
            p.push(format!(
                "hold {id} was created with status {:?}",
                pair.create_said
            ));
        }
        match pair.capture {
            Some(s) if ok2xx(s) => {
                c.captured += 1;
                if pair.capture_said.as_deref() != Some("CAPTURED") {
                    p.push(format!(
                        "hold {id}: capture answered {s} with status {:?}",
                        pair.capture_said
                    ));
                }
                if let Some(h) = stored
                    && (h.status != "CAPTURED" || h.captured != h.cents)
                {
                    p.push(format!(
                        "hold {id}: capture answered {s}, stored {} with {}c of {}c captured",
                        h.status, h.captured, h.cents
                    ));
                }
            }
            Some(s) if unknown(s) => {
                c.capture_unknown += 1;
                may_be_active.insert(id);
            }
            Some(STATUS_REFUSED) => {
                c.capture_refused += 1;
                may_be_active.insert(id);
            }
            Some(s) => {
                may_be_active.insert(id);
                p.push(format!(
                    "hold {id} (ACTIVE, {}c): capture answered {s} ({:?})",
                    pair.cents, pair.capture_said
                ));
            }
            None => p.push(format!(
                "hold {id} was created but not captured by the bench"
            )),
        }
    }

    for h in stored {
        match h.status.as_str() {
            "CAPTURED" => c.stored_captured += 1,
            "ACTIVE" => c.stored_active += 1,
            "REJECTED" => c.stored_rejected += 1,
            _ => c.stored_other += 1,
        }
        if !acked.contains(&h.id) {
            match unknown_creates.get_mut(&h.cents) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    c.unknown_recorded += 1;
                    may_be_active.insert(h.id);
                }
                _ => p.push(format!(
                    "stored hold {} ({}c, {}) matches no request this run sent without an answer",
                    h.id, h.cents, h.status
                )),
            }
        }
        let captured_in_full = h.status == "CAPTURED" && h.captured == h.cents;
        let allowed = captured_in_full
            || h.status == "REJECTED"
            || (h.status == "ACTIVE" && may_be_active.contains(&h.id));
        if !allowed {
            p.push(format!(
                "hold {} is {} with {}c of {}c captured; every hold should be CAPTURED in full",
                h.id, h.status, h.captured, h.cents
            ));
        }
        // Its rows: HOLD applied once unless rejected; CAPTURE of what was captured;
        // RELEASE of the rest once it is no longer ACTIVE.
        let rs = rows_of.get(&h.id).map(Vec::as_slice).unwrap_or_default();
        let sum = |e: Entry| -> (usize, i64) {
            rs.iter()
                .filter(|r| r.entry == e && r.applied)
                .fold((0, 0), |(n, s), r| (n + 1, s + r.cents))
        };
        let (holds, held) = sum(Entry::Hold);
        let (captures, captured) = sum(Entry::Capture);
        let (_, released) = sum(Entry::Release);
        let rejected_hold_rows = rs
            .iter()
            .filter(|r| r.entry == Entry::Hold && !r.applied)
            .count();
        let fine = match h.status.as_str() {
            "REJECTED" => holds == 0 && captures == 0 && released == 0 && rejected_hold_rows <= 1,
            "ACTIVE" => (holds, held, captures, released) == (1, h.cents, 0, 0),
            "CAPTURED" => {
                holds == 1
                    && held == h.cents
                    && captures == 1
                    && captured == h.captured
                    && released == h.cents - h.captured
            }
            _ => true,
        };
        if !fine {
            p.push(format!(
                "{} hold {} ({}c, {}c captured): {holds} APPLIED HOLD of {held}c, {captures} CAPTURE of {captured}c, RELEASE of {released}c",
                h.status, h.id, h.cents, h.captured
            ));
        }
    }

    c.audit = ledger::audit_wallets(&[wallet], before, after, rows, &mut p);
    c.ok = p.is_empty();
    c.problems = p.list;
    c.problems_total = p.total;
    c
}

async fn stored(pool: &PgPool, wallet: Uuid) -> anyhow::Result<Vec<StoredHold>> {
    let rows: Vec<(Uuid, Decimal, Decimal, String)> = sqlx::query_as(
        "SELECT id, amount, captured_amount, status FROM holds WHERE wallet_id = $1",
    )
    .bind(wallet)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(id, amount, captured, status)| {
            let c = |d: Decimal| {
                decimal_to_cents(d).with_context(|| format!("hold {id}: {d} is not whole cents"))
            };
            Ok(StoredHold {
                id,
                cents: c(amount)?,
                captured: c(captured)?,
                status,
            })
        })
        .collect()
}

pub async fn check(
    pool: &PgPool,
    wallet: Uuid,
    before: &HashMap<Uuid, State>,
    pairs: &[Pair],
    settle_max: Duration,
) -> anyhow::Result<HoldsCheck> {
    if pairs
        .iter()
        .any(|p| unknown(p.create) || p.capture.is_some_and(unknown))
    {
        crate::check::settle(pool, &[wallet], Duration::from_secs(1), settle_max).await?;
    }
    let after = ledger::snapshot(pool, &[wallet]).await?;
    let rows = ledger::rows_since(pool, before).await?;
    let stored = stored(pool, wallet).await?;
    Ok(verify(wallet, pairs, &stored, &rows, before, &after))
}

/// Latency of one kind of request of the pair.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KindLatency {
    pub requests: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub status_counts: BTreeMap<String, u64>,
}

pub fn kind_latency(records: &[Record], tag: u8, elapsed: Duration) -> KindLatency {
    let mine: Vec<Record> = records
        .iter()
        .filter(|r| r.op.variant == tag)
        .copied()
        .collect();
    let s = stats::summarize(&mine, elapsed);
    KindLatency {
        requests: s.requests,
        p50_ms: s.p50_ms,
        p99_ms: s.p99_ms,
        max_ms: s.max_ms,
        status_counts: s.status_counts,
    }
}

/// The figures of the holds row.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HoldsReport {
    /// Iterations whose hold and capture both answered 2xx.
    pub pairs: u64,
    pub pairs_per_s: f64,
    /// Answered requests (creations and captures) per second.
    pub operations_per_s: f64,
    /// saturate-one's operations/s in this run (None if it did not run or failed).
    pub baseline_ops_per_s: Option<f64>,
    pub baseline: String,
    /// operations_per_s / baseline: what the target applies to.
    pub ratio: Option<f64>,
    /// pairs_per_s / baseline.
    pub pairs_ratio: Option<f64>,
    pub target_ratio: f64,
    pub target_met: Option<bool>,
    pub create: KindLatency,
    pub capture: KindLatency,
}

/// Acknowledged operations: hold creations answered 2xx or 409 (REJECTED), and
/// captures answered 2xx.
pub fn acknowledged(pairs: &[Pair]) -> u64 {
    pairs
        .iter()
        .map(|p| {
            u64::from(ok2xx(p.create) || p.create == 409) + u64::from(p.capture.is_some_and(ok2xx))
        })
        .sum()
}

pub fn summarize(
    out_records: &[Record],
    pairs: &[Pair],
    elapsed: Duration,
    achieved_rps: f64,
    baseline: Option<f64>,
) -> HoldsReport {
    let secs = elapsed.as_secs_f64();
    let n = pairs
        .iter()
        .filter(|p| ok2xx(p.create) && p.capture.is_some_and(ok2xx))
        .count() as u64;
    let pairs_per_s = if secs > 0.0 {
        scenarios::round1(n as f64 / secs)
    } else {
        0.0
    };
    let ratio = |v: f64| {
        baseline
            .filter(|b| *b > 0.0)
            .map(|b| (v / b * 1000.0).round() / 1000.0)
    };
    let r = ratio(achieved_rps);
    HoldsReport {
        pairs: n,
        pairs_per_s,
        operations_per_s: achieved_rps,
        baseline_ops_per_s: baseline,
        baseline: match baseline {
            Some(_) => "saturate-one earlier in this run".to_owned(),
            None => "none: saturate-one did not run before holds or failed".to_owned(),
        },
        ratio: r,
        pairs_ratio: ratio(pairs_per_s),
        target_ratio: TARGET_RATIO,
        target_met: r.map(|r| r >= TARGET_RATIO),
        create: kind_latency(out_records, TAG_CREATE, elapsed),
        capture: kind_latency(out_records, TAG_CAPTURE, elapsed),
    }
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<ScenarioResult> {
    let s = ctx.settings.clone();
    let wallets =
        setup::create_wallets(&ctx.load.targets, 1, SEED_CENTS, 1, ctx.load.timeout).await?;
    let wallet = wallets[0];
    let before = match &ctx.pool {
        Some(pool) => Some(
            ledger::snapshot(pool, &wallets)
                .await
                .context("snapshot before the run")?,
        ),
        None => None,
    };
    let cpu_before = scenarios::cpu_now(ctx);
    let start = Instant::now();
    scenarios::log(&format!(
        "running holds: hold + capture on wallet {wallet}, {} connections, {:?}",
        s.holds_connections, s.holds_duration
    ));
    let (out, pairs) = driver::closed(
        &ctx.load.targets,
        ctx.load.timeout,
        s.holds_connections,
        s.holds_duration,
        start,
        ctx.load.seed ^ 0x401d_5eed,
        Arc::new(Holds::new(wallet)),
    )
    .await;
    let cpu_after = scenarios::cpu_now(ctx);
    let mut r = scenarios::base_result(ctx, "holds", &out, None, s.holds_connections, 1);
    scenarios::set_cpu(&mut r, &cpu_before, &cpu_after, acknowledged(&pairs));
    let report = summarize(
        &out.records,
        &pairs,
        out.elapsed,
        r.achieved_rps,
        ctx.saturate_one_rps,
    );
    scenarios::log(&format!(
        "holds: {:.0} hold+capture pairs/s, {:.0} operations/s; saturate-one {}; ratio {} (target >= {TARGET_RATIO:.2}: {})",
        report.pairs_per_s,
        report.operations_per_s,
        report.baseline_ops_per_s.map_or_else(
            || "not measured".to_owned(),
            |b| format!("{b:.0} operations/s")
        ),
        report
            .ratio
            .map_or_else(|| "n/a".to_owned(), |x| format!("{x:.2}")),
        match report.target_met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "unknown",
        }
    ));
    if let (Some(pool), Some(before)) = (&ctx.pool, &before) {
        scenarios::log("checking the holds against PostgreSQL");
        let c = check(pool, wallet, before, &pairs, s.settle_max).await?;
        for p in &c.problems {
            scenarios::log(&format!("consistency: {p}"));
        }
        r.consistency_ok = c.ok;
        r.consistency = serde_json::to_value(&c).unwrap_or(serde_json::Value::Null);
    }
    r.holds = Some(report);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Uuid = Uuid::from_u128(0xbeef);

    fn row(seq: i64, entry: Entry, cents: i64, after: (i64, i64), hold: u128) -> Row {
        Row {
            id: Uuid::from_u128(0x5000 + seq as u128),
            wallet: W,
            seq,
            entry,
            cents,
            applied: true,
            balance_after: after.0,
            held_after: after.1,
            transfer_id: None,
            hold_id: Some(Uuid::from_u128(hold)),
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

    fn pair(cents: i64, hold: u128) -> Pair {
        Pair {
            cents,
            create: 201,
            hold: Some(Uuid::from_u128(hold)),
            create_said: Some("ACTIVE".into()),
            capture: Some(200),
            capture_said: Some("CAPTURED".into()),
        }
    }

    fn captured(cents: i64, hold: u128) -> StoredHold {
        StoredHold {
            id: Uuid::from_u128(hold),
            cents,
            captured: cents,
            status: "CAPTURED".into(),
        }
    }

    #[test]
    fn captured_pairs_pass() {
        let pairs = vec![pair(100, 1), pair(25, 2)];
        let stored = vec![captured(100, 1), captured(25, 2)];
        let rows = vec![
            row(2, Entry::Hold, 100, (1000, 100), 1),
            row(3, Entry::Hold, 25, (1000, 125), 2),
            row(4, Entry::Capture, 100, (900, 25), 1),
            row(5, Entry::Capture, 25, (875, 0), 2),
        ];
        let c = verify(W, &pairs, &stored, &rows, &st(1000, 0, 1), &st(875, 0, 5));
        assert!(c.ok, "{:?}", c.problems);
        assert_eq!((c.created, c.captured, c.stored_captured), (2, 2, 2));
    }

    #[test]
    fn an_uncaptured_hold_or_a_double_capture_fails() {
        let pairs = vec![pair(100, 1)];
        let stored = vec![StoredHold {
            status: "ACTIVE".into(),
            captured: 0,
            ..captured(100, 1)
        }];
        let rows = vec![row(2, Entry::Hold, 100, (1000, 100), 1)];
        let c = verify(
            W,
            &pairs,
            &stored,
            &rows,
            &st(1000, 0, 1),
            &st(1000, 100, 2),
        );
        assert!(!c.ok);
        assert!(
            c.problems
                .iter()
                .any(|p| p.contains("every hold should be CAPTURED")),
            "{:?}",
            c.problems
        );

        let stored = vec![captured(100, 1)];
        let rows = vec![
            row(2, Entry::Hold, 100, (1000, 100), 1),
            row(3, Entry::Capture, 100, (900, 0), 1),
            row(4, Entry::Capture, 100, (800, -100), 1),
        ];
        let c = verify(W, &pairs, &stored, &rows, &st(1000, 0, 1), &st(800, 0, 4));
        assert!(
            c.problems.iter().any(|p| p.contains("2 CAPTURE")),
            "{:?}",
            c.problems
        );
    }

    #[test]
    fn a_lost_capture_answer_may_leave_the_hold_active() {
        let mut p = pair(100, 1);
        p.capture = Some(STATUS_ERROR);
        p.capture_said = None;
        let stored = vec![StoredHold {
            status: "ACTIVE".into(),
            captured: 0,
            ..captured(100, 1)
        }];
        let rows = vec![row(2, Entry::Hold, 100, (1000, 100), 1)];
        let c = verify(W, &[p], &stored, &rows, &st(1000, 0, 1), &st(1000, 100, 2));
        assert!(c.ok, "{:?}", c.problems);
        assert_eq!(c.capture_unknown, 1);
    }

    #[test]
    fn operations_are_acknowledged_creations_and_captures() {
        let mut rejected = pair(1, 3);
        (rejected.create, rejected.capture) = (409, None);
        let mut lost = pair(1, 4);
        lost.capture = Some(STATUS_ERROR);
        let mut failed = pair(1, 5);
        (failed.create, failed.capture) = (503, None);
        assert_eq!(acknowledged(&[pair(1, 1), pair(5, 2)]), 4);
        assert_eq!(acknowledged(&[rejected, lost, failed]), 2);
    }

    #[test]
    fn the_ratio_compares_operations_per_second() {
        let pairs = vec![pair(1, 1), pair(1, 2)];
        let r = summarize(&[], &pairs, Duration::from_secs(1), 800.0, Some(1000.0));
        assert_eq!(r.pairs, 2);
        assert_eq!(r.ratio, Some(0.8));
        assert_eq!(r.target_met, Some(true));
        assert_eq!(r.pairs_ratio, Some(0.002));
        let none = summarize(&[], &pairs, Duration::from_secs(1), 800.0, None);
        assert_eq!((none.ratio, none.target_met), (None, None));
    }
}
