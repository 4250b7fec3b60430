//! # idem-testkit — the store conformance suite of idem
//!
//! Every backend — ours and third parties' — proves itself by passing these cases. Each case is
//! a `pub async fn case(store: Arc<dyn Store>)` that panics on a violation; the
//! [`conformance_tests!`](crate::conformance_tests) macro stamps one test per case, run by
//! [`harness`], which reports a case whose server is missing as ignored with the reason:
//!
//! ```no_run
//! // tests/conformance.rs of a backend crate, with `harness = false` in its `[[test]]` entry
//! // (needs tokio with rt-multi-thread + macros)
//! use std::sync::Arc;
//!
//! mod memory {
//!     use std::sync::Arc;
//!     idem_testkit::conformance_tests!(async {
//!         // For a remote store: `let url = idem_testkit::env_url("MY_STORE_URL")?;`
//!         Some(Arc::new(idem_stores::MemoryStore::new()) as Arc<dyn idem_core::Store>)
//!     });
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     // A remote store passes its `Need` (a probe of its server): `memory::cases(&[MY_STORE])`.
//!     idem_testkit::harness::run([memory::cases(&[])])
//! }
//! ```
//!
//! Stores that keep durable steps also pass the step cases of [`steps`], stamped by
//! [`step_conformance_tests!`](crate::step_conformance_tests) in a module of their own.
//!
//! Cases use fresh random keys, so they can run in parallel against a shared server, and short
//! real durations (leases of a few hundred milliseconds), so the whole suite takes seconds.

// Test code: a violated expectation is a panic, by design.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::{
    Call, Claim, ClaimRequest, Error, FencingToken, Fingerprint, Key, RecordState, Store,
    StoreError,
};

#[doc(hidden)]
pub use idem_core as __core;

mod faulty;
pub mod harness;
pub mod model;
pub mod steps;
pub mod steps_crash;
pub mod transactional;
pub use faulty::{Fault, FaultyStore, Op};

/// Stamps one test per conformance case, for [`harness::run`]: an `async fn` per case and a
/// `pub fn cases(needs: &[harness::Need]) -> Vec<harness::Case>` in the calling module. The
/// argument is an expression (usually an `async` block) evaluating to a future of
/// `Option<Arc<dyn Store>>`; `None` fails the case (a missing server is a [`harness::Need`] of
/// the cases, checked before they run).
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@cases $make;
            claim_race, distinct_keys, fencing, lease_takeover, renew_extends_lease, ttl_expiry,
            release_frees_at_once, release_never_frees_completed, wait_wakes_on_complete,
            wait_wakes_on_release, wait_returns_when_not_in_progress, wait_is_bounded,
            values_up_to_the_limit, fingerprints_round_trip, get_and_remove, release_detached,
            hostile_keys, runtime_exactly_once, claim_retry_is_ours, complete_retry_is_ours,
            release_is_idempotent, completed_reports_expiry, claim_reply_lost,
            complete_reply_lost, complete_reply_lost_after_expiry, release_reply_lost,
            renewal_failures_keep_the_lease,
            cancelled_during_completion, cancelled_during_claim, invalid_durations);
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            async fn $case() {
                let store: ::std::option::Option<::std::sync::Arc<dyn $crate::__core::Store>> = $make.await;
                let ::std::option::Option::Some(store) = store else {
                    ::std::panic!("the conformance store factory returned None");
                };
                $crate::$case(store).await;
            }
        )*

        /// One test per conformance case, each with `needs`.
        pub fn cases(
            needs: &[$crate::harness::Need],
        ) -> ::std::vec::Vec<$crate::harness::Case> {
            $crate::test_cases!(needs, multi_thread(4); $($case),*)
        }
    };
}

/// The test server URL in `var` or, when `var` is unset, the local address `.ci/run` starts for
/// it (see [`harness::DEFAULT_URLS`]); the test runner checks that it answers before the test
/// runs. `None` only for a variable that is unset and has no default: outside CI, with one
/// `skipped:` line; with `CI` set, this panics (backend tests must not skip in CI).
pub fn env_url(var: &str) -> Option<String> {
    match harness::url_of(var) {
        Some(url) => Some(url),
        None if harness::in_ci() => {
            panic!("{var} is not set, and CI is: backend tests must not skip in CI")
        }
        None => {
            println!("skipped: {var} is not set");
            None
        }
    }
}

/// A fresh random key, unique to this run.
pub fn fresh_key() -> Key {
    let t = FencingToken::random();
    Key(*blake3::hash(&t.0.to_le_bytes()).as_bytes())
}

