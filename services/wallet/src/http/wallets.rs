//! Public handlers: route → validate → owner's executor → answer.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use salvo::prelude::*;
use uuid::Uuid;

use super::error::{ApiError, OperationError};
use super::guard::{principal, require};
use super::problem::write_json;
use super::views::{
    CreateWalletRequest, OperationPage, OperationRequestDoc, OperationView, WalletView,
};
use super::{AppState, input};
use crate::auth::{Scope, Tenant};
use crate::domain::{
    Action, CommandOutcome, Deadline, OperationCommand, OperationRecord, OperationStatus,
    OperationType, RejectionReason,
};

const JSON: &str = "application/json";
const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 200;

/// A success response whose status and body were decided by the handler.
pub(super) struct Reply {
    status: StatusCode,
    body: serde_json::Value,
}

impl Reply {
    pub(super) fn new(status: StatusCode, body: &impl serde::Serialize) -> Result<Self, ApiError> {
        let body = serde_json::to_value(body)?;
        Ok(Self { status, body })
    }
}

#[async_trait]
impl Writer for Reply {
    async fn write(self, _req: &mut Request, _depot: &mut Depot, res: &mut Response) {
        write_json(res, self.status, JSON, &self.body);
    }
}

impl salvo::oapi::EndpointOutRegister for Reply {
    fn register(
        _components: &mut salvo::oapi::Components,
        _operation: &mut salvo::oapi::Operation,
    ) {
    }
}

pub(super) fn state(depot: &Depot) -> Result<&AppState, ApiError> {
    depot.get_typed::<AppState>().map_err(|_| {
        ApiError::Unexpected(anyhow::anyhow!("application state missing from the depot"))
    })
}

/// Create a wallet with a zero balance.
#[endpoint(
    tags("wallets"),
    request_body(content = Option<CreateWalletRequest>, description = "Optional, empty object"),
    parameters(("Idempotency-Key" = Option<String>, Header, description = "Replays return the first answer")),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; not applied, Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 201, description = "Wallet created", body = WalletView),
        (status_code = 400, description = "Malformed JSON or header", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 413, description = "Body too large", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 422, description = "Unknown fields or a reused key", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_wallet(req: &mut Request, depot: &mut Depot) -> Result<Reply, ApiError> {
    let state = state(depot)?;
    let tenant = &principal(depot)?.tenant;
    let key = input::idempotency_key(req)?;
    if let Some(bytes) = input::body(req, state.max_body_bytes).await? {
        let _: CreateWalletRequest = input::json(&bytes)?;
    }
    let wallet_id = Uuid::now_v7();
    let body = serde_json::to_value(WalletView::empty(wallet_id))?;
    // Creation has no parameters, so every request with the key is "the same request".
    const CREATE_FINGERPRINT: &str = "create-wallet:v1";
    let stored = state
        .store
        .create_wallet(
            tenant,
            wallet_id,
            key.as_deref().map(|key| (key, CREATE_FINGERPRINT)),
            &body,
            // Within the handler's bound, as a write's resolution is.
            tokio::time::Instant::now() + state.request_deadline,
        )
        .await?;
    match stored {
        None => Ok(Reply {
            status: StatusCode::CREATED,
            body,
        }),
        Some(previous) if previous.request_hash == CREATE_FINGERPRINT => Ok(Reply {
            status: StatusCode::from_u16(previous.status).unwrap_or(StatusCode::CREATED),
            body: previous.body,
        }),
        Some(_) => Err(ApiError::IdempotencyKeyReused),
    }
}

/// Read a wallet's balance, held funds, overdraft limit and what is available.
///
/// Answered from the owner's memory (its committed state, updated before any write is
/// acknowledged), here or one coalesced internal request away; from PostgreSQL when the
/// owner cannot say. Either way every acknowledged operation is in the answer.
#[endpoint(
    tags("wallets"),
    parameters(("wallet_id" = Uuid, Path, description = "Wallet id")),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; not applied, Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 200, description = "The wallet", body = WalletView),
        (status_code = 400, description = "Malformed UUID", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 404, description = "No such wallet", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_wallet(req: &mut Request, depot: &mut Depot) -> Result<Reply, ApiError> {
    let state = state(depot)?;
    let tenant = &principal(depot)?.tenant;
    let wallet_id = input::path_uuid(req, "wallet_id", "walletId")?;
    let wallet = match state.router.read_wallet(tenant, wallet_id).await {
        Some(wallet) => wallet,
        None => state.store.wallet(tenant, wallet_id).await?,
    };
    let wallet = wallet.ok_or(ApiError::WalletNotFound(wallet_id))?;
    Reply::new(StatusCode::OK, &WalletView::new(wallet_id, &wallet))
}

/// Deposit into or withdraw from a wallet.
///
/// Answered after the operation is committed. A withdrawal the balance does not cover is
/// recorded as REJECTED (reason INSUFFICIENT_FUNDS) and answered 409. Every 5xx means
/// the operation was not applied and never will be; every answer carries `operationId`.
#[endpoint(
    tags("operations"),
    request_body = OperationRequestDoc,
    parameters(("Idempotency-Key" = Option<String>, Header, description = "Replays return the first answer; the same key with another body is 422")),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; not applied, Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 200, description = "Operation applied", body = OperationView),
        (status_code = 400, description = "Malformed JSON or UUID", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 404, description = "No such wallet", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 409, description = "Insufficient funds; the rejection is recorded", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 413, description = "Body too large", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 422, description = "Invalid values, or a reused key", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 503, description = "Not applied, now or later (overloaded, or no owner took it before its deadline); Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn post_operation(req: &mut Request, depot: &mut Depot) -> Result<Reply, OperationError> {
    // Chosen first, so that every answer, even a refusal of the input, can name it.
    let operation_id = Uuid::now_v7();
    operate(req, depot, operation_id)
        .await
        .map_err(|error| OperationError {
            error,
            operation_id,
        })
}

