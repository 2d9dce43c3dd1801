//! Commands beyond DEPOSIT and WITHDRAW, and the holds and transfers they keep.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Amount, OperationType};
use crate::auth::Tenant;

/// What a command does to its wallet. Every variant runs on the wallet's shard owner,
/// in the wallet's order, in the same group commit as every other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "operationType",
    rename_all = "SCREAMING_SNAKE_CASE",
    rename_all_fields = "camelCase"
)]
pub enum Action {
    Deposit {
        amount: Amount,
    },
    Withdraw {
        amount: Amount,
    },
    /// The debit of a transfer, and its PENDING intent, in one commit. The transfer's
    /// id is the command's operation id.
    TransferOut {
        to_wallet_id: Uuid,
        /// The destination's shard, whose owner finishes the transfer if the fast path did not.
        to_shard: u32,
        amount: Amount,
    },
    /// The credit of a PENDING transfer: applied once (its operation id is
    /// [`transfer_credit_id`]), and the transfer marked POSTED in the same commit.
    TransferIn {
        transfer_id: Uuid,
        from_wallet_id: Uuid,
        amount: Amount,
    },
    /// Reserves funds. The hold's id is the command's operation id.
    Hold {
        amount: Amount,
        #[serde(default)]
        expires_at: Option<DateTime<Utc>>,
    },
    /// Takes all of a hold, or part of it and releases the rest.
    Capture {
        hold_id: Uuid,
        #[serde(default)]
        amount: Option<Amount>,
    },
    Void {
        hold_id: Uuid,
    },
    /// Sent by the owner itself once a hold's `expiresAt` has passed.
    Expire {
        hold_id: Uuid,
    },
    #[serde(rename = "OVERDRAFT_LIMIT")]
    SetOverdraftLimit {
        limit: Decimal,
    },
}

impl Action {
    /// Fingerprint of the request, to tell a replay from a key reused for another request.
    /// DEPOSIT and WITHDRAW keep the form stored by earlier builds.
    pub fn fingerprint(&self, wallet_id: Uuid) -> String {
        let canonical = match self {
            Self::Deposit { amount } => format!("{wallet_id}|DEPOSIT|{amount}"),
            Self::Withdraw { amount } => format!("{wallet_id}|WITHDRAW|{amount}"),
            Self::TransferOut {
                to_wallet_id,
                amount,
                ..
            } => format!("{wallet_id}|TRANSFER_OUT|{to_wallet_id}|{amount}"),
            Self::TransferIn { transfer_id, .. } => {
                format!("{wallet_id}|TRANSFER_IN|{transfer_id}")
            }
            Self::Hold { amount, expires_at } => format!(
                "{wallet_id}|HOLD|{amount}|{}",
                expires_at.map(|at| at.to_rfc3339()).unwrap_or_default()
            ),
            Self::Capture { hold_id, amount } => format!(
                "{wallet_id}|CAPTURE|{hold_id}|{}",
                amount.map(|amount| amount.to_string()).unwrap_or_default()
            ),
            Self::Void { hold_id } => format!("{wallet_id}|VOID|{hold_id}"),
            Self::Expire { hold_id } => format!("{wallet_id}|EXPIRE|{hold_id}"),
            Self::SetOverdraftLimit { limit } => format!("{wallet_id}|OVERDRAFT_LIMIT|{limit}"),
        };
        format!("{:032x}", xxhash_rust::xxh3::xxh3_128(canonical.as_bytes()))
    }

    /// The hold a command acts on.
    pub fn hold_id(&self) -> Option<Uuid> {
        match self {
            Self::Capture { hold_id, .. } | Self::Void { hold_id } | Self::Expire { hold_id } => {
                Some(*hold_id)
            }
            _ => None,
        }
    }

    /// The type of the first history row the command writes.
    pub fn operation_type(&self) -> OperationType {
        match self {
            Self::Deposit { .. } => OperationType::Deposit,
            Self::Withdraw { .. } => OperationType::Withdraw,
            Self::TransferOut { .. } => OperationType::TransferOut,
            Self::TransferIn { .. } => OperationType::TransferIn,
            Self::Hold { .. } => OperationType::Hold,
            Self::Capture { .. } => OperationType::Capture,
            Self::Void { .. } | Self::Expire { .. } => OperationType::Release,
            Self::SetOverdraftLimit { .. } => OperationType::OverdraftLimit,
        }
    }
}

