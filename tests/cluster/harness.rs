//! A cluster of node processes on the test's own database, a load generator that
//! spreads requests over every live node and records every answer, and the audit in
//! PostgreSQL that nothing acknowledged was lost or doubled, no 5xx was applied, and
//! every balance is exact. For the ledger: an open-loop transfer load, the audit of its
//! answers against the `transfers` table and a conservation sampler (the database-wide
//! ledger audit is `wallet_tests::ledger`).
//!
//! The contract the audit holds the service to: 200 and 409 mean committed, every 5xx
//! means "not applied, now or later"; only a request that got no HTTP answer at all
//! may or may not have been applied.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::Row;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use wallet_cluster::{Member, rendezvous_owner};
use wallet_tests::{ApiClient, NodeOptions, NodeProcess, TestDatabase, eventually};

/// The tests start several processes each; on a 2-core machine they run one at a time
/// so that one test's load does not starve another's leases.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The right to run a cluster now; held by the `TestCluster`.
pub struct Serial {
    _guard: tokio::sync::MutexGuard<'static, ()>,
}

/// Waits until no other cluster test runs; take it before starting anything heavy
/// (a private PostgreSQL, say) that the cluster will use.
pub async fn serial() -> Serial {
    Serial {
        _guard: SERIAL.lock().await,
    }
}

/// How long a cluster may take to reach a state the test waits for (generous: debug
/// builds on a loaded 2-core machine).
pub const SETTLE: Duration = Duration::from_secs(30);

pub fn dec(text: &str) -> Decimal {
    text.parse().expect("decimal literal")
}

/// Node processes sharing one database and one Redis prefix.
pub struct TestCluster {
    pub db: TestDatabase,
    pub options: NodeOptions,
    pub nodes: Vec<NodeProcess>,
    /// Nodes stopped with SIGSTOP: their ports accept connections but never answer.
    paused: HashSet<usize>,
    _serial: Serial,
}

impl TestCluster {
    /// A fresh database and `size` nodes `node-0..`, once every shard is served.
    pub async fn start(size: usize, adjust: impl FnOnce(&mut NodeOptions)) -> anyhow::Result<Self> {
        let serial = serial().await;
        let db = TestDatabase::create().await?;
        Self::start_with(serial, db, size, adjust).await
    }

    /// `size` nodes on `db` (a database of the test's own PostgreSQL, say).
    pub async fn start_with(
        serial: Serial,
        db: TestDatabase,
        size: usize,
        adjust: impl FnOnce(&mut NodeOptions),
    ) -> anyhow::Result<Self> {
        let mut options = NodeOptions::new(&db.app_url);
        adjust(&mut options);
        // Shown only when the test fails (the harness captures it otherwise).
        eprintln!(
            "node logs: {}/{}-node-*.log, database {}",
            wallet_tests::node::test_log_dir(),
            options.redis_prefix,
            db.name
        );
        let mut nodes = Vec::with_capacity(size);
        for i in 0..size {
            nodes.push(start_node(&format!("node-{i}"), &options).await?);
        }
        let cluster = Self {
            db,
            options,
            nodes,
            paused: HashSet::new(),
            _serial: serial,
        };
        cluster.wait_settled(size).await?;
        Ok(cluster)
    }

    /// Starts one more node `node-<index>` and returns its index.
    pub async fn add_node(&mut self) -> anyhow::Result<usize> {
        let index = self.nodes.len();
        let node = start_node(&format!("node-{index}"), &self.options).await?;
        self.nodes.push(node);
        Ok(index)
    }

    /// Nodes that run and answer (not killed, stopped or paused).
    pub fn live(&self) -> impl Iterator<Item = &NodeProcess> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(index, node)| node.is_running() && !self.paused.contains(index))
            .map(|(_, node)| node)
    }

    /// SIGSTOP: the process keeps its sockets and leases but does nothing at all.
    pub fn pause(&mut self, index: usize) -> anyhow::Result<()> {
        self.nodes[index].signal("STOP")?;
        self.paused.insert(index);
        Ok(())
    }

    pub fn resume(&mut self, index: usize) -> anyhow::Result<()> {
        self.nodes[index].signal("CONT")?;
        self.paused.remove(&index);
        Ok(())
    }

    pub fn index_of(&self, node_id: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.node_id == node_id)
    }

    /// Public API clients of the live nodes, with their index.
    pub fn targets(&self) -> Vec<(usize, ApiClient)> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(index, node)| node.is_running() && !self.paused.contains(index))
            .map(|(index, node)| (index, node.api.clone()))
            .collect()
    }

    pub fn any_api(&self) -> anyhow::Result<&ApiClient> {
        self.live()
            .next()
            .map(|node| &node.api)
            .ok_or_else(|| anyhow::anyhow!("no live node"))
    }

    /// The shard of `wallet_id` and the index of the node every live node names its owner.
    pub async fn agreed_owner(&self, wallet_id: Uuid) -> anyhow::Result<Option<(u32, usize)>> {
        let mut seen = HashSet::new();
        let mut shard = 0;
        for node in self.live() {
            let (s, owner) = node.owner_of(wallet_id).await?;
            shard = s;
            seen.insert(owner);
        }
        Ok(match seen.into_iter().collect::<Vec<_>>().as_slice() {
            [Some(owner)] => self.index_of(owner).map(|index| (shard, index)),
            _ => None,
        })
    }

    /// Which node actually serves each shard, if every shard is served exactly once,
    /// every live node sees `members` members and the placement is the rendezvous one.
    pub async fn shard_map(&self, members: usize) -> anyhow::Result<Option<BTreeMap<u32, String>>> {
        let mut map = BTreeMap::new();
        let mut view: Option<Vec<Member>> = None;
        for node in self.live() {
            let snapshot = node.cluster_view().await?;
            let node_members: Vec<Member> = serde_json::from_value(snapshot["members"].clone())?;
            if node_members.len() != members || view.as_ref().is_some_and(|v| *v != node_members) {
                return Ok(None);
            }
            view = Some(node_members);
            for shard in snapshot["ownedShards"].as_array().into_iter().flatten() {
                let shard = shard
                    .as_u64()
                    .and_then(|s| u32::try_from(s).ok())
                    .ok_or_else(|| anyhow::anyhow!("bad shard in {snapshot}"))?;
                if map.insert(shard, node.node_id.clone()).is_some() {
                    return Ok(None);
                }
            }
        }
        let Some(view) = view else {
            return Ok(None);
        };
        let placed = (0..self.options.shards).all(|shard| {
            map.get(&shard).map(String::as_str)
                == rendezvous_owner(shard, &view).map(|m| m.id.as_str())
        });
        Ok(placed.then_some(map))
    }

    /// Waits until `members` members serve every shard as rendezvous hashing places it.
    pub async fn wait_settled(&self, members: usize) -> anyhow::Result<BTreeMap<u32, String>> {
        let settled = Arc::new(Mutex::new(None));
        let found = eventually(SETTLE, || {
            let settled = settled.clone();
            async move {
                match self.shard_map(members).await {
                    Ok(Some(map)) => {
                        *settled.lock().unwrap_or_else(|p| p.into_inner()) = Some(map);
                        true
                    }
                    _ => false,
                }
            }
        })
        .await;
        let map = settled.lock().unwrap_or_else(|p| p.into_inner()).take();
        match map {
            Some(map) if found => Ok(map),
            _ => {
                anyhow::bail!("the cluster did not settle on {members} members serving every shard")
            }
        }
    }

    /// Creates `count` wallets (through different nodes) and funds each with `seed`.
    pub async fn funded_wallets(&self, count: usize, seed: &str) -> anyhow::Result<Vec<Uuid>> {
        let targets = self.targets();
        let mut wallets = Vec::with_capacity(count);
        for i in 0..count {
            let api = &targets[i % targets.len()].1;
            let wallet = api.create_wallet().await?;
            let answer = api.operate(wallet, "DEPOSIT", seed, None).await?;
            anyhow::ensure!(answer.status == StatusCode::OK, "seed deposit: {answer:?}");
            wallets.push(wallet);
        }
        Ok(wallets)
    }

    /// Reads the fence and owner of `shard` from PostgreSQL.
    pub async fn fence(&self, shard: u32) -> anyhow::Result<Option<(i64, String)>> {
        let row = sqlx::query("SELECT fence, owner FROM shard_fences WHERE shard = $1")
            .bind(i32::try_from(shard)?)
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(row.map(|row| (row.get("fence"), row.get("owner"))))
    }
}

