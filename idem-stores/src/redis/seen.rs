//! Keys this store has seen completed: a hint that the next claim of such a key is a replay,
//! so that it is read with a native `GET` (the cheapest command Redis has) instead of the
//! claim's `SET … NX PX … GET`.
//!
//! The hint is only ever a guess about where to start: a claim whose `GET` finds anything but
//! a live completed record (the record expired, was removed, or is foreign) forgets the hint
//! and claims as usual. A wrong hint costs one extra round trip, never a wrong answer: the
//! `GET` changes nothing, and the decision to run a body is still taken by the atomic
//! `SET … NX`. Entries end at the record's expiry as this process estimates it.
//!
//! Bounded: a few shards of at most `capacity / SHARDS` keys each; a full shard drops its
//! expired entries, and if none are, starts over empty (hints are cheap to relearn).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use idem_core::Key;

use crate::key_map::{KeyHashing, MapKey};

const SHARDS: usize = 16;

pub(crate) struct Seen {
    shards: Box<[Mutex<HashMap<MapKey, Instant, KeyHashing>>]>,
    per_shard: usize,
}

impl Seen {
    /// Remembers up to about `capacity` keys; `0` remembers none.
    pub(crate) fn new(capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS);
        Seen {
            shards: (0..if per_shard == 0 { 0 } else { SHARDS })
                .map(|_| Mutex::new(HashMap::with_hasher(KeyHashing::random())))
                .collect(),
            per_shard,
        }
    }

    fn shard(&self, key: &Key) -> Option<&Mutex<HashMap<MapKey, Instant, KeyHashing>>> {
        if self.shards.is_empty() {
            return None;
        }
        // Keys are uniform hashes: any of their first 16 bytes is uniform.
        self.shards.get(usize::from(key.0[8]) % self.shards.len())
    }

    /// Whether `key` was seen completed and its record should still be live.
    pub(crate) fn likely_completed(&self, key: &Key) -> bool {
        let Some(shard) = self.shard(key) else {
            return false;
        };
        let map = shard.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&MapKey(*key))
            .is_some_and(|until| *until > Instant::now())
    }

    /// `key` holds a completed record for about `left` more.
    pub(crate) fn completed(&self, key: &Key, left: Duration) {
        let Some(shard) = self.shard(key) else {
            return;
        };
        let now = Instant::now();
        let Some(until) = now.checked_add(left) else {
            return;
        };
        let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.per_shard && !map.contains_key(&MapKey(*key)) {
            map.retain(|_, u| *u > now);
            if map.len() >= self.per_shard {
                map.clear();
            }
        }
        map.insert(MapKey(*key), until);
    }

    /// `key` is not (or no longer) known to be completed.
    pub(crate) fn forget(&self, key: &Key) {
        if let Some(shard) = self.shard(key) {
            shard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&MapKey(*key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> Key {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&i.to_le_bytes());
        k[8] = i as u8;
        Key(k)
    }

    #[test]
    fn remembers_until_the_expiry_and_forgets() {
        let seen = Seen::new(1000);
        assert!(!seen.likely_completed(&key(1)));
        seen.completed(&key(1), Duration::from_secs(60));
        assert!(seen.likely_completed(&key(1)));
        seen.forget(&key(1));
        assert!(!seen.likely_completed(&key(1)));
        seen.completed(&key(2), Duration::ZERO);
        assert!(
            !seen.likely_completed(&key(2)),
            "an expired hint is no hint"
        );
    }

    #[test]
    fn stays_bounded_and_zero_disables() {
        let seen = Seen::new(160);
        for i in 0..10_000 {
            seen.completed(&key(i), Duration::from_secs(60));
        }
        let total: usize = seen.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(total <= 160, "{total}");
        let off = Seen::new(0);
        off.completed(&key(1), Duration::from_secs(60));
        assert!(!off.likely_completed(&key(1)));
    }
}