/// A claim request for `key` under a fresh token (no fingerprint), and that token.
pub fn claim_request(key: Key, lease: Duration) -> (ClaimRequest, FencingToken) {
    let token = FencingToken::random();
    (
        ClaimRequest {
            key,
            fingerprint: None,
            token,
            lease,
        },
        token,
    )
}

async fn acquire(store: &dyn Store, key: Key, lease: Duration) -> FencingToken {
    let (r, token) = claim_request(key, lease);
    let claim = store.claim(&r).await.expect("claim");
    assert_eq!(
        claim,
        Claim::Acquired { taken_over: false },
        "a fresh key must be acquired"
    );
    token
}

/// Claims the fresh `key` and completes it with the value `b"v"` and `ttl`.
pub async fn completed(store: &dyn Store, key: Key, ttl: Duration) {
    let token = acquire(store, key, Duration::from_secs(30)).await;
    store
        .complete(&key, token, b"v", ttl)
        .await
        .expect("complete");
}

const LONG: Duration = Duration::from_secs(30);
const SHORT: Duration = Duration::from_millis(400);
const PAST_SHORT: Duration = Duration::from_millis(700);

/// 64 concurrent claims of one fresh key: exactly one acquires, the others see it in progress.
pub async fn claim_race(store: Arc<dyn Store>) {
    for _round in 0..3 {
        let key = fresh_key();
        let barrier = Arc::new(tokio::sync::Barrier::new(64));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let store = store.clone();
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    let (r, _) = claim_request(key, LONG);
                    barrier.wait().await;
                    store.claim(&r).await.expect("claim")
                })
            })
            .collect();
        let mut acquired = 0;
        for t in tasks {
            match t.await.expect("task") {
                Claim::Acquired { taken_over } => {
                    assert!(!taken_over);
                    acquired += 1;
                }
                Claim::InProgress { .. } => {}
                other => panic!("unexpected claim result {other:?}"),
            }
        }
        assert_eq!(acquired, 1, "exactly one of 64 concurrent claims acquires");
    }
}

/// Claims of different keys do not interfere.
pub async fn distinct_keys(store: Arc<dyn Store>) {
    let keys: Vec<Key> = (0..32).map(|_| fresh_key()).collect();
    let tasks: Vec<_> = keys
        .iter()
        .map(|k| {
            let store = store.clone();
            let k = *k;
            tokio::spawn(
                async move { store.claim(&claim_request(k, LONG).0).await.expect("claim") },
            )
        })
        .collect();
    for t in tasks {
        assert_eq!(
            t.await.expect("task"),
            Claim::Acquired { taken_over: false }
        );
    }
}

/// A stale or foreign token can neither complete, release nor renew.
pub async fn fencing(store: Arc<dyn Store>) {
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    let stale = FencingToken::random();
    assert!(matches!(
        store.complete(&key, stale, b"x", LONG).await,
        Err(StoreError::Fenced)
    ));
    // A foreign release answers Ok (a release is safe to repeat) and changes nothing.
    store.release(&key, stale).await.expect("foreign release");
    assert!(matches!(
        store.get(&key).await.expect("get"),
        Some(RecordState::InProgress { token: t, .. }) if t == token
    ));
    assert!(matches!(
        store.renew(&key, stale, LONG).await,
        Err(StoreError::Fenced)
    ));
    // The real holder is unaffected.
    store.renew(&key, token, LONG).await.expect("renew");
    store
        .complete(&key, token, b"done", LONG)
        .await
        .expect("complete");
    // Once completed, the holder's token no longer renews; a repeated completion answers Ok
    // (its first attempt applied) without changing the value; a release changes nothing.
    assert!(matches!(
        store.renew(&key, token, LONG).await,
        Err(StoreError::Fenced)
    ));
    store
        .complete(&key, token, b"again", LONG)
        .await
        .expect("a repeated completion under the same token is Ok");
    store
        .release(&key, token)
        .await
        .expect("release of a completed record");
    match store.get(&key).await.expect("get") {
        Some(RecordState::Completed(rec)) => assert_eq!(&rec.value[..], b"done"),
        other => panic!("the completed value must stay, got {other:?}"),
    }
    // Another token cannot complete a completed record.
    assert!(matches!(
        store.complete(&key, stale, b"x", LONG).await,
        Err(StoreError::Fenced)
    ));
    // Fenced ops on an absent key are refused too.
    let absent = fresh_key();
    assert!(matches!(
        store.complete(&absent, token, b"x", LONG).await,
        Err(StoreError::Fenced)
    ));
}

