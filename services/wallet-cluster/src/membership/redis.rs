use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use deadpool_redis::Pool;
use redis::Script;
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::Membership;
use crate::{ClusterConfig, ClusterError, ClusterMetrics, Member};

/// Heartbeat (when ARGV[1] is not empty), drop expired members, return Redis's time
/// (ms) and the live entries with their expiry. Redis's own clock decides expiry, so
/// the nodes' clocks need not agree.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
local raw = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf', 'WITHSCORES')
local live = {}
for i = 1, #raw, 2 do
  live[#live + 1] = {raw[i], tonumber(raw[i + 1])}
end
return {now, live}
";

/// Re-reads triggered by `refresh` are at most this frequent, so a burst of "not owner" answers
/// does not turn into a burst of Redis calls.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(100);

/// Longest gap between two reads of the member set.
const MAX_POLL: Duration = Duration::from_millis(250);

/// Members heartbeat into the sorted set `<prefix>:members` (score = expiry in ms). A
/// member that leaves first writes a tombstone `<prefix>:left:<id>` living one
/// heartbeat TTL: it tells a leaver from an entry Redis lost (FLUSHALL, a restart
/// without persistence). A lost entry stays in the view until its last known expiry,
/// by when its owner has long re-registered, so a wipe moves no shard.
pub struct RedisMembership {
    pool: Pool,
    key: String,
    tombstone: String,
    prefix: String,
    member_json: String,
    heartbeat_ttl: Duration,
    refresh: Notify,
    metrics: ClusterMetrics,
    script: Script,
}

/// A member as last read, with its expiry in Redis's clock (ms).
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    member: Member,
    expires_ms: i64,
    /// Kept although missing from the set (only for logging each loss once).
    vanished: bool,
}

/// One read of the member set.
#[derive(Debug)]
struct Read {
    now_ms: i64,
    live: BTreeMap<String, Seen>,
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
            tombstone: tombstone_key(&config.redis_prefix, &config.node_id),
            prefix: config.redis_prefix.clone(),
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

    /// One heartbeat (or a plain read when `register` is false).
    async fn heartbeat(
        &self,
        conn: &mut deadpool_redis::Connection,
        register: bool,
    ) -> Result<Read, ClusterError> {
        let (now_ms, raw): (i64, Vec<(String, i64)>) = self
            .script
            .key(&self.key)
            .arg(if register {
                self.member_json.as_str()
            } else {
                ""
            })
            .arg(self.heartbeat_ttl.as_millis() as u64)
            .invoke_async(&mut **conn)
            .await?;
        Ok(Read {
            now_ms,
            live: parse_members(&raw),
        })
    }

    /// Which of `ids` left explicitly: their tombstone is still there.
    async fn tombstoned(
        &self,
        conn: &mut deadpool_redis::Connection,
        ids: &[&str],
    ) -> Result<BTreeSet<String>, ClusterError> {
        if ids.is_empty() {
            return Ok(BTreeSet::new());
        }
        // One key per command: tombstones of different ids may hash to different slots.
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("EXISTS").arg(tombstone_key(&self.prefix, id));
        }
        let exists: Vec<bool> = pipe.query_async(&mut **conn).await?;
        Ok(ids
            .iter()
            .zip(exists)
            .filter(|(_, exists)| *exists)
            .map(|(id, _)| (*id).to_owned())
            .collect())
    }

    /// Heartbeats and returns the view, updating `seen` only when every call succeeded.
    async fn poll(
        &self,
        seen: &mut BTreeMap<String, Seen>,
        tombstone_cleared: &mut bool,
        register: bool,
    ) -> Result<Vec<Member>, ClusterError> {
        let mut conn = self.pool.get().await?;
        if register && !*tombstone_cleared {
            // Back after leaving: a later loss of this run's entry must not read as a leave.
            let _: i64 = redis::cmd("DEL")
                .arg(&self.tombstone)
                .query_async(&mut *conn)
                .await?;
            *tombstone_cleared = true;
        }
        let read = self.heartbeat(&mut conn, register).await?;
        // Checked after the script rather than in it, which keeps the script on one key
        // (Redis Cluster). No race: a leaver writes its tombstone before its ZREM.
        let left = self.tombstoned(&mut conn, &vanished(seen, &read)).await?;
        let next = merge(seen, &read, &left);
        for (id, member) in &next {
            if member.vanished && !seen.get(id).is_some_and(|s| s.vanished) {
                tracing::info!(
                    member = id,
                    "member missing from Redis without having left; keeping it until its heartbeat expires"
                );
            }
        }
        *seen = next;
        Ok(seen.values().map(|s| s.member.clone()).collect())
    }

    async fn leave(&self) -> Result<(), ClusterError> {
        let mut conn = self.pool.get().await?;
        // Tombstone first: whoever then misses the entry finds it and drops this member
        // at once. It outlives the last heartbeat's expiry, the longest anyone keeps us.
        let _: () = redis::cmd("SET")
            .arg(&self.tombstone)
            .arg(1)
            .arg("PX")
            .arg(self.heartbeat_ttl.as_millis() as u64)
            .query_async(&mut *conn)
            .await?;
        let _: i64 = redis::cmd("ZREM")
            .arg(&self.key)
            .arg(&self.member_json)
            .query_async(&mut *conn)
            .await?;
        Ok(())
    }
}

