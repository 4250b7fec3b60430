//! `MemoryStore`: records in a moka cache, for one process.
//!
//! - **Claim** is one `entry().and_compute_with` on the key: moka runs compute operations on
//!   one key one at a time, so of any number of concurrent claims exactly one inserts.
//! - **Expiry** is per entry (moka's `Expiry`): a completed record lives for its own `ttl`,
//!   an in-progress one for its lease plus a grace period (so that a takeover can be told
//!   from a fresh claim). Every read also checks the deadline itself, so an entry that moka
//!   has not evicted yet is never replayed late.
//! - **Waiting** is a `tokio::sync::Notify` per shard of keys: completing, releasing or
//!   removing a record wakes that shard's waiters, who look again. No polling.
//! - **Capacity** is bounded in bytes (default 256 MiB). Past it moka evicts the least
//!   useful entries; an evicted completed record runs again on its next call, and an evicted
//!   in-progress claim can be claimed twice. Size the bound so that it is not reached.
//!
//! A `MemoryStore` protects calls within one process only: use a shared store (Redis, SQL)
//! when a service runs on more than one instance.

use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::{
    async_trait, Claim, ClaimRequest, CompletedRecord, FencingToken, Fingerprint, Key, RecordState,
    Store, StoreError, DEFAULT_MAX_VALUE_SIZE,
};
use moka::future::Cache;
use moka::ops::compute::{CompResult, Op};
use moka::Expiry;
use tokio::sync::Notify;

/// How long an in-progress entry outlives its lease in the cache, to report takeovers.
const LEASE_GRACE: Duration = Duration::from_secs(60);
const SHARDS: usize = 64;
/// Bytes counted per entry besides its value (key, state, moka's own bookkeeping).
const ENTRY_OVERHEAD: u32 = 160;

#[derive(Clone, Debug)]
enum Entry {
    InProgress {
        token: FencingToken,
        fingerprint: Option<Fingerprint>,
        lease_until: Instant,
    },
    Completed {
        fingerprint: Option<Fingerprint>,
        value: Arc<[u8]>,
        expires_at: Instant,
    },
}

impl Entry {
    /// When this entry stops counting, and when moka may drop it.
    fn deadline(&self) -> Instant {
        match self {
            Entry::InProgress { lease_until, .. } => *lease_until,
            Entry::Completed { expires_at, .. } => *expires_at,
        }
    }

    fn evict_at(&self) -> Instant {
        match self {
            Entry::InProgress { lease_until, .. } => *lease_until + LEASE_GRACE,
            Entry::Completed { expires_at, .. } => *expires_at,
        }
    }

    fn live(&self, now: Instant) -> bool {
        now < self.deadline()
    }
}

struct PerEntryExpiry;

impl Expiry<Key, Entry> for PerEntryExpiry {
    fn expire_after_create(&self, _: &Key, value: &Entry, now: Instant) -> Option<Duration> {
        Some(value.evict_at().saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &Key,
        value: &Entry,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.evict_at().saturating_duration_since(now))
    }
}

struct Inner {
    cache: Cache<Key, Entry>,
    shards: Box<[Notify]>,
    max_value_size: usize,
}

/// An in-process store on a moka cache. Cheap to clone (clones share the records).
///
/// ```
/// use idem_stores::MemoryStore;
/// let store = MemoryStore::builder().max_bytes(64 << 20).max_value_size(256 << 10).build();
/// let shared: std::sync::Arc<dyn idem_core::Store> = std::sync::Arc::new(store);
/// # let _ = shared;
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.inner.cache.entry_count())
            .field("max_value_size", &self.inner.max_value_size)
            .finish()
    }
}

/// Configures a [`MemoryStore`].
#[derive(Debug, Clone)]
pub struct MemoryStoreBuilder {
    max_bytes: u64,
    max_value_size: usize,
}

