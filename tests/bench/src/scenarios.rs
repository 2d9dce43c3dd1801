//! The scenarios of `make bench`: what load, on which wallets, with which side
//! action (kill a node, sample memory), followed by the consistency check.

use crate::check::{self, CheckReport};
use crate::client::Target;
use crate::cluster;
use crate::engine::{self, LoadConfig, RunOutput, STATUS_ERROR};
use crate::memory::{self, Sampler, Samples};
use crate::report::{Bystander, ManyReport};
use crate::report::{Event, RssSample, ScenarioResult, SecondPointOut, check_json};
use crate::schedule::{Phase, Schedule};
use crate::setup::{self, Numbered};
use crate::slow;
use crate::stats;
use crate::workload::{Mix, Picker, Workload};
use anyhow::Context as _;
use sqlx::PgPool;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const ALL: [&str; 12] = [
    "constant",
    "saturate-one",
    "spike",
    "multi-uniform",
    "multi-zipf",
    "failover",
    "many-wallets",
    "slow-connections",
    "transfers",
    "holds",
    "balance-at",
    "reads",
];
pub const KNOWN: [&str; 13] = [
    "constant",
    "saturate-one",
    "spike",
    "multi-uniform",
    "multi-zipf",
    "failover",
    "many-wallets",
    "slow-connections",
    "transfers",
    "holds",
    "balance-at",
    "reads",
    "soak",
];

/// Balance every single-wallet scenario starts from: large enough that the
/// withdrawals of the mix practically never run out of money.
const SEED_ONE_CENTS: i64 = 100_000_000;

#[derive(Debug, Clone)]
pub struct Settings {
    pub open_connections: usize,
    pub constant_rps: f64,
    pub constant_duration: Duration,
    pub saturate_connections: usize,
    pub saturate_duration: Duration,
    pub spike_low: f64,
    pub spike_high: f64,
    pub spike_phase: Duration,
    pub multi_wallets: usize,
    pub multi_connections: usize,
    pub multi_duration: Duration,
    pub multi_seed_cents: i64,
    pub zipf_exponent: f64,
    pub failover_rps: f64,
    pub failover_duration: Duration,
    pub failover_kill_at: Duration,
    pub failover_restart_after: Duration,
    pub soak_rps: f64,
    pub soak_duration: Duration,
    pub rss_interval: Duration,
    pub mix: Mix,
    pub settle_max: Duration,
    pub many_wallets: usize,
    pub many_connections: usize,
    pub many_duration: Duration,
    pub many_seed_chunk: usize,
    pub many_keep: bool,
    pub slow_connections: usize,
    pub slow_duration: Duration,
    pub slow_target: usize,
    pub slow_trickle: Duration,
    pub slow_kinds: Vec<slow::Kind>,
    /// Requests per second to the nodes' trivial endpoint beside open-loop scenarios.
    pub baseline_rps: f64,
    pub bystander_rps: f64,
    pub bystander_wallets: usize,
    pub bystander_connections: usize,
    pub memory_interval: Duration,
    pub memory_limit: Option<String>,
    pub transfers_wallets: usize,
    pub transfers_connections: usize,
    pub transfers_duration: Duration,
    /// Longest wait after the load for no transfer to stay PENDING.
    pub transfers_pending_wait: Duration,
    pub holds_connections: usize,
    pub holds_duration: Duration,
    pub balance_at_operations: usize,
    /// Time between two seeded operations.
    pub balance_at_step: Duration,
    pub balance_at_rps: f64,
    pub balance_at_duration: Duration,
    pub balance_at_connections: usize,
    pub balance_at_keep: bool,
    pub reads_connections: usize,
    pub reads_wallets: usize,
    pub reads_duration: Duration,
    /// Read-your-writes: one connection (and one wallet) each.
    pub reads_ryw_connections: usize,
    pub reads_ryw_duration: Duration,
}

pub struct Ctx {
    pub load: LoadConfig,
    pub admin: Vec<Arc<Target>>,
    /// For the consistency check; None with --no-check.
    pub pool: Option<PgPool>,
    /// The cluster's database whenever DATABASE_URL is set (many-wallets seeds with it).
    pub db: Option<PgPool>,
    /// Tenant of the API token: wallets seeded with SQL must belong to it.
    pub tenant: String,
    pub root: PathBuf,
    pub settings: Settings,
    /// Wallets of the multi scenarios, created once and shared by both rows.
    pub multi_wallets: Option<Vec<Uuid>>,
    /// saturate-one's operations/s in this run: what holds compares itself with.
    pub saturate_one_rps: Option<f64>,
}

enum Shape {
    Open {
        schedule: Schedule,
        connections: usize,
    },
    Closed {
        connections: usize,
        duration: Duration,
    },
}

type Events = Arc<Mutex<Vec<Event>>>;

pub(crate) fn push_event(events: &Events, start: Instant, what: String) {
    log(&what);
    events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Event {
            t_s: (start.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            what,
        });
}

pub(crate) fn log(msg: &str) {
    eprintln!("[wallet-bench] {msg}");
}

async fn kill_and_restart(
    ctx_admin: Vec<Arc<Target>>,
    root: PathBuf,
    wallet: Uuid,
    kill_at: Duration,
    restart_after: Duration,
    start: Instant,
    events: Events,
) -> anyhow::Result<()> {
    tokio::time::sleep_until((start + kill_at).into()).await;
    let owner = cluster::owner_of(&ctx_admin, wallet).await?;
    let index = cluster::node_index(&owner)?;
    let pid = cluster::read_pid(&root, index)?;
    cluster::kill9(pid).await?;
    push_event(
        &events,
        start,
        format!("kill -9 {owner} (pid {pid}, owner of the wallet)"),
    );
    tokio::time::sleep(restart_after).await;
    push_event(&events, start, format!("start-node {index}"));
    cluster::start_node(&root, index).await?;
    push_event(&events, start, format!("{owner} started"));
    Ok(())
}

async fn sample_rss(
    root: PathBuf,
    interval: Duration,
    start: Instant,
    samples: Arc<Mutex<Vec<RssSample>>>,
) {
    loop {
        let t_s = start.elapsed().as_secs_f64().round();
        for (node, pid) in cluster::node_pids(&root) {
            if let Some(rss_bytes) = cluster::rss_bytes(pid) {
                samples
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(RssSample {
                        t_s,
                        node,
                        rss_bytes,
                        open_fds: None,
                    });
            }
        }
        tokio::time::sleep(interval).await;
    }
}

pub(crate) fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// CPU seconds so far of this process, of the nodes and of PostgreSQL's processes.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct CpuSample {
    pub generator: f64,
    pub nodes: Option<f64>,
    pub node_pids: Vec<u32>,
    pub postgres: HashMap<u32, f64>,
}

