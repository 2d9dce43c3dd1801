//! JSON shapes of the public API (camelCase; money as decimal strings).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use salvo::oapi::ToSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{
    HoldRecord, HoldStatus, OperationRecord, OperationStatus, OperationType, RejectionReason,
    TransferStatus,
};
use crate::store::{BalanceAt, WalletState};

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WalletView {
    pub wallet_id: Uuid,
    /// Exact balance with two decimals, e.g. "10.50". Below zero only within the overdraft limit.
    #[salvo(schema(value_type = String, example = "10.50"))]
    pub balance: Decimal,
    /// What may still be spent: balance - held + overdraftLimit.
    #[salvo(schema(value_type = String, example = "8.50"))]
    pub available: Decimal,
    /// Reserved by ACTIVE holds.
    #[salvo(schema(value_type = String, example = "2.00"))]
    pub held: Decimal,
    #[salvo(schema(value_type = String, example = "0.00"))]
    pub overdraft_limit: Decimal,
}

impl WalletView {
    pub fn new(wallet_id: Uuid, state: &WalletState) -> Self {
        Self {
            wallet_id,
            balance: state.balance,
            available: state.available(),
            held: state.held,
            overdraft_limit: state.overdraft_limit,
        }
    }

    /// The wallet right after an OVERDRAFT_LIMIT row, whose amount is the new limit.
    pub fn after_limit(record: &OperationRecord) -> Self {
        Self {
            wallet_id: record.wallet_id,
            balance: record.balance_after,
            available: record.balance_after - record.held_after + record.amount,
            held: record.held_after,
            overdraft_limit: record.amount,
        }
    }

