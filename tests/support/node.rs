use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use wallet::{Application, Config};

use crate::netns::{Netns, via_gateway};
use crate::{ApiClient, env_or, eventually};

/// Settings shared by the nodes of one test cluster.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub database_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    pub shards: u32,
    pub lease_ttl_ms: u64,
    pub heartbeat_ttl_ms: u64,
    pub request_deadline_ms: u64,
    pub internal_secret: String,
    pub extra: Vec<(String, String)>,
    /// Settings of one node only (by node id), over `extra`.
    pub per_node: BTreeMap<String, Vec<(String, String)>>,
    /// Node ids that run as processes inside a network namespace of `scripts/netns.sh`:
    /// bound to its address, advertising it, reaching PostgreSQL and Redis via the gateway.
    pub netns: BTreeMap<String, Netns>,
}

impl NodeOptions {
    pub fn new(database_url: &str) -> Self {
        Self {
            database_url: database_url.to_owned(),
            redis_url: env_or("REDIS_URL", "redis://127.0.0.1:56379"),
            redis_prefix: crate::unique_name("wallet_test"),
            shards: 64,
            lease_ttl_ms: 2_000,
            heartbeat_ttl_ms: 1_500,
            request_deadline_ms: 15_000,
            internal_secret: crate::unique_name("secret"),
            // Every test node trusts the tests' issuer; `ApiClient::new` carries its token.
            extra: crate::auth::node_env(),
            per_node: BTreeMap::new(),
            netns: BTreeMap::new(),
        }
    }

    /// The address node `node_id` binds and is reached at.
    fn host(&self, node_id: &str) -> IpAddr {
        self.netns
            .get(node_id)
            .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |ns| IpAddr::V4(ns.addr))
    }

    /// The configuration of in-process node `node_id`, on ports chosen by the OS.
    pub fn config(&self, node_id: &str) -> anyhow::Result<Config> {
        let env = self.env(node_id, [0, 0, 0])?;
        Ok(Config::from_lookup(|name| env.get(name).cloned())?)
    }

    fn env(&self, node_id: &str, ports: [u16; 3]) -> anyhow::Result<HashMap<String, String>> {
        let host = self.host(node_id);
        let (database_url, redis_url) = if self.netns.contains_key(node_id) {
            (
                via_gateway(&self.database_url)?,
                via_gateway(&self.redis_url)?,
            )
        } else {
            (self.database_url.clone(), self.redis_url.clone())
        };
        let mut env: HashMap<String, String> = [
            ("WALLET_NODE_ID", node_id.to_owned()),
            ("WALLET_PUBLIC_ADDR", format!("{host}:{}", ports[0])),
            ("WALLET_INTERNAL_ADDR", format!("{host}:{}", ports[1])),
            ("WALLET_ADMIN_ADDR", format!("{host}:{}", ports[2])),
            ("DATABASE_URL", database_url),
            ("REDIS_URL", redis_url),
            ("WALLET_REDIS_PREFIX", self.redis_prefix.clone()),
            ("WALLET_INTERNAL_SECRET", self.internal_secret.clone()),
            ("WALLET_SHARDS", self.shards.to_string()),
            ("WALLET_LEASE_TTL_MS", self.lease_ttl_ms.to_string()),
            ("WALLET_HEARTBEAT_TTL_MS", self.heartbeat_ttl_ms.to_string()),
            (
                "WALLET_REQUEST_DEADLINE_MS",
                self.request_deadline_ms.to_string(),
            ),
            ("WALLET_SHUTDOWN_GRACE_MS", "5000".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        if self.netns.contains_key(node_id) {
            env.insert(
                "WALLET_ADVERTISE_ADDR".to_owned(),
                format!("{host}:{}", ports[1]),
            );
        }
        env.extend(self.extra.iter().cloned());
        env.extend(self.per_node.get(node_id).into_iter().flatten().cloned());
        Ok(env)
    }
}

/// A node running inside the test process, on ports chosen by the OS.
pub struct InProcessNode {
    pub api: ApiClient,
    pub admin_url: String,
    pub internal_url: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcessNode {
    /// Sum of every sample of the metric family `name` (or one series of it, labels
    /// included) on the admin port (0 if absent).
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        scrape_metric(&self.admin_url, name).await
    }

    pub async fn start(node_id: &str, options: &NodeOptions) -> anyhow::Result<Self> {
        let node = Self::start_unready(node_id, options).await?;
        anyhow::ensure!(
            node.wait_ready(Duration::from_secs(20)).await,
            "node {node_id} did not become ready"
        );
        Ok(node)
    }

    /// Starts the node without waiting for it to become ready.
    pub async fn start_unready(node_id: &str, options: &NodeOptions) -> anyhow::Result<Self> {
        let config = options.config(node_id)?;
        let application = Application::build(config).await?;
        let api = ApiClient::new(&format!("http://{}", application.public_addr()));
        let admin_url = format!("http://{}", application.admin_addr());
        let internal_url = format!("http://{}", application.internal_addr());
        let stop = application.shutdown_token();
        let task = tokio::spawn(application.run_until_stopped());
        Ok(Self {
            api,
            admin_url,
            internal_url,
            stop,
            task,
        })
    }

    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        wait_ready(&self.admin_url, timeout).await
    }

    /// Stops the node as SIGTERM would and waits until it has handed its shards over.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await?
    }
}

pub async fn wait_ready(admin_url: &str, timeout: Duration) -> bool {
    let client = reqwest::Client::new();
    let url = format!("{admin_url}/readyz");
    eventually(timeout, || {
        let request = client.get(&url).send();
        async move { matches!(request.await, Ok(response) if response.status().is_success()) }
    })
    .await
}

