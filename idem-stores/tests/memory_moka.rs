//! `MemoryStore` on moka: what idem asks of the cache beyond the conformance suite.
//!
//! - a brand-new record is always admitted, and the least recently used record goes first;
//! - in-progress claims are never evicted, whatever the byte pressure;
//! - the handover claim → completed record is atomic: racing callers see the claim or the
//!   record, never neither (a second execution) and never both;
//! - TTLs and leases follow tokio's clock, paused or not, and moka never drops a record that
//!   tokio's clock still calls live;
//! - evictions are counted by cause (and exported as a metric with feature `metrics`).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use idem_core::{Call, Claim, ClaimRequest, Error, FencingToken, Key, RecordState, Store};
use idem_stores::MemoryStore;
use idem_testkit as testkit;

const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(3600);

/// Claims `key` afresh and completes it with `value`.
async fn put(store: &MemoryStore, key: Key, value: &[u8], ttl: Duration) {
    let (req, token) = testkit::claim_request(key, LEASE);
    assert_eq!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
    store.complete(&key, token, value, ttl).await.unwrap();
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A 256 KiB store holds about 180 records of 1 KiB. Records read many times (which moka's
/// default TinyLFU admission would favour) do not keep a new record out: every new record is
/// readable at once and after moka's maintenance, and the records that go are the least
/// recently used.
#[tokio::test]
async fn every_new_record_is_admitted_and_the_least_recently_used_goes_first() {
    const BOUND: u64 = 256 << 10;
    let store = MemoryStore::builder().max_bytes(BOUND).build();
    let value = vec![7u8; 1024];
    let popular: Vec<Key> = (0..100).map(|_| testkit::fresh_key()).collect();
    for key in &popular {
        put(&store, *key, &value, TTL).await;
    }
    for _ in 0..20 {
        for key in &popular {
            assert!(store.completed_now(key).is_some());
        }
    }
    store.run_pending_tasks().await;
    // One key kept recently used through the whole flood.
    let recent = testkit::fresh_key();
    put(&store, recent, &value, TTL).await;
    let mut fresh = Vec::new();
    for _ in 0..1_000 {
        let key = testkit::fresh_key();
        put(&store, key, &value, TTL).await;
        assert!(
            store.completed_now(&key).is_some(),
            "a new record is readable"
        );
        store.run_pending_tasks().await;
        assert!(
            store.completed_now(&key).is_some(),
            "a new record was refused admission"
        );
        assert!(
            store.completed_now(&recent).is_some(),
            "the recent key went"
        );
        fresh.push(key);
    }
    assert!(store.weighted_size() <= BOUND);
    let evicted = store.evictions();
    assert!(evicted.size >= 800, "{evicted:?}");
    // The popular records were not read during the flood: they were the least recently used.
    let kept = popular
        .iter()
        .filter(|k| store.completed_now(k).is_some())
        .count();
    assert_eq!(kept, 0, "least recently used records outlived newer ones");
    // The newest records are all there.
    for key in &fresh[fresh.len() - 50..] {
        assert!(store.completed_now(key).is_some());
    }
}

/// 50 claims stay held while 5,000 records of 1 KiB flood a 256 KiB store: each still reads as
/// in progress under its token, refuses another caller, and completes.
#[tokio::test]
async fn claims_are_never_evicted_under_byte_pressure() {
    let store = MemoryStore::builder().max_bytes(256 << 10).build();
    let mut held: Vec<(Key, FencingToken)> = Vec::new();
    for _ in 0..50 {
        let (req, token) = testkit::claim_request(testkit::fresh_key(), LEASE);
        assert!(matches!(
            store.claim(&req).await.unwrap(),
            Claim::Acquired { .. }
        ));
        held.push((req.key, token));
    }
    assert_eq!(store.in_progress(), 50);
    let value = vec![1u8; 1024];
    for _ in 0..5_000 {
        put(&store, testkit::fresh_key(), &value, TTL).await;
    }
    store.run_pending_tasks().await;
    assert!(store.evictions().size > 4_000);
    assert_eq!(store.in_progress(), 50);
    for (key, token) in &held {
        match store.get(key).await.unwrap() {
            Some(RecordState::InProgress { token: t, .. }) => assert_eq!(t, *token),
            other => panic!("a held claim reads as {other:?}"),
        }
        let (other, _) = testkit::claim_request(*key, LEASE);
        assert!(matches!(
            store.claim(&other).await.unwrap(),
            Claim::InProgress { .. }
        ));
        store.complete(key, *token, b"done", TTL).await.unwrap();
        assert_eq!(&store.completed_now(key).unwrap().value[..], b"done");
    }
    assert_eq!(store.in_progress(), 0);
}

/// Store-level race on 300 keys: one thread claims and completes each key while three others
/// hammer it with claims under their own tokens, `get`, `completed_now` and
/// `visit_completed_now`. A claim answer is
/// `InProgress` or `Completed`, never `Acquired` (which would be neither: a second execution);
/// `get` is never `None`; and once a caller saw the record it never sees the claim again
/// (which would be both).
#[test]
fn the_handover_from_claim_to_record_is_atomic_for_racing_callers() {
    const KEYS: usize = 300;
    const READERS: usize = 3;
    let store = MemoryStore::new();
    let keys: Arc<Vec<Key>> = Arc::new((0..KEYS).map(|_| testkit::fresh_key()).collect());
    let barrier = Arc::new(Barrier::new(READERS + 1));
    let completed = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (store, keys, barrier, completed) = (
            store.clone(),
            keys.clone(),
            barrier.clone(),
            completed.clone(),
        );
        std::thread::spawn(move || {
            let rt = current_thread();
            for (i, key) in keys.iter().enumerate() {
                let (req, token) = testkit::claim_request(*key, LEASE);
                assert_eq!(
                    rt.block_on(store.claim(&req)).unwrap(),
                    Claim::Acquired { taken_over: false }
                );
                completed.store(i * 2 + 1, Ordering::SeqCst);
                barrier.wait();
                // Let the readers see the claim for a moment, then complete under them.
                std::thread::yield_now();
                rt.block_on(store.complete(key, token, &(i as u64).to_le_bytes(), TTL))
                    .unwrap();
                completed.store(i * 2 + 2, Ordering::SeqCst);
                barrier.wait();
            }
        })
    };
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (store, keys, barrier, completed) = (
                store.clone(),
                keys.clone(),
                barrier.clone(),
                completed.clone(),
            );
            std::thread::spawn(move || {
                let rt = current_thread();
                let (mut saw_claim, mut saw_record) = (0usize, 0usize);
                for (i, key) in keys.iter().enumerate() {
                    barrier.wait();
                    let mut seen_record = false;
                    loop {
                        let done = completed.load(Ordering::SeqCst) >= i * 2 + 2;
                        let req = ClaimRequest {
                            key: *key,
                            fingerprint: None,
                            token: FencingToken(1_000 + r as u64),
                            lease: LEASE,
                        };
                        match rt.block_on(store.claim(&req)).unwrap() {
                            Claim::Acquired { .. } => panic!("key {i}: a racing claim acquired"),
                            Claim::InProgress { .. } => {
                                assert!(!seen_record, "key {i}: the claim after the record");
                                saw_claim += 1;
                            }
                            Claim::Completed(record) => {
                                assert_eq!(&record.value[..], &(i as u64).to_le_bytes());
                                seen_record = true;
                                saw_record += 1;
                            }
                        }
                        match rt.block_on(store.get(key)).unwrap() {
                            None => panic!("key {i}: neither claim nor record"),
                            Some(RecordState::InProgress { .. }) => {
                                assert!(!seen_record, "key {i}: the claim after the record")
                            }
                            Some(RecordState::Completed(_)) => seen_record = true,
                        }
                        if store.completed_now(key).is_some() {
                            seen_record = true;
                        }
                        // The lent look the runtime's replay uses: the completed value, or
                        // nothing while the claim is held.
                        let expect = (i as u64).to_le_bytes();
                        if store.visit_completed_now(key, &mut |r| {
                            assert_eq!(r.value, &expect[..], "key {i}: a lent record's value");
                        }) {
                            seen_record = true;
                        }
                        if done && seen_record {
                            break;
                        }
                    }
                    barrier.wait();
                }
                (saw_claim, saw_record)
            })
        })
        .collect();
    writer.join().unwrap();
    let mut claims_seen = 0;
    for r in readers {
        let (c, rec) = r.join().unwrap();
        assert!(rec >= KEYS);
        claims_seen += c;
    }
    // The race was real: the readers saw claims, not only finished records.
    assert!(claims_seen > 0);
    assert_eq!(store.in_progress(), 0);
}

