//! Shared helpers: a fresh database and Redis prefix per test, a recording fake
//! `ShardHost`, and polling instead of sleeping.
#![allow(dead_code)] // not every test file uses every helper

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::mpsc;
use wallet_cluster::{
    Cluster, ClusterConfig, ClusterMetrics, Membership, RedisMembership, ShardHost,
};

pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run `source <(scripts/stack.sh env)` after `scripts/stack.sh up`"
        )
    })
}

/// A database of its own, with the real migrations applied.
pub struct TestDb {
    pub pool: PgPool,
    name: String,
    url: String,
}

impl TestDb {
    pub async fn new() -> Self {
        let admin_url = env("DATABASE_ADMIN_URL");
        let name = format!("test_wallet_cluster_{}", uuid::Uuid::new_v4().simple());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url)
            .await
            .expect("connect admin");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create database");
        admin.close().await;
        let url = format!(
            "{}/{name}",
            admin_url.rsplit_once('/').expect("url with a database").0
        );
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect("connect test database");
        sqlx::migrate!("../../migrations")
            .run(&pool)
            .await
            .expect("migrate");
        Self { pool, name, url }
    }

    /// `host:port` of the database server.
    pub fn server_addr(&self) -> String {
        let rest = self.url.split_once('@').expect("url with credentials").1;
        rest.split_once('/')
            .expect("url with a database")
            .0
            .to_owned()
    }

    /// A pool on this database through `proxy_addr`, failing fast when it is cut.
    pub fn pool_via(&self, proxy_addr: &str) -> PgPool {
        let url = self.url.replacen(&self.server_addr(), proxy_addr, 1);
        PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_millis(500))
            .connect_lazy(&url)
            .expect("lazy pool")
    }

    /// Drops the database; only reached when the test passed, so a failure leaves it for
    /// inspection (scripts/test.sh drops leftover `test_%` databases).
    pub async fn drop_db(self) {
        self.pool.close().await;
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&env("DATABASE_ADMIN_URL"))
            .await
            .expect("connect admin");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&admin)
        .await
        .expect("drop database");
    }
}

pub fn redis_pool() -> deadpool_redis::Pool {
    deadpool_redis::Config::from_url(env("REDIS_URL"))
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .expect("redis pool")
}

pub fn prefix() -> String {
    format!("wallet-cluster-test-{}", uuid::Uuid::new_v4().simple())
}

/// Deletes every key of this test's prefix: a FLUSHALL limited to this test, so tests
/// of others sharing the Redis server are not disturbed.
pub async fn flush_prefix(pool: &deadpool_redis::Pool, prefix: &str) {
    let mut conn = pool.get().await.expect("redis connection");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{prefix}*"))
        .query_async(&mut *conn)
        .await
        .expect("KEYS");
    if !keys.is_empty() {
        let _: i64 = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut *conn)
            .await
            .expect("DEL");
    }
}

pub fn config(node_id: &str, prefix: &str, shards: u32) -> ClusterConfig {
    ClusterConfig {
        node_id: node_id.to_owned(),
        advertise_addr: format!("{node_id}.test:8090"),
        shards,
        // Short enough for quick tests, long enough that a loaded 2-core machine does
        // not miss three heartbeats or renewals in a row.
        lease_ttl: Duration::from_millis(2000),
        heartbeat_ttl: Duration::from_millis(2000),
        redis_prefix: prefix.to_owned(),
        keys: keys(),
    }
}

/// The internal secret every test node shares.
pub fn keys() -> wallet_cluster::SigningKeys {
    wallet_cluster::SigningKeys::new("cluster-test-secret".into(), None)
}

/// What every fake host did, in one place, so overlapping ownership is caught at the
/// moment it happens.
#[derive(Default)]
pub struct Ledger {
    state: Mutex<LedgerState>,
}

#[derive(Default)]
struct LedgerState {
    active: BTreeMap<u32, String>,
    fences: BTreeMap<u32, Vec<(String, i64)>>,
    violations: Vec<String>,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        self.state.lock().expect("ledger lock")
    }

    fn activate(&self, node: &str, shard: u32, fence: i64) {
        let mut s = self.lock();
        if let Some(other) = s.active.get(&shard).cloned() {
            s.violations.push(format!(
                "{node} activated shard {shard} while {other} had it"
            ));
        }
        if let Some(last) = s.fences.get(&shard).and_then(|f| f.last()).map(|(_, f)| *f)
            && last >= fence
        {
            s.violations
                .push(format!("shard {shard}: fence {fence} after {last}"));
        }
        s.fences
            .entry(shard)
            .or_default()
            .push((node.to_owned(), fence));
        s.active.insert(shard, node.to_owned());
    }

    fn deactivate(&self, node: &str, shard: u32) {
        let mut s = self.lock();
        match s.active.get(&shard).cloned() {
            Some(owner) if owner == node => {
                s.active.remove(&shard);
            }
            other => s.violations.push(format!(
                "{node} deactivated shard {shard} owned by {other:?}"
            )),
        }
    }

    /// Active shards per node.
    pub fn active(&self) -> BTreeMap<String, BTreeSet<u32>> {
        let mut out: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        for (shard, node) in &self.lock().active {
            out.entry(node.clone()).or_default().insert(*shard);
        }
        out
    }

    pub fn owner(&self, shard: u32) -> Option<String> {
        self.lock().active.get(&shard).cloned()
    }

    pub fn active_count(&self) -> usize {
        self.lock().active.len()
    }

    /// The latest fence each shard was activated with.
    pub fn last_fences(&self) -> BTreeMap<u32, i64> {
        self.lock()
            .fences
            .iter()
            .filter_map(|(s, f)| f.last().map(|(_, fence)| (*s, *fence)))
            .collect()
    }

    pub fn activations(&self, shard: u32) -> Vec<(String, i64)> {
        self.lock().fences.get(&shard).cloned().unwrap_or_default()
    }

    /// How many times each shard was activated so far.
    pub fn activation_counts(&self) -> BTreeMap<u32, usize> {
        self.lock()
            .fences
            .iter()
            .map(|(s, f)| (*s, f.len()))
            .collect()
    }

    pub fn assert_no_violations(&self) {
        let s = self.lock();
        assert!(
            s.violations.is_empty(),
            "ownership violations: {:#?}",
            s.violations
        );
    }
}