/// Starts a node, again on other ports if it could not bind: ports are picked free and
/// released before the node binds them, so another process may take one meanwhile.
/// One at a time, so that the nodes of one cluster do not race each other for ports.
async fn start_node(node_id: &str, options: &NodeOptions) -> anyhow::Result<NodeProcess> {
    let mut attempt = 1;
    loop {
        match NodeProcess::start(node_id, options).await {
            Ok(node) => return Ok(node),
            Err(error) if attempt < 3 => {
                eprintln!("{node_id} did not start ({error:#}); trying other ports");
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// What the client saw for one request.
#[derive(Clone, Debug)]
pub enum Answered {
    Status {
        status: u16,
        operation_id: Option<Uuid>,
        body: Value,
    },
    /// No HTTP answer at all (connection refused or reset, timeout): the only answer
    /// after which the client cannot know whether the operation was committed.
    Transport(String),
}

#[derive(Clone, Debug)]
pub struct Record {
    pub wallet: Uuid,
    pub kind: &'static str,
    pub amount: Decimal,
    pub key: Option<String>,
    pub node: usize,
    pub answer: Answered,
    /// When the request was sent and when its answer (or transport error) arrived.
    pub sent_at: Instant,
    pub answered_at: Instant,
}

impl Record {
    pub fn status(&self) -> Option<u16> {
        match &self.answer {
            Answered::Status { status, .. } => Some(*status),
            Answered::Transport(_) => None,
        }
    }

    /// Whether the client was told the operation is committed (200 applied, 409 rejected).
    pub fn acknowledged(&self) -> bool {
        matches!(self.status(), Some(200 | 409))
    }
}

struct Shared {
    targets: RwLock<Vec<(usize, ApiClient)>>,
    records: Mutex<Vec<Record>>,
    /// Requests picked for each node and not answered yet.
    in_flight: Mutex<HashMap<usize, usize>>,
    acknowledged: AtomicUsize,
    hot_acknowledged: AtomicUsize,
    next: AtomicUsize,
    /// Percentage of the requests that go to the hot wallet.
    hot_percent: usize,
}

/// Concurrent clients that loop over the live nodes round-robin until stopped.
pub struct Load {
    shared: Arc<Shared>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// How many clients a `Load` runs and how much of it goes to the hot wallet.
pub struct LoadBuilder<'a> {
    cluster: &'a TestCluster,
    wallets: &'a [Uuid],
    clients: usize,
    hot_percent: usize,
}

impl LoadBuilder<'_> {
    pub fn clients(mut self, clients: usize) -> Self {
        self.clients = clients;
        self
    }

    /// Percentage (0 to 100) of the requests that go to `wallets[0]`; the rest is spread
    /// over the other wallets.
    pub fn hot_share(mut self, percent: usize) -> Self {
        self.hot_percent = percent.min(100);
        self
    }

    pub fn start(self) -> Load {
        let shared = Arc::new(Shared {
            targets: RwLock::new(self.cluster.targets()),
            records: Mutex::new(Vec::new()),
            in_flight: Mutex::new(HashMap::new()),
            acknowledged: AtomicUsize::new(0),
            hot_acknowledged: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            hot_percent: self.hot_percent,
        });
        let stop = CancellationToken::new();
        let wallets: Arc<Vec<Uuid>> = Arc::new(self.wallets.to_vec());
        let run = Uuid::new_v4().simple().to_string();
        let tasks = (0..self.clients)
            .map(|_| {
                let shared = shared.clone();
                let stop = stop.clone();
                let wallets = wallets.clone();
                let run = run.clone();
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let i = shared.next.fetch_add(1, Ordering::Relaxed);
                        let record = one_request(&shared, &wallets, &run, i).await;
                        let Some(record) = record else {
                            // Every node is out of the rotation for a moment.
                            tokio::task::yield_now().await;
                            continue;
                        };
                        if record.acknowledged() {
                            shared.acknowledged.fetch_add(1, Ordering::Relaxed);
                            if record.wallet == wallets[0] {
                                shared.hot_acknowledged.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        shared
                            .records
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(record);
                    }
                })
            })
            .collect();
        Load {
            shared,
            stop,
            tasks,
        }
    }
}

impl Load {
    /// `CLUSTER_TEST_CLIENTS` clients (40 by default); 70 % of the requests go to
    /// `wallets[0]` (the hot wallet).
    pub fn start(cluster: &TestCluster, wallets: &[Uuid]) -> Self {
        Self::builder(cluster, wallets).start()
    }

    /// The defaults of `start`, to be changed before starting.
    pub fn builder<'a>(cluster: &'a TestCluster, wallets: &'a [Uuid]) -> LoadBuilder<'a> {
        let clients = wallet_tests::env_or("CLUSTER_TEST_CLIENTS", "40")
            .parse()
            .unwrap_or(40);
        LoadBuilder {
            cluster,
            wallets,
            clients,
            hot_percent: 70,
        }
    }

    /// Stops sending to node `index` (as a load balancer would before a kill or stop).
    pub fn remove_target(&self, index: usize) {
        self.shared
            .targets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(i, _)| *i != index);
    }

    /// Takes node `index` out of the rotation and waits until every request already sent
    /// to it has its answer: what a preStop sleep gives a pod before its SIGTERM.
    pub async fn drain(&self, index: usize) -> anyhow::Result<()> {
        self.remove_target(index);
        let in_flight = || {
            self.shared
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&index)
                .copied()
                .unwrap_or(0)
        };
        anyhow::ensure!(
            eventually(SETTLE, || std::future::ready(in_flight() == 0)).await,
            "{} requests to node {index} never finished",
            in_flight()
        );
        Ok(())
    }

    pub fn add_target(&self, index: usize, api: ApiClient) {
        let mut targets = self
            .shared
            .targets
            .write()
            .unwrap_or_else(|p| p.into_inner());
        targets.retain(|(i, _)| *i != index);
        targets.push((index, api));
    }

    /// Requests answered 200 or 409 so far.
    pub fn acknowledged(&self) -> usize {
        self.shared.acknowledged.load(Ordering::Relaxed)
    }

    /// Requests on the hot wallet answered 200 or 409 so far.
    pub fn hot_acknowledged(&self) -> usize {
        self.shared.hot_acknowledged.load(Ordering::Relaxed)
    }

    /// Requests on `wallet` sent at or after `since` and answered 200 or 409 so far.
    pub fn acknowledged_since(&self, wallet: Uuid, since: std::time::Instant) -> usize {
        self.shared
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|r| {
                r.wallet == wallet && r.sent_at >= since && matches!(r.status(), Some(200 | 409))
            })
            .count()
    }

    /// Waits until `more` further requests were acknowledged (on the hot wallet if `hot`).
    pub async fn wait_progress(&self, more: usize, hot: bool) -> anyhow::Result<()> {
        let count = || {
            if hot {
                self.hot_acknowledged()
            } else {
                self.acknowledged()
            }
        };
        let target = count() + more;
        anyhow::ensure!(
            eventually(SETTLE, || std::future::ready(count() >= target)).await,
            "the load made no progress: {} of {target} acknowledged",
            count()
        );
        Ok(())
    }

    /// Stops the clients (each finishes the request it has in flight) and returns every record.
    pub async fn stop(self) -> anyhow::Result<Vec<Record>> {
        self.stop.cancel();
        for task in self.tasks {
            task.await?;
        }
        let records = std::mem::take(
            &mut *self
                .shared
                .records
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        Ok(records)
    }
}

