//! Balances, operation lookup, and cursor pagination that stays stable under inserts.

use std::collections::HashSet;

use reqwest::StatusCode;

use crate::single_node;

#[tokio::test]
async fn pages_go_newest_first_and_do_not_shift_when_operations_arrive() -> anyhow::Result<()> {
    let (_db, node) = single_node().await?;
    let api = &node.api;
    let wallet = api.create_wallet().await?;
    for i in 1..=25 {
        api.operate(wallet, "DEPOSIT", &format!("{i}.00"), None)
            .await?;
    }
    let first = api
        .get(&format!("/api/v1/wallets/{wallet}/operations?limit=10"))
        .await?;
    assert_eq!(first.status, StatusCode::OK);
    let sequences = |page: &serde_json::Value| -> Vec<i64> {
        page["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|item| item["sequence"].as_i64())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(sequences(&first.body), (16..=25).rev().collect::<Vec<_>>());

    // New operations after the first page must not move what the cursor points at.
    for _ in 0..5 {
        api.operate(wallet, "WITHDRAW", "1.00", None).await?;
    }
    let mut seen: HashSet<i64> = sequences(&first.body).into_iter().collect();
    let mut cursor = first.body["nextCursor"].as_str().map(str::to_owned);
    let mut pages = 1;
    while let Some(next) = cursor {
        let page = api
            .get(&format!(
                "/api/v1/wallets/{wallet}/operations?limit=10&cursor={next}"
            ))
            .await?;
        assert_eq!(page.status, StatusCode::OK);
        for sequence in sequences(&page.body) {
            assert!(seen.insert(sequence), "sequence {sequence} seen twice");
        }
        cursor = page.body["nextCursor"].as_str().map(str::to_owned);
        pages += 1;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, (1..=25).collect::<HashSet<_>>());
    node.stop().await
}

#[tokio::test]
async fn an_operation_reads_back_by_id_and_only_in_its_wallet() -> anyhow::Result<()> {
    let (_db, node) = single_node().await?;
    let api = &node.api;
    let wallet = api.create_wallet().await?;
    let other = api.create_wallet().await?;
    let done = api.operate(wallet, "DEPOSIT", "7.50", None).await?;
    let id = done.body["operationId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let read = api
        .get(&format!("/api/v1/wallets/{wallet}/operations/{id}"))
        .await?;
    assert_eq!((read.status, &read.body), (StatusCode::OK, &done.body));
    let elsewhere = api
        .get(&format!("/api/v1/wallets/{other}/operations/{id}"))
        .await?;
    assert_eq!(elsewhere.status, StatusCode::NOT_FOUND);
    let wallet_view = api.get(&format!("/api/v1/wallets/{wallet}")).await?;
    assert_eq!(
        wallet_view.body,
        serde_json::json!({"walletId": wallet, "balance": "7.50", "available": "7.50", "held": "0.00", "overdraftLimit": "0.00"})
    );
    node.stop().await
}
