//! Events out of the ledger: what the outbox holds, how a batch's rows become events,
//! and the positions consumers resume from.
//!
//! Every event is written in the transaction of the state change it describes (the
//! batch commit, or the wallet's creation), so no event exists for something that did
//! not commit and nothing committed lacks its event. See docs/design.md, "Events".

mod metrics;
pub mod nats;
mod prune;
mod tail;

pub use metrics::{EventsMetrics, Published};
pub use nats::NatsSink;
pub(crate) use prune::prune_every;
pub use prune::{LAG_INTERVAL, PruneSettings, lag_until_stopped, prune_until_stopped};
pub use tail::EventTail;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use uuid::Uuid;

use crate::auth::Tenant;
use crate::domain::{
    HoldRecord, HoldStatus, OperationRecord, OperationStatus, OperationType, TransferRecord,
    TransferStatus,
};
use crate::http::views::{HoldView, OperationView, TransferView, WalletView};
use crate::store::LedgerWrites;

/// What happened. The wire names are dotted lower case (`operation.applied`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, salvo::oapi::ToSchema)]
pub enum EventType {
    #[serde(rename = "wallet.created")]
    WalletCreated,
    #[serde(rename = "operation.applied")]
    OperationApplied,
    #[serde(rename = "operation.rejected")]
    OperationRejected,
    #[serde(rename = "transfer.posted")]
    TransferPosted,
    #[serde(rename = "transfer.rejected")]
    TransferRejected,
    #[serde(rename = "hold.created")]
    HoldCreated,
    #[serde(rename = "hold.captured")]
    HoldCaptured,
    #[serde(rename = "hold.voided")]
    HoldVoided,
    #[serde(rename = "hold.expired")]
    HoldExpired,
}

impl EventType {
    pub const ALL: [EventType; 9] = [
        Self::WalletCreated,
        Self::OperationApplied,
        Self::OperationRejected,
        Self::TransferPosted,
        Self::TransferRejected,
        Self::HoldCreated,
        Self::HoldCaptured,
        Self::HoldVoided,
        Self::HoldExpired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::WalletCreated => "wallet.created",
            Self::OperationApplied => "operation.applied",
            Self::OperationRejected => "operation.rejected",
            Self::TransferPosted => "transfer.posted",
            Self::TransferRejected => "transfer.rejected",
            Self::HoldCreated => "hold.created",
            Self::HoldCaptured => "hold.captured",
            Self::HoldVoided => "hold.voided",
            Self::HoldExpired => "hold.expired",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }

    /// The event's id: derived from what it is about and its type, so the same change
    /// always has the same id (a redelivery, or a republish after a crash).
    pub fn event_id(self, subject: Uuid) -> Uuid {
        Uuid::new_v5(&subject, self.as_str().as_bytes())
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A position in the outbox: the writing transaction's id, then the event's place in
/// it. Every event a reader has not seen yet lies after the cursor it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventCursor {
    pub tx_id: i64,
    pub ordinal: i32,
}

impl EventCursor {
    /// Before every event.
    pub const START: EventCursor = EventCursor {
        tx_id: 0,
        ordinal: -1,
    };

    /// After every event of transactions older than `horizon`, and before any other.
    pub fn before_tx(horizon: i64) -> Self {
        Self {
            tx_id: horizon - 1,
            ordinal: i32::MAX,
        }
    }

    /// Opaque to clients: base64url of `ev1:<tx>:<ordinal>`.
    pub fn encode(self) -> String {
        URL_SAFE_NO_PAD.encode(format!("ev1:{}:{}", self.tx_id, self.ordinal))
    }

    pub fn decode(text: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let (tx, ordinal) = text.strip_prefix("ev1:")?.split_once(':')?;
        let cursor = Self {
            tx_id: tx.parse().ok()?,
            ordinal: ordinal.parse().ok()?,
        };
        (cursor.tx_id >= 0 && cursor.ordinal >= -1).then_some(cursor)
    }
}

/// An event as a batch writes it. `data` is already JSON: rendered where the batch is
/// planned, spread over the shard tasks, not in the one commit lane.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub tenant: Tenant,
    pub wallet_id: Uuid,
    pub sequence: i64,
    pub event_type: EventType,
    pub occurred_at: DateTime<Utc>,
    pub data: String,
}

/// An event read back from the outbox.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub cursor: EventCursor,
    pub event_id: Uuid,
    pub tenant: Tenant,
    pub wallet_id: Uuid,
    pub sequence: i64,
    pub event_type: EventType,
    pub occurred_at: DateTime<Utc>,
    pub data: Box<serde_json::value::RawValue>,
}

/// The JSON of one event, the same in the pull API, the stream, webhooks and NATS.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventView<'a> {
    pub event_id: Uuid,
    /// Pass as `after` (or `Last-Event-ID`) to resume right after this event.
    pub cursor: String,
    pub tenant: &'a str,
    pub wallet_id: Uuid,
    pub sequence: i64,
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub occurred_at: DateTime<Utc>,
    pub data: &'a serde_json::value::RawValue,
}

