//! `MemoryStore`: records in a sharded map in the process.
//!
//! - **Claims are never evicted.** Every record lives in one of a few dozen shards, each a
//!   `HashMap` behind a `std::sync::Mutex`; every operation on a key is one critical section
//!   on its shard, so of any number of concurrent claims exactly one inserts, and a claim and
//!   its completion each take the lock once. In-progress claims are bounded by
//!   `max_in_progress` (live concurrency, not traffic): past it a claim is refused with a
//!   [`StoreError::Backend`] whose source is a [`CapacityError`] — never an eviction.
//! - **Completed records are bounded in bytes.** Each is charged what it really costs (its
//!   value as the allocator rounds it, plus a measured per-record overhead: the map slot, the
//!   eviction order, the `Bytes` header), and past a shard's share of `max_bytes` the oldest
//!   completed records are evicted first. An evicted completed record runs again on its next
//!   call; an in-progress claim is never a candidate.
//! - **Replays share the stored bytes**: a replay gets a [`Bytes`](idem_core::Bytes) handle on
//!   the stored value (a reference count), and [`Store::completed_now`] answers it without a
//!   future, before the runtime claims.
//! - **Time is tokio's clock** ([`tokio::time::Instant`]), so `tokio::time::pause()` and
//!   `advance()` move TTLs and leases in tests.
//! - **Waiting** is a `tokio::sync::Notify` per shard: completing, releasing or removing a
//!   record that has waiters wakes them, and they look again. No polling.
//!
//! A `MemoryStore` protects calls within one process only: use a shared store (Redis, SQL)
//! when a service runs on more than one instance.

mod admin;
mod shard;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use idem_core::{
    async_trait, Bytes, Claim, ClaimRequest, CompletedRecord, FencingToken, Key, RecordState,
    Store, StoreError, DEFAULT_MAX_VALUE_SIZE,
};
use tokio::sync::Notify;
use tokio::time::Instant;

use shard::{KeyHashing, MapKey, Shard, Slot};

/// The most shards a store has.
const MAX_SHARDS: usize = 64;

/// A claim refused because `max_in_progress` claims are already held: the source of the
/// [`StoreError::Backend`] that [`MemoryStore`] answers then.
///
/// ```
/// # async fn demo() {
/// use idem_core::{testkit, Store, StoreError};
/// let store = idem_stores::MemoryStore::builder().max_in_progress(1).build();
/// let lease = std::time::Duration::from_secs(30);
/// store.claim(&testkit::claim_request(testkit::fresh_key(), lease).0).await.unwrap();
/// let err = store.claim(&testkit::claim_request(testkit::fresh_key(), lease).0).await.unwrap_err();
/// let source = std::error::Error::source(&err).unwrap();
/// assert!(source.to_string().contains("max_in_progress"));
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[error(
    "memory store: {limit} claims are in progress, the store's max_in_progress; \
     raise it or lower the concurrency"
)]
pub struct CapacityError {
    /// The configured `max_in_progress`.
    pub limit: usize,
}

/// A shard and the notification its waiters sleep on, on a cache line of their own.
#[repr(align(128))]
struct Lane {
    records: Mutex<Shard>,
    notify: Notify,
}

struct Inner {
    lanes: Box<[Lane]>,
    seed: u64,
    max_bytes: u64,
    max_value_size: usize,
    max_in_progress: usize,
    /// In-progress claims in all shards (live or lapsed).
    claims: AtomicUsize,
}

/// An in-process store. Cheap to clone (clones share the records).
///
/// ```
/// use idem_stores::MemoryStore;
/// let store = MemoryStore::builder()
///     .max_bytes(64 << 20)           // completed records, charged what they really cost
///     .max_value_size(256 << 10)     // largest encoded result
///     .max_in_progress(10_000)       // claims held at once
///     .build();
/// let shared: std::sync::Arc<dyn idem_core::Store> = std::sync::Arc::new(store);
/// # let _ = shared;
/// ```
///
/// Under `tokio::time::pause()`, TTLs and leases follow the paused clock:
///
/// ```
/// use std::time::Duration;
/// use idem_core::{Call, Error};
/// use idem_stores::MemoryStore;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// // In a test: #[tokio::test(start_paused = true)], or tokio::time::pause().
/// let store = MemoryStore::new();
/// let runs = std::sync::atomic::AtomicU32::new(0);
/// let call = || {
///     let n = runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
///     Call::new("doc::charge")
///         .key("order-1")
///         .ttl(Duration::from_secs(3600))
///         .run(&store, async move { Ok::<_, Error>(n) })
/// };
/// assert_eq!(call().await.unwrap(), 1);
/// assert_eq!(call().await.unwrap(), 1); // replayed
/// tokio::time::advance(Duration::from_secs(2 * 3600)).await;
/// assert_eq!(call().await.unwrap(), 3); // past the ttl: the body runs again
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.inner.lanes.len())
            .field("max_bytes", &self.inner.max_bytes)
            .field("max_value_size", &self.inner.max_value_size)
            .field("max_in_progress", &self.inner.max_in_progress)
            .finish()
    }
}

