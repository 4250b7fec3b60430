//! The conformance suite on a `TieredStore` in front of a `MemoryStore`, and the local tier's
//! own promise: replays without touching the shared store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_core::{
    async_trait, Call, Claim, ClaimRequest, Error, FencingToken, Key, RecordState, Store,
    StoreError,
};
use idem_stores::{MemoryStore, TieredStore};

idem_testkit::conformance_tests!(async {
    let shared = MemoryStore::builder().max_value_size(256 << 10).build();
    Some(Arc::new(TieredStore::new(shared)) as Arc<dyn Store>)
});

/// Counts the claims that reach the shared store.
#[derive(Debug, Default)]
struct Counting {
    inner: MemoryStore,
    claims: AtomicUsize,
}

#[async_trait]
impl Store for Counting {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        self.inner.claim(req).await
    }
    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.complete(key, token, value, ttl).await
    }
    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
    async fn renew(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.inner.renew(key, token, lease).await
    }
    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError> {
        self.inner.get(key).await
    }
    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        self.inner.wait(key, timeout).await
    }
    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        self.inner.remove(key).await
    }
    fn release_detached(&self, key: Key, token: FencingToken) {
        self.inner.release_detached(key, token)
    }
}

async fn replays_are_served_locally_and_fingerprints_still_checked() {
    let store = TieredStore::new(Counting::default());
    let call = |amount: u32| {
        Call::new("tests::tiered")
            .key("order-1")
            .fingerprint(amount)
            .run(&store, async move { Ok::<_, Error>(amount * 2) })
    };
    assert_eq!(call(10).await.unwrap(), 20);
    assert_eq!(store.shared().claims.load(Ordering::SeqCst), 1);
    for _ in 0..10 {
        assert_eq!(call(10).await.unwrap(), 20);
    }
    assert_eq!(
        store.shared().claims.load(Ordering::SeqCst),
        1,
        "replays went to the shared store"
    );
    assert!(matches!(call(11).await, Err(Error::KeyReused)));
}

async fn a_record_completed_elsewhere_is_cached_after_its_first_replay() {
    let shared = Arc::new(Counting::default());
    let other_process = TieredStore::new(shared.clone());
    let this_process = TieredStore::new(shared.clone());
    let run = |store: &'static TieredStore<Arc<Counting>>| {
        Call::new("tests::tiered::elsewhere")
            .key("k")
            .run(store, async { Ok::<_, Error>(7u8) })
    };
    let other: &'static _ = Box::leak(Box::new(other_process));
    let this: &'static _ = Box::leak(Box::new(this_process));
    assert_eq!(run(other).await.unwrap(), 7);
    assert_eq!(run(this).await.unwrap(), 7);
    let after_first = shared.claims.load(Ordering::SeqCst);
    assert_eq!(run(this).await.unwrap(), 7);
    assert_eq!(shared.claims.load(Ordering::SeqCst), after_first);
}

fn main() -> std::process::ExitCode {
    idem_testkit::harness::run([
        cases(&[]),
        idem_testkit::test_cases!([], current_thread;
            replays_are_served_locally_and_fingerprints_still_checked,
            a_record_completed_elsewhere_is_cached_after_its_first_replay),
    ])
}
