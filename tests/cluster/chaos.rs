//! Two faults in a row under load from 24 clients on 20 wallets through every node:
//! kill -9 of the hot wallet's owner, and 10 s later, while the cluster is still a node
//! short, SIGSTOP of another owner for 15 s with requests in flight on it. Whatever the
//! clients were told must be true: 200/409 committed, every 5xx not applied (now or
//! later); only requests cut without an answer may have gone either way.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::harness::{Load, SETTLE, TestCluster, inspect, longest_gap};

const CLIENTS: usize = 24;
const WALLETS: usize = 20;
/// Share of the requests that go to the hot wallet.
const HOT_PERCENT: usize = 50;
const PAUSE_AFTER_KILL: Duration = Duration::from_secs(10);
const PAUSE: Duration = Duration::from_secs(15);
/// Load kept up after the paused node is back, before the audit.
const AFTERWARDS: Duration = Duration::from_secs(3);

/// Sleeps until `at`: the scenario's own timing, not a wait for some state.
async fn until(at: Instant) {
    tokio::time::sleep_until(at.into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_then_a_pause_of_owners_under_load_loses_nothing_and_applies_no_5xx()
-> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3, |options| {
        // The service's default deadline, shorter than the pause: requests caught in the
        // paused node outlive their deadline there.
        options.request_deadline_ms = 10_000;
    })
    .await?;
    let wallets = cluster.funded_wallets(WALLETS, "1000.00").await?;
    let hot = wallets[0];
    let (_, killed) = cluster
        .agreed_owner(hot)
        .await?
        .context("the nodes disagree on the owner of the hot wallet")?;
    let load = Load::builder(&cluster, &wallets)
        .clients(CLIENTS)
        .hot_share(HOT_PERCENT)
        .start();
    load.wait_progress(200, true).await?;

    // A load balancer stops sending to a dead pod; requests in flight to it are cut.
    load.remove_target(killed);
    cluster.nodes[killed].kill().await?;
    let killed_at = Instant::now();
    load.wait_progress(100, true).await?;

    // Pause an owner of some of the wallets, preferably not the hot one's new owner, so
    // the pause is about the requests in flight on it rather than a second hot failover.
    let deadline = Instant::now() + SETTLE;
    let owners = loop {
        if let Some(owners) = cluster
            .owners(&wallets)
            .await
            .filter(|owners| !owners.contains(&killed))
        {
            break owners;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the survivors never agreed on the owners of every wallet"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let owned = |node: usize| owners.iter().filter(|owner| **owner == node).count();
    let paused = (0..cluster.nodes.len())
        .filter(|node| *node != killed && owned(*node) > 0)
        .max_by_key(|node| (*node != owners[0], owned(*node)))
        .context("no survivor owns a wallet")?;
    let paused_id = cluster.nodes[paused].node_id.clone();

    until(killed_at + PAUSE_AFTER_KILL).await;
    // Paused with its requests in flight (that is the point); only then out of the
    // rotation, so that new requests go elsewhere.
    cluster.pause(paused)?;
    let paused_at = Instant::now();
    load.remove_target(paused);
    load.wait_progress(100, true).await?;
    until(paused_at + PAUSE).await;
    cluster.resume(paused)?;
    let resumed_at = Instant::now();
    load.add_target(paused, cluster.nodes[paused].api.clone());
    cluster.wait_settled(2).await?;
    load.wait_progress(200, false).await?;
    until(resumed_at + AFTERWARDS).await;
    let records = load.stop().await?;
    let stopped_at = Instant::now();

    let report = inspect(&cluster, &wallets, &records, 1).await?;
    let gap = longest_gap(&records, hot, None);
    let kill_gap = longest_gap(&records, hot, Some((killed_at, paused_at)));
    let pause_gap = longest_gap(&records, hot, Some((paused_at, stopped_at)));
    eprintln!(
        "chaos summary (kill -9 of {}, SIGSTOP of {paused_id} owning {} of {WALLETS} wallets): {}; \
         hot wallet longest gap between acknowledged answers {gap:?} (kill -9: {kill_gap:?}, SIGSTOP: {pause_gap:?})",
        cluster.nodes[killed].node_id,
        owned(paused),
        report.summary()
    );
    assert_eq!(
        report.lost, 0,
        "acknowledged but lost: {:#?}",
        report.examples
    );
    assert_eq!(report.duplicates, 0, "duplicates: {:#?}", report.examples);
    assert_eq!(
        report.untruthful, 0,
        "5xx answers whose operation was applied: {:#?}",
        report.examples
    );
    assert!(
        report.unexpected(&[503]).is_empty(),
        "{:?}",
        report.by_status
    );
    assert_eq!(
        report.without_operation_id, 0,
        "answers without operationId (every answer must carry one): {:?}",
        report.by_status
    );
    Ok(())
}
