//! Idempotency-Key: a replay answers exactly the first answer; another body is 422.

use futures::future::join_all;
use reqwest::StatusCode;

use crate::single_node;

#[tokio::test]
async fn the_same_key_sent_fifty_times_at_once_applies_once_with_identical_answers()
-> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let wallet = node.api.create_wallet().await?;
    let answers = join_all((0..50).map(|_| {
        node.api
            .operate(wallet, "DEPOSIT", "12.34", Some("pay-once-1"))
    }))
    .await;
    let answers: Vec<_> = answers.into_iter().collect::<Result<_, _>>()?;
    let first = &answers[0];
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    for answer in &answers {
        assert_eq!(answer.status, first.status);
        assert_eq!(answer.body, first.body);
    }
    assert_eq!(node.api.balance(wallet).await?.to_string(), "12.34");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM operations WHERE wallet_id = $1")
        .bind(wallet)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, 1);

    // Later, sequentially: still the first answer, even after other operations.
    node.api.operate(wallet, "DEPOSIT", "1.00", None).await?;
    let replay = node
        .api
        .operate(wallet, "DEPOSIT", "12.34", Some("pay-once-1"))
        .await?;
    assert_eq!((replay.status, &replay.body), (first.status, &first.body));
    node.stop().await
}

#[tokio::test]
async fn a_key_reused_with_another_body_is_422_and_changes_nothing() -> anyhow::Result<()> {
    let (_db, node) = single_node().await?;
    let wallet = node.api.create_wallet().await?;
    let first = node
        .api
        .operate(wallet, "DEPOSIT", "5.00", Some("key-2"))
        .await?;
    assert_eq!(first.status, StatusCode::OK);
    let reused = node
        .api
        .operate(wallet, "DEPOSIT", "6.00", Some("key-2"))
        .await?;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        reused.body["type"],
        "https://wallet.dev/problems/idempotency-key-reused"
    );
    let other_type = node
        .api
        .operate(wallet, "WITHDRAW", "5.00", Some("key-2"))
        .await?;
    assert_eq!(other_type.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(node.api.balance(wallet).await?.to_string(), "5.00");
    node.stop().await
}

#[tokio::test]
async fn a_rejected_withdrawal_replays_as_the_same_409() -> anyhow::Result<()> {
    let (_db, node) = single_node().await?;
    let wallet = node.api.create_wallet().await?;
    let first = node
        .api
        .operate(wallet, "WITHDRAW", "1.00", Some("too-much"))
        .await?;
    assert_eq!(first.status, StatusCode::CONFLICT);
    node.api.operate(wallet, "DEPOSIT", "50.00", None).await?;
    // The funds are there now, but the key's answer was given: it stays the 409.
    let replay = node
        .api
        .operate(wallet, "WITHDRAW", "1.00", Some("too-much"))
        .await?;
    assert_eq!((replay.status, &replay.body), (first.status, &first.body));
    assert_eq!(node.api.balance(wallet).await?.to_string(), "50.00");
    node.stop().await
}

#[tokio::test]
async fn wallet_creation_with_a_key_creates_one_wallet() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let create = || async {
        wallet_tests::ApiClient::answer(
            node.api
                .http
                .post(node.api.url("/api/v1/wallets"))
                .header("Idempotency-Key", "new-wallet-1")
                .send()
                .await?,
        )
        .await
    };
    let answers = join_all((0..10).map(|_| create())).await;
    let answers: Vec<_> = answers.into_iter().collect::<Result<_, _>>()?;
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
        assert_eq!(answer.body, answers[0].body);
    }
    let wallets: i64 = sqlx::query_scalar("SELECT count(*) FROM wallets")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(wallets, 1);
    node.stop().await
}
