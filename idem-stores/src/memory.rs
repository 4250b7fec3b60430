//! `MemoryStore`: completed records in moka, in-progress claims in a map that never evicts.
//!
//! - **Completed records live in moka** (a `moka::sync::Cache`, so a replay stays synchronous):
//!   a weigher charges each record what it really costs (its value as the allocator rounds it,
//!   plus a measured per-record overhead), so `max_bytes` bounds memory; a per-entry expiry
//!   gives each record its own TTL; past the bound moka evicts the least recently used record
//!   (LRU, not moka's default TinyLFU admission, which may refuse a brand-new record: a retry
//!   usually comes soon after the first call). An eviction listener counts evictions by cause
//!   ([`MemoryStore::evictions`], and the `idem_store_evictions_total` metric with feature
//!   `metrics`).
//! - **Claims never live in moka.** In-progress claims are in a small sharded map (a `HashMap`
//!   behind a `std::sync::Mutex` per shard) that never evicts, bounded by `max_in_progress`
//!   (live concurrency, not traffic): past it a claim is refused with a
//!   [`StoreError::Backend`] whose source is a [`CapacityError`] — never an eviction.
//! - **The handover from claim to completed record is atomic.** Every state change of a key
//!   (claim, complete, release, renew, remove) and every look that decides one takes the lock
//!   of the key's claim shard. A completion, under that lock, inserts the record into moka
//!   *before* it removes the claim; a claim, a waiter or a `get`, under the same lock, looks
//!   at the claims first and then at moka. So each of them sees the claim (the completion has
//!   not started) or the record (it has finished), never neither — which would be a second
//!   execution — and never both. The replay fast path ([`Store::visit_completed_now`]) reads
//!   moka without the lock: it can only miss a record that is
//!   being written, and then the runtime claims, under the lock.
//! - **Replays read the stored bytes in place**: [`Store::visit_completed_now`] lends the
//!   stored record to the runtime, which decodes it there (no copy, no allocation), without a
//!   future or a lock, before the runtime claims; a claim or `get` that answers a completed
//!   record hands out a [`Bytes`](idem_core::Bytes) handle on it (a reference count).
//! - **Time is tokio's clock** ([`tokio::time::Instant`]): every deadline (leases, and each
//!   record's expiry) is checked against it on read, so `tokio::time::pause()` and `advance()`
//!   move TTLs and leases in tests. moka's own expiry, on the real clock, only frees memory
//!   (see `records::RecordExpiry`).
//! - **Waiting** is a `tokio::sync::Notify` per claim shard: completing, releasing or removing a
//!   claim that has waiters wakes them, and they look again. No polling.
//!
//! A `MemoryStore` protects calls within one process only: use a shared store (Redis, SQL)
//! when a service runs on more than one instance.

mod admin;
mod claims;
mod records;
mod steps;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_core::{
    async_trait, Claim, ClaimRequest, CompletedRecord, FencingToken, Key, RecordState, StepId,
    StepRecord, Store, StoreError, DEFAULT_MAX_VALUE_SIZE,
};
use tokio::time::Instant;

use crate::key_map::{KeyHashing, MapKey};
use claims::{ClaimMap, Held, Lane};
pub use records::Evictions;
use records::{Clock, EvictionCounts, Record, Records};
pub use steps::{StepCapacityError, STEP_OVERHEAD};

/// The number of claim shards.
const SHARDS: usize = 64;

/// A claim refused because `max_in_progress` claims are already held: the source of the
/// [`StoreError::Backend`] that [`MemoryStore`] answers then.
///
/// ```
/// # async fn demo() {
/// use idem_core::{Store, StoreError};
/// use idem_testkit as testkit;
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

struct Inner {
    /// In-progress claims, and the lock every state change of a key takes.
    lanes: Box<[Lane]>,
    /// Completed records.
    records: Records,
    /// The base of the records' deadlines (on tokio's clock).
    clock: Clock,
    evictions: Arc<EvictionCounts>,
    seed: u64,
    max_bytes: u64,
    max_value_size: usize,
    max_in_progress: usize,
    /// In-progress claims in all shards (live or lapsed).
    claims: AtomicUsize,
    /// Durable step records (`steps.rs`).
    steps: steps::Steps,
}

