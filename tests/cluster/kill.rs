//! kill -9 of the node that owns a hot wallet while every node is under load.

use anyhow::Context;

use crate::harness::{Answered, Load, TestCluster, audit};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_owner_of_a_hot_wallet_loses_nothing_and_answers_no_5xx() -> anyhow::Result<()>
{
    let mut cluster = TestCluster::start(3, |_| {}).await?;
    let wallets = cluster.funded_wallets(6, "1000.00").await?;
    let hot = wallets[0];
    let (shard, victim) = cluster
        .agreed_owner(hot)
        .await?
        .context("the nodes disagree on the owner")?;
    let victim_id = cluster.nodes[victim].node_id.clone();

    let load = Load::start(&cluster, &wallets);
    load.wait_progress(200, true).await?;
    // A load balancer stops sending to a dead pod; requests in flight to it are cut.
    load.remove_target(victim);
    cluster.nodes[victim].kill().await?;

    // Once its lease expires another node claims the shard in PostgreSQL...
    let taken_over = wallet_tests::eventually(crate::harness::SETTLE, || async {
        matches!(cluster.fence(shard).await, Ok(Some((_, owner))) if owner != victim_id)
    })
    .await;
    assert!(
        taken_over,
        "nobody claimed shard {shard} after {victim_id} died"
    );
    // ...and the hot wallet keeps being served.
    load.wait_progress(200, true).await?;

    cluster.nodes[victim].restart().await?;
    load.add_target(victim, cluster.nodes[victim].api.clone());
    cluster.wait_settled(3).await?;
    load.wait_progress(200, true).await?;
    let records = load.stop().await?;

    let report = audit(&cluster, &wallets, &records, 1).await?;
    eprintln!("kill -9 of the owner: {report:?}");
    assert_eq!(report.server_errors(), 0, "5xx: {:?}", report.by_status);
    assert!(report.unexpected(&[]).is_empty(), "{:?}", report.by_status);
    // Only requests that were in flight to the killed node may have got no answer.
    let cut: Vec<_> = records
        .iter()
        .filter(|r| matches!(r.answer, Answered::Transport(_)) && r.node != victim)
        .collect();
    assert!(
        cut.is_empty(),
        "requests to live nodes got no answer: {cut:?}"
    );
    Ok(())
}
