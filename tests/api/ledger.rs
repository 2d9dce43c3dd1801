//! Transfers, holds, overdraft limits and point-in-time balances through the public API,
//! each checked against the audit trail in PostgreSQL.

use std::time::Duration;

use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use uuid::Uuid;
use wallet_tests::api::{Answer, ApiClient};

use crate::single_node;

fn dec(text: &str) -> Decimal {
    text.parse().expect("decimal")
}

async fn post(
    api: &ApiClient,
    path: &str,
    body: Value,
    key: Option<&str>,
) -> anyhow::Result<Answer> {
    let headers: Vec<(&str, &str)> = key
        .map(|key| ("Idempotency-Key", key))
        .into_iter()
        .collect();
    api.post_raw(path, body.to_string(), &headers).await
}

async fn patch(api: &ApiClient, path: &str, body: &str) -> anyhow::Result<Answer> {
    let request = api
        .http
        .patch(api.url(path))
        .header("content-type", "application/json")
        .body(body.to_owned());
    ApiClient::answer(request.send().await?).await
}

async fn wallet(api: &ApiClient, wallet_id: Uuid) -> anyhow::Result<Value> {
    let answer = api.get(&format!("/api/v1/wallets/{wallet_id}")).await?;
    anyhow::ensure!(answer.status == StatusCode::OK, "{answer:?}");
    Ok(answer.body)
}

fn money(value: &Value, field: &str) -> Decimal {
    value[field]
        .as_str()
        .map(dec)
        .unwrap_or_else(|| panic!("{field} in {value}"))
}

async fn funded(api: &ApiClient, amount: &str) -> anyhow::Result<Uuid> {
    let wallet_id = api.create_wallet().await?;
    let answer = api.operate(wallet_id, "DEPOSIT", amount, None).await?;
    anyhow::ensure!(answer.status == StatusCode::OK, "{answer:?}");
    Ok(wallet_id)
}

/// (type, status, amount, balance_after, held_after, transfer_id, hold_id) in sequence order.
type Row = (
    String,
    String,
    Decimal,
    Decimal,
    Decimal,
    Option<Uuid>,
    Option<Uuid>,
);

async fn rows(pool: &sqlx::PgPool, wallet_id: Uuid) -> anyhow::Result<Vec<Row>> {
    Ok(sqlx::query_as(
        "SELECT operation_type, status, amount, balance_after, held_after, transfer_id, hold_id \
         FROM operations WHERE wallet_id = $1 ORDER BY seq",
    )
    .bind(wallet_id)
    .fetch_all(pool)
    .await?)
}

/// Balance and held replayed from the audit trail equal the wallet row, and the last
/// row's running figures.
async fn audit(pool: &sqlx::PgPool, wallet_id: Uuid) -> anyhow::Result<(Decimal, Decimal)> {
    let (mut balance, mut held) = (Decimal::ZERO, Decimal::ZERO);
    for (kind, status, amount, balance_after, held_after, ..) in rows(pool, wallet_id).await? {
        if status == "APPLIED" {
            match kind.as_str() {
                "DEPOSIT" | "TRANSFER_IN" => balance += amount,
                "WITHDRAW" | "TRANSFER_OUT" => balance -= amount,
                "HOLD" => held += amount,
                "CAPTURE" => {
                    balance -= amount;
                    held -= amount;
                }
                "RELEASE" => held -= amount,
                "OVERDRAFT_LIMIT" => {}
                other => anyhow::bail!("unknown operation type {other}"),
            }
        }
        anyhow::ensure!(
            (balance, held) == (balance_after, held_after),
            "{kind}: replayed {balance}/{held}, row says {balance_after}/{held_after}"
        );
    }
    let stored: (Decimal, Decimal) =
        sqlx::query_as("SELECT balance, held FROM wallets WHERE id = $1")
            .bind(wallet_id)
            .fetch_one(pool)
            .await?;
    anyhow::ensure!(
        stored == (balance, held),
        "wallet row {stored:?} vs trail {balance}/{held}"
    );
    Ok((balance, held))
}

