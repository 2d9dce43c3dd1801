//! Redis membership: heartbeats, expiry, deregistration, and riding out an outage.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wallet_cluster::{ClusterMetrics, Membership, RedisMembership};

const CONVERGE: Duration = Duration::from_secs(20);

fn ids(view: &watch::Receiver<Vec<wallet_cluster::Member>>) -> Vec<String> {
    view.borrow().iter().map(|m| m.id.clone()).collect()
}

struct Running {
    membership: Arc<RedisMembership>,
    view: watch::Receiver<Vec<wallet_cluster::Member>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn run(node: &str, prefix: &str, pool: deadpool_redis::Pool) -> Running {
    let registry = prometheus::Registry::new();
    let metrics = ClusterMetrics::register(&registry).expect("metrics");
    let membership = Arc::new(
        RedisMembership::new(&config(node, prefix, 8), pool, metrics).expect("membership"),
    );
    let (tx, view) = watch::channel(Vec::new());
    let stop = CancellationToken::new();
    let task = {
        let (m, stop) = (membership.clone(), stop.clone());
        tokio::spawn(async move { m.run(tx, stop).await.expect("run") })
    };
    Running {
        membership,
        view,
        stop,
        task,
    }
}

#[tokio::test]
async fn members_see_each_other_sorted_and_a_leaver_disappears() {
    let redis = redis_pool();
    let prefix = prefix();
    let b = run("node-b", &prefix, redis.clone());
    let a = run("node-a", &prefix, redis.clone());
    eventually("both see both", CONVERGE, || {
        ids(&a.view) == ["node-a", "node-b"] && ids(&b.view) == ["node-a", "node-b"]
    })
    .await;
    assert_eq!(a.view.borrow()[0].internal_addr, "node-a.test:8090");
    assert!(a.membership.is_registered(&a.view.borrow(), "node-a"));
    assert!(!a.membership.is_registered(&a.view.borrow(), "node-z"));

    // Leaving removes the entry at once rather than after the heartbeat TTL; a
    // refresh makes a see it on the next read.
    b.stop.cancel();
    b.task.await.expect("b stopped");
    let mut conn = redis.get().await.expect("redis");
    let left: Vec<String> = redis::cmd("ZRANGE")
        .arg(RedisMembership::key(&prefix))
        .arg(0)
        .arg(-1)
        .query_async(&mut *conn)
        .await
        .expect("ZRANGE");
    assert_eq!(left.len(), 1, "only a is left: {left:?}");
    a.membership.refresh();
    eventually("a sees b leave", CONVERGE, || ids(&a.view) == ["node-a"]).await;
    a.stop.cancel();
    a.task.await.expect("a stopped");
    flush_prefix(&redis, &prefix).await;
}

#[tokio::test]
async fn a_member_that_stops_heartbeating_expires() {
    let redis = redis_pool();
    let prefix = prefix();
    let a = run("node-a", &prefix, redis.clone());
    eventually("a registered", CONVERGE, || ids(&a.view) == ["node-a"]).await;

    // A crashed node: one heartbeat, valid for 300 ms by Redis's clock, then nothing.
    let mut conn = redis.get().await.expect("redis");
    let (secs, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut *conn)
        .await
        .expect("TIME");
    let expiry = secs * 1000 + micros / 1000 + 300;
    let _: i64 = redis::cmd("ZADD")
        .arg(RedisMembership::key(&prefix))
        .arg(expiry)
        .arg(r#"{"id":"ghost","internalAddr":"10.9.9.9:8090"}"#)
        .query_async(&mut *conn)
        .await
        .expect("ZADD");
    a.membership.refresh();
    eventually("a sees the ghost", CONVERGE, || {
        ids(&a.view) == ["ghost", "node-a"]
    })
    .await;
    eventually("the ghost expires", CONVERGE, || ids(&a.view) == ["node-a"]).await;
    let entries: i64 = redis::cmd("ZCARD")
        .arg(RedisMembership::key(&prefix))
        .query_async(&mut *conn)
        .await
        .expect("ZCARD");
    assert_eq!(entries, 1, "expired entries are removed from the set");
    a.stop.cancel();
    a.task.await.expect("a stopped");
    flush_prefix(&redis, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_redis_outage_the_view_and_the_shards_are_kept() {
    let db = TestDb::new().await;
    let redis = redis_pool();
    let proxy = TcpProxy::redis().await;
    let prefix = prefix();
    let ledger = Arc::new(Ledger::default());
    let shards = 8;

    let a = start_node(
        config("node-a", &prefix, shards),
        &proxy.redis_pool(),
        &db.pool,
        &ledger,
    );
    eventually("a owns everything", CONVERGE, || {
        ledger.active_count() == shards as usize
    })
    .await;
    let view = a.cluster.snapshot().members;

    proxy.cut();
    // Several failed heartbeats and renewals later, nothing changed.
    eventually("renewals fail", CONVERGE, || {
        counter_with(
            &a.registry,
            "wallet_cluster_redis_errors_total",
            ("operation", "lease"),
        ) >= 3.0
            && counter_with(
                &a.registry,
                "wallet_cluster_redis_errors_total",
                ("operation", "membership"),
            ) >= 3.0
    })
    .await;
    assert_eq!(
        ledger.active_count(),
        shards as usize,
        "shards kept during the outage"
    );
    assert_eq!(
        a.cluster.snapshot().members,
        view,
        "view kept during the outage"
    );
    assert!(a.cluster.is_ready());

    proxy.restore();
    // Renewals resume (restoring any lease that lapsed) and the owner keeps its shards.
    eventually_async("leases back in Redis", CONVERGE, || async {
        let mut conn = redis.get().await.expect("redis");
        let mut all = true;
        for shard in 0..shards {
            let holder: Option<String> = redis::cmd("GET")
                .arg(wallet_cluster::lease::Leases::lease_key(&prefix, shard))
                .query_async(&mut *conn)
                .await
                .expect("GET");
            all &= holder.is_some_and(|h| h.starts_with("node-a#"));
        }
        all
    })
    .await;
    assert_eq!(ledger.active_count(), shards as usize);
    assert_eq!(
        ledger.activation_counts().values().sum::<usize>(),
        shards as usize,
        "no shard churned"
    );

    a.cluster.shutdown().await;
    ledger.assert_no_violations();
    flush_prefix(&redis, &prefix).await;
    db.drop_db().await;
}