impl StoredEvent {
    pub fn view(&self) -> EventView<'_> {
        EventView {
            event_id: self.event_id,
            cursor: self.cursor.encode(),
            tenant: self.tenant.as_str(),
            wallet_id: self.wallet_id,
            sequence: self.sequence,
            event_type: self.event_type,
            occurred_at: self.occurred_at,
            data: &self.data,
        }
    }

    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string(&self.view()).unwrap_or_default()
    }
}

/// What a read of the outbox is limited to.
#[derive(Clone, Debug)]
pub struct EventFilter {
    pub tenant: Tenant,
    pub wallet_id: Option<Uuid>,
    /// Empty: every type.
    pub types: Vec<EventType>,
}

/// The data of a transfer.posted event: the credit's side knows when it was posted, not
/// when the transfer was created.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PostedTransferView {
    transfer_id: Uuid,
    from_wallet_id: Uuid,
    to_wallet_id: Uuid,
    amount: Decimal,
    status: TransferStatus,
    posted_at: DateTime<Utc>,
}

fn json(value: &impl Serialize) -> String {
    // Views of plain data: serializing cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

/// The wallet.created event of a new wallet, written with it.
pub fn wallet_created(tenant: &Tenant, wallet_id: Uuid, at: DateTime<Utc>) -> NewEvent {
    NewEvent {
        event_id: EventType::WalletCreated.event_id(wallet_id),
        tenant: tenant.clone(),
        wallet_id,
        sequence: 0,
        event_type: EventType::WalletCreated,
        occurred_at: at,
        data: json(&WalletView::empty(wallet_id)),
    }
}

/// The events of a planned batch, in the order of its rows: each row's
/// operation.applied or operation.rejected, followed by what it did to a transfer or a
/// hold. `tenant_of` names each row's wallet's tenant.
pub fn of_batch<'a>(
    records: &[OperationRecord],
    ledger: &LedgerWrites,
    tenant_of: impl Fn(&Uuid) -> Option<&'a Tenant>,
) -> Vec<NewEvent> {
    let mut events = Vec::with_capacity(records.len());
    for record in records {
        let Some(tenant) = tenant_of(&record.wallet_id) else {
            continue;
        };
        let event = |event_type: EventType, subject: Uuid, data: String| NewEvent {
            event_id: event_type.event_id(subject),
            tenant: tenant.clone(),
            wallet_id: record.wallet_id,
            sequence: record.seq,
            event_type,
            occurred_at: record.created_at,
            data,
        };
        let applied = record.status == OperationStatus::Applied;
        events.push(event(
            if applied {
                EventType::OperationApplied
            } else {
                EventType::OperationRejected
            },
            record.operation_id,
            json(&OperationView::from(record)),
        ));
        if let Some((event_type, subject, data)) = ledger_event(record, applied, ledger) {
            events.push(event(event_type, subject, data));
        }
    }
    events
}

