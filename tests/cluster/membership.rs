//! A node joins and another leaves under load: rendezvous hashing moves about 1/N of
//! the shards, only to the joining node and only from the leaving one.

use std::collections::BTreeMap;

use crate::harness::{Load, TestCluster, audit};

/// Shards whose owner differs between two maps, with (before, after).
fn moved(
    before: &BTreeMap<u32, String>,
    after: &BTreeMap<u32, String>,
) -> Vec<(u32, String, String)> {
    before
        .iter()
        .filter_map(|(shard, owner)| {
            let now = after.get(shard)?;
            (now != owner).then(|| (*shard, owner.clone(), now.clone()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_and_a_leave_move_only_their_share_of_shards_and_lose_nothing() -> anyhow::Result<()>
{
    let mut cluster = TestCluster::start(3, |_| {}).await?;
    let shards = cluster.options.shards as usize;
    let wallets = cluster.funded_wallets(8, "1000.00").await?;
    let load = Load::start(&cluster, &wallets);
    load.wait_progress(200, false).await?;
    let three = cluster.wait_settled(3).await?;

    let joined = cluster.add_node().await?;
    let joined_id = cluster.nodes[joined].node_id.clone();
    load.add_target(joined, cluster.nodes[joined].api.clone());
    let four = cluster.wait_settled(4).await?;
    let join_moves = moved(&three, &four);
    eprintln!(
        "{joined_id} joined: {} of {shards} shards moved",
        join_moves.len()
    );
    assert!(!join_moves.is_empty(), "the new node got no shard");
    assert!(join_moves.len() <= shards / 4 * 2, "{join_moves:?}");
    assert!(
        join_moves.iter().all(|(_, _, to)| *to == joined_id),
        "a join moved shards between old members: {join_moves:?}"
    );
    load.wait_progress(200, false).await?;

    let leaving = 1;
    let leaving_id = cluster.nodes[leaving].node_id.clone();
    load.drain(leaving).await?;
    let status = cluster.nodes[leaving].terminate().await?;
    assert!(status.success(), "{leaving_id} exited with {status}");
    let after = cluster.wait_settled(3).await?;
    let leave_moves = moved(&four, &after);
    eprintln!(
        "{leaving_id} left: {} of {shards} shards moved",
        leave_moves.len()
    );
    assert!(!leave_moves.is_empty(), "the leaving node owned no shard");
    assert!(leave_moves.len() <= shards / 4 * 2, "{leave_moves:?}");
    assert!(
        leave_moves.iter().all(|(_, from, _)| *from == leaving_id),
        "a leave moved shards between staying members: {leave_moves:?}"
    );
    assert_eq!(
        leave_moves.len(),
        four.values().filter(|owner| **owner == leaving_id).count(),
        "every shard of the leaving node moved"
    );
    load.wait_progress(200, false).await?;
    let records = load.stop().await?;

    let report = audit(&cluster, &wallets, &records, 1).await?;
    eprintln!("join and leave: {report:?}");
    report.assert_all_answered_without_errors();
    Ok(())
}
