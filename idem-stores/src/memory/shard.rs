//! One shard of `MemoryStore`: a map of records behind one mutex, and the byte-bounded
//! first-in-first-out order in which its completed records are evicted.
//!
//! In-progress claims are in the map but not in the eviction order, so nothing evicts them;
//! the store bounds their number instead (`max_in_progress`).

use std::collections::{HashMap, VecDeque};

use idem_core::{Bytes, CompletedRecord, FencingToken, Fingerprint, Key};
use tokio::time::Instant;

pub(super) use crate::key_map::{KeyHashing, MapKey};

/// The state of one key.
#[derive(Debug)]
pub(super) enum Slot {
    InProgress {
        token: FencingToken,
        fingerprint: Option<Fingerprint>,
        lease_until: Instant,
        /// A caller waits on it: completing or releasing it must notify.
        waiters: bool,
    },
    Completed {
        /// The token it was completed under, so that a retried completion is recognised.
        token: FencingToken,
        fingerprint: Option<Fingerprint>,
        value: Bytes,
        expires_at: Instant,
        /// Its place in the eviction order.
        seq: u64,
    },
}

impl Slot {
    pub(super) fn record(
        fingerprint: Option<Fingerprint>,
        value: &Bytes,
        expires_at: Instant,
        now: Instant,
    ) -> CompletedRecord {
        CompletedRecord {
            fingerprint,
            // A reference count, not a copy: replays share the stored bytes.
            value: value.clone(),
            expires_in: Some(expires_at.saturating_duration_since(now)),
        }
    }
}

/// What a completed record costs beyond its value's bytes, measured with the counting
/// allocator of `idem-bench/benches/memory.rs` (docs/stores/memory.md): the map's slot at the
/// table's average load, its place in the eviction order, the shared header of its `Bytes`,
/// and the allocator's own header of two allocations.
pub(super) const RECORD_OVERHEAD: usize = 320;

/// The bytes a completed record of `len` value bytes is charged: its value rounded up as the
/// allocator rounds it, plus [`RECORD_OVERHEAD`].
pub(super) fn weight(len: usize) -> usize {
    (len.saturating_add(8 + 15) & !15).saturating_add(RECORD_OVERHEAD)
}

/// A shard: records, and the eviction order of its completed records.
#[derive(Debug)]
pub(super) struct Shard {
    pub(super) map: HashMap<MapKey, Slot, KeyHashing>,
    /// Completed records, oldest first, as (key, seq). An entry whose key holds another seq (or
    /// nothing) is stale and skipped.
    order: VecDeque<(Key, u64)>,
    /// How many entries of `order` are live.
    live: usize,
    /// What the completed records of this shard are charged, in bytes.
    pub(super) bytes: usize,
    /// The bound on `bytes`.
    budget: usize,
    next_seq: u64,
    /// In-progress claims in this shard (live or lapsed).
    pub(super) claims: usize,
}

impl Shard {
    pub(super) fn new(budget: usize, hashing: KeyHashing) -> Self {
        Shard {
            map: HashMap::with_hasher(hashing),
            order: VecDeque::new(),
            live: 0,
            bytes: 0,
            budget,
            next_seq: 0,
            claims: 0,
        }
    }

    /// Stores a completed record in place of the in-progress claim of `key`, then evicts the
    /// oldest completed records until the shard is within its budget again.
    pub(super) fn complete(
        &mut self,
        key: Key,
        token: FencingToken,
        fingerprint: Option<Fingerprint>,
        value: Bytes,
        expires_at: Instant,
        now: Instant,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += weight(value.len());
        self.live += 1;
        self.order.push_back((key, seq));
        let previous = self.map.insert(
            MapKey(key),
            Slot::Completed {
                token,
                fingerprint,
                value,
                expires_at,
                seq,
            },
        );
        if let Some(previous) = previous {
            self.forget(&previous);
        }
        self.evict(now);
    }

    /// Removes what `key` holds and keeps the counters right. Returns the removed slot.
    pub(super) fn remove(&mut self, key: &Key) -> Option<Slot> {
        let slot = self.map.remove(&MapKey(*key))?;
        self.forget(&slot);
        Some(slot)
    }

    /// Accounts for a slot that left the map (removed or replaced).
    pub(super) fn forget(&mut self, slot: &Slot) {
        match slot {
            Slot::InProgress { .. } => self.claims -= 1,
            Slot::Completed { value, .. } => {
                self.bytes -= weight(value.len());
                self.live -= 1;
            }
        }
    }

    /// Drops the oldest completed records while over budget, and expired or stale ones at the
    /// front of the order whatever the budget (so that expired records do not linger where
    /// TTLs are uniform). Keeps the order compact.
    fn evict(&mut self, now: Instant) {
        while let Some(&(key, seq)) = self.order.front() {
            let over = self.bytes > self.budget;
            match self.map.get(&MapKey(key)) {
                Some(Slot::Completed {
                    seq: s, expires_at, ..
                }) if *s == seq => {
                    if !over && *expires_at > now {
                        break;
                    }
                    self.order.pop_front();
                    if let Some(slot) = self.map.remove(&MapKey(key)) {
                        self.forget(&slot);
                    }
                }
                // Stale: replaced, removed or expired through another path.
                _ => {
                    self.order.pop_front();
                }
            }
        }
        if self.order.len() > 2 * self.live + 32 {
            let map = &self.map;
            self.order.retain(|(key, seq)| {
                matches!(map.get(&MapKey(*key)), Some(Slot::Completed { seq: s, .. }) if s == seq)
            });
            self.order.shrink_to(2 * self.live.max(16));
        }
    }

    /// Removes in-progress claims whose lease passed before `now` (their holders are gone: a
    /// live holder renews). Returns how many.
    pub(super) fn sweep_lapsed(&mut self, now: Instant) -> usize {
        let before = self.claims;
        self.map.retain(|_, slot| match slot {
            Slot::InProgress { lease_until, .. } => *lease_until > now,
            Slot::Completed { .. } => true,
        });
        self.claims = self
            .map
            .values()
            .filter(|s| matches!(s, Slot::InProgress { .. }))
            .count();
        before - self.claims
    }
}