#[tokio::test]
async fn a_transfer_moves_money_and_each_wallet_records_its_leg() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let api = &node.api;
    let from = funded(api, "100.00").await?;
    let to = api.create_wallet().await?;
    let body = json!({"fromWalletId": from, "toWalletId": to, "amount": "30.25"});
    let answer = post(api, "/api/v1/transfers", body.clone(), Some("t-1")).await?;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.body["status"], "POSTED");
    assert_eq!(answer.body["amount"], "30.25");
    let transfer_id: Uuid = answer.body["transferId"]
        .as_str()
        .unwrap_or_default()
        .parse()?;

    assert_eq!(money(&wallet(api, from).await?, "balance"), dec("69.75"));
    assert_eq!(money(&wallet(api, to).await?, "balance"), dec("30.25"));
    let out = rows(&db.pool, from).await?;
    assert_eq!(
        out.last().map(|row| (row.0.as_str(), row.5)),
        Some(("TRANSFER_OUT", Some(transfer_id)))
    );
    let into = rows(&db.pool, to).await?;
    assert_eq!(
        into.iter()
            .map(|row| (row.0.as_str(), row.5))
            .collect::<Vec<_>>(),
        vec![("TRANSFER_IN", Some(transfer_id))]
    );
    audit(&db.pool, from).await?;
    audit(&db.pool, to).await?;

    let fetched = api.get(&format!("/api/v1/transfers/{transfer_id}")).await?;
    assert_eq!(fetched.status, StatusCode::OK);
    assert_eq!(fetched.body["status"], "POSTED");
    assert_eq!(fetched.body["fromWalletId"], from.to_string());

    // A replay is the same transfer, moved once.
    let replay = post(api, "/api/v1/transfers", body, Some("t-1")).await?;
    assert_eq!(replay.status, StatusCode::OK);
    assert_eq!(replay.body["transferId"], transfer_id.to_string());
    assert_eq!(money(&wallet(api, from).await?, "balance"), dec("69.75"));
    let other = json!({"fromWalletId": from, "toWalletId": to, "amount": "1.00"});
    let reused = post(api, "/api/v1/transfers", other, Some("t-1")).await?;
    assert_eq!(
        reused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{reused:?}"
    );
    let operations = api.get(&format!("/api/v1/wallets/{to}/operations")).await?;
    assert_eq!(operations.body["items"][0]["operationType"], "TRANSFER_IN");
    assert_eq!(
        operations.body["items"][0]["transferId"],
        transfer_id.to_string()
    );
    node.stop().await
}

#[tokio::test]
async fn a_transfer_beyond_the_available_funds_is_recorded_as_rejected() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let api = &node.api;
    let from = funded(api, "10.00").await?;
    let to = api.create_wallet().await?;
    let body = json!({"fromWalletId": from, "toWalletId": to, "amount": "10.01"});
    let answer = post(api, "/api/v1/transfers", body, None).await?;
    assert_eq!(answer.status, StatusCode::CONFLICT, "{answer:?}");
    assert_eq!(answer.content_type, "application/problem+json");
    assert!(
        answer.body["type"]
            .as_str()
            .unwrap_or_default()
            .ends_with("insufficient-funds")
    );
    let transfer_id = answer.body["transferId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let fetched = api.get(&format!("/api/v1/transfers/{transfer_id}")).await?;
    assert_eq!(fetched.body["status"], "REJECTED", "{fetched:?}");
    assert_eq!(audit(&db.pool, from).await?, (dec("10.00"), Decimal::ZERO));
    assert_eq!(audit(&db.pool, to).await?, (Decimal::ZERO, Decimal::ZERO));
    node.stop().await
}

