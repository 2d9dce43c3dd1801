//! A failed batch commit: retried when the failure says it is safe, otherwise it fails
//! only its own requests, and the cached balance never runs ahead of the database.
//! Failures are injected with triggers in the test's own database.

use reqwest::StatusCode;
use wallet_tests::{InProcessNode, NodeOptions, TestDatabase};

async fn node_with_deadline(db: &TestDatabase, deadline_ms: u64) -> anyhow::Result<InProcessNode> {
    let mut options = NodeOptions::new(&db.app_url);
    options.request_deadline_ms = deadline_ms;
    InProcessNode::start("node-a", &options).await
}

#[tokio::test]
async fn a_serialization_failure_is_retried_and_applies_once() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    // The first commit of an operation of 13.13 fails like a serialization conflict.
    sqlx::raw_sql(
        "CREATE SEQUENCE attempts;
         CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql
         -- As its creator: the nodes' role may not use the sequence, and needs not.
         SECURITY DEFINER AS $$
         BEGIN
           -- nextval survives the rollback, so only the first attempt fails.
           IF NEW.amount = 13.13 AND nextval('attempts') = 1 THEN
             RAISE EXCEPTION 'injected conflict' USING ERRCODE = '40001';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER fail_once BEFORE INSERT ON operations FOR EACH ROW EXECUTE FUNCTION fail_once();",
    )
    .execute(&db.pool)
    .await?;
    let node = node_with_deadline(&db, 10_000).await?;
    let wallet = node.api.create_wallet().await?;
    let answer = node.api.operate(wallet, "DEPOSIT", "13.13", None).await?;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM operations WHERE wallet_id = $1")
        .bind(wallet)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, 1);
    assert_eq!(node.api.balance(wallet).await?.to_string(), "13.13");
    let attempts: i64 = sqlx::query_scalar("SELECT last_value FROM attempts")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(attempts, 2, "failed once, committed on the retry");
    let metrics = reqwest::get(format!("{}/metrics", node.admin_url))
        .await?
        .text()
        .await?;
    assert!(
        metrics.lines().any(|line| line
            .starts_with("wallet_batch_failures_total{reason=\"transient\"}")
            && !line.ends_with(" 0")),
        "the failed attempt is counted"
    );
    node.stop().await
}

#[tokio::test]
async fn a_batch_that_cannot_commit_fails_alone_and_leaves_the_balance_exact() -> anyhow::Result<()>
{
    let db = TestDatabase::create().await?;
    // Every operation of 66.66 is refused by the database, always.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.amount = 66.66 THEN RAISE EXCEPTION 'injected failure'; END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse BEFORE INSERT ON operations FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .execute(&db.pool)
    .await?;
    let node = node_with_deadline(&db, 1_500).await?;
    let wallet = node.api.create_wallet().await?;
    assert_eq!(
        node.api
            .operate(wallet, "DEPOSIT", "10.00", None)
            .await?
            .status,
        StatusCode::OK
    );

    // Other wallets' operations, committed alongside in the same transactions, go through.
    let neighbour = node.api.create_wallet().await?;
    let poisoned = node.api.operate(wallet, "DEPOSIT", "66.66", None);
    let neighbours = futures::future::join_all(
        (0..100).map(|_| node.api.operate(neighbour, "DEPOSIT", "1.00", None)),
    );
    let (failed, neighbours) = tokio::join!(poisoned, neighbours);
    let failed = failed?;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE, "{failed:?}");
    for answer in neighbours {
        assert_eq!(answer?.status, StatusCode::OK);
    }
    assert_eq!(node.api.balance(neighbour).await?.to_string(), "100.00");
    assert_eq!(
        failed.body["type"],
        "https://wallet.dev/problems/service-unavailable"
    );

    // Had the cache kept the failed deposit, this withdrawal would pass and the balance drift.
    let withdraw = node.api.operate(wallet, "WITHDRAW", "20.00", None).await?;
    assert_eq!(withdraw.status, StatusCode::CONFLICT, "{withdraw:?}");
    assert_eq!(withdraw.body["operation"]["balanceAfter"], "10.00");
    assert_eq!(
        node.api
            .operate(wallet, "DEPOSIT", "5.00", None)
            .await?
            .status,
        StatusCode::OK
    );
    assert_eq!(node.api.balance(wallet).await?.to_string(), "15.00");
    let stored: rust_decimal::Decimal =
        sqlx::query_scalar("SELECT balance FROM wallets WHERE id = $1")
            .bind(wallet)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(stored.to_string(), "15.00");
    node.stop().await
}
