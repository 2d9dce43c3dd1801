//! The outbox: written inside batch commits and wallet creation, read by position.

use sqlx::Row;
use sqlx::postgres::PgRow;

use super::{Store, StoreError, ledger::tenant_of, try_xact_lock};
use crate::events::{EventCursor, EventFilter, EventType, NewEvent, StoredEvent};

/// The oldest transaction still running, as the outbox's `tx_id` counts: every event of
/// an older transaction is committed (or never will be) and visible to this statement.
macro_rules! horizon {
    () => {
        "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
    };
}

/// One page of the outbox.
#[derive(Debug)]
pub struct EventPage {
    pub events: Vec<StoredEvent>,
    /// Where the next read starts: after the last event, or, when the page is not full,
    /// after everything older than the horizon (no matching event can appear there later).
    pub next: EventCursor,
}

impl EventPage {
    /// The page read after `after` with `limit`, below `horizon`.
    pub fn read(events: Vec<StoredEvent>, after: EventCursor, limit: usize, horizon: i64) -> Self {
        let next = next_cursor(&events, after, limit, horizon);
        Self { events, next }
    }
}

/// After the last event of a full page; after a drained one, the horizon itself: nothing
/// matching can appear before it any more.
pub fn next_cursor(
    events: &[StoredEvent],
    after: EventCursor,
    limit: usize,
    horizon: i64,
) -> EventCursor {
    match events.last() {
        Some(last) if events.len() == limit => last.cursor,
        _ => after.max(EventCursor::before_tx(horizon)),
    }
}

/// What a consumer may read next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Horizon {
    /// Transactions below this one have all ended.
    pub xmin: i64,
    /// The newest transaction that wrote events, if any did.
    pub newest: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadEventsError {
    /// The cursor points into a part of the outbox that was pruned.
    #[error("the cursor is older than the outbox's retention")]
    Pruned,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for ReadEventsError {
    fn from(error: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(error))
    }
}

/// Inserts `events` in the batch's transaction, numbered in their order.
pub(super) async fn insert_events(
    tx: &mut sqlx::PgConnection,
    events: &[NewEvent],
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO events (ordinal, event_id, tenant_id, wallet_id, sequence, event_type, occurred_at, data) \
         SELECT o, e, t, w, s, ty, at, d::json \
         FROM UNNEST($1::int[], $2::uuid[], $3::text[], $4::uuid[], $5::bigint[], $6::text[], $7::timestamptz[], $8::text[]) \
         AS u(o, e, t, w, s, ty, at, d)",
    )
    .bind((0..events.len() as i32).collect::<Vec<i32>>())
    .bind(events.iter().map(|e| e.event_id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.tenant.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.wallet_id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.sequence).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.occurred_at).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.data.as_str()).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

macro_rules! event_columns {
    () => {
        "tx_id, ordinal, event_id, tenant_id, wallet_id, sequence, event_type, occurred_at, data::text AS data"
    };
}

/// The last event pruning deleted: every event up to it is gone, none after it.
async fn pruned_through(tx: &mut sqlx::PgConnection) -> Result<Option<EventCursor>, sqlx::Error> {
    let row = sqlx::query("SELECT through_tx, through_ordinal FROM events_pruned")
        .fetch_optional(&mut *tx)
        .await?;
    row.map(|row| {
        Ok(EventCursor {
            tx_id: row.try_get("through_tx")?,
            ordinal: row.try_get("through_ordinal")?,
        })
    })
    .transpose()
}

pub(super) fn event_from_row(row: &PgRow) -> Result<StoredEvent, StoreError> {
    let kind: String = row.try_get("event_type")?;
    let data: String = row.try_get("data")?;
    Ok(StoredEvent {
        cursor: EventCursor {
            tx_id: row.try_get("tx_id")?,
            ordinal: row.try_get("ordinal")?,
        },
        event_id: row.try_get("event_id")?,
        tenant: tenant_of(row)?,
        wallet_id: row.try_get("wallet_id")?,
        sequence: row.try_get("sequence")?,
        event_type: EventType::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("event type {kind:?}")))?,
        occurred_at: row.try_get("occurred_at")?,
        data: serde_json::value::RawValue::from_string(data)
            .map_err(|error| StoreError::Corrupt(format!("event data: {error}")))?,
    })
}

