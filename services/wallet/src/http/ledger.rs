//! Transfers, holds, overdraft limits and point-in-time balances: validated here, run
//! by the owner of the wallet's shard like every other write.

use chrono::DateTime;
use salvo::prelude::*;
use uuid::Uuid;

use super::AppState;
use super::error::ApiError;
use super::guard::principal;
use super::input;
use super::views::{
    BalanceAtView, CaptureRequestDoc, HoldRequestDoc, HoldView, TransferRequestDoc, TransferView,
    WalletPatchDoc, WalletView,
};
use super::wallets::{Reply, command, recorded_rejection, state};
use crate::auth::Tenant;
use crate::domain::{
    Action, Amount, CommandOutcome, Deadline, HoldRecord, HoldStatus, OperationStatus,
    TransferStatus, transfer_credit_id,
};
use crate::store::{PastBalance, PointInTime};

/// The answer to a command that must have been recorded (not refused or missing).
fn unexpected(outcome: CommandOutcome) -> ApiError {
    ApiError::Unexpected(anyhow::anyhow!("unexpected outcome {outcome:?}"))
}

/// Move money from one wallet of the tenant to another, on any owner.
///
/// The debit and the transfer's intent commit together on the source's owner; the
/// credit is then applied exactly once by the destination's owner. The answer waits a
/// short bounded time for the credit: POSTED when both legs are committed, PENDING when
/// the credit is recorded and will be applied (the destination's owner finishes it).
#[endpoint(
    tags("transfers"),
    request_body = TransferRequestDoc,
    parameters(("Idempotency-Key" = Option<String>, Header, description = "Replays return the transfer; the same key with another body is 422")),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; not applied, Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 200, description = "POSTED, or PENDING (debited, the credit will follow)", body = TransferView),
        (status_code = 400, description = "Malformed JSON or UUID", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 404, description = "Either wallet does not exist", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 409, description = "Insufficient funds; recorded as REJECTED, transferId in the body", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 413, description = "Body too large", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 422, description = "Same wallet at both ends, invalid amount, or a reused key", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 503, description = "Not applied, now or later; Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn post_transfer(req: &mut Request, depot: &mut Depot) -> Result<Reply, ApiError> {
    let state = state(depot)?;
    let key = input::idempotency_key(req)?;
    let bytes = input::body(req, state.max_body_bytes)
        .await?
        .ok_or_else(|| ApiError::MalformedJson("the request body is empty".to_owned()))?;
    let request = input::transfer(&bytes)?;
    let tenant = &principal(depot)?.tenant;
    // Wallets are never deleted: a destination that exists now exists at the credit.
    if !state
        .store
        .wallet_exists(tenant, request.to_wallet_id)
        .await?
    {
        return Err(ApiError::WalletNotFound(request.to_wallet_id));
    }
    let action = Action::TransferOut {
        to_wallet_id: request.to_wallet_id,
        to_shard: state.router.shard_of(&request.to_wallet_id),
        amount: request.amount,
    };
    let debit_id = Uuid::now_v7();
    let debit = command(state, tenant, request.from_wallet_id, debit_id, action, key);
    let record = match state.router.execute(debit).await? {
        CommandOutcome::Recorded(record) => record,
        CommandOutcome::WalletNotFound => {
            return Err(ApiError::WalletNotFound(request.from_wallet_id));
        }
        CommandOutcome::IdempotencyKeyReused => return Err(ApiError::IdempotencyKeyReused),
        other => return Err(unexpected(other)),
    };
    if record.status == OperationStatus::Rejected {
        return Err(recorded_rejection(record));
    }
    let transfer_id = record.transfer_id.unwrap_or(record.operation_id);
    // A replay of an earlier transfer (found by its key) may have had its credit already.
    let replay = record.operation_id != debit_id;
    let status = post_credit(
        state,
        tenant,
        transfer_id,
        request.from_wallet_id,
        request.to_wallet_id,
        request.amount,
        replay,
    )
    .await;
    Reply::new(
        StatusCode::OK,
        &TransferView {
            transfer_id,
            from_wallet_id: request.from_wallet_id,
            to_wallet_id: request.to_wallet_id,
            amount: record.amount,
            status,
            created_at: record.created_at,
        },
    )
}

