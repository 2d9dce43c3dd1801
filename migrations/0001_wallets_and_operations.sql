-- Wallets, their audit trail and the shard fences that keep a stale owner from committing.
-- Applied only by wallet-migrator; API pods refuse to serve on an older schema.
SET LOCAL lock_timeout = '5s';

CREATE TABLE wallets (
    id          UUID           PRIMARY KEY,
    balance     NUMERIC(20, 2) NOT NULL DEFAULT 0 CHECK (balance >= 0),
    -- Bumped by every recorded operation; the owner's cached balance is only
    -- written back when the version it read is still current.
    version     BIGINT         NOT NULL DEFAULT 0,
    created_at  TIMESTAMPTZ    NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ    NOT NULL DEFAULT now()
);

CREATE TABLE operations (
    id               UUID           PRIMARY KEY,
    wallet_id        UUID           NOT NULL REFERENCES wallets (id),
    -- The wallet's version after this operation: a gap-free, per-wallet order
    -- that is the pagination cursor (newest first, stable under inserts).
    seq              BIGINT         NOT NULL,
    operation_type   TEXT           NOT NULL CHECK (operation_type IN ('DEPOSIT', 'WITHDRAW')),
    amount           NUMERIC(20, 2) NOT NULL CHECK (amount > 0),
    status           TEXT           NOT NULL CHECK (status IN ('APPLIED', 'REJECTED')),
    reason           TEXT,
    balance_after    NUMERIC(20, 2) NOT NULL,
    idempotency_key  TEXT,
    request_hash     TEXT,
    created_at       TIMESTAMPTZ    NOT NULL DEFAULT now(),
    CONSTRAINT operations_wallet_seq_key UNIQUE (wallet_id, seq),
    CONSTRAINT operations_rejected_has_reason CHECK ((status = 'REJECTED') = (reason IS NOT NULL))
);

-- Idempotency keys are scoped to a wallet: the owner of the wallet's shard is the
-- only writer, so the check and the insert happen in one batch transaction.
CREATE UNIQUE INDEX operations_wallet_idempotency_key
    ON operations (wallet_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Responses of requests that are not operations (wallet creation), keyed by scope and key.
CREATE TABLE idempotency_keys (
    scope            TEXT        NOT NULL,
    idempotency_key  TEXT        NOT NULL,
    request_hash     TEXT        NOT NULL,
    response_status  SMALLINT    NOT NULL,
    response_body    JSONB       NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, idempotency_key)
);

-- Kleppmann's fencing rule enforced by the storage: a shard's batches commit only
-- while the fence they were claimed with is still the current one.
CREATE TABLE shard_fences (
    shard       INTEGER     PRIMARY KEY CHECK (shard >= 0),
    fence       BIGINT      NOT NULL CHECK (fence > 0),
    owner       TEXT        NOT NULL,
    claimed_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
