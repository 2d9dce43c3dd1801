/// Everything that can go wrong in the cluster layer.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("invalid cluster configuration: {0}")]
    Config(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis pool: {0}")]
    RedisPool(#[from] deadpool_redis::PoolError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("member encoding: {0}")]
    MemberEncoding(#[from] serde_json::Error),
    #[error("metrics registration: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The Redis counter kept handing out tokens at or below the PostgreSQL fence,
    /// even after re-seeding it; someone else keeps claiming the shard.
    #[error("shard {shard}: fencing token did not advance past PostgreSQL's fence")]
    FenceNotAdvancing { shard: u32 },
}
