-- Wallets belong to a tenant (the token's tenant claim at creation); every read and
-- write is scoped to the caller's tenant. Wallets from before tenancy belong to the
-- tenant 'default'.
SET LOCAL lock_timeout = '5s';

ALTER TABLE wallets ADD COLUMN tenant_id TEXT NOT NULL DEFAULT 'default'
    CHECK (tenant_id ~ '^[A-Za-z0-9._-]{1,64}$');
-- New wallets always name their tenant.
ALTER TABLE wallets ALTER COLUMN tenant_id DROP DEFAULT;

-- Wallet-creation keys are scoped per tenant: two tenants may both use "order-17".
ALTER TABLE idempotency_keys ADD COLUMN tenant_id TEXT NOT NULL DEFAULT 'default';
ALTER TABLE idempotency_keys ALTER COLUMN tenant_id DROP DEFAULT;
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (tenant_id, scope, idempotency_key);
