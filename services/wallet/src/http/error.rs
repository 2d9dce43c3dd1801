//! The one error type of the public API and the one place that picks its HTTP status.

use salvo::http::header::{HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use salvo::oapi::{Components, EndpointOutRegister, Operation};
use salvo::prelude::*;
use uuid::Uuid;

use super::problem::Problem;
use super::views::OperationView;
use crate::auth::{AuthError, Scope};
use crate::domain::{HoldRecord, OperationRecord, OperationType};
use crate::store::StoreError;
use crate::submit::NotApplied;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("malformed request: {0}")]
    MalformedRequest(String),
    #[error("{0}")]
    InvalidUuid(String),
    #[error("{0}")]
    Validation(String),
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("wallet {0} not found")]
    WalletNotFound(Uuid),
    #[error("operation {operation_id} not found in wallet {wallet_id}")]
    OperationNotFound { wallet_id: Uuid, operation_id: Uuid },
    /// The rejected operation, recorded in the audit trail.
    #[error("insufficient funds")]
    InsufficientFunds(Box<OperationRecord>),
    #[error("balance limit exceeded")]
    BalanceLimitExceeded(Box<OperationRecord>),
    #[error("transfer {0} not found")]
    TransferNotFound(Uuid),
    #[error("hold {0} not found")]
    HoldNotFound(Uuid),
    /// A capture or void of a hold that is no longer ACTIVE; nothing was done.
    #[error("the hold is {}", .0.status.as_str())]
    HoldNotActive(Box<HoldRecord>),
    #[error("a capture of {captured} exceeds the hold's {}", .hold.amount)]
    CaptureExceedsHold {
        hold: Box<HoldRecord>,
        captured: rust_decimal::Decimal,
    },
    #[error("the new overdraft limit would leave less than nothing available")]
    LimitInUse(Uuid),
    #[error("wallet {0} did not exist yet at that point")]
    NoBalanceYet(Uuid),
    #[error("idempotency key reused with a different request")]
    IdempotencyKeyReused,
    /// An outbox cursor older than the retention: events after it may be gone.
    #[error("the cursor points before the oldest retained event")]
    CursorExpired,
    #[error("webhook {0} not found")]
    WebhookNotFound(Uuid),
    #[error("delivery {0} not found")]
    DeliveryNotFound(Uuid),
    /// Only a FAILED delivery can be retried.
    #[error("delivery {delivery_id} is {status}, not FAILED")]
    DeliveryNotFailed {
        delivery_id: Uuid,
        status: &'static str,
    },
    /// A webhook URL of a network the service must not reach into.
    #[error("{0}")]
    WebhookUrlNotAllowed(String),
    #[error("the tenant has {0} webhooks, the most it may have")]
    TooManyWebhooks(i64),
    /// Certainly not applied, now or later: the client may retry.
    #[error("not applied: {0}")]
    NotApplied(NotApplied),
    /// The outcome could not be found out in time. Never answered: the connection is
    /// closed instead, the one ambiguous outcome an Idempotency-Key resolves.
    #[error("the operation's outcome could not be found out in time")]
    OutcomeUnknown,
    /// The database did not answer in time; nothing was written.
    #[error("the database did not answer in time")]
    DatabaseUnavailable(#[source] StoreError),
    /// No token, or one that does not verify.
    #[error(transparent)]
    Unauthenticated(AuthError),
    #[error("the token lacks the scope {}", .0.as_str())]
    Forbidden(Scope),
    /// The tenant's token bucket for this kind of request is empty; not applied.
    #[error("rate limit exceeded; retry in {retry_after_seconds} s")]
    RateLimited { retry_after_seconds: u64 },
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::MissingScope(scope) => Self::Forbidden(scope),
            // The issuer's keys could not be fetched: the caller is not to blame.
            AuthError::KeysUnavailable(error) => Self::Unexpected(error.into()),
            error => Self::Unauthenticated(error),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unsettled(_) => {
                tracing::error!(error = %error, "a write's outcome is unknown");
                Self::OutcomeUnknown
            }
            error if error.is_transient() => Self::DatabaseUnavailable(error),
            error => Self::Unexpected(error.into()),
        }
    }
}