impl MemoryStoreBuilder {
    /// The bound on the cache's size in bytes (values plus a fixed overhead per entry).
    /// Default 256 MiB.
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// The largest encoded value accepted. Default 1 MiB.
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes;
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        let cache = Cache::builder()
            .max_capacity(self.max_bytes)
            .weigher(|_: &Key, e: &Entry| match e {
                Entry::InProgress { .. } => ENTRY_OVERHEAD,
                Entry::Completed { value, .. } => {
                    ENTRY_OVERHEAD.saturating_add(u32::try_from(value.len()).unwrap_or(u32::MAX))
                }
            })
            .expire_after(PerEntryExpiry)
            .build();
        MemoryStore {
            inner: Arc::new(Inner {
                cache,
                shards: (0..SHARDS).map(|_| Notify::new()).collect(),
                max_value_size: self.max_value_size,
            }),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store with the default bounds (256 MiB, values up to 1 MiB).
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder for other bounds.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            max_bytes: 256 << 20,
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
        }
    }

    /// The number of entries (approximate: moka applies writes lazily).
    pub fn entry_count(&self) -> u64 {
        self.inner.cache.entry_count()
    }

    /// Applies moka's pending maintenance (evictions, size accounting) now.
    pub async fn run_pending_tasks(&self) {
        self.inner.cache.run_pending_tasks().await;
    }

    fn shard(&self, key: &Key) -> &Notify {
        &self.inner.shards[key.0[0] as usize % SHARDS]
    }

    fn wake(&self, key: &Key) {
        self.shard(key).notify_waiters();
    }

    /// Applies a fenced change to the claim held under `token`: `f` maps the current
    /// in-progress entry to the new one (`None`: remove it).
    async fn fenced(
        &self,
        key: &Key,
        token: FencingToken,
        f: impl FnOnce(Option<Fingerprint>) -> Option<Entry>,
    ) -> Result<(), StoreError> {
        let mut applied = false;
        self.inner
            .cache
            .entry(*key)
            .and_compute_with(|current| {
                let op = match current.map(|e| e.into_value()) {
                    Some(Entry::InProgress {
                        token: t,
                        fingerprint,
                        ..
                    }) if t == token => {
                        applied = true;
                        match f(fingerprint) {
                            Some(next) => Op::Put(next),
                            None => Op::Remove,
                        }
                    }
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
        if applied {
            Ok(())
        } else {
            Err(StoreError::Fenced)
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        // Fast path for replays: a live completed record only changes by expiring or being
        // removed, so a plain read is as good as the locked compute below, and cheaper.
        if let Some(Entry::Completed {
            fingerprint,
            value,
            expires_at,
        }) = self.inner.cache.get(&req.key).await
        {
            if Instant::now() < expires_at {
                return Ok(Claim::Completed(CompletedRecord {
                    fingerprint,
                    value: idem_core::Bytes::copy_from_slice(&value),
                    expires_in: None,
                }));
            }
        }
        let mut answer = None;
        let result = self
            .inner
            .cache
            .entry(req.key)
            .and_compute_with(|current| {
                let now = Instant::now();
                let fresh = Entry::InProgress {
                    token: req.token,
                    fingerprint: req.fingerprint,
                    lease_until: now + req.lease,
                };
                let op = match current.map(|e| e.into_value()) {
                    None => Op::Put(fresh),
                    Some(e) if !e.live(now) => {
                        answer = Some(Claim::Acquired {
                            taken_over: matches!(e, Entry::InProgress { .. }),
                        });
                        Op::Put(fresh)
                    }
                    Some(Entry::InProgress {
                        fingerprint,
                        lease_until,
                        ..
                    }) => {
                        answer = Some(Claim::InProgress {
                            fingerprint,
                            lease_remaining: Some(lease_until.saturating_duration_since(now)),
                        });
                        Op::Nop
                    }
                    Some(Entry::Completed {
                        fingerprint, value, ..
                    }) => {
                        answer = Some(Claim::Completed(CompletedRecord {
                            fingerprint,
                            value: idem_core::Bytes::copy_from_slice(&value),
                            expires_in: None,
                        }));
                        Op::Nop
                    }
                };
                std::future::ready(op)
            })
            .await;
        match (answer, result) {
            (Some(claim), _) => Ok(claim),
            (None, CompResult::Inserted(_) | CompResult::ReplacedWith(_)) => {
                Ok(Claim::Acquired { taken_over: false })
            }
            (None, _) => Err(StoreError::Corrupt(
                "memory store: claim neither inserted nor found a record".into(),
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
        if value.len() > self.inner.max_value_size {
            return Err(StoreError::TooLarge {
                size: value.len(),
                limit: self.inner.max_value_size,
            });
        }
        let value: Arc<[u8]> = Arc::from(value);
        let expires_at = Instant::now()
            .checked_add(ttl)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 86_400));
        let r = self
            .fenced(key, token, |fingerprint| {
                Some(Entry::Completed {
                    fingerprint,
                    value,
                    expires_at,
                })
            })
            .await;
        self.wake(key);
        r
    }

    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError> {
        let r = self.fenced(key, token, |_| None).await;
        self.wake(key);
        r
    }

    async fn renew(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let lease_until = Instant::now() + lease;
        self.fenced(key, token, |fingerprint| {
            Some(Entry::InProgress {
                token,
                fingerprint,
                lease_until,
            })
        })
        .await
    }

    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError> {
        let now = Instant::now();
        Ok(match self.inner.cache.get(key).await {
            Some(e) if e.live(now) => Some(match e {
                Entry::InProgress {
                    token, fingerprint, ..
                } => RecordState::InProgress { token, fingerprint },
                Entry::Completed {
                    fingerprint, value, ..
                } => RecordState::Completed(CompletedRecord {
                    fingerprint,
                    value: idem_core::Bytes::copy_from_slice(&value),
                    expires_in: None,
                }),
            }),
            _ => None,
        })
    }

    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        // Subscribe first, then look: a completion between the two still wakes us.
        let notified = self.shard(key).notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let now = Instant::now();
        let lease_until = match self.inner.cache.get(key).await {
            Some(Entry::InProgress { lease_until, .. }) if lease_until > now => lease_until,
            _ => return Ok(()),
        };
        let timeout = timeout.min(lease_until - now);
        let _ = tokio::time::timeout(timeout, notified).await;
        Ok(())
    }

    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        self.inner.cache.invalidate(key).await;
        self.wake(key);
        Ok(())
    }

    fn release_detached(&self, key: Key, token: FencingToken) {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let store = self.clone();
            handle.spawn(async move {
                let _ = store.release(&key, token).await;
            });
        }
    }

    fn max_value_size(&self) -> usize {
        self.inner.max_value_size
    }
}
