//! Real network partitions. Every node is a process in its own network namespace
//! (`scripts/netns.sh`); a cut is iptables DROP inside the node's namespace, a black
//! hole: nobody gets a reset, each side learns only from its own timeouts.
//!
//! The cut tests take the OWNER of the hot wallet off PostgreSQL, off Redis, off its
//! peers, or off everything, under load over the live nodes; hold the cut past the lease
//! TTL; heal; keep the load going until the hot wallet makes progress again; and audit:
//! nothing acknowledged lost or doubled, every balance equal to its audit trail. Each
//! test prints one summary line (answers by status, transport errors, the longest gap
//! between acknowledged answers on the hot wallet). Where network namespaces cannot be
//! made, each test prints "SKIPPED: <reason>" and returns.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use uuid::Uuid;
use wallet_tests::netns::{self, Cut, Namespaces, Netns, Prepared};
use wallet_tests::{NodeOptions, NodeProcess, eventually};

use crate::harness::{Answered, Audit, Load, Record, TestCluster, audit};

const NODES: usize = 3;
/// How long a cut waits for the hot wallet to be served again (or for shards to move)
/// before the test calls it unavailable: far beyond the lease TTL + 2 s it should take.
const RECOVERY_LIMIT: Duration = Duration::from_secs(20);
/// Acknowledged answers on the hot wallet, to requests sent after the cut, that show
/// it is served again. Few: when peers cannot forward, most of the load's clients sit
/// in requests waiting for the owner, and only the rest reach it.
const SERVED_AGAIN: usize = 3;

#[derive(Clone, Copy, Debug)]
enum Partition {
    Postgres,
    Redis,
    Peers,
    Isolated,
}

impl Partition {
    fn cuts(self, options: &NodeOptions) -> anyhow::Result<Vec<Cut>> {
        Ok(match self {
            Self::Postgres => vec![Cut::GatewayPort(port_of(&options.database_url)?)],
            Self::Redis => vec![Cut::GatewayPort(port_of(&options.redis_url)?)],
            Self::Peers => vec![Cut::Peers],
            Self::Isolated => vec![Cut::All],
        })
    }

    /// Whether the load stops sending to the cut node. Only full isolation cuts its
    /// clients too: a load balancer's health checks fail and it leaves the rotation
    /// (requests already sent wait in the black hole). Cut off PostgreSQL, Redis or its
    /// peers, the node is still reachable by its clients and keeps getting requests, as
    /// until a readiness probe reacts it would; it must route them to the new owner or
    /// answer them truthfully, which is the stricter test.
    fn clients_cut(self) -> bool {
        matches!(self, Self::Isolated)
    }

    /// Whether another node must claim the owner's shard during the cut. Off Redis the
    /// owner cannot renew its lease, off PostgreSQL it cannot commit: either way it has
    /// to go. Cut off only from its peers it still holds a valid lease and commits, so
    /// nobody may take the shard from it.
    fn owner_replaced(self) -> bool {
        !matches!(self, Self::Peers)
    }
}

fn port_of(url: &str) -> anyhow::Result<u16> {
    reqwest::Url::parse(url)?
        .port()
        .with_context(|| format!("no port in {url}"))
}

/// The namespaces, or None after telling loudly why this machine cannot have them.
pub(crate) async fn namespaces_or_skip(test: &str) -> anyhow::Result<Option<Namespaces>> {
    // Waits for the lock of another partition test, off the test's own threads.
    Ok(
        match tokio::task::spawn_blocking(|| netns::prepare(NODES)).await?? {
            Prepared::Ready(namespaces) => Some(namespaces),
            Prepared::Unavailable(reason) => {
                eprintln!("\n!!!!!!!! SKIPPED: {test}: {reason} !!!!!!!!\n");
                None
            }
        },
    )
}

pub(crate) async fn start_in_namespaces(namespaces: &[Netns]) -> anyhow::Result<TestCluster> {
    TestCluster::start(NODES, |options| {
        for (index, namespace) in namespaces.iter().enumerate() {
            options
                .netns
                .insert(format!("node-{index}"), namespace.clone());
        }
    })
    .await
}

