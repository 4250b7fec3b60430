//! `#[idempotent]`: each argument of SPEC §2 observably changes behaviour, against the
//! memory store. A function takes its store and a run counter as skipped arguments, so each
//! test owns both.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::{idempotent, Error, Store, StoreError};
use idem_stores::MemoryStore;
use serde::{Deserialize, Serialize};

fn bump(runs: &AtomicU32) -> u32 {
    runs.fetch_add(1, SeqCst) + 1
}

// ---- key ------------------------------------------------------------------------------

#[idempotent(key = order_id, store = store, skip(store, runs))]
async fn by_key(store: &MemoryStore, runs: &AtomicU32, order_id: &str) -> Result<u32, Error> {
    let _ = order_id;
    Ok(bump(runs))
}

#[tokio::test]
async fn key_same_key_replays_other_key_runs() {
    let (store, runs) = (MemoryStore::new(), AtomicU32::new(0));
    assert_eq!(by_key(&store, &runs, "a").await.unwrap(), 1);
    assert_eq!(by_key(&store, &runs, "a").await.unwrap(), 1, "replayed");
    assert_eq!(
        by_key(&store, &runs, "b").await.unwrap(),
        2,
        "a new key runs"
    );
    assert_eq!(runs.load(SeqCst), 2);
}

#[derive(Serialize)]
struct Charge {
    idempotency_key: String,
    amount: u64,
}

#[idempotent(key = req.idempotency_key.clone(), store = store, skip(store, runs))]
async fn charge(store: &MemoryStore, runs: &AtomicU32, req: Charge) -> Result<u64, Error> {
    bump(runs);
    Ok(req.amount) // the body consumes `req`
}

#[tokio::test]
async fn key_with_other_arguments_is_fingerprinted() {
    let (store, runs) = (MemoryStore::new(), AtomicU32::new(0));
    let req = |amount| Charge {
        idempotency_key: "k1".into(),
        amount,
    };
    assert_eq!(charge(&store, &runs, req(5)).await.unwrap(), 5);
    assert_eq!(charge(&store, &runs, req(5)).await.unwrap(), 5);
    assert!(matches!(
        charge(&store, &runs, req(6)).await,
        Err(Error::KeyReused)
    ));
    assert_eq!(runs.load(SeqCst), 1);
}

// ---- derived key, skip -----------------------------------------------------------------

#[idempotent(store = store, skip(store, runs, note))]
async fn derived(
    store: &MemoryStore,
    runs: &AtomicU32,
    user: u64,
    amount: u64,
    note: String,
) -> Result<String, Error> {
    bump(runs);
    Ok(format!("{user}:{amount}:{note}"))
}

#[tokio::test]
async fn derived_key_covers_every_argument_not_skipped() {
    let (store, runs) = (MemoryStore::new(), AtomicU32::new(0));
    assert_eq!(
        derived(&store, &runs, 1, 10, "x".into()).await.unwrap(),
        "1:10:x"
    );
    // `note` is skipped: a different note is the same call, and the first answer replays.
    assert_eq!(
        derived(&store, &runs, 1, 10, "y".into()).await.unwrap(),
        "1:10:x"
    );
    assert_eq!(runs.load(SeqCst), 1);
    // Any other argument is another key (never KeyReused: there is no explicit key).
    assert_eq!(
        derived(&store, &runs, 1, 11, "x".into()).await.unwrap(),
        "1:11:x"
    );
    assert_eq!(
        derived(&store, &runs, 2, 10, "x".into()).await.unwrap(),
        "2:10:x"
    );
    assert_eq!(runs.load(SeqCst), 3);
}

#[idempotent(key = id, store = store, skip(store, runs, amount))]
async fn skip_leaves_fingerprint(
    store: &MemoryStore,
    runs: &AtomicU32,
    id: u64,
    amount: u64,
) -> Result<u64, Error> {
    bump(runs);
    Ok(id + amount)
}

#[tokio::test]
async fn skip_leaves_an_argument_out_of_the_fingerprint() {
    let (store, runs) = (MemoryStore::new(), AtomicU32::new(0));
    assert_eq!(
        skip_leaves_fingerprint(&store, &runs, 1, 10).await.unwrap(),
        11
    );
    // Not KeyReused: `amount` is not fingerprinted.
    assert_eq!(
        skip_leaves_fingerprint(&store, &runs, 1, 99).await.unwrap(),
        11
    );
    assert_eq!(runs.load(SeqCst), 1);
}