/// A claim whose lease passes is taken over with a new token; the old token is fenced off.
pub async fn lease_takeover(store: Arc<dyn Store>) {
    let key = fresh_key();
    let old = acquire(&*store, key, SHORT).await;
    match store
        .claim(&claim_request(key, LONG).0)
        .await
        .expect("claim")
    {
        Claim::InProgress {
            lease_remaining, ..
        } => {
            if let Some(r) = lease_remaining {
                assert!(r <= SHORT, "lease_remaining {r:?} exceeds the lease");
            }
        }
        other => panic!("live lease must conflict, got {other:?}"),
    }
    tokio::time::sleep(PAST_SHORT).await;
    let (r, new) = claim_request(key, LONG);
    assert_eq!(
        store.claim(&r).await.expect("claim"),
        Claim::Acquired { taken_over: true },
        "an expired lease is taken over"
    );
    assert!(matches!(
        store.complete(&key, old, b"old", LONG).await,
        Err(StoreError::Fenced)
    ));
    store
        .release(&key, old)
        .await
        .expect("a stale release is Ok");
    assert!(
        matches!(
            store.get(&key).await.expect("get"),
            Some(RecordState::InProgress { token: t, .. }) if t == new
        ),
        "a stale release must not free the new holder's claim"
    );
    store
        .complete(&key, new, b"new", LONG)
        .await
        .expect("complete");
    match store
        .claim(&claim_request(key, LONG).0)
        .await
        .expect("claim")
    {
        Claim::Completed(rec) => assert_eq!(&rec.value[..], b"new"),
        other => panic!("expected the new holder's record, got {other:?}"),
    }
}

/// Renewing keeps a claim alive past its original lease.
pub async fn renew_extends_lease(store: Arc<dyn Store>) {
    let key = fresh_key();
    let token = acquire(&*store, key, SHORT).await;
    let until = Instant::now() + SHORT * 3;
    while Instant::now() < until {
        tokio::time::sleep(SHORT / 4).await;
        store.renew(&key, token, SHORT).await.expect("renew");
    }
    assert!(matches!(
        store
            .claim(&claim_request(key, LONG).0)
            .await
            .expect("claim"),
        Claim::InProgress { .. }
    ));
    store
        .complete(&key, token, b"ok", LONG)
        .await
        .expect("complete after renewals");
}

/// A completed record replays until its ttl passes, then the key is claimable again.
pub async fn ttl_expiry(store: Arc<dyn Store>) {
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    store
        .complete(&key, token, b"v", SHORT)
        .await
        .expect("complete");
    assert!(matches!(
        store
            .claim(&claim_request(key, LONG).0)
            .await
            .expect("claim"),
        Claim::Completed(_)
    ));
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(
        store.get(&key).await.expect("get"),
        None,
        "expired record reads as absent"
    );
    assert_eq!(
        store
            .claim(&claim_request(key, LONG).0)
            .await
            .expect("claim"),
        Claim::Acquired { taken_over: false },
        "an expired completed record is not a takeover"
    );
}

/// Release frees the key at once, without waiting for the lease.
pub async fn release_frees_at_once(store: Arc<dyn Store>) {
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    store.release(&key, token).await.expect("release");
    assert_eq!(store.get(&key).await.expect("get"), None);
    let (r, _) = claim_request(key, LONG);
    assert_eq!(
        store.claim(&r).await.expect("claim"),
        Claim::Acquired { taken_over: false }
    );
}

/// Release never removes someone else's claim or a completed record.
pub async fn release_never_frees_completed(store: Arc<dyn Store>) {
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    store
        .complete(&key, token, b"v", LONG)
        .await
        .expect("complete");
    let _ = store.release(&key, token).await;
    assert!(matches!(
        store.get(&key).await.expect("get"),
        Some(RecordState::Completed(_))
    ));
}

async fn waiter(
    store: Arc<dyn Store>,
    key: Key,
    timeout: Duration,
) -> tokio::task::JoinHandle<Duration> {
    let started = Arc::new(tokio::sync::Notify::new());
    let s2 = started.clone();
    let handle = tokio::spawn(async move {
        let t = Instant::now();
        s2.notify_one();
        store.wait(&key, timeout).await.expect("wait");
        t.elapsed()
    });
    started.notified().await;
    // Give the waiter time to subscribe before the state changes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    handle
}

/// A waiter is woken by a completion long before its timeout.
pub async fn wait_wakes_on_complete(store: Arc<dyn Store>) {
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    let w = waiter(store.clone(), key, Duration::from_secs(20)).await;
    store
        .complete(&key, token, b"v", LONG)
        .await
        .expect("complete");
    let waited = tokio::time::timeout(Duration::from_secs(10), w)
        .await
        .expect("waiter not woken by completion")
        .expect("task");
    assert!(waited < Duration::from_secs(10));
}