/// Whether request `i` goes to the hot wallet: exactly `percent` of any 100 consecutive
/// requests, laid out so that 70 % picks the same requests as the original `i % 10 < 7`.
fn is_hot(i: usize, percent: usize) -> bool {
    (i % 10) * 10 + (i / 10) % 10 < percent
}

/// Whether request `i` carries an Idempotency-Key: half of them, but not by parity or any
/// small modulus, which would give every key to the same nodes of the round-robin.
fn is_keyed(i: usize) -> bool {
    (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 63 == 0
}

/// Request `i` of the load: mostly small deposits, some withdrawals, a few that cannot
/// fit (409); half of them carry an Idempotency-Key.
async fn one_request(shared: &Shared, wallets: &[Uuid], run: &str, i: usize) -> Option<Record> {
    let (node, api) = {
        // Counted while the list is locked, so `drain` sees every request to the node.
        let targets = shared.targets.read().unwrap_or_else(|p| p.into_inner());
        if targets.is_empty() {
            return None;
        }
        let (node, api) = targets[i % targets.len()].clone();
        *shared
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(node)
            .or_default() += 1;
        (node, api)
    };
    let wallet = if is_hot(i, shared.hot_percent) || wallets.len() == 1 {
        wallets[0]
    } else {
        wallets[1 + i % (wallets.len() - 1)]
    };
    let (kind, amount) = match i % 20 {
        7 => ("WITHDRAW", "100000.00".to_owned()),
        3 | 13 | 17 => ("WITHDRAW", format!("2.{:02}", i % 100)),
        _ => ("DEPOSIT", format!("{}.{:02}", 1 + i % 9, i % 100)),
    };
    let key = is_keyed(i).then(|| format!("{run}-{i}"));
    let sent_at = Instant::now();
    let answer = match api.operate(wallet, kind, &amount, key.as_deref()).await {
        Ok(answer) => Answered::Status {
            status: answer.status.as_u16(),
            operation_id: answer.body["operationId"]
                .as_str()
                .and_then(|id| id.parse().ok()),
            body: answer.body,
        },
        Err(error) => Answered::Transport(format!("{error:#}")),
    };
    let answered_at = Instant::now();
    if let Some(count) = shared
        .in_flight
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(&node)
    {
        *count -= 1;
    }
    Some(Record {
        wallet,
        kind,
        amount: dec(&amount),
        key,
        node,
        answer,
        sent_at,
        answered_at,
    })
}

/// The longest time between two consecutive acknowledged (200/409) answers on `wallet`
/// whose interval overlaps `window` (the whole run if `None`): how long the wallet was
/// out of reach for its clients.
pub fn longest_gap(
    records: &[Record],
    wallet: Uuid,
    window: Option<(Instant, Instant)>,
) -> Duration {
    let mut times: Vec<Instant> = records
        .iter()
        .filter(|record| record.wallet == wallet && record.acknowledged())
        .map(|record| record.answered_at)
        .collect();
    times.sort();
    times
        .windows(2)
        .filter(|pair| window.is_none_or(|(from, to)| pair[0] < to && pair[1] > from))
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or_default()
}

/// What the audit counted.
#[derive(Debug, Default)]
pub struct Audit {
    pub by_status: BTreeMap<u16, usize>,
    /// Requests that got no HTTP answer, and the first such error.
    pub transport_errors: usize,
    pub first_transport_error: Option<String>,
    /// Requests whose outcome the client could not know (no HTTP answer), and how many
    /// rows they explain.
    pub unknown: usize,
    pub unknown_committed: usize,
    /// Answers that broke the contract: 5xx answers whose operation is in the database
    /// (found under its key, or under the operationId of its body), plus rows nobody was
    /// told about beyond what requests without any answer can explain.
    pub untruthful: usize,
    pub untruthful_by_key: usize,
    pub untruthful_by_operation_id: usize,
    pub untruthful_orphans: usize,
    /// APPLIED rows (after the seed) that no client saw answered 200.
    pub unacknowledged_applied: usize,
    /// 200/409 answers whose operation is not in the database.
    pub lost: usize,
    /// Operations stored twice, or acknowledged to two requests.
    pub duplicates: usize,
    /// Answers (of any status) whose body carries no operationId.
    pub without_operation_id: usize,
    /// The first few lost, duplicate and untruthful cases, for the failure message.
    pub examples: Vec<String>,
    pub rows: usize,
}

impl Audit {
    /// Statuses outside `allowed` (2xx/409 are always allowed), with counts.
    pub fn unexpected(&self, allowed: &[u16]) -> Vec<(u16, usize)> {
        self.by_status
            .iter()
            .filter(|(status, _)| !matches!(status, 200 | 409) && !allowed.contains(status))
            .map(|(status, count)| (*status, *count))
            .collect()
    }

    /// Every request answered, none with a 5xx or an unexpected status.
    pub fn assert_all_answered_without_errors(&self) {
        assert_eq!(self.server_errors(), 0, "{:?}", self.by_status);
        assert!(self.unexpected(&[]).is_empty(), "{:?}", self.by_status);
        assert_eq!(self.transport_errors, 0, "{:?}", self.first_transport_error);
    }

    pub fn server_errors(&self) -> usize {
        self.by_status
            .iter()
            .filter(|(status, _)| **status >= 500)
            .map(|(_, count)| count)
            .sum()
    }

    /// Nothing acknowledged lost, nothing doubled, no 5xx applied.
    pub fn ensure_truthful(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.lost == 0 && self.duplicates == 0 && self.untruthful == 0,
            "audit failed: {}; first cases: {:#?}",
            self.summary(),
            self.examples
        );
        Ok(())
    }

    /// One line with every count.
    pub fn summary(&self) -> String {
        format!(
            "by status {:?}, transport errors {}, lost {}, duplicates {}, \
             unacknowledged APPLIED rows {} vs transport errors {}, \
             untruthful {} (5xx applied by key {}, by operationId {}, orphan rows beyond the transport-error budget {}), \
             answers without operationId {}, rows {}",
            self.by_status,
            self.transport_errors,
            self.lost,
            self.duplicates,
            self.unacknowledged_applied,
            self.transport_errors,
            self.untruthful,
            self.untruthful_by_key,
            self.untruthful_by_operation_id,
            self.untruthful_orphans,
            self.without_operation_id,
            self.rows,
        )
    }

    fn example(&mut self, text: String) {
        if self.examples.len() < 10 {
            self.examples.push(text);
        }
    }
}