impl Store {
    /// Up to `limit` events of `filter` after `after`, oldest first, below the horizon.
    pub async fn events_after(
        &self,
        filter: &EventFilter,
        after: EventCursor,
        limit: usize,
    ) -> Result<EventPage, ReadEventsError> {
        let work = async {
            let mut tx = self.pool.begin().await?;
            // REPEATABLE READ: the horizon and the page come from one snapshot.
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .execute(&mut *tx)
                .await?;
            // START is what a reader without a cursor gets: the oldest event still kept.
            // No read ever answers it as a cursor, so no reader can have been past it.
            if after != EventCursor::START
                && pruned_through(&mut tx)
                    .await?
                    .is_some_and(|mark| after < mark)
            {
                return Err(ReadEventsError::Pruned);
            }
            let horizon: i64 = sqlx::query_scalar(concat!("SELECT ", horizon!()))
                .fetch_one(&mut *tx)
                .await?;
            let mut query = sqlx::QueryBuilder::new(concat!(
                "SELECT ",
                event_columns!(),
                " FROM events WHERE tenant_id = "
            ));
            query.push_bind(filter.tenant.as_str());
            query.push(" AND (tx_id, ordinal) > (");
            query.push_bind(after.tx_id);
            query.push(", ");
            query.push_bind(after.ordinal);
            query.push(") AND tx_id < ");
            query.push_bind(horizon);
            if let Some(wallet_id) = filter.wallet_id {
                query.push(" AND wallet_id = ");
                query.push_bind(wallet_id);
            }
            if !filter.types.is_empty() {
                query.push(" AND event_type = ANY(");
                query.push_bind(
                    filter
                        .types
                        .iter()
                        .map(|kind| kind.as_str())
                        .collect::<Vec<_>>(),
                );
                query.push(")");
            }
            query.push(" ORDER BY tx_id, ordinal LIMIT ");
            query.push_bind(limit as i64);
            let rows = query.build().fetch_all(&mut *tx).await?;
            tx.commit().await?;
            let events = rows
                .iter()
                .map(event_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(EventPage::read(events, after, limit, horizon))
        };
        tokio::time::timeout(self.timeouts.read, work)
            .await
            .map_err(|_| StoreError::Timeout("a read of events"))?
    }

    /// Up to `limit` events of every tenant after `after`: the service's own consumers.
    pub async fn all_events_after(
        &self,
        after: EventCursor,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .execute(&mut *tx)
                .await?;
            let horizon: i64 = sqlx::query_scalar(concat!("SELECT ", horizon!()))
                .fetch_one(&mut *tx)
                .await?;
            let rows = sqlx::query(concat!(
                "SELECT ",
                event_columns!(),
                " FROM events WHERE (tx_id, ordinal) > ($1, $2) AND tx_id < $3 ORDER BY tx_id, ordinal LIMIT $4"
            ))
            .bind(after.tx_id)
            .bind(after.ordinal)
            .bind(horizon)
            .bind(limit as i64)
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            let events = rows
                .iter()
                .map(event_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(EventPage::read(events, after, limit, horizon))
        })
        .await
    }

    /// The outbox's horizon and newest writer: cheap enough to poll.
    pub async fn events_horizon(&self) -> Result<Horizon, StoreError> {
        self.bounded(async {
            let row = sqlx::query(concat!(
                "SELECT ",
                horizon!(),
                " AS xmin, (SELECT max(tx_id) FROM events) AS newest"
            ))
            .fetch_one(&self.pool)
            .await?;
            Ok(Horizon {
                xmin: row.try_get("xmin")?,
                newest: row.try_get("newest")?,
            })
        })
        .await
    }
}

/// Taken by a pruning transaction (without waiting: one node at a time, the others skip
/// the round) and by a consumer's registration (waiting for it): a consumer registered at
/// the horizon is then never behind what a prune running beside it deletes.
const PRUNE_LOCK: &str = "wallet:events:prune";

/// What a consumer's claim found.
pub enum ClaimOutcome {
    /// This node holds the consumer's position until the claim advances or drops.
    Claimed(ConsumerClaim),
    /// Another node holds it: it is publishing a page.
    Held,
    /// No such consumer: register it first.
    Missing,
}