/// A waiter is woken by a release.
pub async fn wait_wakes_on_release(store: Arc<dyn Store>) {
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    let w = waiter(store.clone(), key, Duration::from_secs(20)).await;
    store.release(&key, token).await.expect("release");
    tokio::time::timeout(Duration::from_secs(10), w)
        .await
        .expect("waiter not woken by release")
        .expect("task");
}

/// Waiting on a key that is absent or completed returns at once.
pub async fn wait_returns_when_not_in_progress(store: Arc<dyn Store>) {
    let key = fresh_key();
    tokio::time::timeout(
        Duration::from_secs(5),
        store.wait(&key, Duration::from_secs(30)),
    )
    .await
    .expect("wait on an absent key must return at once")
    .expect("wait");
    let token = acquire(&*store, key, LONG).await;
    store
        .complete(&key, token, b"v", LONG)
        .await
        .expect("complete");
    tokio::time::timeout(
        Duration::from_secs(5),
        store.wait(&key, Duration::from_secs(30)),
    )
    .await
    .expect("wait on a completed key must return at once")
    .expect("wait");
}

/// Waiting on a claim that nobody completes ends at the timeout (not earlier than asked by
/// much, never never).
pub async fn wait_is_bounded(store: Arc<dyn Store>) {
    let key = fresh_key();
    let _token = acquire(&*store, key, LONG).await;
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), store.wait(&key, SHORT))
        .await
        .expect("wait must respect its timeout")
        .expect("wait");
    assert!(t.elapsed() < Duration::from_secs(10));
    // Still in progress: the wait did not disturb the claim.
    assert!(matches!(
        store.get(&key).await.expect("get"),
        Some(RecordState::InProgress { .. })
    ));
}

/// Values from 0 bytes to the store's limit round-trip byte for byte; one byte more is refused.
pub async fn values_up_to_the_limit(store: Arc<dyn Store>) {
    let limit = store.max_value_size();
    for size in [0, 1, 255, 4096, limit] {
        let key = fresh_key();
        let token = acquire(&*store, key, LONG).await;
        let value: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        store
            .complete(&key, token, &value, LONG)
            .await
            .expect("complete");
        match store
            .claim(&claim_request(key, LONG).0)
            .await
            .expect("claim")
        {
            Claim::Completed(rec) => {
                assert!(rec.value[..] == value[..], "value of {size} bytes changed")
            }
            other => panic!("expected completed, got {other:?}"),
        }
    }
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    let too_big = vec![7u8; limit + 1];
    assert!(matches!(
        store.complete(&key, token, &too_big, LONG).await,
        Err(StoreError::TooLarge { .. })
    ));
}

/// The claim's fingerprint is reported to conflicting claims and kept through completion.
pub async fn fingerprints_round_trip(store: Arc<dyn Store>) {
    let key = fresh_key();
    let fp = Fingerprint([0x5a; 32]);
    let (mut r, token) = claim_request(key, LONG);
    r.fingerprint = Some(fp);
    assert_eq!(
        store.claim(&r).await.expect("claim"),
        Claim::Acquired { taken_over: false }
    );
    match store
        .claim(&claim_request(key, LONG).0)
        .await
        .expect("claim")
    {
        Claim::InProgress { fingerprint, .. } => assert_eq!(fingerprint, Some(fp)),
        other => panic!("{other:?}"),
    }
    store
        .complete(&key, token, b"v", LONG)
        .await
        .expect("complete");
    match store
        .claim(&claim_request(key, LONG).0)
        .await
        .expect("claim")
    {
        Claim::Completed(rec) => assert_eq!(rec.fingerprint, Some(fp)),
        other => panic!("{other:?}"),
    }
    // No fingerprint stays no fingerprint.
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    store
        .complete(&key, token, b"v", LONG)
        .await
        .expect("complete");
    match store
        .claim(&claim_request(key, LONG).0)
        .await
        .expect("claim")
    {
        Claim::Completed(rec) => assert_eq!(rec.fingerprint, None),
        other => panic!("{other:?}"),
    }
}

