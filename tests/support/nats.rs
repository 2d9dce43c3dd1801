//! A NATS server with JetStream of the test's own (`nats-server -js`, Debian's package,
//! which `scripts/deps.sh` installs), on a free port with its store in a temporary
//! folder, stopped and started again on the same port and store by the outage tests.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream;
use tokio::process::{Child, Command};

use crate::{env_or, eventually, unique_name};

pub struct NatsServer {
    pub url: String,
    binary: PathBuf,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// Where `nats-server` is: `WALLET_NATS_SERVER`, else the PATH, else Debian's /usr/sbin
/// (not on every user's PATH).
fn binary() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("WALLET_NATS_SERVER") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
}

impl NatsServer {
    /// A started server, or `None` when no `nats-server` is installed: the test then says
    /// so loudly and passes without testing anything. With `WALLET_REQUIRE_NATS=1` (set by
    /// `make test`, which installs it) a missing server is an error instead.
    pub async fn start(test: &str) -> anyhow::Result<Option<Self>> {
        let Some(binary) = binary() else {
            anyhow::ensure!(
                env_or("WALLET_REQUIRE_NATS", "0") != "1",
                "{test}: nats-server is not installed, and WALLET_REQUIRE_NATS=1 (run scripts/deps.sh)"
            );
            eprintln!(
                "\n\x1b[1;33m!!!!!!!! SKIPPED {test}: nats-server is not installed \
                 (scripts/deps.sh installs it; WALLET_NATS_SERVER names another binary) !!!!!!!!\x1b[0m\n"
            );
            return Ok(None);
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(unique_name("wallet-nats"));
        std::fs::create_dir_all(&dir)?;
        let mut server = Self {
            url: format!("nats://127.0.0.1:{port}"),
            binary,
            port,
            dir,
            child: None,
        };
        server.spawn().await?;
        Ok(Some(server))
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join("nats-server.log"))?;
        let child = Command::new(&self.binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-sd")
            .arg(self.dir.join("jetstream"))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        let url = self.url.clone();
        let ready = eventually(Duration::from_secs(20), || {
            let url = url.clone();
            async move {
                // JetStream answers its API (the account's info, read raw: this client's
                // typed view of it wants fields a 2.9 server does not send).
                let Ok(client) = async_nats::connect(&url).await else {
                    return false;
                };
                match client.request("$JS.API.INFO", "".into()).await {
                    Ok(answer) => serde_json::from_slice::<serde_json::Value>(&answer.payload)
                        .is_ok_and(|info| info.get("error").is_none()),
                    Err(_) => false,
                }
            }
        })
        .await;
        anyhow::ensure!(
            ready,
            "nats-server on {} did not get ready; see {}",
            self.url,
            self.dir.join("nats-server.log").display()
        );
        Ok(())
    }

    /// kill -9: what the node sees of an outage.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// SIGSTOP (`resume` is SIGCONT): connections stay open, and nothing is answered.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("STOP")
    }

    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("CONT")
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .ok_or_else(|| anyhow::anyhow!("nats-server is not running"))?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }

    /// Starts the server again on the same port, with the same JetStream store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        self.spawn().await
    }

    pub async fn jetstream(&self) -> anyhow::Result<jetstream::Context> {
        Ok(jetstream::new(async_nats::connect(&self.url).await?))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