pub(crate) fn cpu_now(ctx: &Ctx) -> CpuSample {
    let generator = cluster::cpu_seconds(std::process::id()).unwrap_or(0.0);
    let node_pids: Vec<u32> = cluster::node_pids(&ctx.root)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let nodes: Option<f64> = node_pids.iter().map(|p| cluster::cpu_seconds(*p)).sum();
    CpuSample {
        generator,
        nodes: if node_pids.is_empty() { None } else { nodes },
        node_pids,
        postgres: cluster::postgres_cpu(),
    }
}

/// Requests answered 2xx or 409: the operations the service acknowledged.
pub(crate) fn acknowledged(records: &[engine::Record]) -> u64 {
    records
        .iter()
        .filter(|r| (200..300).contains(&r.status) || r.status == 409)
        .count() as u64
}

/// CPU microseconds per acknowledged operation; None without a measurement or an operation.
pub(crate) fn us_per_op(cpu_s: Option<f64>, ops: u64) -> Option<f64> {
    let cpu_s = cpu_s?;
    (ops > 0).then(|| round1(cpu_s * 1e6 / ops as f64))
}

pub async fn run(ctx: &mut Ctx, name: &str) -> anyhow::Result<ScenarioResult> {
    match name {
        "many-wallets" => return many_wallets(ctx).await,
        "slow-connections" => return slow_connections(ctx).await,
        "transfers" => return crate::transfers::run(ctx).await,
        "holds" => return crate::holds::run(ctx).await,
        "balance-at" => return crate::balance_at::run(ctx).await,
        "reads" => return crate::reads::run(ctx).await,
        _ => {}
    }
    let s = ctx.settings.clone();
    let wallets = match name {
        "multi-uniform" | "multi-zipf" => match &ctx.multi_wallets {
            Some(w) => w.clone(),
            None => {
                log(&format!("creating {} wallets", s.multi_wallets));
                let w = setup::create_wallets(
                    &ctx.load.targets,
                    s.multi_wallets,
                    s.multi_seed_cents,
                    64,
                    ctx.load.timeout,
                )
                .await?;
                ctx.multi_wallets = Some(w.clone());
                w
            }
        },
        _ => {
            setup::create_wallets(&ctx.load.targets, 1, SEED_ONE_CENTS, 1, ctx.load.timeout).await?
        }
    };
    let picker = if name == "multi-zipf" {
        Picker::zipf(wallets.len(), s.zipf_exponent)
    } else {
        Picker::Uniform
    };
    let shape = match name {
        "constant" => Shape::Open {
            schedule: Schedule::constant(s.constant_rps, s.constant_duration),
            connections: s.open_connections,
        },
        "saturate-one" => Shape::Closed {
            connections: s.saturate_connections,
            duration: s.saturate_duration,
        },
        "spike" => Shape::Open {
            schedule: Schedule::new(vec![
                Phase {
                    rps: s.spike_low,
                    duration: s.spike_phase,
                },
                Phase {
                    rps: s.spike_high,
                    duration: s.spike_phase,
                },
                Phase {
                    rps: s.spike_low,
                    duration: s.spike_phase,
                },
            ]),
            connections: s.open_connections,
        },
        "multi-uniform" | "multi-zipf" => Shape::Closed {
            connections: s.multi_connections,
            duration: s.multi_duration,
        },
        "failover" => Shape::Open {
            schedule: Schedule::constant(s.failover_rps, s.failover_duration),
            connections: s.open_connections,
        },
        "soak" => Shape::Open {
            schedule: Schedule::constant(s.soak_rps, s.soak_duration),
            connections: s.open_connections,
        },
        other => anyhow::bail!("unknown scenario {other:?} (known: {})", KNOWN.join(", ")),
    };
    let workload = Arc::new(Workload::new(wallets.clone(), picker, s.mix.clone()));

    let before = match &ctx.pool {
        Some(pool) => Some(
            check::snapshot(pool, &wallets)
                .await
                .context("snapshot before the run")?,
        ),
        None => None,
    };

    // At the constant rate, a consumer of the wallet's event stream measures event lag.
    let lag_probe = if name == "constant" {
        match crate::event_lag::start(ctx.load.targets[0].clone(), wallets[0]).await {
            Ok(probe) => probe,
            Err(e) => {
                eprintln!("[bench] EVENT LAG NOT MEASURED: opening the event stream failed: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let events: Events = Arc::default();
    let rss: Arc<Mutex<Vec<RssSample>>> = Arc::default();
    let cpu_before = cpu_now(ctx);
    let start = Instant::now();
    // Open-loop scenarios measure latency: the nodes' trivial endpoint runs beside them.
    let baseline_probe = match (&shape, s.baseline_rps > 0.0) {
        (Shape::Open { schedule, .. }, true) => crate::baseline::start(
            &ctx.admin,
            s.baseline_rps,
            schedule.total_duration(),
            start,
            ctx.load.timeout,
        ),
        _ => None,
    };
    let killer = (name == "failover").then(|| {
        tokio::spawn(kill_and_restart(
            ctx.admin.clone(),
            ctx.root.clone(),
            wallets[0],
            s.failover_kill_at,
            s.failover_restart_after,
            start,
            events.clone(),
        ))
    });
    let sampler = (name == "soak").then(|| {
        tokio::spawn(sample_rss(
            ctx.root.clone(),
            s.rss_interval,
            start,
            rss.clone(),
        ))
    });

    log(&format!("running {name}"));
    let (out, offered, connections): (RunOutput, Option<&Schedule>, usize) = match &shape {
        Shape::Open {
            schedule,
            connections,
        } => (
            engine::open_loop(&ctx.load, workload.clone(), schedule, *connections, start).await,
            Some(schedule),
            *connections,
        ),
        Shape::Closed {
            connections,
            duration,
        } => (
            engine::closed_loop(&ctx.load, workload.clone(), *connections, *duration, start).await,
            None,
            *connections,
        ),
    };
    let cpu_after = cpu_now(ctx);
    let baseline = match baseline_probe {
        Some(probe) => Some(probe.finish().await),
        None => None,
    };
    // A failover run in which nothing was killed proves nothing: it must fail.
    let mut action_ok = true;
    if let Some(k) = killer {
        let failure = match k.await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("failover action failed: {e:#}")),
            Err(e) => Some(format!("failover action panicked: {e}")),
        };
        if let Some(f) = failure {
            push_event(&events, start, f);
            action_ok = false;
        }
    }
    if let Some(h) = sampler {
        h.abort();
    }

    let consistency = match (&ctx.pool, before) {
        (Some(pool), Some(before)) => {
            Some(verify(pool, &wallets, &before, &out, s.settle_max).await?)
        }
        _ => None,
    };
    let summary = stats::summarize(&out.records, out.elapsed);
    let event_lag = match lag_probe {
        Some(probe) => {
            // Every 200 and 409 is a committed operation, so an event.
            let committed = ["200", "409"]
                .iter()
                .filter_map(|status| summary.status_counts.get(*status))
                .sum();
            Some(probe.finish(committed, Duration::from_secs(10)).await)
        }
        None => None,
    };
    if name == "saturate-one" {
        ctx.saturate_one_rps = Some(summary.achieved_rps);
    }
    let series = stats::series(&out.records)
        .iter()
        .map(|p| SecondPointOut::from(p, offered.map(|sch| sch.rps_at(Duration::from_secs(p.t_s)))))
        .collect();
    let events = std::mem::take(&mut *events.lock().unwrap_or_else(|p| p.into_inner()));
    let rss_samples = std::mem::take(&mut *rss.lock().unwrap_or_else(|p| p.into_inner()));
    let mut r = ScenarioResult {
        scenario: if ctx.load.idempotency_prefix.is_some() {
            format!("{name}-idem")
        } else {
            name.to_owned()
        },
        offered_rps: offered.map(|sch| (sch.offered_rps() * 10.0).round() / 10.0),
        achieved_rps: summary.achieved_rps,
        p50_ms: summary.p50_ms,
        p95_ms: summary.p95_ms,
        p99_ms: summary.p99_ms,
        max_ms: summary.max_ms,
        status_counts: summary.status_counts,
        consistency_ok: consistency.as_ref().is_some_and(|c| c.ok),
        duration_s: (out.elapsed.as_secs_f64() * 10.0).round() / 10.0,
        requests: summary.requests,
        p999_ms: summary.p999_ms,
        mean_ms: summary.mean_ms,
        longest_gap_ms: summary.longest_gap_ms,
        action_ok,
        generator_cpu_s: 0.0,
        nodes_cpu_s: None,
        postgres_cpu_s: None,
        acknowledged_ops: 0,
        node_cpu_us_per_op: None,
        postgres_cpu_us_per_op: None,
        connections,
        wallets: wallets.len(),
        targets: ctx.load.targets.iter().map(|t| t.base.clone()).collect(),
        reroutes: out.reroutes,
        retries: out.retries,
        consistency: check_json(consistency.as_ref()),
        events,
        rss_samples,
        series,
        memory: None,
        bystander: None,
        many: None,
        slow: None,
        transfers: None,
        holds: None,
        balance_at: None,
        reads: None,
        event_lag,
        baseline,
    };
    set_cpu(&mut r, &cpu_before, &cpu_after, acknowledged(&out.records));
    Ok(r)
}

async fn verify(
    pool: &PgPool,
    wallets: &[Uuid],
    before: &std::collections::HashMap<Uuid, check::WalletState>,
    out: &RunOutput,
    settle_max: Duration,
) -> anyhow::Result<CheckReport> {
    let unknown = out
        .records
        .iter()
        .any(|r| r.status == STATUS_ERROR || r.status >= 500);
    if unknown {
        // Answers the client gave up on may still commit until the server's deadline.
        check::settle(pool, wallets, Duration::from_secs(1), settle_max).await?;
    }
    let after = check::snapshot(pool, wallets)
        .await
        .context("snapshot after the run")?;
    let rows = check::rows_since(pool, before)
        .await
        .context("reading the audit trail")?;
    let report = check::verify(wallets, before, &after, &rows, &out.records);
    if !report.ok {
        for p in &report.problems {
            log(&format!("consistency: {p}"));
        }
    }
    Ok(report)
}

/// The other clients' load: created before the scenario starts, run beside it.
struct BystanderPlan {
    cfg: LoadConfig,
    workload: Arc<Workload>,
    before: Option<HashMap<Uuid, check::WalletState>>,
    schedule: Schedule,
    connections: usize,
}

async fn plan_bystander(
    ctx: &Ctx,
    targets: Vec<Arc<Target>>,
    max: Duration,
) -> anyhow::Result<BystanderPlan> {
    let s = &ctx.settings;
    let wallets = setup::create_wallets(
        &ctx.load.targets,
        s.bystander_wallets.max(1),
        SEED_ONE_CENTS,
        s.bystander_wallets.max(1),
        ctx.load.timeout,
    )
    .await
    .context("creating the other clients' wallets")?;
    let before = match &ctx.pool {
        Some(pool) => Some(check::snapshot(pool, &wallets).await?),
        None => None,
    };
    Ok(BystanderPlan {
        cfg: LoadConfig {
            targets,
            timeout: ctx.load.timeout,
            seed: ctx.load.seed ^ 0x00b5_7a4d,
            idempotency_prefix: ctx
                .load
                .idempotency_prefix
                .as_ref()
                .map(|p| format!("{p}-b")),
        },
        workload: Arc::new(Workload::new(wallets, Picker::Uniform, s.mix.clone())),
        before,
        schedule: Schedule::constant(s.bystander_rps, max),
        connections: s.bystander_connections.max(1),
    })
}

async fn bystander_report(
    ctx: &Ctx,
    plan: &BystanderPlan,
    out: &RunOutput,
) -> anyhow::Result<(Bystander, Option<CheckReport>)> {
    let check = match (&ctx.pool, &plan.before) {
        (Some(pool), Some(before)) => Some(
            verify(
                pool,
                plan.workload.wallets(),
                before,
                out,
                ctx.settings.settle_max,
            )
            .await?,
        ),
        _ => None,
    };
    let sum = stats::summarize(&out.records, out.elapsed);
    let rps = plan.schedule.rps_at(Duration::ZERO);
    Ok((
        Bystander {
            targets: plan.cfg.targets.iter().map(|t| t.base.clone()).collect(),
            wallets: plan.workload.wallets().len(),
            offered_rps: rps,
            connections: plan.connections,
            requests: sum.requests,
            achieved_rps: sum.achieved_rps,
            p50_ms: sum.p50_ms,
            p95_ms: sum.p95_ms,
            p99_ms: sum.p99_ms,
            p999_ms: sum.p999_ms,
            max_ms: sum.max_ms,
            longest_gap_ms: sum.longest_gap_ms,
            status_counts: sum.status_counts,
            consistency_ok: check.as_ref().map(|c| c.ok),
            series: stats::series(&out.records)
                .iter()
                .map(|p| SecondPointOut::from(p, Some(rps)))
                .collect(),
        },
        check,
    ))
}

fn start_sampler(
    ctx: &Ctx,
    start: Instant,
) -> (Arc<Mutex<Samples>>, tokio::task::JoinHandle<()>, Sampler) {
    let samples: Arc<Mutex<Samples>> = Arc::default();
    let make = || Sampler {
        admin: ctx.admin.clone(),
        root: ctx.root.clone(),
        interval: ctx.settings.memory_interval,
    };
    let handle = tokio::spawn(make().run(start, samples.clone()));
    (samples, handle, make())
}

async fn stop_sampler(
    ctx: &Ctx,
    start: Instant,
    samples: &Mutex<Samples>,
    handle: tokio::task::JoinHandle<()>,
    sampler: &Sampler,
) -> (Vec<RssSample>, memory::MemoryReport) {
    handle.abort();
    sampler.final_sample(start, samples).await;
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    let limit = memory::memory_limit(&ctx.root, ctx.settings.memory_limit.as_deref());
    let report = memory::summarize(&samples, ctx.settings.memory_interval, limit);
    (samples.rss, report)
}

/// The fields every scenario fills the same way from its main load.
pub(crate) fn base_result(
    ctx: &Ctx,
    name: &str,
    out: &RunOutput,
    offered: Option<&Schedule>,
    connections: usize,
    wallets: usize,
) -> ScenarioResult {
    let summary = stats::summarize(&out.records, out.elapsed);
    ScenarioResult {
        scenario: name.to_owned(),
        offered_rps: offered.map(|sch| round1(sch.offered_rps())),
        achieved_rps: summary.achieved_rps,
        p50_ms: summary.p50_ms,
        p95_ms: summary.p95_ms,
        p99_ms: summary.p99_ms,
        max_ms: summary.max_ms,
        status_counts: summary.status_counts,
        consistency_ok: false,
        duration_s: round1(out.elapsed.as_secs_f64()),
        requests: summary.requests,
        p999_ms: summary.p999_ms,
        mean_ms: summary.mean_ms,
        longest_gap_ms: summary.longest_gap_ms,
        action_ok: true,
        generator_cpu_s: 0.0,
        nodes_cpu_s: None,
        postgres_cpu_s: None,
        acknowledged_ops: 0,
        node_cpu_us_per_op: None,
        postgres_cpu_us_per_op: None,
        connections,
        wallets,
        targets: ctx.load.targets.iter().map(|t| t.base.clone()).collect(),
        reroutes: out.reroutes,
        retries: out.retries,
        consistency: check_json(None),
        events: Vec::new(),
        rss_samples: Vec::new(),
        series: stats::series(&out.records)
            .iter()
            .map(|p| {
                SecondPointOut::from(p, offered.map(|sch| sch.rps_at(Duration::from_secs(p.t_s))))
            })
            .collect(),
        memory: None,
        bystander: None,
        many: None,
        slow: None,
        transfers: None,
        holds: None,
        balance_at: None,
        reads: None,
        event_lag: None,
        baseline: None,
    }
}

/// The CPU fields of `r` from two samples around a load that got `acknowledged`
/// operations acknowledged; per operation from the unrounded seconds.
pub(crate) fn set_cpu(
    r: &mut ScenarioResult,
    before: &CpuSample,
    after: &CpuSample,
    acknowledged: u64,
) {
    r.generator_cpu_s = round1(after.generator - before.generator);
    // A node restarted during the load has a new pid: only compare like with like.
    let nodes = match (before.nodes, after.nodes) {
        (Some(b), Some(a)) if before.node_pids == after.node_pids => Some(a - b),
        _ => None,
    };
    let postgres = cluster::cpu_between(&before.postgres, &after.postgres);
    r.nodes_cpu_s = nodes.map(round1);
    r.postgres_cpu_s = postgres.map(round1);
    r.acknowledged_ops = acknowledged;
    r.node_cpu_us_per_op = us_per_op(nodes, acknowledged);
    r.postgres_cpu_us_per_op = us_per_op(postgres, acknowledged);
}

/// Consistency of the main load and of the other clients' together.
fn set_consistency(r: &mut ScenarioResult, main: Option<CheckReport>, other: Option<CheckReport>) {
    let checks: Vec<(&str, CheckReport)> = [("main", main), ("other_clients", other)]
        .into_iter()
        .filter_map(|(k, c)| c.map(|c| (k, c)))
        .collect();
    if checks.is_empty() {
        r.consistency_ok = false;
        r.consistency = check_json(None);
        return;
    }
    r.consistency_ok = checks.iter().all(|(_, c)| c.ok);
    let problems: Vec<String> = checks
        .iter()
        .flat_map(|(k, c)| c.problems.iter().map(move |p| format!("{k}: {p}")))
        .collect();
    let mut obj = serde_json::Map::new();
    obj.insert("ok".to_owned(), r.consistency_ok.into());
    obj.insert("problems".to_owned(), problems.into());
    for (k, c) in &checks {
        obj.insert((*k).to_owned(), check_json(Some(c)));
    }
    r.consistency = serde_json::Value::Object(obj);
}

/// many-wallets: a million (by default) wallets seeded with SQL, then one DEPOSIT
/// each through the API, while node memory is sampled and other clients keep
/// sending a small constant load. Shows how far the nodes' wallet cache grows.
async fn many_wallets(ctx: &mut Ctx) -> anyhow::Result<ScenarioResult> {
    let s = ctx.settings.clone();
    let db = ctx
        .db
        .clone()
        .context("many-wallets seeds its wallets with SQL: DATABASE_URL is needed")?;
    let numbered = Numbered::new(s.many_wallets);
    log(&format!(
        "seeding {} wallets with SQL ({} per statement)",
        s.many_wallets, s.many_seed_chunk
    ));
    let seeding = Instant::now();
    setup::seed_numbered(&db, &ctx.tenant, &numbered, s.many_seed_chunk)
        .await
        .context("seeding the wallets")?;
    let seed_s = round1(seeding.elapsed().as_secs_f64());
    let workload = Arc::new(Workload::new(
        numbered.ids(),
        Picker::EachOnce,
        Mix {
            deposit_ratio: 1.0,
            reject_ratio: 0.0,
        },
    ));
    let plan = plan_bystander(ctx, ctx.load.targets.clone(), s.many_duration).await?;

    let events: Events = Arc::default();
    let cpu_before = cpu_now(ctx);
    let start = Instant::now();
    push_event(
        &events,
        start,
        format!(
            "{} wallets seeded in {seed_s} s; one DEPOSIT each begins",
            numbered.n
        ),
    );
    let (samples, sampler_task, sampler) = start_sampler(ctx, start);
    let until = CancellationToken::new();
    let others = {
        let (cfg, wl, sch, conns, until) = (
            plan.cfg.clone(),
            plan.workload.clone(),
            plan.schedule.clone(),
            plan.connections,
            until.clone(),
        );
        tokio::spawn(
            async move { engine::open_loop_until(&cfg, wl, &sch, conns, start, until).await },
        )
    };
    log(&format!(
        "running many-wallets: {} wallets, {} connections, at most {:?}",
        numbered.n, s.many_connections, s.many_duration
    ));
    let out = engine::closed_loop(
        &ctx.load,
        workload.clone(),
        s.many_connections,
        s.many_duration,
        start,
    )
    .await;
    until.cancel();
    let sent = out.records.len() as u64;
    let touched = out
        .records
        .iter()
        .filter(|r| (200..300).contains(&r.status))
        .count() as u64;
    let stopped_by = if sent >= numbered.n as u64 {
        "every wallet was sent its DEPOSIT"
    } else {
        "the duration (--many-duration) was reached"
    };
    push_event(
        &events,
        start,
        format!("{touched} wallets touched; {stopped_by}"),
    );
    let other_out = others.await.context("the other clients' load panicked")?;
    let cpu_after = cpu_now(ctx);
    let (rss, mem) = stop_sampler(ctx, start, &samples, sampler_task, &sampler).await;

    let (main_check, check_note) = match &ctx.pool {
        Some(pool) => {
            log("checking the many-wallets run against PostgreSQL");
            let c =
                verify_numbered(pool, &numbered, workload.wallets(), &out, s.settle_max).await?;
            let note = format!(
                "every one of the {} wallets (id range scan): {}",
                numbered.n,
                if c.ok { "consistent" } else { "INCONSISTENT" }
            );
            (Some(c), note)
        }
        None => (None, "skipped (--no-check)".to_owned()),
    };
    let (by, by_check) = bystander_report(ctx, &plan, &other_out).await?;
    let cleanup = if s.many_keep {
        "kept (--many-keep)".to_owned()
    } else if main_check.as_ref().is_some_and(|c| !c.ok) {
        "kept for inspection: the check failed".to_owned()
    } else {
        let t = Instant::now();
        match setup::delete_numbered(&db, &numbered, s.many_seed_chunk).await {
            Ok(()) => format!(
                "the {} wallets and their audit rows deleted in {:.1} s",
                numbered.n,
                t.elapsed().as_secs_f64()
            ),
            Err(e) => format!("deleting them failed: {e}"),
        }
    };
    let mut r = base_result(
        ctx,
        "many-wallets",
        &out,
        None,
        s.many_connections,
        numbered.n,
    );
    // The CPU window covers the other clients' load too: their operations count.
    let ops = acknowledged(&out.records) + acknowledged(&other_out.records);
    set_cpu(&mut r, &cpu_before, &cpu_after, ops);
    set_consistency(&mut r, main_check, by_check);
    let growth: u64 = mem
        .nodes
        .iter()
        .map(|n| n.peak_bytes.saturating_sub(n.first_bytes))
        .sum();
    let bytes_per = (touched > 0 && growth > 0).then(|| (growth as f64 / touched as f64).round());
    let to_limit = match (bytes_per, mem.limit_bytes, mem.nodes.len()) {
        (Some(b), Some(limit), n) if n > 0 => {
            let first_avg = mem.nodes.iter().map(|n| n.first_bytes as f64).sum::<f64>() / n as f64;
            // Each node caches about 1/n of the touched wallets.
            Some(((limit as f64 - first_avg).max(0.0) * n as f64 / b) as u64)
        }
        _ => None,
    };
    r.many = Some(ManyReport {
        wallets_seeded: numbered.n as u64,
        wallets_touched: touched,
        wallets_sent: sent,
        seed_s,
        stopped_by: stopped_by.to_owned(),
        check: check_note,
        cleanup,
        bytes_per_touched_wallet: bytes_per,
        touched_wallets_to_limit: to_limit,
    });
    r.memory = Some(mem);
    r.rss_samples = rss;
    r.bystander = Some(by);
    r.events = std::mem::take(&mut *events.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(r)
}

/// The check of many-wallets: every wallet started at balance 0, version 0, so the
/// snapshot before is known without a query, and the rows are read by id range.
async fn verify_numbered(
    pool: &PgPool,
    numbered: &Numbered,
    wallets: &[Uuid],
    out: &RunOutput,
    settle_max: Duration,
) -> anyhow::Result<CheckReport> {
    let (lo, hi) = numbered.range();
    if out
        .records
        .iter()
        .any(|r| r.status == STATUS_ERROR || r.status >= 500)
    {
        check::settle_range(pool, lo, hi, Duration::from_secs(1), settle_max).await?;
    }
    let before: HashMap<Uuid, check::WalletState> = wallets
        .iter()
        .map(|w| {
            (
                *w,
                check::WalletState {
                    balance_cents: 0,
                    version: 0,
                },
            )
        })
        .collect();
    let after = check::snapshot_range(pool, lo, hi)
        .await
        .context("snapshot after the run")?;
    let rows = check::rows_in_range(pool, lo, hi, &before)
        .await
        .context("reading the audit trail")?;
    let report = check::verify(wallets, &before, &after, &rows, &out.records);
    for p in &report.problems {
        log(&format!("consistency: {p}"));
    }
    Ok(report)
}

/// slow-connections: thousands of connections to one node's public port that
/// never finish a request, while other clients send a small constant load to
/// that same node. Counts what the node kept open and what it closed, and when.
async fn slow_connections(ctx: &mut Ctx) -> anyhow::Result<ScenarioResult> {
    let s = ctx.settings.clone();
    let target = ctx
        .load
        .targets
        .get(s.slow_target)
        .cloned()
        .with_context(|| {
            format!(
                "--slow-target {} but only {} URLs",
                s.slow_target,
                ctx.load.targets.len()
            )
        })?;
    let (nofile_before, nofile, nofile_hard) = slow::raise_nofile();
    log(&format!(
        "open-files limit: soft {nofile_before:?} raised to {nofile:?} (hard {nofile_hard:?})"
    ));
    let plan = plan_bystander(ctx, vec![target.clone()], s.slow_duration).await?;
    let slow_cfg = slow::Config {
        addr: target.addr.clone(),
        host: target.base.trim_start_matches("http://").to_owned(),
        authorization: target.authorization().map(str::to_owned),
        connections: s.slow_connections,
        kinds: s.slow_kinds.clone(),
        trickle: s.slow_trickle,
        duration: s.slow_duration,
    };

    let events: Events = Arc::default();
    let cpu_before = cpu_now(ctx);
    let start = Instant::now();
    let (samples, sampler_task, sampler) = start_sampler(ctx, start);
    let series: Arc<Mutex<Vec<(f64, u64)>>> = Arc::default();
    let holder = tokio::spawn(slow::run(slow_cfg.clone(), start, series.clone()));
    log(&format!(
        "running slow-connections: {} connections to {} for {:?}",
        s.slow_connections, target.base, s.slow_duration
    ));
    let out = engine::open_loop(
        &plan.cfg,
        plan.workload.clone(),
        &plan.schedule,
        plan.connections,
        start,
    )
    .await;
    let outcomes = holder.await.context("the slow connections panicked")?;
    let cpu_after = cpu_now(ctx);
    let (rss, mem) = stop_sampler(ctx, start, &samples, sampler_task, &sampler).await;
    let series = std::mem::take(&mut *series.lock().unwrap_or_else(|p| p.into_inner()));
    let mut report = slow::summarize(&slow_cfg, &outcomes, series);
    report.bench_nofile_before = nofile_before;
    report.bench_nofile = nofile;
    report.bench_nofile_hard = nofile_hard;
    {
        let mut ev = events.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = report.all_opened_by_s {
            ev.push(Event {
                t_s: round1(t),
                what: format!("{} slow connections opened", report.opened),
            });
        }
        if let Some(t) = outcomes.iter().filter_map(|o| o.closed_s).reduce(f64::min) {
            ev.push(Event {
                t_s: round1(t),
                what: "the node closes a first slow connection".to_owned(),
            });
        }
        ev.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    }
    let (by, by_check) = bystander_report(ctx, &plan, &out).await?;
    let mut r = base_result(
        ctx,
        "slow-connections",
        &out,
        Some(&plan.schedule),
        plan.connections,
        plan.workload.wallets().len(),
    );
    r.targets = vec![target.base.clone()];
    // The slow connections carry no operation: only the other clients' load counts.
    set_cpu(&mut r, &cpu_before, &cpu_after, acknowledged(&out.records));
    set_consistency(&mut r, None, by_check);
    r.slow = Some(report);
    r.memory = Some(mem);
    r.rss_samples = rss;
    r.bystander = Some(by);
    r.events = std::mem::take(&mut *events.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(r)
}

/// The smoke rule: outside the failover scenario, no 5xx and no request without
/// an answer is acceptable.
pub fn strict_violations(r: &ScenarioResult) -> Vec<String> {
    if r.scenario.starts_with("failover") {
        return Vec::new();
    }
    r.status_counts
        .iter()
        .filter(|(k, _)| k.as_str() == "error" || k.as_str() == "refused" || k.starts_with('5'))
        .map(|(k, v)| format!("{}: {v} answers of status {k}", r.scenario))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn cpu_per_operation_is_microseconds_over_acknowledged_operations() {
        assert_eq!(us_per_op(Some(2.0), 59_600), Some(33.6));
        assert_eq!(us_per_op(Some(0.5), 1), Some(500_000.0));
        assert_eq!(us_per_op(Some(0.0), 10), Some(0.0));
        assert_eq!(us_per_op(None, 10), None);
        assert_eq!(us_per_op(Some(1.0), 0), None);
    }

    #[test]
    fn acknowledged_operations_are_2xx_and_409() {
        let rec = |status| engine::Record {
            sched_us: 0,
            latency_us: 1,
            status,
            op: crate::workload::Op {
                wallet: 0,
                variant: 0,
            },
            op_id: None,
        };
        let records: Vec<engine::Record> = [200, 201, 409, 404, 422, 500, 503, STATUS_ERROR, 1]
            .into_iter()
            .map(rec)
            .collect();
        assert_eq!(acknowledged(&records), 3);
    }

    fn result() -> ScenarioResult {
        serde_json::from_value(serde_json::json!({
            "scenario": "constant", "offered_rps": 200.0, "achieved_rps": 200.0, "p50_ms": 1.0, "p95_ms": 1.0,
            "p99_ms": 1.0, "max_ms": 1.0, "status_counts": {"200": 990, "409": 10}, "consistency_ok": true,
            "duration_s": 5.0, "requests": 1000, "action_ok": true, "p999_ms": 1.0, "mean_ms": 1.0, "connections": 8, "wallets": 1,
            "targets": [], "reroutes": 0, "consistency": null, "events": [], "rss_samples": [], "series": []
        }))
        .expect("result")
    }

    #[test]
    fn cpu_fields_come_from_two_samples() {
        let before = CpuSample {
            generator: 10.0,
            nodes: Some(100.0),
            node_pids: vec![11, 12],
            postgres: HashMap::from([(1, 5.0), (2, 1.0)]),
        };
        let after = CpuSample {
            generator: 10.47,
            nodes: Some(100.123),
            node_pids: vec![11, 12],
            postgres: HashMap::from([(1, 5.04), (2, 1.0), (3, 0.02)]),
        };
        let mut r = result();
        set_cpu(&mut r, &before, &after, 1000);
        assert_eq!(r.generator_cpu_s, 0.5);
        assert_eq!((r.nodes_cpu_s, r.postgres_cpu_s), (Some(0.1), Some(0.1)));
        assert_eq!(r.acknowledged_ops, 1000);
        // From the unrounded seconds: 0.123 s and 0.06 s over 1000 operations.
        assert_eq!(r.node_cpu_us_per_op, Some(123.0));
        assert_eq!(r.postgres_cpu_us_per_op, Some(60.0));

        // A restarted node (new pid) or no PostgreSQL in sight: not measured.
        let restarted = CpuSample {
            node_pids: vec![11, 13],
            postgres: HashMap::new(),
            ..after.clone()
        };
        set_cpu(&mut r, &before, &restarted, 1000);
        assert_eq!((r.nodes_cpu_s, r.node_cpu_us_per_op), (None, None));
        assert_eq!((r.postgres_cpu_s, r.postgres_cpu_us_per_op), (None, None));
        set_cpu(&mut r, &CpuSample::default(), &CpuSample::default(), 1000);
        assert_eq!(r.node_cpu_us_per_op, None);
    }

    #[test]
    fn strict_mode_flags_server_errors_outside_failover() {
        let mut r: ScenarioResult = serde_json::from_value(serde_json::json!({
            "scenario": "constant", "offered_rps": 200.0, "achieved_rps": 200.0, "p50_ms": 1.0, "p95_ms": 1.0,
            "p99_ms": 1.0, "max_ms": 1.0, "status_counts": {"200": 990, "409": 10}, "consistency_ok": true,
            "duration_s": 5.0, "requests": 1000, "action_ok": true, "p999_ms": 1.0, "mean_ms": 1.0, "connections": 8, "wallets": 1,
            "targets": [], "reroutes": 0, "consistency": null, "events": [], "rss_samples": [], "series": []
        }))
        .expect("result");
        assert!(strict_violations(&r).is_empty());
        r.status_counts =
            BTreeMap::from([("200".into(), 990), ("503".into(), 1), ("error".into(), 2)]);
        assert_eq!(strict_violations(&r).len(), 2);
        r.scenario = "failover".into();
        assert!(strict_violations(&r).is_empty());
    }
}

#[cfg(test)]
mod failover_tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kills_the_owner_by_pid_and_restarts_it_with_the_cluster_script() {
        // A fake cluster: the admin API says node-0 owns everything, node-0 is a
        // `sleep`, and scripts/cluster.sh only records how it was called.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let admin = Arc::new(
            Target::parse(&format!("http://{}", listener.local_addr().expect("addr")))
                .expect("target"),
        );
        tokio::spawn(crate::fake::serve(listener));
        let root = std::env::temp_dir().join(format!("wallet-bench-failover-{}", Uuid::new_v4()));
        std::fs::create_dir_all(root.join(".data/run")).expect("run dir");
        std::fs::create_dir_all(root.join("scripts")).expect("scripts dir");
        let script = root.join("scripts/cluster.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/called\"\n",
        )
        .expect("script");
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(&script)
            .status()
            .expect("chmod");
        let mut node = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("sleep");
        std::fs::write(cluster::pid_file(&root, 0), node.id().to_string()).expect("pid file");

        let events: Events = Arc::default();
        kill_and_restart(
            vec![admin],
            root.clone(),
            Uuid::new_v4(),
            Duration::ZERO,
            Duration::ZERO,
            Instant::now(),
            events.clone(),
        )
        .await
        .expect("failover action");

        let status = node.wait().expect("wait");
        assert_eq!(status.signal(), Some(9));
        assert_eq!(
            std::fs::read_to_string(root.join("scripts/called"))
                .expect("called")
                .trim(),
            "start-node 0"
        );
        let what: Vec<String> = events
            .lock()
            .expect("events")
            .iter()
            .map(|e| e.what.clone())
            .collect();
        assert_eq!(what.len(), 3, "{what:?}");
        assert!(what[0].starts_with("kill -9 node-0"));
        let _ = std::fs::remove_dir_all(&root);
    }
}

#[cfg(test)]
mod memory_scenario_tests {
    use super::*;

    fn settings() -> Settings {
        let d = Duration::from_secs(1);
        Settings {
            open_connections: 4,
            constant_rps: 10.0,
            constant_duration: d,
            saturate_connections: 2,
            saturate_duration: d,
            spike_low: 1.0,
            spike_high: 2.0,
            spike_phase: d,
            multi_wallets: 2,
            multi_connections: 2,
            multi_duration: d,
            multi_seed_cents: 100,
            zipf_exponent: 1.0,
            failover_rps: 10.0,
            failover_duration: d,
            failover_kill_at: d,
            failover_restart_after: d,
            soak_rps: 10.0,
            soak_duration: d,
            rss_interval: d,
            mix: Mix {
                deposit_ratio: 0.6,
                reject_ratio: 0.05,
            },
            settle_max: d,
            many_wallets: 10,
            many_connections: 2,
            many_duration: d,
            many_seed_chunk: 5,
            many_keep: false,
            slow_connections: 12,
            slow_duration: Duration::from_millis(1500),
            slow_target: 0,
            slow_trickle: Duration::from_millis(200),
            slow_kinds: vec![slow::Kind::Idle, slow::Kind::Header, slow::Kind::Body],
            baseline_rps: 0.0,
            bystander_rps: 40.0,
            bystander_wallets: 2,
            bystander_connections: 2,
            memory_interval: Duration::from_millis(250),
            memory_limit: None,
            transfers_wallets: 4,
            transfers_connections: 2,
            transfers_duration: d,
            transfers_pending_wait: d,
            holds_connections: 2,
            holds_duration: d,
            balance_at_operations: 10,
            balance_at_step: d,
            balance_at_rps: 10.0,
            balance_at_duration: d,
            balance_at_connections: 2,
            balance_at_keep: false,
            reads_connections: 4,
            reads_wallets: 8,
            reads_duration: d,
            reads_ryw_connections: 3,
            reads_ryw_duration: Duration::from_millis(500),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_connections_against_the_fake_api_reports_connections_memory_and_others() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let target = Arc::new(
            Target::parse(&format!("http://{}", listener.local_addr().expect("addr")))
                .expect("target"),
        );
        tokio::spawn(crate::fake::serve(listener));
        let mut ctx = Ctx {
            load: LoadConfig {
                targets: vec![target.clone()],
                timeout: Duration::from_secs(5),
                seed: 1,
                idempotency_prefix: None,
            },
            admin: vec![target],
            pool: None,
            db: None,
            tenant: "bench".to_owned(),
            root: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."),
            settings: settings(),
            multi_wallets: None,
            saturate_one_rps: None,
        };
        let r = run(&mut ctx, "slow-connections").await.expect("scenario");
        let slow = r.slow.as_ref().expect("slow report");
        // The fake server has no timeouts: it keeps every connection.
        assert_eq!((slow.requested, slow.opened), (12, 12), "{slow:?}");
        assert_eq!((slow.open_at_end, slow.closed_by_server), (12, 0));
        assert_eq!(slow.kinds.len(), 3);
        assert!(slow.bench_nofile.is_some());
        let mem = r.memory.as_ref().expect("memory");
        assert_eq!(mem.source, "metrics");
        assert!(mem.limit_bytes.is_some());
        assert_eq!(mem.nodes.len(), 1);
        assert!(mem.nodes[0].peak_bytes > 0);
        assert!(r.rss_samples.len() >= 3, "{}", r.rss_samples.len());
        let by = r.bystander.as_ref().expect("others");
        assert_eq!(by.requests, 60);
        assert_eq!(r.requests, 60);
        let answered: u64 = ["200", "409"]
            .iter()
            .filter_map(|k| by.status_counts.get(*k))
            .sum();
        assert_eq!(answered, 60, "{:?}", by.status_counts);
        // The slow connections carry no operation: the others' answers are the operations.
        assert_eq!(r.acknowledged_ops, 60);
        assert_eq!(r.consistency.get("skipped"), Some(&serde_json::json!(true)));
        let md = crate::report::markdown(std::slice::from_ref(&r));
        assert!(
            md.contains("12 still open at the end, 0 closed by the server"),
            "{md}"
        );
        assert!(md.contains("| partial-header | 4 |"), "{md}");
        assert!(md.contains("Other clients meanwhile (40 RPS"), "{md}");
        assert!(md.contains("| node-0 |"), "{md}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transfers_and_holds_against_the_fake_api_report_their_figures() {
        let mut ctx = fake_cluster(2).await;
        let root = ctx.root.clone();
        let t = run(&mut ctx, "transfers").await.expect("transfers");
        let rep = t.transfers.as_ref().expect("transfers report");
        assert_eq!(rep.wallets, 4);
        assert!(rep.transfers_per_s > 0.0);
        assert_eq!(rep.answered_posted + rep.rejected_409, t.requests);
        assert!(
            t.status_counts.keys().all(|k| k == "200" || k == "409"),
            "{:?}",
            t.status_counts
        );
        assert_eq!(t.consistency.get("skipped"), Some(&serde_json::json!(true)));

        let base = run(&mut ctx, "saturate-one").await.expect("saturate-one");
        assert_eq!(ctx.saturate_one_rps, Some(base.achieved_rps));
        let h = run(&mut ctx, "holds").await.expect("holds");
        let rep = h.holds.as_ref().expect("holds report");
        assert!(rep.pairs > 0);
        assert_eq!(rep.create.requests, rep.pairs);
        assert_eq!(rep.capture.status_counts.get("200"), Some(&rep.pairs));
        assert_eq!(rep.create.status_counts.get("201"), Some(&rep.pairs));
        assert_eq!(rep.baseline_ops_per_s, Some(base.achieved_rps));
        assert!(rep.ratio.is_some_and(|r| r > 0.0));
        // Every answer of the fake is valid: each scenario divides its CPU by all of them.
        let tr = t.transfers.as_ref().expect("transfers report");
        assert_eq!(t.acknowledged_ops, tr.answered_posted + tr.rejected_409);
        assert_eq!(base.acknowledged_ops, base.requests);
        assert_eq!(h.acknowledged_ops, 2 * rep.pairs);
        for r in [&t, &base, &h] {
            assert_cpu_per_op(r);
        }
        let md = crate::report::markdown(&[t, base, h]);
        assert!(md.contains("transfers/s** (valid answers"), "{md}");
        assert!(md.contains("hold+capture pairs/s"), "{md}");
        assert!(md.contains("| capture |"), "{md}");
        let _ = std::fs::remove_dir_all(&root);
    }

    /// `nodes` fake nodes sharing one state, and a bench context pointed at them. The
    /// fake nodes run in this process: its pid stands for node-0's (`own_pid_root`).
    async fn fake_cluster(nodes: usize) -> Ctx {
        let state = Arc::new(crate::fake::State::default());
        let mut targets = Vec::new();
        for _ in 0..nodes {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(crate::fake::serve_state(listener, state.clone()));
            targets.push(Arc::new(
                Target::parse(&format!("http://{addr}")).expect("target"),
            ));
        }
        Ctx {
            load: LoadConfig {
                targets: targets.clone(),
                timeout: Duration::from_secs(5),
                seed: 1,
                idempotency_prefix: None,
            },
            admin: targets,
            pool: None,
            db: None,
            tenant: "bench".to_owned(),
            root: own_pid_root(),
            settings: settings(),
            multi_wallets: None,
            saturate_one_rps: None,
        }
    }

    fn own_pid_root() -> PathBuf {
        let root = std::env::temp_dir().join(format!("wallet-bench-root-{}", Uuid::new_v4()));
        std::fs::create_dir_all(root.join(".data/run")).expect("run dir");
        std::fs::write(cluster::pid_file(&root, 0), std::process::id().to_string())
            .expect("pid file");
        root
    }

    /// The node CPU was measured and divided by the acknowledged operations.
    fn assert_cpu_per_op(r: &ScenarioResult) {
        assert!(r.acknowledged_ops > 0, "{}", r.scenario);
        let nodes = r.nodes_cpu_s.expect("node CPU");
        let per_op = r.node_cpu_us_per_op.expect("node CPU per operation");
        // nodes_cpu_s is rounded to 0.1 s, the per-operation figure is not.
        let bound = (nodes + 0.05) * 1e6 / r.acknowledged_ops as f64 + 0.05;
        assert!(
            per_op >= 0.0 && per_op <= bound,
            "{}: {per_op} > {bound}",
            r.scenario
        );
        assert_eq!(
            r.postgres_cpu_s.is_some(),
            r.postgres_cpu_us_per_op.is_some(),
            "{}",
            r.scenario
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_against_the_fake_api_check_every_answer_and_read_back_each_deposit() {
        let mut ctx = fake_cluster(3).await;
        let root = ctx.root.clone();
        let r = run(&mut ctx, "reads").await.expect("reads");
        let rep = r.reads.as_ref().expect("reads report");
        assert!(r.consistency_ok, "{}", r.consistency);
        assert_eq!(rep.wallets, 8);
        assert!(rep.matched > 0);
        assert_eq!(rep.matched, r.requests);
        assert_eq!((rep.mismatched, rep.failed), (0, 0));
        assert!(rep.reads_per_s > 0.0);
        assert_eq!(rep.ryw_connections, 3);
        assert!(rep.ryw_checks > 0);
        assert_eq!(rep.ryw_checks, rep.ryw_deposits_acknowledged);
        assert_eq!((rep.ryw_stale, rep.ryw_wrong, rep.ryw_failed), (0, 0, 0));
        assert_eq!(rep.ryw_read.requests, rep.ryw_checks);
        assert!(!rep.ryw_single_target);
        assert_eq!(r.acknowledged_ops, r.requests);
        assert_cpu_per_op(&r);
        let md = crate::report::markdown(std::slice::from_ref(&r));
        assert!(
            md.contains(&format!(
                "read-your-writes: {} checks, 0 stale",
                rep.ryw_checks
            )),
            "{md}"
        );
        assert!(md.contains("reads/s**"), "{md}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn balance_at_needs_the_database_to_seed() {
        let mut ctx = Ctx {
            load: LoadConfig {
                targets: vec![Arc::new(Target::parse("http://127.0.0.1:1").expect("t"))],
                timeout: Duration::from_secs(1),
                seed: 1,
                idempotency_prefix: None,
            },
            admin: Vec::new(),
            pool: None,
            db: None,
            tenant: "bench".to_owned(),
            root: PathBuf::from("."),
            settings: settings(),
            multi_wallets: None,
            saturate_one_rps: None,
        };
        let e = run(&mut ctx, "balance-at").await.expect_err("no database");
        assert!(e.to_string().contains("DATABASE_URL"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_wallets_needs_the_database_to_seed() {
        let mut ctx = Ctx {
            load: LoadConfig {
                targets: vec![Arc::new(Target::parse("http://127.0.0.1:1").expect("t"))],
                timeout: Duration::from_secs(1),
                seed: 1,
                idempotency_prefix: None,
            },
            admin: Vec::new(),
            pool: None,
            db: None,
            tenant: "bench".to_owned(),
            root: PathBuf::from("."),
            settings: settings(),
            multi_wallets: None,
            saturate_one_rps: None,
        };
        let e = run(&mut ctx, "many-wallets")
            .await
            .expect_err("no database");
        assert!(e.to_string().contains("DATABASE_URL"), "{e}");
    }
}