/// `get` reports each state; `remove` deletes whatever is there.
pub async fn get_and_remove(store: Arc<dyn Store>) {
    let key = fresh_key();
    assert_eq!(store.get(&key).await.expect("get"), None);
    let token = acquire(&*store, key, LONG).await;
    match store.get(&key).await.expect("get") {
        Some(RecordState::InProgress { token: t, .. }) => assert_eq!(t, token),
        other => panic!("{other:?}"),
    }
    store.remove(&key).await.expect("remove");
    assert_eq!(store.get(&key).await.expect("get"), None);
    let token = acquire(&*store, key, LONG).await;
    store
        .complete(&key, token, b"v", LONG)
        .await
        .expect("complete");
    match store.get(&key).await.expect("get") {
        Some(RecordState::Completed(rec)) => assert_eq!(&rec.value[..], b"v"),
        other => panic!("{other:?}"),
    }
    store.remove(&key).await.expect("remove");
    assert_eq!(store.get(&key).await.expect("get"), None);
    store
        .remove(&key)
        .await
        .expect("removing an absent key is fine");
}

/// `release_detached` frees the claim soon, from a synchronous context.
pub async fn release_detached(store: Arc<dyn Store>) {
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    store.release_detached(key, token);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if store.get(&key).await.expect("get").is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "release_detached did not release"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Keys and scopes of any content — empty, 1 MiB, NUL bytes, invalid UTF-8, quote and
/// Lua/SQL metacharacters — each get their own record, through the runtime.
pub async fn hostile_keys(store: Arc<dyn Store>) {
    let ns: &'static str = Box::leak(format!("testkit::hostile::{}", fresh_key()).into_boxed_str());
    let mut keys: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0, 0, 0],
        b"'; DROP TABLE idem; --".to_vec(),
        b"\" OR 1=1 --".to_vec(),
        b"]] redis.call('FLUSHALL') --[[".to_vec(),
        b"{hash}tag}".to_vec(),
        b"*?[]\\\n\r\t%_".to_vec(),
        vec![0xff, 0xfe, 0x80],
        vec![b'x'; 1 << 20],
    ];
    keys.push("ключ🔑".as_bytes().to_vec());
    let scopes: [Option<&[u8]>; 3] = [None, Some(&[0xc3, 0x28]), Some(b"tenant'\"\0")];
    for (i, key) in keys.iter().enumerate() {
        for (j, scope) in scopes.iter().enumerate() {
            let mut call = Call::new(ns).key(ByteStr(key));
            if let Some(s) = scope {
                call = call.scope(ByteStr(s));
            }
            let want = format!("{i}/{j}");
            let w = want.clone();
            let got: Result<String, Error> = call.run(&*store, async move { Ok(w) }).await;
            assert_eq!(got.expect("hostile key call"), want);
        }
    }
    // Each replays its own value.
    for (i, key) in keys.iter().enumerate() {
        for (j, scope) in scopes.iter().enumerate() {
            let mut call = Call::new(ns).key(ByteStr(key));
            if let Some(s) = scope {
                call = call.scope(ByteStr(s));
            }
            let got: Result<String, Error> = call
                .run(&*store, async { Ok("ran again".to_string()) })
                .await;
            assert_eq!(got.expect("replay"), format!("{i}/{j}"));
        }
    }
}

/// Raw bytes, serialized as a serde byte string (so invalid UTF-8 is fine).
struct ByteStr<'a>(&'a [u8]);

impl serde::Serialize for ByteStr<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// 64 concurrent runtime calls with one key on this store run the body once and all return
/// the same value.
pub async fn runtime_exactly_once(store: Arc<dyn Store>) {
    let ns: &'static str = Box::leak(format!("testkit::once::{}", fresh_key()).into_boxed_str());
    let runs = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let store = store.clone();
            let runs = runs.clone();
            tokio::spawn(async move {
                Call::new(ns)
                    .key("the-key")
                    .lease(Duration::from_secs(5))
                    .run(&*store, async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, Error>(format!("first result from task {i}"))
                    })
                    .await
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("task").expect("call"));
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the body ran more than once"
    );
    assert!(
        results.iter().all(|r| r == &results[0]),
        "callers got different results"
    );
}

/// A claim sent again with the same token (its first reply was lost) is `Acquired`; another
/// token still conflicts.
pub async fn claim_retry_is_ours(store: Arc<dyn Store>) {
    let key = fresh_key();
    let (r, token) = claim_request(key, LONG);
    assert_eq!(
        store.claim(&r).await.expect("claim"),
        Claim::Acquired { taken_over: false }
    );
    assert_eq!(
        store.claim(&r).await.expect("claim again"),
        Claim::Acquired { taken_over: false },
        "a claim found in progress under its own token is acquired"
    );
    assert!(matches!(
        store
            .claim(&claim_request(key, LONG).0)
            .await
            .expect("claim"),
        Claim::InProgress { .. }
    ));
    store
        .complete(&key, token, b"v", LONG)
        .await
        .expect("the retried claim's token completes");
}