/// A node as a separate OS process, to be killed, paused and restarted.
pub struct NodeProcess {
    pub node_id: String,
    pub api: ApiClient,
    pub admin_url: String,
    ports: [u16; 3],
    options: NodeOptions,
    child: Option<Child>,
}

/// Where node processes of the tests write their logs: `target/test-logs` of the workspace.
pub fn test_log_dir() -> String {
    env_or(
        "WALLET_TEST_LOG_DIR",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/test-logs"),
    )
}

/// Path of the `wallet` binary next to the test executable (built by `make test`).
pub fn wallet_binary() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("WALLET_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> -> target/<profile>/wallet
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or_else(|| anyhow::anyhow!("no target dir"))?;
    let path = dir.join("wallet");
    anyhow::ensure!(
        path.exists(),
        "{} not found: build it first (cargo build -p wallet)",
        path.display()
    );
    Ok(path)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Ports for a node in a namespace: free there unless an earlier run left a node behind
/// (the namespace cannot be probed from here), and `start` is retried then.
fn namespace_ports() -> [u16; 3] {
    let random = uuid::Uuid::new_v4().as_u128();
    let base = 20_000 + u16::try_from(random % 40_000).unwrap_or(0);
    [base, base + 1, base + 2]
}

impl NodeProcess {
    pub async fn start(node_id: &str, options: &NodeOptions) -> anyhow::Result<Self> {
        let ports = if options.netns.contains_key(node_id) {
            namespace_ports()
        } else {
            [free_port()?, free_port()?, free_port()?]
        };
        let host = options.host(node_id);
        let mut node = Self {
            node_id: node_id.to_owned(),
            api: ApiClient::new(&format!("http://{host}:{}", ports[0])),
            admin_url: format!("http://{host}:{}", ports[2]),
            ports,
            options: options.clone(),
            child: None,
        };
        node.spawn().await?;
        Ok(node)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log_dir = PathBuf::from(test_log_dir());
        std::fs::create_dir_all(&log_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join(format!(
                "{}-{}.log",
                self.options.redis_prefix, self.node_id
            )))?;
        // `ip netns exec` execs the node in the namespace: the child's pid is the node's,
        // so signals reach the node itself.
        let mut command = match self.netns() {
            Some(ns) => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", &ns.name])
                    .arg(wallet_binary()?);
                command
            }
            None => Command::new(wallet_binary()?),
        };
        let child = command
            .envs(self.options.env(&self.node_id, self.ports)?)
            .env("RUST_LOG", env_or("RUST_LOG", "info"))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        anyhow::ensure!(
            wait_ready(&self.admin_url, Duration::from_secs(30)).await,
            "node {} did not become ready",
            self.node_id
        );
        if self.netns().is_some() {
            // kill, SIGSTOP and SIGTERM go to this pid: it must be the node, not `ip`.
            let pid = self.pid().unwrap_or_default();
            let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
            anyhow::ensure!(
                exe == std::fs::canonicalize(wallet_binary()?)?,
                "pid {pid} of {} is {}, not the node",
                self.node_id,
                exe.display()
            );
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<i32> {
        self.child
            .as_ref()
            .and_then(Child::id)
            .and_then(|pid| i32::try_from(pid).ok())
    }

    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow::anyhow!("node {} is not running", self.node_id))?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }

    /// kill -9: no handoff, leases expire on their own.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.signal("KILL")?;
        if let Some(mut child) = self.child.take() {
            child.wait().await?;
        }
        Ok(())
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.signal("TERM")?;
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow::anyhow!("not running"))?;
        Ok(tokio::time::timeout(Duration::from_secs(30), child.wait()).await??)
    }

    /// Starts the node again on the same ports after `kill` or `terminate`.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.spawn().await
    }

    /// Base URL of the node-to-node listener.
    pub fn internal_url(&self) -> String {
        format!(
            "http://{}:{}",
            self.options.host(&self.node_id),
            self.ports[1]
        )
    }

    /// The network namespace the node runs in, if any.
    pub fn netns(&self) -> Option<&Netns> {
        self.options.netns.get(&self.node_id)
    }

    /// Whether the process was started and not yet killed or terminated by the test.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The node this node's view names as the owner of `wallet_id`'s shard.
    pub async fn owner_of(&self, wallet_id: uuid::Uuid) -> anyhow::Result<(u32, Option<String>)> {
        let body: serde_json::Value =
            reqwest::get(format!("{}/cluster/owner/{wallet_id}", self.admin_url))
                .await?
                .json()
                .await?;
        let shard = body["shard"]
            .as_u64()
            .and_then(|shard| u32::try_from(shard).ok())
            .ok_or_else(|| anyhow::anyhow!("no shard in {body}"))?;
        Ok((shard, body["owner"].as_str().map(str::to_owned)))
    }

    /// Sum of every sample of the metric family `name` on the admin port (0 if absent).
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        scrape_metric(&self.admin_url, name).await
    }

    pub async fn cluster_view(&self) -> anyhow::Result<serde_json::Value> {
        Ok(reqwest::get(format!("{}/cluster", self.admin_url))
            .await?
            .json()
            .await?)
    }
}

/// `metric_sum` of `name` in what the admin port at `admin_url` exposes now.
pub async fn scrape_metric(admin_url: &str, name: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{admin_url}/metrics"))
        .await?
        .text()
        .await?;
    Ok(metric_sum(&text, name))
}

/// Sum of the samples of `name` (with or without labels) in Prometheus text format.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            line.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .sum()
}