#[tokio::test]
async fn bad_transfers_get_a_clear_4xx_and_change_nothing() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let api = &node.api;
    let from = funded(api, "10.00").await?;
    let to = api.create_wallet().await?;
    let unknown = Uuid::now_v7();
    let cases = [
        (
            json!({"fromWalletId": from, "toWalletId": from, "amount": "1.00"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"fromWalletId": from, "toWalletId": unknown, "amount": "1.00"}),
            StatusCode::NOT_FOUND,
        ),
        (
            json!({"fromWalletId": unknown, "toWalletId": to, "amount": "1.00"}),
            StatusCode::NOT_FOUND,
        ),
        (
            json!({"fromWalletId": from, "toWalletId": to, "amount": "0.001"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"fromWalletId": from, "toWalletId": to, "amount": "-1"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"fromWalletId": from, "toWalletId": to, "amount": "1e30"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"fromWalletId": "nope", "toWalletId": to, "amount": "1.00"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"fromWalletId": from, "toWalletId": to, "amount": "1.00", "memo": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"fromWalletId": from, "toWalletId": to}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ];
    for (body, status) in cases {
        let answer = post(api, "/api/v1/transfers", body.clone(), None).await?;
        assert_eq!(answer.status, status, "{body}: {answer:?}");
        assert_eq!(answer.content_type, "application/problem+json", "{body}");
    }
    let broken = api
        .post_raw("/api/v1/transfers", "{\"fromWalletId\":", &[])
        .await?;
    assert_eq!(broken.status, StatusCode::BAD_REQUEST);
    let transfers: i64 = sqlx::query_scalar("SELECT count(*) FROM transfers")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(transfers, 0);
    assert_eq!(audit(&db.pool, from).await?, (dec("10.00"), Decimal::ZERO));
    assert_eq!(
        api.get(&format!("/api/v1/transfers/{unknown}"))
            .await?
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.get("/api/v1/transfers/nope").await?.status,
        StatusCode::BAD_REQUEST
    );
    node.stop().await
}

#[tokio::test]
async fn a_hold_reserves_funds_and_a_partial_capture_releases_the_rest() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let api = &node.api;
    let wallet_id = funded(api, "100.00").await?;
    let holds = format!("/api/v1/wallets/{wallet_id}/holds");
    let created = post(api, &holds, json!({"amount": "40.00"}), None).await?;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    assert_eq!(created.body["status"], "ACTIVE");
    assert_eq!(created.body["capturedAmount"], "0.00");
    let hold_id = created.body["holdId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let view = wallet(api, wallet_id).await?;
    assert_eq!(
        (
            money(&view, "balance"),
            money(&view, "held"),
            money(&view, "available")
        ),
        (dec("100.00"), dec("40.00"), dec("60.00"))
    );

    // A hold is checked against available, and a refused one is recorded.
    let refused = post(api, &holds, json!({"amount": "60.01"}), None).await?;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{refused:?}");
    let refused_id = refused.body["holdId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        api.get(&format!("/api/v1/holds/{refused_id}")).await?.body["status"],
        "REJECTED"
    );
    // So is a withdrawal.
    let withdraw = api.operate(wallet_id, "WITHDRAW", "60.01", None).await?;
    assert_eq!(withdraw.status, StatusCode::CONFLICT);

    let captured = post(
        api,
        &format!("/api/v1/holds/{hold_id}/capture"),
        json!({"amount": "25.00"}),
        None,
    )
    .await?;
    assert_eq!(captured.status, StatusCode::OK, "{captured:?}");
    assert_eq!(captured.body["status"], "CAPTURED");
    assert_eq!(captured.body["capturedAmount"], "25.00");
    let view = wallet(api, wallet_id).await?;
    assert_eq!(
        (
            money(&view, "balance"),
            money(&view, "held"),
            money(&view, "available")
        ),
        (dec("75.00"), dec("0.00"), dec("75.00"))
    );
    let kinds: Vec<(String, Decimal)> = rows(&db.pool, wallet_id)
        .await?
        .into_iter()
        .map(|row| (row.0, row.2))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("DEPOSIT".to_owned(), dec("100.00")),
            ("HOLD".to_owned(), dec("40.00")),
            ("HOLD".to_owned(), dec("60.01")),
            ("WITHDRAW".to_owned(), dec("60.01")),
            ("CAPTURE".to_owned(), dec("25.00")),
            ("RELEASE".to_owned(), dec("15.00")),
        ]
    );
    audit(&db.pool, wallet_id).await?;

    // No longer ACTIVE: a second capture and a void are refused with the status.
    for action in ["capture", "void"] {
        let again = post(
            api,
            &format!("/api/v1/holds/{hold_id}/{action}"),
            json!({}),
            None,
        )
        .await?;
        assert_eq!(again.status, StatusCode::CONFLICT, "{action}: {again:?}");
        assert_eq!(again.body["holdStatus"], "CAPTURED");
        assert!(
            again.body["type"]
                .as_str()
                .unwrap_or_default()
                .ends_with("hold-not-active")
        );
    }
    assert_eq!(
        audit(&db.pool, wallet_id).await?,
        (dec("75.00"), Decimal::ZERO)
    );
    node.stop().await
}