struct StoredOperation {
    id: Uuid,
    wallet: Uuid,
    seq: i64,
    kind: String,
    amount: Decimal,
    status: String,
    reason: Option<String>,
    balance_after: Decimal,
    key: Option<String>,
}

/// `inspect`, failing when anything acknowledged was lost or doubled or a 5xx was applied.
pub async fn audit(
    cluster: &TestCluster,
    wallets: &[Uuid],
    records: &[Record],
    seeded: usize,
) -> anyhow::Result<Audit> {
    let report = inspect(cluster, wallets, records, seeded).await?;
    report.ensure_truthful()?;
    Ok(report)
}

/// Checks the records against PostgreSQL and the API, and counts what broke the contract:
/// - every 200/409 is in `operations` exactly once, with the type, amount, status and
///   balance the client was told (missing: `lost`; twice: `duplicates`);
/// - a 5xx means not applied: nothing under its key, nothing under the operationId of
///   its body (`untruthful`);
/// - every other row belongs to a request that got no HTTP answer at all (keyed: under
///   its key; keyless: one such request of the same wallet, type and amount each),
///   never to a 5xx (`untruthful_orphans`) nor to a 4xx (an error);
/// - per wallet the sequence has no gaps, each row's balance follows from the one
///   before, and the last one equals the `wallets` row and the API's balance (errors).
///
/// `seeded` is the number of rows per wallet written before the load (one seed deposit).
pub async fn inspect(
    cluster: &TestCluster,
    wallets: &[Uuid],
    records: &[Record],
    seeded: usize,
) -> anyhow::Result<Audit> {
    let mut report = Audit::default();
    let rows: Vec<StoredOperation> = sqlx::query(
        "SELECT id, wallet_id, seq, operation_type, amount, status, reason, balance_after, idempotency_key \
         FROM operations WHERE wallet_id = ANY($1) ORDER BY wallet_id, seq",
    )
    .bind(wallets)
    .fetch_all(&cluster.db.pool)
    .await?
    .iter()
    .map(|row| StoredOperation {
        id: row.get("id"),
        wallet: row.get("wallet_id"),
        seq: row.get("seq"),
        kind: row.get("operation_type"),
        amount: row.get("amount"),
        status: row.get("status"),
        reason: row.get("reason"),
        balance_after: row.get("balance_after"),
        key: row.get("idempotency_key"),
    })
    .collect();
    report.rows = rows.len();

    // The primary key and the unique key index forbid these; counted all the same.
    let mut by_id: HashMap<Uuid, &StoredOperation> = HashMap::new();
    let mut by_key: HashMap<(Uuid, &str), &StoredOperation> = HashMap::new();
    for row in &rows {
        if by_id.insert(row.id, row).is_some() {
            report.duplicates += 1;
            report.example(format!("operation {} stored twice", row.id));
        }
        if let Some(key) = row.key.as_deref()
            && by_key.insert((row.wallet, key), row).is_some()
        {
            report.duplicates += 1;
            report.example(format!("idempotency key {key} stored twice"));
        }
    }

    // Rows some answer accounts for, and those a client saw answered 200.
    let mut claimed: HashSet<Uuid> = HashSet::new();
    let mut acknowledged_applied: HashSet<Uuid> = HashSet::new();
    // Keyless requests without an answer, by what they asked: each may explain one row.
    let mut unanswered_keyless: HashMap<(Uuid, &str, Decimal), usize> = HashMap::new();
    for record in records {
        let keyed_row = record
            .key
            .as_deref()
            .and_then(|key| by_key.get(&(record.wallet, key)).copied());
        let (status, operation_id, body) = match &record.answer {
            Answered::Transport(error) => {
                report.transport_errors += 1;
                report
                    .first_transport_error
                    .get_or_insert_with(|| error.clone());
                report.unknown += 1;
                match (&record.key, keyed_row) {
                    (Some(_), Some(row)) => {
                        report.unknown_committed += 1;
                        check_row_matches(row, record)?;
                        claimed.insert(row.id);
                    }
                    (Some(_), None) => {}
                    (None, _) => {
                        *unanswered_keyless
                            .entry((record.wallet, record.kind, record.amount))
                            .or_default() += 1;
                    }
                }
                continue;
            }
            Answered::Status {
                status,
                operation_id,
                body,
            } => (*status, *operation_id, body),
        };
        *report.by_status.entry(status).or_default() += 1;
        if operation_id.is_none() {
            report.without_operation_id += 1;
        }
        match status {
            500.. => {
                // Not applied, now or later: neither its key nor its id may be in the database.
                let row_by_id = operation_id.and_then(|id| by_id.get(&id).copied());
                if keyed_row.is_some() {
                    report.untruthful_by_key += 1;
                }
                if row_by_id.is_some() {
                    report.untruthful_by_operation_id += 1;
                }
                if let Some(row) = keyed_row.or(row_by_id) {
                    report.untruthful += 1;
                    report.example(format!(
                        "answered {status} but stored as {} {} (seq {}): {record:?}",
                        row.id, row.status, row.seq
                    ));
                }
                // Accounted for here, so not counted again as a row nobody was told about.
                claimed.extend(keyed_row.into_iter().chain(row_by_id).map(|row| row.id));
            }
            200 | 409 => {
                let id = operation_id
                    .ok_or_else(|| anyhow::anyhow!("{status} without operationId: {body}"))?;
                let Some(row) = by_id.get(&id).copied() else {
                    report.lost += 1;
                    report.example(format!(
                        "acknowledged operation {id} ({status}) is not in the database: {record:?}"
                    ));
                    continue;
                };
                check_row_matches(row, record)?;
                if let Some(row_by_key) = keyed_row {
                    anyhow::ensure!(
                        row_by_key.id == id,
                        "key answered with another operation: {record:?}"
                    );
                }
                let (expected_status, balance_after) = if status == 200 {
                    ("APPLIED", body["balanceAfter"].as_str())
                } else {
                    ("REJECTED", body["operation"]["balanceAfter"].as_str())
                };
                anyhow::ensure!(
                    row.status == expected_status,
                    "{status} but stored {}: {record:?}",
                    row.status
                );
                if status == 409 {
                    anyhow::ensure!(
                        row.reason.as_deref() == Some("INSUFFICIENT_FUNDS"),
                        "409 stored with reason {:?}",
                        row.reason
                    );
                }
                let told = balance_after
                    .ok_or_else(|| anyhow::anyhow!("{status} without balanceAfter: {body}"))?;
                anyhow::ensure!(
                    dec(told) == row.balance_after,
                    "client was told balance {told}, stored {}",
                    row.balance_after
                );
                if !claimed.insert(id) {
                    report.duplicates += 1;
                    report.example(format!("operation {id} acknowledged twice: {record:?}"));
                }
                if status == 200 {
                    acknowledged_applied.insert(id);
                }
            }
            _ => {
                // Refused (4xx): nothing may have been recorded under its key.
                anyhow::ensure!(
                    keyed_row.is_none(),
                    "refused request was recorded: {record:?}"
                );
            }
        }
    }

    // Rows nobody was told about: only requests without any answer may explain them.
    for row in &rows {
        if row.seq <= seeded as i64 {
            continue;
        }
        if row.status == "APPLIED" && !acknowledged_applied.contains(&row.id) {
            report.unacknowledged_applied += 1;
        }
        if claimed.contains(&row.id) {
            continue;
        }
        anyhow::ensure!(
            row.key.is_none(),
            "row {} carries key {:?} that no request with an open outcome used",
            row.id,
            row.key
        );
        match unanswered_keyless.get_mut(&(row.wallet, row.kind.as_str(), row.amount)) {
            Some(budget) if *budget > 0 => {
                *budget -= 1;
                report.unknown_committed += 1;
            }
            _ => {
                report.untruthful_orphans += 1;
                report.example(format!(
                    "row {} ({} {} {} {}, seq {}) matches no request left without an answer",
                    row.id, row.wallet, row.kind, row.amount, row.status, row.seq
                ));
            }
        }
    }
    report.untruthful += report.untruthful_orphans;

    // Per wallet: a gap-free sequence whose balances follow one from the other.
    let api = cluster.any_api()?;
    for wallet in wallets {
        let mut balance = Decimal::ZERO;
        let mut seq = 0;
        for row in rows.iter().filter(|row| row.wallet == *wallet) {
            seq += 1;
            anyhow::ensure!(
                row.seq == seq,
                "wallet {wallet}: seq {} where {seq} was due",
                row.seq
            );
            if row.status == "APPLIED" {
                balance += if row.kind == "DEPOSIT" {
                    row.amount
                } else {
                    -row.amount
                };
            }
            anyhow::ensure!(
                balance >= Decimal::ZERO,
                "wallet {wallet} went negative at seq {seq}"
            );
            anyhow::ensure!(
                row.balance_after == balance,
                "wallet {wallet}: seq {seq} stored balance {} but the rows before add up to {balance}",
                row.balance_after
            );
        }
        let stored = sqlx::query("SELECT balance, version FROM wallets WHERE id = $1")
            .bind(wallet)
            .fetch_one(&cluster.db.pool)
            .await?;
        let column: Decimal = stored.get("balance");
        let version: i64 = stored.get("version");
        anyhow::ensure!(
            column == balance,
            "wallet {wallet}: balance column {column}, rows say {balance}"
        );
        anyhow::ensure!(
            version == seq,
            "wallet {wallet}: version {version}, {seq} rows"
        );
        let served = api.balance(*wallet).await?;
        anyhow::ensure!(
            served == balance,
            "wallet {wallet}: API says {served}, rows say {balance}"
        );
    }
    // Every committed row has its event and no event lacks its row, whatever the faults.
    let outbox = wallet_tests::events::audit_outbox(&cluster.db.pool).await?;
    anyhow::ensure!(
        outbox.is_empty(),
        "outbox audit: {} problems; first: {:#?}",
        outbox.len(),
        &outbox[..outbox.len().min(10)]
    );
    Ok(report)
}

