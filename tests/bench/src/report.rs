//! Results on disk: results.json (one object per scenario), report.md (a table)
//! and two SVG plots per scenario, drawn by hand so no font library is needed.

use crate::balance_at::BalanceAtReport;
use crate::check::CheckReport;
use crate::holds::HoldsReport;
use crate::memory::MemoryReport;
use crate::reads::ReadsReport;
use crate::slow::SlowReport;
use crate::stats::SecondPoint;
use crate::transfers::TransfersReport;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub t_s: f64,
    pub what: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RssSample {
    pub t_s: f64,
    pub node: String,
    pub rss_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_fds: Option<u64>,
}

/// The small constant load of other clients that runs beside a scenario's main
/// load: does the service keep answering them?
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Bystander {
    pub targets: Vec<String>,
    pub wallets: usize,
    pub offered_rps: f64,
    pub connections: usize,
    pub requests: u64,
    pub achieved_rps: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub longest_gap_ms: f64,
    pub status_counts: BTreeMap<String, u64>,
    /// Its own consistency check (None when skipped).
    pub consistency_ok: Option<bool>,
    pub series: Vec<SecondPointOut>,
}

/// What many-wallets did besides the load itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManyReport {
    pub wallets_seeded: u64,
    /// Distinct wallets that got an answered DEPOSIT.
    pub wallets_touched: u64,
    /// Distinct wallets a request was sent to (answered or not).
    pub wallets_sent: u64,
    pub seed_s: f64,
    /// "every wallet touched" or "duration reached".
    pub stopped_by: String,
    pub check: String,
    pub cleanup: String,
    /// Sum over the nodes of (peak - first RSS) per touched wallet.
    pub bytes_per_touched_wallet: Option<f64>,
    /// Linear extrapolation: touched wallets (cluster-wide) at which the
    /// average node would reach the memory limit.
    pub touched_wallets_to_limit: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScenarioResult {
    pub scenario: String,
    pub offered_rps: Option<f64>,
    pub achieved_rps: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub status_counts: BTreeMap<String, u64>,
    pub consistency_ok: bool,
    pub duration_s: f64,
    pub requests: u64,
    pub p999_ms: f64,
    pub mean_ms: f64,
    #[serde(default)]
    pub longest_gap_ms: f64,
    /// False when the scenario's side action (kill and restart) did not happen.
    #[serde(default = "yes")]
    pub action_ok: bool,
    /// CPU seconds used by the generator itself during the load.
    #[serde(default)]
    pub generator_cpu_s: f64,
    /// CPU seconds used by the node processes of .data/run during the load.
    #[serde(default)]
    pub nodes_cpu_s: Option<f64>,
    /// CPU seconds used by every process named `postgres` during the load (None: none seen).
    #[serde(default)]
    pub postgres_cpu_s: Option<f64>,
    /// Valid answers of the load (2xx and the 409s the scenario counts as valid): what
    /// the per-operation CPU figures divide by.
    #[serde(default)]
    pub acknowledged_ops: u64,
    #[serde(default)]
    pub node_cpu_us_per_op: Option<f64>,
    #[serde(default)]
    pub postgres_cpu_us_per_op: Option<f64>,
    pub connections: usize,
    pub wallets: usize,
    pub targets: Vec<String>,
    pub reroutes: u64,
    /// Requests sent again with the same idempotency key (`--idempotency-keys`).
    #[serde(default)]
    pub retries: u64,
    pub consistency: serde_json::Value,
    pub events: Vec<Event>,
    pub rss_samples: Vec<RssSample>,
    pub series: Vec<SecondPointOut>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bystander: Option<Bystander>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub many: Option<ManyReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow: Option<SlowReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfers: Option<TransfersReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holds: Option<HoldsReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance_at: Option<BalanceAtReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reads: Option<ReadsReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_lag: Option<crate::event_lag::EventLagReport>,
    /// The nodes' trivial endpoint during an open-loop scenario (the machine's baseline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<crate::baseline::BaselineReport>,
}

/// `SecondPoint` plus the offered rate of that second (open loop).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SecondPointOut {
    pub t_s: u64,
    pub completed: u64,
    pub failed: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub offered: Option<f64>,
}

impl SecondPointOut {
    pub fn from(p: &SecondPoint, offered: Option<f64>) -> Self {
        Self {
            t_s: p.t_s,
            completed: p.completed,
            failed: p.failed,
            p50_ms: p.p50_ms,
            p99_ms: p.p99_ms,
            max_ms: p.max_ms,
            offered,
        }
    }
}