// ---- ttl -------------------------------------------------------------------------------

#[idempotent(key = id, ttl = "300ms", store = store, skip(store, runs))]
async fn short_ttl(store: &MemoryStore, runs: &AtomicU32, id: u64) -> Result<u32, Error> {
    let _ = id;
    Ok(bump(runs))
}

#[idempotent(key = id, ttl = ttl, store = store, skip(store, runs, ttl))]
async fn ttl_expr(
    store: &MemoryStore,
    runs: &AtomicU32,
    ttl: Duration,
    id: u64,
) -> Result<u32, Error> {
    let _ = id;
    Ok(bump(runs))
}

#[tokio::test]
async fn ttl_literal_and_expression_expire_the_record() {
    let (store, runs) = (MemoryStore::new(), AtomicU32::new(0));
    assert_eq!(short_ttl(&store, &runs, 1).await.unwrap(), 1);
    assert_eq!(short_ttl(&store, &runs, 1).await.unwrap(), 1);
    let long = Duration::from_secs(3600);
    assert_eq!(ttl_expr(&store, &runs, long, 1).await.unwrap(), 2);
    let short = Duration::from_millis(300);
    assert_eq!(ttl_expr(&store, &runs, short, 2).await.unwrap(), 3);
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(
        short_ttl(&store, &runs, 1).await.unwrap(),
        4,
        "300ms passed"
    );
    assert_eq!(
        ttl_expr(&store, &runs, long, 1).await.unwrap(),
        2,
        "an hour did not"
    );
    assert_eq!(
        ttl_expr(&store, &runs, short, 2).await.unwrap(),
        5,
        "300ms passed"
    );
}

// ---- store: reference, Arc<dyn Store>, value expression ------------------------------

#[idempotent(key = id, store = store, skip(store, runs))]
async fn on_dyn(store: Arc<dyn Store>, runs: &AtomicU32, id: u64) -> Result<u32, Error> {
    let _ = id;
    Ok(bump(runs))
}

#[tokio::test]
async fn store_takes_references_arcs_and_trait_objects() {
    let runs = AtomicU32::new(0);
    let shared: Arc<dyn Store> = Arc::new(MemoryStore::new());
    assert_eq!(on_dyn(shared.clone(), &runs, 1).await.unwrap(), 1);
    assert_eq!(on_dyn(shared.clone(), &runs, 1).await.unwrap(), 1);
    // Another store has no record.
    assert_eq!(
        on_dyn(Arc::new(MemoryStore::new()), &runs, 1)
            .await
            .unwrap(),
        2
    );
}

// ---- scope -----------------------------------------------------------------------------

#[idempotent(key = key, scope = tenant, store = store, skip(store, runs))]
async fn scoped(
    store: &MemoryStore,
    runs: &AtomicU32,
    tenant: &str,
    key: &str,
) -> Result<u32, Error> {
    let _ = (tenant, key);
    Ok(bump(runs))
}

#[tokio::test]
async fn scope_separates_tenants_with_the_same_key() {
    let (store, runs) = (MemoryStore::new(), AtomicU32::new(0));
    assert_eq!(scoped(&store, &runs, "acme", "k").await.unwrap(), 1);
    assert_eq!(scoped(&store, &runs, "acme", "k").await.unwrap(), 1);
    // `tenant` is fingerprinted too, but the scope keeps the records apart in the first
    // place: not KeyReused, a fresh run.
    assert_eq!(scoped(&store, &runs, "globex", "k").await.unwrap(), 2);
}

// ---- namespace -------------------------------------------------------------------------

#[idempotent(key = id, namespace = "billing::charge", shared, store = store, skip(store, runs))]
async fn charge_v1(store: &MemoryStore, runs: &AtomicU32, id: u64) -> Result<u32, Error> {
    let _ = id;
    Ok(bump(runs))
}

#[idempotent(key = id, namespace = "billing::charge", shared, store = store, skip(store, runs))]
async fn charge_renamed(store: &MemoryStore, runs: &AtomicU32, id: u64) -> Result<u32, Error> {
    let _ = id;
    Ok(bump(runs) + 100)
}

#[idempotent(key = id, store = store, skip(store, runs))]
async fn unpinned(store: &MemoryStore, runs: &AtomicU32, id: u64) -> Result<u32, Error> {
    let _ = id;
    Ok(bump(runs) + 1000)
}

