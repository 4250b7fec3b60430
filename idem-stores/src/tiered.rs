//! `TieredStore`: a local tier of completed records in front of a shared store.
//!
//! Replays are the common case of an idempotency store (every retry of a finished call), and a
//! completed record never changes: it only expires or is removed. So a process may keep the
//! completed records it has seen and answer replays from memory, without a round trip to
//! Redis or SQL — synchronously, through [`Store::visit_completed_now`] (lent, decoded in
//! place). Everything else — claims,
//! waits, fenced writes — goes to the shared store, which stays the single source of truth for
//! who owns a key.
//!
//! **Never past the TTL.** A record is kept locally for `min(remaining TTL, local_ttl)`: the
//! remaining TTL is what the shared store reports with every completed record
//! ([`CompletedRecord::expires_in`]), or the `ttl` of a completion made through this store. A
//! record whose store cannot tell its remaining TTL is not kept. So after a record's TTL no
//! process replays it, whichever process completed it.
//!
//! The one trade-off, bounded by `local_ttl` (default 60 s): a record *removed* from the shared
//! store by an operator (not through this process) may still be replayed by a process that
//! holds it, for up to `local_ttl`.
//!
//! The local tier is a [`MemoryStore`]'s record map: bounded in bytes at what a record really
//! costs, on tokio's clock (so `tokio::time::pause()` moves it too).

mod admin;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use idem_core::{
    async_trait, Claim, ClaimRequest, CompletedRecord, FencingToken, Fingerprint, Key, RecordState,
    StepId, StepRecord, Store, StoreError,
};

use crate::MemoryStore;

/// The claims this process holds, with their fingerprints, so that a completion can be cached
/// without reading it back. Bounded: past the bound it is cleared (a completion then simply
/// is not cached; nothing else depends on it).
#[derive(Debug, Default)]
struct Held {
    claims: std::collections::HashMap<Key, (FencingToken, Option<Fingerprint>)>,
}

const HELD_BOUND: usize = 100_000;

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
    local: MemoryStore,
    local_ttl: Duration,
    held: Arc<Mutex<Held>>,
}

impl<S: Store> TieredStore<S> {
    /// Puts a 64 MiB local tier with a 60 s `local_ttl` in front of `shared`.
    pub fn new(shared: S) -> Self {
        TieredStore {
            shared,
            local: local_tier(64 << 20),
            local_ttl: Duration::from_secs(60),
            held: Arc::default(),
        }
    }

    /// How long a completed record is answered locally at most (and never past its TTL).
    /// Default 60 s.
    pub fn local_ttl(mut self, local_ttl: Duration) -> Self {
        self.local_ttl = local_ttl;
        self
    }

    /// The bound on the local tier in bytes (records charged what they really cost, as in
    /// [`MemoryStore`]). Default 64 MiB.
    pub fn local_max_bytes(mut self, bytes: u64) -> Self {
        self.local = local_tier(bytes);
        self
    }

    /// The shared store behind the local tier.
    pub fn shared(&self) -> &S {
        &self.shared
    }

    /// Keeps a record the shared store answered, for `min(remaining TTL, local_ttl)`.
    fn remember(&self, key: Key, record: &CompletedRecord) {
        if let Some(left) = record.expires_in {
            self.local.put_completed(
                key,
                record.fingerprint,
                &record.value,
                left.min(self.local_ttl),
            );
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn local_tier(max_bytes: u64) -> MemoryStore {
    MemoryStore::builder().max_bytes(max_bytes).build()
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
        if let Some(record) = self.local.completed_shared(&req.key) {
            return Ok(Claim::Completed(record));
        }
        let claim = self.shared.claim(req).await?;
        match &claim {
            Claim::Completed(record) => self.remember(req.key, record),
            Claim::Acquired { .. } => {
                let mut held = self.held();
                if held.claims.len() >= HELD_BOUND {
                    held.claims.clear();
                }
                held.claims.insert(req.key, (req.token, req.fingerprint));
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
        let completed = self.shared.complete(key, token, value, ttl).await;
        // Cached only from a completion whose first attempt answered: after a lost reply, the
        // shared store keeps the first attempt's value, which a retry does not carry; the next
        // replay learns it from the shared store.
        let held = self.held().claims.remove(key);
        completed?;
        if let Some((held, fingerprint)) = held {
            if held == token {
                self.local
                    .put_completed(*key, fingerprint, value, ttl.min(self.local_ttl));
            }
        }
        Ok(())
    }

    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError> {
        {
            let mut held = self.held();
            if matches!(held.claims.get(key), Some((t, _)) if *t == token) {
                held.claims.remove(key);
            }
        }
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
        if let Some(record) = self.local.completed_shared(key) {
            return Ok(Some(RecordState::Completed(record)));
        }
        let state = self.shared.get(key).await?;
        if let Some(RecordState::Completed(record)) = &state {
            self.remember(*key, record);
        }
        Ok(state)
    }

    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        self.shared.wait(key, timeout).await
    }

    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        self.local.forget(key);
        self.held().claims.remove(key);
        self.shared.remove(key).await
    }

    fn release_detached(&self, key: Key, token: FencingToken) {
        self.held().claims.remove(&key);
        self.shared.release_detached(key, token)
    }

    /// The shared store's own detached handle: a completion finished after the caller went
    /// away is written to the shared store (the source of truth) and not cached locally; the
    /// next replay here learns it with its first claim.
    fn detached(&self) -> Option<Arc<dyn Store>> {
        self.shared.detached()
    }

    fn name(&self) -> &'static str {
        "tiered"
    }

    /// Steps are the shared store's: they go there and never into the local tier.
    fn supports_steps(&self) -> bool {
        self.shared.supports_steps()
    }

    async fn load_steps(&self, key: &Key) -> Result<Vec<StepRecord>, StoreError> {
        self.shared.load_steps(key).await
    }

    async fn put_step(
        &self,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.shared.put_step(key, token, step, ttl).await
    }

    async fn clear_step(
        &self,
        key: &Key,
        token: FencingToken,
        id: &StepId,
    ) -> Result<(), StoreError> {
        self.shared.clear_step(key, token, id).await
    }

    fn max_value_size(&self) -> usize {
        self.shared.max_value_size()
    }

    fn visit_completed_now(
        &self,
        key: &Key,
        visit: &mut dyn FnMut(idem_core::CompletedRef<'_>),
    ) -> bool {
        self.local.visit_completed_now(key, visit)
    }

    /// The shared store's answer: the local tier only holds copies of the shared store's
    /// records, so a call derives the key it has there (over a `MemoryStore`, the same
    /// process-local key as a call made on it directly).
    fn process_local(&self) -> bool {
        self.shared.process_local()
    }
}