/// The fast path of a transfer's credit, bounded by the credit wait. Anything short of
/// a committed credit leaves the transfer PENDING for the destination owner's sweep.
///
/// The credit of a transfer just debited cannot exist yet (the sweep waits longer than
/// this path's deadline before it sends one), so it is not looked up first; should one
/// exist all the same, the transfer is no longer PENDING and the commit refuses it
/// (`CommitError::StaleLedger`), after which the retry looks it up.
async fn post_credit(
    state: &AppState,
    tenant: &Tenant,
    transfer_id: Uuid,
    from_wallet_id: Uuid,
    to_wallet_id: Uuid,
    amount: Amount,
    may_exist: bool,
) -> TransferStatus {
    let action = Action::TransferIn {
        transfer_id,
        from_wallet_id,
        amount,
    };
    let mut credit = command(
        state,
        tenant,
        to_wallet_id,
        transfer_credit_id(transfer_id),
        action,
        None,
    );
    credit.deadline = Deadline::after(state.transfer_credit_wait);
    credit.may_exist = may_exist;
    match state.router.execute(credit).await {
        Ok(CommandOutcome::Recorded(_)) => TransferStatus::Posted,
        Ok(other) => {
            tracing::warn!(%transfer_id, outcome = ?other, "a transfer's credit was refused; it stays PENDING");
            TransferStatus::Pending
        }
        Err(error) => {
            tracing::debug!(%transfer_id, error = %error, "a transfer's credit is left to the sweep");
            TransferStatus::Pending
        }
    }
}

/// One transfer of the tenant.
#[endpoint(
    tags("transfers"),
    parameters(("transfer_id" = Uuid, Path, description = "Transfer id")),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; not applied, Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 200, description = "The transfer", body = TransferView),
        (status_code = 400, description = "Malformed UUID", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 404, description = "No such transfer", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_transfer(req: &mut Request, depot: &mut Depot) -> Result<Reply, ApiError> {
    let state = state(depot)?;
    let transfer_id = input::path_uuid(req, "transfer_id", "transferId")?;
    let tenant = &principal(depot)?.tenant;
    let transfer = state
        .store
        .transfer(tenant, transfer_id)
        .await?
        .ok_or(ApiError::TransferNotFound(transfer_id))?;
    Reply::new(StatusCode::OK, &TransferView::from(&transfer))
}

/// Reserve funds of a wallet.
///
/// The hold counts against `available` at once; capture takes it (or part of it), void
/// or expiry gives it back. A hold `available` does not cover is recorded as REJECTED
/// and answered 409.
#[endpoint(
    tags("holds"),
    request_body = HoldRequestDoc,
    parameters(
        ("wallet_id" = Uuid, Path, description = "Wallet id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Replays return the first answer; the same key with another body is 422"),
    ),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; not applied, Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 201, description = "The hold, ACTIVE", body = HoldView),
        (status_code = 400, description = "Malformed JSON or UUID", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 404, description = "No such wallet", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 409, description = "Insufficient available funds; recorded as REJECTED, holdId in the body", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 413, description = "Body too large", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 422, description = "Invalid amount, an expiry in the past, or a reused key", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 503, description = "Not applied, now or later; Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_hold(req: &mut Request, depot: &mut Depot) -> Result<Reply, ApiError> {
    let state = state(depot)?;
    let wallet_id = input::path_uuid(req, "wallet_id", "walletId")?;
    let key = input::idempotency_key(req)?;
    let bytes = input::body(req, state.max_body_bytes)
        .await?
        .ok_or_else(|| ApiError::MalformedJson("the request body is empty".to_owned()))?;
    let request = input::hold(&bytes)?;
    let tenant = &principal(depot)?.tenant;
    let action = Action::Hold {
        amount: request.amount,
        expires_at: request.expires_at,
    };
    let hold = command(state, tenant, wallet_id, Uuid::now_v7(), action, key);
    let record = match state.router.execute(hold).await? {
        CommandOutcome::Recorded(record) => record,
        CommandOutcome::WalletNotFound => return Err(ApiError::WalletNotFound(wallet_id)),
        CommandOutcome::IdempotencyKeyReused => return Err(ApiError::IdempotencyKeyReused),
        other => return Err(unexpected(other)),
    };
    if record.status == OperationStatus::Rejected {
        return Err(recorded_rejection(record));
    }
    let hold_id = record.hold_id.unwrap_or(record.operation_id);
    state.store.remember_hold(hold_id, tenant, wallet_id);
    Reply::new(
        StatusCode::CREATED,
        &HoldView {
            hold_id,
            wallet_id,
            amount: record.amount,
            captured_amount: rust_decimal::Decimal::new(0, 2),
            status: HoldStatus::Active,
            expires_at: request.expires_at,
            created_at: record.created_at,
        },
    )
}