fn check_row_matches(row: &StoredOperation, record: &Record) -> anyhow::Result<()> {
    anyhow::ensure!(
        row.wallet == record.wallet && row.kind == record.kind && row.amount == record.amount,
        "stored operation {} ({} {} {}) is not the request {record:?}",
        row.id,
        row.wallet,
        row.kind,
        row.amount
    );
    Ok(())
}

impl TestCluster {
    /// The owner every live node names for each wallet, once they agree on all of them.
    pub async fn owners(&self, wallets: &[Uuid]) -> Option<Vec<usize>> {
        let mut owners = Vec::with_capacity(wallets.len());
        for wallet in wallets {
            owners.push(self.agreed_owner(*wallet).await.ok()??.1);
        }
        Some(owners)
    }

    /// `owners`, waiting up to `SETTLE` for the live nodes to agree.
    pub async fn wait_owners(&self, wallets: &[Uuid]) -> anyhow::Result<Vec<usize>> {
        let deadline = Instant::now() + SETTLE;
        loop {
            if let Some(owners) = self.owners(wallets).await {
                return Ok(owners);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the live nodes never agreed on the owners of every wallet"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every wallet's balance, held amount, limit and available as the API serves them
    /// against its `wallets` row (available = balance - held + limit): the mismatches.
    pub async fn served_mismatches(&self, wallets: &[Uuid]) -> anyhow::Result<Vec<String>> {
        let api = self.any_api()?;
        let mut mismatches = Vec::new();
        for wallet in wallets {
            let row =
                sqlx::query("SELECT balance, held, overdraft_limit FROM wallets WHERE id = $1")
                    .bind(wallet)
                    .fetch_one(&self.db.pool)
                    .await?;
            let stored = wallet_tests::api::WalletView {
                balance: row.get("balance"),
                held: row.get("held"),
                overdraft_limit: row.get("overdraft_limit"),
                available: row.get::<Decimal, _>("balance") - row.get::<Decimal, _>("held")
                    + row.get::<Decimal, _>("overdraft_limit"),
            };
            let served = api.wallet_view(*wallet).await?;
            if served != stored {
                mismatches.push(format!(
                    "wallet {wallet}: API {served:?}, PostgreSQL {stored:?}"
                ));
            }
        }
        Ok(mismatches)
    }
}

// Transfers: an open-loop load of POST /api/v1/transfers, the audit of its answers
// against the `transfers` table, and a sampler of conservation while it runs. The rules
// are the ones above: 200 and 409 mean committed, every 5xx and every other 4xx means
// not applied (now or later), only a request without any HTTP answer may go either way.

/// splitmix64: a small deterministic generator, so that a seed names a request sequence.
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next_u64() % n.max(1) as u64).unwrap_or(0)
    }
}

/// Which transfer request number `i` is: same seed, same requests.
#[derive(Clone, Debug)]
pub struct TransferPlan {
    pub wallets: Vec<Uuid>,
    /// A flow between two owners that gets `focus_percent` of the requests: from one of
    /// `focus_from` to one of `focus_to`. The rest go between any two wallets.
    pub focus_from: Vec<Uuid>,
    pub focus_to: Vec<Uuid>,
    pub focus_percent: u64,
    /// Every `oversized_every`-th request asks for more than any wallet has (409).
    pub oversized_every: u64,
    pub seed: u64,
}