/// Configures a [`MemoryStore`].
#[derive(Debug, Clone)]
pub struct MemoryStoreBuilder {
    max_bytes: u64,
    max_value_size: usize,
    max_in_progress: usize,
}

impl MemoryStoreBuilder {
    /// The bound on completed records, in bytes: each is charged its value plus a measured
    /// per-record overhead (about 320 bytes, see docs/stores/memory.md), so that this bounds
    /// the heap they take. Default 256 MiB.
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// The largest encoded value accepted. Default 1 MiB (and at most a quarter of a shard's
    /// share of `max_bytes`).
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes;
        self
    }

    /// The most claims in progress at once; a claim past it is refused with a
    /// [`CapacityError`] (never an eviction). Lapsed claims are swept before refusing.
    /// Default 100,000.
    pub fn max_in_progress(mut self, claims: usize) -> Self {
        self.max_in_progress = claims.max(1);
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        let max_bytes = usize::try_from(self.max_bytes).unwrap_or(usize::MAX);
        // As many shards as keep each shard's budget at least four largest values.
        let per_value = shard::weight(self.max_value_size).saturating_mul(4);
        let mut shards = MAX_SHARDS;
        while shards > 1 && max_bytes / shards < per_value {
            shards /= 2;
        }
        let budget = max_bytes / shards;
        let hashing = KeyHashing::random();
        let [lane_seed] = crate::key_map::random_words();
        let lanes = (0..shards)
            .map(|_| Lane {
                records: Mutex::new(Shard::new(budget, hashing)),
                notify: Notify::new(),
            })
            .collect();
        // A value must fit its shard's budget with room to spare.
        let fits = budget.saturating_sub(shard::RECORD_OVERHEAD + 16);
        MemoryStore {
            inner: Arc::new(Inner {
                lanes,
                seed: lane_seed | 1,
                max_bytes: self.max_bytes,
                max_value_size: self.max_value_size.min(fits),
                max_in_progress: self.max_in_progress,
                claims: AtomicUsize::new(0),
            }),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

/// `now + d`, or a century from now if that overflows (a `Duration::MAX` ttl is "forever").
fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

/// What a claim found, decided under the shard lock.
enum Claimed {
    Answer(Claim),
    /// At `max_in_progress`: sweep every shard, then try once more.
    Full,
}

impl MemoryStore {
    /// A store with the default bounds (256 MiB, values up to 1 MiB, 100,000 claims).
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder for other bounds.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            max_bytes: 256 << 20,
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
            max_in_progress: 100_000,
        }
    }

    /// The number of records (completed and in progress).
    pub fn entry_count(&self) -> u64 {
        self.inner
            .lanes
            .iter()
            .map(|l| lock(&l.records).map.len() as u64)
            .sum()
    }

    /// What the completed records are charged in all, in bytes (never above `max_bytes`).
    pub fn weighted_size(&self) -> u64 {
        self.inner
            .lanes
            .iter()
            .map(|l| lock(&l.records).bytes as u64)
            .sum()
    }

    /// The number of claims in progress (including lapsed ones not yet swept).
    pub fn in_progress(&self) -> usize {
        self.inner.claims.load(Ordering::Relaxed)
    }

    /// Nothing to do: the store applies every write at once. Kept for the callers of the
    /// moka-based store, which applied evictions lazily.
    pub async fn run_pending_tasks(&self) {}

    fn lane(&self, key: &Key) -> &Lane {
        let k = &key.0;
        let w = u64::from_le_bytes([k[8], k[9], k[10], k[11], k[12], k[13], k[14], k[15]]);
        let i = (w ^ self.inner.seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        &self.inner.lanes[i as usize % self.inner.lanes.len()]
    }

    /// Runs `f` on the key's shard under its lock, keeping the store's claim count in step.
    fn with_shard<R>(&self, key: &Key, f: impl FnOnce(&mut Shard) -> R) -> (R, &Notify) {
        let lane = self.lane(key);
        let mut shard = lock(&lane.records);
        let before = shard.claims;
        let r = f(&mut shard);
        let after = shard.claims;
        drop(shard);
        if after > before {
            self.inner
                .claims
                .fetch_add(after - before, Ordering::Relaxed);
        } else if before > after {
            self.inner
                .claims
                .fetch_sub(before - after, Ordering::Relaxed);
        }
        (r, &lane.notify)
    }

    /// Removes lapsed claims from every shard.
    fn sweep_all(&self) {
        let now = Instant::now();
        for lane in self.inner.lanes.iter() {
            let swept = lock(&lane.records).sweep_lapsed(now);
            self.inner.claims.fetch_sub(swept, Ordering::Relaxed);
        }
    }

    fn claim_once(&self, req: &ClaimRequest) -> Claimed {
        let (claimed, _) = self.with_shard(&req.key, |shard| {
            let now = Instant::now();
            let fresh = |waiters| Slot::InProgress {
                token: req.token,
                fingerprint: req.fingerprint,
                lease_until: after(now, req.lease),
                waiters,
            };
            let key = MapKey(req.key);
            let answer = match shard.map.get_mut(&key) {
                Some(Slot::InProgress {
                    token, lease_until, ..
                }) if *token == req.token => {
                    // Our own claim, retried after a lost reply: restart the lease.
                    *lease_until = after(now, req.lease);
                    Claim::Acquired { taken_over: false }
                }
                Some(Slot::InProgress {
                    fingerprint,
                    lease_until,
                    waiters,
                    ..
                }) => {
                    if *lease_until > now {
                        return Claimed::Answer(Claim::InProgress {
                            fingerprint: *fingerprint,
                            lease_remaining: Some(lease_until.saturating_duration_since(now)),
                        });
                    }
                    // The holder's lease passed: take over, in place (the claim count stays).
                    let waiters = *waiters;
                    shard.map.insert(key, fresh(waiters));
                    Claim::Acquired { taken_over: true }
                }
                Some(Slot::Completed {
                    fingerprint,
                    value,
                    expires_at,
                    ..
                }) if *expires_at > now => {
                    Claim::Completed(Slot::record(*fingerprint, value, *expires_at, now))
                }
                expired_or_absent => {
                    if expired_or_absent.is_some() {
                        shard.remove(&req.key);
                    }
                    let held = self.inner.claims.load(Ordering::Relaxed);
                    if held >= self.inner.max_in_progress {
                        // Lapsed claims of this shard first; the whole store if need be.
                        let swept = shard.sweep_lapsed(now);
                        if held - swept.min(held) >= self.inner.max_in_progress {
                            return Claimed::Full;
                        }
                    }
                    shard.map.insert(key, fresh(false));
                    shard.claims += 1;
                    Claim::Acquired { taken_over: false }
                }
            };
            Claimed::Answer(answer)
        });
        claimed
    }

    /// Completes synchronously (the body of [`Store::complete`]).
    fn complete_now(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if value.len() > self.inner.max_value_size {
            return Err(StoreError::TooLarge {
                size: value.len(),
                limit: self.inner.max_value_size,
            });
        }
        // Copied once, outside the lock; every replay then shares these bytes.
        let value = shared_copy(value);
        let (r, notify) = self.with_shard(key, |shard| {
            let now = Instant::now();
            match shard.map.get(&MapKey(*key)) {
                Some(Slot::InProgress {
                    token: t,
                    fingerprint,
                    waiters,
                    ..
                }) if *t == token => {
                    let (fingerprint, waiters) = (*fingerprint, *waiters);
                    shard.complete(*key, token, fingerprint, value, after(now, ttl), now);
                    Ok(waiters)
                }
                // A retry whose first attempt applied.
                Some(Slot::Completed { token: t, .. }) if *t == token => Ok(false),
                _ => Err(StoreError::Fenced),
            }
        });
        if r? {
            notify.notify_waiters();
        }
        Ok(())
    }

    /// Stores a completed record outside the claim protocol: the local tier of
    /// [`TieredStore`](crate::TieredStore), which only caches what its shared store answered.
    /// The value is copied into an allocation of its own (a `Bytes` from a network client may
    /// be a slice of a larger buffer, which would escape the byte bound). A value over
    /// `max_value_size` is not kept.
    pub(crate) fn put_completed(
        &self,
        key: Key,
        fingerprint: Option<idem_core::Fingerprint>,
        value: &[u8],
        ttl: Duration,
    ) {
        if value.len() > self.inner.max_value_size || ttl.is_zero() {
            return;
        }
        let value = shared_copy(value);
        self.with_shard(&key, |shard| {
            let now = Instant::now();
            shard.complete(
                key,
                FencingToken(0),
                fingerprint,
                value,
                after(now, ttl),
                now,
            );
        });
    }

    /// Forgets a record whatever its state, synchronously.
    pub(crate) fn forget(&self, key: &Key) {
        self.with_shard(key, |shard| shard.remove(key));
    }

    /// Releases synchronously (the body of [`Store::release`]).
    fn release_now(&self, key: &Key, token: FencingToken) {
        let (waiters, notify) = self.with_shard(key, |shard| match shard.map.get(&MapKey(*key)) {
            Some(Slot::InProgress {
                token: t, waiters, ..
            }) if *t == token => {
                let waiters = *waiters;
                shard.remove(key);
                waiters
            }
            _ => false,
        });
        if waiters {
            notify.notify_waiters();
        }
    }
}

/// A copy of `value` in an allocation of its own, with its shared header made now, so that
/// the first replay's clone does not allocate under a lock and the record costs what it is
/// charged.
fn shared_copy(value: &[u8]) -> Bytes {
    let value = Bytes::copy_from_slice(value);
    drop(value.clone());
    value
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // No code panics while holding a shard lock; if one ever did, the shard is still
    // consistent (every update is a single map operation plus counters), so go on.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[async_trait]
impl Store for MemoryStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        if let Claimed::Answer(claim) = self.claim_once(req) {
            return Ok(claim);
        }
        self.sweep_all();
        match self.claim_once(req) {
            Claimed::Answer(claim) => Ok(claim),
            Claimed::Full => Err(StoreError::backend(
                "claim",
                CapacityError {
                    limit: self.inner.max_in_progress,
                },
            )),
        }
    }

    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.complete_now(key, token, value, ttl)
    }

    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError> {
        self.release_now(key, token);
        Ok(())
    }

    async fn renew(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let (r, _) = self.with_shard(key, |shard| match shard.map.get_mut(&MapKey(*key)) {
            Some(Slot::InProgress {
                token: t,
                lease_until,
                ..
            }) if *t == token => {
                *lease_until = after(Instant::now(), lease);
                Ok(())
            }
            _ => Err(StoreError::Fenced),
        });
        r
    }

    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError> {
        let (state, _) = self.with_shard(key, |shard| {
            let now = Instant::now();
            match shard.map.get(&MapKey(*key))? {
                Slot::InProgress {
                    token,
                    fingerprint,
                    lease_until,
                    ..
                } => (*lease_until > now).then_some(RecordState::InProgress {
                    token: *token,
                    fingerprint: *fingerprint,
                }),
                Slot::Completed {
                    fingerprint,
                    value,
                    expires_at,
                    ..
                } => (*expires_at > now).then(|| {
                    RecordState::Completed(Slot::record(*fingerprint, value, *expires_at, now))
                }),
            }
        });
        Ok(state)
    }

    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        let lane = self.lane(key);
        // Subscribe first, then look: a completion between the two still wakes us.
        let notified = lane.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (lease_until, _) = self.with_shard(key, |shard| {
            let now = Instant::now();
            match shard.map.get_mut(&MapKey(*key)) {
                Some(Slot::InProgress {
                    lease_until,
                    waiters,
                    ..
                }) if *lease_until > now => {
                    *waiters = true;
                    Some(*lease_until)
                }
                _ => None,
            }
        });
        let Some(lease_until) = lease_until else {
            return Ok(());
        };
        let timeout = timeout.min(lease_until.saturating_duration_since(Instant::now()));
        let _ = tokio::time::timeout(timeout, notified).await;
        Ok(())
    }

    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        let (waiters, notify) = self.with_shard(key, |shard| {
            matches!(
                shard.remove(key),
                Some(Slot::InProgress { waiters: true, .. })
            )
        });
        if waiters {
            notify.notify_waiters();
        }
        Ok(())
    }

    /// Releases at once: the store's release takes a lock for a map removal and never waits
    /// on anything else.
    fn release_detached(&self, key: Key, token: FencingToken) {
        self.release_now(&key, token);
    }

    fn detached(&self) -> Option<Arc<dyn Store>> {
        Some(Arc::new(self.clone()))
    }

    fn name(&self) -> &'static str {
        "memory"
    }

    /// `true`: records live in this process only, so calls use process-local keys (see
    /// `idem_core::key`'s *Process-local keys*).
    fn process_local(&self) -> bool {
        true
    }

    fn max_value_size(&self) -> usize {
        self.inner.max_value_size
    }

    fn completed_now(&self, key: &Key) -> Option<CompletedRecord> {
        let lane = self.lane(key);
        let shard = lock(&lane.records);
        match shard.map.get(&MapKey(*key))? {
            Slot::Completed {
                fingerprint,
                value,
                expires_at,
                ..
            } => {
                let now = Instant::now();
                (*expires_at > now).then(|| Slot::record(*fingerprint, value, *expires_at, now))
            }
            Slot::InProgress { .. } => None,
        }
    }
}
