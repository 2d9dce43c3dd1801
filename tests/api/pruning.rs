//! Pruning of the outbox: events past their retention go, from the oldest on, but never
//! one a consumer still needs (a row of `event_consumers`, a live webhook's position); a
//! cursor before what was pruned gets 410 `cursor-expired` from the pull API.
//!
//! Webhook deliveries that are done (DELIVERED or FAILED) go once their last activity is
//! older than their own retention, and every delivery of a webhook deleted that long ago;
//! a PENDING delivery of a live webhook never does.
//!
//! The retentions are an hour and the tests age their rows by hand, so which rows are
//! old never depends on how fast anything runs.

use std::time::Duration;

use reqwest::StatusCode;
use uuid::Uuid;
use wallet::events::EventCursor;
use wallet_tests::{ApiClient, InProcessNode, NodeOptions, TestDatabase, auth, eventually};

const WAIT: Duration = Duration::from_secs(30);

fn options(db: &TestDatabase) -> NodeOptions {
    let mut options = NodeOptions::new(&db.app_url);
    options.extra.extend(
        [
            ("WALLET_EVENTS_RETENTION_MS", "3600000"),
            ("WALLET_EVENTS_PRUNE_INTERVAL_MS", "100"),
            ("WALLET_EVENTS_POLL_MS", "50"),
            ("WALLET_WEBHOOK_RETENTION_MS", "3600000"),
            ("WALLET_WEBHOOK_PRUNE_INTERVAL_MS", "100"),
        ]
        .map(|(name, value)| (name.to_owned(), value.to_owned())),
    );
    options
}

fn client(node: &InProcessNode, tenant: &str) -> ApiClient {
    ApiClient::with_token(
        &node.api.base_url,
        Some(&auth::token(
            tenant,
            &[
                "wallets:read",
                "wallets:create",
                "wallets:deposit",
                "events:read",
            ],
        )),
    )
}

/// A new wallet and `deposits` deposits, one after another: one event each, and one
/// for the wallet.
async fn wallet_with_deposits(api: &ApiClient, deposits: usize) -> anyhow::Result<Uuid> {
    let wallet = api.create_wallet().await?;
    for _ in 0..deposits {
        let answer = api.operate(wallet, "DEPOSIT", "1.00", None).await?;
        anyhow::ensure!(answer.status == StatusCode::OK, "{answer:?}");
    }
    Ok(wallet)
}

/// The outbox's positions (of one wallet's events, or all), in order.
async fn positions(db: &TestDatabase, wallet: Option<Uuid>) -> anyhow::Result<Vec<EventCursor>> {
    let rows: Vec<(i64, i32)> = sqlx::query_as(
        "SELECT tx_id, ordinal FROM events WHERE $1::uuid IS NULL OR wallet_id = $1 ORDER BY tx_id, ordinal",
    )
    .bind(wallet)
    .fetch_all(&db.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(tx_id, ordinal)| EventCursor { tx_id, ordinal })
        .collect())
}

/// Makes events look two hours old: past the hour of retention.
async fn age(db: &TestDatabase, wallet: Option<Uuid>) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE events SET occurred_at = occurred_at - interval '2 hours' WHERE $1::uuid IS NULL OR wallet_id = $1",
    )
    .bind(wallet)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// A webhook of the tests' tenant that has fanned nothing out, written directly: live, or
/// deleted that many hours ago.
async fn insert_webhook(db: &TestDatabase, deleted_hours_ago: Option<i32>) -> anyhow::Result<Uuid> {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO webhooks (id, tenant_id, url, event_types, secret, after_tx, after_ordinal, created_at, deleted_at) \
         VALUES ($1, $2, 'https://hooks.invalid/wallet', ARRAY['operation.applied'], 'secret', 0, -1, \
           now() - interval '1 day', now() - $3 * interval '1 hour')",
    )
    .bind(id)
    .bind(auth::TENANT)
    .bind(deleted_hours_ago)
    .execute(&db.pool)
    .await?;
    Ok(id)
}

async fn set_consumer(db: &TestDatabase, name: &str, at: EventCursor) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO event_consumers (name, after_tx, after_ordinal, updated_at) VALUES ($1, $2, $3, now()) \
         ON CONFLICT (name) DO UPDATE SET after_tx = EXCLUDED.after_tx, after_ordinal = EXCLUDED.after_ordinal",
    )
    .bind(name)
    .bind(at.tx_id)
    .bind(at.ordinal)
    .execute(&db.pool)
    .await?;
    Ok(())
}

