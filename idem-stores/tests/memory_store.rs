//! `MemoryStore`'s own promises: claims are never evicted (a flood of unique keys cannot make
//! a body run twice), the claim cap is an error rather than an eviction, replays share the
//! stored bytes, and TTLs and leases follow tokio's (pausable) clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_core::{Call, Claim, Error, OnConflict, Store, StoreError};
use idem_stores::MemoryStore;
use idem_testkit::{claim_request, fresh_key};
use tokio::sync::Semaphore;

/// A value the size of a stored HTTP response.
fn response(n: usize) -> String {
    let mut body = format!("{n:08}");
    body.push_str(&"x".repeat(5 * 1024 - 8));
    body
}

/// 100 calls hold their claims while 10,000 unique keys with 5 KiB results flood a 2 MiB
/// store (about 25 times its bound). Every duplicate of a held key, during and after the
/// flood, is rejected or replays; no body runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unique_keys_never_evicts_a_claim() {
    let store = Arc::new(MemoryStore::builder().max_bytes(2 << 20).build());
    let gate = Arc::new(Semaphore::new(0));
    let runs: Arc<Vec<AtomicUsize>> = Arc::new((0..100).map(|_| AtomicUsize::new(0)).collect());
    let held = Arc::new(AtomicUsize::new(0));
    let call = |store: Arc<MemoryStore>,
                i: usize,
                gate: Arc<Semaphore>,
                runs: Arc<Vec<AtomicUsize>>,
                held: Arc<AtomicUsize>,
                mode: OnConflict| async move {
        Call::new("tests::memory::flood::held")
            .key(i)
            .on_conflict(mode)
            .lease(Duration::from_secs(60))
            .run(&*store, async move {
                runs[i].fetch_add(1, Ordering::SeqCst);
                held.fetch_add(1, Ordering::SeqCst);
                let _ = gate.acquire().await.unwrap();
                Ok::<_, Error>(response(i))
            })
            .await
    };
    let holders: Vec<_> = (0..100)
        .map(|i| {
            tokio::spawn(call(
                store.clone(),
                i,
                gate.clone(),
                runs.clone(),
                held.clone(),
                OnConflict::Wait,
            ))
        })
        .collect();
    while held.load(Ordering::SeqCst) < 100 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for n in 0..10_000usize {
        let v = Call::new("tests::memory::flood::unique")
            .key(n)
            .run(&*store, async move { Ok::<_, Error>(response(n)) })
            .await
            .unwrap();
        assert_eq!(v.len(), 5 * 1024);
        if n % 1_000 == 0 {
            // Duplicates of every held key are still refused mid-flood.
            for i in 0..100 {
                let r = call(
                    store.clone(),
                    i,
                    gate.clone(),
                    runs.clone(),
                    held.clone(),
                    OnConflict::Reject,
                )
                .await;
                assert!(matches!(r, Err(Error::InProgress { .. })), "key {i}: {r:?}");
            }
        }
    }
    assert!(store.weighted_size() <= 2 << 20);
    assert_eq!(store.in_progress(), 100);
    gate.add_permits(1_000);
    for (i, h) in holders.into_iter().enumerate() {
        assert_eq!(h.await.unwrap().unwrap(), response(i));
    }
    for i in 0..100 {
        let r = call(
            store.clone(),
            i,
            gate.clone(),
            runs.clone(),
            held.clone(),
            OnConflict::Reject,
        )
        .await;
        assert_eq!(r.unwrap(), response(i), "a completed held key replays");
    }
    let double: Vec<_> = (0..100)
        .filter(|&i| runs[i].load(Ordering::SeqCst) != 1)
        .collect();
    assert!(double.is_empty(), "bodies that ran twice: {double:?}");
    assert_eq!(store.in_progress(), 0);
}