impl TransferPlan {
    /// From, to and amount of request `i`: mostly 1.00 to 9.99, distinct enough that
    /// (from, to, amount) rarely repeats.
    pub fn request(&self, i: u64) -> (Uuid, Uuid, String) {
        let mut rng = SplitMix::new(self.seed ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let focused = !self.focus_from.is_empty()
            && !self.focus_to.is_empty()
            && rng.next_u64() % 100 < self.focus_percent;
        let (from, to) = if focused {
            (
                self.focus_from[rng.below(self.focus_from.len())],
                self.focus_to[rng.below(self.focus_to.len())],
            )
        } else {
            let from = rng.below(self.wallets.len());
            let to = (from + 1 + rng.below(self.wallets.len() - 1)) % self.wallets.len();
            (self.wallets[from], self.wallets[to])
        };
        let cents = rng.below(100);
        let amount =
            if self.oversized_every > 0 && i % self.oversized_every == self.oversized_every - 1 {
                format!("50000.{cents:02}")
            } else {
                format!("{}.{cents:02}", 1 + rng.below(9))
            };
        (from, to, amount)
    }

    pub fn is_focused(&self, from: Uuid, to: Uuid) -> bool {
        self.focus_from.contains(&from) && self.focus_to.contains(&to)
    }
}

/// One transfer request and what the client saw. In `Answered::Status`, `operation_id`
/// is the transferId of the answer's body.
#[derive(Clone, Debug)]
pub struct TransferRecord {
    pub from: Uuid,
    pub to: Uuid,
    pub amount: Decimal,
    pub key: Option<String>,
    pub node: usize,
    pub answer: Answered,
    pub sent_at: Instant,
    pub answered_at: Instant,
}

impl TransferRecord {
    pub fn status(&self) -> Option<u16> {
        match &self.answer {
            Answered::Status { status, .. } => Some(*status),
            Answered::Transport(_) => None,
        }
    }

    /// 200 (debited, maybe credited) or 409 (stored REJECTED).
    pub fn acknowledged(&self) -> bool {
        matches!(self.status(), Some(200 | 409))
    }

    pub fn transfer_id(&self) -> Option<Uuid> {
        match &self.answer {
            Answered::Status { operation_id, .. } => *operation_id,
            Answered::Transport(_) => None,
        }
    }
}

struct TransferShared {
    targets: RwLock<Vec<(usize, ApiClient)>>,
    records: Mutex<Vec<TransferRecord>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    shed: AtomicUsize,
    acknowledged: AtomicUsize,
}

/// Transfers sent at a fixed rate whatever the answers (open loop), round-robin over the
/// live nodes, each its own task; at most `max_in_flight` unanswered at once (beyond
/// that a request is not sent and counted as shed).
pub struct TransferLoad {
    shared: Arc<TransferShared>,
    stop: CancellationToken,
    driver: JoinHandle<u64>,
    started: Instant,
}

/// What a `TransferLoad` did.
#[derive(Debug)]
pub struct TransferRun {
    pub records: Vec<TransferRecord>,
    /// Requests due by the schedule, those not sent because too many were in flight, and
    /// the most in flight at once.
    pub scheduled: u64,
    pub shed: usize,
    pub max_in_flight: usize,
    pub duration: Duration,
}

impl TransferRun {
    /// Median, 99th percentile and longest time to an HTTP answer.
    pub fn latencies(&self) -> (Duration, Duration, Duration) {
        let mut times: Vec<Duration> = self
            .records
            .iter()
            .filter(|record| record.status().is_some())
            .map(|record| record.answered_at - record.sent_at)
            .collect();
        times.sort();
        let at = |q: f64| {
            times
                .get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        (at(0.5), at(0.99), times.last().copied().unwrap_or_default())
    }
}

impl TransferLoad {
    pub fn start(
        cluster: &TestCluster,
        plan: TransferPlan,
        rate: f64,
        max_in_flight: usize,
    ) -> Self {
        let targets = cluster
            .targets()
            .into_iter()
            .map(|(index, api)| (index, ApiClient::for_load(&api.base_url)))
            .collect();
        let shared = Arc::new(TransferShared {
            targets: RwLock::new(targets),
            records: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            shed: AtomicUsize::new(0),
            acknowledged: AtomicUsize::new(0),
        });
        let stop = CancellationToken::new();
        let started = Instant::now();
        let run = Uuid::new_v4().simple().to_string();
        let driver = {
            let (shared, stop, plan) = (shared.clone(), stop.clone(), Arc::new(plan));
            tokio::spawn(async move {
                let mut tasks = tokio::task::JoinSet::new();
                let mut ticker = tokio::time::interval(Duration::from_millis(2));
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut scheduled: u64 = 0;
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        _ = ticker.tick() => {}
                    }
                    let due = (started.elapsed().as_secs_f64() * rate) as u64;
                    while scheduled < due {
                        let i = scheduled;
                        scheduled += 1;
                        let in_flight = shared.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
                        if in_flight > max_in_flight {
                            shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                            shared.shed.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        shared.max_in_flight.fetch_max(in_flight, Ordering::Relaxed);
                        let (shared, plan) = (shared.clone(), plan.clone());
                        let key = is_keyed(usize::try_from(i).unwrap_or_default())
                            .then(|| format!("{run}-t{i}"));
                        tasks.spawn(async move {
                            let record = one_transfer(&shared, &plan, i, key).await;
                            shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                            if let Some(record) = record {
                                if record.acknowledged() {
                                    shared.acknowledged.fetch_add(1, Ordering::Relaxed);
                                }
                                shared
                                    .records
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push(record);
                            }
                        });
                    }
                    while tasks.try_join_next().is_some() {}
                }
                while tasks.join_next().await.is_some() {}
                scheduled
            })
        };
        Self {
            shared,
            stop,
            driver,
            started,
        }
    }

    pub fn remove_target(&self, index: usize) {
        self.shared
            .targets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(i, _)| *i != index);
    }

    pub fn add_target(&self, index: usize, api: &ApiClient) {
        let api = ApiClient::for_load(&api.base_url);
        let mut targets = self
            .shared
            .targets
            .write()
            .unwrap_or_else(|p| p.into_inner());
        targets.retain(|(i, _)| *i != index);
        targets.push((index, api));
    }