async fn pruned_mark(db: &TestDatabase) -> anyhow::Result<Option<EventCursor>> {
    let row: Option<(i64, i32)> =
        sqlx::query_as("SELECT through_tx, through_ordinal FROM events_pruned")
            .fetch_optional(&db.pool)
            .await?;
    Ok(row.map(|(tx_id, ordinal)| EventCursor { tx_id, ordinal }))
}

async fn pruned_total(node: &InProcessNode) -> anyhow::Result<f64> {
    node.metric("wallet_events_pruned_total").await
}

/// GET /api/v1/events after `cursor` (none: from the oldest kept).
async fn events_after(
    api: &ApiClient,
    cursor: Option<EventCursor>,
) -> anyhow::Result<wallet_tests::api::Answer> {
    let query = cursor.map_or(String::new(), |c| format!("?after={}", c.encode()));
    api.get(&format!("/api/v1/events{query}")).await
}

#[tokio::test]
async fn old_events_are_pruned_up_to_the_slowest_consumer_and_older_cursors_get_410()
-> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let node = InProcessNode::start("node-a", &options(&db)).await?;
    let api = client(&node, auth::TENANT);
    // A consumer that has read nothing yet holds everything back.
    set_consumer(&db, "slow", EventCursor::START).await?;
    let old_wallet = wallet_with_deposits(&api, 6).await?;
    let new_wallet = wallet_with_deposits(&api, 1).await?;
    let old = positions(&db, Some(old_wallet)).await?;
    let new = positions(&db, Some(new_wallet)).await?;
    assert_eq!((old.len(), new.len()), (7, 2));
    age(&db, Some(old_wallet)).await?;

    // The consumer has read the first three: those go, the rest of the old ones stay.
    set_consumer(&db, "slow", old[2]).await?;
    assert!(
        eventually(WAIT, || async {
            positions(&db, Some(old_wallet)).await.ok() == Some(old[3..].to_vec())
        })
        .await,
        "the three events the consumer passed were not pruned: {:?}",
        positions(&db, None).await?
    );
    assert_eq!(
        positions(&db, Some(new_wallet)).await?,
        new,
        "new events stay"
    );
    assert_eq!(pruned_mark(&db).await?, Some(old[2]));
    assert_eq!(pruned_total(&node).await?, 3.0);

    // A cursor before the last pruned event lost events: 410. At it, nothing was lost.
    let expired = events_after(&api, Some(old[1])).await?;
    assert_eq!(expired.status, StatusCode::GONE, "{expired:?}");
    assert!(
        expired.body["type"]
            .as_str()
            .is_some_and(|kind| kind.ends_with("cursor-expired")),
        "{expired:?}"
    );
    let at_mark = events_after(&api, Some(old[2])).await?;
    assert_eq!(at_mark.status, StatusCode::OK, "{at_mark:?}");
    assert_eq!(at_mark.body["items"][0]["cursor"], old[3].encode().as_str());
    // Without a cursor, a reader starts at the oldest event kept.
    let fresh = events_after(&api, None).await?;
    assert_eq!(fresh.status, StatusCode::OK, "{fresh:?}");
    assert_eq!(fresh.body["items"][0]["cursor"], old[3].encode().as_str());

    // The consumer catches up: every old event goes, the new ones stay.
    set_consumer(&db, "slow", *new.last().unwrap_or(&old[6])).await?;
    assert!(
        eventually(WAIT, || async {
            positions(&db, None).await.ok() == Some(new.clone())
        })
        .await,
        "the old events were not all pruned: {:?}",
        positions(&db, None).await?
    );
    assert_eq!(pruned_mark(&db).await?, Some(old[6]));
    assert_eq!(pruned_total(&node).await?, 7.0);
    assert_eq!(
        events_after(&api, Some(old[4])).await?.status,
        StatusCode::GONE
    );
    node.stop().await
}

