use anyhow::Context;
use wallet::{Application, Config, telemetry};

// Every request allocates (bodies, JSON, futures); glibc's malloc showed up as a tenth of
// the node's CPU under load, mimalloc costs a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
