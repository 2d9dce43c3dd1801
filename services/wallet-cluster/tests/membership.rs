//! Redis membership: heartbeats, expiry, deregistration, and riding out an outage.

mod common;

use std::collections::BTreeMap;
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
    registry: prometheus::Registry,
    view: watch::Receiver<Vec<wallet_cluster::Member>>,
    stop: CancellationToken,
    /// Whether the node can use its database; false makes it leave until it is true again.
    eligible: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn run(node: &str, prefix: &str, pool: deadpool_redis::Pool) -> Running {
    run_with(config(node, prefix, 8), pool)
}

fn run_with(config: wallet_cluster::ClusterConfig, pool: deadpool_redis::Pool) -> Running {
    let registry = prometheus::Registry::new();
    let metrics = ClusterMetrics::register(&registry).expect("metrics");
    let membership = Arc::new(RedisMembership::new(&config, pool, metrics).expect("membership"));
    let (tx, view) = watch::channel(Vec::new());
    let stop = CancellationToken::new();
    let (eligible, eligible_rx) = watch::channel(true);
    let task = {
        let (m, stop) = (membership.clone(), stop.clone());
        tokio::spawn(async move { m.run(tx, stop, eligible_rx).await.expect("run") })
    };
    Running {
        membership,
        registry,
        view,
        stop,
        eligible,
        task,
    }
}

/// Each member's expiry (Redis ms) in the member set.
async fn expiries(redis: &deadpool_redis::Pool, prefix: &str) -> BTreeMap<String, f64> {
    let mut conn = redis.get().await.expect("redis");
    let entries: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(RedisMembership::key(prefix))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut *conn)
        .await
        .expect("ZRANGE");
    entries
        .into_iter()
        .map(|(json, expiry)| {
            let member: wallet_cluster::Member = serde_json::from_str(&json).expect("member");
            (member.id, expiry)
        })
        .collect()
}

async fn exists(redis: &deadpool_redis::Pool, key: &str) -> bool {
    let mut conn = redis.get().await.expect("redis");
    redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut *conn)
        .await
        .expect("EXISTS")
}

