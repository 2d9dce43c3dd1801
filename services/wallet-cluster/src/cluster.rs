//! The running cluster layer: membership view, shard ownership loop, graceful handoff.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::fence::{claim_fence, current_fence};
use crate::lease::{Leases, Renewal};
use crate::{
    ClusterConfig, ClusterError, ClusterMetrics, Member, Membership, ShardHost, rendezvous_owner,
};

/// How many shards are claimed, activated or handed off at once: enough to take
/// 1024 shards in a few round trips, few enough not to drain the database pool.
const CONCURRENCY: usize = 32;

/// Claim attempts after Redis handed out a token at or below the PostgreSQL fence.
const RESEED_ATTEMPTS: usize = 3;

/// What `GET /cluster` shows.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSnapshot {
    pub node_id: String,
    pub members: Vec<Member>,
    pub owned_shards: Vec<u32>,
    pub shards: u32,
}

/// Handle to the running cluster layer. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClusterConfig,
    view: watch::Receiver<Vec<Member>>,
    membership: Arc<dyn Membership>,
    usable: watch::Receiver<bool>,
    owned: Arc<Mutex<Vec<u32>>>,
    leased: Arc<Leased>,
    shutting_down: AtomicBool,
    membership_stop: CancellationToken,
    ownership_stop: CancellationToken,
    tasks: tokio::sync::Mutex<Option<(JoinHandle<()>, JoinHandle<()>)>>,
}

impl Drop for Inner {
    // Without `shutdown` the loops would outlive every handle; stopping them still
    // deregisters and releases, only without waiting for it.
    fn drop(&mut self) {
        self.membership_stop.cancel();
        self.ownership_stop.cancel();
    }
}

