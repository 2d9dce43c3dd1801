//! reads: `GET /api/v1/wallets/{id}` in a closed loop on wallets funded in setup while
//! nothing writes them, so every answer must show the balance they were funded with.
//! Then read-your-writes: each connection deposits 0.01 into its own wallet through one
//! node and reads the wallet back through another, which must show at least the balance
//! the deposit's answer reported.

use crate::client::{OPERATION_PATH, Target, WALLETS_PATH, extract_str, extract_uuid};
use crate::driver::{self, Iteration, Session};
use crate::engine::{Record, STATUS_ERROR, STATUS_REFUSED};
use crate::holds::{KindLatency, kind_latency};
use crate::ledger::{self, Problems};
use crate::money::{decimal_to_cents, format_cents};
use crate::report::ScenarioResult;
use crate::rng::Rng;
use crate::scenarios::{self, Ctx};
use crate::setup;
use crate::workload::{Kind, Op, operation_body};
use anyhow::Context as _;
use bytes::Bytes;
use http::Method;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Each phase-one wallet's deposit in setup.
pub const SEED_CENTS: i64 = 1_000_000;
/// Each read-your-writes deposit: 0.01.
pub const DEPOSIT_CENTS: i64 = 1;
pub const TAG_READ: u8 = 0;
pub const TAG_DEPOSIT: u8 = 1;
pub const TAG_RYW_READ: u8 = 2;

pub fn wallet_path(wallet: Uuid) -> String {
    format!("{WALLETS_PATH}/{wallet}")
}

/// What a read has to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Nothing wrote the wallet: exactly this balance.
    Exactly(i64),
    /// A write answered this balance before the read was sent: at least this.
    AtLeast(i64),
}

/// One answer to a GET of a wallet against what it had to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Match,
    /// 5xx, no answer or no connection: a failure, counted by its status, not checked.
    Failed,
    /// A balance below what an earlier answer reported.
    Stale(String),
    /// Any other wrong answer: status, walletId or balance.
    Wrong(String),
}

fn failed(status: u16) -> bool {
    status == STATUS_ERROR || status == STATUS_REFUSED || status >= 500
}

fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
}

/// A money field of an answer (`balance`, `balanceAfter`) in cents.
pub fn cents_field(body: &[u8], field: &str) -> Option<i64> {
    decimal_to_cents(Decimal::from_str(extract_str(body, field)?).ok()?)
}

/// The rule for one answer to `GET /api/v1/wallets/{wallet}`.
pub fn check(wallet: Uuid, want: Want, status: u16, body: &[u8]) -> Verdict {
    if failed(status) {
        return Verdict::Failed;
    }
    if status != 200 {
        return Verdict::Wrong(format!(
            "GET wallet {wallet}: HTTP {status}: {}",
            snippet(body)
        ));
    }
    match extract_uuid(body, "walletId") {
        Some(id) if id == wallet => {}
        other => {
            return Verdict::Wrong(format!("GET wallet {wallet}: answered walletId {other:?}"));
        }
    }
    let Some(got) = cents_field(body, "balance") else {
        return Verdict::Wrong(format!(
            "GET wallet {wallet}: no readable balance in {}",
            snippet(body)
        ));
    };
    match want {
        Want::Exactly(e) if got != e => Verdict::Wrong(format!(
            "wallet {wallet}: balance {} read, {} expected (nothing writes it)",
            format_cents(got),
            format_cents(e)
        )),
        Want::AtLeast(e) if got < e => Verdict::Stale(format!(
            "wallet {wallet}: balance {} read, below the {} a deposit already answered",
            format_cents(got),
            format_cents(e)
        )),
        _ => Verdict::Match,
    }
}

/// Phase one: one GET of a uniformly drawn wallet per iteration.
pub struct Reads {
    wallets: Vec<Uuid>,
    paths: Vec<String>,
    expected: Vec<i64>,
}

