use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use wallet::auth::mint;
use wallet::{Application, Config, telemetry};

// Every request allocates (bodies, JSON, futures); glibc's malloc showed up as a tenth of
// the node's CPU under load, mimalloc costs a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A wallet node. Without a subcommand it serves; settings come from the environment.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the public, internal and admin ports (the default).
    Serve,
    /// Mint a token with the local development key, printed on stdout.
    Token {
        #[arg(long)]
        tenant: String,
        /// A scope, e.g. wallets:read; repeat for more.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Lifetime, e.g. 1h, 30m, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        key: KeyArgs,
        #[arg(long, env = "WALLET_AUTH_ISSUER", default_value = "wallet-dev")]
        issuer: String,
        #[arg(long, env = "WALLET_AUTH_AUDIENCE", default_value = "wallet")]
        audience: String,
        #[arg(long, env = "WALLET_AUTH_TENANT_CLAIM", default_value = "tenant")]
        tenant_claim: String,
        #[arg(long, default_value = "dev")]
        subject: String,
    },
    /// Print the JWKS of the local development key, for WALLET_AUTH_JWKS_FILE.
    Jwks {
        #[command(flatten)]
        key: KeyArgs,
    },
}

#[derive(clap::Args)]
struct KeyArgs {
    /// PKCS#8 PEM P-256 private key.
    #[arg(long = "key", env = "WALLET_AUTH_SIGNING_KEY_FILE")]
    path: PathBuf,
    #[arg(long, default_value = "dev-1")]
    kid: String,
}

impl KeyArgs {
    fn read(&self) -> anyhow::Result<Vec<u8>> {
        std::fs::read(&self.path).with_context(|| format!("reading {}", self.path.display()))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command.unwrap_or(Command::Serve) {
        Command::Serve => serve().await,
        Command::Token {
            tenant,
            scopes,
            ttl,
            key,
            issuer,
            audience,
            tenant_claim,
            subject,
        } => {
            let request = mint::TokenRequest {
                tenant,
                scopes,
                ttl,
                issuer: first(&issuer),
                audience,
                kid: key.kid.clone(),
                subject,
                tenant_claim,
            };
            println!("{}", mint::token(&key.read()?, &request)?);
            Ok(())
        }
        Command::Jwks { key } => {
            let set = mint::jwks(&key.read()?, &key.kid)?;
            println!("{}", serde_json::to_string_pretty(&set)?);
            Ok(())
        }
    }
}

/// WALLET_AUTH_ISSUER may list several accepted issuers; tokens are minted for the first.
fn first(issuers: &str) -> String {
    issuers
        .split(',')
        .next()
        .unwrap_or(issuers)
        .trim()
        .to_owned()
}

async fn serve() -> anyhow::Result<()> {
    let config = Config::from_env().context("configuration")?;
    let _telemetry = telemetry::init(
        config.log_format,
        config.otlp_endpoint.as_deref(),
        &config.service_name,
    )?;
    let application = Application::build(config).await.context("start-up")?;
    tracing::info!(
        public = %application.public_addr(),
        internal = %application.internal_addr(),
        admin = %application.admin_addr(),
        "listening"
    );
    application.run_until_stopped().await
}
