//! In-progress claims of `MemoryStore`: a small sharded map that never evicts.
//!
//! Claims are not cached data: evicting one would let a duplicate run the body a second time.
//! So they never enter moka; each lives in one of a few dozen shards (a `HashMap` behind a
//! `std::sync::Mutex`, beside the `Notify` its waiters sleep on), and the store bounds their
//! number (`max_in_progress`) instead.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use idem_core::{ClaimTimes, FencingToken, Fingerprint};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::key_map::{KeyHashing, MapKey};

/// One in-progress claim.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) token: FencingToken,
    pub(super) fingerprint: Option<Fingerprint>,
    pub(super) lease_until: Instant,
    /// When the claim was made (a takeover or a new claim; not a retried one).
    pub(super) since: Instant,
    /// How many times its holder renewed it.
    pub(super) renewals: u32,
    /// A caller waits on it: completing or releasing it must notify.
    pub(super) waiters: bool,
}

impl Held {
    /// Its age, lease left and renewals at `now`.
    pub(super) fn times(&self, now: Instant) -> ClaimTimes {
        ClaimTimes::new(
            Some(now.saturating_duration_since(self.since)),
            Some(self.lease_until.saturating_duration_since(now)),
            Some(u64::from(self.renewals)),
        )
    }
}

pub(super) type ClaimMap = HashMap<MapKey, Held, KeyHashing>;

/// A shard of claims and the notification its waiters sleep on, on a cache line of their own.
/// Its lock is also the one every state change of its keys takes (see `MemoryStore`'s
/// handover).
#[repr(align(128))]
pub(super) struct Lane {
    claims: Mutex<ClaimMap>,
    pub(super) notify: Notify,
}

impl Lane {
    pub(super) fn new(hashing: KeyHashing) -> Self {
        Lane {
            claims: Mutex::new(HashMap::with_hasher(hashing)),
            notify: Notify::new(),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, ClaimMap> {
        // No code panics while holding a lane lock; if one ever did, the map is still
        // consistent (every update is a single map operation), so go on.
        self.claims.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Removes claims whose lease passed before `now` (their holders are gone: a live holder
/// renews). Returns how many.
pub(super) fn sweep_lapsed(map: &mut ClaimMap, now: Instant) -> usize {
    let before = map.len();
    map.retain(|_, held| held.lease_until > now);
    before - map.len()
}
