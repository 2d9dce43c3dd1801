//! Transfers between owners under faults. About 1000 transfers per second, sent open
//! loop (whatever the answers) through every live node for 16-20 s among 100 wallets
//! spread over every owner of a 3-node cluster; a fifth of them flow from the wallets of
//! one owner (the source side) to those of another (the destination side). First the
//! source owner, then the destination owner is killed (-9, then restarted), paused past
//! its lease TTL (SIGSTOP, then SIGCONT) or cut off the network (every packet dropped in
//! its namespace, then healed): one test per kind of fault, one driver. A fourth test
//! runs the same load without faults, to tell a capacity limit from a fault handled
//! badly.
//!
//! Afterwards, the audit: no transfer still PENDING lease TTL + 5 s after the load; the
//! ledger audit of `wallet_tests::ledger` (conservation, every transfer with exactly its
//! rows, every balance equal to its audit trail, available never below zero); every
//! answer true of the `transfers` table (200 stored POSTED, or PENDING then POSTED; 409
//! stored REJECTED; no 5xx or other 4xx applied; nothing in the table that only an
//! answered request could explain); keyed transfers sent again get their first answer
//! and add nothing; the API serves what PostgreSQL holds. Conservation is also sampled
//! every 250 ms during the run. Each test prints one summary line.
//!
//! `CLUSTER_TRANSFER_RATE` (1000), `CLUSTER_TRANSFER_MAX_IN_FLIGHT` (2000) and
//! `CLUSTER_TRANSFER_SEED` (random, printed) change the load. 1000/s needs release nodes
//! (`WALLET_BIN=<target>/release/wallet`): on the 2-core VM a debug cluster carries
//! about 50 transfers/s, and beyond that its commits stall, it hands its shards around
//! and every run fails on 503s and an unsettled cluster, which says nothing about faults.

use std::time::{Duration, Instant};

use anyhow::Context;
use wallet_tests::netns::Cut;
use wallet_tests::{env_or, ledger};

use crate::harness::{
    Answered, LedgerSampler, SETTLE, TestCluster, TransferLoad, TransferPlan, TransferRecord,
    inspect_transfers, replay_keyed,
};
use crate::partition::{namespaces_or_skip, start_in_namespaces};

const NODES: usize = 3;
const WALLETS: usize = 100;
/// Each wallet's deposit before the load: far more than a run moves out of any of them.
const SEED_DEPOSIT: &str = "2000.00";
/// Share of the transfers from the source owner's wallets to the destination owner's.
const FOCUS_PERCENT: u64 = 20;
/// Every 25th transfer asks for more than any wallet has: 409, stored REJECTED.
const OVERSIZED_EVERY: u64 = 25;
/// Load before the first fault, between the recovery from one and the next, after the last.
const WARM_UP: Duration = Duration::from_secs(2);
const BETWEEN: Duration = Duration::from_secs(2);
const TAIL: Duration = Duration::from_secs(3);
/// The shortest run; longer when recoveries take longer.
const RUN: Duration = Duration::from_secs(16);
/// How long past the lease TTL a fault lasts.
const PAST_TTL: Duration = Duration::from_secs(2);
/// The longest a fault waits beyond that for the victim's shard to be claimed.
const CLAIM_GRACE: Duration = Duration::from_secs(5);
/// How long past the lease TTL, after the load, a transfer may stay PENDING.
const PENDING_GRACE: Duration = Duration::from_secs(5);
/// Acknowledged keyed transfers sent again after the run.
const REPLAYS: usize = 300;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill,
    Pause,
    Cut,
}

impl Fault {
    /// Whether requests sent to the victim may get no answer: a killed node drops its
    /// connections, an isolated one black-holes them; a paused one answers once woken.
    fn cuts_requests(self) -> bool {
        !matches!(self, Self::Pause)
    }

    /// 5xx statuses allowed (their truth is the audit's): none when a node is killed (as
    /// in kill.rs), 503 when requests may wait in a paused or cut node past their
    /// deadline (as in pause.rs and partition.rs).
    fn allowed_5xx(self) -> &'static [u16] {
        match self {
            Self::Kill => &[],
            Self::Pause | Self::Cut => &[503],
        }
    }
}

/// One fault: on whom, when (since the load started), how long, and what followed.
struct Faulted {
    kind: Fault,
    role: &'static str,
    victim: usize,
    node_id: String,
    shard: u32,
    began: Instant,
    /// When the victim was back (restarted, woken or healed).
    restored: Instant,
    claimed_after: Option<Duration>,
    settled_after: Option<Duration>,
}

