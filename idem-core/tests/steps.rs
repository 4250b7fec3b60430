//! Durable steps in the runtime, beyond the store conformance cases of `idem-testkit`:
//! transactional steps (`step_in`) over a small in-memory `TransactionalStore`, the refusal of
//! steps in a transactional call, unprotected runs, cancellation after a step's write, and
//! transient step-write failures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_core::{
    async_trait, step, step_in, Call, Claim, ClaimRequest, Error, FencingToken, Key, MissingKey,
    RecordState, StepId, StepRecord, StepStatus, Store, StoreError, TransactionalStore,
};
use idem_stores::MemoryStore;

/// A memory store with transactions: a transaction stages business rows and a step record,
/// and its commit applies them (the step record fenced, as `put_step_in` must be).
#[derive(Clone, Debug, Default)]
struct TxMemory {
    inner: MemoryStore,
    /// The committed business rows.
    table: Arc<Mutex<Vec<String>>>,
    /// Fail the next commit after applying it (a lost reply).
    lose_commit_reply: Arc<Mutex<bool>>,
}

#[derive(Default)]
struct Tx {
    rows: Vec<String>,
    step: Option<(Key, FencingToken, StepRecord, Duration)>,
}

impl Tx {
    fn insert(&mut self, row: &str) {
        self.rows.push(row.to_string());
    }
}

#[async_trait]
impl Store for TxMemory {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
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
    fn detached(&self) -> Option<Arc<dyn Store>> {
        Some(Arc::new(self.clone()))
    }
    fn process_local(&self) -> bool {
        true
    }
    fn supports_steps(&self) -> bool {
        true
    }
    async fn load_steps(&self, key: &Key) -> Result<Vec<StepRecord>, StoreError> {
        self.inner.load_steps(key).await
    }
    async fn put_step(
        &self,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.put_step(key, token, step, ttl).await
    }
    async fn clear_step(
        &self,
        key: &Key,
        token: FencingToken,
        id: &StepId,
    ) -> Result<(), StoreError> {
        self.inner.clear_step(key, token, id).await
    }
}

#[async_trait]
impl TransactionalStore for TxMemory {
    type Tx = Tx;
    async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(Tx::default())
    }
    async fn complete_in(
        &self,
        _: &mut Tx,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.complete(key, token, value, ttl).await
    }
    async fn commit(&self, tx: Tx) -> Result<(), StoreError> {
        if let Some((key, token, step, ttl)) = &tx.step {
            self.inner.put_step(key, *token, step, *ttl).await?;
        }
        self.table.lock().unwrap().extend(tx.rows);
        if std::mem::take(&mut *self.lose_commit_reply.lock().unwrap()) {
            return Err(StoreError::Timeout(Duration::from_millis(1)));
        }
        Ok(())
    }
    async fn put_step_in(
        &self,
        tx: &mut Tx,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        match self.inner.get(key).await? {
            Some(RecordState::InProgress { token: t, .. }) if t == token => {}
            _ => return Err(StoreError::Fenced),
        }
        tx.step = Some((*key, token, step.clone(), ttl));
        Ok(())
    }
}

#[tokio::test]
async fn a_transactional_step_commits_its_writes_with_its_record_once() {
    let store = TxMemory::default();
    let runs = AtomicU32::new(0);
    let fail_after = AtomicU32::new(1);
    let call = || {
        Call::new("tests::steps::ledger")
            .key("order-1")
            .run(&store, async {
                let id = step_in(&store, "ledger", async |tx: &mut Tx| {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tx.insert("ledger row");
                    Ok::<_, Error>(77u32)
                })
                .await?;
                if fail_after.swap(0, Ordering::SeqCst) == 1 {
                    return Err(Error::MissingKey);
                }
                Ok::<_, Error>(id)
            })
    };
    assert!(call().await.is_err());
    assert_eq!(call().await.unwrap(), 77);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the committed step was not run again"
    );
    assert_eq!(*store.table.lock().unwrap(), ["ledger row"]);
}

#[tokio::test]
async fn a_transactional_step_that_fails_rolls_back_and_runs_again() {
    let store = TxMemory::default();
    let runs = AtomicU32::new(0);
    let call = || {
        Call::new("tests::steps::ledger_err")
            .key("order-1")
            .run(&store, async {
                step_in(&store, "ledger", async |tx: &mut Tx| {
                    tx.insert("row");
                    if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err(Error::MissingKey);
                    }
                    Ok::<_, Error>(1u8)
                })
                .await
            })
    };
    assert!(call().await.is_err());
    assert_eq!(call().await.unwrap(), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(
        *store.table.lock().unwrap(),
        ["row"],
        "the failed attempt was rolled back"
    );
}

#[tokio::test]
async fn a_lost_commit_reply_is_resolved_from_the_step_record() {
    let store = TxMemory::default();
    *store.lose_commit_reply.lock().unwrap() = true;
    let v = Call::new("tests::steps::lost_commit")
        .key("order-1")
        .run(&store, async {
            step_in(&store, "ledger", async |tx: &mut Tx| {
                tx.insert("row");
                Ok::<_, Error>(5u8)
            })
            .await
        })
        .await;
    assert_eq!(v.unwrap(), 5);
}