#[tokio::test]
async fn namespace_pins_the_record_across_renames() {
    let (store, runs) = (MemoryStore::new(), AtomicU32::new(0));
    assert_eq!(charge_v1(&store, &runs, 7).await.unwrap(), 1);
    assert_eq!(
        charge_renamed(&store, &runs, 7).await.unwrap(),
        1,
        "same namespace"
    );
    // Without `namespace` the function's path is the namespace: another record.
    assert_eq!(unpinned(&store, &runs, 7).await.unwrap(), 1002);
}

// ---- version ---------------------------------------------------------------------------

#[idempotent(key = id, namespace = "versioned", shared, version = 2, store = store, skip(store, runs))]
async fn versioned(store: &MemoryStore, runs: &AtomicU32, id: u64) -> Result<u32, Error> {
    let _ = id;
    Ok(bump(runs))
}

#[tokio::test]
async fn version_refuses_records_of_another_version() {
    let (store, runs) = (MemoryStore::new(), AtomicU32::new(0));
    // `charge_v1`-style record at version 0 under the same namespace and key...
    #[idempotent(key = id, namespace = "versioned", shared, store = store, skip(store, runs))]
    async fn version0(store: &MemoryStore, runs: &AtomicU32, id: u64) -> Result<u32, Error> {
        let _ = id;
        Ok(bump(runs))
    }
    assert_eq!(version0(&store, &runs, 1).await.unwrap(), 1);
    // ...is not replayed as a version-2 answer.
    assert!(matches!(
        versioned(&store, &runs, 1).await,
        Err(Error::IncompatibleRecord { .. })
    ));
    assert_eq!(versioned(&store, &runs, 2).await.unwrap(), 2);
    assert_eq!(versioned(&store, &runs, 2).await.unwrap(), 2);
}

// ---- on_conflict, wait_timeout, lease ------------------------------------------------

#[idempotent(key = id, store = store, skip(store, runs, hold))]
async fn slow_wait(
    store: &MemoryStore,
    runs: &AtomicU32,
    hold: Duration,
    id: u64,
) -> Result<u32, Error> {
    let _ = id;
    let n = bump(runs);
    tokio::time::sleep(hold).await;
    Ok(n)
}

#[idempotent(key = id, on_conflict = reject, store = store, skip(store, runs, hold))]
async fn slow_reject(
    store: &MemoryStore,
    runs: &AtomicU32,
    hold: Duration,
    id: u64,
) -> Result<u32, Error> {
    let _ = id;
    let n = bump(runs);
    tokio::time::sleep(hold).await;
    Ok(n)
}