/// Past `max_in_progress` a claim is refused with a `CapacityError` (never an eviction of a
/// held claim); a release makes room, and lapsed claims are swept to make room.
#[tokio::test(start_paused = true)]
async fn the_claim_cap_is_an_error_not_an_eviction() {
    let store = MemoryStore::builder().max_in_progress(2).build();
    let lease = Duration::from_secs(30);
    let (a, ta) = claim_request(fresh_key(), lease);
    let (b, _) = claim_request(fresh_key(), Duration::from_secs(5));
    let (c, _) = claim_request(fresh_key(), lease);
    assert_eq!(
        store.claim(&a).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
    assert_eq!(
        store.claim(&b).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
    let err = store.claim(&c).await.unwrap_err();
    assert!(matches!(err, StoreError::Backend { .. }), "{err:?}");
    let source = std::error::Error::source(&err).expect("the cap is the source");
    assert!(source.to_string().contains("max_in_progress"), "{source}");
    // Both claims are still held.
    for r in [&a, &b] {
        let again = claim_request(r.key, lease).0;
        assert!(matches!(
            store.claim(&again).await.unwrap(),
            Claim::InProgress { .. }
        ));
    }
    store.release(&a.key, ta).await.unwrap();
    assert_eq!(
        store.claim(&c).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
    // `b`'s lease lapses: its claim is swept to make room for a new key.
    tokio::time::advance(Duration::from_secs(6)).await;
    let (d, _) = claim_request(fresh_key(), lease);
    assert_eq!(
        store.claim(&d).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
    assert_eq!(store.in_progress(), 2);
}

/// Replays hand out the stored bytes, not copies: the synchronous look lends them, and a
/// claim's answer shares them.
#[tokio::test]
async fn replays_share_the_stored_bytes() {
    let store = MemoryStore::new();
    let (req, token) = claim_request(fresh_key(), Duration::from_secs(30));
    store.claim(&req).await.unwrap();
    store
        .complete(
            &req.key,
            token,
            response(1).as_bytes(),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let lent = |store: &MemoryStore| {
        let mut at = None;
        assert!(store.visit_completed_now(&req.key, &mut |r| {
            at = Some((r.value.as_ptr(), r.expires_in))
        }));
        at.expect("lent")
    };
    let (a, expires_in) = lent(&store);
    let (b, _) = lent(&store);
    let Claim::Completed(c) = store
        .claim(&claim_request(req.key, Duration::from_secs(1)).0)
        .await
        .unwrap()
    else {
        panic!("expected a replay");
    };
    assert_eq!(a, b);
    assert_eq!(a, c.value.as_ptr());
    assert!(expires_in.unwrap() <= Duration::from_secs(60));
}

/// Under `tokio::time::pause()`: past the ttl the body runs again; past the lease a stuck
/// holder's claim is taken over.
#[tokio::test(start_paused = true)]
async fn paused_time_moves_ttls_and_leases() {
    let store = MemoryStore::new();
    let runs = AtomicUsize::new(0);
    let call = || {
        Call::new("tests::memory::paused")
            .key("order-1")
            .ttl(Duration::from_secs(3600))
            .run(&store, async {
                Ok::<_, Error>(runs.fetch_add(1, Ordering::SeqCst) + 1)
            })
    };
    assert_eq!(call().await.unwrap(), 1);
    tokio::time::advance(Duration::from_secs(3599)).await;
    assert_eq!(call().await.unwrap(), 1, "replayed inside the ttl");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(call().await.unwrap(), 2, "past the ttl the body runs again");

    // A holder that claimed and vanished (no renewals): its lease passes, the next call takes
    // over.
    let key = Call::new("tests::memory::paused::lease")
        .key("k")
        .identity_for(&store)
        .unwrap()
        .unwrap()
        .key;
    let (stuck, _) = claim_request(key, Duration::from_secs(30));
    store.claim(&stuck).await.unwrap();
    let take = || {
        Call::new("tests::memory::paused::lease")
            .key("k")
            .on_conflict(OnConflict::Reject)
            .run(&store, async { Ok::<_, Error>(7u8) })
    };
    assert!(matches!(take().await, Err(Error::InProgress { .. })));
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(take().await.unwrap(), 7, "past the lease: taken over");
}

/// The cases of the conformance suite that race a spawned holder against the test's own
/// probes, with the holder given time to claim first (see the report on
/// `renewal_failures_keep_the_lease`): an in-process store answers a probe before a freshly
/// spawned task has run at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn renewal_failures_keep_the_lease_once_the_holder_claimed() {
    use idem_testkit::{Fault, FaultyStore, Op};
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let faulty = FaultyStore::new(store.clone());
    let lease = Duration::from_millis(600);
    let runs = Arc::new(AtomicUsize::new(0));
    faulty.plan(Fault::FailBefore(Op::Renew));
    faulty.plan(Fault::FailBefore(Op::Renew));
    let holder = {
        let faulty = faulty.clone();
        let runs = runs.clone();
        tokio::spawn(async move {
            Call::new("tests::memory::renewals")
                .key("k")
                .lease(lease)
                .run(&faulty, async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(lease * 3).await;
                    Ok::<_, Error>(1u32)
                })
                .await
        })
    };
    while runs.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let until = tokio::time::Instant::now() + lease * 3;
    while tokio::time::Instant::now() < until {
        let r: Result<u32, Error> = Call::new("tests::memory::renewals")
            .key("k")
            .lease(lease)
            .on_conflict(OnConflict::Reject)
            .run(&*store, async { Ok(2) })
            .await;
        match r {
            Err(Error::InProgress { .. }) => {}
            Ok(1) => break,
            other => panic!("a duplicate got in while the holder lived: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(holder.await.unwrap().unwrap(), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(faulty.pending(), 0);
}

/// `MemoryStore` is process-local, so calls on it derive process-local keys (not the portable
/// BLAKE3 digest that shared stores get). Every handle on the store — the store, a reference,
/// an `Arc` of it — derives the same key, so one call through any of them replays another's
/// record, `Call::inspect` finds it, and a reused key with other arguments is still refused.
#[tokio::test]
async fn memory_store_records_use_process_local_keys_through_every_handle() {
    let store = Arc::new(MemoryStore::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let call = |amount: u64| {
        Call::new("tests::memory::local_keys")
            .key("order-1")
            .fingerprint((amount,))
    };
    let body = |runs: Arc<AtomicUsize>| async move {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Error>(7u64)
    };

    assert!(store.process_local());
    let local = call(1).identity_for(&*store).unwrap().unwrap();
    let portable = call(1).identity().unwrap().unwrap();
    assert_ne!(
        local.key, portable.key,
        "the memory store gets process-local keys"
    );
    assert_eq!(
        local.key,
        call(1).identity_for(&store).unwrap().unwrap().key
    );

    assert_eq!(call(1).run(&*store, body(runs.clone())).await.unwrap(), 7);
    let as_arc: Arc<dyn Store> = store.clone();
    assert_eq!(call(1).run(&as_arc, body(runs.clone())).await.unwrap(), 7);
    assert_eq!(call(1).run(&store, body(runs.clone())).await.unwrap(), 7);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one execution, two replays");

    let info = call(1).inspect(&*store).await.unwrap().expect("a record");
    assert_eq!(info.key, local.key);
    assert!(store.get(&portable.key).await.unwrap().is_none());

    let reused = call(2).run(&*store, body(runs.clone())).await;
    assert!(matches!(reused, Err(Error::KeyReused)), "{reused:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// The synchronous claim and completion the runtime tries first answer what `claim` and
/// `complete` answer: acquired, in progress for another token, fenced, completed.
#[tokio::test]
async fn claim_now_and_complete_now_answer_like_claim_and_complete() {
    let store = MemoryStore::new();
    let lease = Duration::from_secs(30);
    let (req, _) = claim_request(fresh_key(), lease);
    assert!(matches!(
        store.claim_now(&req),
        Some(Ok(Claim::Acquired { taken_over: false }))
    ));
    let other = idem_core::ClaimRequest {
        token: idem_core::FencingToken(req.token.0 ^ 1),
        ..req.clone()
    };
    assert!(matches!(
        store.claim_now(&other),
        Some(Ok(Claim::InProgress { .. }))
    ));
    let ttl = Duration::from_secs(60);
    assert!(matches!(
        store.complete_now(&req.key, other.token, b"v", ttl),
        Some(Err(StoreError::Fenced))
    ));
    assert!(matches!(
        store.complete_now(&req.key, req.token, b"v", ttl),
        Some(Ok(()))
    ));
    // A retried completion under the same token is recognised.
    assert!(matches!(
        store.complete_now(&req.key, req.token, b"v", ttl),
        Some(Ok(()))
    ));
    match store.claim_now(&other) {
        Some(Ok(Claim::Completed(record))) => {
            assert_eq!(&record.value[..], b"v");
            assert_eq!(record.fingerprint, req.fingerprint);
        }
        other => panic!("expected the completed record, got {other:?}"),
    }
}

/// A record keeps its fingerprint whole, whether it is a process-local one (16 significant
/// bytes, the rest zero: only those 16 are stored) or a portable 32-byte digest.
#[tokio::test]
async fn both_forms_of_fingerprint_come_back_whole() {
    let store = MemoryStore::new();
    let lease = Duration::from_secs(30);
    let mut local = [0u8; 32];
    local[..16].copy_from_slice(&[7u8; 16]);
    for fp in [None, Some(local), Some([9u8; 32])] {
        let (mut req, _) = claim_request(fresh_key(), lease);
        req.fingerprint = fp.map(idem_core::Fingerprint);
        store.claim(&req).await.unwrap();
        store
            .complete(&req.key, req.token, b"value", Duration::from_secs(60))
            .await
            .unwrap();
        let record = store.completed_now(&req.key).expect("a live record");
        assert_eq!(record.fingerprint, req.fingerprint);
        assert_eq!(&record.value[..], b"value");
    }
}
