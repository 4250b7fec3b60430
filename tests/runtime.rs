//! The runtime's state machine (SPEC §3) end to end on `MemoryStore`, one behaviour a test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_core::{
    async_trait, count, Call, Claim, ClaimRequest, Error, FencingToken, Key, OnConflict, Outcome,
    RecordState, Store, StoreError,
};
use idem_stores::MemoryStore;
use serde::{Deserialize, Serialize};

/// A namespace of its own for each test.
fn ns(name: &str) -> &'static str {
    Box::leak(format!("tests::runtime::{name}::{}", FencingToken::random().0).into_boxed_str())
}

fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_concurrent_calls_run_the_body_once() {
    let store = Arc::new(MemoryStore::new());
    let ns = ns("thousand");
    let runs = counter();
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let (store, runs) = (store.clone(), runs.clone());
            tokio::spawn(async move {
                Call::new(ns)
                    .key("pay-1")
                    .run(&*store, async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok::<_, Error>(format!("receipt from caller {i}"))
                    })
                    .await
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap().unwrap());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(results.iter().all(|r| r == &results[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distinct_keys_do_not_interfere() {
    let store = Arc::new(MemoryStore::new());
    let ns = ns("distinct");
    let runs = Arc::new((0..50).map(|_| AtomicUsize::new(0)).collect::<Vec<_>>());
    let mut tasks = Vec::new();
    for k in 0..50usize {
        for _ in 0..10 {
            let (store, runs) = (store.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                let got = Call::new(ns)
                    .key(k)
                    .run(&*store, async move {
                        runs[k].fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<_, Error>(k * 7)
                    })
                    .await
                    .unwrap();
                assert_eq!(got, k * 7);
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(runs.iter().all(|r| r.load(Ordering::SeqCst) == 1));
}

async fn charge(
    store: &dyn Store,
    ns: &'static str,
    runs: &Arc<AtomicUsize>,
    amount: u64,
) -> Result<String, Error> {
    let runs = runs.clone();
    Call::new(ns)
        .key("order-1")
        .fingerprint((amount,))
        .run(store, async move {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            Ok(format!("charged {amount} (run {n})"))
        })
        .await
}

#[tokio::test]
async fn a_completed_call_replays() {
    let store = MemoryStore::new();
    let ns = ns("replay");
    let runs = counter();
    let replayed = count(Outcome::Replayed);
    let first = charge(&store, ns, &runs, 100).await.unwrap();
    for _ in 0..5 {
        assert_eq!(charge(&store, ns, &runs, 100).await.unwrap(), first);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(count(Outcome::Replayed) >= replayed + 5);
}

#[tokio::test]
async fn another_payload_under_the_same_key_is_key_reused() {
    let store = MemoryStore::new();
    let ns = ns("reused");
    let runs = counter();
    charge(&store, ns, &runs, 100).await.unwrap();
    assert!(matches!(
        charge(&store, ns, &runs, 999).await,
        Err(Error::KeyReused)
    ));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_payload_while_in_flight_is_key_reused_not_a_wait() {
    let store = Arc::new(MemoryStore::new());
    let ns = ns("reused_in_flight");
    let s2 = store.clone();
    let first = tokio::spawn(async move {
        Call::new(ns)
            .key("k")
            .fingerprint(1u8)
            .run(&*s2, async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok::<_, Error>(1)
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second: Result<u8, Error> = Call::new(ns)
        .key("k")
        .fingerprint(2u8)
        .run(&*store, async { Ok(2) })
        .await;
    assert!(matches!(second, Err(Error::KeyReused)));
    assert_eq!(first.await.unwrap().unwrap(), 1);
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
enum PayError {
    Declined(String),
    Idem(String),
}

impl From<Error> for PayError {
    fn from(e: Error) -> Self {
        PayError::Idem(e.to_string())
    }
}

#[tokio::test]
async fn an_err_releases_and_the_retry_runs_again() {
    let store = MemoryStore::new();
    let ns = ns("err_release");
    let runs = counter();
    for expected_runs in 1..=3 {
        let r = runs.clone();
        let got: Result<u32, PayError> = Call::new(ns)
            .key("k")
            .run(&store, async move {
                r.fetch_add(1, Ordering::SeqCst);
                Err(PayError::Declined("card".into()))
            })
            .await;
        assert_eq!(got, Err(PayError::Declined("card".into())));
        assert_eq!(runs.load(Ordering::SeqCst), expected_runs);
    }
    let ok: Result<u32, PayError> = Call::new(ns).key("k").run(&store, async { Ok(5) }).await;
    assert_eq!(ok, Ok(5));
}

#[tokio::test]
async fn stored_errors_replay() {
    let store = MemoryStore::new();
    let ns = ns("err_store");
    let runs = counter();
    for _ in 0..3 {
        let r = runs.clone();
        let got: Result<u32, PayError> = Call::new(ns)
            .key("k")
            .run_storing_errors(&store, async move {
                let n = r.fetch_add(1, Ordering::SeqCst);
                Err(PayError::Declined(format!("declined on run {n}")))
            })
            .await;
        assert_eq!(got, Err(PayError::Declined("declined on run 0".into())));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_releases_the_claim() {
    let store = Arc::new(MemoryStore::new());
    let ns = ns("panic");
    let s2 = store.clone();
    let panicked = tokio::spawn(async move {
        Call::new(ns)
            .key("k")
            .run(&*s2, async {
                if true {
                    panic!("body panicked");
                }
                Ok::<u8, Error>(0)
            })
            .await
    })
    .await;
    assert!(panicked.unwrap_err().is_panic());
    // Reject mode: had the claim not been released, this would be InProgress for 30 s.
    let got: Result<u8, Error> = Call::new(ns)
        .key("k")
        .on_conflict(OnConflict::Reject)
        .run(&*store, async { Ok(7) })
        .await;
    assert_eq!(got.unwrap(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_callers_future_releases_at_once() {
    let store = Arc::new(MemoryStore::new());
    let ns = ns("dropped");
    let started = Arc::new(tokio::sync::Notify::new());
    let (s2, st2) = (store.clone(), started.clone());
    let call = tokio::spawn(async move {
        Call::new(ns)
            .key("k")
            .lease(Duration::from_secs(600))
            .run(&*s2, async move {
                st2.notify_one();
                std::future::pending::<()>().await;
                Ok::<u8, Error>(0)
            })
            .await
    });
    started.notified().await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    // The lease is 10 minutes; the next call gets the key within its 5 s wait.
    let got: Result<u8, Error> = Call::new(ns)
        .key("k")
        .wait_timeout(Duration::from_secs(5))
        .run(&*store, async { Ok(9) })
        .await;
    assert_eq!(got.unwrap(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_longer_than_its_lease_is_not_taken_over() {
    let store = Arc::new(MemoryStore::new());
    let ns = ns("renewal");
    let runs = counter();
    let lease = Duration::from_millis(300);
    let (s2, r2) = (store.clone(), runs.clone());
    let first = tokio::spawn(async move {
        Call::new(ns)
            .key("k")
            .lease(lease)
            .run(&*s2, async move {
                r2.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(lease * 3).await;
                Ok::<_, Error>("first".to_string())
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut conflicts = 0;
    while !first.is_finished() {
        let r = runs.clone();
        let got: Result<String, Error> = Call::new(ns)
            .key("k")
            .lease(lease)
            .on_conflict(OnConflict::Reject)
            .run(&*store, async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok("second".to_string())
            })
            .await;
        match got {
            Err(Error::InProgress { .. }) => conflicts += 1,
            Ok(v) => assert_eq!(v, "first", "a duplicate ran while the first was renewing"),
            Err(e) => panic!("{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(first.await.unwrap().unwrap(), "first");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(
        conflicts > 5,
        "only {conflicts} conflicts seen during a 900 ms body"
    );
}

#[tokio::test]
async fn an_abandoned_claim_is_taken_over_once_its_lease_passes() {
    let store = MemoryStore::new();
    let ns = ns("abandoned");
    let call = || Call::new(ns).key("k").wait_timeout(Duration::from_secs(5));
    // A crashed holder: claimed with a 300 ms lease, never completed nor released.
    let ident = call().identity_for(&store).unwrap().unwrap();
    let claim = store
        .claim(&ClaimRequest {
            key: ident.key,
            fingerprint: None,
            token: FencingToken::random(),
            lease: Duration::from_millis(300),
        })
        .await
        .unwrap();
    assert_eq!(claim, Claim::Acquired { taken_over: false });
    let taken = count(Outcome::TakenOver);
    let started = std::time::Instant::now();
    let got: Result<String, Error> = call().run(&store, async { Ok("mine".to_string()) }).await;
    assert_eq!(got.unwrap(), "mine");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(count(Outcome::TakenOver) > taken);
}

#[tokio::test]
async fn a_changed_return_type_or_version_is_incompatible() {
    let store = MemoryStore::new();
    let ns = ns("incompatible");
    let v: Result<u32, Error> = Call::new(ns).key("k").run(&store, async { Ok(1) }).await;
    assert_eq!(v.unwrap(), 1);
    let runs = counter();
    let r = runs.clone();
    let s: Result<String, Error> = Call::new(ns)
        .key("k")
        .run(&store, async move {
            r.fetch_add(1, Ordering::SeqCst);
            Ok("x".to_string())
        })
        .await;
    assert!(matches!(s, Err(Error::IncompatibleRecord { .. })), "{s:?}");
    let bumped: Result<u32, Error> = Call::new(ns)
        .key("k")
        .version(1)
        .run(&store, async { Ok(2) })
        .await;
    assert!(matches!(bumped, Err(Error::IncompatibleRecord { .. })));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "never a silent re-execution"
    );
}

async fn replays_once<T>(store: &MemoryStore, value: T)
where
    T: Serialize
        + serde::de::DeserializeOwned
        + Clone
        + PartialEq
        + std::fmt::Debug
        + Send
        + 'static,
{
    let ns = ns("falsy");
    let runs = counter();
    for _ in 0..3 {
        let (r, v) = (runs.clone(), value.clone());
        let got: Result<T, Error> = Call::new(ns)
            .key("k")
            .run(store, async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(v)
            })
            .await;
        assert_eq!(got.unwrap(), value);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "{value:?} was not replayed");
}

#[tokio::test]
async fn unit_none_zero_false_and_empty_values_replay() {
    let store = MemoryStore::new();
    replays_once(&store, ()).await;
    replays_once(&store, None::<u32>).await;
    replays_once(&store, 0u64).await;
    replays_once(&store, false).await;
    replays_once(&store, Vec::<u8>::new()).await;
    replays_once(&store, String::new()).await;
    replays_once(&store, HashMap::<String, u8>::new()).await;
}

#[tokio::test]
async fn an_expired_record_runs_again() {
    let store = MemoryStore::new();
    let ns = ns("expired");
    let runs = counter();
    let call = |runs: Arc<AtomicUsize>| {
        Call::new(ns)
            .key("k")
            .ttl(Duration::from_millis(200))
            .run(&store, async move {
                Ok::<_, Error>(runs.fetch_add(1, Ordering::SeqCst))
            })
    };
    assert_eq!(call(runs.clone()).await.unwrap(), 0);
    assert_eq!(call(runs.clone()).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(call(runs.clone()).await.unwrap(), 1);
}

#[tokio::test]
async fn a_hashmap_argument_fingerprints_the_same_in_any_order() {
    let store = MemoryStore::new();
    let ns = ns("hashmap");
    let mut a = HashMap::new();
    let mut b = HashMap::new();
    for i in 0..200u32 {
        a.insert(format!("item-{i}"), i);
    }
    for i in (0..200u32).rev() {
        b.insert(format!("item-{i}"), i);
    }
    let runs = counter();
    for args in [&a, &b, &a] {
        let r = runs.clone();
        let got: Result<u32, Error> = Call::new(ns)
            .key("cart-1")
            .fingerprint((args,))
            .run(&store, async move {
                Ok(r.fetch_add(1, Ordering::SeqCst) as u32)
            })
            .await;
        assert_eq!(got.unwrap(), 0);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_value_over_the_limit_is_too_large_and_released() {
    let store = MemoryStore::new();
    let ns = ns("too_large");
    let runs = counter();
    let r = runs.clone();
    let big: Result<Vec<u8>, Error> = Call::new(ns)
        .key("k")
        .max_value_size(1024)
        .run(&store, async move {
            r.fetch_add(1, Ordering::SeqCst);
            Ok(vec![1u8; 4096])
        })
        .await;
    assert!(
        matches!(big, Err(Error::TooLarge { limit: 1024, .. })),
        "{big:?}"
    );
    // Released: the retry runs (in reject mode, so a leftover claim would show).
    let small: Result<Vec<u8>, Error> = Call::new(ns)
        .key("k")
        .max_value_size(1024)
        .on_conflict(OnConflict::Reject)
        .run(&store, async { Ok(vec![2u8; 8]) })
        .await;
    assert_eq!(small.unwrap(), vec![2u8; 8]);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn current_key_is_the_hashed_key_inside_the_body() {
    let store = MemoryStore::new();
    let call = Call::new(ns("current_key")).key("k");
    let expected = call.identity_for(&store).unwrap().unwrap().key;
    let seen: Result<Option<String>, Error> = call
        .run(&store, async {
            Ok(idem_core::current_key().map(|k| k.to_hex()))
        })
        .await;
    assert_eq!(seen.unwrap(), Some(expected.to_hex()));
    assert_eq!(idem_core::current_key(), None);
}

#[tokio::test]
async fn a_none_key_is_missing_key_or_runs_unprotected() {
    let store = MemoryStore::new();
    let ns = ns("missing");
    let runs = counter();
    let r = runs.clone();
    let got: Result<u8, Error> = Call::new(ns)
        .key(&None::<String>)
        .run(&store, async move {
            r.fetch_add(1, Ordering::SeqCst);
            Ok(1)
        })
        .await;
    assert!(matches!(got, Err(Error::MissingKey)));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    for _ in 0..2 {
        let r = runs.clone();
        let got: Result<usize, Error> = Call::new(ns)
            .key(&None::<String>)
            .missing_key(idem_core::MissingKey::Run)
            .run(&store, async move { Ok(r.fetch_add(1, Ordering::SeqCst)) })
            .await;
        got.unwrap();
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "unprotected calls run every time"
    );
}

#[tokio::test]
async fn a_duplicate_in_reject_mode_gets_in_progress() {
    let store = Arc::new(MemoryStore::new());
    let ns = ns("reject");
    let s2 = store.clone();
    let first = tokio::spawn(async move {
        Call::new(ns)
            .key("k")
            .run(&*s2, async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<_, Error>(1u8)
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let got: Result<u8, Error> = Call::new(ns)
        .key("k")
        .on_conflict(OnConflict::Reject)
        .run(&*store, async { Ok(2) })
        .await;
    match got {
        Err(e @ Error::InProgress { .. }) => assert_eq!(e.http_status(), 409),
        other => panic!("{other:?}"),
    }
    assert_eq!(first.await.unwrap().unwrap(), 1);
}

#[tokio::test]
async fn a_waiter_gives_up_after_wait_timeout() {
    let store = Arc::new(MemoryStore::new());
    let ns = ns("wait_timeout");
    let s2 = store.clone();
    let first = tokio::spawn(async move {
        Call::new(ns)
            .key("k")
            .run(&*s2, async {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                Ok::<_, Error>(1u8)
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let timeouts = count(Outcome::WaitTimeout);
    let got: Result<u8, Error> = Call::new(ns)
        .key("k")
        .wait_timeout(Duration::from_millis(200))
        .run(&*store, async { Ok(2) })
        .await;
    assert!(matches!(got, Err(Error::InProgress { .. })));
    assert!(count(Outcome::WaitTimeout) > timeouts);
    assert_eq!(first.await.unwrap().unwrap(), 1);
}

#[tokio::test]
async fn garbage_in_the_store_is_a_codec_error_not_a_replay() {
    let store = MemoryStore::new();
    let call = || Call::new("tests::runtime::garbage").key("k");
    let key = call().identity_for(&store).unwrap().unwrap().key;
    let token = FencingToken::random();
    store
        .claim(&ClaimRequest {
            key,
            fingerprint: None,
            token,
            lease: Duration::from_secs(5),
        })
        .await
        .unwrap();
    store
        .complete(
            &key,
            token,
            b"\x00not an idem record",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let got: Result<u8, Error> = call().run(&store, async { Ok(1) }).await;
    assert!(matches!(got, Err(Error::Codec(_))), "{got:?}");
}

/// A store whose every operation fails, or whose completions fail, or whose fencing is lost.
#[derive(Debug)]
struct Faulty {
    inner: MemoryStore,
    claim_fails: bool,
    complete_fails: bool,
    fenced: bool,
    completes: AtomicUsize,
}

impl Faulty {
    fn new() -> Self {
        Faulty {
            inner: MemoryStore::new(),
            claim_fails: false,
            complete_fails: false,
            fenced: false,
            completes: AtomicUsize::new(0),
        }
    }
}

fn down() -> StoreError {
    StoreError::backend("test", std::io::Error::other("connection refused"))
}

#[async_trait]
impl Store for Faulty {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        if self.claim_fails {
            return Err(down());
        }
        self.inner.claim(req).await
    }
    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.completes.fetch_add(1, Ordering::SeqCst);
        if self.complete_fails {
            return Err(down());
        }
        if self.fenced {
            return Err(StoreError::Fenced);
        }
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
        if self.fenced {
            return Err(StoreError::Fenced);
        }
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

#[tokio::test]
async fn an_unreachable_store_fails_closed_unless_fail_open() {
    let store = Faulty {
        claim_fails: true,
        ..Faulty::new()
    };
    let runs = counter();
    let r = runs.clone();
    let got: Result<u8, Error> = Call::new("tests::runtime::closed")
        .key("k")
        .run(&store, async move {
            r.fetch_add(1, Ordering::SeqCst);
            Ok(1)
        })
        .await;
    match got {
        Err(e @ Error::Store(_)) => {
            assert_eq!(e.http_status(), 503);
            assert!(std::error::Error::source(&e).is_some(), "the cause is kept");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "fail closed: the body did not run"
    );
    let r = runs.clone();
    let got: Result<u8, Error> = Call::new("tests::runtime::open")
        .key("k")
        .fail_open(true)
        .run(&store, async move {
            r.fetch_add(1, Ordering::SeqCst);
            Ok(1)
        })
        .await;
    assert_eq!(got.unwrap(), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_failed_completion_is_retried_then_the_value_is_returned() {
    let store = Faulty {
        complete_fails: true,
        ..Faulty::new()
    };
    let got: Result<String, Error> = Call::new("tests::runtime::complete_fails")
        .key("k")
        .run(&store, async { Ok("side effect happened".to_string()) })
        .await;
    assert_eq!(got.unwrap(), "side effect happened");
    assert_eq!(
        store.completes.load(Ordering::SeqCst),
        5,
        "five attempts, then the value"
    );
}

#[tokio::test]
async fn a_lost_lease_is_reported() {
    let store = Faulty {
        fenced: true,
        ..Faulty::new()
    };
    let got: Result<u8, Error> = Call::new("tests::runtime::lease_lost")
        .key("k")
        .lease(Duration::from_millis(60))
        .run(&store, async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(1)
        })
        .await;
    assert!(matches!(got, Err(Error::LeaseLost)), "{got:?}");
}

#[tokio::test]
async fn scopes_separate_records() {
    let store = MemoryStore::new();
    let ns = ns("scopes");
    for tenant in ["acme", "globex"] {
        let got: Result<String, Error> = Call::new(ns)
            .key("k")
            .scope(tenant)
            .run(&store, async move { Ok(format!("for {tenant}")) })
            .await;
        assert_eq!(got.unwrap(), format!("for {tenant}"));
    }
}

#[tokio::test]
async fn a_call_on_the_default_store_without_one_is_no_store() {
    // Only this test in this binary touches the process default store.
    let got: Result<u8, Error> = Call::new("tests::runtime::default")
        .key("k")
        .run_on_default(async { Ok(1) })
        .await;
    let e = got.unwrap_err();
    assert!(matches!(e, Error::NoStore));
    let msg = e.to_string();
    assert!(
        msg.contains("store = ") && msg.contains("set_default_store"),
        "{msg}"
    );
    idem_core::set_default_store(Arc::new(MemoryStore::new())).unwrap();
    let got: Result<u8, Error> = Call::new("tests::runtime::default")
        .key("k")
        .run_on_default(async { Ok(1) })
        .await;
    assert_eq!(got.unwrap(), 1);
}

/// A caller that waited for a holder keeps its `wait_timeout` through a store that fails now
/// and then (connections cut and re-opened): its claims are retried while its wait lasts,
/// and it gets the holder's value. A caller that has not waited still fails fast, after
/// three attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_rides_out_transient_claim_failures_within_its_wait() {
    use idem_testkit::{Fault, FaultyStore, Op};
    let store = Arc::new(FaultyStore::new(Arc::new(MemoryStore::new())));
    let ns = ns("waiter_transient");
    let runs = counter();
    let call = |key: &'static str, runs: Arc<AtomicUsize>, value: u32| {
        let store = store.clone();
        async move {
            Call::new(ns)
                .key(key)
                .lease(Duration::from_secs(2))
                .wait_timeout(Duration::from_secs(10))
                .run(&*store, async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, Error>(value)
                })
                .await
        }
    };
    let holder = tokio::spawn(call("k", runs.clone(), 1));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let waiter = tokio::spawn(call("k", runs.clone(), 2));
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The waiter is waiting: its next claims fail, more times than a fresh caller tries.
    for _ in 0..6 {
        store.plan(Fault::FailBefore(Op::Claim));
    }
    assert_eq!(holder.await.unwrap().unwrap(), 1);
    assert_eq!(
        waiter.await.unwrap().unwrap(),
        1,
        "the waiter gets the holder's value"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // A fresh caller: three attempts, then the store's error; its body does not run.
    for _ in 0..3 {
        store.plan(Fault::FailBefore(Op::Claim));
    }
    let fresh = call("fresh", runs.clone(), 3).await;
    assert!(matches!(fresh, Err(Error::Store(_))), "{fresh:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