/// Through the runtime on 4 worker threads: 8 concurrent calls of each of 200 keys, waiting
/// for one another; each body runs once and every caller gets its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicates_run_each_body_once() {
    let store = Arc::new(MemoryStore::new());
    let runs: Arc<Vec<AtomicUsize>> = Arc::new((0..200).map(|_| AtomicUsize::new(0)).collect());
    let mut tasks = Vec::new();
    for k in 0..200usize {
        for _ in 0..8 {
            let (store, runs) = (store.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                Call::new("tests::memory_moka::duplicates")
                    .key(k)
                    .run(&*store, async move {
                        runs[k].fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        Ok::<_, Error>(k * 3)
                    })
                    .await
            }));
        }
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap(), (i / 8) * 3);
    }
    for (k, n) in runs.iter().enumerate() {
        assert_eq!(n.load(Ordering::SeqCst), 1, "key {k}");
    }
}

/// Under a paused clock, a record lives by tokio's clock: real time passing (moka's clock)
/// does not drop it, and advancing tokio's clock past its TTL does. Leases too.
#[tokio::test(start_paused = true)]
async fn ttls_and_leases_follow_the_paused_clock_not_the_real_one() {
    let store = MemoryStore::new();
    let key = testkit::fresh_key();
    put(&store, key, b"v", Duration::from_millis(100)).await;
    // Real time passes, past two ticks of moka's timer wheel (about a second each); tokio's
    // clock stands still.
    for _ in 0..11 {
        std::thread::sleep(Duration::from_millis(200));
        store.run_pending_tasks().await;
    }
    assert!(
        store.completed_now(&key).is_some(),
        "moka's clock dropped it"
    );
    assert_eq!(store.evictions().expired, 0);
    tokio::time::advance(Duration::from_millis(99)).await;
    assert!(store.completed_now(&key).is_some());
    tokio::time::advance(Duration::from_millis(2)).await;
    assert!(store.completed_now(&key).is_none(), "served past its ttl");
    assert_eq!(store.get(&key).await.unwrap(), None);
    let (req, _) = testkit::claim_request(key, Duration::from_secs(1));
    assert_eq!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
    // A lease follows tokio's clock as well.
    std::thread::sleep(Duration::from_millis(50));
    let (other, _) = testkit::claim_request(key, Duration::from_secs(1));
    assert!(matches!(
        store.claim(&other).await.unwrap(),
        Claim::InProgress { .. }
    ));
    tokio::time::advance(Duration::from_millis(1_001)).await;
    assert_eq!(
        store.claim(&other).await.unwrap(),
        Claim::Acquired { taken_over: true }
    );
}