/// Answers by status, transport errors, and those among them on requests to `node`.
fn answers(records: &[Record], node: usize) -> (BTreeMap<u16, usize>, usize, usize) {
    let mut by_status = BTreeMap::new();
    let (mut transport, mut transport_to_node) = (0, 0);
    for record in records {
        match &record.answer {
            Answered::Status { status, .. } => *by_status.entry(*status).or_default() += 1,
            Answered::Transport(_) => {
                transport += 1;
                transport_to_node += usize::from(record.node == node);
            }
        }
    }
    (by_status, transport, transport_to_node)
}

fn acknowledged(record: &Record, wallet: Uuid) -> bool {
    record.wallet == wallet
        && matches!(
            record.answer,
            Answered::Status {
                status: 200 | 409,
                ..
            }
        )
}

/// The longest time between two acknowledged answers on `wallet`: its unavailability.
fn longest_gap(records: &[Record], wallet: Uuid) -> Duration {
    let mut times: Vec<Instant> = records
        .iter()
        .filter(|record| acknowledged(record, wallet))
        .map(|record| record.answered_at)
        .collect();
    times.sort();
    times
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or_default()
}

/// How long after `since` the first request on `wallet` sent after it was acknowledged,
/// if that happened before `until`.
fn served_after(
    records: &[Record],
    wallet: Uuid,
    since: Instant,
    until: Instant,
) -> Option<Duration> {
    records
        .iter()
        .filter(|record| acknowledged(record, wallet) && record.sent_at >= since)
        .map(|record| record.answered_at)
        .filter(|at| *at < until)
        .min()
        .map(|at| at - since)
}

fn seconds(duration: Option<Duration>) -> String {
    duration.map_or_else(
        || "never".to_owned(),
        |d| format!("{:.2}s", d.as_secs_f64()),
    )
}

fn audit_line(audited: &anyhow::Result<Audit>) -> String {
    match audited {
        Ok(report) => format!(
            "audit ok ({} rows, {} unknown outcomes of which {} committed)",
            report.rows, report.unknown, report.unknown_committed
        ),
        Err(error) => format!("audit FAILED: {error:#}"),
    }
}

/// The shards a node's /cluster view says it serves, if it answers within a second.
async fn owned_shards(node: &NodeProcess) -> Option<Vec<u32>> {
    let view = tokio::time::timeout(Duration::from_secs(1), node.cluster_view())
        .await
        .ok()?
        .ok()?;
    view["ownedShards"]
        .as_array()?
        .iter()
        .map(|shard| shard.as_u64().and_then(|shard| u32::try_from(shard).ok()))
        .collect()
}

/// The cut node serves no shard and the others serve every shard exactly once.
async fn shards_moved_off(cluster: &TestCluster, victim: usize) -> bool {
    if owned_shards(&cluster.nodes[victim]).await != Some(Vec::new()) {
        return false;
    }
    let mut served = BTreeSet::new();
    for (index, node) in cluster.nodes.iter().enumerate() {
        if index == victim {
            continue;
        }
        let Some(owned) = owned_shards(node).await else {
            return false;
        };
        for shard in owned {
            if !served.insert(shard) {
                return false;
            }
        }
    }
    served.len() == usize::try_from(cluster.options.shards).unwrap_or(usize::MAX)
}