pub fn check_json(c: Option<&CheckReport>) -> serde_json::Value {
    match c {
        Some(c) => serde_json::to_value(c).unwrap_or(serde_json::Value::Null),
        None => serde_json::json!({"skipped": true}),
    }
}

/// Replaces results of the same scenario and keeps the others, so `soak` can be
/// run after `all` into the same folder.
pub fn merge(existing: Vec<ScenarioResult>, new: &[ScenarioResult]) -> Vec<ScenarioResult> {
    let mut out: Vec<ScenarioResult> = existing
        .into_iter()
        .filter(|e| !new.iter().any(|n| n.scenario == e.scenario))
        .collect();
    out.extend(new.iter().cloned());
    out
}

fn yes() -> bool {
    true
}

fn fmt_rps(v: Option<f64>) -> String {
    v.map_or_else(|| "closed".to_owned(), |r| format!("{r:.0}"))
}

fn consistency_cell(r: &ScenarioResult) -> &'static str {
    if r.consistency.get("skipped").is_some() {
        "skipped"
    } else if r.consistency_ok {
        "yes"
    } else {
        "NO"
    }
}

fn opt_us(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

fn opt_cpu(v: Option<f64>, unit: &str) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.1} {unit}"))
}

pub fn table(results: &[ScenarioResult]) -> String {
    let mut s = String::new();
    s.push_str("| scenario | offered rps | achieved rps | p50 ms | p95 ms | p99 ms | max ms | longest gap ms | statuses | consistent | duration s | node µs/op | PG µs/op |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---|:---:|---:|---:|---:|\n");
    for r in results {
        let statuses: Vec<String> = r
            .status_counts
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {} | {} | {:.1} | {} | {} |",
            r.scenario,
            fmt_rps(r.offered_rps),
            r.achieved_rps,
            r.p50_ms,
            r.p95_ms,
            r.p99_ms,
            r.max_ms,
            r.longest_gap_ms,
            statuses.join(", "),
            consistency_cell(r),
            r.duration_s,
            opt_us(r.node_cpu_us_per_op),
            opt_us(r.postgres_cpu_us_per_op)
        );
    }
    s
}

