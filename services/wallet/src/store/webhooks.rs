//! Webhooks and their deliveries: the tenant's API, and the claims through which the
//! nodes share the fan-out and the delivery work (`FOR UPDATE SKIP LOCKED`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use super::events::event_from_row;
use super::ledger::tenant_of;
use super::{PruneOutcome, Store, StoreError, StoredResponse, try_xact_lock};
use crate::auth::Tenant;
use crate::events::{EventCursor, EventType};
use crate::webhooks::{ClaimedDelivery, Delivery, DeliveryStatus, MAX_PER_TENANT, Webhook};

/// The horizon as the outbox's readers use it (see `store::events`).
const HORIZON: &str = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint";

macro_rules! webhook_columns {
    () => {
        "id, tenant_id, url, event_types, created_at"
    };
}

macro_rules! delivery_columns {
    () => {
        "id, webhook_id, event_id, event_type, body, status, attempts, next_attempt_at, retry_until, \
         last_attempt_at, last_status_code, last_error, created_at, delivered_at"
    };
}

/// The tenant already has `MAX_PER_TENANT` live webhooks.
#[derive(Debug)]
pub struct TooManyWebhooks;

/// What a creation with an Idempotency-Key did.
#[derive(Debug)]
pub enum CreatedWebhook {
    /// Created now; the answer (secret included) is stored under the key, if any.
    Created(serde_json::Value),
    /// The key was used before: its first answer, and the request it answered.
    Replayed(StoredResponse),
}

/// The scope of webhook creations' keys in `idempotency_keys`.
const KEY_SCOPE: &str = "create-webhook";

/// What a manual retry found.
#[derive(Debug)]
pub enum RetryDelivery {
    /// Back to PENDING, due now, with a fresh retry window.
    Retried(Box<Delivery>),
    /// No such delivery of this webhook (or no such webhook of the tenant).
    NotFound,
    /// Only a FAILED delivery can be retried; this one is not.
    NotFailed(DeliveryStatus),
}

/// How an attempt ended, as recorded.
#[derive(Clone, Debug)]
pub enum AttemptRecord {
    Delivered {
        status_code: u16,
    },
    Retry {
        after: Duration,
        status_code: Option<u16>,
        error: String,
    },
    Failed {
        status_code: Option<u16>,
        error: String,
    },
}

/// A claimed attempt's outcome, to be recorded.
#[derive(Clone, Debug)]
pub struct RecordedAttempt {
    pub delivery_id: Uuid,
    /// The claim's attempt number: the outcome counts only if no later claim took over.
    pub attempt: i32,
    pub record: AttemptRecord,
}

/// What one fan-out round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FanOut {
    /// Webhooks claimed and moved forward.
    pub webhooks: usize,
    /// Deliveries written.
    pub deliveries: u64,
    /// Some webhook's page was full: there is more to read now.
    pub more: bool,
}

/// Where a page of deliveries starts: strictly older than this.
pub type DeliveryCursor = (DateTime<Utc>, Uuid);

fn webhook_from_row(row: &PgRow) -> Result<Webhook, StoreError> {
    let types: Vec<String> = row.try_get("event_types")?;
    Ok(Webhook {
        id: row.try_get("id")?,
        tenant: tenant_of(row)?,
        url: row.try_get("url")?,
        event_types: types
            .iter()
            .map(|name| {
                EventType::parse(name)
                    .ok_or_else(|| StoreError::Corrupt(format!("webhook event type {name:?}")))
            })
            .collect::<Result<_, _>>()?,
        created_at: row.try_get("created_at")?,
    })
}

