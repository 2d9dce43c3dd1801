use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use deadpool_redis::Pool;
use redis::Script;
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::Membership;
use crate::{ClusterConfig, ClusterError, ClusterMetrics, Member, SigningKeys};

/// What a member entry's signature covers (with the Redis prefix, the id and the address).
const ENTRY_PURPOSE: &str = "wallet-member-v1";

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
///
/// Every entry is signed with the internal secret (HMAC over the prefix, id and
/// address), and entries without a valid signature are ignored: whoever can write to
/// Redis cannot add a member and so cannot redirect forwarded requests to an address
/// of their choosing. (They can still delete entries or write tombstones, which only
/// moves shards, as a crash would; and they could put back an entry a member once
/// wrote, naming an address that member had.)
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
    keys: SigningKeys,
}

/// A member entry as stored in the set: the member and the signature of its fields.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    id: String,
    internal_addr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signature: Option<String>,
}

impl Entry {
    fn signed(member: &Member, prefix: &str, keys: &SigningKeys) -> Self {
        Self {
            id: member.id.clone(),
            internal_addr: member.internal_addr.clone(),
            signature: Some(keys.sign(ENTRY_PURPOSE, &entry_fields(prefix, member))),
        }
    }
}

fn entry_fields<'a>(prefix: &'a str, member: &'a Member) -> [&'a [u8]; 3] {
    [
        prefix.as_bytes(),
        member.id.as_bytes(),
        member.internal_addr.as_bytes(),
    ]
}

/// Why an entry of the set was ignored (the `reason` label of
/// `wallet_member_entries_rejected_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rejected {
    Malformed,
    Unsigned,
    BadSignature,
}

