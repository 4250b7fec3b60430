//! Durable steps of `MemoryStore`: each call's step records, in a sharded map beside the
//! claims.
//!
//! - **Fenced under the claim's lock.** A step write takes the lock of its call's claim shard
//!   (the lock every state change of the call takes), checks that the call is in progress
//!   under the writer's token, and inserts the step record while it still holds that lock. A
//!   completion, a release, a takeover or a removal of the call therefore comes wholly before
//!   the write (which is then refused) or wholly after it. Lock order: claim shard, then step
//!   shard; nothing takes them the other way round.
//! - **Never evicted.** A step record is not cached data: evicting one would run a finished
//!   step again. So steps do not live in moka. They are bounded apart from the completed
//!   records, by the same number of bytes as `max_bytes` (each step charged its value, its
//!   name and [`STEP_OVERHEAD`]); past it, expired steps are swept and, if that is not enough,
//!   the write is refused with a [`StoreError::Backend`] whose source is a
//!   [`StepCapacityError`] (the step then behaves as if its record had not been written).
//! - **Expiry on tokio's clock**, like the records: a step record expires `ttl` after its
//!   write, is never answered past it, and is dropped when met (a read of its call, a write
//!   of its call, a sweep).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use idem_core::{Bytes, FencingToken, Key, StepId, StepRecord, StepStatus, StoreError};
use tokio::time::Instant;

use super::{after, MemoryStore};
use crate::key_map::{KeyHashing, MapKey};

/// What one step record is charged beyond its value and name: the map entry, the `StepId`'s
/// `String` and the `Bytes` handle, rounded up.
pub const STEP_OVERHEAD: usize = 128;

/// The number of step shards.
const SHARDS: usize = 64;

/// A step write refused because the steps of all calls already take the store's
/// `max_bytes`: the source of the [`StoreError::Backend`] that [`MemoryStore::put_step`]
/// answers then (steps are never evicted).
///
/// [`MemoryStore::put_step`]: idem_core::Store::put_step
#[derive(Debug, thiserror::Error)]
#[error(
    "memory store: durable steps take {limit} bytes, the store's max_bytes; raise max_bytes, \
     shorten the ttl of calls with steps, or record smaller step values"
)]
pub struct StepCapacityError {
    /// The bound in bytes.
    pub limit: u64,
}

/// One step record.
struct Entry {
    status: StepStatus,
    value: Bytes,
    expires_at: Instant,
}

impl Entry {
    fn cost(id: &StepId, value: &[u8]) -> u64 {
        (value.len() + id.name.len() + STEP_OVERHEAD) as u64
    }
}

/// A call's steps. Step ids are chosen by the program (its step names), not by its callers,
/// so they are hashed with a fast unkeyed hash (FNV-1a) instead of SipHash.
type CallSteps = HashMap<StepId, Entry, BuildHasherDefault<Fnv>>;

/// FNV-1a, 64 bits.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The capacity a call's step map starts with (grown past it).
const CALL_STEPS: usize = 8;
type Shard = HashMap<MapKey, CallSteps, KeyHashing>;

/// The step records of every call.
pub(super) struct Steps {
    shards: Box<[Mutex<Shard>]>,
    /// What the step records are charged in all.
    bytes: AtomicU64,
    limit: u64,
    /// Writes since the last partial sweep (a shard is swept every `SWEEP_EVERY` writes).
    writes: AtomicUsize,
}

/// Every this many step writes, one shard's expired steps are swept.
const SWEEP_EVERY: usize = 256;

impl Steps {
    pub(super) fn new(limit: u64, hashing: KeyHashing) -> Self {
        Steps {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(hashing)))
                .collect(),
            bytes: AtomicU64::new(0),
            limit,
            writes: AtomicUsize::new(0),
        }
    }

    fn shard(&self, key: &Key) -> MutexGuard<'_, Shard> {
        let k = &key.0;
        let i = usize::from(k[3]) ^ usize::from(k[21]);
        // No code panics while holding a step shard lock; every update keeps the map whole.
        self.shards[i % self.shards.len()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the expired steps of one call (its shard is locked); returns the bytes freed.
    fn drop_expired(calls: &mut CallSteps, now: Instant) -> u64 {
        let mut freed = 0;
        calls.retain(|id, e| {
            let live = e.expires_at > now;
            if !live {
                freed += Entry::cost(id, &e.value);
            }
            live
        });
        freed
    }

    /// Sweeps the expired steps of the shards `range`.
    fn sweep(&self, range: std::ops::Range<usize>, now: Instant) {
        for shard in &self.shards[range] {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            let mut freed = 0;
            shard.retain(|_, calls| {
                freed += Self::drop_expired(calls, now);
                !calls.is_empty()
            });
            self.bytes.fetch_sub(freed, Ordering::Relaxed);
        }
    }

    /// Removes every step of `key`.
    pub(super) fn remove(&self, key: &Key) {
        if let Some(calls) = self.shard(key).remove(&MapKey(*key)) {
            let freed: u64 = calls.iter().map(|(id, e)| Entry::cost(id, &e.value)).sum();
            self.bytes.fetch_sub(freed, Ordering::Relaxed);
        }
    }

    /// What the step records are charged in all, in bytes.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Removes up to `batch` expired step records; returns how many.
    pub(super) fn purge(&self, batch: usize, now: Instant) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            if removed >= batch {
                break;
            }
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            let mut freed = 0;
            shard.retain(|_, calls| {
                calls.retain(|id, e| {
                    if removed < batch && e.expires_at <= now {
                        removed += 1;
                        freed += Entry::cost(id, &e.value);
                        false
                    } else {
                        true
                    }
                });
                !calls.is_empty()
            });
            self.bytes.fetch_sub(freed, Ordering::Relaxed);
        }
        removed
    }
}