#[tokio::test]
async fn a_live_webhook_holds_pruning_back_at_its_tenants_next_event() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let node = InProcessNode::start("node-a", &options(&db)).await?;
    let hooked = client(&node, auth::TENANT);
    let other = client(&node, "prune-other");
    let before = wallet_with_deposits(&other, 1).await?;
    let hooked_wallet = wallet_with_deposits(&hooked, 1).await?;
    let after = other.create_wallet().await?;
    let hooked_events = positions(&db, Some(hooked_wallet)).await?;
    let after_events = positions(&db, Some(after)).await?;
    assert_eq!(positions(&db, Some(before)).await?.len(), 2);

    // A webhook of the hooked tenant that has fanned nothing out yet.
    let webhook = insert_webhook(&db, None).await?;
    // Kept from the node's fan-out (which skips locked webhooks), so that its position
    // stays where it is while pruning runs: pruning reads it without a lock.
    let mut fan_out_held = db.pool.begin().await?;
    sqlx::query("SELECT id FROM webhooks WHERE id = $1 FOR UPDATE")
        .bind(webhook)
        .execute(&mut *fan_out_held)
        .await?;
    age(&db, None).await?;

    // The other tenant's events before the hooked tenant's first one go; from there on
    // everything stays.
    let held: Vec<EventCursor> = hooked_events.iter().chain(&after_events).copied().collect();
    assert!(
        eventually(WAIT, || async {
            positions(&db, None).await.ok() == Some(held.clone())
        })
        .await,
        "pruning did not stop at the webhook's next event: {:?}",
        positions(&db, None).await?
    );

    fan_out_held.commit().await?;

    // Past its tenant's events, the webhook holds nothing back, though it is far behind
    // in the outbox: the other tenant's later events are none of its business.
    let last = *hooked_events.last().unwrap_or(&held[0]);
    sqlx::query("UPDATE webhooks SET after_tx = $2, after_ordinal = $3 WHERE id = $1")
        .bind(webhook)
        .bind(last.tx_id)
        .bind(last.ordinal)
        .execute(&db.pool)
        .await?;
    assert!(
        eventually(WAIT, || async {
            positions(&db, None).await.is_ok_and(|left| left.is_empty())
        })
        .await,
        "events left: {:?}",
        positions(&db, None).await?
    );
    node.stop().await
}

/// Old deliveries beyond one pruning batch, besides the listed ones.
const BULK_DELIVERIES: i64 = 12_000;

/// A delivery's webhook, status, minutes since its creation, last attempt and delivery,
/// and whether pruning keeps it.
type DeliveryCase = (Uuid, &'static str, i32, Option<i32>, Option<i32>, bool);

/// Every delivery id, in order.
async fn delivery_ids(db: &TestDatabase) -> anyhow::Result<Vec<Uuid>> {
    Ok(
        sqlx::query_scalar("SELECT id FROM webhook_deliveries ORDER BY id")
            .fetch_all(&db.pool)
            .await?,
    )
}

#[tokio::test]
async fn done_deliveries_past_their_retention_are_pruned_and_pending_ones_of_live_webhooks_stay()
-> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let node = InProcessNode::start("node-a", &options(&db)).await?;
    let live = insert_webhook(&db, None).await?;
    let deleted = insert_webhook(&db, Some(2)).await?;
    // Ages in minutes; a PENDING delivery is due in a day, so no attempt changes it while
    // the test runs.
    let cases: [DeliveryCase; 9] = [
        (live, "DELIVERED", 180, Some(120), Some(120), false),
        (live, "FAILED", 180, Some(120), None, false),
        (live, "PENDING", 180, Some(120), None, true),
        (live, "PENDING", 180, None, None, true),
        (live, "DELIVERED", 1, Some(1), Some(1), true),
        // Retried by hand ten minutes ago and failed again: its last activity is recent.
        (live, "FAILED", 180, Some(10), None, true),
        // Delivered late, after retries: kept an hour from the delivery.
        (live, "DELIVERED", 180, Some(30), Some(30), true),
        // A webhook deleted two hours ago: nothing of it is sent any more.
        (deleted, "PENDING", 180, Some(170), None, false),
        (deleted, "DELIVERED", 1, Some(1), Some(1), true),
    ];
    let mut kept = Vec::new();
    for (webhook, status, created, attempted, delivered, keep) in cases {
        let id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO webhook_deliveries (id, webhook_id, event_id, event_type, body, status, attempts, \
               next_attempt_at, retry_until, last_attempt_at, created_at, delivered_at) \
             VALUES ($1, $2, $3, 'operation.applied', '{}', $4, 1, now() + interval '1 day', \
               now() + interval '1 day', now() - $5 * interval '1 minute', now() - $6 * interval '1 minute', \
               now() - $7 * interval '1 minute')",
        )
        .bind(id)
        .bind(webhook)
        .bind(Uuid::new_v4())
        .bind(status)
        .bind(attempted)
        .bind(created)
        .bind(delivered)
        .execute(&db.pool)
        .await?;
        if keep {
            kept.push(id);
        }
    }
    kept.sort();
    // More old DELIVERED rows than one pruning transaction deletes.
    sqlx::query(
        "INSERT INTO webhook_deliveries (id, webhook_id, event_id, event_type, body, status, attempts, \
           next_attempt_at, retry_until, last_attempt_at, created_at, delivered_at) \
         SELECT gen_random_uuid(), $1, gen_random_uuid(), 'operation.applied', '{}', 'DELIVERED', 1, \
           now() - interval '2 hours', now(), now() - interval '2 hours', now() - interval '3 hours', \
           now() - interval '2 hours' FROM generate_series(1, $2)",
    )
    .bind(live)
    .bind(BULK_DELIVERIES)
    .execute(&db.pool)
    .await?;

    assert!(
        eventually(WAIT, || async {
            delivery_ids(&db).await.ok() == Some(kept.clone())
        })
        .await,
        "left {} deliveries, wanted {kept:?}",
        delivery_ids(&db).await?.len()
    );
    assert_eq!(
        node.metric("wallet_webhook_deliveries_pruned_total")
            .await?,
        (BULK_DELIVERIES + 3) as f64
    );
    // The live webhook's list shows what is left.
    let api = ApiClient::with_token(
        &node.api.base_url,
        Some(&auth::token(auth::TENANT, &["webhooks:admin"])),
    );
    let listed = api
        .get(&format!("/api/v1/webhooks/{live}/deliveries?limit=100"))
        .await?;
    assert_eq!(listed.status, StatusCode::OK, "{listed:?}");
    assert_eq!(
        listed.body["items"].as_array().map(Vec::len),
        Some(kept.len() - 1),
        "{listed:?}"
    );
    node.stop().await
}

