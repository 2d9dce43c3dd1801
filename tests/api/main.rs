//! The public API of one node against real PostgreSQL and Redis.

mod auth;
mod commit_failures;
mod concurrency;
mod errors;
mod events;
mod idempotency;
mod ledger;
mod ledger_races;
mod nats;
mod privileges;
mod pruning;
mod readiness;
mod reads;
mod sessions;
mod shutdown;
mod telemetry;
mod tls;
mod truthful;
mod webhooks;

use wallet_tests::{InProcessNode, NodeOptions, TestDatabase};

/// A fresh database and one node that owns every shard.
pub async fn single_node() -> anyhow::Result<(TestDatabase, InProcessNode)> {
    let db = TestDatabase::create().await?;
    let node = InProcessNode::start("node-a", &NodeOptions::new(&db.app_url)).await?;
    Ok((db, node))
}
