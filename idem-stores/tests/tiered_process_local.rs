//! Wrappers forward `Store::process_local`: the same call through `TieredStore` over a
//! `MemoryStore` and directly on that `MemoryStore` derives one key and runs once
//! (`testkit::wrapper_keeps_identity`), and the case fails for a wrapper that does not forward.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use idem_core::{
    async_trait, Claim, ClaimRequest, FencingToken, Key, RecordState, Store, StoreError,
};
use idem_stores::{MemoryStore, TieredStore};
use idem_testkit::{wrapper_keeps_identity, FaultyStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiered_over_memory_keeps_the_memory_key() {
    let inner = Arc::new(MemoryStore::new());
    let tiered = Arc::new(TieredStore::new(inner.clone()));
    assert!(tiered.process_local(), "TieredStore forwards process_local");
    wrapper_keeps_identity(tiered, inner).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_wrapper_in_the_workspace_forwards() {
    let inner = Arc::new(MemoryStore::new());
    let wrappers: Vec<Arc<dyn Store>> = vec![
        Arc::new(TieredStore::new(inner.clone())),
        Arc::new(FaultyStore::new(inner.clone() as Arc<dyn Store>)),
        Arc::new(Box::new(inner.clone())),
        Arc::new(inner.clone()),
    ];
    for wrapper in wrappers {
        wrapper_keeps_identity(wrapper, inner.clone()).await;
    }
}

/// A wrapper that forwards every operation but not `process_local`.
#[derive(Debug)]
struct Forgetful(Arc<MemoryStore>);

#[async_trait]
impl Store for Forgetful {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        self.0.claim(req).await
    }
    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.0.complete(key, token, value, ttl).await
    }
    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError> {
        self.0.release(key, token).await
    }
    async fn renew(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.0.renew(key, token, lease).await
    }
    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError> {
        self.0.get(key).await
    }
    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        self.0.wait(key, timeout).await
    }
    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        self.0.remove(key).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "does not forward process_local")]
async fn the_case_fails_for_a_wrapper_that_does_not_forward() {
    let inner = Arc::new(MemoryStore::new());
    wrapper_keeps_identity(Arc::new(Forgetful(inner.clone())), inner).await;
}