/// Runs a capture or void of `hold_id` on its wallet's owner.
async fn settle(
    req: &mut Request,
    depot: &mut Depot,
    action: impl FnOnce(Uuid, Option<&[u8]>) -> Result<Action, ApiError>,
) -> Result<Reply, ApiError> {
    let state = state(depot)?;
    let hold_id = input::path_uuid(req, "hold_id", "holdId")?;
    let key = input::idempotency_key(req)?;
    let bytes = input::body(req, state.max_body_bytes).await?;
    let action = action(hold_id, bytes.as_deref())?;
    let tenant = &principal(depot)?.tenant;
    // A hold never changes wallets: where it is now is where it was created.
    let wallet_id = state
        .store
        .hold_wallet(tenant, hold_id)
        .await?
        .ok_or(ApiError::HoldNotFound(hold_id))?;
    let settle = command(state, tenant, wallet_id, Uuid::now_v7(), action, key);
    match state.router.execute(settle).await? {
        CommandOutcome::Hold(hold) => Reply::new(StatusCode::OK, &HoldView::from(&hold)),
        // A replay of an earlier capture or void: the hold as it is now.
        CommandOutcome::Recorded(_) => {
            let hold: HoldRecord = state
                .store
                .hold(tenant, hold_id)
                .await?
                .ok_or(ApiError::HoldNotFound(hold_id))?;
            Reply::new(StatusCode::OK, &HoldView::from(&hold))
        }
        CommandOutcome::HoldNotActive(hold) => Err(ApiError::HoldNotActive(Box::new(hold))),
        CommandOutcome::CaptureExceedsHold(hold) => {
            let captured = match input::capture(bytes.as_deref()) {
                Ok(Some(amount)) => amount.value(),
                _ => hold.amount,
            };
            Err(ApiError::CaptureExceedsHold {
                hold: Box::new(hold),
                captured,
            })
        }
        CommandOutcome::HoldNotFound | CommandOutcome::WalletNotFound => {
            Err(ApiError::HoldNotFound(hold_id))
        }
        CommandOutcome::IdempotencyKeyReused => Err(ApiError::IdempotencyKeyReused),
        other => Err(unexpected(other)),
    }
}

/// Take a hold: all of it, or `amount` of it and release the rest.
///
/// Of any number of concurrent captures and voids of one hold, exactly one succeeds;
/// the others get 409 with the hold's status.
#[endpoint(
    tags("holds"),
    request_body(content = Option<CaptureRequestDoc>, description = "Optional: the amount to capture, at most the hold's"),
    parameters(
        ("hold_id" = Uuid, Path, description = "Hold id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Replays return the hold"),
    ),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; not applied, Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 200, description = "The hold, CAPTURED", body = HoldView),
        (status_code = 400, description = "Malformed JSON or UUID", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 404, description = "No such hold", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 409, description = "The hold is no longer ACTIVE; its status is in the body", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 413, description = "Body too large", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 422, description = "Invalid amount, above the hold's, or a reused key", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 503, description = "Not applied, now or later; Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn capture_hold(req: &mut Request, depot: &mut Depot) -> Result<Reply, ApiError> {
    settle(req, depot, |hold_id, bytes| {
        Ok(Action::Capture {
            hold_id,
            amount: input::capture(bytes)?,
        })
    })
    .await
}

/// Release a hold in full.
#[endpoint(
    tags("holds"),
    parameters(
        ("hold_id" = Uuid, Path, description = "Hold id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Replays return the hold"),
    ),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; not applied, Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 200, description = "The hold, VOIDED", body = HoldView),
        (status_code = 400, description = "Malformed JSON or UUID", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 404, description = "No such hold", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 409, description = "The hold is no longer ACTIVE; its status is in the body", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 413, description = "Body too large", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 422, description = "A body with fields, or a reused key", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 503, description = "Not applied, now or later; Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn void_hold(req: &mut Request, depot: &mut Depot) -> Result<Reply, ApiError> {
    settle(req, depot, |hold_id, bytes| {
        input::void(bytes)?;
        Ok(Action::Void { hold_id })
    })
    .await
}