/// An in-process store: completed records in moka, in-progress claims in a map that never
/// evicts. Cheap to clone (clones share the records).
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
    /// per-record overhead (about 400 bytes, see docs/stores/memory.md), so that this bounds
    /// the heap they take. Default 256 MiB.
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// The largest encoded value accepted. Default 1 MiB (and at most a quarter of
    /// `max_bytes`).
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
        let hashing = KeyHashing::random();
        let [lane_seed] = crate::key_map::random_words();
        let evictions = Arc::new(EvictionCounts::default());
        let clock = Clock::new();
        let lanes = (0..SHARDS).map(|_| Lane::new(hashing)).collect();
        // A value must fit a quarter of the bound with room to spare.
        let quarter = usize::try_from(self.max_bytes / 4).unwrap_or(usize::MAX);
        let fits = quarter.saturating_sub(records::RECORD_OVERHEAD + 16);
        MemoryStore {
            inner: Arc::new(Inner {
                lanes,
                records: records::cache(self.max_bytes, hashing, clock, evictions.clone()),
                clock,
                evictions,
                seed: lane_seed | 1,
                max_bytes: self.max_bytes,
                max_value_size: self.max_value_size.min(fits),
                max_in_progress: self.max_in_progress,
                claims: AtomicUsize::new(0),
                steps: steps::Steps::new(self.max_bytes, hashing),
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

/// What a claim found, decided under the lane lock.
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

    /// The number of records (completed and in progress), after moka's pending maintenance.
    pub fn entry_count(&self) -> u64 {
        self.inner.records.run_pending_tasks();
        self.inner.records.entry_count() + self.inner.claims.load(Ordering::Relaxed) as u64
    }

    /// What the completed records are charged in all, in bytes, after moka's pending
    /// maintenance (so never above `max_bytes`).
    pub fn weighted_size(&self) -> u64 {
        self.inner.records.run_pending_tasks();
        self.inner.records.weighted_size()
    }

    /// The number of claims in progress (including lapsed ones not yet swept).
    pub fn in_progress(&self) -> usize {
        self.inner.claims.load(Ordering::Relaxed)
    }

    /// Completed records evicted so far, by cause (the byte bound, or moka's expiry).
    pub fn evictions(&self) -> Evictions {
        self.inner.evictions.snapshot()
    }

    /// Runs moka's pending maintenance now: evictions past the byte bound, expiry, and the
    /// eviction listener. moka otherwise runs it in batches, from reads and writes, so the
    /// records may stand briefly over `max_bytes` (by at most a few batches of writes).
    pub async fn run_pending_tasks(&self) {
        self.inner.records.run_pending_tasks();
    }

    fn lane(&self, key: &Key) -> &Lane {
        let k = &key.0;
        let w = u64::from_le_bytes([k[8], k[9], k[10], k[11], k[12], k[13], k[14], k[15]]);
        let i = (w ^ self.inner.seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        &self.inner.lanes[i as usize % self.inner.lanes.len()]
    }

    /// A live completed record of `key`, read under its lane lock: one that tokio's clock
    /// calls expired is removed (a removal under the lock cannot race a completion).
    fn live_record(&self, key: &MapKey, now: Instant) -> Option<Record> {
        let record = self.inner.records.get(key)?;
        if record.live(&self.inner.clock, now) {
            Some(record)
        } else {
            self.inner.records.invalidate(key);
            None
        }
    }

    /// Removes the claim of `key` (the caller holds the lane lock) and keeps the count.
    fn unclaim(&self, claims: &mut ClaimMap, key: &MapKey) -> Option<Held> {
        let held = claims.remove(key)?;
        self.inner.claims.fetch_sub(1, Ordering::Relaxed);
        Some(held)
    }

    /// Removes lapsed claims from every shard.
    fn sweep_all(&self) {
        let now = Instant::now();
        for lane in self.inner.lanes.iter() {
            let swept = claims::sweep_lapsed(&mut lane.lock(), now);
            self.inner.claims.fetch_sub(swept, Ordering::Relaxed);
        }
    }

    /// Claims synchronously (the body of [`Store::claim`] and [`Store::claim_now`]).
    fn claim_sync(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
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

    /// [`Store::visit_completed_now`]'s record as a [`CompletedRecord`] sharing the stored
    /// bytes (a `Bytes` handle, no copy), for `TieredStore`, which hands it on.
    pub(crate) fn completed_shared(&self, key: &Key) -> Option<CompletedRecord> {
        let record = self.inner.records.get(&MapKey(*key))?;
        let now = self.inner.clock.ticks(Instant::now());
        record.live_at(now).then(|| record.answer_at(now))
    }

    fn claim_once(&self, req: &ClaimRequest) -> Claimed {
        let key = MapKey(req.key);
        let mut claims = self.lane(&req.key).lock();
        let now = Instant::now();
        let fresh = |waiters| Held {
            token: req.token,
            fingerprint: req.fingerprint,
            lease_until: after(now, req.lease),
            since: now,
            renewals: 0,
            waiters,
        };
        // Claims first, then records: under this lock a key is in at most one of them.
        if let Some(held) = claims.get_mut(&key) {
            if held.token == req.token {
                // Our own claim, retried after a lost reply: restart the lease.
                held.lease_until = after(now, req.lease);
                return Claimed::Answer(Claim::Acquired { taken_over: false });
            }
            if held.lease_until > now {
                return Claimed::Answer(Claim::InProgress {
                    fingerprint: held.fingerprint,
                    lease_remaining: Some(held.lease_until.saturating_duration_since(now)),
                });
            }
            // The holder's lease passed: take over, in place (the claim count stays).
            *held = fresh(held.waiters);
            return Claimed::Answer(Claim::Acquired { taken_over: true });
        }
        // `contains_key` first: a miss (every fresh call) costs no moka read.
        if self.inner.records.contains_key(&key) {
            if let Some(record) = self.live_record(&key, now) {
                let answer = record.answer(&self.inner.clock, now);
                return Claimed::Answer(Claim::Completed(answer));
            }
        }
        let held = self.inner.claims.load(Ordering::Relaxed);
        if held >= self.inner.max_in_progress {
            // Lapsed claims of this shard first; the whole store if need be.
            let swept = claims::sweep_lapsed(&mut claims, now);
            self.inner.claims.fetch_sub(swept, Ordering::Relaxed);
            if held - swept.min(held) >= self.inner.max_in_progress {
                return Claimed::Full;
            }
        }
        claims.insert(key, fresh(false));
        self.inner.claims.fetch_add(1, Ordering::Relaxed);
        Claimed::Answer(Claim::Acquired { taken_over: false })
    }

    /// Completes synchronously (the body of [`Store::complete`] and [`Store::complete_now`]).
    fn complete_sync(
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
        let map_key = MapKey(*key);
        let lane = self.lane(key);
        // First look: the claim's fingerprint, which goes into the record.
        let fingerprint = match lane.lock().get(&map_key) {
            Some(held) if held.token == token => held.fingerprint,
            Some(_) => return Err(StoreError::Fenced),
            None => return self.completed_under(&map_key, token),
        };
        // The value is copied once, outside the lock; every replay then shares these bytes.
        let expires_at = after(Instant::now(), ttl);
        let record = Record::new(&self.inner.clock, expires_at, token, fingerprint, value);
        let mut claims = lane.lock();
        let waiters = match claims.get(&map_key) {
            // Still ours (a token's claim keeps its fingerprint: a takeover brings a new token).
            Some(held) if held.token == token => {
                // The handover: the record is in moka before the claim goes, both under the
                // lane lock, so no caller that looks under it sees neither (or both).
                self.inner.records.insert(map_key, record);
                self.unclaim(&mut claims, &map_key)
                    .is_some_and(|h| h.waiters)
            }
            Some(_) => return Err(StoreError::Fenced),
            None => {
                drop(claims);
                return self.completed_under(&map_key, token);
            }
        };
        drop(claims);
        if waiters {
            lane.notify.notify_waiters();
        }
        Ok(())
    }

    /// A completion that found no claim: `Ok` if the record is completed under `token` (a
    /// retry whose first attempt applied), else fenced.
    fn completed_under(&self, key: &MapKey, token: FencingToken) -> Result<(), StoreError> {
        match self.inner.records.get(key) {
            Some(record) if record.token() == token => Ok(()),
            _ => Err(StoreError::Fenced),
        }
    }

    /// Stores a completed record outside the claim protocol: the local tier of
    /// [`TieredStore`](crate::TieredStore), which only caches what its shared store answered.
    /// The value is copied into the record's own allocation (a `Bytes` from a network client
    /// may be a slice of a larger buffer, which would escape the byte bound). A value over
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
        let expires_at = after(Instant::now(), ttl);
        let record = Record::new(
            &self.inner.clock,
            expires_at,
            FencingToken(0),
            fingerprint,
            value,
        );
        let _claims = self.lane(&key).lock();
        self.inner.records.insert(MapKey(key), record);
    }

    /// Forgets a record whatever its state, synchronously. Returns whether a claim with
    /// waiters was removed.
    pub(crate) fn forget(&self, key: &Key) -> bool {
        let map_key = MapKey(*key);
        let mut claims = self.lane(key).lock();
        let waiters = self
            .unclaim(&mut claims, &map_key)
            .is_some_and(|h| h.waiters);
        self.inner.records.invalidate(&map_key);
        waiters
    }

    /// Releases synchronously (the body of [`Store::release`]).
    fn release_now(&self, key: &Key, token: FencingToken) {
        let map_key = MapKey(*key);
        let lane = self.lane(key);
        let mut claims = lane.lock();
        let waiters = match claims.get(&map_key) {
            Some(held) if held.token == token => self
                .unclaim(&mut claims, &map_key)
                .is_some_and(|h| h.waiters),
            _ => false,
        };
        drop(claims);
        if waiters {
            lane.notify.notify_waiters();
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        self.claim_sync(req)
    }

    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.complete_sync(key, token, value, ttl)
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
        match self.lane(key).lock().get_mut(&MapKey(*key)) {
            Some(held) if held.token == token => {
                held.lease_until = after(Instant::now(), lease);
                held.renewals = held.renewals.saturating_add(1);
                Ok(())
            }
            _ => Err(StoreError::Fenced),
        }
    }

    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError> {
        let map_key = MapKey(*key);
        let claims = self.lane(key).lock();
        let now = Instant::now();
        if let Some(held) = claims.get(&map_key) {
            return Ok((held.lease_until > now).then(|| RecordState::InProgress {
                token: held.token,
                fingerprint: held.fingerprint,
                times: held.times(now),
            }));
        }
        Ok(self
            .live_record(&map_key, now)
            .map(|record| RecordState::Completed(record.answer(&self.inner.clock, now))))
    }

    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        let lane = self.lane(key);
        // Subscribe first, then look: a completion between the two still wakes us.
        let notified = lane.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let lease_until = {
            let mut claims = lane.lock();
            let now = Instant::now();
            match claims.get_mut(&MapKey(*key)) {
                Some(held) if held.lease_until > now => {
                    held.waiters = true;
                    held.lease_until
                }
                _ => return Ok(()),
            }
        };
        let timeout = timeout.min(lease_until.saturating_duration_since(Instant::now()));
        let _ = tokio::time::timeout(timeout, notified).await;
        Ok(())
    }

    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        let waiters = self.forget(key);
        // After the claim is gone: a step write from now on is fenced.
        self.inner.steps.remove(key);
        if waiters {
            self.lane(key).notify.notify_waiters();
        }
        Ok(())
    }

    /// `true`: steps live beside the claims, fenced under the claim's lock
    /// (see the `steps` module).
    fn supports_steps(&self) -> bool {
        true
    }

    async fn load_steps(&self, key: &Key) -> Result<Vec<StepRecord>, StoreError> {
        Ok(self.load_steps_now(key))
    }

    async fn put_step(
        &self,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.put_step_now(key, token, step, ttl)
    }

    async fn clear_step(
        &self,
        key: &Key,
        token: FencingToken,
        id: &StepId,
    ) -> Result<(), StoreError> {
        self.clear_step_now(key, token, id)
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

    /// The claim, at once: it takes a lock for a map look-up and never waits on anything else.
    fn claim_now(&self, req: &ClaimRequest) -> Option<Result<Claim, StoreError>> {
        Some(self.claim_sync(req))
    }

    /// The completion, at once (the value is copied outside the lock).
    fn complete_now(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Option<Result<(), StoreError>> {
        Some(self.complete_sync(key, token, value, ttl))
    }

    /// One moka read, without the lane lock: a record being written is at worst missed, and
    /// the runtime then claims under the lock. A record that tokio's clock calls expired is
    /// not lent (and is removed by the next look under the lock). Lent, never copied.
    fn visit_completed_now(
        &self,
        key: &Key,
        visit: &mut dyn FnMut(idem_core::CompletedRef<'_>),
    ) -> bool {
        let Some(record) = self.inner.records.get(&MapKey(*key)) else {
            return false;
        };
        let now = self.inner.clock.ticks(Instant::now());
        if !record.live_at(now) {
            return false;
        }
        visit(record.lend_at(now));
        true
    }
}