pub fn markdown(results: &[ScenarioResult]) -> String {
    let mut s = String::from("# Wallet bench results\n\n");
    s.push_str(&table(results));
    s.push('\n');
    for r in results {
        let _ = writeln!(s, "## {}\n", r.scenario);
        let _ = writeln!(
            s,
            "{} requests over {} target(s), {} connection(s), {} wallet(s), {} rerouted after a refused connection, {} retried with their idempotency key; p99.9 {:.2} ms, mean {:.2} ms, longest gap between successful answers {:.0} ms; CPU during the load: generator {:.1} s, nodes {}, PostgreSQL {}; per acknowledged operation: nodes {}, PostgreSQL {}.\n",
            r.requests,
            r.targets.len(),
            r.connections,
            r.wallets,
            r.reroutes,
            r.retries,
            r.p999_ms,
            r.mean_ms,
            r.longest_gap_ms,
            r.generator_cpu_s,
            opt_cpu(r.nodes_cpu_s, "s"),
            opt_cpu(r.postgres_cpu_s, "s"),
            opt_cpu(r.node_cpu_us_per_op, "µs"),
            opt_cpu(r.postgres_cpu_us_per_op, "µs"),
        );
        if let Some(m) = &r.many {
            many_section(&mut s, r, m);
        }
        if let Some(slow) = &r.slow {
            slow_section(&mut s, slow);
        }
        if let Some(t) = &r.transfers {
            transfers_section(&mut s, r, t);
        }
        if let Some(h) = &r.holds {
            holds_section(&mut s, h);
        }
        if let Some(b) = &r.balance_at {
            balance_at_section(&mut s, r, b);
        }
        if let Some(x) = &r.reads {
            reads_section(&mut s, x);
        }
        if let Some(lag) = &r.event_lag {
            for (consumer, f) in [
                ("stream", Some(&lag.stream)),
                ("webhook", lag.webhook.as_ref()),
            ] {
                let Some(f) = f else {
                    let _ = writeln!(
                        s,
                        "Event lag to a webhook: not measured (no webhooks in this build)."
                    );
                    continue;
                };
                let _ = writeln!(
                    s,
                    "Event lag, commit to {consumer} receipt: {} of {} events, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms.",
                    f.received, f.expected, f.p50_ms, f.p99_ms, f.max_ms,
                );
            }
            let _ = writeln!(
                s,
                "Event lag target: p99 <= {:.0} ms for both, every event received: {}.\n",
                lag.target_p99_ms,
                met(lag.target_met)
            );
        }
        if let Some(b) = &r.baseline {
            let _ = writeln!(
                s,
                "Baseline, {} at {:.0} requests/s during the load: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} requests, {} failed); the scenario's p99 was {:.2} ms.\n",
                b.endpoint,
                b.offered_rps,
                b.p50_ms,
                b.p99_ms,
                b.max_ms,
                b.requests,
                b.failed,
                r.p99_ms,
            );
        }
        if let Some(m) = &r.memory {
            memory_section(&mut s, m);
        }
        if let Some(b) = &r.bystander {
            bystander_section(&mut s, b);
        }
        for e in &r.events {
            let _ = writeln!(s, "- t={:.1}s {}", e.t_s, e.what);
        }
        if !r.events.is_empty() {
            s.push('\n');
        }
        if let Some(problems) = r.consistency.get("problems").and_then(|p| p.as_array())
            && !problems.is_empty()
        {
            s.push_str("Consistency problems:\n\n");
            for p in problems {
                let _ = writeln!(s, "- {}", p.as_str().unwrap_or_default());
            }
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "![latency]({0}-latency.svg) ![throughput]({0}-throughput.svg)\n",
            r.scenario
        );
        if !r.rss_samples.is_empty() {
            let _ = writeln!(s, "![rss]({}-rss.svg)\n", r.scenario);
        }
        if r.slow.is_some() {
            let _ = writeln!(s, "![connections]({}-connections.svg)\n", r.scenario);
        }
        if r.bystander.is_some() {
            let _ = writeln!(
                s,
                "![other clients' latency]({}-bystander-latency.svg)\n",
                r.scenario
            );
        }
    }
    s
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

fn opt_s(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

fn statuses(counts: &BTreeMap<String, u64>) -> String {
    counts
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn many_section(s: &mut String, r: &ScenarioResult, m: &ManyReport) {
    let _ = writeln!(
        s,
        "Seeded {} wallets with SQL in {:.1} s. **{} distinct wallets touched** (one answered DEPOSIT each; {} sent) at {:.0} operations/s over {:.1} s; stopped: {}. Check: {}. Cleanup: {}.\n",
        m.wallets_seeded,
        m.seed_s,
        m.wallets_touched,
        m.wallets_sent,
        r.achieved_rps,
        r.duration_s,
        m.stopped_by,
        m.check,
        m.cleanup
    );
    if let Some(b) = m.bytes_per_touched_wallet {
        let _ = write!(
            s,
            "Node memory grew by about {b:.0} bytes per touched wallet (sum over the nodes of peak minus first sample)"
        );
        match m.touched_wallets_to_limit {
            Some(n) => {
                let _ = writeln!(
                    s,
                    "; at that rate the average node reaches the memory limit after about {n} touched wallets (linear extrapolation).\n"
                );
            }
            None => s.push_str(".\n\n"),
        }
    }
}

fn met(v: bool) -> &'static str {
    if v { "met" } else { "**NOT met**" }
}

fn consistency_word(r: &ScenarioResult) -> &'static str {
    match consistency_cell(r) {
        "yes" => "consistent",
        "NO" => "**INCONSISTENT**",
        _ => "not checked",
    }
}

fn transfers_section(s: &mut String, r: &ScenarioResult, t: &TransfersReport) {
    let _ = writeln!(
        s,
        "**{:.0} transfers/s** (valid answers: 200 and 409 insufficient-funds; target >= {:.0}/s: {}), {:.0}/s answered 200, among {} wallets pre-funded with {} each by deposits ({:.1} s of setup). Answers: {} POSTED, {} PENDING, {} 409, {} 5xx (failures), {} unanswered, {} refused, {} other 4xx.\n",
        t.transfers_per_s,
        t.target_per_s,
        met(t.target_met),
        t.posted_per_s,
        t.wallets,
        crate::money::format_cents(t.seed_cents_each),
        t.setup_s,
        t.answered_posted,
        t.answered_pending,
        t.rejected_409,
        t.failed_5xx,
        t.unanswered,
        t.refused,
        t.other_4xx
    );
    let c = &r.consistency;
    if c.get("skipped").is_none() {
        let g = &c["global_conservation"];
        let _ = writeln!(
            s,
            "Check ({}): {} transfers stored ({} POSTED, {} REJECTED, {} still PENDING after waiting {} s), each checked for its TRANSFER_OUT / TRANSFER_IN rows; {} audit rows replayed on {} wallets; conservation over the scenario's wallets: {}; over the whole database: balances {} + PENDING {} = deposits {} - withdrawals {} - captures {}: {}.\n",
            consistency_word(r),
            c["stored"],
            c["stored_posted"],
            c["stored_rejected"],
            c["stored_pending"],
            c["pending_wait_s"],
            c["audit"]["rows"],
            c["audit"]["wallets"],
            if c["scenario_conservation_ok"] == true {
                "holds"
            } else {
                "**broken**"
            },
            g["balances"].as_str().unwrap_or("?"),
            g["pending_transfers"].as_str().unwrap_or("?"),
            g["deposits"].as_str().unwrap_or("?"),
            g["withdrawals"].as_str().unwrap_or("?"),
            g["captures"].as_str().unwrap_or("?"),
            if g["ok"] == true {
                "holds"
            } else {
                "**broken**"
            },
        );
    }
}

fn holds_section(s: &mut String, h: &HoldsReport) {
    let _ = writeln!(
        s,
        "**{:.0} hold+capture pairs/s**, {:.0} operations/s ({} pairs). Against saturate-one: {}; operations/s over it: {}, pairs/s over it: {}. Target: operations/s >= {:.2} x saturate-one: {}.\n",
        h.pairs_per_s,
        h.operations_per_s,
        h.pairs,
        match h.baseline_ops_per_s {
            Some(b) => format!("{b:.0} operations/s, {}", h.baseline),
            None => h.baseline.clone(),
        },
        h.ratio
            .map_or_else(|| "n/a".to_owned(), |r| format!("**ratio {r:.2}**")),
        h.pairs_ratio
            .map_or_else(|| "n/a".to_owned(), |r| format!("{r:.2}")),
        h.target_ratio,
        match h.target_met {
            Some(v) => met(v),
            None => "unknown",
        }
    );
    s.push_str("| request | requests | p50 ms | p99 ms | max ms | statuses |\n|---|---:|---:|---:|---:|---|\n");
    for (name, k) in [("create hold", &h.create), ("capture", &h.capture)] {
        let _ = writeln!(
            s,
            "| {name} | {} | {:.2} | {:.2} | {:.2} | {} |",
            k.requests,
            k.p50_ms,
            k.p99_ms,
            k.max_ms,
            statuses(&k.status_counts)
        );
    }
    s.push('\n');
}

fn balance_at_section(s: &mut String, r: &ScenarioResult, b: &BalanceAtReport) {
    let _ = writeln!(
        s,
        "One wallet with {} operations seeded in PostgreSQL in {:.1} s ({} .. {}, one every {} s). Target: p99 <= {:.0} ms for both queries: {}. Answers against the rows: {}. Cleanup: {}.\n",
        b.operations_seeded,
        b.seed_s,
        b.first_operation_at,
        b.last_operation_at,
        b.step_s,
        b.target_p99_ms,
        met(b.target_met),
        match consistency_cell(r) {
            "skipped" => "not checked".to_owned(),
            _ => format!(
                "{} checked, {} matched ({})",
                r.consistency["checked"],
                r.consistency["matched"],
                consistency_word(r)
            ),
        },
        b.cleanup
    );
    s.push_str("| query | requests | p50 ms | p95 ms | p99 ms | max ms | statuses |\n|---|---:|---:|---:|---:|---:|---|\n");
    for (name, q) in [("?sequence=n", &b.by_sequence), ("?asOf=t", &b.by_as_of)] {
        let _ = writeln!(
            s,
            "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            q.requests,
            q.p50_ms,
            q.p95_ms,
            q.p99_ms,
            q.max_ms,
            statuses(&q.status_counts)
        );
    }
    s.push('\n');
}

fn reads_section(s: &mut String, x: &ReadsReport) {
    let _ = writeln!(
        s,
        "**{:.0} reads/s** (200 answers to GET /api/v1/wallets/{{id}} on {} wallets funded with {} each, {:.1} s of setup; nothing writes them meanwhile). {} answers checked against {}: {} matched, {} mismatched (status, walletId or balance); {} failed (5xx, unanswered, refused).\n",
        x.reads_per_s,
        x.wallets,
        crate::money::format_cents(x.seed_cents_each),
        x.setup_s,
        x.checked,
        x.expected_from,
        x.matched,
        x.mismatched,
        x.failed
    );
    let _ = writeln!(
        s,
        "Then **read-your-writes: {} checks, {} stale** ({} connections for {:.1} s, each a DEPOSIT of 0.01 to its own wallet through one node, then a GET of it through {}; the balance read must be at least the deposit's balanceAfter). {} of {} deposits answered 200, {} other wrong answers, {} failed requests, {} rerouted.\n",
        x.ryw_checks,
        x.ryw_stale,
        x.ryw_connections,
        x.ryw_duration_s,
        if x.ryw_single_target {
            "the same node (only one target)"
        } else {
            "another node, round-robin"
        },
        x.ryw_deposits_acknowledged,
        x.ryw_deposits,
        x.ryw_wrong,
        x.ryw_failed,
        x.ryw_reroutes
    );
    s.push_str("| read-your-writes request | requests | p50 ms | p99 ms | max ms | statuses |\n|---|---:|---:|---:|---:|---|\n");
    for (name, k) in [("deposit", &x.ryw_deposit), ("read back", &x.ryw_read)] {
        let _ = writeln!(
            s,
            "| {name} | {} | {:.2} | {:.2} | {:.2} | {} |",
            k.requests,
            k.p50_ms,
            k.p99_ms,
            k.max_ms,
            statuses(&k.status_counts)
        );
    }
    s.push('\n');
}

fn memory_section(s: &mut String, m: &MemoryReport) {
    let _ = writeln!(
        s,
        "Node resident memory (from {}, every {:.1} s); limit: {} ({}).\n",
        m.source,
        m.interval_s,
        m.limit_bytes
            .map_or_else(|| "unknown".to_owned(), |l| format!("{:.0} MiB", mib(l))),
        m.limit_source
    );
    s.push_str("| node | first MiB | peak MiB | peak at s | last MiB | peak / limit | over limit | peak open fds | max fds |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|:---:|---:|---:|\n");
    for n in &m.nodes {
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} |",
            n.node,
            mib(n.first_bytes),
            mib(n.peak_bytes),
            n.peak_t_s,
            mib(n.last_bytes),
            n.peak_of_limit
                .map_or_else(|| "-".to_owned(), |p| format!("{:.1}%", p * 100.0)),
            if n.over_limit { "**yes**" } else { "no" },
            n.peak_open_fds
                .map_or_else(|| "-".to_owned(), |v| v.to_string()),
            n.max_fds.map_or_else(|| "-".to_owned(), |v| v.to_string()),
        );
    }
    s.push('\n');
}