/// The tombstone a member leaves behind when it deregisters.
fn tombstone_key(prefix: &str, node_id: &str) -> String {
    format!("{prefix}:left:{node_id}")
}

/// Decodes the set's entries (ascending expiry), keeping per id the one heard from
/// last (an earlier run may linger with another address).
fn parse_members(raw: &[(String, i64)]) -> BTreeMap<String, Seen> {
    let mut by_id = BTreeMap::new();
    for (entry, expires_ms) in raw {
        match serde_json::from_str::<Member>(entry) {
            Ok(member) => {
                by_id.insert(
                    member.id.clone(),
                    Seen {
                        member,
                        expires_ms: *expires_ms,
                        vanished: false,
                    },
                );
            }
            Err(error) => tracing::warn!(%error, entry, "ignoring malformed member entry"),
        }
    }
    by_id
}

/// Members seen before whose last known expiry has not passed but whom `read` lacks:
/// they either left or Redis lost their entry.
fn vanished<'a>(seen: &'a BTreeMap<String, Seen>, read: &Read) -> Vec<&'a str> {
    seen.iter()
        .filter(|(id, s)| s.expires_ms >= read.now_ms && !read.live.contains_key(*id))
        .map(|(id, _)| id.as_str())
        .collect()
}

/// The next view: the live entries, plus each vanished member that did not leave.
fn merge(
    seen: &BTreeMap<String, Seen>,
    read: &Read,
    left: &BTreeSet<String>,
) -> BTreeMap<String, Seen> {
    let mut next = read.live.clone();
    for id in vanished(seen, read) {
        if !left.contains(id)
            && let Some(s) = seen.get(id)
        {
            next.insert(
                id.to_owned(),
                Seen {
                    vanished: true,
                    ..s.clone()
                },
            );
        }
    }
    next
}