pub struct FakeHost {
    pub node: String,
    pub ledger: Arc<Ledger>,
}

#[async_trait::async_trait]
impl ShardHost for FakeHost {
    async fn activate(&self, shard: u32, fence: i64) {
        self.ledger.activate(&self.node, shard, fence);
    }

    async fn deactivate(&self, shard: u32) {
        self.ledger.deactivate(&self.node, shard);
    }
}

/// A node of the test cluster with Redis membership.
pub struct Node {
    pub cluster: Cluster,
    pub fence_lost: mpsc::Sender<u32>,
    pub metrics: ClusterMetrics,
    pub registry: prometheus::Registry,
}

pub fn start_node(
    cfg: ClusterConfig,
    redis: &deadpool_redis::Pool,
    db: &PgPool,
    ledger: &Arc<Ledger>,
) -> Node {
    let registry = prometheus::Registry::new();
    let metrics = ClusterMetrics::register(&registry).expect("metrics");
    let membership: Arc<dyn Membership> =
        Arc::new(RedisMembership::new(&cfg, redis.clone(), metrics.clone()).expect("membership"));
    let host = Arc::new(FakeHost {
        node: cfg.node_id.clone(),
        ledger: ledger.clone(),
    });
    let (tx, rx) = mpsc::channel(1024);
    let (_usable, usable) = tokio::sync::watch::channel(true);
    let cluster = Cluster::start(
        cfg,
        redis.clone(),
        db.clone(),
        membership,
        host,
        rx,
        usable,
        metrics.clone(),
    )
    .expect("start cluster");
    Node {
        cluster,
        fence_lost: tx,
        metrics,
        registry,
    }
}

/// Polls `condition` until it holds; panics with `what` after `timeout`.
pub async fn eventually(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Like [`eventually`] for conditions that need `.await`.
pub async fn eventually_async<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn gauge(registry: &prometheus::Registry, name: &str) -> f64 {
    registry
        .gather()
        .iter()
        .find(|f| f.name() == name)
        .and_then(|f| f.get_metric().first().map(|m| m.get_gauge().get_value()))
        .unwrap_or(f64::NAN)
}

pub fn counter(registry: &prometheus::Registry, name: &str) -> f64 {
    registry
        .gather()
        .iter()
        .find(|f| f.name() == name)
        .and_then(|f| f.get_metric().first().map(|m| m.get_counter().get_value()))
        .unwrap_or(f64::NAN)
}

pub fn members(ids: &[&str]) -> Vec<wallet_cluster::Member> {
    ids.iter()
        .map(|id| wallet_cluster::Member {
            id: (*id).to_owned(),
            internal_addr: format!("{id}.test:8090"),
        })
        .collect()
}

/// The owner every shard should have with `ids` alive.
pub fn expected(ids: &[&str], shards: u32) -> BTreeMap<u32, String> {
    let m = members(ids);
    (0..shards)
        .map(|s| {
            (
                s,
                wallet_cluster::rendezvous_owner(s, &m)
                    .expect("members")
                    .id
                    .clone(),
            )
        })
        .collect()
}

/// Which node's host serves each shard right now.
pub fn placement(ledger: &Ledger, shards: u32) -> BTreeMap<u32, String> {
    (0..shards)
        .filter_map(|s| ledger.owner(s).map(|o| (s, o)))
        .collect()
}

/// A TCP proxy a test can cut and restore, to play an outage of Redis or PostgreSQL
/// without disturbing anyone else using them.
pub struct TcpProxy {
    /// `host:port` to connect to instead of the target.
    pub addr: String,
    up: tokio::sync::watch::Sender<bool>,
}

impl TcpProxy {
    pub async fn start(target: &str) -> Self {
        let target = target.to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("addr").to_string();
        let (up, _) = tokio::sync::watch::channel(true);
        let up_rx = up.subscribe();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !*up_rx.borrow() {
                    continue; // refused: dropped at once
                }
                let target = target.clone();
                let mut up_rx = up_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = up_rx.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { addr, up }
    }

    /// A proxy in front of the test Redis.
    pub async fn redis() -> Self {
        Self::start(
            env("REDIS_URL")
                .trim_start_matches("redis://")
                .trim_end_matches('/'),
        )
        .await
    }

    pub fn redis_pool(&self) -> deadpool_redis::Pool {
        deadpool_redis::Config::from_url(format!("redis://{}", self.addr))
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .expect("redis pool")
    }

    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

pub fn counter_with(registry: &prometheus::Registry, name: &str, label: (&str, &str)) -> f64 {
    registry
        .gather()
        .iter()
        .find(|f| f.name() == name)
        .and_then(|f| {
            f.get_metric()
                .iter()
                .find(|m| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == label.0 && l.value() == label.1)
                })
                .map(|m| m.get_counter().get_value())
        })
        .unwrap_or(0.0)
}