impl Cluster {
    /// Spawns the membership and ownership loops (needs a Tokio runtime).
    ///
    /// `fence_lost` carries shards whose PostgreSQL fence the executor found moved
    /// on: they are deactivated and dropped at once.
    ///
    /// `usable` says whether this node can use its database now. While it is false the
    /// node is not a member (so the others take its shards), takes no shards, and is not
    /// ready.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        config: ClusterConfig,
        redis: deadpool_redis::Pool,
        db: PgPool,
        membership: Arc<dyn Membership>,
        host: Arc<dyn ShardHost>,
        fence_lost: mpsc::Receiver<u32>,
        usable: watch::Receiver<bool>,
        metrics: ClusterMetrics,
    ) -> Result<Cluster, ClusterError> {
        config.validate()?;
        let (tx, view) = watch::channel(Vec::new());
        let membership_stop = CancellationToken::new();
        let ownership_stop = CancellationToken::new();
        let owned = Arc::new(Mutex::new(Vec::new()));

        let source = membership.clone();
        let stop = membership_stop.clone();
        let eligible = usable.clone();
        let membership_task = tokio::spawn(async move {
            if let Err(error) = source.run(tx, stop, eligible).await {
                tracing::error!(%error, "membership stopped");
            }
        });

        let leased = Arc::new(Leased {
            shards: Mutex::new(BTreeSet::new()),
            readable_until: Mutex::new(HashMap::new()),
            lease_ttl: config.lease_ttl,
            renew_lock: tokio::sync::Mutex::new(()),
        });
        let owner = Owner {
            leases: Arc::new(Leases::new(
                redis,
                &config.redis_prefix,
                &config.node_id,
                config.lease_ttl.as_millis() as u64,
            )),
            leased: leased.clone(),
            config: config.clone(),
            db,
            host,
            metrics,
            view: view.clone(),
            usable: usable.clone(),
            fence_lost,
            held: BTreeMap::new(),
            owned: owned.clone(),
            failed_rounds: 0,
            pending: false,
        };
        let ownership_task = tokio::spawn(owner.run(ownership_stop.clone()));

        Ok(Cluster {
            inner: Arc::new(Inner {
                config,
                view,
                membership,
                usable,
                owned,
                leased,
                shutting_down: AtomicBool::new(false),
                membership_stop,
                ownership_stop,
                tasks: tokio::sync::Mutex::new(Some((membership_task, ownership_task))),
            }),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.inner.config.node_id
    }

    pub fn shards(&self) -> u32 {
        self.inner.config.shards
    }

    /// The shard of a wallet in this installation.
    pub fn shard_of(&self, wallet_id: &uuid::Uuid) -> u32 {
        crate::shard_of(wallet_id, self.inner.config.shards)
    }

    /// The member that should own `shard` according to the current view. Called on
    /// every request: a read lock on the view and one hash per member.
    ///
    /// Once shutdown has begun this node no longer counts itself, so requests go to
    /// the shard's next owner instead of to executors that are being stopped.
    pub fn owner_of(&self, shard: u32) -> Option<Member> {
        let view = self.inner.view.borrow();
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            let others: Vec<Member> = view
                .iter()
                .filter(|m| m.id != self.inner.config.node_id)
                .cloned()
                .collect();
            return rendezvous_owner(shard, &others).cloned();
        }
        rendezvous_owner(shard, &view).cloned()
    }

    /// The live members as this node sees them, to follow their changes.
    pub fn watch_members(&self) -> watch::Receiver<Vec<Member>> {
        self.inner.view.clone()
    }

    /// Registered in the membership, able to use the database, and not shutting down.
    pub fn is_ready(&self) -> bool {
        if self.inner.shutting_down.load(Ordering::SeqCst) || !*self.inner.usable.borrow() {
            return false;
        }
        let view = self.inner.view.borrow();
        self.inner
            .membership
            .is_registered(&view, &self.inner.config.node_id)
    }

    /// Re-read the membership now (after a peer answered "not owner").
    pub fn refresh(&self) {
        self.inner.membership.refresh();
    }

    /// The current view of members and the shards this node serves.
    pub fn snapshot(&self) -> ClusterSnapshot {
        ClusterSnapshot {
            node_id: self.inner.config.node_id.clone(),
            members: self.inner.view.borrow().clone(),
            owned_shards: self.owned_shards(),
            shards: self.inner.config.shards,
        }
    }

    /// Whether this node may answer reads of `shard` from its own memory now: it holds
    /// the shard's lease, renewed recently enough that no other node can have taken
    /// it. Writes do not need this (PostgreSQL's fence stops a stale owner's commit);
    /// a read has no commit, so it relies on the lease.
    pub fn serves_reads(&self, shard: u32) -> bool {
        !self.inner.shutting_down.load(Ordering::SeqCst) && self.inner.leased.readable(shard)
    }

    /// Shards activated on this node, ascending.
    pub fn owned_shards(&self) -> Vec<u32> {
        self.inner
            .owned
            .lock()
            .map(|o| o.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Graceful handoff: leave the membership first (others stop routing here and
    /// start acquiring), then deactivate every owned shard and release its lease.
    /// Idempotent; returns once nothing of this node can commit any more.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let Some((membership_task, ownership_task)) = self.inner.tasks.lock().await.take() else {
            return;
        };
        self.inner.membership_stop.cancel();
        if let Err(error) = membership_task.await {
            tracing::error!(%error, "membership task failed");
        }
        self.inner.ownership_stop.cancel();
        if let Err(error) = ownership_task.await {
            tracing::error!(%error, "ownership task failed");
        }
        tracing::info!("cluster layer stopped; all shards handed off");
    }
}

/// Leases this node holds in Redis (active shards and shards being claimed), shared
/// by the ownership loop and the renewer.
struct Leased {
    shards: Mutex<BTreeSet<u32>>,
    /// Until when each lease is certainly still this node's: from just before the
    /// acquisition or renewal that Redis granted, plus a share of the TTL (the margin
    /// absorbs the two clocks running at slightly different rates).
    readable_until: Mutex<HashMap<u32, Instant>>,
    lease_ttl: std::time::Duration,
    /// Held for a whole renewal round and around releases: a renewal that ran just
    /// after a release would find the key gone, take it for a flushed one and set it
    /// again, making the next owner wait a full TTL.
    renew_lock: tokio::sync::Mutex<()>,
}

impl Leased {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeSet<u32>) -> T) -> T {
        match self.shards.lock() {
            Ok(mut shards) => f(&mut shards),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    fn with_readable<T>(&self, f: impl FnOnce(&mut HashMap<u32, Instant>) -> T) -> T {
        match self.readable_until.lock() {
            Ok(mut until) => f(&mut until),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Redis granted `shard`'s lease to a request sent at `asked`.
    fn granted(&self, shard: u32, asked: Instant) {
        let until = asked + self.lease_ttl.mul_f64(READ_LEASE_SHARE);
        self.with_readable(|readable| readable.insert(shard, until));
    }

    fn revoke(&self, shard: u32) {
        self.with_readable(|readable| readable.remove(&shard));
    }

    fn readable(&self, shard: u32) -> bool {
        self.with_readable(|readable| {
            readable
                .get(&shard)
                .is_some_and(|until| Instant::now() < *until)
        })
    }
}

/// The share of the lease TTL after a grant during which reads are answered from memory.
const READ_LEASE_SHARE: f64 = 0.8;

/// Renews every held lease every `lease_ttl / 3`, in its own task so that slow claims
/// or activations never delay a renewal past the TTL.
struct Renewer {
    leases: Arc<Leases>,
    leased: Arc<Leased>,
    host: Arc<dyn ShardHost>,
    metrics: ClusterMetrics,
    lost: mpsc::UnboundedSender<u32>,
    period: std::time::Duration,
}

impl Renewer {
    async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut healthy = true;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let _round = self.leased.renew_lock.lock().await;
            let shards: Vec<u32> = self.leased.with(|s| s.iter().copied().collect());
            // Self-fencing: a shard whose commit has stalled (a database this node cannot
            // reach, packets dropped) is no longer renewed, so its lease expires and
            // another node takes it over instead of waiting for this one.
            let (stalled, shards): (Vec<u32>, Vec<u32>) = shards
                .into_iter()
                .partition(|shard| self.host.stalled(*shard));
            for shard in stalled {
                tracing::warn!(
                    shard,
                    "commits of the shard stalled; no longer renewing its lease"
                );
                self.leased.revoke(shard);
                self.leased.with(|s| s.remove(&shard));
                let _ = self.lost.send(shard);
            }
            if shards.is_empty() {
                continue;
            }
            let asked = Instant::now();
            match self.leases.renew_many(&shards).await {
                Ok(renewals) => {
                    if !healthy {
                        tracing::info!("lease renewals recovered");
                        healthy = true;
                    }
                    for (shard, renewal) in shards.into_iter().zip(renewals) {
                        match renewal {
                            Renewal::Renewed => self.leased.granted(shard, asked),
                            Renewal::Restored => {
                                // Redis lost the key, so for a moment anyone could have
                                // taken it: memory answers again from the next renewal.
                                self.leased.revoke(shard);
                                tracing::info!(shard, "lease key had vanished; set it again")
                            }
                            Renewal::Lost => {
                                self.leased.revoke(shard);
                                self.leased.with(|s| s.remove(&shard));
                                // The ownership loop deactivates it.
                                let _ = self.lost.send(shard);
                            }
                        }
                    }
                }
                Err(error) => {
                    // Keep the shards: PostgreSQL's fence, not the lease, is what stops
                    // a stale owner from committing.
                    self.metrics.redis_error("lease");
                    if healthy {
                        tracing::warn!(%error, "lease renewal failed; keeping held shards and retrying");
                        healthy = false;
                    }
                }
            }
        }
    }
}

/// Outcome of claiming one acquired shard.
enum Claim {
    Held(i64),
    /// The lease went to someone else while claiming.
    LeaseGone,
    Failed(ClusterError),
    /// Not tried: an earlier claim of the round failed.
    Skipped,
}

/// State of the ownership loop; only the loop touches `held`.
struct Owner {
    config: ClusterConfig,
    leases: Arc<Leases>,
    leased: Arc<Leased>,
    db: PgPool,
    host: Arc<dyn ShardHost>,
    metrics: ClusterMetrics,
    view: watch::Receiver<Vec<Member>>,
    usable: watch::Receiver<bool>,
    fence_lost: mpsc::Receiver<u32>,
    /// Activated shards and their fencing tokens.
    held: BTreeMap<u32, i64>,
    owned: Arc<Mutex<Vec<u32>>>,
    /// Consecutive acquisition rounds that hit an error, for backoff.
    failed_rounds: u32,
    /// Some shard HRW gives us is not held yet.
    pending: bool,
}

impl Owner {
    async fn run(mut self, stop: CancellationToken) {
        let (lost_tx, mut lease_lost) = mpsc::unbounded_channel();
        let renew_stop = CancellationToken::new();
        let renewer = tokio::spawn(
            Renewer {
                leases: self.leases.clone(),
                leased: self.leased.clone(),
                host: self.host.clone(),
                metrics: self.metrics.clone(),
                lost: lost_tx,
                period: self.config.lease_ttl / 3,
            }
            .run(renew_stop.clone()),
        );

        let mut tick = tokio::time::interval(self.config.lease_ttl / 3);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut view_open = true;
        let mut usable_open = true;
        loop {
            // Shards HRW gives us but whose lease is still held elsewhere (a handoff
            // in progress) are retried sooner than the tick, shortening the gap in
            // which nobody serves them; one pipelined call per retry.
            let retry_gap = self.retry_gap();
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some(shard) = self.fence_lost.recv() => {
                    self.on_fence_lost(shard).await;
                    continue;
                }
                Some(shard) = lease_lost.recv() => {
                    self.on_lease_lost(shard).await;
                    continue;
                }
                changed = self.usable.changed(), if usable_open => {
                    usable_open = changed.is_ok();
                }
                changed = self.view.changed(), if view_open => {
                    if changed.is_err() {
                        // The membership task ended; keep the last view and the ticks.
                        view_open = false;
                    }
                }
                _ = tick.tick() => {}
                _ = tokio::time::sleep(retry_gap), if self.pending => {}
            }
            self.reconcile().await;
        }
        // Leases stay renewed until every shard is deactivated and released.
        let all: Vec<u32> = self.held.keys().copied().collect();
        self.hand_off(all).await;
        renew_stop.cancel();
        if let Err(error) = renewer.await {
            tracing::error!(%error, "lease renewer failed");
        }
    }

