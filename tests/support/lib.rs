//! Helpers for the integration tests: a fresh database per test, a node in-process
//! (port 0) or as a separate process, an HTTP client for the public API, and a private
//! PostgreSQL server for tests that stop and start it.

pub mod api;
pub mod auth;
pub mod db;
pub mod events;
pub mod ledger;
pub mod nats;
pub mod netns;
pub mod node;
pub mod postgres;
pub mod webhooks;

pub use api::ApiClient;
pub use db::TestDatabase;
pub use nats::NatsServer;
pub use netns::{Cut, Netns};
pub use node::{InProcessNode, NodeOptions, NodeProcess};
pub use postgres::{PostgresUnavailable, PrivatePostgres, StopMode};

/// Environment variable with a default that matches `scripts/stack.sh`.
pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// A unique, readable name for per-test resources (database, Redis prefix).
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: std::time::Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
