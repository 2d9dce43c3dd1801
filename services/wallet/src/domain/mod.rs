//! The wallet's vocabulary: amounts, operation types and recorded operations.

mod amount;
mod ledger;

pub use amount::{Amount, AmountError, MAX_BALANCE};
pub use ledger::{
    Action, HoldRecord, HoldStatus, TransferRecord, TransferStatus, transfer_credit_id,
};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, salvo::oapi::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OperationType {
    Deposit,
    Withdraw,
    /// The debit of a transfer, on its source wallet.
    TransferOut,
    /// The credit of a transfer, on its destination wallet.
    TransferIn,
    /// Funds reserved: `held` and `available` change, the balance does not.
    Hold,
    /// Held funds taken: the balance and `held` drop by the captured amount.
    Capture,
    /// Held funds given back (void, expiry, or the rest of a partial capture).
    Release,
    /// The wallet's overdraft limit was set; `amount` is the new limit.
    OverdraftLimit,
}

impl OperationType {
    pub const ALL: [Self; 8] = [
        Self::Deposit,
        Self::Withdraw,
        Self::TransferOut,
        Self::TransferIn,
        Self::Hold,
        Self::Capture,
        Self::Release,
        Self::OverdraftLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deposit => "DEPOSIT",
            Self::Withdraw => "WITHDRAW",
            Self::TransferOut => "TRANSFER_OUT",
            Self::TransferIn => "TRANSFER_IN",
            Self::Hold => "HOLD",
            Self::Capture => "CAPTURE",
            Self::Release => "RELEASE",
            Self::OverdraftLimit => "OVERDRAFT_LIMIT",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == value)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, salvo::oapi::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OperationStatus {
    Applied,
    Rejected,
}

impl OperationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "APPLIED",
            Self::Rejected => "REJECTED",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "APPLIED" => Some(Self::Applied),
            "REJECTED" => Some(Self::Rejected),
            _ => None,
        }
    }
}

/// Why an operation was recorded without changing the balance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, salvo::oapi::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RejectionReason {
    InsufficientFunds,
    BalanceLimitExceeded,
}

impl RejectionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InsufficientFunds => "INSUFFICIENT_FUNDS",
            Self::BalanceLimitExceeded => "BALANCE_LIMIT_EXCEEDED",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "INSUFFICIENT_FUNDS" => Some(Self::InsufficientFunds),
            "BALANCE_LIMIT_EXCEEDED" => Some(Self::BalanceLimitExceeded),
            _ => None,
        }
    }
}

/// A validated request to change a wallet's balance, as it travels to the shard owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
// No deny_unknown_fields: serde does not support it next to `flatten`.
#[serde(rename_all = "camelCase")]
pub struct OperationCommand {
    /// Chosen by the node that took the request and kept across retries, so a retry
    /// after an ambiguous failure finds the operation instead of applying it twice.
    pub operation_id: Uuid,
    /// The caller's tenant: a wallet of another tenant is "not found".
    pub tenant: crate::auth::Tenant,
    /// The wallet the command changes; its shard's owner runs it.
    pub wallet_id: Uuid,
    /// What to do. On the wire DEPOSIT and WITHDRAW keep the form of earlier builds
    /// (`operationType`, `amount`), so nodes of both versions forward to each other.
    #[serde(flatten)]
    pub action: Action,
    pub idempotency_key: Option<String>,
    /// Fingerprint of the request body, to tell a replay from a key reused for another request.
    pub request_hash: String,
    /// The command must be planned before this moment or not at all.
    pub deadline: Deadline,
    /// Set once an earlier attempt may have been committed: the owner then looks the
    /// operation id up before anything else, so the retry finds it instead of applying
    /// it twice, and an expired command is only reported as not applied after that look-up.
    #[serde(default)]
    pub may_exist: bool,
}

impl OperationCommand {
    /// A first attempt at `action` on `wallet_id`, fingerprinted for its idempotency key.
    pub fn new(
        operation_id: Uuid,
        tenant: crate::auth::Tenant,
        wallet_id: Uuid,
        action: Action,
        idempotency_key: Option<String>,
        deadline: Deadline,
    ) -> Self {
        Self {
            operation_id,
            tenant,
            wallet_id,
            request_hash: action.fingerprint(wallet_id),
            action,
            idempotency_key,
            deadline,
            may_exist: false,
        }
    }
}

/// The moment after which a command is no longer planned, as Unix milliseconds.
///
/// Wall-clock time, so that it means the same on every node a command passes through
/// however long it was delayed on the way (node clocks are assumed to agree to well
/// under a second, as NTP keeps them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Deadline(u64);

impl Deadline {
    pub fn after(budget: std::time::Duration) -> Self {
        Self(unix_millis().saturating_add(budget.as_millis() as u64))
    }

    pub fn has_passed(self) -> bool {
        unix_millis() >= self.0
    }

    /// Time left until the deadline, zero once it has passed.
    pub fn remaining(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0.saturating_sub(unix_millis()))
    }
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

/// One row of the audit trail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationRecord {
    pub operation_id: Uuid,
    pub wallet_id: Uuid,
    pub seq: i64,
    pub operation_type: OperationType,
    pub amount: Decimal,
    pub status: OperationStatus,
    pub reason: Option<RejectionReason>,
    pub balance_after: Decimal,
    /// Funds held right after this operation.
    #[serde(default)]
    pub held_after: Decimal,
    #[serde(default)]
    pub transfer_id: Option<Uuid>,
    #[serde(default)]
    pub hold_id: Option<Uuid>,
    pub idempotency_key: Option<String>,
    pub request_hash: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// What the shard owner answers for an operation command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", content = "operation")]
pub enum CommandOutcome {
    /// The operation is in the audit trail (applied or rejected), now or from an earlier request.
    Recorded(OperationRecord),
    WalletNotFound,
    /// The idempotency key was used before with a different request.
    IdempotencyKeyReused,
    /// A hold as this command left it (created, rejected, captured, voided or expired).
    Hold(HoldRecord),
    HoldNotFound,
    /// The hold is no longer ACTIVE; nothing was done.
    HoldNotActive(HoldRecord),
    /// A capture of more than the hold reserves; nothing was done.
    CaptureExceedsHold(HoldRecord),
    /// A lower overdraft limit would leave less than nothing available; nothing was done.
    LimitInUse,
    /// A transfer's credit would take its destination past the largest balance; the
    /// transfer stays PENDING.
    CreditRefused,
}