fn delivery_from_row(row: &PgRow) -> Result<Delivery, StoreError> {
    let kind: String = row.try_get("event_type")?;
    let status: String = row.try_get("status")?;
    Ok(Delivery {
        id: row.try_get("id")?,
        webhook_id: row.try_get("webhook_id")?,
        event_id: row.try_get("event_id")?,
        event_type: EventType::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("delivery event type {kind:?}")))?,
        body: row.try_get("body")?,
        status: DeliveryStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("delivery status {status:?}")))?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        retry_until: row.try_get("retry_until")?,
        last_attempt_at: row.try_get("last_attempt_at")?,
        last_status_code: row.try_get("last_status_code")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        delivered_at: row.try_get("delivered_at")?,
    })
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    /// The first answer to a webhook creation with `key`, if there was one.
    pub async fn webhook_creation(
        &self,
        tenant: &Tenant,
        key: &str,
    ) -> Result<Option<StoredResponse>, StoreError> {
        self.bounded(async {
            let mut conn = self.pool.acquire().await?;
            stored_creation(&mut conn, tenant, key).await
        })
        .await
    }

    /// Creates a webhook of `tenant` that gets the events from now on: its position is
    /// the outbox's current horizon. At most `MAX_PER_TENANT` live ones per tenant.
    /// With `idempotency` (key, request fingerprint), the answer `render` makes is stored
    /// under the key in the same transaction, or the key's first answer is returned.
    pub async fn create_webhook(
        &self,
        tenant: &Tenant,
        url: &str,
        event_types: &[EventType],
        secret: &str,
        idempotency: Option<(&str, &str)>,
        render: impl FnOnce(&Webhook) -> Result<serde_json::Value, serde_json::Error>,
    ) -> Result<Result<CreatedWebhook, TooManyWebhooks>, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            // Creations of one tenant one at a time, so the count below is the truth
            // and two requests with one key cannot both create.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('webhooks:' || $1, 0))")
                .bind(tenant.as_str())
                .execute(&mut *tx)
                .await?;
            if let Some((key, _)) = idempotency
                && let Some(stored) = stored_creation(&mut tx, tenant, key).await?
            {
                tx.rollback().await?;
                return Ok(Ok(CreatedWebhook::Replayed(stored)));
            }
            let live: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM webhooks WHERE tenant_id = $1 AND deleted_at IS NULL",
            )
            .bind(tenant.as_str())
            .fetch_one(&mut *tx)
            .await?;
            if live >= MAX_PER_TENANT {
                tx.rollback().await?;
                return Ok(Err(TooManyWebhooks));
            }
            let horizon: i64 = sqlx::query_scalar(HORIZON).fetch_one(&mut *tx).await?;
            let start = EventCursor::before_tx(horizon);
            let id = Uuid::now_v7();
            let row = sqlx::query(concat!(
                "INSERT INTO webhooks (id, tenant_id, url, event_types, secret, after_tx, after_ordinal, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, now()) RETURNING ",
                webhook_columns!()
            ))
            .bind(id)
            .bind(tenant.as_str())
            .bind(url)
            .bind(event_types.iter().map(|kind| kind.as_str()).collect::<Vec<_>>())
            .bind(secret)
            .bind(start.tx_id)
            .bind(start.ordinal)
            .fetch_one(&mut *tx)
            .await?;
            let webhook = webhook_from_row(&row)?;
            let answer = render(&webhook)
                .map_err(|error| StoreError::Corrupt(format!("a webhook's answer: {error}")))?;
            if let Some((key, request_hash)) = idempotency {
                sqlx::query(
                    "INSERT INTO idempotency_keys (tenant_id, scope, idempotency_key, request_hash, response_status, response_body) \
                     VALUES ($1, $2, $3, $4, 201, $5)",
                )
                .bind(tenant.as_str())
                .bind(KEY_SCOPE)
                .bind(key)
                .bind(request_hash)
                .bind(&answer)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(Ok(CreatedWebhook::Created(answer)))
        })
        .await
    }

    /// The tenant's live webhooks, oldest first.
    pub async fn webhooks(&self, tenant: &Tenant) -> Result<Vec<Webhook>, StoreError> {
        self.bounded(async {
            let rows = sqlx::query(concat!(
                "SELECT ",
                webhook_columns!(),
                " FROM webhooks WHERE tenant_id = $1 AND deleted_at IS NULL ORDER BY created_at, id"
            ))
            .bind(tenant.as_str())
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(webhook_from_row).collect()
        })
        .await
    }

    /// Deletes a webhook of `tenant` (soft: its deliveries are listed nowhere any more,
    /// and its PENDING ones are never due again). Deleting it again changes nothing and
    /// is no error, so a retried DELETE whose answer was lost succeeds; `false` only if
    /// the tenant never had such a webhook.
    pub async fn delete_webhook(&self, tenant: &Tenant, id: Uuid) -> Result<bool, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let deleted = sqlx::query(
                "UPDATE webhooks SET deleted_at = now() WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL",
            )
            .bind(id)
            .bind(tenant.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if deleted {
                // Out of the claims' range (`next_attempt_at <= now()`) for good, so
                // they no longer lie in the way of the claims' index scan either.
                sqlx::query(
                    "UPDATE webhook_deliveries SET next_attempt_at = '9999-12-31T00:00:00Z' \
                     WHERE webhook_id = $1 AND status = 'PENDING'",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
            let exists = deleted
                || sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM webhooks WHERE id = $1 AND tenant_id = $2)",
                )
                .bind(id)
                .bind(tenant.as_str())
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(exists)
        })
        .await
    }

    /// A page of a live webhook's deliveries, newest first, strictly older than
    /// `before`; `None` if the tenant has no such webhook.
    pub async fn deliveries(
        &self,
        tenant: &Tenant,
        webhook_id: Uuid,
        status: Option<DeliveryStatus>,
        before: Option<DeliveryCursor>,
        limit: i64,
    ) -> Result<Option<Vec<Delivery>>, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .execute(&mut *tx)
                .await?;
            let exists: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM webhooks WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL)",
            )
            .bind(webhook_id)
            .bind(tenant.as_str())
            .fetch_one(&mut *tx)
            .await?;
            if !exists {
                tx.rollback().await?;
                return Ok(None);
            }
            // One statement per shape, so each is planned on its own index.
            let sql = match (status.is_some(), before.is_some()) {
                (true, true) => concat!(
                    "SELECT ",
                    delivery_columns!(),
                    " FROM webhook_deliveries WHERE webhook_id = $1 AND status = $2 \
                     AND (created_at, id) < ($3, $4) ORDER BY created_at DESC, id DESC LIMIT $5"
                ),
                (true, false) => concat!(
                    "SELECT ",
                    delivery_columns!(),
                    " FROM webhook_deliveries WHERE webhook_id = $1 AND status = $2 \
                     AND $3::timestamptz IS NULL AND $4::uuid IS NULL ORDER BY created_at DESC, id DESC LIMIT $5"
                ),
                (false, true) => concat!(
                    "SELECT ",
                    delivery_columns!(),
                    " FROM webhook_deliveries WHERE webhook_id = $1 AND $2::text IS NULL \
                     AND (created_at, id) < ($3, $4) ORDER BY created_at DESC, id DESC LIMIT $5"
                ),
                (false, false) => concat!(
                    "SELECT ",
                    delivery_columns!(),
                    " FROM webhook_deliveries WHERE webhook_id = $1 AND $2::text IS NULL \
                     AND $3::timestamptz IS NULL AND $4::uuid IS NULL ORDER BY created_at DESC, id DESC LIMIT $5"
                ),
            };
            let rows = sqlx::query(sql)
                .bind(webhook_id)
                .bind(status.map(DeliveryStatus::as_str))
                .bind(before.map(|(at, _)| at))
                .bind(before.map(|(_, id)| id))
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            rows.iter()
                .map(delivery_from_row)
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        })
        .await
    }

    /// Puts a FAILED delivery of a live webhook of `tenant` back to PENDING, due now,
    /// with `retry_for` of retries again.
    pub async fn retry_delivery(
        &self,
        tenant: &Tenant,
        webhook_id: Uuid,
        delivery_id: Uuid,
        retry_for: Duration,
    ) -> Result<RetryDelivery, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let status: Option<String> = sqlx::query_scalar(
                "SELECT d.status FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id \
                 WHERE d.id = $1 AND d.webhook_id = $2 AND w.tenant_id = $3 AND w.deleted_at IS NULL \
                 FOR UPDATE OF d",
            )
            .bind(delivery_id)
            .bind(webhook_id)
            .bind(tenant.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            let outcome = match status.as_deref().map(DeliveryStatus::parse) {
                None => RetryDelivery::NotFound,
                Some(None) => {
                    return Err(StoreError::Corrupt(format!("delivery status {status:?}")));
                }
                Some(Some(DeliveryStatus::Failed)) => {
                    let row = sqlx::query(concat!(
                        "UPDATE webhook_deliveries SET status = 'PENDING', next_attempt_at = now(), \
                         retry_until = now() + $2 * interval '1 millisecond' WHERE id = $1 RETURNING ",
                        delivery_columns!()
                    ))
                    .bind(delivery_id)
                    .bind(millis(retry_for))
                    .fetch_one(&mut *tx)
                    .await?;
                    RetryDelivery::Retried(Box::new(delivery_from_row(&row)?))
                }
                Some(Some(other)) => RetryDelivery::NotFailed(other),
            };
            tx.commit().await?;
            Ok(outcome)
        })
        .await
    }

    /// One fan-out round: claims up to `webhooks` live webhooks whose tenant has events
    /// past their position (skipping those another node holds), writes a delivery per
    /// matching event of the next `page` events of each, and moves each position past
    /// what it read, all in one transaction. Deliveries are due at once and retried
    /// for `retry_for`.
    pub async fn fan_out(
        &self,
        webhooks: usize,
        page: usize,
        retry_for: Duration,
    ) -> Result<FanOut, StoreError> {
        self.bounded(async {
            let mut tx = self.deliveries.begin().await?;
            // Every transaction below the horizon has ended: their events are all
            // visible to the statements that follow (each takes a newer snapshot).
            let horizon: i64 = sqlx::query_scalar(HORIZON).fetch_one(&mut *tx).await?;
            let claimed = sqlx::query(
                "SELECT w.id, w.tenant_id, w.event_types, w.after_tx, w.after_ordinal FROM webhooks w \
                 WHERE w.deleted_at IS NULL AND EXISTS (SELECT 1 FROM events e WHERE e.tenant_id = w.tenant_id \
                   AND (e.tx_id, e.ordinal) > (w.after_tx, w.after_ordinal) AND e.tx_id < $1) \
                 ORDER BY w.after_tx, w.after_ordinal LIMIT $2 FOR UPDATE OF w SKIP LOCKED",
            )
            .bind(horizon)
            .bind(webhooks as i64)
            .fetch_all(&mut *tx)
            .await?;
            let mut report = FanOut::default();
            for row in &claimed {
                let webhook_id: Uuid = row.try_get("id")?;
                let tenant: String = row.try_get("tenant_id")?;
                let types: Vec<String> = row.try_get("event_types")?;
                let after = EventCursor {
                    tx_id: row.try_get("after_tx")?,
                    ordinal: row.try_get("after_ordinal")?,
                };
                let events = sqlx::query(
                    "SELECT tx_id, ordinal, event_id, tenant_id, wallet_id, sequence, event_type, occurred_at, data::text AS data \
                     FROM events WHERE tenant_id = $1 AND (tx_id, ordinal) > ($2, $3) AND tx_id < $4 \
                     AND event_type = ANY($5) ORDER BY tx_id, ordinal LIMIT $6",
                )
                .bind(&tenant)
                .bind(after.tx_id)
                .bind(after.ordinal)
                .bind(horizon)
                .bind(&types)
                .bind(page as i64)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(event_from_row)
                .collect::<Result<Vec<_>, _>>()?;
                report.more |= events.len() == page;
                let next = super::events::next_cursor(&events, after, page, horizon);
                if !events.is_empty() {
                    report.deliveries += sqlx::query(
                        "INSERT INTO webhook_deliveries (id, webhook_id, event_id, event_type, body, status, attempts, \
                           next_attempt_at, retry_until, created_at) \
                         SELECT i, $1, e, t, b, 'PENDING', 0, now(), now() + $2 * interval '1 millisecond', now() \
                         FROM UNNEST($3::uuid[], $4::uuid[], $5::text[], $6::text[]) AS u(i, e, t, b) \
                         ON CONFLICT (webhook_id, event_id) DO NOTHING",
                    )
                    .bind(webhook_id)
                    .bind(millis(retry_for))
                    .bind(events.iter().map(|_| Uuid::now_v7()).collect::<Vec<_>>())
                    .bind(events.iter().map(|e| e.event_id).collect::<Vec<_>>())
                    .bind(events.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>())
                    .bind(events.iter().map(|e| e.to_json()).collect::<Vec<_>>())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                }
                sqlx::query("UPDATE webhooks SET after_tx = $2, after_ordinal = $3 WHERE id = $1")
                    .bind(webhook_id)
                    .bind(next.tx_id)
                    .bind(next.ordinal)
                    .execute(&mut *tx)
                    .await?;
                report.webhooks += 1;
            }
            tx.commit().await?;
            Ok(report)
        })
        .await
    }

    /// Claims up to `limit` due PENDING deliveries of live webhooks (skipping those
    /// another node holds): each is no longer due for `lease` and counts one more
    /// attempt. Committed before anything is sent, so a node that dies leaves the claim
    /// to lapse and another node sends the delivery again.
    pub async fn claim_deliveries(
        &self,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        self.bounded(async {
            let rows = sqlx::query(
                "WITH due AS ( \
                   SELECT d.id FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id \
                   WHERE d.status = 'PENDING' AND d.next_attempt_at <= now() AND w.deleted_at IS NULL \
                   ORDER BY d.next_attempt_at, d.id LIMIT $1 FOR UPDATE OF d SKIP LOCKED) \
                 UPDATE webhook_deliveries d SET next_attempt_at = now() + $2 * interval '1 millisecond', \
                   attempts = d.attempts + 1, last_attempt_at = now() \
                 FROM due, webhooks w WHERE d.id = due.id AND w.id = d.webhook_id \
                 RETURNING d.id, d.event_id, d.event_type, d.body, d.attempts, d.retry_until, w.url, w.secret",
            )
            .bind(limit as i64)
            .bind(millis(lease))
            .fetch_all(&self.deliveries)
            .await?;
            rows.iter()
                .map(|row| {
                    let kind: String = row.try_get("event_type")?;
                    let body: String = row.try_get("body")?;
                    Ok(ClaimedDelivery {
                        id: row.try_get("id")?,
                        event_id: row.try_get("event_id")?,
                        event_type: EventType::parse(&kind).ok_or_else(|| {
                            StoreError::Corrupt(format!("delivery event type {kind:?}"))
                        })?,
                        occurred_at: occurred_at(&body),
                        body,
                        url: row.try_get("url")?,
                        secret: row.try_get("secret")?,
                        attempt: row.try_get("attempts")?,
                        retry_until: row.try_get("retry_until")?,
                    })
                })
                .collect()
        })
        .await
    }

    /// Records how claimed attempts ended, in one statement, each only if its claim is
    /// still the delivery's latest. Returns the deliveries recorded; the others' claims
    /// lapsed and another attempt took over, whose outcome counts.
    pub async fn record_attempts(
        &self,
        attempts: &[RecordedAttempt],
    ) -> Result<Vec<Uuid>, StoreError> {
        let mut ids = Vec::with_capacity(attempts.len());
        let mut numbers = Vec::with_capacity(attempts.len());
        let mut statuses = Vec::with_capacity(attempts.len());
        let mut retry_after_ms = Vec::with_capacity(attempts.len());
        let mut codes = Vec::with_capacity(attempts.len());
        let mut errors = Vec::with_capacity(attempts.len());
        for attempt in attempts {
            ids.push(attempt.delivery_id);
            numbers.push(attempt.attempt);
            let (status, after, code, error) = match &attempt.record {
                AttemptRecord::Delivered { status_code } => {
                    (DeliveryStatus::Delivered, None, Some(*status_code), None)
                }
                AttemptRecord::Retry {
                    after,
                    status_code,
                    error,
                } => (
                    DeliveryStatus::Pending,
                    Some(millis(*after)),
                    *status_code,
                    Some(error.as_str()),
                ),
                AttemptRecord::Failed { status_code, error } => (
                    DeliveryStatus::Failed,
                    None,
                    *status_code,
                    Some(error.as_str()),
                ),
            };
            statuses.push(status.as_str());
            retry_after_ms.push(after);
            codes.push(code.map(i32::from));
            errors.push(error);
        }
        self.bounded(async {
            Ok(sqlx::query_scalar(
                "UPDATE webhook_deliveries d SET status = u.status, \
                   delivered_at = CASE WHEN u.status = 'DELIVERED' THEN now() ELSE d.delivered_at END, \
                   next_attempt_at = CASE WHEN u.status = 'PENDING' \
                     THEN now() + u.after_ms * interval '1 millisecond' ELSE d.next_attempt_at END, \
                   last_status_code = u.code, last_error = u.error \
                 FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::int8[], $5::int4[], $6::text[]) \
                   AS u(id, attempt, status, after_ms, code, error) \
                 WHERE d.id = u.id AND d.attempts = u.attempt AND d.status = 'PENDING' \
                 RETURNING d.id",
            )
            .bind(&ids)
            .bind(&numbers)
            .bind(&statuses)
            .bind(&retry_after_ms)
            .bind(&codes)
            .bind(&errors)
            .fetch_all(&self.deliveries)
            .await?)
        })
        .await
    }

    /// Deletes up to `batch` deliveries whose last activity (delivery, last attempt or
    /// creation) is older than `retention`, except PENDING ones of live webhooks. One
    /// node at a time; the others get `Busy`.
    pub async fn prune_deliveries(
        &self,
        retention: Duration,
        batch: usize,
    ) -> Result<PruneOutcome, StoreError> {
        self.bounded(async {
            let mut tx = self.deliveries.begin().await?;
            if !try_xact_lock(&mut tx, "wallet:webhooks:prune").await? {
                tx.rollback().await?;
                return Ok(PruneOutcome::Busy);
            }
            // Activity is never before creation, so the old ones are among those created
            // before the cutoff. In no order: any batch of them will do, and an order
            // would have PostgreSQL sort all of a webhook's old deliveries for each batch.
            // The DELETE checks the delivery again: a manual retry may have made it
            // PENDING since the CTE read it.
            let deleted = sqlx::query(
                "WITH doomed AS ( \
                   SELECT d.id, w.deleted_at IS NOT NULL AS gone FROM webhooks w CROSS JOIN LATERAL ( \
                     SELECT d.id FROM webhook_deliveries d \
                     WHERE d.webhook_id = w.id AND d.created_at < now() - $1 * interval '1 millisecond' \
                       AND (d.status <> 'PENDING' OR w.deleted_at IS NOT NULL) \
                       AND COALESCE(d.delivered_at, d.last_attempt_at, d.created_at) \
                           < now() - $1 * interval '1 millisecond' \
                     LIMIT $2) d \
                   LIMIT $2) \
                 DELETE FROM webhook_deliveries d USING doomed WHERE d.id = doomed.id \
                   AND (d.status <> 'PENDING' OR doomed.gone) \
                   AND COALESCE(d.delivered_at, d.last_attempt_at, d.created_at) \
                       < now() - $1 * interval '1 millisecond'",
            )
            .bind(millis(retention))
            .bind(i64::try_from(batch).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            Ok(PruneOutcome::Deleted {
                rows: deleted,
                more: deleted >= batch as u64,
            })
        })
        .await
    }

    /// Deliveries PENDING and FAILED, of live webhooks, in the whole cluster.
    pub async fn delivery_counts(&self) -> Result<(i64, i64), StoreError> {
        self.bounded(async {
            let row = sqlx::query(
                "SELECT \
                   (SELECT count(*) FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id \
                    WHERE d.status = 'PENDING' AND w.deleted_at IS NULL) AS pending, \
                   (SELECT count(*) FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id \
                    WHERE d.status = 'FAILED' AND w.deleted_at IS NULL) AS failed",
            )
            .fetch_one(&self.deliveries)
            .await?;
            Ok((row.try_get("pending")?, row.try_get("failed")?))
        })
        .await
    }
}

async fn stored_creation(
    conn: &mut sqlx::PgConnection,
    tenant: &Tenant,
    key: &str,
) -> Result<Option<StoredResponse>, StoreError> {
    let row = sqlx::query(
        "SELECT request_hash, response_status, response_body FROM idempotency_keys \
         WHERE tenant_id = $1 AND scope = $2 AND idempotency_key = $3",
    )
    .bind(tenant.as_str())
    .bind(KEY_SCOPE)
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|row| {
        let status: i16 = row.try_get("response_status")?;
        Ok(StoredResponse {
            request_hash: row.try_get("request_hash")?,
            status: u16::try_from(status)
                .map_err(|_| StoreError::Corrupt(format!("status {status}")))?,
            body: row.try_get("response_body")?,
        })
    })
    .transpose()
}

/// The event's time, read back from its JSON (for the lag histogram only).
fn occurred_at(body: &str) -> Option<DateTime<Utc>> {
    #[derive(serde::Deserialize)]
    struct Occurred {
        #[serde(rename = "occurredAt")]
        occurred_at: DateTime<Utc>,
    }
    serde_json::from_str::<Occurred>(body)
        .ok()
        .map(|event| event.occurred_at)
}
