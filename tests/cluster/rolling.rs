//! A rolling restart (SIGTERM, clean exit, start again) of every node under load:
//! the graceful handoff means no 5xx and no request left without an answer.

use crate::harness::{Load, TestCluster, audit};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_answers_every_request_without_a_5xx() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3, |_| {}).await?;
    let wallets = cluster.funded_wallets(6, "1000.00").await?;
    let load = Load::start(&cluster, &wallets);
    load.wait_progress(200, false).await?;

    for index in 0..cluster.nodes.len() {
        // As Kubernetes does: out of the Service's endpoints (preStop), then SIGTERM.
        load.drain(index).await?;
        let status = cluster.nodes[index].terminate().await?;
        assert!(
            status.success(),
            "{} exited with {status}",
            cluster.nodes[index].node_id
        );
        load.wait_progress(100, true).await?;
        cluster.nodes[index].restart().await?;
        load.add_target(index, cluster.nodes[index].api.clone());
        cluster.wait_settled(3).await?;
        load.wait_progress(100, true).await?;
    }
    let records = load.stop().await?;

    let report = audit(&cluster, &wallets, &records, 1).await?;
    eprintln!("rolling restart: {report:?}");
    report.assert_all_answered_without_errors();
    assert_eq!(report.unknown, 0);
    Ok(())
}
