//! `wallet-bench`: load and correctness bench for the wallet service.
//!
//! `wallet-bench run constant saturate-one ...` drives the public API of a running
//! cluster and checks the result against PostgreSQL; `wallet-bench fake-server`
//! serves an in-memory imitation of the API to measure the generator alone.

mod balance_at;
mod baseline;
mod check;
mod client;
mod cluster;
mod driver;
mod engine;
mod event_lag;
mod fake;
mod holds;
mod ledger;
mod memory;
mod money;
mod reads;
mod report;
mod rng;
mod scenarios;
mod schedule;
mod setup;
mod slow;
mod stats;
mod token;
mod transfers;
mod workload;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use client::Target;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "wallet-bench",
    about = "Load and correctness bench for the wallet service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run scenarios against a running cluster: constant, saturate-one, spike,
    /// multi (= multi-uniform multi-zipf), failover, many-wallets, slow-connections,
    /// transfers, holds (saturate-one runs before it when not asked for), balance-at,
    /// reads, soak, or all (everything but soak).
    Run(Box<RunArgs>),
    /// Rewrite report.md and the plots from an existing results.json.
    Report {
        #[arg(long, env = "WALLET_BENCH_OUT", default_value = "target/bench")]
        out: PathBuf,
    },
    /// Serve an in-memory imitation of the public API (for measuring the generator).
    FakeServer {
        #[arg(long, default_value = "127.0.0.1:18080")]
        addr: String,
    },
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (e.g. 500ms, 60s, 30m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?} (ms, s, m or h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Args)]
struct RunArgs {
    /// Scenarios to run, in order.
    #[arg(required = true)]
    scenarios: Vec<String>,
    /// Public base URLs; requests go round-robin over them.
    #[arg(
        long,
        env = "WALLET_BENCH_URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8080,http://127.0.0.1:8081,http://127.0.0.1:8082"
    )]
    urls: Vec<String>,
    /// Admin base URLs (for /cluster/owner in the failover scenario).
    #[arg(
        long,
        env = "WALLET_BENCH_ADMIN_URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:9090,http://127.0.0.1:9091,http://127.0.0.1:9092"
    )]
    admin_urls: Vec<String>,
    /// PostgreSQL of the cluster, for the consistency check.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Skip the consistency check (e.g. against the fake server).
    #[arg(long)]
    no_check: bool,
    /// Also fail on any 5xx or unanswered request outside the failover scenario.
    #[arg(long)]
    strict: bool,
    /// Folder of results.json, report.md and the plots.
    #[arg(long, env = "WALLET_BENCH_OUT", default_value = "target/bench")]
    out: PathBuf,
    /// Bearer token for the public API; by default `<root>/.data/dev-token`, which
    /// `make up` writes (tenant `dev`, every scope).
    #[arg(long, env = "WALLET_BENCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Tenant of the token: wallets seeded with SQL belong to it.
    #[arg(long, env = "WALLET_BENCH_TENANT", default_value = "dev")]
    tenant: String,
    /// Repository root (for .data/run/*.pid and scripts/cluster.sh).
    #[arg(long, env = "WALLET_BENCH_ROOT", default_value = ".")]
    root: PathBuf,
    /// Per-request client timeout; an unanswered request counts as "error".
    #[arg(long, env = "WALLET_BENCH_TIMEOUT", value_parser = parse_duration, default_value = "15s")]
    timeout: Duration,
    #[arg(long, env = "WALLET_BENCH_SEED", default_value_t = 20_260_101)]
    seed: u64,
    /// Connections of the open-loop scenarios (spread over the URLs).
    #[arg(long, env = "WALLET_BENCH_OPEN_CONNECTIONS", default_value_t = 128)]
    open_connections: usize,
    #[arg(long, env = "WALLET_BENCH_CONSTANT_RPS", default_value_t = 1000.0)]
    constant_rps: f64,
    #[arg(long, env = "WALLET_BENCH_CONSTANT_DURATION", value_parser = parse_duration, default_value = "60s")]
    constant_duration: Duration,
    #[arg(long, env = "WALLET_BENCH_SATURATE_CONNECTIONS", default_value_t = 256)]
    saturate_connections: usize,
    #[arg(long, env = "WALLET_BENCH_SATURATE_DURATION", value_parser = parse_duration, default_value = "30s")]
    saturate_duration: Duration,
    #[arg(long, env = "WALLET_BENCH_SPIKE_LOW", default_value_t = 100.0)]
    spike_low: f64,
    #[arg(long, env = "WALLET_BENCH_SPIKE_HIGH", default_value_t = 2000.0)]
    spike_high: f64,
    /// Length of each of the three spike phases.
    #[arg(long, env = "WALLET_BENCH_SPIKE_PHASE", value_parser = parse_duration, default_value = "20s")]
    spike_phase: Duration,
    #[arg(long, env = "WALLET_BENCH_MULTI_WALLETS", default_value_t = 10_000)]
    multi_wallets: usize,
    #[arg(long, env = "WALLET_BENCH_MULTI_CONNECTIONS", default_value_t = 256)]
    multi_connections: usize,
    #[arg(long, env = "WALLET_BENCH_MULTI_DURATION", value_parser = parse_duration, default_value = "30s")]
    multi_duration: Duration,
    #[arg(long, env = "WALLET_BENCH_ZIPF_EXPONENT", default_value_t = 1.0)]
    zipf_exponent: f64,
    #[arg(long, env = "WALLET_BENCH_FAILOVER_RPS", default_value_t = 1000.0)]
    failover_rps: f64,
    #[arg(long, env = "WALLET_BENCH_FAILOVER_DURATION", value_parser = parse_duration, default_value = "60s")]
    failover_duration: Duration,
    /// When the owner of the wallet is killed, from the scenario start.
    #[arg(long, env = "WALLET_BENCH_FAILOVER_KILL_AT", value_parser = parse_duration, default_value = "15s")]
    failover_kill_at: Duration,
    /// How long the killed node stays down.
    #[arg(long, env = "WALLET_BENCH_FAILOVER_RESTART_AFTER", value_parser = parse_duration, default_value = "15s")]
    failover_restart_after: Duration,
    #[arg(long, env = "WALLET_BENCH_SOAK_RPS", default_value_t = 1000.0)]
    soak_rps: f64,
    #[arg(long, env = "WALLET_BENCH_SOAK_DURATION", value_parser = parse_duration, default_value = "30m")]
    soak_duration: Duration,
    #[arg(long, env = "WALLET_BENCH_RSS_INTERVAL", value_parser = parse_duration, default_value = "10s")]
    rss_interval: Duration,
    /// Share of DEPOSIT among ordinary operations.
    #[arg(long, env = "WALLET_BENCH_DEPOSIT_RATIO", default_value_t = 0.6)]
    deposit_ratio: f64,
    /// Share of withdrawals far above any balance (answered 409, recorded REJECTED).
    #[arg(long, env = "WALLET_BENCH_REJECT_RATIO", default_value_t = 0.01)]
    reject_ratio: f64,
    /// Send an Idempotency-Key with every operation and retry unanswered ones (and 5xx)
    /// with the same key, up to 3 times; result rows get the suffix "-idem".
    #[arg(long, env = "WALLET_BENCH_IDEMPOTENCY_KEYS")]
    idempotency_keys: bool,
    /// Longest wait for in-flight operations to settle before checking.
    #[arg(long, env = "WALLET_BENCH_SETTLE_MAX", value_parser = parse_duration, default_value = "30s")]
    settle_max: Duration,
    /// many-wallets: distinct wallets seeded with SQL and sent one DEPOSIT each.
    #[arg(long, env = "WALLET_BENCH_MANY_WALLETS", default_value_t = 1_000_000)]
    many_wallets: usize,
    #[arg(long, env = "WALLET_BENCH_MANY_CONNECTIONS", default_value_t = 256)]
    many_connections: usize,
    /// many-wallets stops here even if not every wallet was touched.
    #[arg(long, env = "WALLET_BENCH_MANY_DURATION", value_parser = parse_duration, default_value = "5m")]
    many_duration: Duration,
    /// Wallets per INSERT (and per DELETE afterwards).
    #[arg(long, env = "WALLET_BENCH_MANY_SEED_CHUNK", default_value_t = 100_000)]
    many_seed_chunk: usize,
    /// Keep the many-wallets wallets and their audit rows (deleted by default).
    #[arg(long, env = "WALLET_BENCH_MANY_KEEP")]
    many_keep: bool,
    /// slow-connections: connections held open to one node's public port.
    #[arg(long, env = "WALLET_BENCH_SLOW_CONNECTIONS", default_value_t = 3000)]
    slow_connections: usize,
    #[arg(long, env = "WALLET_BENCH_SLOW_DURATION", value_parser = parse_duration, default_value = "60s")]
    slow_duration: Duration,
    /// Which of --urls gets the slow connections (and the other clients' load), from 0.
    #[arg(long, env = "WALLET_BENCH_SLOW_TARGET", default_value_t = 0)]
    slow_target: usize,
    /// A slow connection sends its next byte after this long.
    #[arg(long, env = "WALLET_BENCH_SLOW_TRICKLE", value_parser = parse_duration, default_value = "5s")]
    slow_trickle: Duration,
    /// What the slow connections do, round-robin: idle (nothing), header (a header
    /// that never ends), body (headers, then a body that never ends).
    #[arg(long, env = "WALLET_BENCH_SLOW_KINDS", value_delimiter = ',', value_parser = parse_slow_kind, default_value = "idle,header,body")]
    slow_kinds: Vec<slow::Kind>,
    /// Requests per second (over all nodes) to GET /healthz of the admin ports during the
    /// open-loop scenarios: the machine's own latency beside theirs; 0 turns it off.
    #[arg(long, env = "WALLET_BENCH_BASELINE_RPS", default_value_t = 100.0)]
    baseline_rps: f64,
    /// Other clients' constant load beside many-wallets and slow-connections.
    #[arg(long, env = "WALLET_BENCH_BYSTANDER_RPS", default_value_t = 50.0)]
    bystander_rps: f64,
    #[arg(long, env = "WALLET_BENCH_BYSTANDER_WALLETS", default_value_t = 4)]
    bystander_wallets: usize,
    #[arg(long, env = "WALLET_BENCH_BYSTANDER_CONNECTIONS", default_value_t = 8)]
    bystander_connections: usize,
    /// Node memory sampling period of many-wallets and slow-connections.
    #[arg(long, env = "WALLET_BENCH_MEMORY_INTERVAL", value_parser = parse_duration, default_value = "1s")]
    memory_interval: Duration,
    /// Limit to compare the nodes' peak RSS with (e.g. 512Mi); default: the chart's
    /// resources.limits.memory in charts/wallet/values.yaml.
    #[arg(long, env = "WALLET_BENCH_MEMORY_LIMIT")]
    memory_limit: Option<String>,
    /// transfers: wallets pre-funded by deposits in setup; each transfer picks two of them.
    #[arg(long, env = "WALLET_BENCH_TRANSFERS_WALLETS", default_value_t = 1000)]
    transfers_wallets: usize,
    /// transfers: connections of the closed loop, spread over --urls.
    #[arg(
        long,
        env = "WALLET_BENCH_TRANSFERS_CONNECTIONS",
        default_value_t = 256
    )]
    transfers_connections: usize,
    #[arg(long, env = "WALLET_BENCH_TRANSFERS_DURATION", value_parser = parse_duration, default_value = "30s")]
    transfers_duration: Duration,
    /// transfers: longest wait after the load for no transfer to stay PENDING.
    #[arg(long, env = "WALLET_BENCH_TRANSFERS_PENDING_WAIT", value_parser = parse_duration, default_value = "10s")]
    transfers_pending_wait: Duration,
    /// holds: connections of the closed loop on the one hot wallet.
    #[arg(long, env = "WALLET_BENCH_HOLDS_CONNECTIONS", default_value_t = 256)]
    holds_connections: usize,
    #[arg(long, env = "WALLET_BENCH_HOLDS_DURATION", value_parser = parse_duration, default_value = "30s")]
    holds_duration: Duration,
    /// balance-at: operations of the wallet's history, written with SQL.
    #[arg(
        long,
        env = "WALLET_BENCH_BALANCE_AT_OPERATIONS",
        default_value_t = 1_000_000
    )]
    balance_at_operations: usize,
    /// balance-at: time between two operations of the seeded history.
    #[arg(long, env = "WALLET_BENCH_BALANCE_AT_STEP", value_parser = parse_duration, default_value = "1s")]
    balance_at_step: Duration,
    #[arg(long, env = "WALLET_BENCH_BALANCE_AT_RPS", default_value_t = 500.0)]
    balance_at_rps: f64,
    #[arg(long, env = "WALLET_BENCH_BALANCE_AT_DURATION", value_parser = parse_duration, default_value = "30s")]
    balance_at_duration: Duration,
    #[arg(
        long,
        env = "WALLET_BENCH_BALANCE_AT_CONNECTIONS",
        default_value_t = 32
    )]
    balance_at_connections: usize,
    /// balance-at: keep the seeded wallet and its history (deleted by default).
    #[arg(long, env = "WALLET_BENCH_BALANCE_AT_KEEP")]
    balance_at_keep: bool,
    /// reads: connections of the closed loop of GETs, spread over --urls.
    #[arg(long, env = "WALLET_BENCH_READS_CONNECTIONS", default_value_t = 64)]
    reads_connections: usize,
    /// reads: wallets funded in setup; each GET picks one of them uniformly.
    #[arg(long, env = "WALLET_BENCH_READS_WALLETS", default_value_t = 1000)]
    reads_wallets: usize,
    #[arg(long, env = "WALLET_BENCH_READS_DURATION", value_parser = parse_duration, default_value = "20s")]
    reads_duration: Duration,
    /// reads, read-your-writes phase: connections, each depositing into its own wallet
    /// through one URL and reading it back through another.
    #[arg(long, env = "WALLET_BENCH_READS_RYW_CONNECTIONS", default_value_t = 16)]
    reads_ryw_connections: usize,
    #[arg(long, env = "WALLET_BENCH_READS_RYW_DURATION", value_parser = parse_duration, default_value = "10s")]
    reads_ryw_duration: Duration,
}