/// What a row did to a transfer or a hold, if anything worth an event of its own.
fn ledger_event(
    record: &OperationRecord,
    applied: bool,
    ledger: &LedgerWrites,
) -> Option<(EventType, Uuid, String)> {
    let find_transfer = |id: Uuid| -> Option<&TransferRecord> {
        ledger.new_transfers.iter().find(|t| t.transfer_id == id)
    };
    // The hold as this batch leaves it: a settled one, else a new one.
    let find_hold = |id: Uuid| -> Option<&HoldRecord> {
        ledger
            .settled_holds
            .iter()
            .rev()
            .find(|h| h.hold_id == id)
            .or_else(|| ledger.new_holds.iter().find(|h| h.hold_id == id))
    };
    match record.operation_type {
        OperationType::TransferOut if !applied => {
            let transfer = find_transfer(record.transfer_id?)?;
            Some((
                EventType::TransferRejected,
                transfer.transfer_id,
                json(&TransferView::from(transfer)),
            ))
        }
        OperationType::TransferIn if applied => {
            let transfer_id = record.transfer_id?;
            let posted = ledger
                .posted_transfers
                .iter()
                .find(|posted| posted.transfer_id == transfer_id)?;
            Some((
                EventType::TransferPosted,
                transfer_id,
                json(&PostedTransferView {
                    transfer_id,
                    from_wallet_id: posted.from_wallet_id,
                    to_wallet_id: record.wallet_id,
                    amount: record.amount,
                    status: TransferStatus::Posted,
                    posted_at: posted.posted_at,
                }),
            ))
        }
        OperationType::Hold if applied => {
            let hold = ledger
                .new_holds
                .iter()
                .find(|h| Some(h.hold_id) == record.hold_id)?;
            Some((
                EventType::HoldCreated,
                hold.hold_id,
                json(&HoldView::from(hold)),
            ))
        }
        OperationType::Capture if applied => {
            let hold = find_hold(record.hold_id?)?;
            Some((
                EventType::HoldCaptured,
                hold.hold_id,
                json(&HoldView::from(hold)),
            ))
        }
        OperationType::Release if applied => {
            let hold = find_hold(record.hold_id?)?;
            let event_type = match hold.status {
                HoldStatus::Voided => EventType::HoldVoided,
                HoldStatus::Expired => EventType::HoldExpired,
                // The rest of a partial capture: hold.captured says it all.
                _ => return None,
            };
            Some((event_type, hold.hold_id, json(&HoldView::from(hold))))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        let cursor = EventCursor {
            tx_id: 1234,
            ordinal: 7,
        };
        assert_eq!(EventCursor::decode(&cursor.encode()), Some(cursor));
        assert_eq!(
            EventCursor::decode(&EventCursor::START.encode()),
            Some(EventCursor::START)
        );
        for foreign in ["", "!!", "bm9wZQ", &URL_SAFE_NO_PAD.encode("ev1:-5:0")] {
            assert_eq!(EventCursor::decode(foreign), None, "{foreign}");
        }
        assert!(
            EventCursor::before_tx(10)
                > EventCursor {
                    tx_id: 9,
                    ordinal: 5
                }
        );
        assert!(
            EventCursor::before_tx(10)
                < EventCursor {
                    tx_id: 10,
                    ordinal: 0
                }
        );
    }

    #[test]
    fn types_round_trip_by_wire_name() {
        for kind in EventType::ALL {
            assert_eq!(EventType::parse(kind.as_str()), Some(kind));
            assert_eq!(
                serde_json::to_string(&kind).ok(),
                Some(format!("\"{}\"", kind.as_str()))
            );
        }
        assert_eq!(EventType::parse("operation.deleted"), None);
    }

    fn row(
        wallet_id: Uuid,
        seq: i64,
        kind: OperationType,
        hold_id: Option<Uuid>,
    ) -> OperationRecord {
        OperationRecord {
            operation_id: Uuid::now_v7(),
            wallet_id,
            seq,
            operation_type: kind,
            amount: Decimal::new(100, 2),
            status: OperationStatus::Applied,
            reason: None,
            balance_after: Decimal::ZERO,
            held_after: Decimal::ZERO,
            transfer_id: None,
            hold_id,
            idempotency_key: None,
            request_hash: None,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn a_partial_capture_is_one_hold_captured_event_and_a_void_is_hold_voided() {
        let tenant = Tenant::parse("t").expect("tenant");
        let wallet = Uuid::now_v7();
        let (captured, voided) = (Uuid::now_v7(), Uuid::now_v7());
        let hold = |hold_id, status| HoldRecord {
            hold_id,
            tenant: tenant.clone(),
            wallet_id: wallet,
            shard: 0,
            amount: Decimal::new(300, 2),
            captured_amount: Decimal::ZERO,
            status,
            expires_at: None,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        };
        let records = vec![
            row(wallet, 1, OperationType::Hold, Some(captured)),
            row(wallet, 2, OperationType::Capture, Some(captured)),
            row(wallet, 3, OperationType::Release, Some(captured)),
            row(wallet, 4, OperationType::Release, Some(voided)),
            row(wallet, 5, OperationType::Deposit, None),
        ];
        let ledger = LedgerWrites {
            new_holds: vec![hold(captured, HoldStatus::Active)],
            settled_holds: vec![
                hold(captured, HoldStatus::Captured),
                hold(voided, HoldStatus::Voided),
            ],
            ..LedgerWrites::default()
        };
        let events = of_batch(&records, &ledger, |_| Some(&tenant));
        let kinds: Vec<(i64, EventType)> =
            events.iter().map(|e| (e.sequence, e.event_type)).collect();
        use EventType::*;
        assert_eq!(
            kinds,
            vec![
                (1, OperationApplied),
                (1, HoldCreated),
                (2, OperationApplied),
                (2, HoldCaptured),
                (3, OperationApplied),
                (4, OperationApplied),
                (4, HoldVoided),
                (5, OperationApplied),
            ]
        );
        assert_eq!(events[3].event_id, HoldCaptured.event_id(captured));
        assert!(
            events[3].data.contains("\"status\":\"CAPTURED\""),
            "{}",
            events[3].data
        );
        // A wallet whose tenant is unknown gets no event (it cannot be a wallet of the batch).
        assert!(of_batch(&records, &ledger, |_| None).is_empty());
    }

    #[test]
    fn event_ids_are_stable_and_distinct_by_type() {
        let subject = Uuid::now_v7();
        assert_eq!(
            EventType::OperationApplied.event_id(subject),
            EventType::OperationApplied.event_id(subject)
        );
        assert_ne!(
            EventType::OperationApplied.event_id(subject),
            EventType::TransferRejected.event_id(subject)
        );
    }
}
