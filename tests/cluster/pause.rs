//! SIGSTOP of the owner past its lease TTL: the others take the shard over, and when
//! the old owner wakes up with a batch in hand, PostgreSQL's fence refuses it.

use anyhow::Context;
use wallet_tests::eventually;

use crate::harness::{Answered, Load, SETTLE, TestCluster, audit};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_is_fenced_out_and_nothing_acknowledged_is_lost() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3, |_| {}).await?;
    let wallets = cluster.funded_wallets(6, "1000.00").await?;
    let hot = wallets[0];
    let (shard, victim) = cluster
        .agreed_owner(hot)
        .await?
        .context("the nodes disagree on the owner")?;
    let victim_id = cluster.nodes[victim].node_id.clone();
    let (fence_before, _) = cluster.fence(shard).await?.context("shard never claimed")?;

    let load = Load::start(&cluster, &wallets);
    load.wait_progress(200, true).await?;
    // A paused pod fails its readiness probe: the load balancer stops sending new
    // requests, but those already sent to it (and forwarded to it) wait inside it.
    load.remove_target(victim);
    cluster.pause(victim)?;
    let paused_at = std::time::Instant::now();

    // Its heartbeat and lease expire: the others name another owner and claim the shard.
    let renamed = eventually(SETTLE, || async {
        matches!(cluster.agreed_owner(hot).await, Ok(Some((_, owner))) if owner != victim)
    })
    .await;
    let renamed_after = paused_at.elapsed();
    assert!(
        renamed,
        "the live nodes still route shard {shard} to the paused {victim_id}"
    );
    let claimed = eventually(SETTLE, || async {
        matches!(cluster.fence(shard).await, Ok(Some((fence, owner))) if owner != victim_id && fence > fence_before)
    })
    .await;
    let claimed_after = paused_at.elapsed();
    assert!(
        claimed,
        "nobody claimed shard {shard} in PostgreSQL while {victim_id} was paused: {:?}",
        cluster.fence(shard).await?
    );
    load.wait_progress(200, true).await?;
    // Reported, not asserted: how long the hot wallet was out of reach.
    eprintln!(
        "paused {victim_id}: renamed after {renamed_after:?}, claimed after {claimed_after:?}, \
         200 more operations on the hot wallet after {:?}",
        paused_at.elapsed()
    );

    // Woken up, the old owner still believes it owns the shard for a moment: whatever
    // it commits now must be refused by the fence, and its requests go elsewhere.
    cluster.resume(victim)?;
    let dropped = eventually(SETTLE, || async {
        match cluster.nodes[victim].cluster_view().await {
            Ok(view) => !view["ownedShards"]
                .as_array()
                .is_some_and(|owned| owned.iter().any(|s| s.as_u64() == Some(u64::from(shard)))),
            Err(_) => false,
        }
    })
    .await;
    assert!(
        dropped,
        "{victim_id} kept serving shard {shard} after it was claimed"
    );
    let fence_rejections = cluster.nodes[victim]
        .metric("wallet_fence_rejections_total")
        .await?;
    let lease_losses = cluster.nodes[victim]
        .metric("wallet_lease_losses_total")
        .await?;

    load.add_target(victim, cluster.nodes[victim].api.clone());
    cluster.wait_settled(3).await?;
    load.wait_progress(200, true).await?;
    let records = load.stop().await?;

    let report = audit(&cluster, &wallets, &records, 1).await?;
    eprintln!(
        "SIGSTOP of the owner: fence rejections {fence_rejections}, lease losses {lease_losses}: {report:?}"
    );
    // The old owner noticed it lost the shard (fence or lease) rather than committing.
    assert!(fence_rejections + lease_losses > 0.0);
    // A 503 may answer a request that waited past its deadline; the audit has already
    // failed if the operation of one was applied all the same.
    assert!(
        report.unexpected(&[503]).is_empty(),
        "{:?}",
        report.by_status
    );
    let cut: Vec<_> = records
        .iter()
        .filter(|r| matches!(r.answer, Answered::Transport(_)))
        .collect();
    assert!(cut.is_empty(), "requests got no answer at all: {cut:?}");
    Ok(())
}