/// The operation id of a transfer's credit: derived from the transfer, so every attempt
/// at the credit (the fast path, a retry, the owner's sweep) is the same operation and
/// the destination's owner finds it instead of applying it twice.
pub fn transfer_credit_id(transfer_id: Uuid) -> Uuid {
    Uuid::new_v5(&transfer_id, b"transfer-credit")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, salvo::oapi::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TransferStatus {
    /// The debit is committed; the credit is recorded and will be applied exactly once.
    Pending,
    /// Both legs are committed.
    Posted,
    /// The source's available funds did not cover it; nothing moved.
    Rejected,
}

impl TransferStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Posted => "POSTED",
            Self::Rejected => "REJECTED",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        [Self::Pending, Self::Posted, Self::Rejected]
            .into_iter()
            .find(|status| status.as_str() == value)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferRecord {
    pub transfer_id: Uuid,
    pub tenant: Tenant,
    pub from_wallet_id: Uuid,
    pub to_wallet_id: Uuid,
    pub amount: Decimal,
    pub status: TransferStatus,
    pub to_shard: u32,
    pub created_at: DateTime<Utc>,
    pub posted_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, salvo::oapi::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HoldStatus {
    Active,
    Captured,
    Voided,
    Expired,
    /// Its wallet's available funds did not cover it; nothing was reserved.
    Rejected,
}

impl HoldStatus {
    const ALL: [Self; 5] = [
        Self::Active,
        Self::Captured,
        Self::Voided,
        Self::Expired,
        Self::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "ACTIVE",
            Self::Captured => "CAPTURED",
            Self::Voided => "VOIDED",
            Self::Expired => "EXPIRED",
            Self::Rejected => "REJECTED",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == value)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HoldRecord {
    pub hold_id: Uuid,
    pub tenant: Tenant,
    pub wallet_id: Uuid,
    pub shard: u32,
    pub amount: Decimal,
    pub captured_amount: Decimal,
    pub status: HoldStatus,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Deadline, OperationCommand};

    fn command(action: Action) -> OperationCommand {
        OperationCommand::new(
            Uuid::nil(),
            Tenant::parse("t").expect("tenant"),
            Uuid::nil(),
            action,
            None,
            Deadline::after(std::time::Duration::from_secs(1)),
        )
    }

    #[test]
    fn a_deposit_travels_in_the_form_earlier_builds_read_and_write() {
        let amount = Amount::parse("2.50").expect("amount");
        let json = serde_json::to_value(command(Action::Deposit { amount })).expect("json");
        assert_eq!(json["operationType"], "DEPOSIT");
        assert_eq!(json["amount"], "2.50");
        let back: OperationCommand = serde_json::from_value(json).expect("parse");
        assert_eq!(back.action, Action::Deposit { amount });
        // The stored fingerprint of earlier builds: "<wallet>|DEPOSIT|<amount>".
        assert_eq!(
            Action::Deposit { amount }.fingerprint(Uuid::nil()),
            format!(
                "{:032x}",
                xxhash_rust::xxh3::xxh3_128(format!("{}|DEPOSIT|2.50", Uuid::nil()).as_bytes())
            )
        );
    }

    #[test]
    fn every_action_survives_the_wire() {
        let amount = Amount::parse("1.00").expect("amount");
        let hold_id = Uuid::now_v7();
        for action in [
            Action::Withdraw { amount },
            Action::TransferOut {
                to_wallet_id: Uuid::now_v7(),
                to_shard: 7,
                amount,
            },
            Action::TransferIn {
                transfer_id: Uuid::now_v7(),
                from_wallet_id: Uuid::now_v7(),
                amount,
            },
            Action::Hold {
                amount,
                expires_at: Some(Utc::now()),
            },
            Action::Capture {
                hold_id,
                amount: None,
            },
            Action::Void { hold_id },
            Action::Expire { hold_id },
            Action::SetOverdraftLimit {
                limit: Decimal::new(1000, 2),
            },
        ] {
            let sent = command(action);
            let json = serde_json::to_string(&sent).expect("json");
            let back: OperationCommand = serde_json::from_str(&json).expect(&json);
            assert_eq!(back, sent, "{json}");
        }
    }

    #[test]
    fn a_transfers_credit_id_is_fixed_by_the_transfer() {
        let transfer = Uuid::now_v7();
        assert_eq!(transfer_credit_id(transfer), transfer_credit_id(transfer));
        assert_ne!(transfer_credit_id(transfer), transfer);
        assert_ne!(
            transfer_credit_id(transfer),
            transfer_credit_id(Uuid::now_v7())
        );
    }
}