impl Reads {
    pub fn new(wallets: Vec<Uuid>, expected: Vec<i64>) -> Self {
        let paths = wallets.iter().map(|w| wallet_path(*w)).collect();
        Self {
            wallets,
            paths,
            expected,
        }
    }
}

impl Iteration for Reads {
    type Out = Verdict;

    async fn run(&self, s: &mut Session, rng: &mut Rng) -> Verdict {
        let i = rng.below(self.wallets.len() as u64) as usize;
        let tag = Op {
            wallet: i as u32,
            variant: TAG_READ,
        };
        let (status, body) = s.send(Method::GET, &self.paths[i], Bytes::new(), tag).await;
        check(
            self.wallets[i],
            Want::Exactly(self.expected[i]),
            status,
            &body,
        )
    }
}

/// One read-your-writes iteration as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RywOut {
    /// The deposit got no answer, a 5xx or no connection: nothing was read.
    DepositFailed,
    /// The deposit's answer was wrong (not 200, or no balanceAfter): nothing was read.
    DepositWrong(String),
    /// The deposit was answered 200 and the wallet read back.
    Read(Verdict),
}

/// The targets a connection writing through `write` reads through, in turn: all the
/// others, or the only one there is.
pub fn read_targets(write: usize, n: usize) -> Vec<usize> {
    if n <= 1 {
        return vec![0];
    }
    (1..n).map(|k| (write + k) % n).collect()
}

/// The balance a deposit's answer reports, or what went wrong.
pub fn deposit_outcome(wallet: Uuid, status: u16, body: &[u8]) -> Result<i64, RywOut> {
    if failed(status) {
        return Err(RywOut::DepositFailed);
    }
    if status != 200 {
        return Err(RywOut::DepositWrong(format!(
            "deposit into {wallet}: HTTP {status}: {}",
            snippet(body)
        )));
    }
    cents_field(body, "balanceAfter").ok_or_else(|| {
        RywOut::DepositWrong(format!(
            "deposit into {wallet} answered 200 without a readable balanceAfter: {}",
            snippet(body)
        ))
    })
}