/// Whether the deliveries' pruning statement is waiting for a row lock.
async fn pruning_waits(db: &TestDatabase) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() \
         AND wait_event_type = 'Lock' AND query LIKE 'WITH doomed%')",
    )
    .fetch_one(&db.pool)
    .await?)
}

#[tokio::test]
async fn a_delivery_retried_while_pruning_waits_for_it_stays() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let webhook = insert_webhook(&db, None).await?;
    let delivery = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO webhook_deliveries (id, webhook_id, event_id, event_type, body, status, attempts, \
           next_attempt_at, retry_until, last_attempt_at, created_at) \
         VALUES ($1, $2, gen_random_uuid(), 'operation.applied', '{}', 'FAILED', 3, now(), \
           now() - interval '2 hours', now() - interval '2 hours', now() - interval '3 hours')",
    )
    .bind(delivery)
    .bind(webhook)
    .execute(&db.pool)
    .await?;
    // A manual retry, as the API makes it, holding the row before the node starts: the
    // node's first pruning round reads the delivery as FAILED and old, and waits.
    let mut retry = db.pool.begin().await?;
    sqlx::query(
        "UPDATE webhook_deliveries SET status = 'PENDING', next_attempt_at = now() + interval '1 day', \
         retry_until = now() + interval '1 day' WHERE id = $1",
    )
    .bind(delivery)
    .execute(&mut *retry)
    .await?;
    let node = InProcessNode::start("node-a", &options(&db)).await?;
    assert!(
        eventually(WAIT, || async {
            pruning_waits(&db).await.ok() == Some(true)
        })
        .await,
        "the pruning statement never waited for the retry"
    );
    retry.commit().await?;

    // Now PENDING for a live webhook: kept, in that round and in the next few (the
    // interval is 100 ms).
    assert!(
        eventually(WAIT, || async {
            pruning_waits(&db).await.ok() == Some(false)
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM webhook_deliveries WHERE id = $1")
            .bind(delivery)
            .fetch_optional(&db.pool)
            .await?;
    assert_eq!(status.as_deref(), Some("PENDING"));
    assert_eq!(
        node.metric("wallet_webhook_deliveries_pruned_total")
            .await?,
        0.0
    );
    node.stop().await
}