fn tombstone(prefix: &str, node: &str) -> String {
    format!("{prefix}:left:{node}")
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
        .arg(RedisMembership::entry(
            &wallet_cluster::Member {
                id: "ghost".into(),
                internal_addr: "10.9.9.9:8090".into(),
            },
            &prefix,
            &keys(),
        ))
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

#[tokio::test]
async fn member_entries_without_a_valid_signature_are_ignored_logged_and_counted() {
    let redis = redis_pool();
    let prefix = prefix();
    let a = run("node-a", &prefix, redis.clone());
    eventually("a registered", CONVERGE, || ids(&a.view) == ["node-a"]).await;

    // Whoever can write to Redis, without the internal secret: a new member pointing at
    // their address, a real member's entry with the address changed, one signed with a
    // guessed secret, and garbage. Each lives far longer than the test.
    let evil = |id: &str| wallet_cluster::Member {
        id: id.into(),
        internal_addr: "10.6.6.6:8090".into(),
    };
    let mut conn = redis.get().await.expect("redis");
    let real: Vec<String> = redis::cmd("ZRANGE")
        .arg(RedisMembership::key(&prefix))
        .arg(0)
        .arg(-1)
        .query_async(&mut *conn)
        .await
        .expect("ZRANGE");
    let forged = [
        (
            "unsigned",
            serde_json::to_string(&evil("node-evil")).expect("json"),
        ),
        (
            "bad_signature",
            real[0].replace("node-a.test:8090", "10.6.6.6:8090"),
        ),
        (
            "bad_signature",
            RedisMembership::entry(
                &evil("node-guess"),
                &prefix,
                &wallet_cluster::SigningKeys::new("guessed".into(), None),
            ),
        ),
        ("malformed", "{not json".to_owned()),
    ];
    for (_, entry) in &forged {
        let _: i64 = redis::cmd("ZADD")
            .arg(RedisMembership::key(&prefix))
            .arg(i64::MAX / 2)
            .arg(entry)
            .query_async(&mut *conn)
            .await
            .expect("ZADD");
    }
    a.membership.refresh();
    eventually("each forged entry is counted once", CONVERGE, || {
        [
            ("unsigned", 1.0),
            ("bad_signature", 2.0),
            ("malformed", 1.0),
        ]
        .iter()
        .all(|(reason, n)| {
            counter_with(
                &a.registry,
                "wallet_member_entries_rejected_total",
                ("reason", reason),
            ) == *n
        })
    })
    .await;
    // Many reads later (b joins), the view never took them and the count did not grow.
    let b = run("node-b", &prefix, redis.clone());
    eventually("a sees b, signed with the shared secret", CONVERGE, || {
        ids(&a.view) == ["node-a", "node-b"]
    })
    .await;
    assert!(
        a.view
            .borrow()
            .iter()
            .all(|member| member.internal_addr.ends_with(".test:8090")),
        "{:?}",
        a.view.borrow()
    );
    assert_eq!(
        counter_with(
            &a.registry,
            "wallet_member_entries_rejected_total",
            ("reason", "bad_signature")
        ),
        2.0
    );
    for node in [a, b] {
        node.stop.cancel();
        node.task.await.expect("stopped");
    }
    flush_prefix(&redis, &prefix).await;
}

#[tokio::test]
async fn members_with_the_old_and_the_new_secret_see_each_other_during_a_rotation() {
    let redis = redis_pool();
    let prefix = prefix();
    let with = |node, keys| wallet_cluster::ClusterConfig {
        keys,
        ..config(node, &prefix, 8)
    };
    let old = || wallet_cluster::SigningKeys::new("old-secret".into(), None);
    let a = run_with(with("node-a", old()), redis.clone());
    let b = run_with(
        with(
            "node-b",
            wallet_cluster::SigningKeys::new("new-secret".into(), Some("old-secret".into())),
        ),
        redis.clone(),
    );
    // a has not switched yet but already holds the new secret as its previous one.
    let c = run_with(
        with(
            "node-c",
            wallet_cluster::SigningKeys::new("old-secret".into(), Some("new-secret".into())),
        ),
        redis.clone(),
    );
    eventually("b and c see everyone", CONVERGE, || {
        ids(&b.view) == ["node-a", "node-b", "node-c"]
            && ids(&c.view) == ["node-a", "node-b", "node-c"]
    })
    .await;
    // a, which knows only the old secret, ignores b's entry.
    eventually("a ignores b", CONVERGE, || {
        counter_with(
            &a.registry,
            "wallet_member_entries_rejected_total",
            ("reason", "bad_signature"),
        ) == 1.0
    })
    .await;
    assert_eq!(ids(&a.view), ["node-a", "node-c"]);
    for node in [a, b, c] {
        node.stop.cancel();
        node.task.await.expect("stopped");
    }
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

#[tokio::test]
async fn a_wiped_member_set_does_not_shrink_the_view() {
    let redis = redis_pool();
    let prefix = prefix();
    let a = run("node-a", &prefix, redis.clone());
    let b = run("node-b", &prefix, redis.clone());
    eventually("both see both", CONVERGE, || {
        ids(&a.view) == ["node-a", "node-b"] && ids(&b.view) == ["node-a", "node-b"]
    })
    .await;
    let mut views = [a.view.clone(), b.view.clone()];
    for view in &mut views {
        view.mark_unchanged();
    }

    // What FLUSHALL or a restart without persistence does, limited to this test's keys.
    flush_prefix(&redis, &prefix).await;
    // The first heartbeat after the wipe finds only its own node. Once both nodes have
    // heartbeated twice since, each has published what its first read found.
    eventually_async("both re-registered", CONVERGE, || async {
        expiries(&redis, &prefix).await.len() == 2
    })
    .await;
    let registered = expiries(&redis, &prefix).await;
    eventually_async("both heartbeat again", CONVERGE, || {
        let (redis, prefix, registered) = (&redis, &prefix, &registered);
        async move {
            let now = expiries(redis, prefix).await;
            now.len() == 2 && now.iter().all(|(id, e)| registered.get(id) < Some(e))
        }
    })
    .await;
    for view in &views {
        assert!(
            !view.has_changed().expect("membership running"),
            "a view changed after the wipe: {:?}",
            *view.borrow()
        );
    }
    assert_eq!(ids(&a.view), ["node-a", "node-b"]);
    assert_eq!(ids(&b.view), ["node-a", "node-b"]);

    // A member lost in a wipe that never comes back still expires.
    b.task.abort();
    let _ = b.task.await;
    flush_prefix(&redis, &prefix).await;
    eventually("b expires from a's view", CONVERGE, || {
        ids(&a.view) == ["node-a"]
    })
    .await;
    a.stop.cancel();
    a.task.await.expect("a stopped");
    flush_prefix(&redis, &prefix).await;
}

#[tokio::test]
async fn a_leaver_disappears_before_its_heartbeat_expires_and_may_come_back() {
    let redis = redis_pool();
    let prefix = prefix();
    // A TTL far beyond the wait below: only the leave itself can make b disappear.
    let long = |node| wallet_cluster::ClusterConfig {
        heartbeat_ttl: Duration::from_secs(120),
        ..config(node, &prefix, 8)
    };
    let a = run_with(long("node-a"), redis.clone());
    let b = run_with(long("node-b"), redis.clone());
    eventually("a sees both", CONVERGE, || {
        ids(&a.view) == ["node-a", "node-b"]
    })
    .await;

    b.stop.cancel();
    b.task.await.expect("b stopped");
    assert!(exists(&redis, &tombstone(&prefix, "node-b")).await);
    eventually("a sees b leave", CONVERGE, || ids(&a.view) == ["node-a"]).await;

    // Coming back clears the tombstone before registering again.
    let b = run_with(long("node-b"), redis.clone());
    eventually("a sees b again", CONVERGE, || {
        ids(&a.view) == ["node-a", "node-b"]
    })
    .await;
    assert!(!exists(&redis, &tombstone(&prefix, "node-b")).await);
    for node in [a, b] {
        node.stop.cancel();
        node.task.await.expect("stopped");
    }
    flush_prefix(&redis, &prefix).await;
}

#[tokio::test]
async fn a_node_that_cannot_use_its_database_leaves_at_once_and_rejoins_when_it_can() {
    let redis = redis_pool();
    let prefix = prefix();
    // A TTL far beyond the wait below: only leaving can make b disappear this soon.
    let long = |node| wallet_cluster::ClusterConfig {
        heartbeat_ttl: Duration::from_secs(120),
        ..config(node, &prefix, 8)
    };
    let a = run_with(long("node-a"), redis.clone());
    let b = run_with(long("node-b"), redis.clone());
    eventually("both see both", CONVERGE, || {
        ids(&a.view) == ["node-a", "node-b"] && ids(&b.view) == ["node-a", "node-b"]
    })
    .await;

    b.eligible.send_replace(false);
    eventually("a sees b leave", CONVERGE, || ids(&a.view) == ["node-a"]).await;
    eventually("b no longer counts itself", CONVERGE, || {
        !b.membership.is_registered(&b.view.borrow(), "node-b")
    })
    .await;

    b.eligible.send_replace(true);
    eventually("a sees b again", CONVERGE, || {
        ids(&a.view) == ["node-a", "node-b"]
    })
    .await;
    assert!(!exists(&redis, &tombstone(&prefix, "node-b")).await);
    for node in [a, b] {
        node.stop.cancel();
        node.task.await.expect("stopped");
    }
    flush_prefix(&redis, &prefix).await;
}

#[tokio::test]
async fn a_member_that_dies_without_leaving_expires_after_its_ttl() {
    let redis = redis_pool();
    let prefix = prefix();
    let a = run("node-a", &prefix, redis.clone());
    let b = run("node-b", &prefix, redis.clone());
    eventually("a sees both", CONVERGE, || {
        ids(&a.view) == ["node-a", "node-b"]
    })
    .await;

    // A crash: the task stops mid-loop, without deregistering.
    b.task.abort();
    let _ = b.task.await;
    assert!(!exists(&redis, &tombstone(&prefix, "node-b")).await);
    eventually("b expires from a's view", CONVERGE, || {
        ids(&a.view) == ["node-a"]
    })
    .await;
    assert_eq!(
        expiries(&redis, &prefix)
            .await
            .into_keys()
            .collect::<Vec<_>>(),
        ["node-a"]
    );
    a.stop.cancel();
    a.task.await.expect("a stopped");
    flush_prefix(&redis, &prefix).await;
}