/// One hold of the tenant.
#[endpoint(
    tags("holds"),
    parameters(("hold_id" = Uuid, Path, description = "Hold id")),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; not applied, Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 200, description = "The hold", body = HoldView),
        (status_code = 400, description = "Malformed UUID", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 404, description = "No such hold", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_hold(req: &mut Request, depot: &mut Depot) -> Result<Reply, ApiError> {
    let state = state(depot)?;
    let hold_id = input::path_uuid(req, "hold_id", "holdId")?;
    let tenant = &principal(depot)?.tenant;
    let hold = state
        .store
        .hold(tenant, hold_id)
        .await?
        .ok_or(ApiError::HoldNotFound(hold_id))?;
    Reply::new(StatusCode::OK, &HoldView::from(&hold))
}

/// Set a wallet's overdraft limit: how far below zero its balance may go.
///
/// Recorded in the wallet's history as an OVERDRAFT_LIMIT row. A limit lower than the
/// wallet already uses is refused with 409.
#[endpoint(
    tags("wallets"),
    request_body = WalletPatchDoc,
    parameters(
        ("wallet_id" = Uuid, Path, description = "Wallet id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Replays return the first answer"),
    ),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; not applied, Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 200, description = "The wallet with its new limit", body = WalletView),
        (status_code = 400, description = "Malformed JSON or UUID", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 404, description = "No such wallet", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 409, description = "The wallet uses more of its limit than the new one allows", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 413, description = "Body too large", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 422, description = "A negative or over-precise limit, or a reused key", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 503, description = "Not applied, now or later; Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn patch_wallet(req: &mut Request, depot: &mut Depot) -> Result<Reply, ApiError> {
    let state = state(depot)?;
    let wallet_id = input::path_uuid(req, "wallet_id", "walletId")?;
    let key = input::idempotency_key(req)?;
    let bytes = input::body(req, state.max_body_bytes)
        .await?
        .ok_or_else(|| ApiError::MalformedJson("the request body is empty".to_owned()))?;
    let limit = input::overdraft_limit(&bytes)?;
    let tenant = &principal(depot)?.tenant;
    let action = Action::SetOverdraftLimit { limit };
    let patch = command(state, tenant, wallet_id, Uuid::now_v7(), action, key);
    match state.router.execute(patch).await? {
        CommandOutcome::Recorded(record) => {
            Reply::new(StatusCode::OK, &WalletView::after_limit(&record))
        }
        CommandOutcome::LimitInUse => Err(ApiError::LimitInUse(wallet_id)),
        CommandOutcome::WalletNotFound => Err(ApiError::WalletNotFound(wallet_id)),
        CommandOutcome::IdempotencyKeyReused => Err(ApiError::IdempotencyKeyReused),
        other => Err(unexpected(other)),
    }
}

/// What a wallet held at a point of its history, read from the audit trail.
///
/// Exactly one of `asOf` (RFC 3339) and `sequence`: the balance and held funds right
/// after the last operation at or before it.
#[endpoint(
    tags("wallets"),
    parameters(
        ("wallet_id" = Uuid, Path, description = "Wallet id"),
        ("asOf" = Option<String>, Query, description = "An RFC 3339 time, e.g. 2026-12-07T10:00:00Z"),
        ("sequence" = Option<i64>, Query, description = "A sequence number of the wallet's history, 0 or more"),
    ),
    responses(
        (status_code = 401, description = "No bearer token, or one that does not verify", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 403, description = "The token lacks the scope", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 429, description = "The tenant's rate limit; not applied, Retry-After says when to retry", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 200, description = "The balance then", body = BalanceAtView),
        (status_code = 400, description = "Malformed UUID", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 404, description = "No such wallet, or not yet at that time", body = super::problem::Problem, content_type = "application/problem+json"),
        (status_code = 422, description = "Neither or both of asOf and sequence, or an invalid one", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn balance_at(req: &mut Request, depot: &mut Depot) -> Result<Reply, ApiError> {
    let state = state(depot)?;
    let wallet_id = input::path_uuid(req, "wallet_id", "walletId")?;
    let as_of = req.query::<String>("asOf");
    let sequence = req.query::<String>("sequence");
    let point = match (as_of, sequence) {
        (Some(text), None) => PointInTime::At(
            DateTime::parse_from_rfc3339(&text)
                .map_err(|_| {
                    ApiError::Validation(format!(
                        "asOf must be an RFC 3339 time such as 2026-12-07T10:00:00Z, got {text:?}"
                    ))
                })?
                .with_timezone(&chrono::Utc),
        ),
        (None, Some(text)) => PointInTime::Sequence(
            text.parse::<i64>()
                .ok()
                .filter(|sequence| *sequence >= 0)
                .ok_or_else(|| {
                    ApiError::Validation(format!(
                        "sequence must be an integer of 0 or more, got {text:?}"
                    ))
                })?,
        ),
        _ => {
            return Err(ApiError::Validation(
                "give exactly one of asOf and sequence".to_owned(),
            ));
        }
    };
    let tenant = &principal(depot)?.tenant;
    match state.store.balance_at(tenant, wallet_id, point).await? {
        PastBalance::At(at) => Reply::new(StatusCode::OK, &BalanceAtView::new(wallet_id, &at)),
        PastBalance::NotYet => Err(ApiError::NoBalanceYet(wallet_id)),
        PastBalance::NoWallet => Err(ApiError::WalletNotFound(wallet_id)),
    }
}
