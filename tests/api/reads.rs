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

#[tokio::test]
async fn the_owner_answers_balances_from_memory_with_every_acknowledged_write_in_them()
-> anyhow::Result<()> {
    let (_db, node) = single_node().await?;
    let (writers, rounds) = (8, 30);
    let mut wallets = Vec::new();
    for _ in 0..writers {
        wallets.push(node.api.create_wallet().await?);
    }
    let memory_before = memory_reads(&node).await?;
    // Each task is the only writer of its wallet, so it knows what every read must show.
    let tasks = wallets.iter().map(|&wallet| {
        let api = node.api.clone();
        async move {
            let mut expected = rust_decimal::Decimal::ZERO;
            for round in 0..rounds {
                let (kind, amount) = if round % 3 == 2 {
                    ("WITHDRAW", rust_decimal::Decimal::new(50, 2))
                } else {
                    ("DEPOSIT", rust_decimal::Decimal::new(100 + round, 2))
                };
                let answer = api.operate(wallet, kind, &amount.to_string(), None).await?;
                anyhow::ensure!(answer.status == StatusCode::OK, "{answer:?}");
                expected += if kind == "DEPOSIT" { amount } else { -amount };
                let view = api.wallet_view(wallet).await?;
                anyhow::ensure!(
                    view.balance == expected,
                    "round {round}: read {} after an acknowledged write left {expected}",
                    view.balance
                );
            }
            anyhow::Ok(())
        }
    });
    for result in futures::future::join_all(tasks).await {
        result?;
    }
    let from_memory = memory_reads(&node).await? - memory_before;
    // A renewal delayed on a loaded machine sends a read to PostgreSQL instead; most
    // must still come from memory.
    let reads = f64::from(writers * rounds as i32);
    assert!(
        from_memory >= reads / 2.0,
        "{from_memory} of {reads} reads from memory"
    );

    // Memory answers keep tenants apart like the database does.
    let stranger = wallet_tests::api::ApiClient::with_token(
        &node.api.url(""),
        Some(&wallet_tests::auth::token(
            "another",
            &wallet_tests::auth::ALL_SCOPES,
        )),
    );
    let answer = stranger
        .get(&format!("/api/v1/wallets/{}", wallets[0]))
        .await?;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{answer:?}");
    node.stop().await
}

async fn memory_reads(node: &wallet_tests::InProcessNode) -> anyhow::Result<f64> {
    node.metric("wallet_wallet_reads_total{source=\"memory\"}")
        .await
}