async fn operate(
    req: &mut Request,
    depot: &mut Depot,
    operation_id: Uuid,
) -> Result<Reply, ApiError> {
    let state = state(depot)?;
    let key = input::idempotency_key(req)?;
    let bytes = input::body(req, state.max_body_bytes)
        .await?
        .ok_or_else(|| ApiError::MalformedJson("the request body is empty".to_owned()))?;
    let request = input::operation(&bytes)?;
    let caller = principal(depot)?;
    require(
        caller,
        match request.operation_type {
            OperationType::Withdraw => Scope::WalletsWithdraw,
            // input::operation reads DEPOSIT or WITHDRAW only.
            _ => Scope::WalletsDeposit,
        },
    )?;
    let action = match request.operation_type {
        OperationType::Withdraw => Action::Withdraw {
            amount: request.amount,
        },
        _ => Action::Deposit {
            amount: request.amount,
        },
    };
    let command = command(
        state,
        &caller.tenant,
        request.wallet_id,
        operation_id,
        action,
        key,
    );
    let wallet_id = command.wallet_id;
    let outcome = state.router.execute(command).await?;
    match outcome {
        CommandOutcome::Recorded(record) => recorded(record),
        CommandOutcome::WalletNotFound => Err(ApiError::WalletNotFound(wallet_id)),
        CommandOutcome::IdempotencyKeyReused => Err(ApiError::IdempotencyKeyReused),
        other => Err(ApiError::Unexpected(anyhow::anyhow!(
            "unexpected outcome {other:?}"
        ))),
    }
}

/// A command for `wallet_id` from a request of `tenant`, to be planned within the
/// request deadline.
pub(super) fn command(
    state: &AppState,
    tenant: &Tenant,
    wallet_id: Uuid,
    operation_id: Uuid,
    action: Action,
    idempotency_key: Option<String>,
) -> OperationCommand {
    OperationCommand::new(
        operation_id,
        tenant.clone(),
        wallet_id,
        action,
        idempotency_key,
        Deadline::after(state.request_deadline),
    )
}

