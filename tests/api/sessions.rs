//! The session settings of the node's PostgreSQL connections, as PostgreSQL reports them.

use sqlx::PgPool;
use wallet_tests::{NodeOptions, TestDatabase};

async fn show(pool: &PgPool, statement: &'static str) -> anyhow::Result<String> {
    Ok(sqlx::query_scalar(statement).fetch_one(pool).await?)
}

#[tokio::test]
async fn every_pool_is_bounded_and_plans_without_jit() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let config = NodeOptions::new(&db.app_url).config("node-a")?;
    let pools = wallet::startup::database_pools(&config)?;
    for (name, pool) in [
        ("reads", &pools.reads),
        ("commits", &pools.commits),
        ("control", &pools.control),
        ("deliveries", &pools.deliveries),
    ] {
        // JIT compiled the webhook fan-out's generic plan on every call (pg_stat_statements
        // under make bench's constant scenario); no statement of the node gains from it.
        assert_eq!(show(pool, "SHOW jit").await?, "off", "{name}");
        // Bounded by the lease TTL (NodeOptions: 2 s), so no statement outlives a lease.
        assert_eq!(show(pool, "SHOW statement_timeout").await?, "2s", "{name}");
        assert_eq!(show(pool, "SHOW lock_timeout").await?, "2s", "{name}");
    }
    assert_eq!(
        show(&pools.deliveries, "SHOW synchronous_commit").await?,
        "off"
    );
    assert_eq!(show(&pools.commits, "SHOW synchronous_commit").await?, "on");
    Ok(())
}