    /// A new wallet: everything zero.
    pub fn empty(wallet_id: Uuid) -> Self {
        let zero = Decimal::new(0, 2);
        Self {
            wallet_id,
            balance: zero,
            available: zero,
            held: zero,
            overdraft_limit: zero,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OperationView {
    pub operation_id: Uuid,
    pub wallet_id: Uuid,
    pub operation_type: OperationType,
    #[salvo(schema(value_type = String, example = "25.00"))]
    pub amount: Decimal,
    pub status: OperationStatus,
    /// Why a REJECTED operation did not change the balance.
    pub reason: Option<RejectionReason>,
    /// The balance right after this operation (unchanged when rejected).
    #[salvo(schema(value_type = String, example = "125.00"))]
    pub balance_after: Decimal,
    /// Funds held right after this operation.
    #[salvo(schema(value_type = String, example = "0.00"))]
    pub held_after: Decimal,
    /// The transfer of a TRANSFER_OUT or TRANSFER_IN row.
    pub transfer_id: Option<Uuid>,
    /// The hold of a HOLD, CAPTURE or RELEASE row.
    pub hold_id: Option<Uuid>,
    /// Position in the wallet's history: 1 for its first operation, then +1 each.
    pub sequence: i64,
    pub created_at: DateTime<Utc>,
}

impl From<&OperationRecord> for OperationView {
    fn from(record: &OperationRecord) -> Self {
        Self {
            operation_id: record.operation_id,
            wallet_id: record.wallet_id,
            operation_type: record.operation_type,
            amount: record.amount,
            status: record.status,
            reason: record.reason,
            balance_after: record.balance_after,
            held_after: record.held_after,
            transfer_id: record.transfer_id,
            hold_id: record.hold_id,
            sequence: record.seq,
            created_at: record.created_at,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OperationPage {
    /// Newest first.
    pub items: Vec<OperationView>,
    /// Pass as `cursor` to get the next (older) page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Money in a request: a decimal string such as "10.50", or a JSON number, which is read
/// from its text (never through a float). The schema says both, so that a number is not
/// "input the schema forbids that the API accepted" to a fuzzer.
fn money_input() -> salvo::oapi::schema::OneOf {
    use salvo::oapi::schema::OneOf;
    use salvo::oapi::{BasicType, Object};
    OneOf::new()
        .description("At most two decimals: a string such as \"10.50\", or a JSON number")
        .item(
            Object::with_type(BasicType::String)
                .pattern(r"^[0-9]{1,18}(\.[0-9]{1,2})?$")
                .example("10.50"),
        )
        .item(Object::with_type(BasicType::Number).example(10.5))
}

/// [`money_input`], or null.
fn optional_money_input() -> salvo::oapi::schema::OneOf {
    use salvo::oapi::{BasicType, Object};
    money_input().item(Object::with_type(BasicType::Null))
}

/// The body of `POST /api/v1/wallet`. Unknown fields are refused.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[salvo(schema(name = "OperationRequest"))]
#[expect(
    dead_code,
    reason = "documents the body; input::operation reads it field by field, exactly"
)]
pub struct OperationRequestDoc {
    pub wallet_id: Uuid,
    pub operation_type: OperationType,
    /// A positive amount with at most two decimals, as a string ("10.50") or a JSON number.
    #[salvo(schema(schema_with = money_input))]
    pub amount: String,
}

/// The optional body of `POST /api/v1/wallets`: an empty object.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[salvo(schema(name = "CreateWalletRequest"))]
pub struct CreateWalletRequest {}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransferView {
    pub transfer_id: Uuid,
    pub from_wallet_id: Uuid,
    pub to_wallet_id: Uuid,
    #[salvo(schema(value_type = String, example = "25.00"))]
    pub amount: Decimal,
    /// POSTED: both legs committed. PENDING: the debit is committed and the credit is
    /// recorded and will be applied exactly once. REJECTED: nothing moved.
    pub status: TransferStatus,
    pub created_at: DateTime<Utc>,
}

impl From<&crate::domain::TransferRecord> for TransferView {
    fn from(transfer: &crate::domain::TransferRecord) -> Self {
        Self {
            transfer_id: transfer.transfer_id,
            from_wallet_id: transfer.from_wallet_id,
            to_wallet_id: transfer.to_wallet_id,
            amount: transfer.amount,
            status: transfer.status,
            created_at: transfer.created_at,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HoldView {
    pub hold_id: Uuid,
    pub wallet_id: Uuid,
    #[salvo(schema(value_type = String, example = "25.00"))]
    pub amount: Decimal,
    #[salvo(schema(value_type = String, example = "0.00"))]
    pub captured_amount: Decimal,
    pub status: HoldStatus,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

impl From<&HoldRecord> for HoldView {
    fn from(hold: &HoldRecord) -> Self {
        Self {
            hold_id: hold.hold_id,
            wallet_id: hold.wallet_id,
            amount: hold.amount,
            captured_amount: hold.captured_amount,
            status: hold.status,
            expires_at: hold.expires_at,
            created_at: hold.created_at,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BalanceAtView {
    pub wallet_id: Uuid,
    #[salvo(schema(value_type = String, example = "10.50"))]
    pub balance: Decimal,
    #[salvo(schema(value_type = String, example = "0.00"))]
    pub held: Decimal,
    /// The last operation at or before the point asked for; 0 before the first.
    pub sequence: i64,
    /// When that operation was recorded (the wallet's creation for sequence 0).
    pub as_of: DateTime<Utc>,
}

impl BalanceAtView {
    pub fn new(wallet_id: Uuid, at: &BalanceAt) -> Self {
        Self {
            wallet_id,
            balance: at.balance,
            held: at.held,
            sequence: at.sequence,
            as_of: at.as_of,
        }
    }
}

/// The body of `POST /api/v1/transfers`. Unknown fields are refused.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[salvo(schema(name = "TransferRequest"))]
#[expect(
    dead_code,
    reason = "documents the body; input::transfer reads it exactly"
)]
pub struct TransferRequestDoc {
    pub from_wallet_id: Uuid,
    /// Another wallet of the same tenant.
    pub to_wallet_id: Uuid,
    #[salvo(schema(schema_with = money_input))]
    pub amount: String,
}

/// The body of `POST /api/v1/wallets/{walletId}/holds`. Unknown fields are refused.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[salvo(schema(name = "HoldRequest"))]
#[expect(dead_code, reason = "documents the body; input::hold reads it exactly")]
pub struct HoldRequestDoc {
    #[salvo(schema(schema_with = money_input))]
    pub amount: String,
    /// When the hold lapses and its amount is released; in the future. None: never.
    pub expires_at: Option<DateTime<Utc>>,
}

/// The optional body of `POST /api/v1/holds/{holdId}/capture`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[salvo(schema(name = "CaptureRequest"))]
#[expect(
    dead_code,
    reason = "documents the body; input::capture reads it exactly"
)]
pub struct CaptureRequestDoc {
    /// At most the hold's amount; the rest is released. None: the whole hold.
    #[salvo(schema(schema_with = optional_money_input))]
    pub amount: Option<String>,
}

/// The body of `PATCH /api/v1/wallets/{walletId}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[salvo(schema(name = "WalletPatch"))]
#[expect(
    dead_code,
    reason = "documents the body; input::overdraft_limit reads it exactly"
)]
pub struct WalletPatchDoc {
    /// Zero or more: how far below zero the balance may go.
    #[salvo(schema(schema_with = money_input))]
    pub overdraft_limit: String,
}