fn parse_slow_kind(s: &str) -> Result<slow::Kind, String> {
    slow::Kind::parse(s)
        .ok_or_else(|| format!("unknown slow connection kind {s:?} (idle, header, body)"))
}

fn targets(urls: &[String], token: Option<&str>) -> anyhow::Result<Vec<Arc<Target>>> {
    let t: Vec<Arc<Target>> = urls
        .iter()
        .filter(|u| !u.trim().is_empty())
        .map(|u| {
            let target = Target::parse(u)?;
            match token {
                Some(token) => target.with_token(token),
                None => Ok(target),
            }
            .map(Arc::new)
        })
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(!t.is_empty(), "no target URLs");
    Ok(t)
}

fn expand(names: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for n in names {
        match n.as_str() {
            "all" => out.extend(scenarios::ALL.iter().map(|s| (*s).to_owned())),
            "multi" => out.extend(["multi-uniform".to_owned(), "multi-zipf".to_owned()]),
            // holds is compared with saturate-one of the same run.
            "holds" if !out.iter().any(|s| s == "saturate-one") => {
                out.extend(["saturate-one".to_owned(), "holds".to_owned()]);
            }
            s if scenarios::KNOWN.contains(&s) => out.push(s.to_owned()),
            s => anyhow::bail!(
                "unknown scenario {s:?}; known: all, multi, {}",
                scenarios::KNOWN.join(", ")
            ),
        }
    }
    Ok(out)
}

