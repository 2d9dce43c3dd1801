//! Redis loses everything (FLUSHALL) or goes away for a while under load. PostgreSQL
//! holds the truth: fences keep rising (re-seeded from PostgreSQL), balances stay
//! exact, reads never need Redis, and writes resume once it is back.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use wallet_tests::eventually;

use crate::harness::{Load, SETTLE, TestCluster, audit};

/// A redis-server of the test's own, without persistence, restartable on its port.
struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    async fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut server = Self { port, child: None };
        server.spawn().await?;
        Ok(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new(wallet_tests::env_or("REDIS_SERVER_BIN", "redis-server"))
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir", "/tmp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        let up = eventually(SETTLE, || async {
            matches!(self.command(&["PING"]).await.as_deref(), Ok("+PONG"))
        })
        .await;
        anyhow::ensure!(up, "redis-server on port {} did not start", self.port);
        Ok(())
    }

    /// Sends one command and returns the first line of the reply.
    async fn command(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).await?;
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while stream.read(&mut byte).await? == 1 && byte[0] != b'\n' {
            reply.push(byte[0]);
        }
        Ok(String::from_utf8_lossy(&reply).trim_end().to_owned())
    }

    /// SHUTDOWN NOSAVE: everything in it is gone when it comes back.
    async fn stop(&mut self) -> anyhow::Result<()> {
        // The server closes the connection instead of answering.
        let _ = self.command(&["SHUTDOWN", "NOSAVE"]).await;
        if let Some(mut child) = self.child.take() {
            tokio::time::timeout(SETTLE, child.wait()).await??;
        }
        Ok(())
    }
}

async fn fences(cluster: &TestCluster) -> anyhow::Result<BTreeMap<i32, (i64, String)>> {
    let rows: Vec<(i32, i64, String)> =
        sqlx::query_as("SELECT shard, fence, owner FROM shard_fences")
            .fetch_all(&cluster.db.pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(shard, fence, owner)| (shard, (fence, owner)))
        .collect())
}

async fn lease_losses(cluster: &TestCluster) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for node in cluster.live() {
        total += node.metric("wallet_lease_losses_total").await?;
    }
    Ok(total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_flushall_fences_keep_rising_and_balances_stay_exact() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut cluster = TestCluster::start(3, |options| options.redis_url = redis.url()).await?;
    let wallets = cluster.funded_wallets(6, "1000.00").await?;
    let load = Load::start(&cluster, &wallets);
    load.wait_progress(200, false).await?;

    let before = fences(&cluster).await?;
    let losses_before = lease_losses(&cluster).await?;
    assert_eq!(redis.command(&["FLUSHALL"]).await?, "+OK");
    load.wait_progress(200, false).await?;
    cluster.wait_settled(3).await?;
    let churn = fences(&cluster)
        .await?
        .iter()
        .filter(|(shard, (fence, _))| before.get(*shard).is_some_and(|(old, _)| old != fence))
        .count();
    eprintln!(
        "FLUSHALL: {churn} of {} shards were claimed again, {} leases lost",
        before.len(),
        lease_losses(&cluster).await? - losses_before
    );

    // Make shards change hands after the flush: Redis's counters start again from 1,
    // below PostgreSQL's fences, so every claim must re-seed them first.
    let leaving = 2;
    load.drain(leaving).await?;
    let status = cluster.nodes[leaving].terminate().await?;
    assert!(status.success());
    cluster.wait_settled(2).await?;
    load.wait_progress(100, false).await?;
    cluster.nodes[leaving].restart().await?;
    load.add_target(leaving, cluster.nodes[leaving].api.clone());
    cluster.wait_settled(3).await?;
    load.wait_progress(200, false).await?;
    let records = load.stop().await?;

    let after = fences(&cluster).await?;
    for (shard, (fence, owner)) in &before {
        let (now, now_owner) = &after[shard];
        assert!(
            now >= fence,
            "shard {shard}: fence went back from {fence} to {now}"
        );
        if owner == &cluster.nodes[leaving].node_id {
            // Taken over while node-2 was away, then claimed back by it.
            assert!(now >= &(fence + 2), "shard {shard}: fence {fence} -> {now}");
            assert_eq!(now_owner, owner);
        }
    }
    assert!(
        before.iter().any(
            |(shard, (_, owner))| owner == &cluster.nodes[leaving].node_id && after[shard].0 > 0
        ),
        "node-2 owned no shard"
    );

    let report = audit(&cluster, &wallets, &records, 1).await?;
    eprintln!("FLUSHALL: {report:?}");
    report.assert_all_answered_without_errors();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_redis_outage_reads_answer_and_writes_resume_after_it() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    let cluster = TestCluster::start(3, |options| {
        options.redis_url = redis.url();
        options.request_deadline_ms = 5_000;
    })
    .await?;
    let wallets = cluster.funded_wallets(6, "1000.00").await?;
    let load = Load::start(&cluster, &wallets);
    load.wait_progress(200, false).await?;

    redis.stop().await?;
    let acknowledged_before = load.acknowledged();
    // Balance reads on every node while Redis is down.
    let reading = Arc::new(AtomicBool::new(true));
    let readers: Vec<_> = cluster
        .targets()
        .into_iter()
        .map(|(_, api)| {
            let reading = reading.clone();
            let wallets = wallets.clone();
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                let mut i = 0;
                while reading.load(Ordering::Relaxed) {
                    let wallet = wallets[i % wallets.len()];
                    i += 1;
                    let answer = api.get(&format!("/api/v1/wallets/{wallet}")).await;
                    statuses.push(answer.map(|a| a.status.as_u16()).map_err(|e| e.to_string()));
                }
                statuses
            })
        })
        .collect();
    // The outage itself lasts this long; nothing waits on it to synchronise.
    tokio::time::sleep(Duration::from_secs(3)).await;
    reading.store(false, Ordering::Relaxed);
    let acknowledged_during = load.acknowledged() - acknowledged_before;
    let mut reads = Vec::new();
    for reader in readers {
        reads.extend(reader.await?);
    }
    redis.spawn().await?;

    // Back: writes go through again (an empty Redis, like after a FLUSHALL).
    load.wait_progress(300, false).await?;
    cluster.wait_settled(3).await?;
    load.wait_progress(100, false).await?;
    let records = load.stop().await?;

    let failed_reads: Vec<_> = reads.iter().filter(|r| !matches!(r, Ok(200))).collect();
    eprintln!(
        "Redis outage: {} reads during it, {} writes acknowledged during it",
        reads.len(),
        acknowledged_during
    );
    assert!(!reads.is_empty());
    // Owners keep their shards through the outage: PostgreSQL's fence, not the lease,
    // is what guards commits.
    assert!(
        acknowledged_during > 0,
        "no write went through while Redis was down"
    );
    assert!(
        failed_reads.is_empty(),
        "reads failed while Redis was down: {failed_reads:?}"
    );

    let report = audit(&cluster, &wallets, &records, 1).await?;
    eprintln!("Redis outage: {report:?}");
    // A 503 may answer a request that waited past its deadline; the audit has already
    // failed if the operation of one was applied all the same.
    assert!(
        report.unexpected(&[503]).is_empty(),
        "{:?}",
        report.by_status
    );
    assert_eq!(
        report.transport_errors, 0,
        "{:?}",
        report.first_transport_error
    );
    Ok(())
}
