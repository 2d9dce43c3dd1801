//! TLS with verify-full to PostgreSQL and Redis (the local stack's CA, `scripts/stack.sh
//! env`), and a wrong CA refused at start with an error that names the TLS failure.

use reqwest::StatusCode;
use wallet_tests::{InProcessNode, NodeOptions, TestDatabase};

struct Tls {
    admin_url: String,
    redis_url: String,
    ca: String,
    other_ca: String,
}

/// The stack's TLS settings, or `None` (said loudly) where they are not exported.
fn tls(test: &str) -> Option<Tls> {
    let get = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    match (
        get("DATABASE_ADMIN_TLS_URL"),
        get("REDIS_TLS_URL"),
        get("WALLET_TLS_CA"),
        get("WALLET_TLS_OTHER_CA"),
    ) {
        (Some(admin_url), Some(redis_url), Some(ca), Some(other_ca)) => Some(Tls {
            admin_url,
            redis_url,
            ca,
            other_ca,
        }),
        _ => {
            eprintln!(
                "SKIPPED {test}: no TLS settings; run `scripts/stack.sh up` and `source <(scripts/stack.sh env)`"
            );
            None
        }
    }
}

fn options(db: &TestDatabase, tls: &Tls, redis_ca: &str) -> NodeOptions {
    let mut options = NodeOptions::new(&db.app_url);
    options.redis_url = tls.redis_url.clone();
    options
        .extra
        .push(("REDIS_CA_FILE".to_owned(), redis_ca.to_owned()));
    options
}

#[tokio::test]
async fn a_node_serves_over_verify_full_tls_to_postgres_and_redis() -> anyhow::Result<()> {
    let Some(tls) = tls("a_node_serves_over_verify_full_tls_to_postgres_and_redis") else {
        return Ok(());
    };
    let db = TestDatabase::create_on(&tls.admin_url).await?;
    assert!(db.app_url.contains("sslmode=verify-full"), "{}", db.app_url);
    let node = InProcessNode::start("node-a", &options(&db, &tls, &tls.ca)).await?;
    let wallet = node.api.create_wallet().await?;
    let answer = node.api.operate(wallet, "DEPOSIT", "7.25", None).await?;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(node.api.balance(wallet).await?.to_string(), "7.25");

    // Every connection of the node (the app login) is encrypted.
    let sessions: Vec<(bool,)> = sqlx::query_as(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.datname = $1 AND a.usename = $2",
    )
    .bind(&db.name)
    .bind(wallet_tests::db::APP_LOGIN)
    .fetch_all(&db.pool)
    .await?;
    assert!(!sessions.is_empty(), "the node holds connections");
    assert!(sessions.iter().all(|(ssl,)| *ssl), "{sessions:?}");
    node.stop().await
}

#[tokio::test]
async fn a_wrong_ca_stops_the_node_at_start_naming_the_tls_failure() -> anyhow::Result<()> {
    let Some(tls) = tls("a_wrong_ca_stops_the_node_at_start_naming_the_tls_failure") else {
        return Ok(());
    };
    let db = TestDatabase::create_on(&tls.admin_url).await?;

    let mut wrong_pg = options(&db, &tls, &tls.ca);
    wrong_pg.database_url = db.app_url.replace(&tls.ca, &tls.other_ca);
    let error = match InProcessNode::start_unready("node-a", &wrong_pg).await {
        Ok(node) => {
            node.stop().await?;
            anyhow::bail!("started with a wrong PostgreSQL CA")
        }
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("TLS to PostgreSQL failed"), "{error}");
    assert!(error.contains("certificate"), "{error}");

    let wrong_redis = options(&db, &tls, &tls.other_ca);
    let error = match InProcessNode::start_unready("node-a", &wrong_redis).await {
        Ok(node) => {
            node.stop().await?;
            anyhow::bail!("started with a wrong Redis CA")
        }
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("TLS to Redis failed"), "{error}");
    assert!(error.contains("certificate"), "{error}");
    Ok(())
}