/// The answer for a recorded operation depends only on the row, so replays are identical.
fn recorded(record: OperationRecord) -> Result<Reply, ApiError> {
    match record.status {
        OperationStatus::Applied => Reply::new(StatusCode::OK, &OperationView::from(&record)),
        OperationStatus::Rejected => Err(recorded_rejection(record)),
    }
}

/// The problem of a REJECTED row, which carries the row.
pub(super) fn recorded_rejection(record: OperationRecord) -> ApiError {
    match record.reason {
        Some(RejectionReason::BalanceLimitExceeded) => {
            ApiError::BalanceLimitExceeded(Box::new(record))
        }
        _ => ApiError::InsufficientFunds(Box::new(record)),
    }
}

/// A wallet's operations, newest first, with a cursor that stays stable while new ones arrive.
#[endpoint(
    tags("operations"),
    parameters(
        ("wallet_id" = Uuid, Path, description = "Wallet id"),
        ("limit" = Option<i64>, Query, description = "Page size from 1 to 200, default 50"),
        ("cursor" = Option<String>, Query, description = "nextCursor of the previous page"),
    ),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; not applied, Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 200, description = "A page of operations", body = OperationPage),
        (status_code = 400, description = "Malformed UUID or cursor", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 404, description = "No such wallet", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 422, description = "limit outside 1..=200", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_operations(req: &mut Request, depot: &mut Depot) -> Result<Reply, ApiError> {
    let state = state(depot)?;
    let wallet_id = input::path_uuid(req, "wallet_id", "walletId")?;
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
    let store = &state.store;
    if store.wallet(tenant, wallet_id).await?.is_none() {
        return Err(ApiError::WalletNotFound(wallet_id));
    }
    let records = store.operations_page(wallet_id, before, limit + 1).await?;
    let has_more = records.len() as i64 > limit;
    let items: Vec<OperationView> = records
        .iter()
        .take(limit as usize)
        .map(OperationView::from)
        .collect();
    let next_cursor = if has_more {
        items.last().map(|last| encode_cursor(last.sequence))
    } else {
        None
    };
    Reply::new(StatusCode::OK, &OperationPage { items, next_cursor })
}

/// One operation of a wallet.
#[endpoint(
    tags("operations"),
    parameters(
        ("wallet_id" = Uuid, Path, description = "Wallet id"),
        ("operation_id" = Uuid, Path, description = "Operation id"),
    ),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; not applied, Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 200, description = "The operation", body = OperationView),
        (status_code = 400, description = "Malformed UUID", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 404, description = "No such operation in this wallet", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_operation(req: &mut Request, depot: &mut Depot) -> Result<Reply, ApiError> {
    let state = state(depot)?;
    let wallet_id = input::path_uuid(req, "wallet_id", "walletId")?;
    let operation_id = input::path_uuid(req, "operation_id", "operationId")?;
    let tenant = &principal(depot)?.tenant;
    let record = state
        .store
        .operation(tenant, wallet_id, operation_id)
        .await?
        .ok_or(ApiError::OperationNotFound {
            wallet_id,
            operation_id,
        })?;
    Reply::new(StatusCode::OK, &OperationView::from(&record))
}

fn encode_cursor(sequence: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("seq:{sequence}"))
}

fn decode_cursor(cursor: &str) -> Result<i64, ApiError> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| text.strip_prefix("seq:")?.parse::<i64>().ok())
        .filter(|sequence| *sequence > 0)
        .ok_or_else(|| ApiError::MalformedRequest("cursor is not one this API returned".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        assert_eq!(decode_cursor(&encode_cursor(42)).ok(), Some(42));
        assert!(decode_cursor("bm9wZQ").is_err());
        assert!(decode_cursor("!!").is_err());
    }
}