#[tokio::test]
async fn a_void_gives_the_hold_back_and_a_full_capture_takes_all_of_it() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let api = &node.api;
    let wallet_id = funded(api, "50.00").await?;
    let holds = format!("/api/v1/wallets/{wallet_id}/holds");
    let first = post(api, &holds, json!({"amount": 20}), None).await?;
    let first_id = first.body["holdId"].as_str().unwrap_or_default().to_owned();
    let voided = api
        .post_raw(&format!("/api/v1/holds/{first_id}/void"), "", &[])
        .await?;
    assert_eq!(voided.status, StatusCode::OK, "{voided:?}");
    assert_eq!(voided.body["status"], "VOIDED");
    assert_eq!(
        money(&wallet(api, wallet_id).await?, "available"),
        dec("50.00")
    );

    let second = post(api, &holds, json!({"amount": "50.00"}), None).await?;
    let second_id = second.body["holdId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // No body: the whole hold.
    let captured = api
        .post_raw(&format!("/api/v1/holds/{second_id}/capture"), "", &[])
        .await?;
    assert_eq!(captured.status, StatusCode::OK, "{captured:?}");
    assert_eq!(captured.body["capturedAmount"], "50.00");
    assert_eq!(
        audit(&db.pool, wallet_id).await?,
        (dec("0.00"), dec("0.00"))
    );
    node.stop().await
}

#[tokio::test]
async fn a_hold_expires_soon_after_its_time_and_can_no_longer_be_captured() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let api = &node.api;
    let wallet_id = funded(api, "10.00").await?;
    let expires = chrono::Utc::now() + chrono::Duration::milliseconds(800);
    let created = post(
        api,
        &format!("/api/v1/wallets/{wallet_id}/holds"),
        json!({"amount": "10.00", "expiresAt": expires.to_rfc3339()}),
        None,
    )
    .await?;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let hold_id = created.body["holdId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        money(&wallet(api, wallet_id).await?, "available"),
        dec("0.00")
    );
    let expired = wallet_tests::eventually(Duration::from_secs(5), || async {
        api.get(&format!("/api/v1/holds/{hold_id}"))
            .await
            .is_ok_and(|answer| answer.body["status"] == "EXPIRED")
    })
    .await;
    assert!(expired, "the hold did not expire");
    let late = chrono::Utc::now() - expires;
    assert!(
        late < chrono::Duration::seconds(2),
        "expired {late} after its time"
    );
    let capture = api
        .post_raw(&format!("/api/v1/holds/{hold_id}/capture"), "", &[])
        .await?;
    assert_eq!(capture.status, StatusCode::CONFLICT);
    assert_eq!(capture.body["holdStatus"], "EXPIRED");
    assert_eq!(
        audit(&db.pool, wallet_id).await?,
        (dec("10.00"), dec("0.00"))
    );
    node.stop().await
}