/// A consumer's position, held by a transaction-level advisory lock in an open
/// transaction: no other node can claim it until this one advances it (commit) or drops it
/// (rollback). The transaction's session ends if it idles past the claim's bound, so a
/// paused or cut-off node loses the claim; a killed one loses it with its connection.
///
/// Not a row lock (`FOR UPDATE`): that gives the transaction an id for the whole page, and
/// a running transaction id holds the outbox's horizon back for every reader (the pull
/// API, streams, webhooks) while the page is published, for as long as NATS is slow. An
/// advisory lock needs none; the transaction gets one only in its final UPDATE.
pub struct ConsumerClaim {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    name: &'static str,
    pub position: EventCursor,
    timeout: std::time::Duration,
}

impl ConsumerClaim {
    /// Moves the position to `next` (never back) and ends the claim.
    pub async fn advance(mut self, next: EventCursor) -> Result<(), StoreError> {
        debug_assert!(next >= self.position, "a consumer's position only moves on");
        let work = async {
            sqlx::query(
                "UPDATE event_consumers SET after_tx = $2, after_ordinal = $3, updated_at = now() \
                 WHERE name = $1 AND (after_tx, after_ordinal) <= ($2, $3)",
            )
            .bind(self.name)
            .bind(next.tx_id)
            .bind(next.ordinal)
            .execute(&mut *self.tx)
            .await?;
            self.tx.commit().await?;
            Ok(())
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| StoreError::Timeout("advancing an event consumer"))?
    }
}

/// What one pruning transaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PruneOutcome {
    /// Another node is pruning.
    Busy,
    /// Deleted this many rows; `more` when a full batch was old enough (look again).
    Deleted { rows: u64, more: bool },
}

/// How far behind a consumer is.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsumerLag {
    pub name: String,
    /// Now minus the time of the first event after its position; 0 when caught up.
    pub seconds: f64,
}

