//! Readiness: a node serves only on a schema at least as new as it needs.

use std::time::Duration;

use reqwest::StatusCode;
use wallet_tests::{InProcessNode, NodeOptions, TestDatabase, eventually};

#[tokio::test]
async fn a_node_on_an_unmigrated_database_is_not_ready_until_the_migrator_ran() -> anyhow::Result<()>
{
    let db = TestDatabase::create_empty().await?;
    let node = InProcessNode::start_unready("node-a", &NodeOptions::new(&db.app_url)).await?;
    let readyz = format!("{}/readyz", node.admin_url);

    // The health monitor reads the schema a moment after start.
    let seen = eventually(Duration::from_secs(10), || async {
        match reqwest::get(&readyz).await {
            Ok(response) => wallet_tests::ApiClient::answer(response)
                .await
                .is_ok_and(|answer| answer.body["schemaVersion"] == "not migrated"),
            Err(_) => false,
        }
    })
    .await;
    assert!(seen, "readiness names the missing schema");
    let answer = wallet_tests::ApiClient::answer(reqwest::get(&readyz).await?).await?;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{answer:?}");
    let health = reqwest::get(format!("{}/healthz", node.admin_url)).await?;
    assert_eq!(health.status(), StatusCode::OK, "alive even when not ready");

    db.migrate().await?;
    let ready = eventually(Duration::from_secs(20), || async {
        matches!(reqwest::get(&readyz).await, Ok(response) if response.status() == StatusCode::OK)
    })
    .await;
    assert!(ready, "ready once the schema is there");
    let wallet = node.api.create_wallet().await?;
    assert_eq!(
        node.api
            .operate(wallet, "DEPOSIT", "1.00", None)
            .await?
            .status,
        StatusCode::OK
    );
    node.stop().await
}