fn bystander_section(s: &mut String, b: &Bystander) {
    let _ = writeln!(
        s,
        "Other clients meanwhile ({} RPS open loop on {} wallet(s), {} connection(s), to {}): {} requests, {:.0} answered/s, p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms, longest gap {:.0} ms; statuses {}; consistent: {}.\n",
        b.offered_rps,
        b.wallets,
        b.connections,
        b.targets.join(", "),
        b.requests,
        b.achieved_rps,
        b.p50_ms,
        b.p95_ms,
        b.p99_ms,
        b.p999_ms,
        b.max_ms,
        b.longest_gap_ms,
        statuses(&b.status_counts),
        match b.consistency_ok {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "skipped",
        }
    );
}

fn slow_section(s: &mut String, r: &SlowReport) {
    let _ = writeln!(
        s,
        "Slow connections to {}: {} requested, {} opened (all by {} s), {} failed to open; held {:.0} s with a byte every {:.1} s; **{} still open at the end, {} closed by the server**. Open-files limit of the bench: soft {} (was {}), hard {}.\n",
        r.target,
        r.requested,
        r.opened,
        opt_s(r.all_opened_by_s),
        r.failed_to_open,
        r.held_s,
        r.trickle_s,
        r.open_at_end,
        r.closed_by_server,
        r.bench_nofile
            .map_or_else(|| "-".to_owned(), |v| v.to_string()),
        r.bench_nofile_before
            .map_or_else(|| "-".to_owned(), |v| v.to_string()),
        r.bench_nofile_hard
            .map_or_else(|| "-".to_owned(), |v| v.to_string()),
    );
    s.push_str("| kind | opened | failed to open | open at end | closed by server | closed after s (min / median / max) | how | answers |\n");
    s.push_str("|---|---:|---:|---:|---:|---|---|---|\n");
    for k in &r.kinds {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} / {} / {} | {} | {} |",
            k.kind,
            k.opened,
            k.failed_to_open,
            k.open_at_end,
            k.closed_by_server,
            opt_s(k.close_after_s_min),
            opt_s(k.close_after_s_p50),
            opt_s(k.close_after_s_max),
            statuses(&k.closes),
            statuses(&k.answers),
        );
    }
    s.push('\n');
    for e in &r.connect_errors {
        let _ = writeln!(s, "- connect error: {e}");
    }
    if !r.connect_errors.is_empty() {
        s.push('\n');
    }
}