#[async_trait::async_trait]
impl Membership for RedisMembership {
    async fn run(
        &self,
        tx: watch::Sender<Vec<Member>>,
        shutdown: CancellationToken,
        mut eligible: watch::Receiver<bool>,
    ) -> Result<(), ClusterError> {
        // Heartbeat at least three times per TTL, and read often enough that joins
        // and leaves are seen within a quarter second: a handoff waits on exactly that.
        let mut tick = tokio::time::interval((self.heartbeat_ttl / 3).min(MAX_POLL));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_read = Instant::now();
        let mut healthy = true;
        let mut seen = BTreeMap::new();
        let mut tombstone_cleared = false;
        let mut registered = false;
        let mut eligible_open = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                changed = eligible.changed(), if eligible_open => {
                    // Nobody reports eligibility any more: keep the last value.
                    eligible_open = changed.is_ok();
                }
                _ = self.refresh.notified() => {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep_until(last_read + MIN_REFRESH_GAP) => {}
                    }
                }
            }
            last_read = Instant::now();
            let register = *eligible.borrow_and_update();
            if registered && !register {
                // Leave at once, tombstone first, so that the others take the shards now.
                match self.leave().await {
                    Ok(()) => {
                        tracing::warn!("database unusable: left the membership until it recovers");
                        registered = false;
                        tombstone_cleared = false;
                    }
                    Err(error) => {
                        self.metrics.redis_error("membership");
                        tracing::warn!(%error, "could not leave the membership");
                    }
                }
            }
            match self.poll(&mut seen, &mut tombstone_cleared, register).await {
                Ok(members) => {
                    if register && !registered {
                        tracing::info!("registered in the membership");
                        registered = true;
                    }
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

    fn member(id: &str, addr: &str) -> Member {
        Member {
            id: id.into(),
            internal_addr: addr.into(),
        }
    }

    fn seen(id: &str, expires_ms: i64) -> (String, Seen) {
        (
            id.to_owned(),
            Seen {
                member: member(id, "10.0.0.1:8090"),
                expires_ms,
                vanished: false,
            },
        )
    }

    fn ids(view: &BTreeMap<String, Seen>) -> Vec<&str> {
        view.keys().map(String::as_str).collect()
    }

    #[test]
    fn later_entry_of_the_same_id_wins_and_output_is_sorted() {
        let raw = vec![
            (
                r#"{"id":"node-1","internalAddr":"10.0.0.1:8090"}"#.to_owned(),
                10,
            ),
            (
                r#"{"id":"node-0","internalAddr":"10.0.0.9:8090"}"#.to_owned(),
                11,
            ),
            ("not json".to_owned(), 12),
            (
                r#"{"id":"node-1","internalAddr":"10.0.0.2:8090"}"#.to_owned(),
                13,
            ),
        ];
        let members = parse_members(&raw);
        let view: Vec<_> = members.values().map(|s| s.member.clone()).collect();
        assert_eq!(
            view,
            vec![
                member("node-0", "10.0.0.9:8090"),
                member("node-1", "10.0.0.2:8090")
            ]
        );
        assert_eq!(members["node-1"].expires_ms, 13);
    }

    #[test]
    fn a_lost_entry_is_kept_until_its_expiry_and_a_leaver_is_not() {
        let before: BTreeMap<_, _> = [seen("a", 2000), seen("b", 1500), seen("c", 1800)].into();
        // Redis lost b's and c's entries; c left (tombstone), b did not.
        let read = Read {
            now_ms: 1000,
            live: [seen("a", 3000)].into(),
        };
        assert_eq!(vanished(&before, &read), ["b", "c"]);
        let left = BTreeSet::from(["c".to_owned()]);
        let next = merge(&before, &read, &left);
        assert_eq!(ids(&next), ["a", "b"]);
        assert!(next["b"].vanished && !next["a"].vanished);
        assert_eq!(
            next["b"].expires_ms, 1500,
            "kept with its last known expiry"
        );

        // Still missing at its expiry: kept (as Redis keeps an entry whose score is now).
        let read = Read {
            now_ms: 1500,
            live: [seen("a", 3500)].into(),
        };
        assert_eq!(ids(&merge(&next, &read, &BTreeSet::new())), ["a", "b"]);

        // Past it: gone, without asking for a tombstone.
        let read = Read {
            now_ms: 1501,
            live: [seen("a", 3501)].into(),
        };
        assert!(vanished(&next, &read).is_empty());
        assert_eq!(ids(&merge(&next, &read, &BTreeSet::new())), ["a"]);

        // Back before that: live again, with its new expiry.
        let read = Read {
            now_ms: 1200,
            live: [seen("a", 3200), seen("b", 3100)].into(),
        };
        let back = merge(&next, &read, &BTreeSet::new());
        assert_eq!(ids(&back), ["a", "b"]);
        assert!(!back["b"].vanished);
        assert_eq!(back["b"].expires_ms, 3100);
    }
}