    async fn on_fence_lost(&mut self, shard: u32) {
        if self.held.remove(&shard).is_none() {
            return;
        }
        // Another node serves it now: no more answers from this node's memory.
        self.leased.revoke(shard);
        tracing::warn!(shard, "fence moved on in PostgreSQL; dropping the shard");
        self.metrics.lease_lost();
        self.host.deactivate(shard).await;
        self.release(&[shard]).await;
        self.publish();
    }

    async fn on_lease_lost(&mut self, shard: u32) {
        if self.held.remove(&shard).is_none() {
            return;
        }
        // Another node serves it now: no more answers from this node's memory.
        self.leased.revoke(shard);
        tracing::warn!(shard, "lease taken by another node; deactivating");
        self.metrics.lease_lost();
        self.host.deactivate(shard).await;
        self.publish();
    }

    async fn reconcile(&mut self) {
        let members = self.view.borrow_and_update().clone();
        self.metrics.set_members(members.len());

        let me = self.config.node_id.clone();
        let is_mine = |shard: u32| rendezvous_owner(shard, &members).is_some_and(|m| m.id == me);
        let moved: Vec<u32> = self.held.keys().copied().filter(|&s| !is_mine(s)).collect();
        if !moved.is_empty() {
            tracing::info!(count = moved.len(), "handing off shards to other members");
            self.hand_off(moved).await;
        }

        // A node that cannot use its database claims nothing: its claims and commits
        // would only stall.
        let usable = *self.usable.borrow();
        let wanted: Vec<u32> = (0..self.config.shards)
            .filter(|s| usable && !self.held.contains_key(s) && is_mine(*s))
            .collect();
        self.pending = !wanted.is_empty();
        if self.pending {
            self.acquire(wanted).await;
            self.pending =
                (0..self.config.shards).any(|s| !self.held.contains_key(&s) && is_mine(s));
        }
    }

