use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use wallet_migrator::migrate::{self, ApplyOptions, State, WaitOptions};
use wallet_migrator::operator::{self, Metrics, OperatorConfig, admin::AdminServer};

/// Schema migrations for the wallet service, and the operator that runs them in Kubernetes.
#[derive(Parser)]
#[command(name = "wallet-migrator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply every pending migration (DATABASE_URL or DATABASE_URL_FILE); safe to run concurrently.
    ///
    /// Exits 3 when running it again cannot help (a migration failed, the target is out of
    /// this build's reach, the database has another history), 1 on other failures.
    Apply {
        /// The schema version needed: exits 0 when the database is at it or above (a newer
        /// release migrated it), fails when this build's migrations cannot reach it
        #[arg(long)]
        target: Option<i64>,
        /// How long to wait for the database to accept a connection (e.g. 120s, 2m)
        #[arg(long, default_value = "120s", value_parser = migrate::parse_duration)]
        connect_timeout: Duration,
        /// File that receives `version=<N>` on success or the error on failure (the
        /// container's terminationMessagePath, read back by the operator)
        #[arg(long)]
        termination_log: Option<std::path::PathBuf>,
    },
    /// Show applied and pending migrations (DATABASE_URL or DATABASE_URL_FILE).
    Status,
    /// Block until the schema is at least --version (the API pods' init container).
    Wait {
        /// Schema version to wait for [default: the highest embedded migration]
        #[arg(long)]
        version: Option<i64>,
        /// Give up after this long (e.g. 300s, 5m)
        #[arg(long, default_value = "300s", value_parser = migrate::parse_duration)]
        timeout: Duration,
    },
    /// Run the WalletMigration controller (in Kubernetes, with leader election).
    Operator {
        /// Admin listener with /healthz and /metrics
        #[arg(
            long,
            env = "WALLET_MIGRATOR_ADMIN_ADDR",
            default_value = "0.0.0.0:9090"
        )]
        admin_addr: SocketAddr,
        /// Lease used for leader election among operator replicas
        #[arg(
            long,
            env = "WALLET_MIGRATOR_LEASE_NAME",
            default_value = "wallet-migrator-leader"
        )]
        lease_name: String,
        /// Reconcile only the WalletMigrations with these labels, e.g.
        /// app.kubernetes.io/instance=<release> (a label job::build copies onto the Jobs)
        #[arg(long, env = "WALLET_MIGRATOR_SELECTOR")]
        selector: Option<String>,
    },
    /// Print the WalletMigration CustomResourceDefinition as YAML.
    Crd,
}

/// `apply` failed in a way a retry cannot fix; the Job's podFailurePolicy fails the Job
/// at once on this code and the operator does not retry it.
const EXIT_PERMANENT: u8 = 3;