/// A completion sent again under the same token (its first reply was lost) is `Ok`.
pub async fn complete_retry_is_ours(store: Arc<dyn Store>) {
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    store
        .complete(&key, token, b"v", LONG)
        .await
        .expect("complete");
    store
        .complete(&key, token, b"v", LONG)
        .await
        .expect("a completion found completed under its own token succeeded");
    match store.get(&key).await.expect("get") {
        Some(RecordState::Completed(rec)) => assert_eq!(&rec.value[..], b"v"),
        other => panic!("{other:?}"),
    }
}

/// Releasing twice, or releasing an absent key, is `Ok`.
pub async fn release_is_idempotent(store: Arc<dyn Store>) {
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    store.release(&key, token).await.expect("release");
    store.release(&key, token).await.expect("release again");
    store
        .release(&fresh_key(), token)
        .await
        .expect("release of an absent key");
    assert_eq!(store.get(&key).await.expect("get"), None);
}

/// A completed record reports its remaining TTL, on `claim` and on `get`.
pub async fn completed_reports_expiry(store: Arc<dyn Store>) {
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    let ttl = Duration::from_secs(20);
    store
        .complete(&key, token, b"v", ttl)
        .await
        .expect("complete");
    let check = |e: Option<Duration>| {
        let e = e.expect("a completed record reports its remaining TTL");
        assert!(
            e <= ttl && e > Duration::from_secs(10),
            "remaining TTL {e:?} out of range for a {ttl:?} ttl"
        );
    };
    match store
        .claim(&claim_request(key, LONG).0)
        .await
        .expect("claim")
    {
        Claim::Completed(rec) => check(rec.expires_in),
        other => panic!("{other:?}"),
    }
    match store.get(&key).await.expect("get") {
        Some(RecordState::Completed(rec)) => check(rec.expires_in),
        other => panic!("{other:?}"),
    }
    // The synchronous looks (a store that holds records in this process answers them; others
    // answer nothing) agree with each other and with the claim: the same value, fingerprint
    // and a TTL in range, whether the record is copied or lent.
    let owned = store.completed_now(&key);
    let mut lent = None;
    let visited = store.visit_completed_now(&key, &mut |r| {
        lent = Some((r.fingerprint, r.value.to_vec(), r.expires_in));
    });
    assert_eq!(visited, lent.is_some());
    assert_eq!(
        owned.is_some(),
        visited,
        "completed_now and visit_completed_now disagree"
    );
    if let (Some(owned), Some((fingerprint, value, expires_in))) = (owned, lent) {
        assert_eq!(&owned.value[..], b"v");
        assert_eq!(value, b"v");
        assert_eq!(fingerprint, owned.fingerprint);
        check(owned.expires_in);
        check(expires_in);
    }
    // A key never written is answered by neither.
    let none = fresh_key();
    assert!(store.completed_now(&none).is_none());
    assert!(!store.visit_completed_now(&none, &mut |_| {
        panic!("a record that does not exist was lent")
    }));
}

fn namespace(what: &str) -> &'static str {
    Box::leak(format!("testkit::{what}::{}", fresh_key()).into_boxed_str())
}

/// Runs `Call::new(ns).key("k")` with a body counting its runs and answering `value`.
async fn counted_call(
    store: &dyn Store,
    ns: &'static str,
    lease: Duration,
    runs: &Arc<AtomicUsize>,
    value: u32,
    body_time: Duration,
) -> Result<u32, Error> {
    let runs = runs.clone();
    Call::new(ns)
        .key("k")
        .lease(lease)
        .run(store, async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(body_time).await;
            Ok::<_, Error>(value)
        })
        .await
}

