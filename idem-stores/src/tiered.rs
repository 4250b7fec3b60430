//! `TieredStore`: a local cache of completed records in front of a shared store.
//!
//! Replays are the common case of an idempotency store (every retry of a finished call), and a
//! completed record never changes: it only expires or is removed. So a process may keep the
//! completed records it has seen and answer replays from memory, without a round trip to
//! Redis or SQL. Everything else — claims, waits, fenced writes — goes to the shared store,
//! which stays the single source of truth for who owns a key.
//!
//! The one trade-off, bounded by `local_ttl` (default 60 s): a record that is *removed* from
//! the shared store by an operator, or that expires there while a process holds it, may still
//! be replayed by that process for up to `local_ttl`. Records completed through this store are
//! cached for `min(ttl, local_ttl)`, so a short `ttl` is honoured exactly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::{
    async_trait, Claim, ClaimRequest, CompletedRecord, FencingToken, Fingerprint, Key, RecordState,
    Store, StoreError,
};
use moka::future::Cache;
use moka::Expiry;

#[derive(Clone)]
struct Local {
    fingerprint: Option<Fingerprint>,
    value: Arc<[u8]>,
    expires_at: Instant,
}

struct LocalExpiry;

impl Expiry<Key, Local> for LocalExpiry {
    fn expire_after_create(&self, _: &Key, v: &Local, now: Instant) -> Option<Duration> {
        Some(v.expires_at.saturating_duration_since(now))
    }
}

/// A shared store with a local tier of completed records.
///
/// ```
/// use idem_stores::{MemoryStore, TieredStore};
/// # let shared = MemoryStore::new(); // in production: a RedisStore or a SQL store
/// let store = TieredStore::new(shared)
///     .local_ttl(std::time::Duration::from_secs(30))
///     .local_max_bytes(32 << 20);
/// # let _ = store;
/// ```
pub struct TieredStore<S> {
    shared: S,
    local: Cache<Key, Local>,
    local_ttl: Duration,
    /// Claims this process holds, with their fingerprints, so that a completion can be cached
    /// without reading it back.
    held: Cache<Key, (FencingToken, Option<Fingerprint>)>,
}

impl<S: Store> TieredStore<S> {
    /// Puts a 64 MiB local tier with a 60 s `local_ttl` in front of `shared`.
    pub fn new(shared: S) -> Self {
        TieredStore {
            shared,
            local: build_cache(64 << 20),
            local_ttl: Duration::from_secs(60),
            held: Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
        }
    }

    /// How long a completed record is answered locally at most. Default 60 s.
    pub fn local_ttl(mut self, local_ttl: Duration) -> Self {
        self.local_ttl = local_ttl;
        self
    }

    /// The bound on the local tier in bytes. Default 64 MiB.
    pub fn local_max_bytes(mut self, bytes: u64) -> Self {
        self.local = build_cache(bytes);
        self
    }

    /// The shared store behind the local tier.
    pub fn shared(&self) -> &S {
        &self.shared
    }

    async fn remember(&self, key: Key, record: &CompletedRecord, ttl: Duration) {
        let expires_at = Instant::now() + ttl.min(self.local_ttl);
        self.local
            .insert(
                key,
                Local {
                    fingerprint: record.fingerprint,
                    value: Arc::from(&record.value[..]),
                    expires_at,
                },
            )
            .await;
    }

    async fn local_hit(&self, key: &Key) -> Option<CompletedRecord> {
        match self.local.get(key).await {
            Some(l) if Instant::now() < l.expires_at => Some(CompletedRecord {
                fingerprint: l.fingerprint,
                value: idem_core::Bytes::copy_from_slice(&l.value),
                expires_in: None,
            }),
            _ => None,
        }
    }
}

fn build_cache(max_bytes: u64) -> Cache<Key, Local> {
    Cache::builder()
        .max_capacity(max_bytes)
        .weigher(|_: &Key, l: &Local| {
            u32::try_from(l.value.len())
                .unwrap_or(u32::MAX)
                .saturating_add(96)
        })
        .expire_after(LocalExpiry)
        .build()
}

impl<S: std::fmt::Debug> std::fmt::Debug for TieredStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredStore")
            .field("shared", &self.shared)
            .field("local_entries", &self.local.entry_count())
            .field("local_ttl", &self.local_ttl)
            .finish()
    }
}

#[async_trait]
impl<S: Store> Store for TieredStore<S> {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        if let Some(record) = self.local_hit(&req.key).await {
            return Ok(Claim::Completed(record));
        }
        let claim = self.shared.claim(req).await?;
        match &claim {
            Claim::Completed(record) => self.remember(req.key, record, self.local_ttl).await,
            Claim::Acquired { .. } => {
                self.held
                    .insert(req.key, (req.token, req.fingerprint))
                    .await
            }
            Claim::InProgress { .. } => {}
        }
        Ok(claim)
    }

    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.shared.complete(key, token, value, ttl).await?;
        if let Some((held, fingerprint)) = self.held.remove(key).await {
            if held == token {
                let record = CompletedRecord {
                    fingerprint,
                    value: idem_core::Bytes::copy_from_slice(&value),
                    expires_in: None,
                };
                self.remember(*key, &record, ttl).await;
            }
        }
        Ok(())
    }

    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError> {
        self.held.invalidate(key).await;
        self.shared.release(key, token).await
    }

    async fn renew(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.shared.renew(key, token, lease).await
    }

    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError> {
        if let Some(record) = self.local_hit(key).await {
            return Ok(Some(RecordState::Completed(record)));
        }
        self.shared.get(key).await
    }

    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        self.shared.wait(key, timeout).await
    }

    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        self.local.invalidate(key).await;
        self.held.invalidate(key).await;
        self.shared.remove(key).await
    }

    fn release_detached(&self, key: Key, token: FencingToken) {
        self.shared.release_detached(key, token)
    }

    fn max_value_size(&self) -> usize {
        self.shared.max_value_size()
    }
}