impl Store {
    /// Creates the consumer `name` at the horizon (after every event already readable)
    /// unless it exists: a new consumer starts with what happens from now on.
    pub async fn register_consumer(&self, name: &'static str) -> Result<(), StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                .bind(PRUNE_LOCK)
                .execute(&mut *tx)
                .await?;
            sqlx::query(concat!(
                "INSERT INTO event_consumers (name, after_tx, after_ordinal, updated_at) \
                 SELECT $1, ",
                horizon!(),
                " - 1, 2147483647, now() ON CONFLICT (name) DO NOTHING"
            ))
            .bind(name)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Claims the consumer `name`'s position for at most `hold` of idling between
    /// statements (PostgreSQL ends the session after that, releasing it).
    pub async fn claim_consumer(
        &self,
        name: &'static str,
        hold: std::time::Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            // The pool's sessions idle in a transaction for a commit timeout at most; a
            // claim idles while its page is published, bounded by `hold` instead.
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SET LOCAL idle_in_transaction_session_timeout = '{}ms'",
                hold.as_millis().max(1)
            )))
            .execute(&mut *tx)
            .await?;
            if !try_xact_lock(&mut tx, &format!("wallet:events:consumer:{name}")).await? {
                tx.rollback().await?;
                return Ok(ClaimOutcome::Held);
            }
            // A fresh snapshot after the lock: the previous holder's COMMIT is visible
            // before its lock is released.
            let row =
                sqlx::query("SELECT after_tx, after_ordinal FROM event_consumers WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&mut *tx)
                    .await?;
            let Some(row) = row else {
                tx.rollback().await?;
                return Ok(ClaimOutcome::Missing);
            };
            Ok(ClaimOutcome::Claimed(ConsumerClaim {
                position: EventCursor {
                    tx_id: row.try_get("after_tx")?,
                    ordinal: row.try_get("after_ordinal")?,
                },
                tx,
                name,
                timeout: self.timeouts.read,
            }))
        })
        .await
    }

    /// Deletes up to `batch` of the oldest events, stopping at the first one that is not
    /// older than `retention` or that a consumer still needs: an event after the position
    /// of a row of `event_consumers`, or after a live webhook's position among its
    /// tenant's events, or not yet below the horizon. Always a prefix of the outbox, so
    /// the mark in `events_pruned` (the last event deleted) says exactly which cursors lost
    /// events. One node at a time; the others get `Busy`.
    pub async fn prune_events(
        &self,
        retention: std::time::Duration,
        batch: usize,
    ) -> Result<PruneOutcome, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            if !try_xact_lock(&mut tx, PRUNE_LOCK).await? {
                tx.rollback().await?;
                return Ok(PruneOutcome::Busy);
            }
            // The last event no one needs any more: the lowest of the consumers'
            // positions, of the events just before each live webhook's next event of its
            // tenant (a webhook never needs other tenants' events, so an idle tenant's
            // webhook holds nothing back), and of the horizon.
            let bound = sqlx::query(concat!(
                "SELECT tx_id, ordinal FROM ( \
                   SELECT after_tx AS tx_id, after_ordinal AS ordinal FROM event_consumers \
                   UNION ALL \
                   SELECT n.tx_id, n.ordinal - 1 FROM webhooks w CROSS JOIN LATERAL ( \
                     SELECT e.tx_id, e.ordinal FROM events e WHERE e.tenant_id = w.tenant_id \
                       AND (e.tx_id, e.ordinal) > (w.after_tx, w.after_ordinal) \
                     ORDER BY e.tx_id, e.ordinal LIMIT 1) n \
                   WHERE w.deleted_at IS NULL \
                   UNION ALL \
                   SELECT ",
                horizon!(),
                " - 1, 2147483647 \
                 ) b ORDER BY tx_id, ordinal LIMIT 1"
            ))
            .fetch_one(&mut *tx)
            .await?;
            let bound = EventCursor {
                tx_id: bound.try_get("tx_id")?,
                ordinal: bound.try_get("ordinal")?,
            };
            let rows = sqlx::query(
                "SELECT tx_id, ordinal, occurred_at < now() - $3 * interval '1 millisecond' AS old \
                 FROM events WHERE (tx_id, ordinal) <= ($1, $2) ORDER BY tx_id, ordinal LIMIT $4",
            )
            .bind(bound.tx_id)
            .bind(bound.ordinal)
            .bind(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX))
            .bind(batch as i64)
            .fetch_all(&mut *tx)
            .await?;
            let mut last = None;
            for row in &rows {
                if !row.try_get::<bool, _>("old")? {
                    break;
                }
                last = Some(EventCursor {
                    tx_id: row.try_get("tx_id")?,
                    ordinal: row.try_get("ordinal")?,
                });
            }
            let Some(last) = last else {
                tx.rollback().await?;
                return Ok(PruneOutcome::Deleted {
                    rows: 0,
                    more: false,
                });
            };
            // Everything up to `last` is exactly the rows read above: nothing below the
            // horizon can be inserted any more.
            let deleted = sqlx::query("DELETE FROM events WHERE (tx_id, ordinal) <= ($1, $2)")
                .bind(last.tx_id)
                .bind(last.ordinal)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(
                "INSERT INTO events_pruned (singleton, through_tx, through_ordinal, pruned_at) \
                 VALUES (TRUE, $1, $2, now()) \
                 ON CONFLICT (singleton) DO UPDATE SET through_tx = EXCLUDED.through_tx, \
                   through_ordinal = EXCLUDED.through_ordinal, pruned_at = EXCLUDED.pruned_at \
                 WHERE (events_pruned.through_tx, events_pruned.through_ordinal) \
                   < (EXCLUDED.through_tx, EXCLUDED.through_ordinal)",
            )
            .bind(last.tx_id)
            .bind(last.ordinal)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(PruneOutcome::Deleted {
                rows: deleted,
                more: rows.len() == batch && deleted == batch as u64,
            })
        })
        .await
    }

    /// Every consumer's lag, in one statement: the first event after each position is
    /// one index probe.
    pub async fn consumer_lags(&self) -> Result<Vec<ConsumerLag>, StoreError> {
        self.bounded(async {
            let rows = sqlx::query(
                "SELECT c.name, COALESCE(GREATEST(EXTRACT(EPOCH FROM now() - e.occurred_at), 0), 0)::float8 AS lag \
                 FROM event_consumers c LEFT JOIN LATERAL ( \
                   SELECT occurred_at FROM events WHERE (tx_id, ordinal) > (c.after_tx, c.after_ordinal) \
                   ORDER BY tx_id, ordinal LIMIT 1) e ON TRUE \
                 ORDER BY c.name",
            )
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|row| {
                    Ok(ConsumerLag {
                        name: row.try_get("name")?,
                        seconds: row.try_get("lag")?,
                    })
                })
                .collect()
        })
        .await
    }
}