/// The claim applies and its reply is lost: the runtime's retry recognises its own token, the
/// body runs once, and the key is not blocked.
pub async fn claim_reply_lost(store: Arc<dyn Store>) {
    let faulty = FaultyStore::new(store);
    let ns = namespace("claim_reply_lost");
    let runs = Arc::new(AtomicUsize::new(0));
    faulty.plan(Fault::LoseReply(Op::Claim));
    let v = counted_call(&faulty, ns, LONG, &runs, 1, Duration::ZERO).await;
    assert_eq!(v.expect("a lost claim reply is retried"), 1);
    assert_eq!(faulty.pending(), 0);
    let v = counted_call(&faulty, ns, LONG, &runs, 2, Duration::ZERO).await;
    assert_eq!(v.expect("replay"), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// The completion applies and its reply is lost: the caller still gets its value (not
/// `LeaseLost`), and a repeat replays it.
pub async fn complete_reply_lost(store: Arc<dyn Store>) {
    let faulty = FaultyStore::new(store);
    let ns = namespace("complete_reply_lost");
    let runs = Arc::new(AtomicUsize::new(0));
    faulty.plan(Fault::LoseReply(Op::Complete));
    let v = counted_call(&faulty, ns, LONG, &runs, 1, Duration::ZERO).await;
    assert_eq!(v.expect("the stored completion is recognised"), 1);
    let v = counted_call(&faulty, ns, LONG, &runs, 2, Duration::ZERO).await;
    assert_eq!(v.expect("replay"), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// The completion applies with a ttl shorter than the pause before the runtime's retry, and
/// its reply is lost: when the retry arrives, the record has expired. The caller still gets
/// its value (the store recognises its own completion instead of answering `LeaseLost`), the
/// body ran once, and once the ttl has passed the key runs again.
pub async fn complete_reply_lost_after_expiry(store: Arc<dyn Store>) {
    let faulty = FaultyStore::new(store);
    let ns = namespace("complete_reply_lost_after_expiry");
    let runs = Arc::new(AtomicUsize::new(0));
    let ttl = Duration::from_millis(20);
    faulty.plan(Fault::LoseReply(Op::Complete));
    // The retry reaches the store well after the record's expiry.
    faulty.plan(Fault::Delay(Op::Complete, Duration::from_millis(150)));
    let call = |value: u32| {
        let runs = runs.clone();
        Call::new(ns)
            .key("k")
            .lease(LONG)
            .ttl(ttl)
            .run(&faulty, async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(value)
            })
    };
    let v = call(1).await;
    assert_eq!(
        v.expect("a stored completion that expired before the retry is the caller's value"),
        1
    );
    assert_eq!(faulty.pending(), 0, "both planned faults struck");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let v = call(2).await;
    assert_eq!(v.expect("the expired key runs again"), 2);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// The release after an `Err` applies and its reply is lost: the next call runs at once.
pub async fn release_reply_lost(store: Arc<dyn Store>) {
    let faulty = FaultyStore::new(store);
    let ns = namespace("release_reply_lost");
    faulty.plan(Fault::LoseReply(Op::Release));
    let r: Result<u32, Error> = Call::new(ns)
        .key("k")
        .lease(LONG)
        .run(&faulty, async { Err(Error::MissingKey) })
        .await;
    assert!(r.is_err());
    let t = Instant::now();
    let v: Result<u32, Error> = Call::new(ns)
        .key("k")
        .lease(LONG)
        .on_conflict(idem_core::OnConflict::Reject)
        .run(&faulty, async { Ok(5) })
        .await;
    assert_eq!(v.expect("the key was released"), 5);
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// Renewals that fail are retried at once: a body that runs for three leases, through two
/// failed renewals, is never taken over, and its result is stored.
pub async fn renewal_failures_keep_the_lease(store: Arc<dyn Store>) {
    let faulty = FaultyStore::new(store.clone());
    let ns = namespace("renewal_failures");
    let lease = Duration::from_millis(600);
    let runs = Arc::new(AtomicUsize::new(0));
    faulty.plan(Fault::FailBefore(Op::Renew));
    faulty.plan(Fault::FailBefore(Op::Renew));
    let holder = {
        let faulty = faulty.clone();
        let runs = runs.clone();
        tokio::spawn(async move { counted_call(&faulty, ns, lease, &runs, 1, lease * 3).await })
    };
    // Once the holder's body runs, duplicates that reject keep probing: none may get in while
    // the holder lives.
    while runs.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let until = Instant::now() + lease * 3;
    while Instant::now() < until {
        let r: Result<u32, Error> = Call::new(ns)
            .key("k")
            .lease(lease)
            .on_conflict(idem_core::OnConflict::Reject)
            .run(&*store, async { Ok(2) })
            .await;
        match r {
            Err(Error::InProgress { .. }) => {}
            Ok(1) => break, // the holder finished early
            other => panic!("a duplicate got in while the holder lived: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(holder.await.expect("task").expect("holder"), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(faulty.pending(), 0, "the planned renewal failures happened");
}

/// The caller's future is dropped while the completion write is in flight: the completion
/// finishes in a detached task, and a repeat replays the value instead of running again.
pub async fn cancelled_during_completion(store: Arc<dyn Store>) {
    let faulty = FaultyStore::new(store);
    let ns = namespace("cancelled_during_completion");
    let runs = Arc::new(AtomicUsize::new(0));
    faulty.plan(Fault::Delay(Op::Complete, Duration::from_millis(300)));
    let call = counted_call(&faulty, ns, LONG, &runs, 1, Duration::from_millis(50));
    assert!(
        tokio::time::timeout(Duration::from_millis(150), call)
            .await
            .is_err(),
        "the caller is dropped during the completion"
    );
    let v = counted_call(&faulty, ns, LONG, &runs, 2, Duration::ZERO).await;
    assert_eq!(v.expect("waits for and replays the detached completion"), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the body ran twice");
}

/// The caller's future is dropped while its claim is in flight: the claim that applied is
/// released, so the key is not blocked for the lease.
pub async fn cancelled_during_claim(store: Arc<dyn Store>) {
    let faulty = FaultyStore::new(store);
    let ns = namespace("cancelled_during_claim");
    let runs = Arc::new(AtomicUsize::new(0));
    faulty.plan(Fault::Delay(Op::Claim, Duration::from_millis(10)));
    // Dropped after the delay, while the claim itself runs or right after it applied.
    let call = counted_call(&faulty, ns, LONG, &runs, 1, Duration::from_secs(60));
    let _ = tokio::time::timeout(Duration::from_millis(12), call).await;
    let t = Instant::now();
    loop {
        let r = Call::new(ns)
            .key("k")
            .lease(LONG)
            .on_conflict(idem_core::OnConflict::Reject)
            .run(&faulty, async { Ok::<_, Error>(2u32) })
            .await;
        match r {
            Ok(v) => {
                assert_eq!(v, 2);
                break;
            }
            Err(Error::InProgress { .. }) if t.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("key blocked after a cancelled claim: {other:?}"),
        }
    }
}

/// Zero and overflowing durations are `Error::InvalidOption`, and nothing runs.
pub async fn invalid_durations(store: Arc<dyn Store>) {
    let ns = namespace("invalid_durations");
    for (lease, ttl, wait) in [
        (Duration::ZERO, LONG, LONG),
        (Duration::MAX, LONG, LONG),
        (LONG, Duration::ZERO, LONG),
        (LONG, Duration::MAX, LONG),
        (LONG, LONG, Duration::ZERO),
    ] {
        let ran = Arc::new(AtomicUsize::new(0));
        let r2 = ran.clone();
        let r: Result<u32, Error> = Call::new(ns)
            .key("k")
            .lease(lease)
            .ttl(ttl)
            .wait_timeout(wait)
            .run(&*store, async move {
                r2.fetch_add(1, Ordering::SeqCst);
                Ok(1)
            })
            .await;
        assert!(matches!(r, Err(Error::InvalidOption { .. })), "{r:?}");
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }
}

/// A store that wraps another (a local cache, a fault injector, a metrics layer) gives every
/// call the identity the inner store gives it: it forwards [`Store::process_local`], so the
/// same call run through the wrapper and directly on the inner store derives one key, and the
/// body runs once. Not part of [`conformance_tests!`](crate::conformance_tests), which sees one
/// store: a wrapper's tests call it with the wrapper and the store it wraps.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::sync::Arc;
/// use idem_stores::{MemoryStore, TieredStore};
/// let inner = Arc::new(MemoryStore::new());
/// let wrapper = Arc::new(TieredStore::new(inner.clone()));
/// idem_testkit::wrapper_keeps_identity(wrapper, inner).await;
/// # }
/// ```
pub async fn wrapper_keeps_identity(wrapper: Arc<dyn Store>, inner: Arc<dyn Store>) {
    assert_eq!(
        wrapper.process_local(),
        inner.process_local(),
        "the wrapper does not forward process_local: a call gets another key through it"
    );
    let ns = namespace("wrapper_keeps_identity");
    let call = || Call::new(ns).key("k").fingerprint((7u32,));
    assert_eq!(
        call().identity_for(&*wrapper).expect("identity"),
        call().identity_for(&*inner).expect("identity"),
        "the wrapper derives another key than the store it wraps"
    );
    let runs = Arc::new(AtomicUsize::new(0));
    let first = counted_call(&*wrapper, ns, LONG, &runs, 1, Duration::ZERO).await;
    assert_eq!(first.expect("through the wrapper"), 1);
    let direct = counted_call(&*inner, ns, LONG, &runs, 2, Duration::ZERO).await;
    assert_eq!(
        direct.expect("directly on the inner store"),
        1,
        "the inner store does not replay the wrapper's record"
    );
    let again = counted_call(&*wrapper, ns, LONG, &runs, 3, Duration::ZERO).await;
    assert_eq!(again.expect("through the wrapper again"), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the body ran twice");
}
