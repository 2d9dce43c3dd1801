//! The PostgreSQL side of fencing: the storage, not Redis, decides who may commit.

use sqlx::PgPool;

use crate::ClusterError;

/// Records `fence` as the shard's current fence if it is higher than the stored one.
///
/// Returns `false` (nothing updated) when the stored fence is equal or higher: the
/// token is stale, either because another node claimed the shard since or because
/// Redis lost its counter and handed out a number it had handed out before.
pub async fn claim_fence(
    db: &PgPool,
    shard: u32,
    fence: i64,
    owner: &str,
) -> Result<bool, ClusterError> {
    let result = sqlx::query(
        "INSERT INTO shard_fences (shard, fence, owner) VALUES ($1, $2, $3) \
         ON CONFLICT (shard) DO UPDATE \
         SET fence = EXCLUDED.fence, owner = EXCLUDED.owner, claimed_at = now() \
         WHERE shard_fences.fence < EXCLUDED.fence",
    )
    .bind(shard_param(shard)?)
    .bind(fence)
    .bind(owner)
    .execute(db)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// The shard's current fence in PostgreSQL, `None` if it was never claimed.
pub async fn current_fence(db: &PgPool, shard: u32) -> Result<Option<i64>, ClusterError> {
    let fence = sqlx::query_scalar::<_, i64>("SELECT fence FROM shard_fences WHERE shard = $1")
        .bind(shard_param(shard)?)
        .fetch_optional(db)
        .await?;
    Ok(fence)
}

fn shard_param(shard: u32) -> Result<i32, ClusterError> {
    i32::try_from(shard).map_err(|_| ClusterError::Config(format!("shard {shard} out of range")))
}
