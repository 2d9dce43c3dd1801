//! The outbox against the rest of the database: every committed change has exactly its
//! event, no event exists without its change, and each wallet's events are in sequence
//! order. Part of every ledger audit and of the cluster harness's audit.

use std::collections::{HashMap, HashSet};

use sqlx::{PgConnection, Row};
use uuid::Uuid;

/// An event's id as the service derives it: from its subject and its type's wire name.
pub fn event_id(event_type: &str, subject: Uuid) -> Uuid {
    Uuid::new_v5(&subject, event_type.as_bytes())
}

#[derive(Debug, Clone)]
pub struct EventRow {
    pub tx_id: i64,
    pub ordinal: i32,
    pub event_id: Uuid,
    pub tenant: String,
    pub wallet_id: Uuid,
    pub sequence: i64,
    pub event_type: String,
}

/// Every event, in outbox order.
pub async fn events(conn: &mut PgConnection) -> anyhow::Result<Vec<EventRow>> {
    Ok(sqlx::query(
        "SELECT tx_id, ordinal, event_id, tenant_id, wallet_id, sequence, event_type \
         FROM events ORDER BY tx_id, ordinal",
    )
    .fetch_all(conn)
    .await?
    .iter()
    .map(|row| EventRow {
        tx_id: row.get("tx_id"),
        ordinal: row.get("ordinal"),
        event_id: row.get("event_id"),
        tenant: row.get("tenant_id"),
        wallet_id: row.get("wallet_id"),
        sequence: row.get("sequence"),
        event_type: row.get("event_type"),
    })
    .collect())
}

/// (event id, wallet, sequence, type) of every event the database's state calls for.
async fn expected(conn: &mut PgConnection) -> anyhow::Result<Vec<(Uuid, Uuid, i64, String)>> {
    let mut expected = Vec::new();
    for row in sqlx::query("SELECT id FROM wallets")
        .fetch_all(&mut *conn)
        .await?
    {
        let id: Uuid = row.get("id");
        expected.push((
            event_id("wallet.created", id),
            id,
            0,
            "wallet.created".into(),
        ));
    }
    for row in sqlx::query(
        "SELECT o.id, o.wallet_id, o.seq, o.operation_type, o.status, o.transfer_id, o.hold_id, \
                t.status AS transfer_status, h.status AS hold_status \
         FROM operations o \
         LEFT JOIN transfers t ON t.id = o.transfer_id \
         LEFT JOIN holds h ON h.id = o.hold_id",
    )
    .fetch_all(&mut *conn)
    .await?
    {
        let id: Uuid = row.get("id");
        let wallet: Uuid = row.get("wallet_id");
        let seq: i64 = row.get("seq");
        let kind: String = row.get("operation_type");
        let applied = row.get::<String, _>("status") == "APPLIED";
        let mut push = |event_type: &str, subject: Uuid| {
            expected.push((
                event_id(event_type, subject),
                wallet,
                seq,
                event_type.to_owned(),
            ));
        };
        push(
            if applied {
                "operation.applied"
            } else {
                "operation.rejected"
            },
            id,
        );
        let transfer: Option<Uuid> = row.get("transfer_id");
        let hold: Option<Uuid> = row.get("hold_id");
        let hold_status: Option<String> = row.get("hold_status");
        match (kind.as_str(), applied, transfer, hold) {
            ("TRANSFER_OUT", false, Some(transfer), _) => push("transfer.rejected", transfer),
            ("TRANSFER_IN", true, Some(transfer), _) => push("transfer.posted", transfer),
            ("HOLD", true, _, Some(hold)) => push("hold.created", hold),
            ("CAPTURE", true, _, Some(hold)) => push("hold.captured", hold),
            ("RELEASE", true, _, Some(hold)) => match hold_status.as_deref() {
                Some("VOIDED") => push("hold.voided", hold),
                Some("EXPIRED") => push("hold.expired", hold),
                _ => {}
            },
            _ => {}
        }
    }
    Ok(expected)
}

/// What is wrong with the outbox, each problem spelled out (empty: nothing).
pub async fn outbox_problems(conn: &mut PgConnection) -> anyhow::Result<Vec<String>> {
    let events = events(&mut *conn).await?;
    let expected = expected(&mut *conn).await?;
    let mut problems = Vec::new();
    let mut seen: HashMap<Uuid, &EventRow> = HashMap::new();
    for event in &events {
        if seen.insert(event.event_id, event).is_some() {
            problems.push(format!(
                "event {} ({}) is in the outbox twice",
                event.event_id, event.event_type
            ));
        }
    }
    let wanted: HashSet<Uuid> = expected.iter().map(|(id, ..)| *id).collect();
    for (id, wallet, seq, kind) in &expected {
        match seen.get(id) {
            None => problems.push(format!(
                "no {kind} event for wallet {wallet} seq {seq} (event id {id})"
            )),
            Some(event)
                if event.wallet_id != *wallet
                    || event.sequence != *seq
                    || event.event_type != *kind =>
            {
                problems.push(format!(
                    "event {id} is {} of wallet {} seq {}, where {kind} of wallet {wallet} seq {seq} was due",
                    event.event_type, event.wallet_id, event.sequence
                ));
            }
            Some(_) => {}
        }
    }
    for event in &events {
        if !wanted.contains(&event.event_id) {
            problems.push(format!(
                "event {} ({} of wallet {} seq {}) has no committed change behind it",
                event.event_id, event.event_type, event.wallet_id, event.sequence
            ));
        }
    }
    // In outbox order, a wallet's sequence numbers never go back.
    let mut last: HashMap<Uuid, i64> = HashMap::new();
    for event in &events {
        if let Some(previous) = last.insert(event.wallet_id, event.sequence)
            && event.sequence < previous
        {
            problems.push(format!(
                "wallet {}: event seq {} after seq {previous} in outbox order",
                event.wallet_id, event.sequence
            ));
        }
    }
    Ok(problems)
}

/// `outbox_problems` from one snapshot of `pool`'s database.
pub async fn audit_outbox(pool: &sqlx::PgPool) -> anyhow::Result<Vec<String>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let problems = outbox_problems(&mut tx).await?;
    tx.commit().await?;
    Ok(problems)
}
