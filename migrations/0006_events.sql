-- Events out of the ledger: a transactional outbox written in the same transaction as
-- the state change it describes, read by the pull API and the stream, fanned out to
-- webhooks and published to NATS JetStream. Expand-only: the previous build ignores it.
SET LOCAL lock_timeout = '5s';

-- Ordered by the writing transaction's id, then by the position within it. Readers stop
-- below the oldest transaction still running (pg_snapshot_xmin), so a transaction that
-- commits later can never land behind a cursor someone already passed. A wallet's
-- batches commit one after another, so its events are in sequence order too.
CREATE TABLE events (
    tx_id        BIGINT      NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    ordinal      INTEGER     NOT NULL CHECK (ordinal >= 0),
    -- Derived from what the event is about and its type: a redelivery carries the same id.
    event_id     UUID        NOT NULL,
    tenant_id    TEXT        NOT NULL,
    wallet_id    UUID        NOT NULL,
    -- The wallet's sequence number after the change (0 for wallet.created).
    sequence     BIGINT      NOT NULL CHECK (sequence >= 0),
    event_type   TEXT        NOT NULL CHECK (event_type IN (
        'wallet.created', 'operation.applied', 'operation.rejected',
        'transfer.posted', 'transfer.rejected',
        'hold.created', 'hold.captured', 'hold.voided', 'hold.expired')),
    occurred_at  TIMESTAMPTZ NOT NULL,
    -- The operation, transfer, hold or wallet as the API shows it. JSON, not JSONB: stored
    -- as written and handed out as is, never queried by content.
    data         JSON        NOT NULL,
    PRIMARY KEY (tx_id, ordinal)
);
CREATE INDEX events_by_tenant ON events (tenant_id, tx_id, ordinal);
CREATE INDEX events_by_wallet ON events (wallet_id, tx_id, ordinal);

-- How far the outbox has been pruned: every event up to and including this position is
-- gone (pruning deletes from the start, in order), so a cursor before it gets 410, never a
-- silent gap, and a cursor at or after it misses nothing. An ordinal of -1 marks every
-- transaction before through_tx.
CREATE TABLE events_pruned (
    singleton       BOOLEAN     PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    through_tx      BIGINT      NOT NULL,
    through_ordinal INTEGER     NOT NULL DEFAULT -1 CHECK (through_ordinal >= -1),
    pruned_at       TIMESTAMPTZ NOT NULL
);

-- Consumers inside the service (the NATS publisher, the webhook fan-out) and how far
-- into the outbox they are. Pruning never passes the slowest of them.
CREATE TABLE event_consumers (
    name          TEXT        PRIMARY KEY,
    after_tx      BIGINT      NOT NULL,
    after_ordinal INTEGER     NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL
);

CREATE TABLE webhooks (
    id            UUID        PRIMARY KEY,
    tenant_id     TEXT        NOT NULL,
    url           TEXT        NOT NULL,
    event_types   TEXT[]      NOT NULL,
    -- Signs every delivery; shown once at creation.
    secret        TEXT        NOT NULL,
    -- Deliveries exist for every matching event up to here.
    after_tx      BIGINT      NOT NULL,
    after_ordinal INTEGER     NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    deleted_at    TIMESTAMPTZ
);
CREATE INDEX webhooks_by_tenant ON webhooks (tenant_id, created_at) WHERE deleted_at IS NULL;

CREATE TABLE webhook_deliveries (
    id               UUID        PRIMARY KEY,
    webhook_id       UUID        NOT NULL REFERENCES webhooks (id),
    event_id         UUID        NOT NULL,
    event_type       TEXT        NOT NULL,
    -- The signed body: kept with the delivery, so it outlives the outbox's retention.
    body             TEXT        NOT NULL,
    status           TEXT        NOT NULL CHECK (status IN ('PENDING', 'DELIVERED', 'FAILED')),
    attempts         INTEGER     NOT NULL DEFAULT 0,
    -- When the next attempt is due; while one runs, when its claim lapses.
    next_attempt_at  TIMESTAMPTZ NOT NULL,
    -- Retries stop here and the delivery goes to the dead-letter list (FAILED).
    retry_until      TIMESTAMPTZ NOT NULL,
    last_attempt_at  TIMESTAMPTZ,
    last_status_code INTEGER,
    last_error       TEXT,
    created_at       TIMESTAMPTZ NOT NULL,
    delivered_at     TIMESTAMPTZ,
    UNIQUE (webhook_id, event_id)
);
-- Claims take the due PENDING deliveries oldest first; the gauges count PENDING and FAILED.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'PENDING';
CREATE INDEX webhook_deliveries_failed ON webhook_deliveries (webhook_id) WHERE status = 'FAILED';
-- A webhook's deliveries, newest first, with or without a status: (created_at, id) is the cursor.
CREATE INDEX webhook_deliveries_by_status ON webhook_deliveries (webhook_id, status, created_at, id);
CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, created_at, id);

GRANT SELECT, INSERT, DELETE ON events TO wallet_app;
GRANT SELECT, INSERT, UPDATE ON events_pruned TO wallet_app;
GRANT SELECT, INSERT, UPDATE ON event_consumers TO wallet_app;
GRANT SELECT, INSERT, UPDATE (after_tx, after_ordinal, deleted_at) ON webhooks TO wallet_app;
GRANT SELECT, INSERT, DELETE,
    UPDATE (status, attempts, next_attempt_at, retry_until, last_attempt_at, last_status_code, last_error, delivered_at)
    ON webhook_deliveries TO wallet_app;