    pub fn acknowledged(&self) -> usize {
        self.shared.acknowledged.load(Ordering::Relaxed)
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Waits until `more` further transfers were acknowledged.
    pub async fn wait_progress(&self, more: usize) -> anyhow::Result<()> {
        let target = self.acknowledged() + more;
        anyhow::ensure!(
            eventually(SETTLE, || std::future::ready(self.acknowledged() >= target)).await,
            "the transfers made no progress: {} of {target} acknowledged",
            self.acknowledged()
        );
        Ok(())
    }

    /// Stops sending, waits for every answer and returns what happened.
    pub async fn stop(self) -> anyhow::Result<TransferRun> {
        self.stop.cancel();
        let scheduled = self.driver.await?;
        let duration = self.started.elapsed();
        let records = std::mem::take(
            &mut *self
                .shared
                .records
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        Ok(TransferRun {
            records,
            scheduled,
            shed: self.shared.shed.load(Ordering::Relaxed),
            max_in_flight: self.shared.max_in_flight.load(Ordering::Relaxed),
            duration,
        })
    }
}

async fn one_transfer(
    shared: &TransferShared,
    plan: &TransferPlan,
    i: u64,
    key: Option<String>,
) -> Option<TransferRecord> {
    let (node, api) = {
        let targets = shared.targets.read().unwrap_or_else(|p| p.into_inner());
        if targets.is_empty() {
            return None;
        }
        targets[usize::try_from(i).unwrap_or_default() % targets.len()].clone()
    };
    let (from, to, amount) = plan.request(i);
    let sent_at = Instant::now();
    let answer = match api.transfer(from, to, &amount, key.as_deref()).await {
        Ok(answer) => Answered::Status {
            status: answer.status.as_u16(),
            operation_id: answer.body["transferId"]
                .as_str()
                .and_then(|id| id.parse().ok()),
            body: answer.body,
        },
        Err(error) => Answered::Transport(format!("{error:#}")),
    };
    Some(TransferRecord {
        from,
        to,
        amount: dec(&amount),
        key,
        node,
        answer,
        sent_at,
        answered_at: Instant::now(),
    })
}

/// The last part of a problem's `type` URI ("insufficient-funds"), or "-".
pub fn problem_type(body: &Value) -> String {
    body["type"]
        .as_str()
        .and_then(|uri| uri.rsplit('/').next())
        .unwrap_or("-")
        .to_owned()
}

/// What the audit of the transfer answers counted.
#[derive(Debug, Default)]
pub struct TransferAudit {
    pub by_status: BTreeMap<u16, usize>,
    /// Non-200 answers by status and problem type.
    pub by_problem: BTreeMap<(u16, String), usize>,
    /// 200 answers that said POSTED and PENDING.
    pub answered_posted: usize,
    pub answered_pending: usize,
    pub transport_errors: usize,
    pub first_transport_error: Option<String>,
    /// Transfers in the table that only requests without an answer explain.
    pub unknown_committed: usize,
    /// 200/409 whose transfer is not in the table.
    pub lost: usize,
    /// Stored otherwise than answered: a 200 stored REJECTED, a 200 POSTED now PENDING, a
    /// 409 not REJECTED, or another from, to or amount than asked.
    pub contradicted: usize,
    /// One transfer acknowledged to two requests.
    pub duplicates: usize,
    /// 5xx answers whose transfer is in the table, by the status stored.
    pub untruthful_5xx: BTreeMap<String, usize>,
    /// Other 4xx answers (not 409) whose transfer is in the table.
    pub untruthful_refused: usize,
    /// Transfers nobody was told about beyond what requests without an answer explain.
    pub untruthful_orphans: usize,
    /// 200/409 answers without a transferId.
    pub without_transfer_id: usize,
    /// Transfers in the table and those between wallets not of the load.
    pub transfers: usize,
    pub foreign: usize,
    pub examples: Vec<String>,
}

impl TransferAudit {
    fn example(&mut self, text: String) {
        if self.examples.len() < 12 {
            self.examples.push(text);
        }
    }

    /// Statuses outside 200, 409 and `allowed`, with counts.
    pub fn unexpected(&self, allowed: &[u16]) -> Vec<(u16, usize)> {
        self.by_status
            .iter()
            .filter(|(status, _)| !matches!(status, 200 | 409) && !allowed.contains(status))
            .map(|(status, count)| (*status, *count))
            .collect()
    }

    pub fn untruthful(&self) -> usize {
        self.untruthful_5xx.values().sum::<usize>()
            + self.untruthful_refused
            + self.untruthful_orphans
    }

    /// Nothing acknowledged lost, contradicted or doubled, nothing refused applied.
    pub fn ensure_truthful(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.lost == 0
                && self.contradicted == 0
                && self.duplicates == 0
                && self.untruthful() == 0
                && self.without_transfer_id == 0
                && self.foreign == 0,
            "transfer audit failed: {}; first cases: {:#?}",
            self.summary(),
            self.examples
        );
        Ok(())
    }

    pub fn summary(&self) -> String {
        format!(
            "answers by status {:?} (problems {:?}), 200 said POSTED {} / PENDING {}, \
             transport errors {} ({} of them committed), lost {}, contradicted {}, duplicates {}, \
             5xx stored {:?}, refused but stored {}, orphan transfers {}, \
             acknowledged without transferId {}, transfers {} ({} between other wallets)",
            self.by_status,
            self.by_problem,
            self.answered_posted,
            self.answered_pending,
            self.transport_errors,
            self.unknown_committed,
            self.lost,
            self.contradicted,
            self.duplicates,
            self.untruthful_5xx,
            self.untruthful_refused,
            self.untruthful_orphans,
            self.without_transfer_id,
            self.transfers,
            self.foreign,
        )
    }
}

/// Checks the answers against the `transfers` table (read now: wait for PENDING ones
/// first):
/// - every 200 is in the table with its from, to and amount, POSTED (or PENDING if it was
///   answered PENDING); every 409 is insufficient-funds and stored REJECTED; none twice;
/// - a 5xx or another 4xx is not applied: its transferId, if its body has one, is not in
///   the table;
/// - every other transfer belongs to a request that got no HTTP answer (one each, same
///   from, to and amount), never to a 5xx nor to a 4xx.
pub async fn inspect_transfers(
    cluster: &TestCluster,
    wallets: &[Uuid],
    records: &[TransferRecord],
) -> anyhow::Result<TransferAudit> {
    let mut report = TransferAudit::default();
    let stored = wallet_tests::ledger::transfers(&cluster.db.pool).await?;
    report.transfers = stored.len();
    let ours: HashSet<Uuid> = wallets.iter().copied().collect();
    let by_id: HashMap<Uuid, &wallet_tests::ledger::TransferRow> =
        stored.iter().map(|t| (t.id, t)).collect();
    for transfer in &stored {
        if !ours.contains(&transfer.from) || !ours.contains(&transfer.to) {
            report.foreign += 1;
            report.example(format!("transfer between other wallets: {transfer:?}"));
        }
    }

    let mut claimed: HashSet<Uuid> = HashSet::new();
    let mut unanswered: HashMap<(Uuid, Uuid, Decimal), usize> = HashMap::new();
    for record in records {
        let (status, transfer_id, body) = match &record.answer {
            Answered::Transport(error) => {
                report.transport_errors += 1;
                report
                    .first_transport_error
                    .get_or_insert_with(|| error.clone());
                *unanswered
                    .entry((record.from, record.to, record.amount))
                    .or_default() += 1;
                continue;
            }
            Answered::Status {
                status,
                operation_id,
                body,
            } => (*status, *operation_id, body),
        };
        *report.by_status.entry(status).or_default() += 1;
        if status != 200 {
            *report
                .by_problem
                .entry((status, problem_type(body)))
                .or_default() += 1;
        }
        let row = transfer_id.and_then(|id| by_id.get(&id).copied());
        match status {
            200 | 409 => {
                let Some(id) = transfer_id else {
                    report.without_transfer_id += 1;
                    report.example(format!("{status} without transferId: {record:?}"));
                    continue;
                };
                let Some(row) = row else {
                    report.lost += 1;
                    report.example(format!(
                        "acknowledged transfer {id} ({status}) is not in the table: {record:?}"
                    ));
                    continue;
                };
                if !claimed.insert(id) {
                    report.duplicates += 1;
                    report.example(format!("transfer {id} acknowledged twice: {record:?}"));
                }
                let told = body["status"].as_str().unwrap_or_default();
                if status == 200 {
                    match told {
                        "POSTED" => report.answered_posted += 1,
                        "PENDING" => report.answered_pending += 1,
                        _ => {}
                    }
                }
                let consistent = match status {
                    200 => match told {
                        "POSTED" => row.status == "POSTED",
                        "PENDING" => matches!(row.status.as_str(), "POSTED" | "PENDING"),
                        _ => false,
                    },
                    _ => row.status == "REJECTED" && problem_type(body) == "insufficient-funds",
                };
                let same_request =
                    row.from == record.from && row.to == record.to && row.amount == record.amount;
                if !consistent || !same_request {
                    report.contradicted += 1;
                    report.example(format!(
                        "answered {status} {told:?} but stored {row:?}: {record:?}"
                    ));
                }
            }
            500.. => {
                if let Some(row) = row {
                    *report.untruthful_5xx.entry(row.status.clone()).or_default() += 1;
                    report.example(format!(
                        "answered {status} but stored as {} {}: {record:?}",
                        row.id, row.status
                    ));
                    claimed.insert(row.id);
                }
            }
            _ => {
                if let Some(row) = row {
                    report.untruthful_refused += 1;
                    report.example(format!(
                        "refused {status} but stored as {} {}: {record:?}",
                        row.id, row.status
                    ));
                    claimed.insert(row.id);
                }
            }
        }
    }

    // Transfers nobody was told about: only requests without any answer explain them.
    for transfer in &stored {
        if claimed.contains(&transfer.id) {
            continue;
        }
        match unanswered.get_mut(&(transfer.from, transfer.to, transfer.amount)) {
            Some(budget) if *budget > 0 => {
                *budget -= 1;
                report.unknown_committed += 1;
            }
            _ => {
                report.untruthful_orphans += 1;
                report.example(format!(
                    "transfer {transfer:?} matches no request left without an answer"
                ));
            }
        }
    }
    Ok(report)
}

/// What `replay_keyed` saw.
#[derive(Debug, Default)]
pub struct Replayed {
    pub sent: usize,
    /// 503 answers to replays (not applied, so retried after a pause).
    pub retried: usize,
    /// Replays whose answer differs from the first, and transfers they added.
    pub mismatches: Vec<String>,
}

/// Sends up to `limit` acknowledged keyed transfers again, spread over the run, through
/// the live nodes: each must get the status and transferId of its first answer (a 503
/// is retried, as a client would), and no transfer may be added.
pub async fn replay_keyed(
    cluster: &TestCluster,
    records: &[TransferRecord],
    limit: usize,
) -> anyhow::Result<Replayed> {
    let keyed: Vec<&TransferRecord> = records
        .iter()
        .filter(|record| record.key.is_some() && record.acknowledged())
        .collect();
    let step = keyed.len().div_ceil(limit.max(1)).max(1);
    let picked: Vec<&TransferRecord> = keyed.into_iter().step_by(step).collect();
    let targets = cluster.targets();
    anyhow::ensure!(!targets.is_empty(), "no live node");
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM transfers")
            .fetch_one(&cluster.db.pool)
            .await
    };
    let before = count().await?;
    let retried = AtomicUsize::new(0);
    let answers = futures::stream::iter(picked.iter().enumerate().map(|(i, record)| {
        let api = targets[i % targets.len()].1.clone();
        let retried = &retried;
        async move {
            let amount = record.amount.to_string();
            let mut attempt = 0;
            loop {
                attempt += 1;
                let answer = api
                    .transfer(record.from, record.to, &amount, record.key.as_deref())
                    .await;
                match &answer {
                    Ok(answer)
                        if answer.status == StatusCode::SERVICE_UNAVAILABLE && attempt < 5 =>
                    {
                        retried.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    _ => return (*record, answer),
                }
            }
        }
    }))
    .buffer_unordered(8)
    .collect::<Vec<_>>()
    .await;
    let mut mismatches = Vec::new();
    for (record, answer) in answers {
        let answer = match answer {
            Ok(answer) => answer,
            Err(error) => {
                mismatches.push(format!(
                    "replay of {:?} got no answer: {error:#}",
                    record.key
                ));
                continue;
            }
        };
        let id: Option<Uuid> = answer.body["transferId"]
            .as_str()
            .and_then(|id| id.parse().ok());
        if Some(answer.status.as_u16()) != record.status() || id != record.transfer_id() {
            mismatches.push(format!(
                "replay of key {:?} answered {} {:?}, first {:?} {:?}: {}",
                record.key,
                answer.status,
                id,
                record.status(),
                record.transfer_id(),
                answer.body
            ));
        }
    }
    let after = count().await?;
    if after != before {
        mismatches.push(format!("replays added {} transfers", after - before));
    }
    Ok(Replayed {
        sent: picked.len(),
        retried: retried.into_inner(),
        mismatches,
    })
}

/// Conservation and PENDING transfers sampled from PostgreSQL while a load runs.
pub struct LedgerSampler {
    stop: CancellationToken,
    task: JoinHandle<Sampled>,
}

#[derive(Debug, Default)]
pub struct Sampled {
    pub samples: usize,
    /// Samples that failed (PostgreSQL busy or unreachable), and the first error.
    pub errors: usize,
    pub first_error: Option<String>,
    /// Snapshots in which money was not conserved, with the time since the start.
    pub violations: Vec<(Duration, wallet_tests::ledger::Conservation)>,
    pub max_pending: usize,
    /// The oldest PENDING transfer seen in any sample, in seconds.
    pub oldest_pending_secs: f64,
}

impl LedgerSampler {
    pub fn start(cluster: &TestCluster, every: Duration) -> Self {
        let pool = cluster.db.pool.clone();
        let stop = CancellationToken::new();
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let mut sampled = Sampled::default();
                while !stop.is_cancelled() {
                    match wallet_tests::ledger::conservation(&pool).await {
                        Ok((totals, oldest)) => {
                            sampled.samples += 1;
                            sampled.max_pending = sampled.max_pending.max(totals.pending_count);
                            sampled.oldest_pending_secs =
                                sampled.oldest_pending_secs.max(oldest.unwrap_or_default());
                            if !totals.holds() && sampled.violations.len() < 10 {
                                sampled.violations.push((started.elapsed(), totals));
                            }
                        }
                        Err(error) => {
                            sampled.errors += 1;
                            sampled
                                .first_error
                                .get_or_insert_with(|| format!("{error:#}"));
                        }
                    }
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = tokio::time::sleep(every) => {}
                    }
                }
                sampled
            })
        };
        Self { stop, task }
    }

    pub async fn stop(self) -> anyhow::Result<Sampled> {
        self.stop.cancel();
        Ok(self.task.await?)
    }
}