impl Rejected {
    fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Unsigned => "unsigned",
            Self::BadSignature => "bad_signature",
        }
    }
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
    /// Entries ignored, with why.
    rejected: BTreeMap<String, Rejected>,
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
            member_json: Self::entry(&me, &config.redis_prefix, &config.keys),
            heartbeat_ttl: config.heartbeat_ttl,
            refresh: Notify::new(),
            metrics,
            script: Script::new(HEARTBEAT),
            keys: config.keys.clone(),
        })
    }

    /// The sorted set holding the members of the cluster using `prefix`.
    pub fn key(prefix: &str) -> String {
        format!("{prefix}:members")
    }

    /// The entry `member` writes into that set: the member and its signature.
    pub fn entry(member: &Member, prefix: &str, keys: &SigningKeys) -> String {
        serde_json::to_string(&Entry::signed(member, prefix, keys))
            .unwrap_or_else(|_| unreachable!("an entry of strings always encodes"))
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
        let (live, rejected) = parse_members(&raw, &self.prefix, &self.keys);
        Ok(Read {
            now_ms,
            live,
            rejected,
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
        rejected: &mut BTreeMap<String, Rejected>,
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
        let mut read = self.heartbeat(&mut conn, register).await?;
        // Each ignored entry is logged and counted once while it stays in the set.
        for (entry, why) in &read.rejected {
            if !rejected.contains_key(entry) {
                self.metrics.member_entry_rejected(why.label());
                tracing::warn!(
                    reason = why.label(),
                    entry = %entry.chars().take(256).collect::<String>(),
                    "ignoring a member entry without a valid signature: something other than a node with the internal secret wrote to the member set"
                );
            }
        }
        *rejected = std::mem::take(&mut read.rejected);
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
/// last (an earlier run may linger with another address), and only entries signed
/// with one of `keys`; the others are returned with why they were ignored.
fn parse_members(
    raw: &[(String, i64)],
    prefix: &str,
    keys: &SigningKeys,
) -> (BTreeMap<String, Seen>, BTreeMap<String, Rejected>) {
    let mut by_id = BTreeMap::new();
    let mut rejected = BTreeMap::new();
    for (text, expires_ms) in raw {
        let entry = match serde_json::from_str::<Entry>(text) {
            Ok(entry) => entry,
            Err(_) => {
                rejected.insert(text.clone(), Rejected::Malformed);
                continue;
            }
        };
        let member = Member {
            id: entry.id,
            internal_addr: entry.internal_addr,
        };
        let Some(signature) = entry.signature else {
            rejected.insert(text.clone(), Rejected::Unsigned);
            continue;
        };
        if !keys.verify(ENTRY_PURPOSE, &entry_fields(prefix, &member), &signature) {
            rejected.insert(text.clone(), Rejected::BadSignature);
            continue;
        }
        by_id.insert(
            member.id.clone(),
            Seen {
                member,
                expires_ms: *expires_ms,
                vanished: false,
            },
        );
    }
    (by_id, rejected)
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
        let mut rejected = BTreeMap::new();
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
            match self
                .poll(&mut seen, &mut rejected, &mut tombstone_cleared, register)
                .await
            {
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

    fn keys() -> SigningKeys {
        SigningKeys::new("the-secret".into(), None)
    }

    fn entry(id: &str, addr: &str) -> String {
        serde_json::to_string(&Entry::signed(&member(id, addr), "wallet", &keys())).expect("json")
    }

    #[test]
    fn later_entry_of_the_same_id_wins_and_output_is_sorted() {
        let raw = vec![
            (entry("node-1", "10.0.0.1:8090"), 10),
            (entry("node-0", "10.0.0.9:8090"), 11),
            ("not json".to_owned(), 12),
            (entry("node-1", "10.0.0.2:8090"), 13),
        ];
        let (members, rejected) = parse_members(&raw, "wallet", &keys());
        assert_eq!(
            rejected.into_iter().collect::<Vec<_>>(),
            [("not json".to_owned(), Rejected::Malformed)]
        );
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
    fn entries_without_a_valid_signature_are_ignored() {
        let signed = entry("node-0", "10.0.0.1:8090");
        let unsigned = r#"{"id":"node-9","internalAddr":"10.6.6.6:8090"}"#.to_owned();
        // A real node's entry with its address changed, or signed with another secret,
        // or for another cluster's prefix.
        let redirected = signed.replace("10.0.0.1", "10.6.6.6");
        let foreign = serde_json::to_string(&Entry::signed(
            &member("node-8", "10.6.6.6:8090"),
            "wallet",
            &SigningKeys::new("another-secret".into(), None),
        ))
        .expect("json");
        let other_prefix = serde_json::to_string(&Entry::signed(
            &member("node-7", "10.6.6.6:8090"),
            "other",
            &keys(),
        ))
        .expect("json");
        let raw: Vec<(String, i64)> = [&signed, &unsigned, &redirected, &foreign, &other_prefix]
            .into_iter()
            .map(|text| (text.clone(), 10))
            .collect();
        let (members, rejected) = parse_members(&raw, "wallet", &keys());
        assert_eq!(members.keys().collect::<Vec<_>>(), ["node-0"]);
        assert_eq!(members["node-0"].member, member("node-0", "10.0.0.1:8090"));
        assert_eq!(rejected[&unsigned], Rejected::Unsigned);
        for forged in [&redirected, &foreign, &other_prefix] {
            assert_eq!(rejected[forged], Rejected::BadSignature, "{forged}");
        }
        // The previous secret still verifies while it is being rotated out.
        let rotated = SigningKeys::new("new-secret".into(), Some("the-secret".into()));
        let (members, _) = parse_members(&raw[..1], "wallet", &rotated);
        assert_eq!(members.keys().collect::<Vec<_>>(), ["node-0"]);
    }

    #[test]
    fn a_lost_entry_is_kept_until_its_expiry_and_a_leaver_is_not() {
        let before: BTreeMap<_, _> = [seen("a", 2000), seen("b", 1500), seen("c", 1800)].into();
        // Redis lost b's and c's entries; c left (tombstone), b did not.
        let read = Read {
            rejected: BTreeMap::new(),
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
            rejected: BTreeMap::new(),
            now_ms: 1500,
            live: [seen("a", 3500)].into(),
        };
        assert_eq!(ids(&merge(&next, &read, &BTreeSet::new())), ["a", "b"]);

        // Past it: gone, without asking for a tombstone.
        let read = Read {
            rejected: BTreeMap::new(),
            now_ms: 1501,
            live: [seen("a", 3501)].into(),
        };
        assert!(vanished(&next, &read).is_empty());
        assert_eq!(ids(&merge(&next, &read, &BTreeSet::new())), ["a"]);

        // Back before that: live again, with its new expiry.
        let read = Read {
            rejected: BTreeMap::new(),
            now_ms: 1200,
            live: [seen("a", 3200), seen("b", 3100)].into(),
        };
        let back = merge(&next, &read, &BTreeSet::new());
        assert_eq!(ids(&back), ["a", "b"]);
        assert!(!back["b"].vanished);
        assert_eq!(back["b"].expires_ms, 3100);
    }
}