/// One read-your-writes connection on its own `wallet`, writing through target `c mod n`.
async fn ryw_connection(
    targets: Vec<Arc<Target>>,
    c: usize,
    wallet: Uuid,
    start: Instant,
    duration: Duration,
    timeout: Duration,
) -> (Vec<Record>, Vec<RywOut>, u64) {
    let n = targets.len().max(1);
    let w = c % n;
    // One session (keep-alive connection) per target, so switching targets costs nothing.
    let mut write = Session::new(targets.clone(), w, start, timeout);
    let mut reads: Vec<Session> = read_targets(w, n)
        .into_iter()
        .map(|t| Session::new(targets.clone(), t, start, timeout))
        .collect();
    let body = Bytes::from(operation_body(wallet, Kind::Deposit, DEPOSIT_CENTS));
    let path = wallet_path(wallet);
    let tag = |variant| Op { wallet: 0, variant };
    let mut outs = Vec::new();
    let mut k = 0usize;
    while start.elapsed() < duration {
        let (status, answer) = write
            .send(Method::POST, OPERATION_PATH, body.clone(), tag(TAG_DEPOSIT))
            .await;
        let after = match deposit_outcome(wallet, status, &answer) {
            Ok(after) => after,
            Err(out) => {
                outs.push(out);
                if status == STATUS_REFUSED {
                    // Every target refused: do not spin at full speed on refusals.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        let answered = Instant::now();
        let turn = k % reads.len();
        k += 1;
        let read = &mut reads[turn];
        let (status, answer) = read
            .send(Method::GET, &path, Bytes::new(), tag(TAG_RYW_READ))
            .await;
        let where_ = || {
            format!(
                "; the deposit was answered through {}, the GET went through {} {:.1} ms later",
                write.base(),
                read.base(),
                answered.elapsed().as_secs_f64() * 1000.0
            )
        };
        outs.push(RywOut::Read(
            match check(wallet, Want::AtLeast(after), status, &answer) {
                Verdict::Stale(m) => Verdict::Stale(m + &where_()),
                Verdict::Wrong(m) => Verdict::Wrong(m + &where_()),
                v => v,
            },
        ));
    }
    let mut records = std::mem::take(&mut write.records);
    let mut reroutes = write.reroutes;
    for r in reads {
        records.extend(r.records);
        reroutes += r.reroutes;
    }
    (records, outs, reroutes)
}

/// Phase two: one connection per wallet of `wallets`.
async fn read_your_writes(
    targets: &[Arc<Target>],
    wallets: &[Uuid],
    duration: Duration,
    timeout: Duration,
) -> (Vec<Record>, Vec<RywOut>, u64, Duration) {
    let start = Instant::now();
    let handles: Vec<_> = wallets
        .iter()
        .enumerate()
        .map(|(c, w)| {
            tokio::spawn(ryw_connection(
                targets.to_vec(),
                c,
                *w,
                start,
                duration,
                timeout,
            ))
        })
        .collect();
    let (mut records, mut outs, mut reroutes) = (Vec::new(), Vec::new(), 0);
    for h in handles {
        // A panicking connection loses its records; the counts then show the gap.
        if let Ok((r, o, n)) = h.await {
            records.extend(r);
            outs.extend(o);
            reroutes += n;
        }
    }
    records.sort_by_key(|r| r.sched_us);
    let elapsed =
        Duration::from_micros(records.iter().map(Record::completed_us).max().unwrap_or(0));
    (records, outs, reroutes, elapsed)
}

/// The check of both phases, for results.json's `consistency`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ReadsCheck {
    pub ok: bool,
    /// Phase one: answers compared (every one but the failed).
    pub checked: u64,
    pub matched: u64,
    pub mismatched: u64,
    /// 5xx, unanswered, refused.
    pub failed: u64,
    pub expected_from: String,
    pub ryw_deposits: u64,
    pub ryw_deposits_acknowledged: u64,
    pub ryw_checks: u64,
    pub ryw_stale: u64,
    /// Wrong answers other than stale balances, deposits' included.
    pub ryw_wrong: u64,
    pub ryw_failed: u64,
    pub problems: Vec<String>,
    pub problems_total: u64,
}

/// The pure part of the check; `db_problems` are found against PostgreSQL beforehand.
pub fn verify(
    phase1: &[Verdict],
    ryw: &[RywOut],
    db_problems: Vec<String>,
    expected_from: &str,
) -> ReadsCheck {
    let mut p = Problems::default();
    let mut c = ReadsCheck {
        expected_from: expected_from.to_owned(),
        ryw_deposits: ryw.len() as u64,
        ..ReadsCheck::default()
    };
    for d in db_problems {
        p.push(d);
    }
    for v in phase1 {
        match v {
            Verdict::Match => c.matched += 1,
            Verdict::Failed => c.failed += 1,
            Verdict::Stale(m) | Verdict::Wrong(m) => {
                c.mismatched += 1;
                p.push(m.clone());
            }
        }
    }
    c.checked = c.matched + c.mismatched;
    for o in ryw {
        match o {
            RywOut::DepositFailed => c.ryw_failed += 1,
            RywOut::DepositWrong(m) => {
                c.ryw_wrong += 1;
                p.push(format!("read-your-writes: {m}"));
            }
            RywOut::Read(v) => {
                c.ryw_deposits_acknowledged += 1;
                match v {
                    Verdict::Match => c.ryw_checks += 1,
                    Verdict::Failed => c.ryw_failed += 1,
                    Verdict::Stale(m) => {
                        c.ryw_checks += 1;
                        c.ryw_stale += 1;
                        p.push(format!("read-your-writes: STALE: {m}"));
                    }
                    Verdict::Wrong(m) => {
                        c.ryw_checks += 1;
                        c.ryw_wrong += 1;
                        p.push(format!("read-your-writes: {m}"));
                    }
                }
            }
        }
    }
    c.ok = p.is_empty();
    c.problems = p.list;
    c.problems_total = p.total;
    c
}

/// The figures of the reads row besides the main ones (which are phase one's).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReadsReport {
    pub wallets: usize,
    pub seed_cents_each: i64,
    pub setup_s: f64,
    /// Phase one's 200 answers per second.
    pub reads_per_s: f64,
    pub checked: u64,
    pub matched: u64,
    pub mismatched: u64,
    pub failed: u64,
    pub expected_from: String,
    pub ryw_connections: usize,
    pub ryw_duration_s: f64,
    /// Only one target: the read-backs went through the node that took the deposit.
    pub ryw_single_target: bool,
    pub ryw_deposits: u64,
    pub ryw_deposits_acknowledged: u64,
    pub ryw_checks: u64,
    pub ryw_stale: u64,
    pub ryw_wrong: u64,
    pub ryw_failed: u64,
    pub ryw_reroutes: u64,
    pub ryw_deposit: KindLatency,
    pub ryw_read: KindLatency,
}

/// Phase one's expected balances: PostgreSQL's rows when there is a database (a setup
/// deposit retried after a lost answer may have been applied twice), else the seed.
fn expected_balances(
    wallets: &[Uuid],
    before: Option<&std::collections::HashMap<Uuid, ledger::State>>,
) -> anyhow::Result<Vec<i64>> {
    match before {
        Some(b) => wallets
            .iter()
            .map(|w| {
                b.get(w)
                    .map(|s| s.balance)
                    .with_context(|| format!("wallet {w} is not in PostgreSQL after setup"))
            })
            .collect(),
        None => Ok(vec![SEED_CENTS; wallets.len()]),
    }
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<ScenarioResult> {
    let s = ctx.settings.clone();
    anyhow::ensure!(s.reads_wallets >= 1, "--reads-wallets must be at least 1");
    let (targets, timeout) = (ctx.load.targets.clone(), ctx.load.timeout);
    scenarios::log(&format!(
        "reads: creating {} wallets with {} each and {} read-your-writes wallets",
        s.reads_wallets,
        format_cents(SEED_CENTS),
        s.reads_ryw_connections
    ));
    let setup_started = Instant::now();
    let wallets = setup::create_wallets(&targets, s.reads_wallets, SEED_CENTS, 64, timeout).await?;
    let ryw_wallets =
        setup::create_wallets(&targets, s.reads_ryw_connections, 0, 16, timeout).await?;
    let setup_s = scenarios::round1(setup_started.elapsed().as_secs_f64());
    let before = match &ctx.pool {
        Some(pool) => Some(
            ledger::snapshot(pool, &wallets)
                .await
                .context("snapshot before the run")?,
        ),
        None => None,
    };
    let expected = expected_balances(&wallets, before.as_ref())?;
    let expected_from = if before.is_some() {
        "PostgreSQL's wallet rows after setup"
    } else {
        "the setup's deposits (no database)"
    };

    let cpu_before = scenarios::cpu_now(ctx);
    let start = Instant::now();
    scenarios::log(&format!(
        "running reads: GET of {} wallets, {} connections over {} targets, {:?}",
        wallets.len(),
        s.reads_connections,
        targets.len(),
        s.reads_duration
    ));
    let (out, verdicts) = driver::closed(
        &targets,
        timeout,
        s.reads_connections,
        s.reads_duration,
        start,
        ctx.load.seed ^ 0x7ead_5eed,
        Arc::new(Reads::new(wallets.clone(), expected)),
    )
    .await;
    let cpu_after = scenarios::cpu_now(ctx);
    let mut r =
        scenarios::base_result(ctx, "reads", &out, None, s.reads_connections, wallets.len());
    // The CPU window is phase one's: per operation means per read.
    scenarios::set_cpu(
        &mut r,
        &cpu_before,
        &cpu_after,
        scenarios::acknowledged(&out.records),
    );

    // Reads must not write: the wallets' rows are as they were.
    let mut db_problems = Vec::new();
    if let (Some(pool), Some(before)) = (&ctx.pool, &before) {
        let after = ledger::snapshot(pool, &wallets)
            .await
            .context("snapshot after the reads")?;
        for w in &wallets {
            if before.get(w) != after.get(w) {
                db_problems.push(format!(
                    "wallet {w} changed while only reads ran: {:?} before, {:?} after",
                    before.get(w),
                    after.get(w)
                ));
            }
        }
    }

    scenarios::log(&format!(
        "running read-your-writes: {} connections, each a DEPOSIT of {} then a GET through another target, {:?}",
        ryw_wallets.len(),
        format_cents(DEPOSIT_CENTS),
        s.reads_ryw_duration
    ));
    let (ryw_records, ryw_outs, ryw_reroutes, ryw_elapsed) =
        read_your_writes(&targets, &ryw_wallets, s.reads_ryw_duration, timeout).await;
    let c = verify(&verdicts, &ryw_outs, db_problems, expected_from);
    for p in &c.problems {
        scenarios::log(&format!("consistency: {p}"));
    }
    let secs = out.elapsed.as_secs_f64();
    let ok_reads = out.records.iter().filter(|r| r.status == 200).count() as f64;
    let report = ReadsReport {
        wallets: wallets.len(),
        seed_cents_each: SEED_CENTS,
        setup_s,
        reads_per_s: if secs > 0.0 {
            scenarios::round1(ok_reads / secs)
        } else {
            0.0
        },
        checked: c.checked,
        matched: c.matched,
        mismatched: c.mismatched,
        failed: c.failed,
        expected_from: c.expected_from.clone(),
        ryw_connections: ryw_wallets.len(),
        ryw_duration_s: scenarios::round1(ryw_elapsed.as_secs_f64()),
        ryw_single_target: targets.len() < 2,
        ryw_deposits: c.ryw_deposits,
        ryw_deposits_acknowledged: c.ryw_deposits_acknowledged,
        ryw_checks: c.ryw_checks,
        ryw_stale: c.ryw_stale,
        ryw_wrong: c.ryw_wrong,
        ryw_failed: c.ryw_failed,
        ryw_reroutes,
        ryw_deposit: kind_latency(&ryw_records, TAG_DEPOSIT, ryw_elapsed),
        ryw_read: kind_latency(&ryw_records, TAG_RYW_READ, ryw_elapsed),
    };
    scenarios::log(&format!(
        "reads: {:.0} reads/s, {} mismatched; read-your-writes: {} checks, {} stale",
        report.reads_per_s, report.mismatched, report.ryw_checks, report.ryw_stale
    ));
    r.consistency_ok = c.ok;
    r.consistency = serde_json::to_value(&c).unwrap_or(serde_json::Value::Null);
    r.reads = Some(report);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Uuid = Uuid::from_u128(0xabc);

    fn answer(wallet: Uuid, balance: &str) -> Vec<u8> {
        format!(r#"{{"walletId":"{wallet}","balance":"{balance}","available":"{balance}","held":"0.00","overdraftLimit":"0.00"}}"#).into_bytes()
    }

    #[test]
    fn a_matching_answer_passes() {
        assert_eq!(
            check(W, Want::Exactly(1_000_000), 200, &answer(W, "10000.00")),
            Verdict::Match
        );
        assert_eq!(
            check(W, Want::AtLeast(105), 200, &answer(W, "1.05")),
            Verdict::Match
        );
        // A read may be newer than the deposit it follows, never older.
        assert_eq!(
            check(W, Want::AtLeast(105), 200, &answer(W, "1.07")),
            Verdict::Match
        );
    }

    #[test]
    fn a_wrong_balance_wallet_or_status_fails() {
        let v = check(W, Want::Exactly(1_000_000), 200, &answer(W, "9999.99"));
        assert!(
            matches!(&v, Verdict::Wrong(m) if m.contains("9999.99 read, 10000.00 expected")),
            "{v:?}"
        );
        let other = Uuid::from_u128(0xdef);
        let v = check(W, Want::Exactly(1_000_000), 200, &answer(other, "10000.00"));
        assert!(
            matches!(&v, Verdict::Wrong(m) if m.contains("walletId")),
            "{v:?}"
        );
        let v = check(W, Want::Exactly(0), 200, br#"{"walletId":"x"}"#);
        assert!(matches!(v, Verdict::Wrong(_)), "{v:?}");
        let v = check(W, Want::Exactly(0), 404, br#"{"status":404}"#);
        assert!(
            matches!(&v, Verdict::Wrong(m) if m.contains("HTTP 404")),
            "{v:?}"
        );
        let v = check(W, Want::Exactly(0), 200, &answer(W, "oops"));
        assert!(
            matches!(&v, Verdict::Wrong(m) if m.contains("no readable balance")),
            "{v:?}"
        );
    }

    #[test]
    fn a_stale_balance_fails_and_failures_are_not_checked() {
        let v = check(W, Want::AtLeast(105), 200, &answer(W, "1.04"));
        assert!(
            matches!(&v, Verdict::Stale(m) if m.contains("1.04 read, below the 1.05")),
            "{v:?}"
        );
        for status in [STATUS_ERROR, STATUS_REFUSED, 500, 503] {
            assert_eq!(check(W, Want::Exactly(0), status, b""), Verdict::Failed);
        }
    }

    #[test]
    fn deposits_report_their_balance_after() {
        let body = br#"{"operationId":"x","walletId":"y","operationType":"DEPOSIT","amount":"0.01","status":"APPLIED","balanceAfter":"1.05","heldAfter":"0.00"}"#;
        assert_eq!(deposit_outcome(W, 200, body), Ok(105));
        assert_eq!(
            deposit_outcome(W, STATUS_ERROR, b""),
            Err(RywOut::DepositFailed)
        );
        assert_eq!(deposit_outcome(W, 502, b""), Err(RywOut::DepositFailed));
        assert!(matches!(
            deposit_outcome(W, 200, br#"{"status":"APPLIED"}"#),
            Err(RywOut::DepositWrong(m)) if m.contains("balanceAfter")
        ));
        assert!(matches!(
            deposit_outcome(W, 422, b"{}"),
            Err(RywOut::DepositWrong(m)) if m.contains("HTTP 422")
        ));
    }

    #[test]
    fn read_backs_go_through_every_other_target() {
        assert_eq!(read_targets(0, 3), vec![1, 2]);
        assert_eq!(read_targets(2, 3), vec![0, 1]);
        assert_eq!(read_targets(1, 2), vec![0]);
        assert_eq!(read_targets(0, 1), vec![0]);
    }

    #[test]
    fn the_check_counts_both_phases() {
        let phase1 = vec![
            Verdict::Match,
            Verdict::Match,
            Verdict::Failed,
            Verdict::Wrong("wallet x: balance off".into()),
        ];
        let ryw = vec![
            RywOut::Read(Verdict::Match),
            RywOut::Read(Verdict::Stale("wallet y: 0.01 below 0.02".into())),
            RywOut::Read(Verdict::Failed),
            RywOut::DepositFailed,
            RywOut::DepositWrong("deposit into y: HTTP 422".into()),
        ];
        let c = verify(&phase1, &ryw, vec!["wallet z changed".into()], "seed");
        assert!(!c.ok);
        assert_eq!((c.checked, c.matched, c.mismatched, c.failed), (3, 2, 1, 1));
        assert_eq!(
            (
                c.ryw_deposits,
                c.ryw_deposits_acknowledged,
                c.ryw_checks,
                c.ryw_stale,
                c.ryw_wrong,
                c.ryw_failed
            ),
            (5, 3, 2, 1, 1, 2)
        );
        assert_eq!(c.problems_total, 4);
        assert!(c.problems.iter().any(|p| p.contains("STALE: wallet y")));
        let clean = verify(
            &[Verdict::Match],
            &[RywOut::Read(Verdict::Match)],
            vec![],
            "seed",
        );
        assert!(clean.ok, "{:?}", clean.problems);
        assert_eq!((clean.checked, clean.ryw_checks), (1, 1));
    }
}
