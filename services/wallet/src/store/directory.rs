//! What never changes once written, remembered by every node: a wallet's tenant and a
//! hold's wallet. Wallets and holds are never deleted or moved, so a remembered answer
//! stays true and saves a read per transfer and per capture or void. Only found rows are
//! remembered; a miss is always asked again.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;
use uuid::Uuid;

use crate::auth::Tenant;

/// Entries of each of the two maps.
const ENTRIES: NonZeroUsize = match NonZeroUsize::new(65_536) {
    Some(entries) => entries,
    None => NonZeroUsize::MIN,
};

pub(super) struct Directory {
    wallets: Mutex<LruCache<Uuid, Tenant>>,
    holds: Mutex<LruCache<Uuid, (Tenant, Uuid)>>,
}

impl Directory {
    pub(super) fn new() -> Self {
        Self {
            wallets: Mutex::new(LruCache::new(ENTRIES)),
            holds: Mutex::new(LruCache::new(ENTRIES)),
        }
    }

    pub(super) fn wallet_tenant(&self, wallet_id: &Uuid) -> Option<Tenant> {
        self.wallets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(wallet_id)
            .cloned()
    }

    pub(super) fn remember_wallet(&self, wallet_id: Uuid, tenant: Tenant) {
        self.wallets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .put(wallet_id, tenant);
    }

    pub(super) fn hold_wallet(&self, hold_id: &Uuid) -> Option<(Tenant, Uuid)> {
        self.holds
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(hold_id)
            .cloned()
    }

    pub(super) fn remember_hold(&self, hold_id: Uuid, tenant: Tenant, wallet_id: Uuid) {
        self.holds
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .put(hold_id, (tenant, wallet_id));
    }
}