impl MemoryStore {
    /// The body of `Store::load_steps`: the live steps of `key`, in one look at its shard.
    pub(super) fn load_steps_now(&self, key: &Key) -> Vec<StepRecord> {
        let now = Instant::now();
        let steps = &self.inner.steps;
        let mut shard = steps.shard(key);
        let Some(calls) = shard.get_mut(&MapKey(*key)) else {
            return Vec::new();
        };
        let freed = Steps::drop_expired(calls, now);
        let out = calls
            .iter()
            .map(|(id, e)| StepRecord::new(id.clone(), e.status, e.value.clone()))
            .collect();
        if calls.is_empty() {
            shard.remove(&MapKey(*key));
        }
        steps.bytes.fetch_sub(freed, Ordering::Relaxed);
        out
    }

    /// The body of `Store::put_step`: fenced under the claim shard's lock.
    pub(super) fn put_step_now(
        &self,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let limit = self.inner.max_value_size;
        if step.value.len() > limit {
            return Err(StoreError::TooLarge {
                size: step.value.len(),
                limit,
            });
        }
        let steps = &self.inner.steps;
        let cost = Entry::cost(&step.id, &step.value);
        if steps.writes.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            let i = steps.writes.load(Ordering::Relaxed) / SWEEP_EVERY % SHARDS;
            steps.sweep(i..i + 1, Instant::now());
        }
        // Reserve the cost first, so that concurrent writes cannot pass the bound together.
        if steps.bytes.fetch_add(cost, Ordering::Relaxed) + cost > steps.limit {
            steps.sweep(0..SHARDS, Instant::now());
            if steps.bytes() > steps.limit {
                steps.bytes.fetch_sub(cost, Ordering::Relaxed);
                return Err(StoreError::backend(
                    "put_step",
                    StepCapacityError { limit: steps.limit },
                ));
            }
        }
        // Copied once, outside the locks (a `Bytes` from a caller may be a slice of a larger
        // buffer, which would escape the bound).
        let value = Bytes::copy_from_slice(&step.value);
        let claims = self.lane(key).lock();
        let now = Instant::now();
        match claims.get(&MapKey(*key)) {
            Some(held) if held.token == token => {}
            _ => {
                drop(claims);
                steps.bytes.fetch_sub(cost, Ordering::Relaxed);
                return Err(StoreError::Fenced);
            }
        }
        let mut shard = steps.shard(key);
        let calls = shard.entry(MapKey(*key)).or_insert_with(|| {
            HashMap::with_capacity_and_hasher(CALL_STEPS, BuildHasherDefault::default())
        });
        let mut freed = Steps::drop_expired(calls, now);
        let entry = Entry {
            status: step.status,
            value,
            expires_at: after(now, ttl),
        };
        if let Some(old) = calls.insert(step.id.clone(), entry) {
            freed += Entry::cost(&step.id, &old.value);
        }
        drop(shard);
        drop(claims);
        steps.bytes.fetch_sub(freed, Ordering::Relaxed);
        Ok(())
    }

    /// The body of `Store::clear_step`: fenced like a write.
    pub(super) fn clear_step_now(
        &self,
        key: &Key,
        token: FencingToken,
        id: &StepId,
    ) -> Result<(), StoreError> {
        let claims = self.lane(key).lock();
        match claims.get(&MapKey(*key)) {
            Some(held) if held.token == token => {}
            _ => return Err(StoreError::Fenced),
        }
        let steps = &self.inner.steps;
        let mut shard = steps.shard(key);
        let Some(calls) = shard.get_mut(&MapKey(*key)) else {
            return Ok(());
        };
        if let Some(old) = calls.remove(id) {
            steps
                .bytes
                .fetch_sub(Entry::cost(id, &old.value), Ordering::Relaxed);
        }
        if calls.is_empty() {
            shard.remove(&MapKey(*key));
        }
        Ok(())
    }

    /// What the durable step records of all calls are charged, in bytes (bounded by
    /// `max_bytes`, apart from the completed records).
    pub fn step_bytes(&self) -> u64 {
        self.inner.steps.bytes()
    }
}