impl From<serde_json::Error> for ApiError {
    fn from(error: serde_json::Error) -> Self {
        Self::Unexpected(error.into())
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_) | Self::MalformedRequest(_) | Self::InvalidUuid(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::Validation(_)
            | Self::WebhookUrlNotAllowed(_)
            | Self::IdempotencyKeyReused
            | Self::BalanceLimitExceeded(_)
            | Self::CaptureExceedsHold { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::WalletNotFound(_)
            | Self::OperationNotFound { .. }
            | Self::TransferNotFound(_)
            | Self::HoldNotFound(_)
            | Self::NoBalanceYet(_)
            | Self::WebhookNotFound(_)
            | Self::DeliveryNotFound(_) => StatusCode::NOT_FOUND,
            Self::InsufficientFunds(_)
            | Self::HoldNotActive(_)
            | Self::LimitInUse(_)
            | Self::DeliveryNotFailed { .. }
            | Self::TooManyWebhooks(_) => StatusCode::CONFLICT,
            Self::CursorExpired => StatusCode::GONE,
            Self::NotApplied(_) | Self::DatabaseUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::OutcomeUnknown => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn problem(&self) -> Problem {
        let status = self.status();
        let detail = self.to_string();
        match self {
            Self::MalformedJson(_) => {
                Problem::new(status, "malformed-json", "Malformed JSON", detail)
            }
            Self::MalformedRequest(_) => {
                Problem::new(status, "malformed-request", "Malformed request", detail)
            }
            Self::InvalidUuid(_) => Problem::new(status, "invalid-uuid", "Invalid UUID", detail),
            Self::Validation(_) => Problem::new(
                status,
                "validation-failed",
                "Invalid request values",
                detail,
            ),
            Self::PayloadTooLarge(_) => Problem::new(
                status,
                "payload-too-large",
                "Request body too large",
                detail,
            ),
            Self::WalletNotFound(wallet_id) => {
                Problem::new(status, "wallet-not-found", "Wallet not found", detail)
                    .with("walletId", wallet_id.to_string())
            }
            Self::OperationNotFound { .. } => {
                Problem::new(status, "operation-not-found", "Operation not found", detail)
            }
            Self::InsufficientFunds(record) => rejected(
                Problem::new(
                    status,
                    "insufficient-funds",
                    "Insufficient funds",
                    format!(
                        "the available funds do not cover {} of {} (balance {}, held {})",
                        match record.operation_type {
                            OperationType::TransferOut => "a transfer",
                            OperationType::Hold => "a hold",
                            _ => "a withdrawal",
                        },
                        record.amount,
                        record.balance_after,
                        record.held_after
                    ),
                ),
                record,
            ),
            Self::TransferNotFound(transfer_id) => {
                Problem::new(status, "transfer-not-found", "Transfer not found", detail)
                    .with("transferId", transfer_id.to_string())
            }
            Self::HoldNotFound(hold_id) => {
                Problem::new(status, "hold-not-found", "Hold not found", detail)
                    .with("holdId", hold_id.to_string())
            }
            Self::HoldNotActive(hold) => Problem::new(
                status,
                "hold-not-active",
                "Hold not active",
                format!("{detail}; only an ACTIVE hold can be captured or voided"),
            )
            .with("holdId", hold.hold_id.to_string())
            .with("holdStatus", hold.status.as_str()),
            Self::CaptureExceedsHold { hold, .. } => Problem::new(
                status,
                "capture-exceeds-hold",
                "Capture exceeds the hold",
                detail,
            )
            .with("holdId", hold.hold_id.to_string()),
            Self::LimitInUse(wallet_id) => Problem::new(
                status,
                "limit-in-use",
                "Overdraft limit in use",
                format!("{detail}: the balance minus the held funds needs more of the limit"),
            )
            .with("walletId", wallet_id.to_string()),
            Self::NoBalanceYet(wallet_id) => Problem::new(
                status,
                "no-balance-at-that-point",
                "No balance at that point",
                detail,
            )
            .with("walletId", wallet_id.to_string()),
            Self::BalanceLimitExceeded(record) => rejected(
                Problem::new(
                    status,
                    "balance-limit-exceeded",
                    "Balance limit exceeded",
                    format!(
                        "a deposit of {} would take the balance past 999999999999999999.99",
                        record.amount
                    ),
                ),
                record,
            ),
            Self::WebhookNotFound(webhook_id) => {
                Problem::new(status, "webhook-not-found", "Webhook not found", detail)
                    .with("webhookId", webhook_id.to_string())
            }
            Self::DeliveryNotFound(delivery_id) => {
                Problem::new(status, "delivery-not-found", "Delivery not found", detail)
                    .with("deliveryId", delivery_id.to_string())
            }
            Self::DeliveryNotFailed {
                delivery_id,
                status: delivery_status,
            } => Problem::new(
                status,
                "delivery-not-failed",
                "Delivery not failed",
                format!("{detail}; only a FAILED delivery can be retried"),
            )
            .with("deliveryId", delivery_id.to_string())
            .with("deliveryStatus", *delivery_status),
            Self::WebhookUrlNotAllowed(_) => Problem::new(
                status,
                "webhook-url-not-allowed",
                "Webhook URL not allowed",
                detail,
            ),
            Self::TooManyWebhooks(_) => Problem::new(
                status,
                "too-many-webhooks",
                "Too many webhooks",
                format!("{detail}; delete one first"),
            ),
            Self::CursorExpired => Problem::new(
                status,
                "cursor-expired",
                "Cursor expired",
                format!("{detail}; start again without `after` (events may have been missed)"),
            ),
            Self::IdempotencyKeyReused => Problem::new(
                status,
                "idempotency-key-reused",
                "Idempotency key reused",
                "this Idempotency-Key was used before with a different request",
            ),
            Self::NotApplied(NotApplied::Overloaded) => Problem::new(
                status,
                "overloaded",
                "Overloaded",
                "too many operations are waiting; this one was not applied, retry later",
            ),
            Self::NotApplied(_) => Problem::new(
                status,
                "service-unavailable",
                "Service unavailable",
                "the wallet's owner could not take the operation in time; it was not applied, retry later",
            ),
            Self::DatabaseUnavailable(_) => Problem::new(
                status,
                "service-unavailable",
                "Service unavailable",
                "the database did not answer in time; nothing was written, retry later",
            ),
            Self::Unauthenticated(_) => {
                Problem::new(status, "unauthorized", "Unauthorized", detail)
            }
            Self::Forbidden(scope) => Problem::new(status, "forbidden", "Forbidden", detail)
                .with("requiredScope", scope.as_str()),
            Self::RateLimited { .. } => Problem::new(
                status,
                "rate-limited",
                "Too many requests",
                format!("{detail}; this request was not applied"),
            ),
            Self::OutcomeUnknown => Problem::new(
                status,
                "internal-error",
                "Internal error",
                "the request could not be completed",
            ),
            // Opaque on purpose: the full chain goes to the log, not to the client.
            Self::Unexpected(_) => Problem::new(
                status,
                "internal-error",
                "Internal error",
                "the request could not be completed",
            ),
        }
    }
}

/// A rejected operation's problem carries the operation itself, so a replay is identical.
fn rejected(problem: Problem, record: &OperationRecord) -> Problem {
    let view = OperationView::from(record);
    let mut problem = problem
        .with("operationId", view.operation_id.to_string())
        .with("walletId", view.wallet_id.to_string());
    if let Some(transfer_id) = view.transfer_id {
        problem = problem.with("transferId", transfer_id.to_string());
    }
    if let Some(hold_id) = view.hold_id {
        problem = problem.with("holdId", hold_id.to_string());
    }
    problem.with("operation", serde_json::to_value(&view).unwrap_or_default())
}

impl ApiError {
    /// Writes the answer, or for `OutcomeUnknown` closes the connection without one.
    fn respond(self, req: &mut Request, res: &mut Response, operation_id: Option<Uuid>) {
        if let Self::OutcomeUnknown = self {
            tracing::error!(
                operation_id = ?operation_id,
                "closing the connection without an answer: the operation's outcome is unknown"
            );
            if let Some(conn) = req.extensions().get::<salvo::ConnCtrl>() {
                conn.abort();
            }
        }
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = ?anyhow_chain(&self), status = status.as_u16(), "request failed");
        }
        match &self {
            Self::NotApplied(_) | Self::DatabaseUnavailable(_) => {
                res.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::RateLimited {
                retry_after_seconds,
            } => {
                res.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(*retry_after_seconds));
            }
            Self::Unauthenticated(error) => {
                res.headers_mut()
                    .insert(WWW_AUTHENTICATE, bearer_challenge(error));
            }
            Self::Forbidden(scope) => {
                let challenge = format!(
                    r#"Bearer realm="wallet", error="insufficient_scope", scope="{}""#,
                    scope.as_str()
                );
                if let Ok(value) = HeaderValue::from_str(&challenge) {
                    res.headers_mut().insert(WWW_AUTHENTICATE, value);
                }
            }
            _ => {}
        }
        let mut problem = self.problem();
        if let Some(operation_id) = operation_id {
            problem = problem.with_default("operationId", operation_id.to_string());
        }
        problem.write_to(res);
    }
}

