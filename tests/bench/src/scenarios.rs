//! The scenarios of `make bench`: what load, on which wallets, with which side
//! action (kill a node, sample memory), followed by the consistency check.

use crate::check::{self, CheckReport};
use crate::client::Target;
use crate::cluster;
use crate::engine::{self, LoadConfig, RunOutput, STATUS_ERROR};
use crate::report::{Event, RssSample, ScenarioResult, SecondPointOut, check_json};
use crate::schedule::{Phase, Schedule};
use crate::setup;
use crate::stats;
use crate::workload::{Mix, Picker, Workload};
use anyhow::Context as _;
use sqlx::PgPool;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

pub const ALL: [&str; 6] = [
    "constant",
    "saturate-one",
    "spike",
    "multi-uniform",
    "multi-zipf",
    "failover",
];
pub const KNOWN: [&str; 7] = [
    "constant",
    "saturate-one",
    "spike",
    "multi-uniform",
    "multi-zipf",
    "failover",
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
}

pub struct Ctx {
    pub load: LoadConfig,
    pub admin: Vec<Arc<Target>>,
    pub pool: Option<PgPool>,
    pub root: PathBuf,
    pub settings: Settings,
    /// Wallets of the multi scenarios, created once and shared by both rows.
    pub multi_wallets: Option<Vec<Uuid>>,
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

fn push_event(events: &Events, start: Instant, what: String) {
    log(&what);
    events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Event {
            t_s: (start.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            what,
        });
}

fn log(msg: &str) {
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
                    });
            }
        }
        tokio::time::sleep(interval).await;
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// CPU seconds so far of this process and of the nodes (with their pids).
fn cpu_now(ctx: &Ctx) -> (f64, Option<f64>, Vec<u32>) {
    let me = cluster::cpu_seconds(std::process::id()).unwrap_or(0.0);
    let pids: Vec<u32> = cluster::node_pids(&ctx.root)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let nodes: Option<f64> = pids.iter().map(|p| cluster::cpu_seconds(*p)).sum();
    (me, if pids.is_empty() { None } else { nodes }, pids)
}

pub async fn run(ctx: &mut Ctx, name: &str) -> anyhow::Result<ScenarioResult> {
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

    let events: Events = Arc::default();
    let rss: Arc<Mutex<Vec<RssSample>>> = Arc::default();
    let cpu_before = cpu_now(ctx);
    let start = Instant::now();
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
    let series = stats::series(&out.records)
        .iter()
        .map(|p| SecondPointOut::from(p, offered.map(|sch| sch.rps_at(Duration::from_secs(p.t_s)))))
        .collect();
    let events = std::mem::take(&mut *events.lock().unwrap_or_else(|p| p.into_inner()));
    let rss_samples = std::mem::take(&mut *rss.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(ScenarioResult {
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
        generator_cpu_s: round1(cpu_after.0 - cpu_before.0),
        // A node restarted during the load has a new pid: only compare like with like.
        nodes_cpu_s: (cpu_before.1.is_some() && cpu_before.2 == cpu_after.2)
            .then(|| round1(cpu_after.1.unwrap_or(0.0) - cpu_before.1.unwrap_or(0.0))),
        connections,
        wallets: wallets.len(),
        targets: ctx.load.targets.iter().map(|t| t.base.clone()).collect(),
        reroutes: out.reroutes,
        retries: out.retries,
        consistency: check_json(consistency.as_ref()),
        events,
        rss_samples,
        series,
    })
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
