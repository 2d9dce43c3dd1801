//! JSON shapes of the public API (camelCase; money as decimal strings).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use salvo::oapi::ToSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{OperationRecord, OperationStatus, OperationType, RejectionReason};

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WalletView {
    pub wallet_id: Uuid,
    /// Exact balance with two decimals, e.g. "10.50".
    #[salvo(schema(value_type = String, example = "10.50"))]
    pub balance: Decimal,
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
    #[salvo(schema(value_type = String, example = "10.50", pattern = r"^[0-9]{1,18}(\.[0-9]{1,2})?$"))]
    pub amount: String,
}

/// The optional body of `POST /api/v1/wallets`: an empty object.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[salvo(schema(name = "CreateWalletRequest"))]
pub struct CreateWalletRequest {}