#[async_trait]
impl Writer for ApiError {
    async fn write(self, req: &mut Request, _depot: &mut Depot, res: &mut Response) {
        self.respond(req, res, None);
    }
}

/// An error of `POST /api/v1/wallet`: every answer names the operation id the node
/// gave the request (a recorded operation's own id where there is one), so a client
/// can look it up.
#[derive(Debug)]
pub struct OperationError {
    pub error: ApiError,
    pub operation_id: Uuid,
}

#[async_trait]
impl Writer for OperationError {
    async fn write(self, req: &mut Request, _depot: &mut Depot, res: &mut Response) {
        self.error.respond(req, res, Some(self.operation_id));
    }
}

impl EndpointOutRegister for OperationError {
    fn register(_components: &mut Components, _operation: &mut Operation) {}
}

impl From<crate::routing::RoutingError> for ApiError {
    fn from(error: crate::routing::RoutingError) -> Self {
        match error {
            crate::routing::RoutingError::NotApplied { reason, .. } => Self::NotApplied(reason),
            crate::routing::RoutingError::Unresolved { .. } => Self::OutcomeUnknown,
        }
    }
}

/// Statuses are documented per endpoint with `responses(...)`.
impl EndpointOutRegister for ApiError {
    fn register(_components: &mut Components, _operation: &mut Operation) {}
}

/// RFC 6750: no `error` for a request without a token, `invalid_token` otherwise.
fn bearer_challenge(error: &AuthError) -> HeaderValue {
    match error {
        AuthError::Missing => HeaderValue::from_static(r#"Bearer realm="wallet""#),
        AuthError::Expired => HeaderValue::from_static(
            r#"Bearer realm="wallet", error="invalid_token", error_description="the token has expired""#,
        ),
        _ => HeaderValue::from_static(r#"Bearer realm="wallet", error="invalid_token""#),
    }
}

fn anyhow_chain(error: &ApiError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