#[idempotent(key = id, wait_timeout = "100ms", store = store, skip(store, runs, hold))]
async fn slow_short_wait(
    store: &MemoryStore,
    runs: &AtomicU32,
    hold: Duration,
    id: u64,
) -> Result<u32, Error> {
    let _ = id;
    let n = bump(runs);
    tokio::time::sleep(hold).await;
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_conflict_wait_runs_once_for_many_concurrent_duplicates() {
    let store = Arc::new(MemoryStore::new());
    let runs = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (store, runs) = (store.clone(), runs.clone());
            tokio::spawn(
                async move { slow_wait(&store, &runs, Duration::from_millis(200), 1).await },
            )
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 1);
    }
    assert_eq!(
        runs.load(SeqCst),
        1,
        "32 concurrent duplicates, one execution"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_conflict_reject_answers_in_progress_at_once() {
    let store = Arc::new(MemoryStore::new());
    let runs = Arc::new(AtomicU32::new(0));
    let first = {
        let (store, runs) = (store.clone(), runs.clone());
        tokio::spawn(async move { slow_reject(&store, &runs, Duration::from_millis(400), 1).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    let dup = slow_reject(&store, &runs, Duration::ZERO, 1).await;
    assert!(matches!(dup, Err(Error::InProgress { .. })), "{dup:?}");
    assert!(t0.elapsed() < Duration::from_millis(200), "did not wait");
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(runs.load(SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_timeout_bounds_the_wait() {
    let store = Arc::new(MemoryStore::new());
    let runs = Arc::new(AtomicU32::new(0));
    let first = {
        let (store, runs) = (store.clone(), runs.clone());
        tokio::spawn(
            async move { slow_short_wait(&store, &runs, Duration::from_millis(800), 1).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    let dup = slow_short_wait(&store, &runs, Duration::ZERO, 1).await;
    let waited = t0.elapsed();
    assert!(matches!(dup, Err(Error::InProgress { .. })), "{dup:?}");
    assert!(
        waited >= Duration::from_millis(90) && waited < Duration::from_millis(600),
        "waited {waited:?}"
    );
    assert_eq!(first.await.unwrap().unwrap(), 1);
}

#[idempotent(key = id, lease = "200ms", store = store, skip(store, runs))]
async fn short_lease(store: &MemoryStore, runs: &AtomicU32, id: u64) -> Result<u32, Error> {
    let _ = id;
    let n = bump(runs);
    if n == 1 {
        std::future::pending::<()>().await; // the first caller "crashes" here
    }
    Ok(n)
}

#[idempotent(key = id, lease = "5s", wait_timeout = "400ms", store = store, skip(store, runs))]
async fn long_lease(store: &MemoryStore, runs: &AtomicU32, id: u64) -> Result<u32, Error> {
    let _ = id;
    let n = bump(runs);
    if n == 1 {
        std::future::pending::<()>().await;
    }
    Ok(n)
}

/// Polls a call once (it claims and enters the body), then leaks it: neither released nor
/// renewed, as if its process had died.
fn crash_after_claim<F: std::future::Future>(fut: F) {
    let mut fut = Box::pin(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    std::mem::forget(fut);
}

#[tokio::test]
async fn lease_decides_when_a_crashed_claim_is_taken_over() {
    let (store, runs) = (MemoryStore::new(), AtomicU32::new(0));
    crash_after_claim(short_lease(&store, &runs, 1));
    assert_eq!(runs.load(SeqCst), 1);
    let t0 = Instant::now();
    assert_eq!(
        short_lease(&store, &runs, 1).await.unwrap(),
        2,
        "taken over"
    );
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_secs(3),
        "{took:?}"
    );

    let (store, runs) = (MemoryStore::new(), AtomicU32::new(0));
    crash_after_claim(long_lease(&store, &runs, 1));
    // A 5 s lease outlives the 400 ms wait: still in progress.
    assert!(matches!(
        long_lease(&store, &runs, 1).await,
        Err(Error::InProgress { .. })
    ));
    assert_eq!(runs.load(SeqCst), 1);
}

// ---- errors ----------------------------------------------------------------------------

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum AppError {
    Declined(u32),
    Idem(String),
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idem(e.to_string())
    }
}

#[idempotent(key = id, store = store, skip(store, runs))]
async fn fails_released(store: &MemoryStore, runs: &AtomicU32, id: u64) -> Result<u32, AppError> {
    let _ = id;
    Err(AppError::Declined(bump(runs)))
}

#[idempotent(key = id, errors = store, store = store, skip(store, runs))]
async fn fails_stored(store: &MemoryStore, runs: &AtomicU32, id: u64) -> Result<u32, AppError> {
    let _ = id;
    Err(AppError::Declined(bump(runs)))
}

#[idempotent(key = id, errors = release, store = store, skip(store, runs))]
async fn fails_released_explicitly(
    store: &MemoryStore,
    runs: &AtomicU32,
    id: u64,
) -> Result<u32, AppError> {
    let _ = id;
    Err(AppError::Declined(bump(runs)))
}

#[tokio::test]
async fn errors_release_retries_and_errors_store_replays() {
    let (store, runs) = (MemoryStore::new(), AtomicU32::new(0));
    assert_eq!(
        fails_released(&store, &runs, 1).await,
        Err(AppError::Declined(1))
    );
    assert_eq!(
        fails_released(&store, &runs, 1).await,
        Err(AppError::Declined(2))
    );
    assert_eq!(
        fails_released_explicitly(&store, &runs, 1).await,
        Err(AppError::Declined(3))
    );
    assert_eq!(
        fails_released_explicitly(&store, &runs, 1).await,
        Err(AppError::Declined(4))
    );
    let (store, runs) = (MemoryStore::new(), AtomicU32::new(0));
    assert_eq!(
        fails_stored(&store, &runs, 1).await,
        Err(AppError::Declined(1))
    );
    assert_eq!(
        fails_stored(&store, &runs, 1).await,
        Err(AppError::Declined(1)),
        "replayed"
    );
    assert_eq!(runs.load(SeqCst), 1);
}

// ---- missing_key -----------------------------------------------------------------------

#[idempotent(key = key, store = store, skip(store, runs))]
async fn needs_key(
    store: &MemoryStore,
    runs: &AtomicU32,
    key: Option<String>,
) -> Result<u32, Error> {
    let _ = key;
    Ok(bump(runs))
}

#[idempotent(key = key, missing_key = error, store = store, skip(store, runs))]
async fn needs_key_explicitly(
    store: &MemoryStore,
    runs: &AtomicU32,
    key: Option<String>,
) -> Result<u32, Error> {
    let _ = key;
    Ok(bump(runs))
}

#[idempotent(key = key, missing_key = run, store = store, skip(store, runs))]
async fn runs_without_key(
    store: &MemoryStore,
    runs: &AtomicU32,
    key: Option<String>,
) -> Result<u32, Error> {
    let _ = key;
    Ok(bump(runs))
}

#[tokio::test]
async fn missing_key_error_or_run_unprotected() {
    let (store, runs) = (MemoryStore::new(), AtomicU32::new(0));
    assert!(matches!(
        needs_key(&store, &runs, None).await,
        Err(Error::MissingKey)
    ));
    assert!(matches!(
        needs_key_explicitly(&store, &runs, None).await,
        Err(Error::MissingKey)
    ));
    assert_eq!(runs.load(SeqCst), 0);
    assert_eq!(runs_without_key(&store, &runs, None).await.unwrap(), 1);
    assert_eq!(
        runs_without_key(&store, &runs, None).await.unwrap(),
        2,
        "unprotected"
    );
    let k = Some("k".to_owned());
    assert_eq!(runs_without_key(&store, &runs, k.clone()).await.unwrap(), 3);
    assert_eq!(
        runs_without_key(&store, &runs, k).await.unwrap(),
        3,
        "protected"
    );
}

// ---- fail_open -------------------------------------------------------------------------

/// A store whose every call fails as an unreachable server would.
#[derive(Debug)]
struct Down;

#[idem_core::async_trait]
impl Store for Down {
    async fn claim(&self, _: &idem_core::ClaimRequest) -> Result<idem_core::Claim, StoreError> {
        Err(StoreError::Timeout(Duration::from_millis(1)))
    }
    async fn complete(
        &self,
        _: &idem_core::Key,
        _: idem_core::FencingToken,
        _: &[u8],
        _: Duration,
    ) -> Result<(), StoreError> {
        Err(StoreError::Timeout(Duration::from_millis(1)))
    }
    async fn release(
        &self,
        _: &idem_core::Key,
        _: idem_core::FencingToken,
    ) -> Result<(), StoreError> {
        Err(StoreError::Timeout(Duration::from_millis(1)))
    }
    async fn renew(
        &self,
        _: &idem_core::Key,
        _: idem_core::FencingToken,
        _: Duration,
    ) -> Result<(), StoreError> {
        Err(StoreError::Timeout(Duration::from_millis(1)))
    }
    async fn get(&self, _: &idem_core::Key) -> Result<Option<idem_core::RecordState>, StoreError> {
        Err(StoreError::Timeout(Duration::from_millis(1)))
    }
    async fn wait(&self, _: &idem_core::Key, _: Duration) -> Result<(), StoreError> {
        Err(StoreError::Timeout(Duration::from_millis(1)))
    }
    async fn remove(&self, _: &idem_core::Key) -> Result<(), StoreError> {
        Err(StoreError::Timeout(Duration::from_millis(1)))
    }
    fn release_detached(&self, _: idem_core::Key, _: idem_core::FencingToken) {}
}

#[idempotent(key = id, store = Down, skip(runs))]
async fn closed(runs: &AtomicU32, id: u64) -> Result<u32, Error> {
    let _ = id;
    Ok(bump(runs))
}

#[idempotent(key = id, store = Down, fail_open, skip(runs))]
async fn open(runs: &AtomicU32, id: u64) -> Result<u32, Error> {
    let _ = id;
    Ok(bump(runs))
}

#[idempotent(key = id, store = Down, fail_open = false, skip(runs))]
async fn closed_explicitly(runs: &AtomicU32, id: u64) -> Result<u32, Error> {
    let _ = id;
    Ok(bump(runs))
}

#[tokio::test]
async fn fail_open_runs_unprotected_when_the_store_is_down() {
    let runs = AtomicU32::new(0);
    assert!(matches!(
        closed(&runs, 1).await,
        Err(Error::Store(StoreError::Timeout(_)))
    ));
    assert!(matches!(
        closed_explicitly(&runs, 1).await,
        Err(Error::Store(StoreError::Timeout(_)))
    ));
    assert_eq!(runs.load(SeqCst), 0, "fail closed: the body never ran");
    assert_eq!(open(&runs, 1).await.unwrap(), 1);
    assert_eq!(open(&runs, 1).await.unwrap(), 2);
}
