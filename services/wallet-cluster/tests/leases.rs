//! Leases and fences: a dead owner's lease, a Redis that forgot its counters, a
//! stale owner's claim.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use wallet_cluster::fence::{claim_fence, current_fence};
use wallet_cluster::lease::{Leases, Renewal};

const CONVERGE: Duration = Duration::from_secs(20);

async fn get(pool: &deadpool_redis::Pool, key: &str) -> Option<String> {
    let mut conn = pool.get().await.expect("redis");
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut *conn)
        .await
        .expect("GET")
}

#[tokio::test]
async fn a_stale_claim_with_a_lower_or_equal_token_updates_nothing() {
    let db = TestDb::new().await;
    assert_eq!(current_fence(&db.pool, 7).await.expect("read"), None);
    assert!(claim_fence(&db.pool, 7, 5, "node-a").await.expect("claim"));
    assert!(
        !claim_fence(&db.pool, 7, 3, "node-b").await.expect("claim"),
        "lower token"
    );
    assert!(
        !claim_fence(&db.pool, 7, 5, "node-b").await.expect("claim"),
        "equal token"
    );
    let owner: String = sqlx::query_scalar("SELECT owner FROM shard_fences WHERE shard = 7")
        .fetch_one(&db.pool)
        .await
        .expect("owner");
    assert_eq!(
        (
            current_fence(&db.pool, 7).await.expect("read"),
            owner.as_str()
        ),
        (Some(5), "node-a")
    );
    assert!(claim_fence(&db.pool, 7, 6, "node-b").await.expect("claim"));
    assert_eq!(current_fence(&db.pool, 7).await.expect("read"), Some(6));

    db.drop_db().await;
}

