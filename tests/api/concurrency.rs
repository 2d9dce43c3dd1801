//! Hundreds of concurrent operations on ONE wallet: exact balance, one audit row each.

use std::collections::HashMap;

use futures::future::join_all;
use reqwest::StatusCode;
use rust_decimal::Decimal;
use sqlx::Row;
use uuid::Uuid;

use crate::single_node;

fn dec(text: &str) -> Decimal {
    text.parse().expect("decimal literal")
}

#[tokio::test]
async fn a_thousand_concurrent_operations_on_one_wallet_keep_the_balance_exact()
-> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let wallet = node.api.create_wallet().await?;
    let seed = node.api.operate(wallet, "DEPOSIT", "500.00", None).await?;
    assert_eq!(seed.status, StatusCode::OK, "{seed:?}");

    // Deterministic mix: every third request withdraws more than a deposit adds.
    let requests: Vec<(&str, String)> = (0..1000)
        .map(|i| {
            if i % 3 == 0 {
                ("WITHDRAW", format!("{}.25", 3 + i % 7))
            } else {
                ("DEPOSIT", format!("1.{:02}", i % 100))
            }
        })
        .collect();
    let answers = join_all(
        requests
            .iter()
            .map(|(kind, amount)| node.api.operate(wallet, kind, amount, None)),
    )
    .await;

    let mut expected = dec("500.00");
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    let mut acknowledged: Vec<Uuid> = Vec::new();
    for ((kind, amount), answer) in requests.iter().zip(answers) {
        let answer = answer?;
        *by_status.entry(answer.status.as_u16()).or_default() += 1;
        assert!(!answer.status.is_server_error(), "5xx: {answer:?}");
        match answer.status {
            StatusCode::OK => {
                let amount = dec(amount);
                expected += if *kind == "DEPOSIT" { amount } else { -amount };
                acknowledged.push(
                    answer.body["operationId"]
                        .as_str()
                        .unwrap_or_default()
                        .parse()?,
                );
            }
            StatusCode::CONFLICT => {
                assert_eq!(*kind, "WITHDRAW");
                assert_eq!(answer.body["operation"]["status"], "REJECTED");
                acknowledged.push(
                    answer.body["operationId"]
                        .as_str()
                        .unwrap_or_default()
                        .parse()?,
                );
            }
            other => panic!("unexpected status {other}: {answer:?}"),
        }
    }
    assert_eq!(by_status.values().sum::<usize>(), 1000);
    assert_eq!(
        node.api.balance(wallet).await?,
        expected,
        "statuses: {by_status:?}"
    );

    // Exactly one audit row per request (plus the seed), none missing, none twice.
    let rows = sqlx::query(
        "SELECT id, seq, operation_type, amount, status, balance_after FROM operations WHERE wallet_id = $1 ORDER BY seq",
    )
    .bind(wallet)
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(rows.len(), 1001);
    let stored: std::collections::HashSet<Uuid> =
        rows.iter().map(|row| row.get::<Uuid, _>("id")).collect();
    assert!(acknowledged.iter().all(|id| stored.contains(id)));

    // Balances after each operation form one consistent sequence.
    let mut balance = Decimal::ZERO;
    for (index, row) in rows.iter().enumerate() {
        assert_eq!(
            row.get::<i64, _>("seq"),
            index as i64 + 1,
            "sequence has no gaps"
        );
        let amount: Decimal = row.get("amount");
        let applied = row.get::<String, _>("status") == "APPLIED";
        if applied {
            balance += if row.get::<String, _>("operation_type") == "DEPOSIT" {
                amount
            } else {
                -amount
            };
        }
        assert!(balance >= Decimal::ZERO);
        assert_eq!(
            row.get::<Decimal, _>("balance_after"),
            balance,
            "row {index}"
        );
    }
    assert_eq!(balance, expected);
    node.stop().await
}

#[tokio::test]
async fn concurrent_withdrawals_beyond_the_balance_succeed_exactly_as_far_as_it_goes()
-> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let wallet = node.api.create_wallet().await?;
    node.api.operate(wallet, "DEPOSIT", "100.00", None).await?;

    // 300 withdrawals of 1.00 against 100.00: exactly 100 fit.
    let answers =
        join_all((0..300).map(|_| node.api.operate(wallet, "WITHDRAW", "1.00", None))).await;
    let mut ok = 0;
    let mut conflict = 0;
    for answer in answers {
        let answer = answer?;
        match answer.status {
            StatusCode::OK => ok += 1,
            StatusCode::CONFLICT => {
                conflict += 1;
                assert_eq!(
                    answer.body["type"],
                    "https://wallet.dev/problems/insufficient-funds"
                );
                assert_eq!(answer.content_type, "application/problem+json");
            }
            other => panic!("unexpected {other}: {answer:?}"),
        }
    }
    assert_eq!((ok, conflict), (100, 200));
    assert_eq!(node.api.balance(wallet).await?, Decimal::ZERO);
    let rejected: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM operations WHERE wallet_id = $1 AND status = 'REJECTED' AND reason = 'INSUFFICIENT_FUNDS'",
    )
    .bind(wallet)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(
        rejected, 200,
        "every refused withdrawal is in the audit trail"
    );
    node.stop().await
}