/// A termination signal arrived before the command finished.
#[derive(Debug, thiserror::Error)]
#[error("stopped by {name} before finishing")]
struct Stopped {
    name: &'static str,
    code: u8,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            // The operator drains itself on a signal.
            command @ Command::Operator { .. } => run(command).await,
            // In a container the process is PID 1, which the kernel shields from signals
            // it has no handler for: without this, SIGTERM is ignored until SIGKILL.
            command => tokio::select! {
                result = run(command) => result,
                stopped = terminated() => Err(stopped.into()),
            },
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One plain line: it is what `kubectl logs` of a failed Job shows first.
            eprintln!("error: {}", error_chain(&e));
            if let Some(stopped) = e.downcast_ref::<Stopped>() {
                ExitCode::from(stopped.code)
            } else if e
                .downcast_ref::<migrate::Error>()
                .is_some_and(|m| !m.is_transient())
            {
                ExitCode::from(EXIT_PERMANENT)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes on one line, skipping causes whose text the line already
/// holds (our messages and sqlx's embed their source's message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn init_tracing() {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // PostgreSQL NOTICEs like "relation already exists, skipping" are noise here.
    if let Ok(quiet) = "sqlx::postgres::notice=warn".parse() {
        filter = filter.add_directive(quiet);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("WALLET_LOG_FORMAT").as_deref() == Ok("pretty") {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
}

fn database_url() -> anyhow::Result<SecretString> {
    database_url_from(|name| std::env::var(name).ok())
}

/// `DATABASE_URL`, or the file `DATABASE_URL_FILE` names (a mounted Secret).
fn database_url_from(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<SecretString> {
    wallet_cluster::trust::secret_from_env(lookup, "DATABASE_URL")?
        .context("DATABASE_URL (or DATABASE_URL_FILE) is not set")
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Apply {
            target,
            connect_timeout,
            termination_log,
        } => {
            let opts = ApplyOptions {
                target,
                connect_timeout,
            };
            let result = migrate::apply(&database_url()?, opts).await;
            if let Some(path) = &termination_log {
                let message = match &result {
                    Ok(report) => format!("version={}\n", report.version),
                    Err(e) => format!("error: {e}\n"),
                };
                if let Err(e) = std::fs::write(path, message) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the termination log");
                }
            }
            let report = result?;
            for version in &report.applied {
                println!("applied version {version}");
            }
            if !report.newer.is_empty() {
                println!(
                    "database at version {}, newer than this build's {} (a newer release ran; versions {:?})",
                    report.version,
                    migrate::latest_version(),
                    report.newer
                );
            } else if report.applied.is_empty() {
                println!("schema up to date at version {}", report.version);
            }
            Ok(())
        }
        Command::Status => {
            let report = migrate::status(&database_url()?).await?;
            for m in &report.migrations {
                println!(
                    "{:>6}  {:<10}  {}",
                    m.version,
                    m.state.to_string(),
                    m.description
                );
            }
            for version in &report.unknown {
                println!("{version:>6}  applied, not in this build (a newer release ran)");
            }
            let pending: Vec<String> = report.pending().map(|m| m.version.to_string()).collect();
            if pending.is_empty() {
                println!("pending: none");
            } else {
                println!("pending: {}", pending.join(", "));
            }
            let broken = report
                .migrations
                .iter()
                .any(|m| matches!(m.state, State::Dirty | State::ChecksumMismatch));
            anyhow::ensure!(
                !broken,
                "the database disagrees with the embedded migrations"
            );
            Ok(())
        }
        Command::Wait { version, timeout } => {
            let wanted = version.unwrap_or_else(migrate::latest_version);
            let reached =
                migrate::wait(&database_url()?, WaitOptions::new(wanted, timeout)).await?;
            println!("schema at version {reached} (wanted {wanted})");
            Ok(())
        }
        Command::Operator {
            admin_addr,
            lease_name,
            selector,
        } => run_operator(admin_addr, lease_name, selector).await,
        Command::Crd => {
            print!("{}", wallet_migrator::crd::crd_yaml()?);
            Ok(())
        }
    }
}

async fn run_operator(
    admin_addr: SocketAddr,
    lease_name: String,
    selector: Option<String>,
) -> anyhow::Result<()> {
    let registry = prometheus::Registry::new();
    let metrics = Metrics::register(&registry)?;
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster or kubeconfig)")?;
    let namespace =
        std::env::var("POD_NAMESPACE").unwrap_or_else(|_| client.default_namespace().to_owned());
    let pod_name = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .context("POD_NAME (or HOSTNAME) is required as the leader identity")?;
    let config = OperatorConfig {
        namespace,
        pod_name,
        lease_name,
        selector,
    };

    let shutdown = CancellationToken::new();
    let admin = AdminServer::bind(admin_addr, registry)
        .await
        .with_context(|| format!("cannot listen on {admin_addr}"))?;
    let admin_task = tokio::spawn(admin.serve(shutdown.clone()));
    tokio::spawn(signal_shutdown(shutdown.clone()));

    tracing::info!(namespace = %config.namespace, identity = %config.pod_name, selector = ?config.selector, "operator starting");
    let result = operator::run(client, config, metrics, shutdown.clone()).await;
    shutdown.cancel();
    let _ = admin_task.await;
    result.map_err(Into::into)
}

async fn signal_shutdown(shutdown: CancellationToken) {
    let stopped = terminated().await;
    tracing::info!(signal = stopped.name, "shutting down");
    shutdown.cancel();
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn terminated() -> Stopped {
    const SIGINT: Stopped = Stopped {
        name: "SIGINT",
        code: 130,
    };
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => SIGINT,
                    _ = term.recv() => Stopped { name: "SIGTERM", code: 143 },
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
                SIGINT
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
        SIGINT
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::database_url_from;

    #[test]
    fn the_database_url_comes_from_the_variable_or_its_file() {
        let path = std::env::temp_dir().join(format!("migrator-url-{}", std::process::id()));
        std::fs::write(&path, "postgres://wallet:pw@db/wallet\n").expect("write");
        let file = path.to_str().expect("utf-8 path").to_owned();
        let url = database_url_from(|name| (name == "DATABASE_URL_FILE").then(|| file.clone()))
            .expect("from the file");
        assert_eq!(url.expose_secret(), "postgres://wallet:pw@db/wallet");
        let both = database_url_from(|_| Some(file.clone())).expect_err("both set");
        assert!(both.to_string().contains("not both"), "{both}");
        let none = database_url_from(|_| None).expect_err("unset");
        assert!(none.to_string().contains("DATABASE_URL_FILE"), "{none}");
        std::fs::remove_file(&path).expect("clean up");
    }
}