#[tokio::test]
async fn bad_holds_and_captures_get_a_clear_4xx_and_change_nothing() -> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let api = &node.api;
    let wallet_id = funded(api, "10.00").await?;
    let holds = format!("/api/v1/wallets/{wallet_id}/holds");
    let past = (chrono::Utc::now() - chrono::Duration::seconds(5)).to_rfc3339();
    for (body, status) in [
        (
            json!({"amount": "1.00", "expiresAt": past}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"amount": "1.00", "expiresAt": "tomorrow"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (json!({"amount": "1.001"}), StatusCode::UNPROCESSABLE_ENTITY),
        (json!({"amount": "0"}), StatusCode::UNPROCESSABLE_ENTITY),
        (
            json!({"amount": "1.00", "extra": true}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let answer = post(api, &holds, body.clone(), None).await?;
        assert_eq!(answer.status, status, "{body}: {answer:?}");
    }
    let unknown = Uuid::now_v7();
    let to_unknown = post(
        api,
        &format!("/api/v1/wallets/{unknown}/holds"),
        json!({"amount": "1.00"}),
        None,
    )
    .await?;
    assert_eq!(to_unknown.status, StatusCode::NOT_FOUND);
    let hold = post(api, &holds, json!({"amount": "5.00"}), None).await?;
    let hold_id = hold.body["holdId"].as_str().unwrap_or_default().to_owned();
    let capture = format!("/api/v1/holds/{hold_id}/capture");
    for (body, status) in [
        (json!({"amount": "5.01"}), StatusCode::UNPROCESSABLE_ENTITY),
        (json!({"amount": "0.001"}), StatusCode::UNPROCESSABLE_ENTITY),
        (
            json!({"amount": "1.00", "x": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let answer = post(api, &capture, body.clone(), None).await?;
        assert_eq!(answer.status, status, "{body}: {answer:?}");
    }
    let void_with_body = post(
        api,
        &format!("/api/v1/holds/{hold_id}/void"),
        json!({"amount": "1.00"}),
        None,
    )
    .await?;
    assert_eq!(void_with_body.status, StatusCode::UNPROCESSABLE_ENTITY);
    for path in [
        format!("/api/v1/holds/{unknown}/capture"),
        format!("/api/v1/holds/{unknown}/void"),
    ] {
        assert_eq!(
            api.post_raw(&path, "", &[]).await?.status,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    assert_eq!(
        api.post_raw("/api/v1/holds/nope/capture", "", &[])
            .await?
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        api.get(&format!("/api/v1/holds/{hold_id}")).await?.body["status"],
        "ACTIVE"
    );
    assert_eq!(
        audit(&db.pool, wallet_id).await?,
        (dec("10.00"), dec("5.00"))
    );
    node.stop().await
}

#[tokio::test]
async fn the_overdraft_limit_extends_what_may_be_spent_and_cannot_drop_below_use()
-> anyhow::Result<()> {
    let (db, node) = single_node().await?;
    let api = &node.api;
    let wallet_id = funded(api, "10.00").await?;
    let path = format!("/api/v1/wallets/{wallet_id}");
    let set = patch(api, &path, r#"{"overdraftLimit":"50.00"}"#).await?;
    assert_eq!(set.status, StatusCode::OK, "{set:?}");
    assert_eq!(
        (
            money(&set.body, "overdraftLimit"),
            money(&set.body, "available")
        ),
        (dec("50.00"), dec("60.00"))
    );
    assert_eq!(
        api.operate(wallet_id, "WITHDRAW", "60.00", None)
            .await?
            .status,
        StatusCode::OK
    );
    assert_eq!(
        api.operate(wallet_id, "WITHDRAW", "0.01", None)
            .await?
            .status,
        StatusCode::CONFLICT
    );
    let view = wallet(api, wallet_id).await?;
    assert_eq!(
        (money(&view, "balance"), money(&view, "available")),
        (dec("-50.00"), dec("0.00"))
    );
    // The wallet uses all of the limit: a lower one is refused.
    let lower = patch(api, &path, r#"{"overdraftLimit":"49.99"}"#).await?;
    assert_eq!(lower.status, StatusCode::CONFLICT, "{lower:?}");
    assert!(
        lower.body["type"]
            .as_str()
            .unwrap_or_default()
            .ends_with("limit-in-use")
    );
    for (body, status) in [
        (
            r#"{"overdraftLimit":"-1.00"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            r#"{"overdraftLimit":"1.001"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            r#"{"overdraftLimit":true}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (r#"{"limit":"1.00"}"#, StatusCode::UNPROCESSABLE_ENTITY),
        (r#"{"overdraftLimit":"#, StatusCode::BAD_REQUEST),
    ] {
        let answer = patch(api, &path, body).await?;
        assert_eq!(answer.status, status, "{body}: {answer:?}");
    }
    assert_eq!(
        patch(
            api,
            &format!("/api/v1/wallets/{}", Uuid::now_v7()),
            r#"{"overdraftLimit":"1.00"}"#
        )
        .await?
        .status,
        StatusCode::NOT_FOUND
    );
    // Setting the limit needs wallets:admin.
    let token = wallet_tests::auth::token(
        wallet_tests::auth::TENANT,
        &["wallets:read", "wallets:deposit"],
    );
    let reader = ApiClient::with_token(&api.base_url, Some(&token));
    assert_eq!(
        patch(&reader, &path, r#"{"overdraftLimit":"1.00"}"#)
            .await?
            .status,
        StatusCode::FORBIDDEN
    );
    let limit: Decimal = sqlx::query_scalar("SELECT overdraft_limit FROM wallets WHERE id = $1")
        .bind(wallet_id)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(limit, dec("50.00"));
    audit(&db.pool, wallet_id).await?;
    node.stop().await
}

#[tokio::test]
async fn a_past_balance_is_read_from_the_audit_trail() -> anyhow::Result<()> {
    let (_db, node) = single_node().await?;
    let api = &node.api;
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let wallet_id = api.create_wallet().await?;
    let mut times = Vec::new();
    for amount in ["10.00", "20.00", "30.00"] {
        let answer = api.operate(wallet_id, "DEPOSIT", amount, None).await?;
        times.push(
            answer.body["createdAt"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let balance = |query: String| {
        let path = format!("/api/v1/wallets/{wallet_id}/balance?{query}");
        async move { api.get(&path).await }
    };
    let second = balance("sequence=2".to_owned()).await?;
    assert_eq!(second.status, StatusCode::OK, "{second:?}");
    assert_eq!(
        (
            second.body["balance"].as_str(),
            second.body["sequence"].as_i64()
        ),
        (Some("30.00"), Some(2))
    );
    let zero = balance("sequence=0".to_owned()).await?;
    assert_eq!(
        (
            zero.body["balance"].as_str(),
            zero.body["sequence"].as_i64()
        ),
        (Some("0.00"), Some(0))
    );
    let beyond = balance("sequence=99".to_owned()).await?;
    assert_eq!(beyond.body["balance"], "60.00");
    let at_second = balance(format!("asOf={}", urlencode(&times[1]))).await?;
    assert_eq!(
        (
            at_second.body["balance"].as_str(),
            at_second.body["sequence"].as_i64()
        ),
        (Some("30.00"), Some(2)),
        "{at_second:?}"
    );
    assert_eq!(at_second.body["asOf"].as_str(), Some(times[1].as_str()));
    let too_early = balance(format!("asOf={}", urlencode(&before.to_rfc3339()))).await?;
    assert_eq!(too_early.status, StatusCode::NOT_FOUND, "{too_early:?}");
    for query in [
        "",
        "sequence=-1",
        "sequence=x",
        "asOf=yesterday",
        "sequence=1&asOf=2026-01-01T00:00:00Z",
    ] {
        let answer = balance(query.to_owned()).await?;
        assert_eq!(
            answer.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{query}: {answer:?}"
        );
    }
    let unknown = api
        .get(&format!(
            "/api/v1/wallets/{}/balance?sequence=1",
            Uuid::now_v7()
        ))
        .await?;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    node.stop().await
}

fn urlencode(text: &str) -> String {
    text.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test]
async fn another_tenant_sees_no_transfer_and_no_hold() -> anyhow::Result<()> {
    let (_db, node) = single_node().await?;
    let api = &node.api;
    let from = funded(api, "10.00").await?;
    let to = api.create_wallet().await?;
    let transfer = post(
        api,
        "/api/v1/transfers",
        json!({"fromWalletId": from, "toWalletId": to, "amount": "1.00"}),
        None,
    )
    .await?;
    let transfer_id = transfer.body["transferId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let hold = post(
        api,
        &format!("/api/v1/wallets/{from}/holds"),
        json!({"amount": "1.00"}),
        None,
    )
    .await?;
    let hold_id = hold.body["holdId"].as_str().unwrap_or_default().to_owned();
    let token = wallet_tests::auth::token("other", &wallet_tests::auth::ALL_SCOPES);
    let other = ApiClient::with_token(&api.base_url, Some(&token));
    assert_eq!(
        other
            .get(&format!("/api/v1/transfers/{transfer_id}"))
            .await?
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        other.get(&format!("/api/v1/holds/{hold_id}")).await?.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        other
            .post_raw(&format!("/api/v1/holds/{hold_id}/capture"), "", &[])
            .await?
            .status,
        StatusCode::NOT_FOUND
    );
    let into_foreign = post(
        &other,
        "/api/v1/transfers",
        json!({"fromWalletId": from, "toWalletId": to, "amount": "1.00"}),
        None,
    )
    .await?;
    assert_eq!(into_foreign.status, StatusCode::NOT_FOUND);
    assert_eq!(
        api.get(&format!("/api/v1/holds/{hold_id}")).await?.body["status"],
        "ACTIVE"
    );
    node.stop().await
}

#[tokio::test]
async fn a_transfer_whose_credit_misses_the_fast_path_is_posted_by_the_destinations_owner()
-> anyhow::Result<()> {
    let db = wallet_tests::TestDatabase::create().await?;
    let mut options = wallet_tests::NodeOptions::new(&db.app_url);
    // No time at all for the fast path: every credit is left to the sweep.
    options
        .extra
        .push(("WALLET_TRANSFER_CREDIT_WAIT_MS".to_owned(), "0".to_owned()));
    let node = wallet_tests::InProcessNode::start("node-a", &options).await?;
    let api = &node.api;
    let from = funded(api, "10.00").await?;
    let to = api.create_wallet().await?;
    let answer = post(
        api,
        "/api/v1/transfers",
        json!({"fromWalletId": from, "toWalletId": to, "amount": "4.00"}),
        None,
    )
    .await?;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.body["status"], "PENDING");
    let transfer_id = answer.body["transferId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // Debited, not yet credited: the amount is in flight, and counted as such.
    let (pending, balances): (Decimal, Decimal) = sqlx::query_as(
        "SELECT (SELECT coalesce(sum(amount), 0) FROM transfers WHERE status = 'PENDING'), (SELECT sum(balance) FROM wallets)",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!((pending, balances), (dec("4.00"), dec("6.00")));
    let posted = wallet_tests::eventually(Duration::from_secs(5), || async {
        api.get(&format!("/api/v1/transfers/{transfer_id}"))
            .await
            .is_ok_and(|answer| answer.body["status"] == "POSTED")
    })
    .await;
    assert!(posted, "the sweep did not post the transfer");
    assert_eq!(audit(&db.pool, to).await?, (dec("4.00"), Decimal::ZERO));
    assert_eq!(audit(&db.pool, from).await?, (dec("6.00"), Decimal::ZERO));
    let metrics = reqwest::get(format!("{}/metrics", node.admin_url))
        .await?
        .text()
        .await?;
    let swept =
        wallet_tests::node::metric_sum(&metrics, "wallet_swept_total{kind=\"transfer_posted\"}");
    assert_eq!(swept, 1.0, "{swept}");
    // The fast path gave up and the sweep applied it: one credit.
    let credits: i64 =
        sqlx::query_scalar("SELECT count(*) FROM operations WHERE operation_type = 'TRANSFER_IN'")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(credits, 1);
    node.stop().await
}