/// Waits (at most 8 s) for moka's expiry to remove an expired record (it trails the record's
/// deadline by 2 s, and its timer wheel ticks about once a second).
async fn expire(store: &MemoryStore) {
    for _ in 0..80 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        store.run_pending_tasks().await;
        if store.evictions().expired > 0 {
            return;
        }
    }
}

/// On the real clock moka's own expiry removes a record after its TTL, counted as `expired`.
#[tokio::test]
async fn expired_records_are_removed_and_counted() {
    let store = MemoryStore::new();
    let key = testkit::fresh_key();
    put(&store, key, b"v", Duration::from_millis(50)).await;
    assert!(store.completed_now(&key).is_some());
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(store.completed_now(&key).is_none(), "served past its ttl");
    // No read touches it again: moka's expiry removes it, a little later.
    expire(&store).await;
    assert_eq!(store.entry_count(), 0);
    assert_eq!(store.evictions().expired, 1);
    assert_eq!(store.evictions().size, 0);
}

/// With feature `metrics`, each eviction is `idem_store_evictions_total{store, cause}`.
#[cfg(feature = "metrics")]
#[test]
fn evictions_are_exported_as_a_metric_by_cause() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = current_thread();
    let store = MemoryStore::builder().max_bytes(64 << 10).build();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            for _ in 0..500 {
                put(&store, testkit::fresh_key(), &[0u8; 512], TTL).await;
            }
            put(
                &store,
                testkit::fresh_key(),
                b"x",
                Duration::from_millis(20),
            )
            .await;
            expire(&store).await;
        })
    });
    let evicted = store.evictions();
    assert!(evicted.size > 0 && evicted.expired == 1, "{evicted:?}");
    let mut by_cause = std::collections::BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if key.key().name() != "idem_store_evictions_total" {
            continue;
        }
        let label = |n: &str| {
            key.key()
                .labels()
                .find(|l| l.key() == n)
                .map(|l| l.value().to_string())
        };
        assert_eq!(label("store").as_deref(), Some("memory"));
        if let DebugValue::Counter(n) = value {
            by_cause.insert(label("cause").unwrap(), n);
        }
    }
    assert_eq!(by_cause.get("size"), Some(&evicted.size));
    assert_eq!(by_cause.get("expired"), Some(&1));
}
