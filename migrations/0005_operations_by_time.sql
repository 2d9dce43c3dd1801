-- no-transaction
-- Point-in-time balances look up the last operation at or before a moment. Built
-- concurrently, so a large audit trail keeps taking writes meanwhile; alone in its file,
-- since several statements in one go would run as one transaction.
CREATE INDEX CONCURRENTLY IF NOT EXISTS operations_wallet_created_at
    ON operations (wallet_id, created_at, seq);