#[tokio::test]
async fn lease_scripts_only_let_the_holder_renew_and_release() {
    let redis = redis_pool();
    let prefix = prefix();
    let a = Leases::new(redis.clone(), &prefix, "node-a", 60_000);
    let b = Leases::new(redis.clone(), &prefix, "node-b", 60_000);

    assert_eq!(a.acquire(3).await.expect("acquire"), Some(1));
    assert_eq!(b.acquire(3).await.expect("acquire"), None, "held by a");
    assert_eq!(
        b.renew_many(&[3]).await.expect("renew"),
        vec![Renewal::Lost]
    );
    assert!(
        !b.release(3).await.expect("release"),
        "b must not release a's lease"
    );
    assert_eq!(
        a.renew_many(&[3]).await.expect("renew"),
        vec![Renewal::Renewed]
    );
    assert_eq!(
        get(&redis, &Leases::lease_key(&prefix, 3)).await.as_deref(),
        Some(a.holder())
    );

    // A new run of node-a takes over its predecessor's lease with a newer token; the
    // old run then finds the lease gone and cannot release the new run's lease.
    let a2 = Leases::new(redis.clone(), &prefix, "node-a", 60_000);
    assert_eq!(a2.acquire(3).await.expect("acquire"), Some(2));
    assert_eq!(
        a.renew_many(&[3]).await.expect("renew"),
        vec![Renewal::Lost]
    );
    assert!(!a.release(3).await.expect("release"));
    assert_eq!(a2.next_token(3).await.expect("token"), Some(3));
    assert_eq!(
        a.next_token(3).await.expect("token"),
        None,
        "only the holder gets tokens"
    );

    // A vanished key (flush, expiry during an outage) is set again by its last holder.
    flush_prefix(&redis, &prefix).await;
    assert_eq!(
        a2.renew_many(&[3]).await.expect("renew"),
        vec![Renewal::Restored]
    );
    assert!(a2.release(3).await.expect("release"));
    assert_eq!(get(&redis, &Leases::lease_key(&prefix, 3)).await, None);

    // Re-seeding never lowers the counter.
    a2.reseed(3, 10).await.expect("reseed");
    a2.reseed(3, 4).await.expect("reseed");
    assert_eq!(
        get(&redis, &Leases::fence_key(&prefix, 3)).await.as_deref(),
        Some("10")
    );
    assert_eq!(b.acquire(3).await.expect("acquire"), Some(11));
    flush_prefix(&redis, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_lease_is_taken_over_only_after_its_ttl() {
    let db = TestDb::new().await;
    let redis = redis_pool();
    let prefix = prefix();
    let ledger = Arc::new(Ledger::default());
    let shards = 8;
    let orphan = 5;

    // A node that took the lease and died: it never renews. Its lease is long at
    // first so the test can see the node under test wait for it, then runs out.
    let ghost = Leases::new(redis.clone(), &prefix, "ghost", 60_000);
    let ghost_token = ghost.acquire(orphan).await.expect("acquire").expect("free");
    let lease_key = Leases::lease_key(&prefix, orphan);

    let a = start_node(config("node-a", &prefix, shards), &redis, &db.pool, &ledger);
    // First see a serving every other shard while the ghost still holds the orphan's
    // lease: a node that ignored the lease would have taken all of them at once.
    eventually_async("a serves all but the orphan", CONVERGE, || async {
        let others = (0..shards)
            .filter(|s| *s != orphan)
            .all(|s| ledger.owner(s).is_some());
        let orphan_free = ledger.owner(orphan).is_none();
        others && orphan_free && get(&redis, &lease_key).await.as_deref() == Some(ghost.holder())
    })
    .await;
    let mut conn = redis.get().await.expect("redis");
    let _: i64 = redis::cmd("PEXPIRE")
        .arg(&lease_key)
        .arg(500)
        .query_async(&mut *conn)
        .await
        .expect("PEXPIRE");
    // Then, on every poll until a takes the orphan, check that it did not while the
    // ghost's lease was still there: reading the host first and the lease second
    // means a ghost lease seen by the second read existed at the first.
    eventually_async("a takes the orphan over", CONVERGE, || async {
        let taken = ledger.owner(orphan).is_some();
        let holder = get(&redis, &lease_key).await;
        if taken {
            assert_ne!(
                holder.as_deref(),
                Some(ghost.holder()),
                "activated while the ghost held the lease"
            );
        }
        taken
    })
    .await;
    assert!(ledger.last_fences()[&orphan] > ghost_token);
    assert_eq!(
        get(&redis, &lease_key)
            .await
            .as_deref()
            .map(|h| h.starts_with("node-a#")),
        Some(true)
    );

    a.cluster.shutdown().await;
    ledger.assert_no_violations();
    flush_prefix(&redis, &prefix).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_forgets_everything_claims_reseed_from_postgres_and_fences_still_grow() {
    let db = TestDb::new().await;
    let redis = redis_pool();
    let prefix = prefix();
    let ledger = Arc::new(Ledger::default());
    let shards = 16;

    let a = start_node(config("node-a", &prefix, shards), &redis, &db.pool, &ledger);
    eventually("a owns everything", CONVERGE, || {
        ledger.active_count() == shards as usize
    })
    .await;
    let before = ledger.last_fences();

    // FLUSHALL, limited to this test's keys: leases, counters and membership are gone.
    flush_prefix(&redis, &prefix).await;
    // The owner keeps serving and puts its leases back on the next renewal.
    eventually_async("a restores its leases", CONVERGE, || async {
        let mut all = true;
        for shard in 0..shards {
            all &= get(&redis, &Leases::lease_key(&prefix, shard))
                .await
                .is_some();
        }
        all
    })
    .await;
    assert_eq!(ledger.active_count(), shards as usize);

    // A joining node gets tokens from fresh counters (1, 2, ...), which PostgreSQL
    // refuses; it re-seeds from PostgreSQL and claims above the old fences.
    let b = start_node(config("node-b", &prefix, shards), &redis, &db.pool, &ledger);
    let both = expected(&["node-a", "node-b"], shards);
    eventually("a and b own their shares", CONVERGE, || {
        placement(&ledger, shards) == both
    })
    .await;
    let after = ledger.last_fences();
    for shard in ledger.active()["node-b"].iter() {
        assert!(
            after[shard] > before[shard],
            "shard {shard}: {} then {}",
            before[shard],
            after[shard]
        );
        assert_eq!(
            current_fence(&db.pool, *shard).await.expect("read"),
            Some(after[shard])
        );
    }

    a.cluster.shutdown().await;
    b.cluster.shutdown().await;
    ledger.assert_no_violations();
    flush_prefix(&redis, &prefix).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_is_down_nothing_is_activated_and_leases_are_not_kept() {
    let db = TestDb::new().await;
    let redis = redis_pool();
    let prefix = prefix();
    let ledger = Arc::new(Ledger::default());
    let shards = 4;
    let proxy = TcpProxy::start(&db.server_addr()).await;
    proxy.cut();

    let a = start_node(
        config("node-a", &prefix, shards),
        &redis,
        &db.pool_via(&proxy.addr),
        &ledger,
    );
    // Rounds run (each acquisition takes a token) but no claim gets through, and the
    // leases are given back rather than sat on.
    eventually_async("a tried to claim shard 0 twice", CONVERGE, || async {
        get(&redis, &Leases::fence_key(&prefix, 0))
            .await
            .and_then(|f| f.parse::<i64>().ok())
            >= Some(2)
    })
    .await;
    eventually_async("no lease kept", CONVERGE, || async {
        let mut none = true;
        for shard in 0..shards {
            none &= get(&redis, &Leases::lease_key(&prefix, shard))
                .await
                .is_none();
        }
        none
    })
    .await;
    assert_eq!(ledger.active_count(), 0);
    assert_eq!(current_fence(&db.pool, 0).await.expect("read"), None);

    proxy.restore();
    eventually(
        "a owns everything once PostgreSQL is back",
        CONVERGE,
        || ledger.active_count() == shards as usize,
    )
    .await;
    for (shard, fence) in ledger.last_fences() {
        assert_eq!(
            current_fence(&db.pool, shard).await.expect("read"),
            Some(fence)
        );
    }

    a.cluster.shutdown().await;
    ledger.assert_no_violations();
    flush_prefix(&redis, &prefix).await;
    db.drop_db().await;
}
