//! Shard ownership across real nodes (Redis membership, Redis leases, PostgreSQL
//! fences): every shard served by exactly one node, rendezvous placement, handoff.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;

const SHARDS: u32 = 64;
const CONVERGE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_own_every_shard_exactly_once_and_a_third_takes_about_a_third() {
    let db = TestDb::new().await;
    let redis = redis_pool();
    let prefix = prefix();
    let ledger = Arc::new(Ledger::default());

    let a = start_node(config("node-a", &prefix, SHARDS), &redis, &db.pool, &ledger);
    let b = start_node(config("node-b", &prefix, SHARDS), &redis, &db.pool, &ledger);
    let two = expected(&["node-a", "node-b"], SHARDS);
    eventually("two nodes own the shards HRW gives them", CONVERGE, || {
        placement(&ledger, SHARDS) == two
    })
    .await;
    ledger.assert_no_violations();
    // Each node reads the membership on its own heartbeat, so views may lag a little.
    let both = members(&["node-a", "node-b"]);
    eventually("both views list both", CONVERGE, || {
        a.cluster.snapshot().members == both && b.cluster.snapshot().members == both
    })
    .await;
    assert!(a.cluster.is_ready() && b.cluster.is_ready());

    // Every node routes the same way, and its snapshot and gauge say what it serves.
    for shard in 0..SHARDS {
        let owner = a.cluster.owner_of(shard).expect("owner");
        assert_eq!(Some(owner.clone()), b.cluster.owner_of(shard));
        assert_eq!(owner.id, two[&shard]);
        assert_eq!(owner.internal_addr, format!("{}.test:8090", owner.id));
    }
    let a_expected: Vec<u32> = two
        .iter()
        .filter(|(_, o)| *o == "node-a")
        .map(|(s, _)| *s)
        .collect();
    // The host hears of a shard just before the node records it as owned.
    eventually("a's snapshot lists its shards", CONVERGE, || {
        a.cluster.snapshot().owned_shards == a_expected
    })
    .await;
    let snap = a.cluster.snapshot();
    assert_eq!(
        gauge(&a.registry, "wallet_owned_shards"),
        a_expected.len() as f64
    );
    eventually("members gauge follows the view", CONVERGE, || {
        gauge(&a.registry, "wallet_cluster_members") == 2.0
    })
    .await;
    let json = serde_json::to_value(&snap).expect("json");
    assert!(json.get("ownedShards").is_some() && json["members"][0].get("internalAddr").is_some());

    // PostgreSQL holds every claim with the fence the host was activated with.
    let rows: Vec<(i32, i64, String)> =
        sqlx::query_as("SELECT shard, fence, owner FROM shard_fences ORDER BY shard")
            .fetch_all(&db.pool)
            .await
            .expect("fences");
    assert_eq!(rows.len(), SHARDS as usize);
    let last = ledger.last_fences();
    for (shard, fence, owner) in rows {
        assert_eq!(last[&(shard as u32)], fence);
        assert_eq!(owner, two[&(shard as u32)]);
    }

    // Startup may move shards while the members discover each other; count from here.
    let counts = ledger.activation_counts();
    let c = start_node(config("node-c", &prefix, SHARDS), &redis, &db.pool, &ledger);
    let three = expected(&["node-a", "node-b", "node-c"], SHARDS);
    eventually(
        "three nodes own the shards HRW gives them",
        CONVERGE,
        || placement(&ledger, SHARDS) == three,
    )
    .await;
    ledger.assert_no_violations();
    let moved: Vec<u32> = (0..SHARDS).filter(|s| two[s] != three[s]).collect();
    assert!(
        moved.iter().all(|s| three[s] == "node-c"),
        "a shard moved between old members"
    );
    // 64/3 ≈ 21 expected.
    assert!(
        (10..=32).contains(&moved.len()),
        "{} of {SHARDS} shards moved",
        moved.len()
    );
    let after = ledger.activation_counts();
    for shard in 0..SHARDS {
        // Each moved shard was activated once more (on c), the others not at all.
        let extra = usize::from(moved.contains(&shard));
        assert_eq!(
            after[&shard],
            counts[&shard] + extra,
            "shard {shard}: {:?}",
            ledger.activations(shard)
        );
    }
    for shard in moved {
        let history = ledger.activations(shard);
        assert!(
            history.windows(2).all(|w| w[0].1 < w[1].1),
            "fence must grow: {history:?}"
        );
    }

    for node in [&a, &b, &c] {
        node.cluster.shutdown().await;
    }
    assert_eq!(ledger.active_count(), 0, "shutdown leaves nothing active");
    ledger.assert_no_violations();
    flush_prefix(&redis, &prefix).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shut_down_hands_its_shards_to_the_others() {
    let db = TestDb::new().await;
    let redis = redis_pool();
    let prefix = prefix();
    let ledger = Arc::new(Ledger::default());

    let a = start_node(config("node-a", &prefix, SHARDS), &redis, &db.pool, &ledger);
    let b = start_node(config("node-b", &prefix, SHARDS), &redis, &db.pool, &ledger);
    let c = start_node(config("node-c", &prefix, SHARDS), &redis, &db.pool, &ledger);
    let three = expected(&["node-a", "node-b", "node-c"], SHARDS);
    eventually("three nodes converge", CONVERGE, || {
        placement(&ledger, SHARDS) == three
    })
    .await;
    let b_had: Vec<u32> = (0..SHARDS).filter(|s| three[s] == "node-b").collect();
    let counts = ledger.activation_counts();

    let all = members(&["node-a", "node-b", "node-c"]);
    eventually("b sees everyone", CONVERGE, || {
        b.cluster.snapshot().members == all
    })
    .await;
    b.cluster.shutdown().await;
    // While (and after) b shuts down it routes b's shards to their next owners.
    let two = expected(&["node-a", "node-c"], SHARDS);
    for shard in 0..SHARDS {
        assert_eq!(
            b.cluster.owner_of(shard).map(|m| m.id).as_deref(),
            Some(two[&shard].as_str())
        );
    }
    // Handoff is complete when shutdown returns: nothing of b is active any more.
    assert!(!ledger.active().contains_key("node-b"));
    assert!(!b.cluster.is_ready());
    assert!(b.cluster.snapshot().owned_shards.is_empty());

    eventually("a and c take over b's shards", CONVERGE, || {
        placement(&ledger, SHARDS) == two
    })
    .await;
    ledger.assert_no_violations();
    let after = ledger.activation_counts();
    for shard in 0..SHARDS {
        // Only b's shards changed hands, once each.
        let extra = usize::from(b_had.contains(&shard));
        assert_eq!(after[&shard], counts[&shard] + extra, "shard {shard}");
    }
    eventually("a's view drops b", CONVERGE, || {
        a.cluster.snapshot().members == members(&["node-a", "node-c"])
    })
    .await;

    a.cluster.shutdown().await;
    c.cluster.shutdown().await;
    ledger.assert_no_violations();
    flush_prefix(&redis, &prefix).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_whose_fence_moved_is_dropped_and_taken_again_with_a_higher_fence() {
    let db = TestDb::new().await;
    let redis = redis_pool();
    let prefix = prefix();
    let ledger = Arc::new(Ledger::default());
    let shards = 4;

    let a = start_node(config("node-a", &prefix, shards), &redis, &db.pool, &ledger);
    eventually("a owns everything", CONVERGE, || {
        ledger.active_count() == shards as usize
    })
    .await;
    let before = ledger.last_fences()[&2];

    // The executor saw the fence move (it reports the shard); the node lets go at once.
    a.fence_lost.send(2).await.expect("channel open");
    eventually("shard 2 dropped", CONVERGE, || ledger.owner(2).is_none()).await;
    assert_eq!(counter(&a.registry, "wallet_lease_losses_total"), 1.0);

    // Nobody else holds the lease, so HRW's owner claims it again, with a new fence.
    eventually("shard 2 re-acquired", CONVERGE, || {
        ledger.owner(2).is_some()
    })
    .await;
    assert!(ledger.last_fences()[&2] > before);

    a.cluster.shutdown().await;
    ledger.assert_no_violations();
    flush_prefix(&redis, &prefix).await;
    db.drop_db().await;
}

/// A membership source that publishes a fixed list.
struct Fixed(Vec<wallet_cluster::Member>);

#[async_trait::async_trait]
impl wallet_cluster::Membership for Fixed {
    async fn run(
        &self,
        tx: tokio::sync::watch::Sender<Vec<wallet_cluster::Member>>,
        shutdown: tokio_util::sync::CancellationToken,
        _eligible: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), wallet_cluster::ClusterError> {
        tx.send_replace(self.0.clone());
        shutdown.cancelled().await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_missing_from_the_view_is_not_ready_and_routes_elsewhere() {
    let db = TestDb::new().await;
    let redis = redis_pool();
    let prefix = prefix();
    let ledger = Arc::new(Ledger::default());
    let registry = prometheus::Registry::new();
    let metrics = wallet_cluster::ClusterMetrics::register(&registry).expect("metrics");
    let (_fence_lost, rx) = tokio::sync::mpsc::channel(16);
    let (_usable, usable) = tokio::sync::watch::channel(true);
    let cluster = wallet_cluster::Cluster::start(
        config("node-a", &prefix, SHARDS),
        redis.clone(),
        db.pool.clone(),
        Arc::new(Fixed(members(&["node-b"]))),
        Arc::new(FakeHost {
            node: "node-a".into(),
            ledger: ledger.clone(),
        }),
        rx,
        usable,
        metrics,
    )
    .expect("start");
    eventually("view published", CONVERGE, || {
        !cluster.snapshot().members.is_empty()
    })
    .await;
    assert!(!cluster.is_ready());
    for shard in 0..SHARDS {
        assert_eq!(
            cluster.owner_of(shard).map(|m| m.id).as_deref(),
            Some("node-b")
        );
    }
    cluster.shutdown().await;
    assert_eq!(
        ledger.activation_counts().len(),
        0,
        "HRW never picks a node outside the view"
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_found_in_other_hands_at_renewal_deactivates_the_shard() {
    let db = TestDb::new().await;
    let redis = redis_pool();
    let prefix = prefix();
    let ledger = Arc::new(Ledger::default());
    let shards = 4;

    let a = start_node(config("node-a", &prefix, shards), &redis, &db.pool, &ledger);
    eventually("a owns everything", CONVERGE, || {
        ledger.active_count() == shards as usize
    })
    .await;
    let before = ledger.last_fences()[&1];

    // Another node took the lease (as after a's lease lapsed during a pause) and
    // holds it a little while.
    let mut conn = redis.get().await.expect("redis");
    let _: () = redis::cmd("SET")
        .arg(wallet_cluster::lease::Leases::lease_key(&prefix, 1))
        .arg("intruder#0")
        .arg("PX")
        .arg(1500)
        .query_async(&mut *conn)
        .await
        .expect("SET");
    eventually("a lets shard 1 go", CONVERGE, || ledger.owner(1).is_none()).await;
    assert_eq!(counter(&a.registry, "wallet_lease_losses_total"), 1.0);
    assert_eq!(
        ledger.active_count(),
        shards as usize - 1,
        "only shard 1 is affected"
    );

    // Once the intruder's lease runs out, HRW's owner takes the shard back with a new fence.
    eventually("a takes shard 1 back", CONVERGE, || {
        ledger.owner(1).is_some()
    })
    .await;
    assert!(ledger.last_fences()[&1] > before);

    a.cluster.shutdown().await;
    ledger.assert_no_violations();
    flush_prefix(&redis, &prefix).await;
    db.drop_db().await;
}
