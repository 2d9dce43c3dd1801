//! Webhooks against real PostgreSQL and a real receiver on 127.0.0.1: signed deliveries
//! of the outbox's events, filters, retries while the receiver is down, the dead-letter
//! list and its manual retry, and the API's refusals. (kill -9 mid-delivery is
//! `tests/cluster/webhooks.rs`.)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;
use wallet_tests::auth::{ALL_SCOPES, token};
use wallet_tests::node::metric_sum;
use wallet_tests::webhooks::{self, Mode, Receiver, verify_signature};
use wallet_tests::{ApiClient, InProcessNode, NodeOptions, TestDatabase, eventually};

/// Deliveries are asynchronous: generous bounds for a loaded 2-core machine.
const ARRIVAL: Duration = Duration::from_secs(60);
const SIGNATURE_TOLERANCE: Duration = Duration::from_secs(300);

/// A fresh database and one node with these settings over the tests' defaults.
async fn node_with(settings: &[(&str, &str)]) -> anyhow::Result<(TestDatabase, InProcessNode)> {
    let db = TestDatabase::create().await?;
    let mut options = NodeOptions::new(&db.app_url);
    options.extra.extend(
        settings
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned())),
    );
    let node = InProcessNode::start("node-a", &options).await?;
    Ok((db, node))
}

/// The receivers of these tests listen on loopback.
const ALLOW_LOOPBACK: (&str, &str) = ("WALLET_WEBHOOK_ALLOW_PRIVATE", "true");

fn count_by_event(received: &[webhooks::Received]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for request in received {
        *counts.entry(request.event_id()).or_default() += 1;
    }
    counts
}

async fn metrics(node: &InProcessNode) -> anyhow::Result<String> {
    Ok(reqwest::get(format!("{}/metrics", node.admin_url))
        .await?
        .text()
        .await?)
}

