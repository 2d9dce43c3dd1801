//! A PostgreSQL server of one test's own, in a folder under `target/`, to be stopped and
//! started under load without touching the shared server the other tests use.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use tokio::process::{Child, Command};

use crate::{eventually, unique_name};

/// How long the server may take to accept connections (crash recovery included).
const STARTUP: Duration = Duration::from_secs(30);

/// Why no private server could run here (no binaries, no `postgres` user, initdb failed).
#[derive(Debug)]
pub struct PostgresUnavailable(pub String);

impl fmt::Display for PostgresUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How to stop the server: the `pg_ctl stop -m` modes, as the signals pg_ctl sends.
#[derive(Clone, Copy, Debug)]
pub enum StopMode {
    /// SIGINT: sessions are ended, then a clean shutdown.
    Fast,
    /// SIGQUIT: every process exits at once; the next start runs crash recovery.
    Immediate,
}

pub struct PrivatePostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// The `postgres` user's uid and gid when this process is root (PostgreSQL refuses root).
    run_as: Option<(u32, u32)>,
    log: PathBuf,
    child: Option<Child>,
}

impl PrivatePostgres {
    /// initdb into a fresh folder and start the server on a free port (fsync off: the
    /// tests crash processes, not the machine).
    pub async fn start() -> Result<Self, PostgresUnavailable> {
        let unavailable =
            |what: &str, error: &dyn fmt::Display| PostgresUnavailable(format!("{what}: {error}"));
        let bin = bin_dir()?;
        let run_as = run_as()?;
        let name = unique_name("pg");
        let dir = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/private-postgres"
        ))
        .join(&name);
        let log_dir = PathBuf::from(crate::node::test_log_dir());
        std::fs::create_dir_all(&log_dir).map_err(|e| unavailable("log folder", &e))?;
        let log = log_dir.join(format!("private-postgres-{name}.log"));
        for sub in ["data", "run"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|e| unavailable("data folder", &e))?;
            if let Some((uid, gid)) = run_as {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .map_err(|e| unavailable("chown of the data folder", &e))?;
            }
        }
        // initdb refuses a data folder others can read.
        std::fs::set_permissions(
            dir.join("data"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(|e| unavailable("data folder mode", &e))?;

        let mut server = Self {
            bin,
            dir,
            port: 0,
            run_as,
            log,
            child: None,
        };
        let data = server.dir.join("data");
        let initdb = server
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "wallet", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .args(["--no-instructions"])
            .output()
            .await
            .map_err(|e| unavailable("initdb did not run", &e))?;
        if !initdb.status.success() {
            return Err(PostgresUnavailable(format!(
                "initdb failed ({}): {}",
                initdb.status,
                String::from_utf8_lossy(&initdb.stderr).trim()
            )));
        }
        // Ports are picked free and released before the server binds them; another
        // process may take one meanwhile, so try a few.
        let mut last_error = String::new();
        for _ in 0..3 {
            server.port = free_port().map_err(|e| unavailable("free port", &e))?;
            match server.spawn().await {
                Ok(_) => return Ok(server),
                Err(error) => last_error = format!("{error:#}"),
            }
        }
        Err(PostgresUnavailable(format!(
            "the server did not start: {last_error} (log {})",
            server.log.display()
        )))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of the `postgres` database, to create test databases from.
    pub fn admin_url(&self) -> String {
        format!("postgres://wallet:wallet@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server and waits until every process of it is gone.
    pub async fn stop(&mut self, mode: StopMode) -> anyhow::Result<()> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow::anyhow!("PostgreSQL is not running"))?;
        signal(&child, mode)?;
        tokio::time::timeout(STARTUP, child.wait()).await??;
        Ok(())
    }

    /// Starts the stopped server again on the same port; returns once it accepts
    /// connections, with the moment it did.
    pub async fn restart(&mut self) -> anyhow::Result<Instant> {
        anyhow::ensure!(self.child.is_none(), "PostgreSQL is still running");
        self.spawn().await
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }

    async fn spawn(&mut self) -> anyhow::Result<Instant> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1"])
            .arg("-k")
            .arg(self.dir.join("run"))
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        let url = self.admin_url();
        let mut exited = None;
        let accepting = eventually(STARTUP, || {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                exited = Some(status);
            }
            let url = url.clone();
            let exited = exited.is_some();
            async move {
                // Once it exited nothing will answer: stop polling.
                exited
                    || match PgConnection::connect(&url).await {
                        Ok(connection) => {
                            let _ = connection.close().await;
                            true
                        }
                        Err(_) => false,
                    }
            }
        })
        .await;
        let at = Instant::now();
        if let Some(status) = exited {
            self.child = None;
            anyhow::bail!("postgres exited with {status}; see {}", self.log.display());
        }
        anyhow::ensure!(
            accepting,
            "PostgreSQL on port {} accepted no connection; see {}",
            self.port,
            self.log.display()
        );
        Ok(at)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // An immediate shutdown cleans up its shared memory, unlike the SIGKILL of
        // kill_on_drop; it takes a moment, so wait for it (blocking is fine in a test).
        if let Some(mut child) = self.child.take()
            && signal(&child, StopMode::Immediate).is_ok()
        {
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn signal(child: &Child, mode: StopMode) -> anyhow::Result<()> {
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("PostgreSQL has exited"))?;
    let name = match mode {
        StopMode::Fast => "INT",
        StopMode::Immediate => "QUIT",
    };
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()?;
    anyhow::ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}

/// The newest `/usr/lib/postgresql/<version>/bin`, or `POSTGRES_BIN_DIR`.
fn bin_dir() -> Result<PathBuf, PostgresUnavailable> {
    let has_server = |dir: &Path| dir.join("initdb").exists() && dir.join("postgres").exists();
    if let Ok(dir) = std::env::var("POSTGRES_BIN_DIR") {
        let dir = PathBuf::from(dir);
        return if has_server(&dir) {
            Ok(dir)
        } else {
            Err(PostgresUnavailable(format!(
                "POSTGRES_BIN_DIR={} has no initdb and postgres",
                dir.display()
            )))
        };
    }
    let entries = std::fs::read_dir("/usr/lib/postgresql").map_err(|error| {
        PostgresUnavailable(format!(
            "no /usr/lib/postgresql ({error}); set POSTGRES_BIN_DIR"
        ))
    })?;
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin)
        .ok_or_else(|| {
            PostgresUnavailable("no initdb and postgres under /usr/lib/postgresql/*/bin".into())
        })
}

/// Who runs the server: this process's user, or `postgres` when that is root.
fn run_as() -> Result<Option<(u32, u32)>, PostgresUnavailable> {
    // /proc/self belongs to the process's effective user.
    let root = std::fs::metadata("/proc/self")
        .map(|meta| meta.uid() == 0)
        .map_err(|error| PostgresUnavailable(format!("cannot tell the user: {error}")))?;
    if !root {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|error| PostgresUnavailable(format!("cannot read /etc/passwd: {error}")))?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            match fields.as_slice() {
                ["postgres", _, uid, gid, ..] => Some((uid.parse().ok()?, gid.parse().ok()?)),
                _ => None,
            }
        })
        .map(Some)
        .ok_or_else(|| {
            PostgresUnavailable("running as root and there is no `postgres` user".into())
        })
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
