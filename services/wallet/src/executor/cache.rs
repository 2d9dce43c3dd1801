//! The node's caches of committed state (wallets, and the holds of its shards), each with
//! a fixed budget and LRU eviction.
//!
//! Evicting is always safe: an evicted entry is loaded from PostgreSQL again, and while
//! the shard's fence holds nobody else writes it. Each entry remembers the fence it was
//! loaded under, so state cached in an earlier tenure of a shard is never trusted: the
//! shard may have had other owners meanwhile.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;
use uuid::Uuid;

use crate::domain::HoldRecord;
use crate::store::WalletState;

/// Stripes of the cache: each has its own lock, so shard executors running on
/// different threads rarely meet on one.
const STRIPES: usize = 64;

#[derive(Clone)]
struct Entry<V> {
    fence: i64,
    state: V,
}

/// Committed state by id, each entry tagged with the fence it was cached under.
pub struct FencedCache<V> {
    stripes: Vec<Mutex<LruCache<Uuid, Entry<V>>>>,
}

pub type WalletCache = FencedCache<WalletState>;
/// Holds of the node's shards as committed: a capture, void or expiry of a hold created
/// or loaded in this tenure needs no read.
pub type HoldCache = FencedCache<HoldRecord>;

/// The node's caches, shared by its shard executors.
pub struct Caches {
    pub wallets: WalletCache,
    pub holds: HoldCache,
}

impl<V: Clone> FencedCache<V> {
    /// A cache of at most `budget` entries (at least one per stripe).
    pub fn new(budget: usize) -> Self {
        let per_stripe = NonZeroUsize::new(budget.div_ceil(STRIPES)).unwrap_or(NonZeroUsize::MIN);
        Self {
            stripes: (0..STRIPES)
                .map(|_| Mutex::new(LruCache::new(per_stripe)))
                .collect(),
        }
    }

    fn stripe(&self, wallet_id: &Uuid) -> std::sync::MutexGuard<'_, LruCache<Uuid, Entry<V>>> {
        // Wallet ids are v7 UUIDs: the low bits are random.
        let index = (wallet_id.as_u128() as usize) % self.stripes.len();
        self.stripes[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The cached state, if it was cached under `fence`.
    pub fn get(&self, fence: i64, wallet_id: &Uuid) -> Option<V> {
        let mut stripe = self.stripe(wallet_id);
        match stripe.get(wallet_id) {
            Some(entry) if entry.fence == fence => Some(entry.state.clone()),
            Some(_) => {
                stripe.pop(wallet_id);
                None
            }
            None => None,
        }
    }

    /// The cached state, if it was cached under `fence`, without making it more recent:
    /// reads must not keep wallets in the cache that no write uses.
    pub fn peek(&self, fence: i64, wallet_id: &Uuid) -> Option<V> {
        match self.stripe(wallet_id).peek(wallet_id) {
            Some(entry) if entry.fence == fence => Some(entry.state.clone()),
            _ => None,
        }
    }

    /// Records committed state; the least recently used wallet makes room.
    pub fn put(&self, fence: i64, wallet_id: Uuid, state: V) {
        self.stripe(&wallet_id)
            .put(wallet_id, Entry { fence, state });
    }

    /// Records committed state of a wallet only if it is cached already, without making
    /// it more recent: a stream of refused withdrawals must not keep a wallet in the cache.
    pub fn refresh(&self, fence: i64, wallet_id: Uuid, state: V) {
        let mut stripe = self.stripe(&wallet_id);
        if let Some(entry) = stripe.peek_mut(&wallet_id) {
            *entry = Entry { fence, state };
        }
    }

    pub fn remove(&self, wallet_id: &Uuid) {
        self.stripe(wallet_id).pop(wallet_id);
    }

    pub fn len(&self) -> usize {
        self.stripes
            .iter()
            .map(|stripe| stripe.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;

    fn state(version: i64) -> WalletState {
        WalletState {
            balance: Decimal::new(version * 100, 2),
            held: Decimal::ZERO,
            overdraft_limit: Decimal::ZERO,
            version,
            tenant: crate::auth::Tenant::parse("t").expect("tenant"),
            updated_at: chrono::DateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn the_budget_holds_and_the_least_recent_wallet_goes_first() {
        let cache = WalletCache::new(STRIPES * 2);
        let ids: Vec<Uuid> = (0..STRIPES * 10).map(|_| Uuid::now_v7()).collect();
        for id in &ids {
            cache.put(1, *id, state(1));
        }
        assert!(cache.len() <= STRIPES * 2, "{} cached", cache.len());
        // The newest two of each stripe survive.
        assert_eq!(cache.get(1, ids.last().expect("ids")), Some(state(1)));
    }

    #[test]
    fn state_cached_under_another_fence_is_not_used() {
        let cache = WalletCache::new(1000);
        let id = Uuid::now_v7();
        cache.put(7, id, state(3));
        assert_eq!(cache.get(8, &id), None);
        assert_eq!(cache.get(7, &id), None, "dropped once seen as stale");
    }

    #[test]
    fn refresh_updates_without_inserting() {
        let cache = WalletCache::new(1000);
        let id = Uuid::now_v7();
        cache.refresh(1, id, state(2));
        assert_eq!(cache.get(1, &id), None);
        cache.put(1, id, state(2));
        cache.refresh(1, id, state(3));
        assert_eq!(cache.get(1, &id), Some(state(3)));
    }
}