pub struct Line<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart with axes, ticks, a legend and vertical event markers.
pub fn svg_chart(title: &str, y_label: &str, lines: &[Line<'_>], events: &[Event]) -> String {
    let (w, h) = (900.0, 360.0);
    let (left, right, top, bottom) = (70.0, 20.0, 40.0, 50.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let x_max = nice_max(
        lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.0))
            .fold(0.0, f64::max)
            .max(1.0),
    );
    let y_max = nice_max(
        lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.1))
            .fold(0.0, f64::max),
    );
    let sx = |x: f64| left + x / x_max * pw;
    let sy = |y: f64| top + ph - y / y_max * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    for i in 0..=5 {
        let y = y_max * f64::from(i) / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{0}" y1="{1}" y2="{1}" stroke="#ddd"/>"##,
            left + pw,
            sy(y)
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            left - 6.0,
            sy(y) + 4.0,
            trim_num(y)
        );
        let x = x_max * f64::from(i) / 5.0;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            sx(x),
            top + ph + 18.0,
            trim_num(x)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds</text>"#,
        left + pw / 2.0,
        h - 10.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + ph / 2.0,
        esc(y_label)
    );
    for (i, e) in events.iter().enumerate() {
        let x = sx(e.t_s);
        // Events often come close together (restart, started): stagger the labels.
        let label_y = top + 12.0 + 14.0 * i as f64;
        let _ = writeln!(
            s,
            r##"<line x1="{x}" x2="{x}" y1="{top}" y2="{}" stroke="#c00" stroke-dasharray="4 3"/>"##,
            top + ph
        );
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" fill="#c00">{}</text>"##,
            x + 3.0,
            label_y,
            esc(&e.what)
        );
    }
    for (i, l) in lines.iter().enumerate() {
        let pts: Vec<String> = l
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
            l.color,
            pts.join(" ")
        );
        let ly = top + 14.0 + 16.0 * i as f64;
        let lx = left + pw - 150.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="3"/>"#,
            lx + 20.0,
            l.color
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{}</text>"#,
            lx + 26.0,
            ly + 4.0,
            esc(l.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn trim_num(v: f64) -> String {
    if v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

pub fn write_all(dir: &Path, results: &[ScenarioResult]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_vec_pretty(results).map_err(std::io::Error::other)?,
    )?;
    std::fs::write(dir.join("report.md"), markdown(results))?;
    for r in results {
        let t = |p: &SecondPointOut| p.t_s as f64;
        let latency = [
            Line {
                name: "p50",
                color: "#1f77b4",
                points: r.series.iter().map(|p| (t(p), p.p50_ms)).collect(),
            },
            Line {
                name: "p99",
                color: "#ff7f0e",
                points: r.series.iter().map(|p| (t(p), p.p99_ms)).collect(),
            },
            Line {
                name: "max",
                color: "#d62728",
                points: r.series.iter().map(|p| (t(p), p.max_ms)).collect(),
            },
        ];
        std::fs::write(
            dir.join(format!("{}-latency.svg", r.scenario)),
            svg_chart(
                &format!("{}: latency per second", r.scenario),
                "ms",
                &latency,
                &r.events,
            ),
        )?;
        let mut tput = vec![
            Line {
                name: "answered/s",
                color: "#2ca02c",
                points: r
                    .series
                    .iter()
                    .map(|p| (t(p), p.completed as f64))
                    .collect(),
            },
            Line {
                name: "failed/s",
                color: "#d62728",
                points: r.series.iter().map(|p| (t(p), p.failed as f64)).collect(),
            },
        ];
        if r.offered_rps.is_some() {
            // Drawn first so the answered line stays visible on top of it.
            tput.insert(
                0,
                Line {
                    name: "offered/s",
                    color: "#7f7f7f",
                    points: r
                        .series
                        .iter()
                        .filter_map(|p| p.offered.map(|o| (t(p), o)))
                        .collect(),
                },
            );
        }
        std::fs::write(
            dir.join(format!("{}-throughput.svg", r.scenario)),
            svg_chart(
                &format!("{}: throughput per second", r.scenario),
                "requests/s",
                &tput,
                &r.events,
            ),
        )?;
        if let Some(slow) = &r.slow {
            let open = [Line {
                name: "open",
                color: "#1f77b4",
                points: slow
                    .open_series
                    .iter()
                    .map(|(t, n)| (*t, *n as f64))
                    .collect(),
            }];
            std::fs::write(
                dir.join(format!("{}-connections.svg", r.scenario)),
                svg_chart(
                    &format!("{}: slow connections open", r.scenario),
                    "connections",
                    &open,
                    &r.events,
                ),
            )?;
        }
        if let Some(b) = &r.bystander {
            let lines = [
                Line {
                    name: "p50",
                    color: "#1f77b4",
                    points: b.series.iter().map(|p| (t(p), p.p50_ms)).collect(),
                },
                Line {
                    name: "p99",
                    color: "#ff7f0e",
                    points: b.series.iter().map(|p| (t(p), p.p99_ms)).collect(),
                },
                Line {
                    name: "max",
                    color: "#d62728",
                    points: b.series.iter().map(|p| (t(p), p.max_ms)).collect(),
                },
            ];
            std::fs::write(
                dir.join(format!("{}-bystander-latency.svg", r.scenario)),
                svg_chart(
                    &format!("{}: other clients' latency per second", r.scenario),
                    "ms",
                    &lines,
                    &r.events,
                ),
            )?;
        }
        if !r.rss_samples.is_empty() {
            let mut nodes: Vec<&str> = r.rss_samples.iter().map(|s| s.node.as_str()).collect();
            nodes.sort_unstable();
            nodes.dedup();
            let colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"];
            let lines: Vec<Line<'_>> = nodes
                .iter()
                .enumerate()
                .map(|(i, n)| Line {
                    name: n,
                    color: colors[i % colors.len()],
                    points: r
                        .rss_samples
                        .iter()
                        .filter(|s| s.node == *n)
                        .map(|s| (s.t_s, s.rss_bytes as f64 / 1_048_576.0))
                        .collect(),
                })
                .collect();
            std::fs::write(
                dir.join(format!("{}-rss.svg", r.scenario)),
                svg_chart(
                    &format!("{}: resident memory per node", r.scenario),
                    "MiB",
                    &lines,
                    &r.events,
                ),
            )?;
        }
    }
    Ok(())
}

pub fn read_existing(dir: &Path) -> Vec<ScenarioResult> {
    std::fs::read(dir.join("results.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, ok: bool) -> ScenarioResult {
        ScenarioResult {
            scenario: name.to_owned(),
            offered_rps: Some(1000.0),
            achieved_rps: 999.5,
            p50_ms: 1.5,
            p95_ms: 3.0,
            p99_ms: 5.25,
            max_ms: 20.0,
            status_counts: BTreeMap::from([("200".to_owned(), 59_000), ("409".to_owned(), 600)]),
            consistency_ok: ok,
            duration_s: 60.0,
            requests: 59_600,
            p999_ms: 9.0,
            mean_ms: 1.7,
            longest_gap_ms: 3.0,
            action_ok: true,
            generator_cpu_s: 1.0,
            nodes_cpu_s: Some(2.0),
            postgres_cpu_s: Some(1.5),
            acknowledged_ops: 59_600,
            node_cpu_us_per_op: Some(33.6),
            postgres_cpu_us_per_op: Some(25.2),
            connections: 128,
            wallets: 1,
            targets: vec!["http://127.0.0.1:8080".to_owned()],
            reroutes: 0,
            retries: 0,
            consistency: serde_json::json!({"ok": ok, "problems": if ok { vec![] } else { vec!["balance off"] }}),
            events: vec![Event {
                t_s: 15.0,
                what: "kill -9 node-1".to_owned(),
            }],
            rss_samples: vec![],
            series: vec![SecondPointOut {
                t_s: 0,
                completed: 1000,
                failed: 0,
                p50_ms: 1.0,
                p99_ms: 4.0,
                max_ms: 9.0,
                offered: Some(1000.0),
            }],
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

    #[test]
    fn results_json_has_the_contract_fields() {
        let v = serde_json::to_value(vec![result("constant", true)]).expect("json");
        let o = &v[0];
        for key in [
            "scenario",
            "offered_rps",
            "achieved_rps",
            "p50_ms",
            "p95_ms",
            "p99_ms",
            "max_ms",
            "status_counts",
            "consistency_ok",
            "duration_s",
            "nodes_cpu_s",
            "postgres_cpu_s",
            "acknowledged_ops",
            "node_cpu_us_per_op",
            "postgres_cpu_us_per_op",
        ] {
            assert!(o.get(key).is_some(), "missing {key}");
        }
        assert_eq!(o["node_cpu_us_per_op"], 33.6);
        assert_eq!(o["status_counts"]["409"], 600);
        let mut closed = result("saturate-one", true);
        closed.offered_rps = None;
        assert!(serde_json::to_value(&closed).expect("json")["offered_rps"].is_null());
    }

    #[test]
    fn merge_replaces_same_scenario_only() {
        let merged = merge(
            vec![result("constant", false), result("spike", true)],
            &[result("constant", true)],
        );
        let names: Vec<&str> = merged.iter().map(|r| r.scenario.as_str()).collect();
        assert_eq!(names, ["spike", "constant"]);
        assert!(merged[1].consistency_ok);
    }

    #[test]
    fn table_and_markdown_show_each_row() {
        let md = markdown(&[result("constant", true), result("failover", false)]);
        assert!(md.contains("| constant | 1000 | 1000 | 1.50 | 3.00 | 5.25 | 20.00 | 3 | 200: 59000, 409: 600 | yes | 60.0 | 33.6 | 25.2 |"), "{md}");
        assert!(
            md.contains("CPU during the load: generator 1.0 s, nodes 2.0 s, PostgreSQL 1.5 s; per acknowledged operation: nodes 33.6 µs, PostgreSQL 25.2 µs."),
            "{md}"
        );
        assert!(md.contains("| failover |"));
        assert!(md.contains("| NO |"));
        assert!(md.contains("- balance off"));
        let mut skipped = result("spike", false);
        skipped.consistency = check_json(None);
        (skipped.node_cpu_us_per_op, skipped.postgres_cpu_us_per_op) = (None, None);
        (skipped.nodes_cpu_s, skipped.postgres_cpu_s) = (None, None);
        assert!(table(std::slice::from_ref(&skipped)).contains("| skipped | 60.0 | - | - |"));
        assert!(markdown(&[skipped]).contains(
            "nodes n/a, PostgreSQL n/a; per acknowledged operation: nodes n/a, PostgreSQL n/a."
        ),);
        assert!(md.contains("t=15.0s kill -9 node-1"));
        assert!(!md.contains("Baseline"), "{md}");
        let mut with_baseline = result("constant", true);
        with_baseline.baseline = Some(crate::baseline::BaselineReport {
            endpoint: "GET /healthz (admin port)".to_owned(),
            targets: vec!["http://127.0.0.1:9090".to_owned()],
            offered_rps: 100.0,
            requests: 6000,
            failed: 0,
            p50_ms: 0.4,
            p99_ms: 2.5,
            max_ms: 9.0,
        });
        let md = markdown(&[with_baseline]);
        assert!(
            md.contains("Baseline, GET /healthz (admin port) at 100 requests/s during the load: p50 0.40 ms, p99 2.50 ms, max 9.00 ms (6000 requests, 0 failed); the scenario's p99 was 5.25 ms."),
            "{md}"
        );
    }

    #[test]
    fn svg_is_well_formed_enough() {
        let svg = svg_chart(
            "a <b>",
            "ms",
            &[Line {
                name: "p50",
                color: "#000",
                points: vec![(0.0, 1.0), (1.0, 3.0)],
            }],
            &[Event {
                t_s: 0.5,
                what: "kill".into(),
            }],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &lt;b&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains(">kill<"));
    }

    #[test]
    fn writes_files_and_reads_them_back() {
        let dir = std::env::temp_dir().join(format!("wallet-bench-test-{}", uuid::Uuid::new_v4()));
        let results = vec![result("constant", true)];
        write_all(&dir, &results).expect("write");
        for f in [
            "results.json",
            "report.md",
            "constant-latency.svg",
            "constant-throughput.svg",
        ] {
            assert!(dir.join(f).is_file(), "{f}");
        }
        assert_eq!(read_existing(&dir), results);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