fn metric_line(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn committed_events_arrive_signed_once_each_as_in_the_outbox_and_filtered_by_type()
-> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    let (db, node) = node_with(&[ALLOW_LOOPBACK]).await?;
    let api = &node.api;
    let every_type = [
        "wallet.created",
        "operation.applied",
        "operation.rejected",
        "transfer.posted",
        "transfer.rejected",
        "hold.created",
        "hold.captured",
        "hold.voided",
        "hold.expired",
    ];
    let all = webhooks::create(api, &receiver.url("/all"), &every_type).await?;
    let applied = webhooks::create(api, &receiver.url("/applied"), &["operation.applied"]).await?;

    // Something of every common kind: deposits, a rejected withdrawal, a transfer, a hold.
    let wallet = api.create_wallet().await?;
    for amount in ["100.00", "20.50", "3.25"] {
        assert_eq!(
            api.operate(wallet, "DEPOSIT", amount, None).await?.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        api.operate(wallet, "WITHDRAW", "1000.00", None)
            .await?
            .status,
        StatusCode::CONFLICT
    );
    let other_wallet = api.create_wallet().await?;
    let transfer = api.transfer(wallet, other_wallet, "10.00", None).await?;
    assert_eq!(transfer.status, StatusCode::OK, "{transfer:?}");
    // A PENDING transfer's credit (and its transfer.posted) follows soon: wait for it,
    // so the outbox read below is the whole of it.
    let transfer_path = format!(
        "/api/v1/transfers/{}",
        transfer.body["transferId"].as_str().unwrap_or_default()
    );
    assert!(
        eventually(ARRIVAL, || async {
            api.get(&transfer_path)
                .await
                .is_ok_and(|answer| answer.body["status"] == "POSTED")
        })
        .await,
        "the transfer was never POSTED"
    );
    let hold = api.create_hold(wallet, "5.00", None).await?;
    assert_eq!(hold.status, StatusCode::CREATED, "{hold:?}");
    // Another tenant's events never reach this tenant's webhooks.
    let intruder = ApiClient::with_token(&api.base_url, Some(&token("intruder", &ALL_SCOPES)));
    let foreign = intruder.create_wallet().await?;
    intruder.operate(foreign, "DEPOSIT", "1.00", None).await?;

    // Every event of the tenant's outbox reaches /all, the applied operations /applied.
    let arrived = eventually(ARRIVAL, || async {
        let Ok(outbox) = webhooks::outbox(&db.pool, "test").await else {
            return false;
        };
        let received = count_by_event(&receiver.received_at("/all"));
        let applied_received = count_by_event(&receiver.received_at("/applied"));
        outbox
            .iter()
            .all(|(id, _)| received.contains_key(&id.to_string()))
            && outbox
                .iter()
                .filter(|(_, kind)| kind == "operation.applied")
                .all(|(id, _)| applied_received.contains_key(&id.to_string()))
    })
    .await;
    let outbox = webhooks::outbox(&db.pool, "test").await?;
    assert!(
        arrived,
        "not every event arrived: outbox {outbox:?}, received {:?}",
        count_by_event(&receiver.received())
    );
    let kinds: BTreeSet<&str> = outbox.iter().map(|(_, kind)| kind.as_str()).collect();
    for kind in [
        "wallet.created",
        "operation.applied",
        "operation.rejected",
        "transfer.posted",
        "hold.created",
    ] {
        assert!(kinds.contains(kind), "no {kind} in {kinds:?}");
    }

    // Each request is signed with its webhook's secret and is the outbox row, exactly.
    let rows: HashMap<Uuid, Value> = sqlx::query_as::<_, (Uuid, String, Uuid, i64, String, String)>(
        "SELECT event_id, tenant_id, wallet_id, sequence, event_type, data::text FROM events WHERE tenant_id = 'test'",
    )
    .fetch_all(&db.pool)
    .await?
    .into_iter()
    .map(|(id, tenant, wallet_id, sequence, kind, data)| {
        let data: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
        (
            id,
            json!({"eventId": id, "tenant": tenant, "walletId": wallet_id, "sequence": sequence, "type": kind, "data": data}),
        )
    })
    .collect();
    for (path, hook) in [("/all", &all), ("/applied", &applied)] {
        for request in receiver.received_at(path) {
            verify_signature(
                &hook.secret,
                request.header("wallet-signature"),
                &request.body,
                SIGNATURE_TOLERANCE,
            )
            .map_err(|error| anyhow::anyhow!("{path}: {error}"))?;
            assert_eq!(request.header("content-type"), "application/json");
            let body = request.json();
            assert_eq!(request.header("wallet-event-id"), body["eventId"]);
            assert_eq!(request.header("wallet-event-type"), body["type"]);
            assert!(Uuid::try_parse(request.header("wallet-delivery-id")).is_ok());
            let id: Uuid = body["eventId"].as_str().unwrap_or_default().parse()?;
            let row = rows
                .get(&id)
                .ok_or_else(|| anyhow::anyhow!("{id} is not an event of the tenant: {body}"))?;
            for field in ["eventId", "tenant", "walletId", "sequence", "type", "data"] {
                assert_eq!(body[field], row[field], "{field} of {id}");
            }
            assert!(body["cursor"].is_string() && body["occurredAt"].is_string());
        }
    }
    // In the normal case, once each; the filter holds.
    let at_all = count_by_event(&receiver.received_at("/all"));
    assert_eq!(at_all.len(), outbox.len(), "{at_all:?}");
    assert!(at_all.values().all(|&n| n == 1), "{at_all:?}");
    let at_applied = count_by_event(&receiver.received_at("/applied"));
    let applied_ids: BTreeSet<String> = outbox
        .iter()
        .filter(|(_, kind)| kind == "operation.applied")
        .map(|(id, _)| id.to_string())
        .collect();
    assert_eq!(
        at_applied.keys().cloned().collect::<BTreeSet<_>>(),
        applied_ids
    );
    assert!(at_applied.values().all(|&n| n == 1), "{at_applied:?}");

    // The API shows the same: every delivery DELIVERED at the first attempt (paged by 5).
    // The outcome is recorded after the receiver answered, so it may trail the receipt.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let listed = loop {
        let listed = webhooks::deliveries(api, all.id, Some("delivered"), 5).await?;
        if listed.len() >= outbox.len() || tokio::time::Instant::now() > deadline {
            break listed;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(listed.len(), outbox.len());
    for delivery in &listed {
        assert_eq!(delivery["status"], "DELIVERED", "{delivery}");
        assert_eq!(delivery["attempts"], 1, "{delivery}");
        assert_eq!(delivery["lastStatusCode"], 200, "{delivery}");
        assert_eq!(delivery["event"]["eventId"], delivery["eventId"]);
    }
    let ids: BTreeSet<&str> = listed
        .iter()
        .filter_map(|delivery| delivery["deliveryId"].as_str())
        .collect();
    assert_eq!(ids.len(), listed.len(), "pages neither repeat nor skip");
    assert!(
        webhooks::deliveries(api, all.id, Some("failed"), 50)
            .await?
            .is_empty()
    );
    let text = metrics(&node).await?;
    assert_eq!(
        metric_line(
            &text,
            "wallet_webhook_deliveries_total{outcome=\"delivered\"}"
        ),
        (outbox.len() + applied_ids.len()) as f64
    );
    assert!(metric_sum(&text, "wallet_webhook_delivery_seconds_count") >= 1.0);

    // Listed without secrets; once deleted, a webhook gets nothing more.
    let list = api.get("/api/v1/webhooks").await?;
    assert_eq!(list.status, StatusCode::OK);
    let items = list.body["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 2, "{list:?}");
    assert!(items.iter().all(|item| item.get("secret").is_none()));
    let deleted = webhooks::delete(api, &applied.id.to_string()).await?;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{deleted:?}");
    let again = webhooks::delete(api, &applied.id.to_string()).await?;
    assert_eq!(
        again.status,
        StatusCode::NO_CONTENT,
        "a repeated DELETE: {again:?}"
    );
    let last = api.operate(wallet, "DEPOSIT", "1.00", None).await?;
    let last_event = last.body["operationId"]
        .as_str()
        .map(|id| id.to_owned())
        .unwrap_or_default();
    assert!(
        eventually(ARRIVAL, || async {
            receiver.received_at("/all").len() == outbox.len() + 1
        })
        .await,
        "the last deposit {last_event} never reached /all"
    );
    assert_eq!(receiver.received_at("/applied").len(), applied_ids.len());
    assert_eq!(
        api.get(&format!("/api/v1/webhooks/{}/deliveries", applied.id))
            .await?
            .status,
        StatusCode::NOT_FOUND
    );
    let list = api.get("/api/v1/webhooks").await?;
    assert_eq!(list.body["items"].as_array().map(Vec::len), Some(1));
    Ok(())
}

#[tokio::test]
async fn a_receiver_down_for_30_s_gets_everything_once_it_is_back() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    receiver.down();
    let down_since = tokio::time::Instant::now();
    let (db, node) = node_with(&[
        ALLOW_LOOPBACK,
        ("WALLET_WEBHOOK_BACKOFF_BASE_MS", "200"),
        ("WALLET_WEBHOOK_BACKOFF_MAX_MS", "2000"),
    ])
    .await?;
    let api = &node.api;
    let hook = webhooks::create(
        api,
        &receiver.url("/hook"),
        &["wallet.created", "operation.applied"],
    )
    .await?;
    let wallet = api.create_wallet().await?;
    for _ in 0..5 {
        assert_eq!(
            api.operate(wallet, "DEPOSIT", "1.00", None).await?.status,
            StatusCode::OK
        );
    }
    // Attempts fail, and say why.
    let failing = eventually(ARRIVAL, || async {
        let Ok(pending) = webhooks::deliveries(api, hook.id, Some("pending"), 50).await else {
            return false;
        };
        pending.len() == 6
            && pending.iter().all(|delivery| {
                delivery["attempts"].as_i64().unwrap_or(0) >= 2
                    && delivery["lastError"]
                        .as_str()
                        .is_some_and(|e| !e.is_empty())
                    && delivery["lastStatusCode"].is_null()
            })
    })
    .await;
    assert!(
        failing,
        "deliveries to a refusing receiver are not being retried: {:?}",
        webhooks::deliveries(api, hook.id, None, 50).await?
    );
    assert!(receiver.received().is_empty());
    // The outage lasts 30 s in all: the scenario, not a wait for anything.
    tokio::time::sleep_until(down_since + Duration::from_secs(30)).await;
    receiver.up().await?;

    let outbox = webhooks::outbox(&db.pool, "test").await?;
    assert_eq!(outbox.len(), 6);
    let arrived = eventually(ARRIVAL, || async {
        let received = count_by_event(&receiver.received());
        outbox
            .iter()
            .all(|(id, _)| received.contains_key(&id.to_string()))
    })
    .await;
    assert!(
        arrived,
        "received {:?}",
        count_by_event(&receiver.received())
    );
    for request in receiver.received() {
        verify_signature(
            &hook.secret,
            request.header("wallet-signature"),
            &request.body,
            SIGNATURE_TOLERANCE,
        )
        .map_err(|error| anyhow::anyhow!(error))?;
    }
    let delivered = eventually(ARRIVAL, || async {
        webhooks::deliveries(api, hook.id, Some("delivered"), 50)
            .await
            .is_ok_and(|delivered| delivered.len() == 6)
    })
    .await;
    assert!(delivered);
    let counts = count_by_event(&receiver.received());
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    for delivery in webhooks::deliveries(api, hook.id, None, 50).await? {
        assert!(
            delivery["attempts"].as_i64().unwrap_or(0) >= 3,
            "{delivery}"
        );
    }
    let text = metrics(&node).await?;
    assert!(metric_line(&text, "wallet_webhook_deliveries_total{outcome=\"retry\"}") >= 12.0);
    Ok(())
}

#[tokio::test]
async fn a_receiver_answering_500_forever_ends_in_the_dead_letter_list_and_a_manual_retry_delivers_it()
-> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    receiver.set_mode(Mode::Status(500));
    let (_db, node) = node_with(&[
        ALLOW_LOOPBACK,
        ("WALLET_WEBHOOK_BACKOFF_BASE_MS", "100"),
        ("WALLET_WEBHOOK_BACKOFF_MAX_MS", "300"),
        ("WALLET_WEBHOOK_RETRY_FOR_MS", "3000"),
    ])
    .await?;
    let api = &node.api;
    let hook = webhooks::create(api, &receiver.url("/hook"), &["operation.applied"]).await?;
    let wallet = api.create_wallet().await?;
    let deposit = api.operate(wallet, "DEPOSIT", "7.00", None).await?;
    assert_eq!(deposit.status, StatusCode::OK);

    let dead = eventually(ARRIVAL, || async {
        webhooks::deliveries(api, hook.id, Some("failed"), 50)
            .await
            .is_ok_and(|failed| failed.len() == 1)
    })
    .await;
    assert!(
        dead,
        "no FAILED delivery: {:?}",
        webhooks::deliveries(api, hook.id, None, 50).await?
    );
    let failed = webhooks::deliveries(api, hook.id, Some("failed"), 50).await?;
    let delivery = &failed[0];
    assert!(
        delivery["attempts"].as_i64().unwrap_or(0) >= 2,
        "{delivery}"
    );
    assert_eq!(delivery["lastStatusCode"], 500, "{delivery}");
    assert!(
        delivery["lastError"]
            .as_str()
            .is_some_and(|error| error.contains("500")),
        "{delivery}"
    );
    assert!(delivery["nextAttemptAt"].is_null(), "{delivery}");
    assert!(
        webhooks::deliveries(api, hook.id, Some("pending"), 50)
            .await?
            .is_empty()
    );
    let delivery_id = delivery["deliveryId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let event_id = delivery["eventId"].as_str().unwrap_or_default().to_owned();
    // Every attempt was the same delivery of the same event.
    let attempts = receiver.received();
    assert!(attempts.len() >= 2, "{attempts:?}");
    assert!(attempts.iter().all(|request| {
        request.header("wallet-delivery-id") == delivery_id && request.event_id() == event_id
    }));
    let text = metrics(&node).await?;
    assert_eq!(
        metric_line(&text, "wallet_webhook_deliveries_total{outcome=\"failed\"}"),
        1.0
    );
    let gauged = eventually(ARRIVAL, || async {
        metrics(&node)
            .await
            .is_ok_and(|text| metric_line(&text, "wallet_webhook_deliveries_failed") == 1.0)
    })
    .await;
    assert!(gauged, "the failed gauge never showed the dead letter");

    // Fixed receiver, manual retry: PENDING, due now, a fresh window, then DELIVERED.
    receiver.set_mode(Mode::Status(200));
    let retried = webhooks::retry(api, hook.id, &delivery_id).await?;
    assert_eq!(retried.status, StatusCode::OK, "{retried:?}");
    assert_eq!(retried.body["status"], "PENDING");
    assert!(retried.body["retryUntil"].as_str() > delivery["retryUntil"].as_str());
    let redelivered = eventually(ARRIVAL, || async {
        webhooks::deliveries(api, hook.id, Some("delivered"), 50)
            .await
            .is_ok_and(|delivered| delivered.len() == 1)
    })
    .await;
    assert!(redelivered, "the retried delivery was not delivered");
    let last = receiver.received();
    let last = last
        .last()
        .ok_or_else(|| anyhow::anyhow!("nothing received"))?;
    assert_eq!(last.event_id(), event_id);
    assert_eq!(last.header("wallet-delivery-id"), delivery_id);

    // Only a FAILED delivery can be retried.
    let again = webhooks::retry(api, hook.id, &delivery_id).await?;
    assert_eq!(again.status, StatusCode::CONFLICT, "{again:?}");
    assert_eq!(
        again.body["type"],
        "https://wallet.dev/problems/delivery-not-failed"
    );
    assert_eq!(again.body["deliveryStatus"], "DELIVERED");
    let other = webhooks::create(api, &receiver.url("/other"), &["hold.created"]).await?;
    let elsewhere = webhooks::retry(api, other.id, &delivery_id).await?;
    assert_eq!(elsewhere.status, StatusCode::NOT_FOUND, "{elsewhere:?}");
    assert_eq!(
        elsewhere.body["type"],
        "https://wallet.dev/problems/delivery-not-found"
    );
    Ok(())
}

#[tokio::test]
async fn bad_webhook_requests_get_a_clear_4xx_and_change_nothing() -> anyhow::Result<()> {
    // Private targets are refused: the default.
    let (db, node) = node_with(&[]).await?;
    let api = &node.api;
    let post = |body: String| {
        let api = api.clone();
        async move { api.post_raw("/api/v1/webhooks", body, &[]).await }
    };
    let problem = |answer: &wallet_tests::api::Answer, status: StatusCode, kind: &str| {
        assert_eq!(answer.status, status, "{answer:?}");
        assert_eq!(
            answer.content_type, "application/problem+json",
            "{answer:?}"
        );
        assert_eq!(
            answer.body["type"],
            format!("https://wallet.dev/problems/{kind}"),
            "{answer:?}"
        );
        assert!(
            answer.body["detail"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{answer:?}"
        );
    };
    let body = |url: &str, types: Value| json!({"url": url, "eventTypes": types}).to_string();
    let applied = json!(["operation.applied"]);

    problem(
        &post(r#"{"url":"#.to_owned()).await?,
        StatusCode::BAD_REQUEST,
        "malformed-json",
    );
    problem(
        &post(String::new()).await?,
        StatusCode::BAD_REQUEST,
        "malformed-json",
    );
    problem(
        &post(json!({"url": "https://93.184.215.14/", "eventTypes": ["operation.applied"], "secret": "mine"}).to_string())
            .await?,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation-failed",
    );
    for url in [
        "not a url",
        "ftp://example.com/hook",
        "http://:8080/",
        "https://user:password@example.com/",
        "https://example.com/#fragment",
        &format!("https://example.com/{}", "a".repeat(2048)),
    ] {
        problem(
            &post(body(url, applied.clone())).await?,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
        );
    }
    for url in [
        "http://127.0.0.1:9/",
        "http://localhost:9/",
        "http://[::1]/",
        "http://10.0.0.1/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00::1]/",
        "http://[fe80::1]/",
        "http://224.0.0.1/",
        "http://0.0.0.0/",
        "http://[::ffff:127.0.0.1]/",
    ] {
        problem(
            &post(body(url, applied.clone())).await?,
            StatusCode::UNPROCESSABLE_ENTITY,
            "webhook-url-not-allowed",
        );
    }
    for types in [
        json!([]),
        json!(["operation.deleted"]),
        json!(["operation.applied", "nope"]),
        json!("operation.applied"),
        json!([17]),
    ] {
        problem(
            &post(body("https://93.184.215.14/", types)).await?,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
        );
    }
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM webhooks")
            .fetch_one(&db.pool)
            .await
    };
    assert_eq!(count().await?, 0, "nothing refused was stored");
    assert_eq!(api.get("/api/v1/webhooks").await?.body["items"], json!([]));

    // A public IP literal needs no resolving: accepted. With an Idempotency-Key, a replay
    // is the first answer, secret included; the key with another body is 422.
    let valid = body("http://93.184.215.14/hook", applied.clone());
    let key = [("Idempotency-Key", "hook-1")];
    let created = api
        .post_raw("/api/v1/webhooks", valid.clone(), &key)
        .await?;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let replayed = api
        .post_raw("/api/v1/webhooks", valid.clone(), &key)
        .await?;
    assert_eq!(replayed.status, StatusCode::CREATED, "{replayed:?}");
    assert_eq!(replayed.body, created.body);
    problem(
        &api.post_raw(
            "/api/v1/webhooks",
            body("http://93.184.215.14/other", applied.clone()),
            &key,
        )
        .await?,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
    );
    let hook = webhooks::Hook {
        id: created.body["webhookId"]
            .as_str()
            .unwrap_or_default()
            .parse()?,
        secret: created.body["secret"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    };
    assert!(hook.secret.starts_with("whsec_"), "{created:?}");
    let id = hook.id.to_string();
    let unknown = Uuid::now_v7().to_string();

    // Another tenant's webhook does not exist for the caller, nor an unknown one.
    let intruder = ApiClient::with_token(&api.base_url, Some(&token("intruder", &ALL_SCOPES)));
    for (client, webhook) in [(&intruder, id.as_str()), (api, unknown.as_str())] {
        problem(
            &webhooks::delete(client, webhook).await?,
            StatusCode::NOT_FOUND,
            "webhook-not-found",
        );
        problem(
            &client
                .get(&format!("/api/v1/webhooks/{webhook}/deliveries"))
                .await?,
            StatusCode::NOT_FOUND,
            "webhook-not-found",
        );
        problem(
            &client
                .post_raw(
                    &format!(
                        "/api/v1/webhooks/{webhook}/deliveries/{}/retry",
                        Uuid::now_v7()
                    ),
                    "",
                    &[],
                )
                .await?,
            StatusCode::NOT_FOUND,
            "delivery-not-found",
        );
    }
    assert_eq!(
        intruder.get("/api/v1/webhooks").await?.body["items"],
        json!([])
    );
    // The caller's own webhook, but no such delivery.
    problem(
        &webhooks::retry(api, hook.id, &Uuid::now_v7().to_string()).await?,
        StatusCode::NOT_FOUND,
        "delivery-not-found",
    );
    problem(
        &webhooks::delete(api, "nope").await?,
        StatusCode::BAD_REQUEST,
        "invalid-uuid",
    );
    for (query, status, kind) in [
        (
            "status=FAILED",
            StatusCode::BAD_REQUEST,
            "malformed-request",
        ),
        ("status=lost", StatusCode::BAD_REQUEST, "malformed-request"),
        ("state=failed", StatusCode::BAD_REQUEST, "malformed-request"),
        (
            "cursor=bm9wZQ",
            StatusCode::BAD_REQUEST,
            "malformed-request",
        ),
        (
            "limit=0",
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
        ),
        (
            "limit=201",
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
        ),
    ] {
        problem(
            &api.get(&format!("/api/v1/webhooks/{id}/deliveries?{query}"))
                .await?,
            status,
            kind,
        );
    }

    // Without webhooks:admin every route is 403 and names the scope.
    let reader = ApiClient::with_token(
        &api.base_url,
        Some(&token(
            wallet_tests::auth::TENANT,
            &["wallets:read", "events:read"],
        )),
    );
    let answers = [
        reader
            .post_raw(
                "/api/v1/webhooks",
                body("https://93.184.215.14/", applied.clone()),
                &[],
            )
            .await?,
        reader.get("/api/v1/webhooks").await?,
        webhooks::delete(&reader, &id).await?,
        reader
            .get(&format!("/api/v1/webhooks/{id}/deliveries"))
            .await?,
        webhooks::retry(&reader, hook.id, &Uuid::now_v7().to_string()).await?,
    ];
    for answer in &answers {
        problem(answer, StatusCode::FORBIDDEN, "forbidden");
        assert_eq!(answer.body["requiredScope"], "webhooks:admin");
    }

    // All of that changed nothing: the one webhook, as created.
    assert_eq!(count().await?, 1);
    let list = api.get("/api/v1/webhooks").await?;
    assert_eq!(
        list.body["items"],
        json!([{
            "webhookId": id,
            "url": "http://93.184.215.14/hook",
            "eventTypes": ["operation.applied"],
            "createdAt": list.body["items"][0]["createdAt"],
        }])
    );
    Ok(())
}

/// The recorder writes the outcomes of many attempts in one statement: each kind lands as
/// it would alone, and an attempt whose claim lapsed (a later claim counted one more
/// attempt) is not recorded over the newer one.
#[tokio::test]
async fn outcomes_recorded_together_land_each_as_alone_and_a_lapsed_claim_writes_nothing()
-> anyhow::Result<()> {
    use wallet::store::{AttemptRecord, RecordedAttempt};

    let db = TestDatabase::create().await?;
    let store = db.app_store().await?;
    let webhook = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO webhooks (id, tenant_id, url, event_types, secret, after_tx, after_ordinal, created_at) \
         VALUES ($1, 'dev', 'http://127.0.0.1:9/', ARRAY['operation.applied'], 'whsec_test', 0, 0, now())",
    )
    .bind(webhook)
    .execute(&db.pool)
    .await?;
    let deliveries: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    sqlx::query(
        "INSERT INTO webhook_deliveries (id, webhook_id, event_id, event_type, body, status, attempts, \
           next_attempt_at, retry_until, created_at) \
         SELECT d, $2, gen_random_uuid(), 'operation.applied', '{}', 'PENDING', 0, now(), \
           now() + interval '1 hour', now() FROM UNNEST($1::uuid[]) AS d",
    )
    .bind(&deliveries)
    .bind(webhook)
    .execute(&db.pool)
    .await?;

    let lease = Duration::from_secs(30);
    let claims = store.claim_deliveries(4, lease).await?;
    assert_eq!(claims.len(), 4, "every due delivery is claimed");
    let attempt_of = |id: Uuid| {
        claims
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.attempt)
            .unwrap_or_default()
    };
    // The fourth's claim lapses: another claim takes it over (attempt 2).
    sqlx::query("UPDATE webhook_deliveries SET attempts = attempts + 1 WHERE id = $1")
        .bind(deliveries[3])
        .execute(&db.pool)
        .await?;
    let records = [
        AttemptRecord::Delivered { status_code: 204 },
        AttemptRecord::Retry {
            after: Duration::from_secs(600),
            status_code: Some(503),
            error: "503 Service Unavailable".to_owned(),
        },
        AttemptRecord::Failed {
            status_code: None,
            error: "connection refused".to_owned(),
        },
        AttemptRecord::Delivered { status_code: 200 },
    ];
    let attempts: Vec<RecordedAttempt> = deliveries
        .iter()
        .zip(records)
        .map(|(id, record)| RecordedAttempt {
            delivery_id: *id,
            attempt: attempt_of(*id),
            record,
        })
        .collect();
    let mut recorded = store.record_attempts(&attempts).await?;
    recorded.sort();
    assert_eq!(
        recorded,
        deliveries[..3].to_vec(),
        "all but the lapsed claim"
    );

    type Row = (String, Option<i32>, Option<String>, bool, f64);
    let row = |id: Uuid| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, Row>(
                "SELECT status, last_status_code, last_error, delivered_at IS NOT NULL, \
                   EXTRACT(EPOCH FROM next_attempt_at - now())::float8 \
                 FROM webhook_deliveries WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
        }
    };
    let (status, code, error, delivered, _) = row(deliveries[0]).await?;
    assert_eq!(
        (status.as_str(), code, error, delivered),
        ("DELIVERED", Some(204), None, true)
    );
    let (status, code, error, delivered, due_in) = row(deliveries[1]).await?;
    assert_eq!(
        (status.as_str(), code, error.as_deref(), delivered),
        ("PENDING", Some(503), Some("503 Service Unavailable"), false)
    );
    assert!(
        (590.0..=600.0).contains(&due_in),
        "the retry is due after its backoff: {due_in} s"
    );
    let (status, code, error, delivered, _) = row(deliveries[2]).await?;
    assert_eq!(
        (status.as_str(), code, error.as_deref(), delivered),
        ("FAILED", None, Some("connection refused"), false)
    );
    // Untouched: still PENDING under the newer claim's lease, no outcome of the old one.
    let (status, code, error, delivered, due_in) = row(deliveries[3]).await?;
    assert_eq!(
        (status.as_str(), code, error, delivered),
        ("PENDING", None, None, false)
    );
    assert!(due_in > 20.0, "still under the claim's lease: {due_in} s");
    Ok(())
}