    /// Deactivates the shards, then releases their leases.
    async fn hand_off(&mut self, shards: Vec<u32>) {
        for shard in &shards {
            self.held.remove(shard);
        }
        let host = &self.host;
        futures::stream::iter(shards.iter().copied())
            .for_each_concurrent(CONCURRENCY, |shard| async move {
                host.deactivate(shard).await;
            })
            .await;
        self.release(&shards).await;
        self.publish();
    }

    /// Stops renewing and releases the leases (those still ours).
    async fn release(&self, shards: &[u32]) {
        if shards.is_empty() {
            return;
        }
        let _no_renewal = self.leased.renew_lock.lock().await;
        for shard in shards {
            self.leased.revoke(*shard);
        }
        self.leased.with(|leased| {
            for shard in shards {
                leased.remove(shard);
            }
        });
        if let Err(error) = self.leases.release_many(shards).await {
            // The leases then expire by themselves; the next owners only wait longer.
            self.metrics.redis_error("lease");
            tracing::warn!(count = shards.len(), %error, "could not release leases");
        }
    }

    async fn acquire(&mut self, wanted: Vec<u32>) {
        let asked = Instant::now();
        let tokens = match self.leases.acquire_many(&wanted).await {
            Ok(tokens) => tokens,
            Err(error) => {
                self.metrics.redis_error("lease");
                self.round_failed(&error);
                return;
            }
        };
        let acquired: Vec<(u32, i64)> = wanted
            .into_iter()
            .zip(tokens)
            .filter_map(|(shard, token)| token.map(|t| (shard, t)))
            .collect();
        // Renewed from now on, while claims and activations run.
        self.leased
            .with(|leased| leased.extend(acquired.iter().map(|(s, _)| *s)));
        for (shard, _) in &acquired {
            self.leased.granted(*shard, asked);
        }
        // After the first error the rest of the round is skipped: with PostgreSQL
        // down every claim would wait for a connection in turn, stalling this loop.
        let aborted = AtomicBool::new(false);
        let shards: Vec<u32> = acquired.iter().map(|(shard, _)| *shard).collect();
        let mut usable = self.usable.clone();
        let this = &*self;
        let claims = futures::stream::iter(acquired)
            .map(|(shard, token)| {
                let aborted = &aborted;
                async move {
                    if aborted.load(Ordering::Relaxed) {
                        return (shard, Claim::Skipped);
                    }
                    match this.claim_and_activate(shard, token).await {
                        Ok(Some(fence)) => (shard, Claim::Held(fence)),
                        Ok(None) => (shard, Claim::LeaseGone),
                        Err(error) => {
                            aborted.store(true, Ordering::Relaxed);
                            (shard, Claim::Failed(error))
                        }
                    }
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<(u32, Claim)>>();
        // Claims against a database that has just become unusable would each wait for
        // their timeouts, holding this loop (and the hand-off) back.
        let went_unusable = async {
            if usable.wait_for(|usable| !*usable).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let claimed = tokio::select! {
            claimed = claims => Some(claimed),
            () = went_unusable => None,
        };
        let Some(claimed) = claimed else {
            tracing::warn!(
                count = shards.len(),
                "database unusable while claiming; giving the shards back"
            );
            for &shard in &shards {
                self.host.deactivate(shard).await;
            }
            self.release(&shards).await;
            self.publish();
            return;
        };
        let mut not_held = Vec::new();
        let mut first_error = None;
        for (shard, outcome) in claimed {
            match outcome {
                Claim::Held(fence) => {
                    self.held.insert(shard, fence);
                }
                Claim::LeaseGone | Claim::Skipped => not_held.push(shard),
                Claim::Failed(error) => {
                    not_held.push(shard);
                    first_error.get_or_insert(error);
                }
            }
        }
        self.release(&not_held).await;
        self.publish();
        match first_error {
            Some(error) => self.round_failed(&error),
            None => self.round_succeeded(),
        }
    }

    fn round_failed(&mut self, error: &ClusterError) {
        if self.failed_rounds == 0 {
            tracing::warn!(%error, "could not acquire or claim shards; retrying with backoff");
        }
        self.failed_rounds = self.failed_rounds.saturating_add(1);
    }

    fn round_succeeded(&mut self) {
        if self.failed_rounds > 0 {
            tracing::info!("acquiring and claiming shards works again");
            self.failed_rounds = 0;
        }
    }

    /// Pause before retrying shards not held yet: short while a handoff is in
    /// progress, doubling while rounds fail, never beyond a lease TTL.
    fn retry_gap(&self) -> std::time::Duration {
        let base = (self.config.lease_ttl / 10).clamp(
            std::time::Duration::from_millis(20),
            std::time::Duration::from_millis(100),
        );
        (base * 2u32.pow(self.failed_rounds.min(8))).min(self.config.lease_ttl)
    }

    /// Claims `shard` in PostgreSQL with `token` and activates it. If PostgreSQL
    /// already has this fence or a higher one, Redis lost its counter: re-seed it from
    /// PostgreSQL and claim with a new token. `None` if the lease went meanwhile.
    async fn claim_and_activate(
        &self,
        shard: u32,
        token: i64,
    ) -> Result<Option<i64>, ClusterError> {
        let mut token = token;
        for _ in 0..RESEED_ATTEMPTS {
            if claim_fence(&self.db, shard, token, &self.config.node_id).await? {
                self.host.activate(shard, token).await;
                self.metrics.lease_acquired();
                tracing::debug!(shard, fence = token, "shard claimed and activated");
                return Ok(Some(token));
            }
            let stored = current_fence(&self.db, shard).await?.unwrap_or(0);
            tracing::warn!(
                shard,
                token,
                stored,
                "fencing token not above PostgreSQL's fence; re-seeding Redis"
            );
            self.leases.reseed(shard, stored).await?;
            match self.leases.next_token(shard).await? {
                Some(next) => token = next,
                None => return Ok(None),
            }
        }
        Err(ClusterError::FenceNotAdvancing { shard })
    }

    fn publish(&self) {
        let owned: Vec<u32> = self.held.keys().copied().collect();
        self.metrics.set_owned_shards(owned.len());
        match self.owned.lock() {
            Ok(mut o) => *o = owned,
            Err(poisoned) => *poisoned.into_inner() = owned,
        }
    }
}
