-- Ledger features: holds reserve funds, overdraft limits extend what may be spent,
-- transfers move money between wallets of any owner. Expand-only: the old build keeps
-- working on this schema (its DEPOSIT and WITHDRAW rows get held_after = 0 by default).
SET LOCAL lock_timeout = '5s';

-- available = balance - held + overdraft_limit, and nothing may take it below zero.
ALTER TABLE wallets ADD COLUMN held NUMERIC(20, 2) NOT NULL DEFAULT 0 CHECK (held >= 0);
ALTER TABLE wallets ADD COLUMN overdraft_limit NUMERIC(20, 2) NOT NULL DEFAULT 0
    CHECK (overdraft_limit >= 0);
ALTER TABLE wallets DROP CONSTRAINT wallets_balance_check;
ALTER TABLE wallets ADD CONSTRAINT wallets_available_not_negative
    CHECK (balance - held + overdraft_limit >= 0);

ALTER TABLE operations DROP CONSTRAINT operations_operation_type_check;
ALTER TABLE operations ADD CONSTRAINT operations_operation_type_check CHECK (operation_type IN (
    'DEPOSIT', 'WITHDRAW', 'TRANSFER_OUT', 'TRANSFER_IN', 'HOLD', 'CAPTURE', 'RELEASE', 'OVERDRAFT_LIMIT'));
-- An overdraft limit row carries the new limit, which may be zero; every other row moves money.
ALTER TABLE operations DROP CONSTRAINT operations_amount_check;
ALTER TABLE operations ADD CONSTRAINT operations_amount_check
    CHECK (amount > 0 OR (operation_type = 'OVERDRAFT_LIMIT' AND amount = 0));
ALTER TABLE operations ADD COLUMN held_after NUMERIC(20, 2) NOT NULL DEFAULT 0;
ALTER TABLE operations ADD COLUMN transfer_id UUID;
ALTER TABLE operations ADD COLUMN hold_id UUID;

-- The intent of a transfer, written in the same transaction as its debit. The
-- destination's owner applies the credit (operation id derived from the transfer id, so
-- at most once) and marks the transfer POSTED in that same transaction.
CREATE TABLE transfers (
    id              UUID           PRIMARY KEY,
    tenant_id       TEXT           NOT NULL,
    from_wallet_id  UUID           NOT NULL REFERENCES wallets (id),
    to_wallet_id    UUID           NOT NULL REFERENCES wallets (id),
    amount          NUMERIC(20, 2) NOT NULL CHECK (amount > 0),
    status          TEXT           NOT NULL CHECK (status IN ('PENDING', 'POSTED', 'REJECTED')),
    -- The destination's shard: its owner finishes the transfer if the fast path did not.
    to_shard        INTEGER        NOT NULL CHECK (to_shard >= 0),
    created_at      TIMESTAMPTZ    NOT NULL,
    posted_at       TIMESTAMPTZ,
    CONSTRAINT transfers_distinct_wallets CHECK (from_wallet_id <> to_wallet_id),
    CONSTRAINT transfers_posted_at CHECK ((status = 'POSTED') = (posted_at IS NOT NULL))
);
CREATE INDEX transfers_pending ON transfers (to_shard, created_at) WHERE status = 'PENDING';

CREATE TABLE holds (
    id               UUID           PRIMARY KEY,
    tenant_id        TEXT           NOT NULL,
    wallet_id        UUID           NOT NULL REFERENCES wallets (id),
    -- The wallet's shard: its owner expires the hold.
    shard            INTEGER        NOT NULL CHECK (shard >= 0),
    amount           NUMERIC(20, 2) NOT NULL CHECK (amount > 0),
    captured_amount  NUMERIC(20, 2) NOT NULL DEFAULT 0 CHECK (captured_amount >= 0 AND captured_amount <= amount),
    status           TEXT           NOT NULL CHECK (status IN ('ACTIVE', 'CAPTURED', 'VOIDED', 'EXPIRED', 'REJECTED')),
    expires_at       TIMESTAMPTZ,
    created_at       TIMESTAMPTZ    NOT NULL,
    updated_at       TIMESTAMPTZ    NOT NULL
);
CREATE INDEX holds_due ON holds (shard, expires_at) WHERE status = 'ACTIVE' AND expires_at IS NOT NULL;

GRANT SELECT, INSERT (id, tenant_id, balance, version, held, overdraft_limit),
    UPDATE (balance, version, updated_at, held, overdraft_limit) ON wallets TO wallet_app;
GRANT SELECT, INSERT, UPDATE (status, posted_at) ON transfers TO wallet_app;
GRANT SELECT, INSERT, UPDATE (status, captured_amount, updated_at) ON holds TO wallet_app;
