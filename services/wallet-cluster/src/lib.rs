//! Cluster membership, shard ownership and fencing for the wallet service.
//!
//! Two-level placement: a wallet id maps to one of a fixed number of virtual shards
//! (`shard_of`), and shards map to live members by rendezvous hashing. The owner of a
//! shard holds a Redis lease and a fencing token that PostgreSQL enforces.
//!
//! Wiring, in the node:
//!
//! ```text
//! let metrics = ClusterMetrics::register(&registry)?;
//! let membership: Arc<dyn Membership> = match mode {
//!     Redis => Arc::new(RedisMembership::new(&config, redis.clone(), metrics.clone())?),
//!     Kubernetes => Arc::new(EndpointSliceMembership::new(kube::Client::try_default().await?, &ns, &svc)),
//! };
//! let (fence_lost_tx, fence_lost_rx) = tokio::sync::mpsc::channel(shards);
//! let cluster = Cluster::start(config, redis, db, membership, executor_pool, fence_lost_rx, usable, metrics)?;
//! // per request: cluster.owner_of(cluster.shard_of(&wallet_id))
//! // per batch (executor, in the node's store): SELECT fence ... FOR SHARE, on a
//! //   mismatch metrics.fence_rejections().inc() and fence_lost_tx.send(shard)
//! // on SIGTERM: cluster.shutdown().await
//! ```

mod cluster;
mod error;
pub mod fence;
mod hash;
pub mod lease;
mod membership;
mod metrics;
pub mod trust;

use std::time::Duration;

pub use cluster::{Cluster, ClusterSnapshot};
pub use error::ClusterError;
pub use hash::{rendezvous_owner, shard_of};
pub use membership::{
    EndpointSliceMembership, INTERNAL_PORT_NAME, Membership, RedisMembership, members_from_slices,
};
pub use metrics::ClusterMetrics;
pub use trust::SigningKeys;

/// A live member of the cluster as every node sees it.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// Stable node id (pod name in Kubernetes, `node-N` locally).
    pub id: String,
    /// `host:port` of the member's internal (node-to-node) listener.
    pub internal_addr: String,
}

/// Where shards are served. Implemented by the wallet node's executor pool.
#[async_trait::async_trait]
pub trait ShardHost: Send + Sync + 'static {
    /// This node now owns `shard` with fencing token `fence`, already claimed in
    /// PostgreSQL: start serving it with state loaded fresh from the database.
    async fn activate(&self, shard: u32, fence: i64);
    /// This node lost or is handing over `shard`: stop taking work, finish the batch in
    /// flight, fail what is still queued as "not owner". Returns once nothing of the
    /// shard can commit any more, or (a commit that got no answer) once the fence
    /// guarantees it: the next owner's claim waits for that transaction to end.
    async fn deactivate(&self, shard: u32);
    /// Whether the shard's commits have stalled past the host's limit: the cluster
    /// layer then stops renewing its lease.
    fn stalled(&self, _shard: u32) -> bool {
        false
    }
}

/// Settings of the cluster layer.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub node_id: String,
    /// Internal address other members use to reach this node.
    pub advertise_addr: String,
    /// Number of virtual shards; fixed for the life of an installation.
    pub shards: u32,
    pub lease_ttl: Duration,
    pub heartbeat_ttl: Duration,
    /// Prefix of every Redis key, so several clusters (or tests) share one Redis.
    pub redis_prefix: String,
    /// The shared secret(s) member entries in Redis are signed and checked with.
    pub keys: SigningKeys,
}

impl ClusterConfig {
    /// Rejects settings the cluster layer cannot work with.
    pub fn validate(&self) -> Result<(), ClusterError> {
        let fail = |msg: &str| Err(ClusterError::Config(msg.to_owned()));
        if self.node_id.is_empty() || self.node_id.contains('#') {
            // '#' separates the node id from the run id in lease values.
            return fail("node id must be non-empty and must not contain '#'");
        }
        if self.shards == 0 || i32::try_from(self.shards).is_err() {
            return fail("shards must be between 1 and 2^31-1");
        }
        if self.lease_ttl < Duration::from_millis(30)
            || self.heartbeat_ttl < Duration::from_millis(30)
        {
            return fail("lease and heartbeat TTLs must be at least 30 ms");
        }
        if self.redis_prefix.is_empty() {
            return fail("redis prefix must be non-empty");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ClusterConfig {
        ClusterConfig {
            node_id: "node-0".into(),
            advertise_addr: "127.0.0.1:8180".into(),
            shards: 1024,
            lease_ttl: Duration::from_secs(5),
            heartbeat_ttl: Duration::from_secs(5),
            redis_prefix: "wallet".into(),
            keys: SigningKeys::new("secret".into(), None),
        }
    }

    #[test]
    fn validation_rejects_what_the_cluster_cannot_use() {
        assert!(config().validate().is_ok());
        let broken: [fn(&mut ClusterConfig); 6] = [
            |c| c.node_id.clear(),
            |c| c.node_id = "node#0".into(),
            |c| c.shards = 0,
            |c| c.shards = u32::MAX,
            |c| c.lease_ttl = Duration::from_millis(1),
            |c| c.redis_prefix.clear(),
        ];
        for (i, breaks) in broken.iter().enumerate() {
            let mut c = config();
            breaks(&mut c);
            assert!(
                matches!(c.validate(), Err(ClusterError::Config(_))),
                "case {i}"
            );
        }
    }

    #[test]
    fn members_serialise_in_camel_case() {
        let m = Member {
            id: "node-0".into(),
            internal_addr: "10.0.0.1:8090".into(),
        };
        let json = serde_json::to_string(&m).expect("json");
        assert_eq!(json, r#"{"id":"node-0","internalAddr":"10.0.0.1:8090"}"#);
    }
}
