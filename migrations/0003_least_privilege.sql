-- Least privilege: the nodes log in as members of the NOLOGIN role wallet_app, which
-- may record operations and move balances but never rewrite history; migrations run as
-- the owner of the tables. Roles belong to the whole server, so this creates wallet_app
-- only when it is missing, and the administrator makes the nodes' login a member of it
-- (GRANT wallet_app TO <login>; see docs/migrations.md).
SET LOCAL lock_timeout = '5s';

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'wallet_app') THEN
        BEGIN
            CREATE ROLE wallet_app NOLOGIN;
        EXCEPTION
            -- Managed servers often give the migration user no CREATEROLE.
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'role wallet_app does not exist and % may not create roles', current_user
                    USING HINT = 'As an administrator run CREATE ROLE wallet_app NOLOGIN, then apply the migrations again (docs/migrations.md).';
            -- A migration of another database on this server created it meanwhile.
            WHEN duplicate_object OR unique_violation THEN
                NULL;
        END;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO wallet_app;
-- Readiness compares the schema version with the one the node needs.
GRANT SELECT ON _sqlx_migrations TO wallet_app;
-- The audit trail: appended to, never changed.
GRANT SELECT, INSERT ON operations TO wallet_app;
-- Creation inserts a wallet at zero; commits move its balance and version only.
GRANT SELECT, INSERT (id, tenant_id, balance, version), UPDATE (balance, version, updated_at) ON wallets TO wallet_app;
GRANT SELECT, INSERT ON idempotency_keys TO wallet_app;
-- Claims insert or raise the fence; commits lock it FOR SHARE and look-ups FOR UPDATE,
-- which needs UPDATE on a column.
GRANT SELECT, INSERT, UPDATE (fence, owner, claimed_at) ON shard_fences TO wallet_app;

-- Privileges stop the app role; this stops everyone else, the owner and superusers
-- included, unless a maintenance session says so on purpose.
CREATE FUNCTION operations_are_history() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog
AS $$
BEGIN
    IF current_setting('wallet.maintenance', true) = 'on' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'operations are the audit trail: % is refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'For deliberate maintenance run SET LOCAL wallet.maintenance = ''on'' in the transaction (docs/migrations.md).';
END
$$;

-- Per statement: one check however many rows a maintenance statement touches.
CREATE TRIGGER operations_are_history
    BEFORE UPDATE OR DELETE OR TRUNCATE ON operations
    FOR EACH STATEMENT EXECUTE FUNCTION operations_are_history();