/// Stops a run whose token lacks a scope its scenarios need (it would only collect 403s).
fn check_scopes(token: Option<&str>, names: &[String]) -> anyhow::Result<()> {
    let Some(token) = token else {
        return Ok(());
    };
    let Some(have) = token::scopes(token) else {
        eprintln!(
            "[wallet-bench] the token's scopes cannot be read (not a JWT?); not checking them"
        );
        return Ok(());
    };
    let missing = token::missing(&have, names);
    if !missing.is_empty() {
        let list: Vec<String> = missing
            .iter()
            .map(|(scope, who)| format!("{scope} (for {})", who.join(", ")))
            .collect();
        anyhow::bail!(
            "the token lacks {}; it has: {}. scripts/bench.sh mints one with {} (or pass --token / WALLET_BENCH_TOKEN)",
            list.join(", "),
            have.join(" "),
            token::ALL.join(" ")
        );
    }
    let unused: Vec<&str> = token::ALL
        .iter()
        .copied()
        .filter(|s| !have.iter().any(|h| h == s))
        .collect();
    if !unused.is_empty() {
        eprintln!(
            "[wallet-bench] note: the token lacks {} (not needed by these scenarios)",
            unused.join(", ")
        );
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<bool> {
    let names = expand(&args.scenarios)?;
    anyhow::ensure!(
        args.no_check || args.database_url.is_some(),
        "DATABASE_URL is needed for the consistency check (or pass --no-check)"
    );
    let db = match args.database_url.as_deref() {
        Some(url) => Some(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .connect(url)
                .await
                .context("connecting to DATABASE_URL")?,
        ),
        None => None,
    };
    let pool = if args.no_check { None } else { db.clone() };
    let token = match &args.token {
        Some(token) => Some(token.clone()),
        None => std::fs::read_to_string(args.root.join(".data/dev-token")).ok(),
    };
    check_scopes(token.as_deref(), &names)?;
    let mut ctx = scenarios::Ctx {
        load: engine::LoadConfig {
            targets: targets(&args.urls, token.as_deref())?,
            timeout: args.timeout,
            seed: args.seed,
            // Unique per run: keys of an earlier run must not be replayed.
            idempotency_prefix: args
                .idempotency_keys
                .then(|| format!("bench-{}", uuid::Uuid::new_v4().simple())),
        },
        admin: targets(&args.admin_urls, None)?,
        tenant: args.tenant.clone(),
        pool,
        db,
        root: args.root.clone(),
        settings: scenarios::Settings {
            open_connections: args.open_connections,
            constant_rps: args.constant_rps,
            constant_duration: args.constant_duration,
            saturate_connections: args.saturate_connections,
            saturate_duration: args.saturate_duration,
            spike_low: args.spike_low,
            spike_high: args.spike_high,
            spike_phase: args.spike_phase,
            multi_wallets: args.multi_wallets,
            multi_connections: args.multi_connections,
            multi_duration: args.multi_duration,
            multi_seed_cents: 1_000_000,
            zipf_exponent: args.zipf_exponent,
            failover_rps: args.failover_rps,
            failover_duration: args.failover_duration,
            failover_kill_at: args.failover_kill_at,
            failover_restart_after: args.failover_restart_after,
            soak_rps: args.soak_rps,
            soak_duration: args.soak_duration,
            rss_interval: args.rss_interval,
            mix: workload::Mix {
                deposit_ratio: args.deposit_ratio,
                reject_ratio: args.reject_ratio,
            },
            settle_max: args.settle_max,
            many_wallets: args.many_wallets,
            many_connections: args.many_connections,
            many_duration: args.many_duration,
            many_seed_chunk: args.many_seed_chunk,
            many_keep: args.many_keep,
            slow_connections: args.slow_connections,
            slow_duration: args.slow_duration,
            slow_target: args.slow_target,
            slow_trickle: args.slow_trickle,
            slow_kinds: args.slow_kinds.clone(),
            baseline_rps: args.baseline_rps,
            bystander_rps: args.bystander_rps,
            bystander_wallets: args.bystander_wallets,
            bystander_connections: args.bystander_connections,
            memory_interval: args.memory_interval,
            memory_limit: args.memory_limit.clone(),
            transfers_wallets: args.transfers_wallets,
            transfers_connections: args.transfers_connections,
            transfers_duration: args.transfers_duration,
            transfers_pending_wait: args.transfers_pending_wait,
            holds_connections: args.holds_connections,
            holds_duration: args.holds_duration,
            balance_at_operations: args.balance_at_operations,
            balance_at_step: args.balance_at_step,
            balance_at_rps: args.balance_at_rps,
            balance_at_duration: args.balance_at_duration,
            balance_at_connections: args.balance_at_connections,
            balance_at_keep: args.balance_at_keep,
            reads_connections: args.reads_connections,
            reads_wallets: args.reads_wallets,
            reads_duration: args.reads_duration,
            reads_ryw_connections: args.reads_ryw_connections,
            reads_ryw_duration: args.reads_ryw_duration,
        },
        multi_wallets: None,
        saturate_one_rps: None,
    };

    let mut results = Vec::new();
    let mut ok = true;
    for name in &names {
        match scenarios::run(&mut ctx, name).await {
            Ok(r) => {
                if !args.no_check && !r.consistency_ok {
                    eprintln!("[wallet-bench] {name}: CONSISTENCY CHECK FAILED");
                    ok = false;
                }
                if !r.action_ok {
                    eprintln!(
                        "[wallet-bench] {name}: the failover action did not happen (see events)"
                    );
                    ok = false;
                }
                if args.strict {
                    for v in scenarios::strict_violations(&r) {
                        eprintln!("[wallet-bench] strict: {v}");
                        ok = false;
                    }
                }
                results.push(r);
            }
            Err(e) => {
                eprintln!("[wallet-bench] {name} failed: {e:#}");
                ok = false;
            }
        }
        // Write after every scenario so an interrupted bench keeps what it measured.
        let merged = report::merge(report::read_existing(&args.out), &results);
        report::write_all(&args.out, &merged)
            .with_context(|| format!("writing results to {}", args.out.display()))?;
    }
    println!("{}", report::table(&results));
    println!("results: {}", args.out.join("results.json").display());
    Ok(ok)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wallet-bench: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = rt.block_on(async {
        match cli.command {
            Command::Run(args) => run(*args).await,
            Command::Report { out } => {
                let results = report::read_existing(&out);
                anyhow::ensure!(
                    !results.is_empty(),
                    "no results in {}",
                    out.join("results.json").display()
                );
                report::write_all(&out, &results)?;
                println!("{}", report::table(&results));
                Ok(true)
            }
            Command::FakeServer { addr } => {
                let listener = tokio::net::TcpListener::bind(&addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                eprintln!(
                    "[wallet-bench] fake API on http://{}",
                    listener.local_addr()?
                );
                fake::serve(listener).await?;
                Ok(true)
            }
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("wallet-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn scenario_names_expand() {
        let v = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            expand(&v(&["multi"])).expect("names"),
            v(&["multi-uniform", "multi-zipf"])
        );
        let all = expand(&v(&["all"])).expect("names");
        assert_eq!(all.len(), 12);
        assert_eq!(all.last().map(String::as_str), Some("reads"));
        assert_eq!(expand(&v(&["reads"])).expect("names"), v(&["reads"]));
        assert_eq!(
            expand(&v(&["holds"])).expect("names"),
            v(&["saturate-one", "holds"])
        );
        assert_eq!(
            expand(&v(&["saturate-one", "transfers", "holds", "balance-at"])).expect("names"),
            v(&["saturate-one", "transfers", "holds", "balance-at"])
        );
        assert_eq!(
            expand(&v(&["many-wallets", "slow-connections"])).expect("names"),
            v(&["many-wallets", "slow-connections"])
        );
        assert!(
            !expand(&v(&["all"]))
                .expect("names")
                .contains(&"soak".to_owned())
        );
        assert!(expand(&v(&["nope"])).is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
