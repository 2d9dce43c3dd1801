//! Reads from an owner's memory rely on its lease: they stop before any other node could
//! have taken the shard, even while the owner keeps the shard for its (fenced) writes.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const CONVERGE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_stop_before_the_lease_can_lapse_while_redis_is_cut_and_resume_after() {
    let db = TestDb::new().await;
    let proxy = TcpProxy::redis().await;
    let prefix = prefix();
    let ledger = Arc::new(Ledger::default());
    let shards = 4;
    let cfg = config("node-a", &prefix, shards);
    let ttl = cfg.lease_ttl;

    let a = start_node(cfg, &proxy.redis_pool(), &db.pool, &ledger);
    eventually("a owns everything and answers reads", CONVERGE, || {
        ledger.active_count() == shards as usize && (0..shards).all(|s| a.cluster.serves_reads(s))
    })
    .await;

    proxy.cut();
    let cut = Instant::now();
    // The last renewal Redis granted was sent before the cut, so by cut + TTL another
    // node may hold the lease: no read may come from memory after that.
    let mut stopped = false;
    while cut.elapsed() < ttl * 3 {
        let serving = (0..shards).any(|s| a.cluster.serves_reads(s));
        assert!(
            !(serving && cut.elapsed() >= ttl),
            "reads from memory {:?} after the cut, with a {ttl:?} lease",
            cut.elapsed()
        );
        stopped |= !serving;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stopped, "reads never stopped");
    assert_eq!(
        ledger.active_count(),
        shards as usize,
        "the shards are kept for writes, which PostgreSQL's fence guards"
    );

    proxy.restore();
    eventually("reads from memory again", CONVERGE, || {
        (0..shards).all(|s| a.cluster.serves_reads(s))
    })
    .await;

    a.cluster.shutdown().await;
    assert!(
        (0..shards).all(|s| !a.cluster.serves_reads(s)),
        "a node that handed its shards off answers no read from memory"
    );
    ledger.assert_no_violations();
    flush_prefix(&redis_pool(), &prefix).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_found_in_other_hands_stops_reads_of_that_shard_only() {
    let db = TestDb::new().await;
    let redis = redis_pool();
    let prefix = prefix();
    let ledger = Arc::new(Ledger::default());
    let shards = 4;

    let a = start_node(config("node-a", &prefix, shards), &redis, &db.pool, &ledger);
    eventually("a answers reads of every shard", CONVERGE, || {
        (0..shards).all(|s| a.cluster.serves_reads(s))
    })
    .await;

    let mut conn = redis.get().await.expect("redis");
    let _: () = redis::cmd("SET")
        .arg(wallet_cluster::lease::Leases::lease_key(&prefix, 1))
        .arg("intruder#0")
        .arg("PX")
        .arg(1500)
        .query_async(&mut *conn)
        .await
        .expect("SET");
    eventually("a stops reading shard 1", CONVERGE, || {
        !a.cluster.serves_reads(1)
    })
    .await;
    assert!(
        [0, 2, 3].iter().all(|s| a.cluster.serves_reads(*s)),
        "only shard 1 is affected"
    );

    a.cluster.shutdown().await;
    ledger.assert_no_violations();
    flush_prefix(&redis, &prefix).await;
    db.drop_db().await;
}