#[tokio::test]
async fn steps_are_refused_in_a_transactional_call() {
    let store = TxMemory::default();
    let runs = AtomicU32::new(0);
    let r = Call::new("tests::steps::in_tx")
        .key("k")
        .run_in_transaction(&store, async |_tx: &mut Tx| {
            step("s", async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(1u8)
            })
            .await
        })
        .await;
    assert!(matches!(r, Err(Error::StepInTransaction { step }) if step == "s"));
    let r = Call::new("tests::steps::in_tx_step_in")
        .key("k")
        .run_in_transaction(&store, async |_tx: &mut Tx| {
            step_in(&store, "s", async |_: &mut Tx| Ok::<_, Error>(1u8)).await
        })
        .await;
    assert!(matches!(r, Err(Error::StepInTransaction { .. })));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn step_in_outside_a_call_is_refused() {
    let store = TxMemory::default();
    let r = step_in(&store, "s", async |tx: &mut Tx| {
        tx.insert("row");
        Ok::<_, Error>(1u8)
    })
    .await;
    assert!(matches!(r, Err(Error::StepOutsideCall { .. })));
    assert!(store.table.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_unprotected_run_runs_its_steps_and_records_nothing() {
    let store = MemoryStore::new();
    let runs = AtomicU32::new(0);
    let call = || {
        Call::new("tests::steps::unprotected")
            .key(None::<&str>)
            .missing_key(MissingKey::Run)
            .run(&store, async {
                step("s", async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(1u8)
                })
                .at_most_once()
                .await
            })
    };
    assert_eq!(call().await.unwrap(), 1);
    assert_eq!(call().await.unwrap(), 1);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "an unprotected step runs every time"
    );
}

/// A memory store whose step writes fail a given number of times first.
#[derive(Clone, Debug, Default)]
struct Flaky {
    inner: MemoryStore,
    failures: Arc<AtomicU32>,
}

#[async_trait]
impl Store for Flaky {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
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
    fn detached(&self) -> Option<Arc<dyn Store>> {
        Some(Arc::new(self.clone()))
    }
    fn supports_steps(&self) -> bool {
        true
    }
    async fn load_steps(&self, key: &Key) -> Result<Vec<StepRecord>, StoreError> {
        self.inner.load_steps(key).await
    }
    async fn put_step(
        &self,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        // Applied, then the reply lost: the retry must be harmless.
        let r = self.inner.put_step(key, token, step, ttl).await;
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::Timeout(Duration::from_millis(1)));
        }
        r
    }
}

#[tokio::test(start_paused = true)]
async fn a_step_write_whose_reply_is_lost_is_retried() {
    let store = Flaky::default();
    store.failures.store(2, Ordering::SeqCst);
    let runs = AtomicU32::new(0);
    let call = |fail: bool| {
        let runs = &runs;
        let store = &store;
        Call::new("tests::steps::flaky")
            .key("k")
            .run(store, async move {
                let v = step("s", async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(3u8)
                })
                .await?;
                if fail {
                    return Err(Error::MissingKey);
                }
                Ok(v)
            })
    };
    assert!(call(true).await.is_err());
    assert_eq!(call(false).await.unwrap(), 3);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the step was recorded by a retried write"
    );
    let ident = Call::new("tests::steps::flaky")
        .key("k")
        .identity_for(&store);
    let key = ident.unwrap().unwrap().key;
    let steps = store.inner.load_steps(&key).await.unwrap();
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].status, StepStatus::Done);
}

/// Cancellation after each step's write: the caller's future is dropped right after step `i`
/// was recorded (inside step `i + 1`), then the call is retried. Every step ran exactly once
/// in all.
#[tokio::test]
async fn cancelled_after_each_step_then_retried_runs_each_step_once() {
    for cut in 0..3usize {
        let store = MemoryStore::new();
        let runs: [AtomicU32; 3] = Default::default();
        let call = |cut: Option<usize>| {
            let runs = &runs;
            let store = &store;
            Call::new("tests::steps::cancel")
                .key("order-1")
                .run(store, async move {
                    let mut sum = 0u32;
                    for (i, n) in runs.iter().enumerate() {
                        sum += step(["a", "b", "c"][i], async move {
                            n.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, Error>(i as u32)
                        })
                        .await?;
                        if cut == Some(i) {
                            // The step is recorded; the caller goes away now.
                            std::future::pending::<()>().await;
                        }
                    }
                    Ok::<_, Error>(sum)
                })
        };
        let cut_short = tokio::time::timeout(Duration::from_millis(50), call(Some(cut))).await;
        assert!(cut_short.is_err());
        assert_eq!(call(None).await.unwrap(), 3);
        let counts: Vec<u32> = runs.iter().map(|n| n.load(Ordering::SeqCst)).collect();
        assert_eq!(counts, [1, 1, 1], "cut after step {cut}");
    }
}
