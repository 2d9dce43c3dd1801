//! balance-at: point-in-time balances of one wallet with a long history. The history
//! (a million operations by default) is written straight into PostgreSQL with one
//! INSERT ... SELECT generate_series, around the service on purpose: through the API it
//! would take minutes. Then GET /api/v1/wallets/{id}/balance?sequence=<n> and
//! ?asOf=<time> at a fixed rate (open loop); every answer is compared with the rows.

use crate::driver::{self, OpenRequest};
use crate::engine::Record;
use crate::money::decimal_to_cents;
use crate::report::ScenarioResult;
use crate::rng::Rng;
use crate::scenarios::{self, Ctx};
use crate::schedule::Schedule;
use crate::stats;
use crate::workload::Op;
use anyhow::Context as _;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// p99 of either kind of query must stay at or below this.
pub const TARGET_P99_MS: f64 = 10.0;
pub const TAG_SEQUENCE: u8 = 0;
pub const TAG_AS_OF: u8 = 1;

/// RFC 3339 in UTC with microseconds, e.g. 2026-12-07T01:02:03.000456Z.
pub fn rfc3339_micros(unix_us: i64) -> String {
    let secs = unix_us.div_euclid(1_000_000);
    let us = unix_us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{us:06}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The seeded history: operation g (1..=n) was made at `t0_us + g * step_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    pub wallet: Uuid,
    pub n: i64,
    pub t0_us: i64,
    pub step_us: i64,
}

impl History {
    pub fn at(&self, g: i64) -> i64 {
        self.t0_us + g * self.step_us
    }
}

/// Writes the wallet and its `n` operations in one transaction, as the owner of the
/// tables. Every third operation withdraws (g mod 500 + 1) cents, the others deposit
/// (g mod 1000 + 1) cents; each triple adds more than it takes, so the balance never
/// goes below zero. balance_after is the running sum, held_after 0, seq = g, and the
/// wallet row ends at the last balance with version n.
pub async fn seed(pool: &PgPool, tenant: &str, h: &History) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO wallets (id, tenant_id, balance, held, overdraft_limit, version, created_at, updated_at) \
         VALUES ($1, $2, 0, 0, 0, 0, timestamptz 'epoch' + $3::bigint * interval '1 microsecond', now())",
    )
    .bind(h.wallet)
    .bind(tenant)
    .bind(h.t0_us)
    .execute(&mut *tx)
    .await?;
    // Operation ids share a random prefix and end in g: sequential in the primary key.
    let prefix = crate::setup::Numbered::new(0).text_prefix();
    sqlx::query(
        "INSERT INTO operations (id, wallet_id, seq, operation_type, amount, status, balance_after, held_after, created_at) \
         SELECT ($2 || lpad(to_hex(g), 12, '0'))::uuid, $1, g, \
                CASE WHEN g % 3 = 0 THEN 'WITHDRAW' ELSE 'DEPOSIT' END, \
                abs(delta) / 100.0, 'APPLIED', \
                sum(delta) OVER (ORDER BY g) / 100.0, 0, \
                timestamptz 'epoch' + ($3::bigint + g * $4::bigint) * interval '1 microsecond' \
         FROM (SELECT g, CASE WHEN g % 3 = 0 THEN -(g % 500 + 1) ELSE g % 1000 + 1 END AS delta \
               FROM generate_series(1::bigint, $5::bigint) AS g) AS s",
    )
    .bind(h.wallet)
    .bind(&prefix)
    .bind(h.t0_us)
    .bind(h.step_us)
    .bind(h.n)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE wallets SET balance = o.balance_after, held = o.held_after, version = o.seq, updated_at = now() \
         FROM operations o WHERE wallets.id = $1 AND o.wallet_id = $1 AND o.seq = $2",
    )
    .bind(h.wallet)
    .bind(h.n)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Deletes the seeded wallet and its history (maintenance transaction: the audit trail
/// refuses deletes otherwise).
pub async fn delete(pool: &PgPool, wallet: Uuid) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL wallet.maintenance = 'on'")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM operations WHERE wallet_id = $1")
        .bind(wallet)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM wallets WHERE id = $1")
        .bind(wallet)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Query i: by sequence (even i) or by time (odd i), the argument drawn beforehand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    Sequence(i64),
    AsOf(i64),
}

pub struct Reads {
    wallet: Uuid,
    queries: Vec<Query>,
}

impl Reads {
    /// `count` queries, alternating: a sequence in 1..=n, a time in [first, last + step).
    pub fn new(h: &History, count: u64, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let span = (h.n * h.step_us).max(1) as u64;
        let queries = (0..count)
            .map(|i| {
                if i % 2 == 0 {
                    Query::Sequence(1 + rng.below(h.n.max(1) as u64) as i64)
                } else {
                    Query::AsOf(h.at(1) + rng.below(span) as i64)
                }
            })
            .collect();
        Self {
            wallet: h.wallet,
            queries,
        }
    }

    pub fn query(&self, i: u64) -> Option<Query> {
        self.queries.get(i as usize).copied()
    }
}

/// What an answer said.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub i: u64,
    pub status: u16,
    pub wallet: Option<Uuid>,
    pub sequence: Option<i64>,
    pub balance: Option<i64>,
    pub held: Option<i64>,
}

fn cents_of(v: &serde_json::Value) -> Option<i64> {
    let d = match v {
        serde_json::Value::String(s) => Decimal::from_str(s).ok()?,
        serde_json::Value::Number(n) => Decimal::from_str(&n.to_string()).ok()?,
        _ => return None,
    };
    decimal_to_cents(d)
}

pub fn parse_answer(i: u64, status: u16, body: &[u8]) -> Answer {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    Answer {
        i,
        status,
        wallet: v["walletId"].as_str().and_then(|s| Uuid::parse_str(s).ok()),
        sequence: v["sequence"].as_i64(),
        balance: cents_of(&v["balance"]),
        held: cents_of(&v["held"]),
    }
}

impl OpenRequest for Reads {
    type Out = Answer;

    fn path(&self, i: u64) -> String {
        match self.query(i) {
            Some(Query::Sequence(n)) => {
                format!("/api/v1/wallets/{}/balance?sequence={n}", self.wallet)
            }
            Some(Query::AsOf(t)) => format!(
                "/api/v1/wallets/{}/balance?asOf={}",
                self.wallet,
                rfc3339_micros(t)
            ),
            None => format!("/api/v1/wallets/{}/balance", self.wallet),
        }
    }

    fn tag(&self, i: u64) -> Op {
        Op {
            wallet: 0,
            variant: match self.query(i) {
                Some(Query::AsOf(_)) => TAG_AS_OF,
                _ => TAG_SEQUENCE,
            },
        }
    }

    fn keep(&self, i: u64, status: u16, body: &[u8]) -> Option<Answer> {
        Some(parse_answer(i, status, body))
    }
}

/// The row an answer must reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub seq: i64,
    pub balance: i64,
    pub held: i64,
}

/// A query's key (sequence or time) and the row found for it, if any.
type LookupRow = (i64, Option<i64>, Option<Decimal>, Option<Decimal>);

/// For each query, the row PostgreSQL holds for it (None: no operation at or before).
pub async fn expected(
    pool: &PgPool,
    wallet: Uuid,
    queries: &[Query],
) -> anyhow::Result<Vec<Option<Expected>>> {
    let mut seqs = Vec::new();
    let mut times = Vec::new();
    for q in queries {
        match q {
            Query::Sequence(n) => seqs.push(*n),
            Query::AsOf(t) => times.push(*t),
        }
    }
    let by_seq: Vec<LookupRow> = sqlx::query_as(
        "SELECT q.n, o.seq, o.balance_after, o.held_after \
         FROM unnest($2::bigint[]) AS q(n) \
         LEFT JOIN operations o ON o.wallet_id = $1 AND o.seq = q.n",
    )
    .bind(wallet)
    .bind(&seqs)
    .fetch_all(pool)
    .await?;
    // The last operation at or before the moment (index operations_wallet_created_at).
    let by_time: Vec<LookupRow> = sqlx::query_as(
        "SELECT q.us, o.seq, o.balance_after, o.held_after \
         FROM unnest($2::bigint[]) AS q(us) \
         LEFT JOIN LATERAL ( \
             SELECT seq, balance_after, held_after FROM operations \
             WHERE wallet_id = $1 AND created_at <= timestamptz 'epoch' + q.us * interval '1 microsecond' \
             ORDER BY created_at DESC, seq DESC LIMIT 1) o ON true",
    )
    .bind(wallet)
    .bind(&times)
    .fetch_all(pool)
    .await?;
    let to_map = |rows: Vec<LookupRow>| {
        rows.into_iter()
            .map(|(k, seq, b, h)| {
                let e = match (seq, b, h) {
                    (Some(seq), Some(b), Some(h)) => Some(Expected {
                        seq,
                        balance: decimal_to_cents(b).context("balance_after")?,
                        held: decimal_to_cents(h).context("held_after")?,
                    }),
                    _ => None,
                };
                Ok((k, e))
            })
            .collect::<anyhow::Result<std::collections::HashMap<i64, Option<Expected>>>>()
    };
    let by_seq = to_map(by_seq)?;
    let by_time = to_map(by_time)?;
    Ok(queries
        .iter()
        .map(|q| match q {
            Query::Sequence(n) => by_seq.get(n).copied().flatten(),
            Query::AsOf(t) => by_time.get(t).copied().flatten(),
        })
        .collect())
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct BalanceCheck {
    pub ok: bool,
    pub answers: u64,
    /// Answers compared with their row (every 200, and every other answer as a problem).
    pub checked: u64,
    pub matched: u64,
    pub mismatched: u64,
    pub not_200: u64,
    pub problems: Vec<String>,
    pub problems_total: u64,
}

pub fn verify(
    wallet: Uuid,
    reads: &Reads,
    answers: &[Answer],
    expected: &[Option<Expected>],
) -> BalanceCheck {
    let mut p = crate::ledger::Problems::default();
    let mut c = BalanceCheck {
        answers: answers.len() as u64,
        ..BalanceCheck::default()
    };
    for a in answers {
        let (Some(q), Some(e)) = (reads.query(a.i), expected.get(a.i as usize)) else {
            p.push(format!("answer {} to no query", a.i));
            continue;
        };
        c.checked += 1;
        match (a.status, e) {
            (200, Some(e)) => {
                let got = (a.wallet, a.sequence, a.balance, a.held);
                let want = (Some(wallet), Some(e.seq), Some(e.balance), Some(e.held));
                if got == want {
                    c.matched += 1;
                } else {
                    c.mismatched += 1;
                    p.push(format!(
                        "{q:?}: answered wallet/sequence/balance/held {got:?}, the rows say {want:?}"
                    ));
                }
            }
            (404, None) => c.matched += 1,
            (status, e) => {
                c.not_200 += 1;
                p.push(format!("{q:?}: HTTP {status}, the rows say {e:?}"));
            }
        }
    }
    c.ok = p.is_empty() && c.checked > 0;
    if c.checked == 0 {
        p.push("no answer to check".to_owned());
    }
    c.problems = p.list;
    c.problems_total = p.total;
    c
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueryLatency {
    pub requests: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub status_counts: BTreeMap<String, u64>,
}

fn latency(records: &[Record], tag: u8, elapsed: Duration) -> QueryLatency {
    let mine: Vec<Record> = records
        .iter()
        .filter(|r| r.op.variant == tag)
        .copied()
        .collect();
    let s = stats::summarize(&mine, elapsed);
    QueryLatency {
        requests: s.requests,
        p50_ms: s.p50_ms,
        p95_ms: s.p95_ms,
        p99_ms: s.p99_ms,
        max_ms: s.max_ms,
        status_counts: s.status_counts,
    }
}

/// The figures of the balance-at row.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BalanceAtReport {
    pub operations_seeded: i64,
    pub seed_s: f64,
    pub first_operation_at: String,
    pub last_operation_at: String,
    pub step_s: f64,
    pub by_sequence: QueryLatency,
    pub by_as_of: QueryLatency,
    pub target_p99_ms: f64,
    /// Both kinds' p99 at or below the target.
    pub target_met: bool,
    pub cleanup: String,
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<ScenarioResult> {
    let s = ctx.settings.clone();
    let db = ctx
        .db
        .clone()
        .context("balance-at seeds its history with SQL: DATABASE_URL is needed")?;
    anyhow::ensure!(
        s.balance_at_operations >= 1,
        "--balance-at-operations must be at least 1"
    );
    let n = s.balance_at_operations as i64;
    let step_us = i64::try_from(s.balance_at_step.as_micros())
        .unwrap_or(1_000_000)
        .max(1);
    // The history ends a minute ago; the wallet was created one step before it starts.
    let t0_us = now_us() - 60_000_000 - n * step_us;
    let h = History {
        wallet: Uuid::new_v4(),
        n,
        t0_us,
        step_us,
    };
    scenarios::log(&format!(
        "balance-at: seeding wallet {} with {n} operations in PostgreSQL ({} .. {})",
        h.wallet,
        rfc3339_micros(h.at(1)),
        rfc3339_micros(h.at(n))
    ));
    let seeding = Instant::now();
    seed(&db, &ctx.tenant, &h)
        .await
        .context("seeding the history")?;
    let seed_s = scenarios::round1(seeding.elapsed().as_secs_f64());
    scenarios::log(&format!("balance-at: seeded in {seed_s} s"));

    let schedule = Schedule::constant(s.balance_at_rps, s.balance_at_duration);
    let reads = Arc::new(Reads::new(
        &h,
        schedule.total_requests(),
        ctx.load.seed ^ 0xba1a,
    ));
    let cpu_before = scenarios::cpu_now(ctx);
    let start = Instant::now();
    scenarios::log(&format!(
        "running balance-at: {} RPS open loop for {:?}, {} connections",
        s.balance_at_rps, s.balance_at_duration, s.balance_at_connections
    ));
    let (out, answers) = driver::open_get(
        &ctx.load.targets,
        ctx.load.timeout,
        &schedule,
        s.balance_at_connections,
        start,
        reads.clone(),
    )
    .await;
    let cpu_after = scenarios::cpu_now(ctx);
    let mut r = scenarios::base_result(
        ctx,
        "balance-at",
        &out,
        Some(&schedule),
        s.balance_at_connections,
        1,
    );
    scenarios::set_cpu(
        &mut r,
        &cpu_before,
        &cpu_after,
        scenarios::acknowledged(&out.records),
    );
    let by_sequence = latency(&out.records, TAG_SEQUENCE, out.elapsed);
    let by_as_of = latency(&out.records, TAG_AS_OF, out.elapsed);
    let target_met = by_sequence.p99_ms <= TARGET_P99_MS && by_as_of.p99_ms <= TARGET_P99_MS;
    scenarios::log(&format!(
        "balance-at: ?sequence p50 {:.2} ms p99 {:.2} ms, ?asOf p50 {:.2} ms p99 {:.2} ms (target p99 <= {TARGET_P99_MS} ms: {})",
        by_sequence.p50_ms,
        by_sequence.p99_ms,
        by_as_of.p50_ms,
        by_as_of.p99_ms,
        if target_met { "met" } else { "NOT met" }
    ));

    let mut check_ok = None;
    if let Some(pool) = &ctx.pool {
        scenarios::log("checking the balance-at answers against PostgreSQL");
        let queries: Vec<Query> = (0..schedule.total_requests())
            .filter_map(|i| reads.query(i))
            .collect();
        let exp = expected(pool, h.wallet, &queries).await?;
        let c = verify(h.wallet, &reads, &answers, &exp);
        for p in &c.problems {
            scenarios::log(&format!("consistency: {p}"));
        }
        check_ok = Some(c.ok);
        r.consistency_ok = c.ok;
        r.consistency = serde_json::to_value(&c).unwrap_or(serde_json::Value::Null);
    }
    let cleanup = if s.balance_at_keep {
        "kept (--balance-at-keep)".to_owned()
    } else if check_ok == Some(false) {
        "kept for inspection: the check failed".to_owned()
    } else {
        let t = Instant::now();
        match delete(&db, h.wallet).await {
            Ok(()) => format!(
                "the wallet and its {n} operations deleted in {:.1} s",
                t.elapsed().as_secs_f64()
            ),
            Err(e) => format!("deleting them failed: {e}"),
        }
    };
    r.balance_at = Some(BalanceAtReport {
        operations_seeded: n,
        seed_s,
        first_operation_at: rfc3339_micros(h.at(1)),
        last_operation_at: rfc3339_micros(h.at(n)),
        step_s: step_us as f64 / 1e6,
        by_sequence,
        by_as_of,
        target_p99_ms: TARGET_P99_MS,
        target_met,
        cleanup,
    });
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_in_utc_with_microseconds() {
        assert_eq!(rfc3339_micros(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339_micros(1_700_000_000_000_001),
            "2023-11-14T22:13:20.000001Z"
        );
        assert_eq!(
            rfc3339_micros(951_782_400_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
        assert_eq!(rfc3339_micros(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(
            rfc3339_micros(4_102_444_799_999_999),
            "2099-12-31T23:59:59.999999Z"
        );
    }

    fn history() -> History {
        History {
            wallet: Uuid::from_u128(9),
            n: 1000,
            t0_us: 1_700_000_000_000_000,
            step_us: 1_000_000,
        }
    }

    #[test]
    fn queries_alternate_and_stay_within_the_history() {
        let h = history();
        let r = Reads::new(&h, 1000, 3);
        for i in 0..1000 {
            match r.query(i).expect("query") {
                Query::Sequence(n) => {
                    assert_eq!(i % 2, 0);
                    assert!((1..=h.n).contains(&n));
                    assert!(r.path(i).ends_with(&format!("/balance?sequence={n}")));
                    assert_eq!(r.tag(i).variant, TAG_SEQUENCE);
                }
                Query::AsOf(t) => {
                    assert_eq!(i % 2, 1);
                    assert!(t >= h.at(1) && t < h.at(h.n) + h.step_us);
                    assert!(r.path(i).contains("?asOf=2023-11-"), "{}", r.path(i));
                    assert_eq!(r.tag(i).variant, TAG_AS_OF);
                }
            }
        }
    }

    #[test]
    fn answers_are_compared_with_their_rows() {
        let h = history();
        let r = Reads::new(&h, 4, 3);
        let body = |seq: i64| {
            format!(
                r#"{{"walletId":"{}","balance":"12.34","held":"0.00","sequence":{seq},"asOf":"x"}}"#,
                h.wallet
            )
        };
        let e = |seq| {
            Some(Expected {
                seq,
                balance: 1234,
                held: 0,
            })
        };
        let answers: Vec<Answer> = (0..4)
            .map(|i| parse_answer(i, 200, body(i as i64 + 1).as_bytes()))
            .collect();
        let c = verify(h.wallet, &r, &answers, &[e(1), e(2), e(3), e(4)]);
        assert!(c.ok, "{:?}", c.problems);
        assert_eq!((c.checked, c.matched), (4, 4));
        let c = verify(h.wallet, &r, &answers, &[e(1), e(2), e(3), e(5)]);
        assert!(!c.ok);
        assert_eq!(c.mismatched, 1);
        let lost = vec![parse_answer(0, 500, b"")];
        let c = verify(h.wallet, &r, &lost, &[e(1), e(2), e(3), e(4)]);
        assert_eq!((c.ok, c.not_200), (false, 1));
    }
}
