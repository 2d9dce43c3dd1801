//! Per-shard leases and fencing tokens in Redis.
//!
//! Keys carry a hash tag (`{<prefix>:s<shard>}`) so a shard's lease and fence counter
//! live in one slot and every script also runs on Redis Cluster.

use deadpool_redis::Pool;
use redis::Script;

use crate::ClusterError;

/// Take the lease if it is free (or left by an earlier run of this same node, whose
/// token the new one supersedes) and return a fresh fencing token, else nil.
const ACQUIRE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == false or string.sub(cur, 1, string.len(ARGV[3])) == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return redis.call('INCR', KEYS[2])
end
return false
";

/// 1 = renewed, 2 = the key was gone (expired during an outage or flushed) and is ours
/// again under the token we already hold, 0 = someone else holds it.
const RENEW: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if cur == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Raise the counter to at least ARGV[1]; never lowers it.
const RESEED: &str = r"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
";

/// A new token for a lease we still hold, else nil.
const NEXT_TOKEN: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('INCR', KEYS[2])
end
return false
";

/// What a renewal found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours, expiry pushed out.
    Renewed,
    /// The key had vanished and was set to us again; the token we hold is unchanged
    /// and PostgreSQL still guards it.
    Restored,
    /// Another holder has the lease.
    Lost,
}

/// Lease operations of one holder.
pub struct Leases {
    pool: Pool,
    prefix: String,
    node_id: String,
    holder: String,
    ttl_ms: u64,
    acquire: Script,
    renew: Script,
    release: Script,
    reseed: Script,
    next_token: Script,
}

impl Leases {
    /// `node_id` names the holder; the stored value adds a random run id so that a
    /// restarted node never renews or releases the lease of its previous run.
    pub fn new(pool: Pool, prefix: &str, node_id: &str, ttl_ms: u64) -> Self {
        Self {
            pool,
            prefix: prefix.to_owned(),
            node_id: node_id.to_owned(),
            holder: format!("{node_id}#{}", uuid::Uuid::new_v4().simple()),
            ttl_ms,
            acquire: Script::new(ACQUIRE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
            reseed: Script::new(RESEED),
            next_token: Script::new(NEXT_TOKEN),
        }
    }

    /// The value this holder stores in lease keys.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub fn lease_key(prefix: &str, shard: u32) -> String {
        format!("{{{prefix}:s{shard}}}:lease")
    }

    pub fn fence_key(prefix: &str, shard: u32) -> String {
        format!("{{{prefix}:s{shard}}}:fence")
    }

    fn own_prefix(&self) -> String {
        format!("{}#", self.node_id)
    }

    /// Tries to take the lease of `shard`; on success returns the new fencing token.
    pub async fn acquire(&self, shard: u32) -> Result<Option<i64>, ClusterError> {
        let mut tokens = self.acquire_many(&[shard]).await?;
        Ok(tokens.pop().flatten())
    }

    /// [`Self::acquire`] for many shards in one pipeline; results in input order.
    pub async fn acquire_many(&self, shards: &[u32]) -> Result<Vec<Option<i64>>, ClusterError> {
        if shards.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.load_script(&self.acquire).ignore();
        let own_prefix = self.own_prefix();
        for &shard in shards {
            let mut inv = self.acquire.prepare_invoke();
            inv.key(Self::lease_key(&self.prefix, shard))
                .key(Self::fence_key(&self.prefix, shard))
                .arg(&self.holder)
                .arg(self.ttl_ms)
                .arg(&own_prefix);
            pipe.invoke_script(&inv);
        }
        let mut conn = self.pool.get().await?;
        Ok(pipe.query_async(&mut *conn).await?)
    }

    /// Renews the leases of `shards` in one pipeline; results in input order.
    pub async fn renew_many(&self, shards: &[u32]) -> Result<Vec<Renewal>, ClusterError> {
        if shards.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.load_script(&self.renew).ignore();
        for &shard in shards {
            let mut inv = self.renew.prepare_invoke();
            inv.key(Self::lease_key(&self.prefix, shard))
                .arg(&self.holder)
                .arg(self.ttl_ms);
            pipe.invoke_script(&inv);
        }
        let mut conn = self.pool.get().await?;
        let codes: Vec<i64> = pipe.query_async(&mut *conn).await?;
        Ok(codes
            .into_iter()
            .map(|c| match c {
                1 => Renewal::Renewed,
                2 => Renewal::Restored,
                _ => Renewal::Lost,
            })
            .collect())
    }

    /// Deletes the lease if it is still ours; `true` if it was.
    pub async fn release(&self, shard: u32) -> Result<bool, ClusterError> {
        let mut conn = self.pool.get().await?;
        let deleted: i64 = self
            .release
            .key(Self::lease_key(&self.prefix, shard))
            .arg(&self.holder)
            .invoke_async(&mut *conn)
            .await?;
        Ok(deleted == 1)
    }

    /// [`Self::release`] for many shards in one pipeline; how many were still ours.
    pub async fn release_many(&self, shards: &[u32]) -> Result<usize, ClusterError> {
        if shards.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        pipe.load_script(&self.release).ignore();
        for &shard in shards {
            let mut inv = self.release.prepare_invoke();
            inv.key(Self::lease_key(&self.prefix, shard))
                .arg(&self.holder);
            pipe.invoke_script(&inv);
        }
        let mut conn = self.pool.get().await?;
        let deleted: Vec<i64> = pipe.query_async(&mut *conn).await?;
        Ok(deleted.into_iter().filter(|d| *d == 1).count())
    }

    /// Raises the shard's token counter to at least `at_least` (after Redis lost it).
    pub async fn reseed(&self, shard: u32, at_least: i64) -> Result<(), ClusterError> {
        let mut conn = self.pool.get().await?;
        let _: i64 = self
            .reseed
            .key(Self::fence_key(&self.prefix, shard))
            .arg(at_least)
            .invoke_async(&mut *conn)
            .await?;
        Ok(())
    }

    /// A fresh token while we still hold the lease, `None` if we lost it meanwhile.
    pub async fn next_token(&self, shard: u32) -> Result<Option<i64>, ClusterError> {
        let mut conn = self.pool.get().await?;
        Ok(self
            .next_token
            .key(Self::lease_key(&self.prefix, shard))
            .key(Self::fence_key(&self.prefix, shard))
            .arg(&self.holder)
            .invoke_async(&mut *conn)
            .await?)
    }
}
