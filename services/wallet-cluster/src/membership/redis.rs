use std::collections::BTreeMap;
use std::time::Duration;

use deadpool_redis::Pool;
use redis::Script;
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::Membership;
use crate::{ClusterConfig, ClusterError, ClusterMetrics, Member};

/// Heartbeat (when ARGV[1] is not empty), drop expired members, return the live ones.
/// Redis's own clock decides expiry, so the nodes' clocks need not agree.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
";

/// Re-reads triggered by `refresh` are at most this frequent, so a burst of 421s
/// does not turn into a burst of Redis calls.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(100);

/// Longest gap between two reads of the member set.
const MAX_POLL: Duration = Duration::from_millis(250);

/// Members heartbeat into the sorted set `<prefix>:members` (score = expiry in ms).
pub struct RedisMembership {
    pool: Pool,
    key: String,
    member_json: String,
    heartbeat_ttl: Duration,
    refresh: Notify,
    metrics: ClusterMetrics,
    script: Script,
}

impl RedisMembership {
    pub fn new(
        config: &ClusterConfig,
        pool: Pool,
        metrics: ClusterMetrics,
    ) -> Result<Self, ClusterError> {
        config.validate()?;
        let me = Member {
            id: config.node_id.clone(),
            internal_addr: config.advertise_addr.clone(),
        };
        Ok(Self {
            pool,
            key: Self::key(&config.redis_prefix),
            member_json: serde_json::to_string(&me)?,
            heartbeat_ttl: config.heartbeat_ttl,
            refresh: Notify::new(),
            metrics,
            script: Script::new(HEARTBEAT),
        })
    }

    /// The sorted set holding the members of the cluster using `prefix`.
    pub fn key(prefix: &str) -> String {
        format!("{prefix}:members")
    }

    /// One heartbeat (or a plain read when `register` is false): the live members.
    async fn heartbeat(&self, register: bool) -> Result<Vec<Member>, ClusterError> {
        let mut conn = self.pool.get().await?;
        let raw: Vec<String> = self
            .script
            .key(&self.key)
            .arg(if register {
                self.member_json.as_str()
            } else {
                ""
            })
            .arg(self.heartbeat_ttl.as_millis() as u64)
            .invoke_async(&mut *conn)
            .await?;
        Ok(parse_members(&raw))
    }

    async fn leave(&self) -> Result<(), ClusterError> {
        let mut conn = self.pool.get().await?;
        let _: i64 = redis::cmd("ZREM")
            .arg(&self.key)
            .arg(&self.member_json)
            .query_async(&mut *conn)
            .await?;
        Ok(())
    }
}

/// Decodes the set's members (ascending expiry), keeping per id the one heard from
/// last (an earlier run may linger with another address), sorted by id.
fn parse_members(raw: &[String]) -> Vec<Member> {
    let mut by_id = BTreeMap::new();
    for entry in raw {
        match serde_json::from_str::<Member>(entry) {
            Ok(m) => {
                by_id.insert(m.id.clone(), m);
            }
            Err(error) => tracing::warn!(%error, entry, "ignoring malformed member entry"),
        }
    }
    by_id.into_values().collect()
}

#[async_trait::async_trait]
impl Membership for RedisMembership {
    async fn run(
        &self,
        tx: watch::Sender<Vec<Member>>,
        shutdown: CancellationToken,
    ) -> Result<(), ClusterError> {
        // Heartbeat at least three times per TTL, and read often enough that joins
        // and leaves are seen within a quarter second: a handoff waits on exactly that.
        let mut tick = tokio::time::interval((self.heartbeat_ttl / 3).min(MAX_POLL));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_read = Instant::now();
        let mut healthy = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                _ = self.refresh.notified() => {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep_until(last_read + MIN_REFRESH_GAP) => {}
                    }
                }
            }
            last_read = Instant::now();
            match self.heartbeat(true).await {
                Ok(members) => {
                    if !healthy {
                        tracing::info!("membership heartbeat recovered");
                        healthy = true;
                    }
                    tx.send_if_modified(|view| {
                        if *view == members {
                            return false;
                        }
                        tracing::info!(members = ?members.iter().map(|m| &m.id).collect::<Vec<_>>(), "membership changed");
                        *view = members;
                        true
                    });
                }
                Err(error) => {
                    // Keep the last view: owners keep serving, the fence guards commits.
                    self.metrics.redis_error("membership");
                    if healthy {
                        tracing::warn!(%error, "membership heartbeat failed; keeping the last view");
                        healthy = false;
                    } else {
                        tracing::debug!(%error, "membership heartbeat still failing");
                    }
                }
            }
        }
        // Deregister so that others stop routing here and start acquiring at once
        // rather than after the heartbeat expires.
        if let Err(error) = self.leave().await {
            self.metrics.redis_error("membership");
            tracing::warn!(%error, "could not deregister; the heartbeat will expire instead");
        }
        Ok(())
    }

    fn refresh(&self) {
        self.refresh.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_entry_of_the_same_id_wins_and_output_is_sorted() {
        let raw = vec![
            r#"{"id":"node-1","internalAddr":"10.0.0.1:8090"}"#.to_owned(),
            r#"{"id":"node-0","internalAddr":"10.0.0.9:8090"}"#.to_owned(),
            "not json".to_owned(),
            r#"{"id":"node-1","internalAddr":"10.0.0.2:8090"}"#.to_owned(),
        ];
        let members = parse_members(&raw);
        assert_eq!(
            members,
            vec![
                Member {
                    id: "node-0".into(),
                    internal_addr: "10.0.0.9:8090".into()
                },
                Member {
                    id: "node-1".into(),
                    internal_addr: "10.0.0.2:8090".into()
                },
            ]
        );
    }
}