impl Faulted {
    fn line(&self, started: Instant, records: &[TransferRecord]) -> String {
        let acknowledged = records
            .iter()
            .filter(|r| r.acknowledged() && r.sent_at >= self.began && r.sent_at < self.restored)
            .count();
        format!(
            "{} owner {} {:?} at {:.1}s for {:.1}s, its shard {} claimed by another node after {}, \
             cluster settled {} after the fault began, {acknowledged} transfers sent meanwhile acknowledged",
            self.role,
            self.node_id,
            self.kind,
            (self.began - started).as_secs_f64(),
            (self.restored - self.began).as_secs_f64(),
            self.shard,
            seconds(self.claimed_after),
            seconds(self.settled_after),
        )
    }
}

fn seconds(duration: Option<Duration>) -> String {
    duration.map_or_else(
        || "never".to_owned(),
        |d| format!("{:.2}s", d.as_secs_f64()),
    )
}

/// Breaks node `victim` as `kind` says, holds it past the lease TTL (and until another
/// node claimed `shard`, a shard it owned, or gives up), restores it and waits until the
/// cluster settles again. Broken expectations go to `failures`.
async fn fault(
    cluster: &mut TestCluster,
    load: &TransferLoad,
    kind: Fault,
    victim: usize,
    shard: u32,
    role: &'static str,
    failures: &mut Vec<String>,
) -> anyhow::Result<Faulted> {
    let node_id = cluster.nodes[victim].node_id.clone();
    let hold = Duration::from_millis(cluster.options.lease_ttl_ms) + PAST_TTL;
    let began = Instant::now();
    match kind {
        // A load balancer stops sending to a dead pod; requests in flight to it are cut.
        Fault::Kill => {
            load.remove_target(victim);
            cluster.nodes[victim].kill().await?;
        }
        // Paused with its requests in flight (debits committed, answers not sent), then
        // out of the rotation as a failing readiness probe would take it.
        Fault::Pause => {
            cluster.pause(victim)?;
            load.remove_target(victim);
        }
        // Off PostgreSQL, Redis, its peers and its clients: a black hole.
        Fault::Cut => {
            cluster.nodes[victim]
                .netns()
                .context("the victim is not in a namespace")?
                .cut(Cut::All)?;
            load.remove_target(victim);
        }
    }
    let mut claimed_after = None;
    while began.elapsed() < hold
        || (claimed_after.is_none() && began.elapsed() < hold + CLAIM_GRACE)
    {
        if claimed_after.is_none()
            && matches!(cluster.fence(shard).await, Ok(Some((_, owner))) if owner != node_id)
        {
            claimed_after = Some(began.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match kind {
        Fault::Kill => cluster.nodes[victim].restart().await?,
        Fault::Pause => cluster.resume(victim)?,
        Fault::Cut => cluster.nodes[victim]
            .netns()
            .context("the victim is not in a namespace")?
            .heal()?,
    }
    let restored = Instant::now();
    load.add_target(victim, &cluster.nodes[victim].api);
    if claimed_after.is_none() {
        failures.push(format!(
            "no other node claimed shard {shard} of the {role} owner {node_id} during its {kind:?}"
        ));
    }
    let settled_after = match cluster.wait_settled(NODES).await {
        Ok(_) => Some(began.elapsed()),
        Err(error) => {
            failures.push(format!("after the {kind:?} of the {role} owner: {error:#}"));
            None
        }
    };
    if let Err(error) = load.wait_progress(100).await {
        failures.push(format!("after the {kind:?} of the {role} owner: {error:#}"));
    }
    Ok(Faulted {
        kind,
        role,
        victim,
        node_id,
        shard,
        began,
        restored,
        claimed_after,
        settled_after,
    })
}

/// The run with two faults of `kind` (source owner, then destination owner), or none.
async fn transfers_under(test: &str, kind: Option<Fault>) -> anyhow::Result<()> {
    let namespaces = match kind {
        Some(Fault::Cut) => match namespaces_or_skip(test).await? {
            Some(namespaces) => Some(namespaces),
            None => return Ok(()),
        },
        _ => None,
    };
    let mut cluster = match &namespaces {
        Some(namespaces) => start_in_namespaces(&namespaces.list).await?,
        None => TestCluster::start(NODES, |_| {}).await?,
    };
    let rate: f64 = env_or("CLUSTER_TRANSFER_RATE", "1000")
        .parse()
        .context("CLUSTER_TRANSFER_RATE")?;
    let max_in_flight: usize = env_or("CLUSTER_TRANSFER_MAX_IN_FLIGHT", "2000")
        .parse()
        .context("CLUSTER_TRANSFER_MAX_IN_FLIGHT")?;
    let seed: u64 = match std::env::var("CLUSTER_TRANSFER_SEED") {
        Ok(seed) if !seed.is_empty() => seed.parse().context("CLUSTER_TRANSFER_SEED")?,
        _ => uuid::Uuid::new_v4().as_u64_pair().0,
    };
    eprintln!(
        "{test}: seed {seed} (CLUSTER_TRANSFER_SEED={seed} sends the same requests), nodes run {}",
        wallet_tests::node::wallet_binary()?.display()
    );

    // 100 wallets, funded, and who owns each: every node owns some.
    let wallets = cluster.funded_wallets(WALLETS, SEED_DEPOSIT).await?;
    let owners = cluster.wait_owners(&wallets).await?;
    let owned = |node: usize| -> Vec<uuid::Uuid> {
        wallets
            .iter()
            .zip(&owners)
            .filter(|(_, owner)| **owner == node)
            .map(|(wallet, _)| *wallet)
            .collect()
    };
    for node in 0..NODES {
        anyhow::ensure!(
            owned(node).len() >= 5,
            "node-{node} owns {} of the {WALLETS} wallets: too few to test it as an owner",
            owned(node).len()
        );
    }
    let source = owners[0];
    let destination = (0..NODES)
        .filter(|node| *node != source)
        .max_by_key(|node| owned(*node).len())
        .context("a single node")?;
    let plan = TransferPlan {
        wallets: wallets.clone(),
        focus_from: owned(source),
        focus_to: owned(destination),
        focus_percent: FOCUS_PERCENT,
        oversized_every: OVERSIZED_EVERY,
        seed,
    };
    let (source_shard, _) = cluster
        .agreed_owner(plan.focus_from[0])
        .await?
        .context("the nodes disagree on an owner")?;
    let (destination_shard, _) = cluster
        .agreed_owner(plan.focus_to[0])
        .await?
        .context("the nodes disagree on an owner")?;

    let sampler = LedgerSampler::start(&cluster, Duration::from_millis(250));
    let load = TransferLoad::start(&cluster, plan.clone(), rate, max_in_flight);
    let started = load.started();
    let mut failures = Vec::new();
    tokio::time::sleep(WARM_UP).await;
    if let Err(error) = load.wait_progress(100).await {
        failures.push(format!("before any fault: {error:#}"));
    }
    let mut faults = Vec::new();
    if let Some(kind) = kind {
        faults.push(
            fault(
                &mut cluster,
                &load,
                kind,
                source,
                source_shard,
                "source",
                &mut failures,
            )
            .await?,
        );
        tokio::time::sleep(BETWEEN).await;
        faults.push(
            fault(
                &mut cluster,
                &load,
                kind,
                destination,
                destination_shard,
                "destination",
                &mut failures,
            )
            .await?,
        );
    }
    tokio::time::sleep_until((started + RUN).max(Instant::now() + TAIL).into()).await;
    let run = tokio::time::timeout(SETTLE * 3, load.stop())
        .await
        .context("the transfers in flight never got their answers")??;

    // The faults are over: every transfer POSTED or REJECTED within lease TTL + 5 s.
    let grace = Duration::from_millis(cluster.options.lease_ttl_ms) + PENDING_GRACE;
    let drained = ledger::wait_no_pending(&cluster.db.pool, grace).await?;
    let sampled = sampler.stop().await?;
    let audited = ledger::audit_ledger(&cluster.db.pool).await?;
    let answers = inspect_transfers(&cluster, &wallets, &run.records).await?;
    let served = cluster.served_mismatches(&wallets).await?;
    let replayed = replay_keyed(&cluster, &run.records, REPLAYS).await?;

    let (p50, p99, longest) = run.latencies();
    let focused_acknowledged = run
        .records
        .iter()
        .filter(|r| r.acknowledged() && plan.is_focused(r.from, r.to))
        .count();
    eprintln!(
        "transfers under {kind:?} ({test}), seed {seed}: asked {rate}/s for {:.1}s: {} scheduled, \
         {} shed (at most {} in flight), {:.0} answers/s, latency p50 {p50:?} p99 {p99:?} max {longest:?}, \
         {focused_acknowledged} acknowledged on the focus flow; faults: {}; \
         PENDING: at most {} in a sample, oldest {:.1}s, {}; \
         conservation sampled {} times: {} violations, {} failed samples; {}; ledger: {}; \
         {} keyed transfers replayed ({} retries after 503), {} mismatches; \
         {} wallets served otherwise than stored",
        run.duration.as_secs_f64(),
        run.scheduled,
        run.shed,
        run.max_in_flight,
        run.records.len() as f64 / run.duration.as_secs_f64(),
        if faults.is_empty() {
            "none".to_owned()
        } else {
            faults
                .iter()
                .map(|f| f.line(started, &run.records))
                .collect::<Vec<_>>()
                .join("; ")
        },
        sampled.max_pending,
        sampled.oldest_pending_secs,
        match &drained {
            Ok(after) => format!("none left {:.2}s after the load", after.as_secs_f64()),
            Err(left) => format!("{} still PENDING after {grace:?}", left.len()),
        },
        sampled.samples,
        sampled.violations.len(),
        sampled.errors,
        answers.summary(),
        audited.summary(),
        replayed.sent,
        replayed.retried,
        replayed.mismatches.len(),
        served.len(),
    );

    if let Err(left) = &drained {
        // Who serves the destination shards of the stuck transfers.
        let map = cluster.shard_map(NODES).await.ok().flatten();
        let stuck: Vec<String> = left
            .iter()
            .take(10)
            .map(|t| {
                let owner = map
                    .as_ref()
                    .and_then(|map| u32::try_from(t.to_shard).ok().and_then(|s| map.get(&s)));
                format!(
                    "{} ({} -> {}, {}, to_shard {} served by {owner:?}, {:.1}s old)",
                    t.id, t.from, t.to, t.amount, t.to_shard, t.age_secs
                )
            })
            .collect();
        failures.push(format!(
            "{} transfers still PENDING {grace:?} after the load: {stuck:#?}",
            left.len()
        ));
    }
    if !sampled.violations.is_empty() {
        failures.push(format!(
            "money not conserved in snapshots during the run (time since start, totals): {:#?}",
            sampled.violations
        ));
    }
    if let Err(error) = audited.ensure_clean() {
        failures.push(format!("{error:#}"));
    }
    if let Err(error) = answers.ensure_truthful() {
        failures.push(format!("{error:#}"));
    }
    let unexpected = answers.unexpected(kind.map_or(&[], Fault::allowed_5xx));
    if !unexpected.is_empty() {
        failures.push(format!(
            "unexpected statuses {unexpected:?} (problems {:?})",
            answers.by_problem
        ));
    }
    if answers.by_status.get(&200).copied().unwrap_or_default() == 0 {
        failures.push("no transfer was answered 200".to_owned());
    }
    // Only requests to a victim, sent before it was back, may have no answer at all.
    let cut_off = |record: &TransferRecord| {
        kind.is_some_and(Fault::cuts_requests)
            && faults
                .iter()
                .any(|f| record.node == f.victim && record.sent_at < f.restored)
    };
    let unanswered: Vec<&TransferRecord> = run
        .records
        .iter()
        .filter(|r| matches!(r.answer, Answered::Transport(_)) && !cut_off(r))
        .collect();
    if !unanswered.is_empty() {
        let mut cases = Vec::new();
        for r in unanswered.iter().take(10) {
            // Whether it was applied all the same (from, to and amount rarely repeat).
            let stored: Vec<(uuid::Uuid, String)> = sqlx::query_as(
                "SELECT id, status FROM transfers \
                 WHERE from_wallet_id = $1 AND to_wallet_id = $2 AND amount = $3",
            )
            .bind(r.from)
            .bind(r.to)
            .bind(r.amount)
            .fetch_all(&cluster.db.pool)
            .await?;
            cases.push(format!(
                "node-{} sent at {:.2}s, after {:.2}s: {:?}; transfers of the same from, to and amount: {stored:?}",
                r.node,
                (r.sent_at - started).as_secs_f64(),
                (r.answered_at - r.sent_at).as_secs_f64(),
                r.answer
            ));
        }
        failures.push(format!(
            "{} transfers to reachable nodes got no HTTP answer: {cases:#?}",
            unanswered.len()
        ));
    }
    if !replayed.mismatches.is_empty() {
        failures.push(format!(
            "{} of {} keyed replays differ: {:#?}",
            replayed.mismatches.len(),
            replayed.sent,
            &replayed.mismatches[..replayed.mismatches.len().min(10)]
        ));
    }
    if !served.is_empty() {
        failures.push(format!(
            "{} wallets served otherwise than stored: {:#?}",
            served.len(),
            &served[..served.len().min(10)]
        ));
    }
    assert!(
        failures.is_empty(),
        "{test} (seed {seed}):\n{}",
        failures.join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_survive_kill_9_of_the_source_then_the_destination_owner() -> anyhow::Result<()> {
    transfers_under("transfers_kill", Some(Fault::Kill)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_survive_sigstop_of_the_source_then_the_destination_owner_past_the_lease_ttl()
-> anyhow::Result<()> {
    transfers_under("transfers_pause", Some(Fault::Pause)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_survive_a_network_cut_of_the_source_then_the_destination_owner()
-> anyhow::Result<()> {
    transfers_under("transfers_cut", Some(Fault::Cut)).await
}

/// The same load without faults: what the cluster carries at this rate when nothing
/// breaks, to tell a capacity limit from a fault handled badly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_without_faults_are_all_answered_and_audited_clean() -> anyhow::Result<()> {
    transfers_under("transfers_no_fault", None).await
}
