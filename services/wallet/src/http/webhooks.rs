//! A tenant's webhooks: create (the secret is shown once), list, delete, and the
//! deliveries of one, with a manual retry of a FAILED one. Every route needs
//! `webhooks:admin`; another tenant's webhook does not exist for the caller (404).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use salvo::oapi::ToSchema;
use salvo::prelude::*;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::ApiError;
use super::guard::principal;
use super::input;
use super::wallets::{Reply, state};
use crate::events::EventType;
use crate::store::{
    CreatedWebhook, DeliveryCursor, RetryDelivery, StoredResponse, TooManyWebhooks,
};
use crate::webhooks::{Delivery, DeliveryStatus, MAX_PER_TENANT, Webhook, new_secret, target};

const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 200;
/// How long a new webhook's host may take to resolve (for the address check).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// A webhook as listed: never its secret.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookView {
    pub webhook_id: Uuid,
    pub url: String,
    pub event_types: Vec<EventType>,
    pub created_at: DateTime<Utc>,
}

impl From<&Webhook> for WebhookView {
    fn from(webhook: &Webhook) -> Self {
        Self {
            webhook_id: webhook.id,
            url: webhook.url.clone(),
            event_types: webhook.event_types.clone(),
            created_at: webhook.created_at,
        }
    }
}

/// A webhook just created, with its signing secret: the only time it is shown.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedWebhookView {
    pub webhook_id: Uuid,
    pub url: String,
    pub event_types: Vec<EventType>,
    pub created_at: DateTime<Utc>,
    /// Keys the HMAC-SHA256 of `Wallet-Signature` (the whole string). Shown only here.
    pub secret: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookList {
    /// Oldest first; at most 100.
    pub items: Vec<WebhookView>,
}

/// The body of `POST /api/v1/webhooks`. Unknown fields are refused.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[salvo(schema(name = "WebhookRequest"))]
#[expect(
    dead_code,
    reason = "documents the body; input::webhook reads it exactly"
)]
pub struct WebhookRequestDoc {
    /// http or https, with a host, at most 2048 characters; no credentials, no fragment.
    /// Private, loopback and link-local addresses (and names resolving to them) are
    /// refused.
    // Neither `format: uri` (RFC 3986 and the WHATWG parsing used here disagree at the
    // edges) nor `maxLength` (a fuzzer's over-long string is 413 as a body, not 422).
    #[salvo(schema(example = "https://hooks.example.com/wallet"))]
    pub url: String,
    /// The event types to deliver; at least one.
    #[salvo(schema(value_type = Vec<EventType>, min_items = 1))]
    pub event_types: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub enum DeliveryStatusView {
    #[serde(rename = "PENDING")]
    Pending,
    #[serde(rename = "DELIVERED")]
    Delivered,
    #[serde(rename = "FAILED")]
    Failed,
}

impl From<DeliveryStatus> for DeliveryStatusView {
    fn from(status: DeliveryStatus) -> Self {
        match status {
            DeliveryStatus::Pending => Self::Pending,
            DeliveryStatus::Delivered => Self::Delivered,
            DeliveryStatus::Failed => Self::Failed,
        }
    }
}

/// The `status` filter of a delivery list.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[salvo(schema(name = "DeliveryStatusFilter"))]
pub enum DeliveryStatusFilter {
    Pending,
    Delivered,
    Failed,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryView {
    pub delivery_id: Uuid,
    pub webhook_id: Uuid,
    pub event_id: Uuid,
    pub event_type: EventType,
    /// PENDING: due at `nextAttemptAt` (or being attempted). DELIVERED: a 2xx came back.
    /// FAILED: out of retries (the dead-letter list); `POST .../retry` sends it again.
    pub status: DeliveryStatusView,
    /// Attempts started so far.
    pub attempts: i32,
    /// When the next attempt is due (PENDING only).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// No attempt is scheduled after this; then the delivery is FAILED.
    pub retry_until: DateTime<Utc>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// The receiver's HTTP status of the last attempt, if it answered.
    pub last_status_code: Option<i32>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    /// The event as POSTed (the JSON of `GET /api/v1/events`).
    #[salvo(schema(value_type = Object))]
    pub event: Box<serde_json::value::RawValue>,
}

impl TryFrom<Delivery> for DeliveryView {
    type Error = ApiError;

