//! Every error status of the API and each kind of bad input: a clear problem, nothing lost.

use reqwest::StatusCode;
use serde_json::json;

use crate::single_node;

const PROBLEM: &str = "application/problem+json";

#[tokio::test]
async fn bad_input_gets_a_precise_problem_and_changes_nothing() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let wallet = node.api.create_wallet().await?;
    node.api.operate(wallet, "DEPOSIT", "10.00", None).await?;
    let api = &node.api;
    let body = |value: serde_json::Value| value.to_string();

    let cases: Vec<(&str, String, StatusCode, &str)> = vec![
        (
            "malformed JSON",
            r#"{"walletId": "#.to_owned(),
            StatusCode::BAD_REQUEST,
            "malformed-json",
        ),
        (
            "empty body",
            String::new(),
            StatusCode::BAD_REQUEST,
            "malformed-json",
        ),
        (
            "invalid UUID",
            body(json!({"walletId": "not-a-uuid", "operationType": "DEPOSIT", "amount": "1"})),
            StatusCode::BAD_REQUEST,
            "invalid-uuid",
        ),
        (
            "UUID of the wrong type",
            body(json!({"walletId": 42, "operationType": "DEPOSIT", "amount": "1"})),
            StatusCode::BAD_REQUEST,
            "invalid-uuid",
        ),
        (
            "unknown field",
            body(
                json!({"walletId": wallet, "operationType": "DEPOSIT", "amount": "1", "note": "x"}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
        ),
        (
            "missing field",
            body(json!({"walletId": wallet, "operationType": "DEPOSIT"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
        ),
        (
            "unknown operation",
            body(json!({"walletId": wallet, "operationType": "TRANSFER", "amount": "1"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
        ),
        (
            "amount of the wrong type",
            body(json!({"walletId": wallet, "operationType": "DEPOSIT", "amount": [1]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
        ),
        (
            "zero amount",
            body(json!({"walletId": wallet, "operationType": "DEPOSIT", "amount": "0"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
        ),
        (
            "negative amount",
            body(json!({"walletId": wallet, "operationType": "WITHDRAW", "amount": "-5"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
        ),
        (
            "over-precise amount",
            body(json!({"walletId": wallet, "operationType": "DEPOSIT", "amount": "0.001"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
        ),
        (
            "over-precise number",
            format!(r#"{{"walletId":"{wallet}","operationType":"DEPOSIT","amount":1.005}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
        ),
        (
            "huge amount",
            body(
                json!({"walletId": wallet, "operationType": "DEPOSIT", "amount": "1000000000000000000"}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
        ),
        (
            "huge number",
            format!(r#"{{"walletId":"{wallet}","operationType":"DEPOSIT","amount":1e400}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
        ),
        (
            "not an object",
            "[1,2]".to_owned(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
        ),
        (
            "oversized body",
            format!(
                r#"{{"walletId":"{wallet}","operationType":"DEPOSIT","amount":"1","pad":"{}"}}"#,
                "x".repeat(64 * 1024)
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
        ),
    ];
    for (name, payload, status, problem_type) in cases {
        let answer = api.post_raw("/api/v1/wallet", payload, &[]).await?;
        assert_eq!(answer.status, status, "{name}: {answer:?}");
        assert_eq!(answer.content_type, PROBLEM, "{name}");
        assert_eq!(
            answer.body["type"],
            format!("https://wallet.dev/problems/{problem_type}"),
            "{name}"
        );
        assert_eq!(answer.body["status"], status.as_u16(), "{name}");
        assert!(
            answer.body["detail"]
                .as_str()
                .is_some_and(|detail| !detail.is_empty()),
            "{name}"
        );
    }
    assert_eq!(api.balance(wallet).await?.to_string(), "10.00");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM operations")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, 1, "no bad request left a trace in the audit trail");
    node.stop().await
}

#[tokio::test]
async fn unknown_wallets_operations_and_routes_are_404_problems() -> anyhow::Result<()> {
    let (_db, node) = single_node().await?;
    let api = &node.api;
    let unknown = uuid::Uuid::new_v4();
    let wallet = api.create_wallet().await?;

    let answer = api.operate(unknown, "DEPOSIT", "1.00", None).await?;
    assert_eq!(
        (answer.status, answer.body["type"].as_str()),
        (
            StatusCode::NOT_FOUND,
            Some("https://wallet.dev/problems/wallet-not-found")
        )
    );
    let answer = api.get(&format!("/api/v1/wallets/{unknown}")).await?;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let answer = api
        .get(&format!("/api/v1/wallets/{unknown}/operations"))
        .await?;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let answer = api
        .get(&format!("/api/v1/wallets/{wallet}/operations/{unknown}"))
        .await?;
    assert_eq!(
        (answer.status, answer.body["type"].as_str()),
        (
            StatusCode::NOT_FOUND,
            Some("https://wallet.dev/problems/operation-not-found")
        )
    );
    let answer = api.get("/api/v1/nowhere").await?;
    assert_eq!(
        (answer.status, answer.content_type.as_str()),
        (StatusCode::NOT_FOUND, PROBLEM)
    );

    let answer = api.get("/api/v1/wallets/not-a-uuid").await?;
    assert_eq!(
        (answer.status, answer.body["type"].as_str()),
        (
            StatusCode::BAD_REQUEST,
            Some("https://wallet.dev/problems/invalid-uuid")
        )
    );
    let answer = api
        .get(&format!("/api/v1/wallets/{wallet}/operations?limit=0"))
        .await?;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    let answer = api
        .get(&format!("/api/v1/wallets/{wallet}/operations?cursor=bogus"))
        .await?;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    let answer = api
        .post_raw("/api/v1/wallets", r#"{"name":"x"}"#, &[])
        .await?;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    let answer = api
        .post_raw("/api/v1/wallet", "{}", &[("Idempotency-Key", "")])
        .await?;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    node.stop().await
}

#[tokio::test]
async fn a_deposit_past_the_column_limit_is_422_and_recorded() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let wallet = node.api.create_wallet().await?;
    let max = "999999999999999999.99";
    assert_eq!(
        node.api.operate(wallet, "DEPOSIT", max, None).await?.status,
        StatusCode::OK
    );
    let answer = node.api.operate(wallet, "DEPOSIT", "0.01", None).await?;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        answer.body["type"],
        "https://wallet.dev/problems/balance-limit-exceeded"
    );
    assert_eq!(node.api.balance(wallet).await?.to_string(), max);
    let reason: String = sqlx::query_scalar(
        "SELECT reason FROM operations WHERE wallet_id = $1 AND status = 'REJECTED'",
    )
    .bind(wallet)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(reason, "BALANCE_LIMIT_EXCEEDED");
    node.stop().await
}

#[tokio::test]
async fn the_request_id_is_echoed_or_generated() -> anyhow::Result<()> {
    let (_db, node) = single_node().await?;
    let response = node
        .api
        .http
        .get(node.api.url("/api/v1/wallets/not-a-uuid"))
        .header("x-request-id", "req-abc-123")
        .send()
        .await?;
    assert_eq!(response.headers()["x-request-id"], "req-abc-123");
    let response = node
        .api
        .http
        .post(node.api.url("/api/v1/wallets"))
        .send()
        .await?;
    assert!(
        response
            .headers()
            .get("x-request-id")
            .is_some_and(|id| id.len() >= 16)
    );
    node.stop().await
}