/// Cuts the owner of the hot wallet as `partition` says under load, heals, and checks.
async fn cut_the_owner(test: &str, partition: Partition) -> anyhow::Result<()> {
    let Some(namespaces) = namespaces_or_skip(test).await? else {
        return Ok(());
    };
    let cluster = start_in_namespaces(&namespaces.list).await?;
    let wallets = cluster.funded_wallets(6, "1000.00").await?;
    let hot = wallets[0];
    let (shard, victim) = cluster
        .agreed_owner(hot)
        .await?
        .context("the nodes disagree on the owner")?;
    let victim_id = cluster.nodes[victim].node_id.clone();
    let namespace = cluster.nodes[victim]
        .netns()
        .context("the owner is not in a namespace")?
        .clone();
    let cuts = partition.cuts(&cluster.options)?;
    // Past the lease TTL and the heartbeat TTL: long enough for the owner's leases and
    // membership to expire, well short of the request deadline.
    let hold = Duration::from_millis(3 * cluster.options.lease_ttl_ms);

    let load = Load::start(&cluster, &wallets);
    load.wait_progress(200, true).await?;

    let cut_at = Instant::now();
    for cut in &cuts {
        namespace.cut(*cut)?;
    }
    if partition.clients_cut() {
        load.remove_target(victim);
    }
    // Held at least `hold`, and until the hot wallet is served again (or it gives up).
    let claimed = Cell::new(None);
    eventually(RECOVERY_LIMIT, || {
        let claimed = &claimed;
        let (cluster, load, victim_id) = (&cluster, &load, &victim_id);
        async move {
            if claimed.get().is_none()
                && matches!(cluster.fence(shard).await, Ok(Some((_, owner))) if owner != *victim_id)
            {
                claimed.set(Some(cut_at.elapsed()));
            }
            cut_at.elapsed() >= hold && load.acknowledged_since(hot, cut_at) >= SERVED_AGAIN
        }
    })
    .await;
    namespace.heal()?;
    let healed_at = Instant::now();
    if partition.clients_cut() {
        load.add_target(victim, cluster.nodes[victim].api.clone());
    }

    let mut failures = Vec::new();
    // Healed, the cluster converges again and the hot wallet keeps being served.
    if let Err(error) = cluster.wait_settled(NODES).await {
        failures.push(format!("after the heal: {error:#}"));
    }
    if let Err(error) = load.wait_progress(200, true).await {
        failures.push(format!("after the heal: {error:#}"));
    }
    let records = tokio::time::timeout(Duration::from_secs(90), load.stop())
        .await
        .context("the load's requests never finished")??;
    let audited = audit(&cluster, &wallets, &records, 1).await;

    let served = served_after(&records, hot, cut_at, healed_at);
    let (by_status, transport, transport_to_victim) = answers(&records, victim);
    eprintln!(
        "partition {partition:?} ({test}): owner {victim_id} of shard {shard} cut for {}; \
         hot wallet served again after {}, shard claimed by another node after {}; \
         answers {by_status:?}, transport errors {transport} ({transport_to_victim} to the cut node); \
         longest gap on the hot wallet {}; {}",
        seconds(Some(healed_at - cut_at)),
        seconds(served),
        seconds(claimed.get()),
        seconds(Some(longest_gap(&records, hot))),
        audit_line(&audited),
    );

    if served.is_none() {
        failures.push(format!(
            "no request on the hot wallet sent after the cut was acknowledged during the {}s cut",
            (healed_at - cut_at).as_secs()
        ));
    }
    match (partition.owner_replaced(), claimed.get()) {
        (true, None) => failures.push(format!(
            "no other node claimed shard {shard} while {victim_id} was cut"
        )),
        (false, Some(after)) => failures.push(format!(
            "shard {shard} was claimed from {victim_id} after {after:?} though it kept its lease"
        )),
        _ => {}
    }
    let allowed_transport = if partition.clients_cut() {
        transport - transport_to_victim
    } else {
        transport
    };
    if allowed_transport > 0 {
        failures.push(format!(
            "{allowed_transport} requests to reachable nodes got no HTTP answer"
        ));
    }
    match &audited {
        // 503 only when no owner answered within the deadline; its truth is the audit's.
        Ok(report) if !report.unexpected(&[503]).is_empty() => {
            failures.push(format!("unexpected statuses: {:?}", report.by_status));
        }
        Ok(_) => {}
        Err(error) => failures.push(format!("audit: {error:#}")),
    }
    assert!(failures.is_empty(), "{}", failures.join("; "));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_cut_off_postgres_hands_the_hot_wallet_over_and_loses_nothing() -> anyhow::Result<()>
{
    cut_the_owner("owner_cut_off_postgres", Partition::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_cut_off_redis_hands_the_hot_wallet_over_and_loses_nothing() -> anyhow::Result<()> {
    cut_the_owner("owner_cut_off_redis", Partition::Redis).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_cut_off_its_peers_keeps_serving_its_clients_and_loses_nothing() -> anyhow::Result<()>
{
    cut_the_owner("owner_cut_off_its_peers", Partition::Peers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_owner_is_replaced_and_loses_nothing() -> anyhow::Result<()> {
    cut_the_owner("isolated_owner", Partition::Isolated).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_black_holed_for_one_node_only_moves_its_shards_to_the_others_within_lease_ttl_plus_2s()
-> anyhow::Result<()> {
    let test = "postgres_black_holed_for_one_node_only";
    let Some(namespaces) = namespaces_or_skip(test).await? else {
        return Ok(());
    };
    let cluster = start_in_namespaces(&namespaces.list).await?;
    let wallets = cluster.funded_wallets(6, "1000.00").await?;
    let hot = wallets[0];
    // The cut node owns the hot wallet, so the load needs one of its shards moved.
    let (shard, victim) = cluster
        .agreed_owner(hot)
        .await?
        .context("the nodes disagree on the owner")?;
    let victim_id = cluster.nodes[victim].node_id.clone();
    let namespace = cluster.nodes[victim]
        .netns()
        .context("the node is not in a namespace")?
        .clone();
    let required = Duration::from_millis(cluster.options.lease_ttl_ms) + Duration::from_secs(2);
    let owned_before = owned_shards(&cluster.nodes[victim])
        .await
        .context("no cluster view")?
        .len();

    // The load goes to the other nodes only: this test is about them taking over and
    // serving; the cut node's own clients are the owner-off-PostgreSQL test's subject.
    let load = Load::start(&cluster, &wallets);
    load.remove_target(victim);
    load.wait_progress(200, true).await?;

    let cut_at = Instant::now();
    namespace.cut(Cut::GatewayPort(port_of(&cluster.options.database_url)?))?;
    let moved = eventually(RECOVERY_LIMIT, || shards_moved_off(&cluster, victim)).await;
    let moved_after = moved.then(|| cut_at.elapsed());
    // The others serve the hot wallet (moved to one of them) and everything else.
    eventually(RECOVERY_LIMIT.saturating_sub(cut_at.elapsed()), || {
        std::future::ready(load.acknowledged_since(hot, cut_at) >= SERVED_AGAIN)
    })
    .await;
    namespace.heal()?;
    let healed_at = Instant::now();

    let mut failures = Vec::new();
    if let Err(error) = cluster.wait_settled(NODES).await {
        failures.push(format!("after the heal: {error:#}"));
    }
    if let Err(error) = load.wait_progress(200, true).await {
        failures.push(format!("after the heal: {error:#}"));
    }
    let records = tokio::time::timeout(Duration::from_secs(90), load.stop())
        .await
        .context("the load's requests never finished")??;
    let audited = audit(&cluster, &wallets, &records, 1).await;

    let served = served_after(&records, hot, cut_at, healed_at);
    let (by_status, transport, _) = answers(&records, victim);
    eprintln!(
        "partition PostgresOneNode ({test}): {victim_id} (owner of shard {shard}, {owned_before} shards) \
         cut off PostgreSQL for {}; its shards moved to the others after {} (required <= {}); \
         hot wallet served again after {}; answers of the other nodes {by_status:?}, \
         transport errors {transport}; longest gap on the hot wallet {}; {}",
        seconds(Some(healed_at - cut_at)),
        seconds(moved_after),
        seconds(Some(required)),
        seconds(served),
        seconds(Some(longest_gap(&records, hot))),
        audit_line(&audited),
    );

    match moved_after {
        Some(after) if after <= required => {}
        Some(after) => failures.push(format!(
            "the shards of {victim_id} moved after {after:?}, more than lease TTL + 2 s ({required:?})"
        )),
        None => failures.push(format!(
            "{victim_id} kept its shards (or nobody took them) for {RECOVERY_LIMIT:?} without PostgreSQL"
        )),
    }
    if served.is_none() {
        failures.push("the other nodes did not serve the hot wallet during the cut".to_owned());
    }
    // The others answer within the deadline, every time: a takeover is no excuse for 5xx.
    if transport > 0 {
        failures.push(format!("{transport} requests got no HTTP answer"));
    }
    match &audited {
        Ok(report) if report.server_errors() > 0 || !report.unexpected(&[]).is_empty() => {
            failures.push(format!("unexpected statuses: {:?}", report.by_status));
        }
        Ok(_) => {}
        Err(error) => failures.push(format!("audit: {error:#}")),
    }
    assert!(failures.is_empty(), "{}", failures.join("; "));
    Ok(())
}