    fn try_from(delivery: Delivery) -> Result<Self, ApiError> {
        Ok(Self {
            delivery_id: delivery.id,
            webhook_id: delivery.webhook_id,
            event_id: delivery.event_id,
            event_type: delivery.event_type,
            status: delivery.status.into(),
            attempts: delivery.attempts,
            next_attempt_at: (delivery.status == DeliveryStatus::Pending)
                .then_some(delivery.next_attempt_at),
            retry_until: delivery.retry_until,
            last_attempt_at: delivery.last_attempt_at,
            last_status_code: delivery.last_status_code,
            last_error: delivery.last_error,
            created_at: delivery.created_at,
            delivered_at: delivery.delivered_at,
            event: serde_json::value::RawValue::from_string(delivery.body)?,
        })
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryPage {
    /// Newest first.
    pub items: Vec<DeliveryView>,
    /// Pass as `cursor` to get the next (older) page; null on the last page.
    pub next_cursor: Option<String>,
}

/// 204 with no body.
pub struct NoContent;

#[async_trait]
impl Writer for NoContent {
    async fn write(self, _req: &mut Request, _depot: &mut Depot, res: &mut Response) {
        res.status_code(StatusCode::NO_CONTENT);
    }
}

impl salvo::oapi::EndpointOutRegister for NoContent {
    fn register(
        _components: &mut salvo::oapi::Components,
        _operation: &mut salvo::oapi::Operation,
    ) {
    }
}

impl From<target::TargetError> for ApiError {
    fn from(error: target::TargetError) -> Self {
        match error {
            target::TargetError::Invalid(_) => Self::Validation(error.to_string()),
            target::TargetError::NotAllowed(_) => Self::WebhookUrlNotAllowed(error.to_string()),
        }
    }
}

impl From<TooManyWebhooks> for ApiError {
    fn from(_: TooManyWebhooks) -> Self {
        Self::TooManyWebhooks(MAX_PER_TENANT)
    }
}

/// Subscribe a URL to the tenant's events.
///
/// The webhook gets the events that happen from its creation on, each POSTed as the JSON
/// of `GET /api/v1/events`, signed with `Wallet-Signature: t=<unix seconds>,v1=<hex
/// HMAC-SHA256(secret, "<t>.<body>")>`. A 2xx answer is a delivery; anything else is
/// retried with exponential backoff, and after the retry window the delivery is FAILED.
/// At least once: a redelivery carries the same `Wallet-Event-Id`.
#[endpoint(
    tags("webhooks"),
    request_body = WebhookRequestDoc,
    parameters(("Idempotency-Key" = Option<String>, Header, description = "Replays return the first answer, secret included; the same key with another body is 422")),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 201, description = "The webhook, with its secret (shown only now)", body = CreatedWebhookView),
        (status_code = 400, description = "Malformed JSON or Idempotency-Key", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 409, description = "The tenant has 100 webhooks already", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 413, description = "Body too large", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 422, description = "Unknown fields, an invalid URL or event type, no event types, a URL of a private network (webhook-url-not-allowed), or a reused key", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 503, description = "The database did not answer in time", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_webhook(req: &mut Request, depot: &mut Depot) -> Result<Reply, ApiError> {
    let state = state(depot)?;
    let key = input::idempotency_key(req)?;
    let bytes = input::body(req, state.max_body_bytes)
        .await?
        .ok_or_else(|| ApiError::MalformedJson("the request body is empty".to_owned()))?;
    let request = input::webhook(&bytes)?;
    let fingerprint = fingerprint(&request);
    let tenant = &principal(depot)?.tenant;
    // A replay gets the first answer, secret included, even if the URL would not
    // resolve now.
    if let Some(key) = &key
        && let Some(previous) = state.store.webhook_creation(tenant, key).await?
    {
        return replay(previous, &fingerprint);
    }
    target::check(&request.url, state.webhooks.allow_private, RESOLVE_TIMEOUT).await?;
    let secret = new_secret().map_err(|error| {
        ApiError::Unexpected(anyhow::anyhow!("no randomness for a secret: {error}"))
    })?;
    let created = state
        .store
        .create_webhook(
            tenant,
            request.url.as_str(),
            &request.event_types,
            &secret,
            key.as_deref().map(|key| (key, fingerprint.as_str())),
            |webhook| {
                serde_json::to_value(CreatedWebhookView {
                    webhook_id: webhook.id,
                    url: webhook.url.clone(),
                    event_types: webhook.event_types.clone(),
                    created_at: webhook.created_at,
                    secret: secret.clone(),
                })
            },
        )
        .await??;
    match created {
        CreatedWebhook::Created(body) => Reply::new(StatusCode::CREATED, &body),
        // The same key, raced by a concurrent request: whichever came first answers both.
        CreatedWebhook::Replayed(previous) => replay(previous, &fingerprint),
    }
}

/// What makes two creations "the same request" for an Idempotency-Key.
fn fingerprint(request: &input::WebhookInput) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(request.url.as_str().as_bytes());
    for kind in &request.event_types {
        hash.update(b"\n");
        hash.update(kind.as_str().as_bytes());
    }
    format!("create-webhook:v1:{}", hex::encode(hash.finalize()))
}

fn replay(previous: StoredResponse, fingerprint: &str) -> Result<Reply, ApiError> {
    if previous.request_hash != fingerprint {
        return Err(ApiError::IdempotencyKeyReused);
    }
    Reply::new(
        StatusCode::from_u16(previous.status).unwrap_or(StatusCode::CREATED),
        &previous.body,
    )
}

/// The tenant's webhooks, without their secrets.
#[endpoint(
    tags("webhooks"),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 200, description = "The live webhooks, oldest first", body = WebhookList),
        (status_code = 503, description = "The database did not answer in time", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_webhooks(depot: &mut Depot) -> Result<Reply, ApiError> {
    let state = state(depot)?;
    let tenant = &principal(depot)?.tenant;
    let webhooks = state.store.webhooks(tenant).await?;
    Reply::new(
        StatusCode::OK,
        &WebhookList {
            items: webhooks.iter().map(WebhookView::from).collect(),
        },
    )
}

/// Delete a webhook: nothing more is delivered to it, PENDING deliveries included.
///
/// Deleting it again is a 204 too (a retried DELETE succeeds); its deliveries are no
/// longer listed.
#[endpoint(
    tags("webhooks"),
    parameters(("webhook_id" = Uuid, Path, description = "Webhook id")),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 204, description = "Deleted (now or before)"),
        (status_code = 400, description = "Malformed UUID", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 404, description = "The tenant has no such webhook", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 503, description = "The database did not answer in time", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete_webhook(req: &mut Request, depot: &mut Depot) -> Result<NoContent, ApiError> {
    let state = state(depot)?;
    let webhook_id = input::path_uuid(req, "webhook_id", "webhookId")?;
    let tenant = &principal(depot)?.tenant;
    if state.store.delete_webhook(tenant, webhook_id).await? {
        Ok(NoContent)
    } else {
        Err(ApiError::WebhookNotFound(webhook_id))
    }
}

/// A webhook's deliveries, newest first: `status=failed` is the dead-letter list.
#[endpoint(
    tags("webhooks"),
    parameters(
        ("webhook_id" = Uuid, Path, description = "Webhook id"),
        ("status" = Option<DeliveryStatusFilter>, Query, description = "Only deliveries in this state"),
        ("limit" = Option<i64>, Query, description = "Page size from 1 to 200, default 50"),
        ("cursor" = Option<String>, Query, description = "nextCursor of the previous page"),
    ),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 200, description = "A page of deliveries", body = DeliveryPage),
        (status_code = 400, description = "Malformed UUID, cursor or status, or an unknown query parameter", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 404, description = "No such webhook", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 422, description = "limit outside 1..=200", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 503, description = "The database did not answer in time", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_deliveries(req: &mut Request, depot: &mut Depot) -> Result<Reply, ApiError> {
    let state = state(depot)?;
    let webhook_id = input::path_uuid(req, "webhook_id", "webhookId")?;
    // A misspelt filter (`state=failed`) must not silently list every delivery.
    const PARAMETERS: [&str; 3] = ["status", "limit", "cursor"];
    if let Some(unknown) = req
        .queries()
        .keys()
        .find(|name| !PARAMETERS.contains(&name.as_str()))
    {
        return Err(ApiError::MalformedRequest(format!(
            "unknown query parameter {unknown:?}; known: {}",
            PARAMETERS.join(", ")
        )));
    }
    let status = match req.query::<String>("status").as_deref() {
        None => None,
        Some("pending") => Some(DeliveryStatus::Pending),
        Some("delivered") => Some(DeliveryStatus::Delivered),
        Some("failed") => Some(DeliveryStatus::Failed),
        Some(other) => {
            return Err(ApiError::MalformedRequest(format!(
                "status must be pending, delivered or failed, got {other:?}"
            )));
        }
    };
    let limit = match req.query::<String>("limit") {
        None => DEFAULT_PAGE,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|limit| (1..=MAX_PAGE).contains(limit))
            .ok_or_else(|| {
                ApiError::Validation(format!("limit must be an integer between 1 and {MAX_PAGE}"))
            })?,
    };
    let before = req
        .query::<String>("cursor")
        .map(|cursor| decode_cursor(&cursor))
        .transpose()?;
    let tenant = &principal(depot)?.tenant;
    let deliveries = state
        .store
        .deliveries(tenant, webhook_id, status, before, limit + 1)
        .await?
        .ok_or(ApiError::WebhookNotFound(webhook_id))?;
    let has_more = deliveries.len() as i64 > limit;
    let items = deliveries
        .into_iter()
        .take(limit as usize)
        .map(DeliveryView::try_from)
        .collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if has_more {
        items
            .last()
            .map(|last| encode_cursor((last.created_at, last.delivery_id)))
    } else {
        None
    };
    Reply::new(StatusCode::OK, &DeliveryPage { items, next_cursor })
}

/// Send a FAILED delivery again: back to PENDING, due now, with a fresh retry window.
#[endpoint(
    tags("webhooks"),
    parameters(
        ("webhook_id" = Uuid, Path, description = "Webhook id"),
        ("delivery_id" = Uuid, Path, description = "Delivery id"),
    ),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 200, description = "The delivery, PENDING again", body = DeliveryView),
        (status_code = 400, description = "Malformed UUID", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 404, description = "No such webhook, or no such delivery of it", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 409, description = "The delivery is not FAILED; its status is in the body", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 503, description = "The database did not answer in time", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn retry_delivery(req: &mut Request, depot: &mut Depot) -> Result<Reply, ApiError> {
    let state = state(depot)?;
    let webhook_id = input::path_uuid(req, "webhook_id", "webhookId")?;
    let delivery_id = input::path_uuid(req, "delivery_id", "deliveryId")?;
    let tenant = &principal(depot)?.tenant;
    match state
        .store
        .retry_delivery(tenant, webhook_id, delivery_id, state.webhooks.retry_for)
        .await?
    {
        RetryDelivery::Retried(delivery) => {
            Reply::new(StatusCode::OK, &DeliveryView::try_from(*delivery)?)
        }
        RetryDelivery::NotFound => Err(ApiError::DeliveryNotFound(delivery_id)),
        RetryDelivery::NotFailed(status) => Err(ApiError::DeliveryNotFailed {
            delivery_id,
            status: status.as_str(),
        }),
    }
}

/// Opaque to clients: base64url of `wd1:<created_at µs>:<delivery id>`.
fn encode_cursor((at, id): DeliveryCursor) -> String {
    URL_SAFE_NO_PAD.encode(format!("wd1:{}:{id}", at.timestamp_micros()))
}

fn decode_cursor(cursor: &str) -> Result<DeliveryCursor, ApiError> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| {
            let (micros, id) = text.strip_prefix("wd1:")?.split_once(':')?;
            let at = DateTime::<Utc>::from_timestamp_micros(micros.parse().ok()?)?;
            Some((at, Uuid::try_parse(id).ok()?))
        })
        .ok_or_else(|| ApiError::MalformedRequest("cursor is not one this API returned".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        let at = DateTime::<Utc>::from_timestamp_micros(1_765_000_000_123_456).expect("time");
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor((at, id))).ok(), Some((at, id)));
        for foreign in ["", "!!", "bm9wZQ", &URL_SAFE_NO_PAD.encode("wd1:x:y")] {
            assert!(decode_cursor(foreign).is_err(), "{foreign}");
        }
    }
}
