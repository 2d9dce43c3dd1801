//! Pruning of the outbox: events past their retention go, from the oldest on, but never
//! one a consumer still needs (a row of `event_consumers`, a live webhook's position); a
//! cursor before what was pruned gets 410 `cursor-expired` from the pull API.
//!
//! The retention is an hour and the tests age their events by hand, so which events are
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
    let webhook = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO webhooks (id, tenant_id, url, event_types, secret, after_tx, after_ordinal, created_at) \
         VALUES ($1, $2, 'https://hooks.invalid/wallet', ARRAY['operation.applied'], 'secret', 0, -1, now())",
    )
    .bind(webhook)
    .bind(auth::TENANT)
    .execute(&db.pool)
    .await?;
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
