//! Inspect, forget and the `StoreAdmin` counts on every store: memory, tiered, Redis,
//! PostgreSQL, MySQL/MariaDB and SQLite. The same scenario on each, on a store of its own
//! (fresh memory store, unique Redis prefix, unique table), so the counts are exact.
//!
//! Backend stores need `IDEM_TEST_REDIS_URL`, `IDEM_TEST_POSTGRES_URL`,
//! `IDEM_TEST_MYSQL_URL` (skipped without them, failing without them when `CI` is set).
#![cfg(feature = "memory")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/sql_common.rs"]
#[allow(unused)]
mod sql_common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem_core::{Call, Claim, ClaimTimes, Error, FencingToken, RecordStatus, Store, StoreAdmin};
use idem_stores::{MemoryStore, TieredStore};
use idem_testkit::{claim_request, fresh_key};

const TTL: Duration = Duration::from_secs(3600);

fn charge(order: &str) -> Call {
    Call::new("admin_stores::charge")
        .key(order.to_owned())
        .scope("tenant-1")
        .fingerprint((1999u32, "EUR"))
        .ttl(TTL)
}

/// What the stores must answer, whatever they are. `expired_known`: whether the store
/// counts records past their expiry (SQL, memory) or expires them natively (Redis).
/// `tiered`: a tiered store answers a completed record from its local tier, whose TTL left is
/// capped at its `local_ttl` (60 s by default): short, never long.
async fn scenario(store: &dyn StoreAdmin, expired_known: bool, tiered: bool) {
    let dyn_store: &dyn Store = store;
    let runs = AtomicU32::new(0);
    let run = |order: &'static str| {
        let runs = &runs;
        charge(order).run(dyn_store, async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(format!("receipt for {order}"))
        })
    };
    let empty = store.stats().await.unwrap();
    assert_eq!((empty.in_progress, empty.completed), (0, 0), "{empty:?}");

    // A completed record: state, TTL left, tag, size, fingerprint, key.
    assert_eq!(run("order-1").await.unwrap(), "receipt for order-1");
    let identity = charge("order-1").identity_for(dyn_store).unwrap().unwrap();
    let info = charge("order-1")
        .inspect(dyn_store)
        .await
        .unwrap()
        .expect("the completed record");
    assert_eq!(info.key, identity.key);
    match info.status {
        RecordStatus::Completed { expires_in } => {
            let left = expires_in.expect("every store reports the TTL left");
            let least = if tiered {
                Duration::from_secs(1)
            } else {
                TTL - Duration::from_secs(60)
            };
            assert!(left <= TTL && left > least, "{left:?}");
        }
        other => panic!("expected completed, got {other:?}"),
    }
    assert_eq!(info.tag.as_deref(), Some("msgpack;v0"));
    let size = info.size.expect("a completed record has a size");
    assert!(size > "receipt for order-1".len(), "{size}");
    assert_eq!(info.fingerprint, identity.fingerprint);
    assert!(info.fingerprint.is_some());
    // Another scope is another record.
    let other_scope = Call::new("admin_stores::charge")
        .key("order-1".to_owned())
        .scope("tenant-2");
    assert!(other_scope.inspect(dyn_store).await.unwrap().is_none());

    // An in-progress claim reports its holder's token.
    let held = charge("order-2").identity_for(dyn_store).unwrap().unwrap();
    let (mut req, token) = claim_request(held.key, Duration::from_secs(60));
    req.fingerprint = held.fingerprint;
    assert!(matches!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { .. }
    ));
    let info = charge("order-2").inspect(dyn_store).await.unwrap().unwrap();
    let fresh = in_progress_times(&info.status, token);
    assert_eq!(fresh.renewals, Some(0), "{fresh:?}");
    let age = fresh.age.expect("every store keeps the claim's start");
    assert!(age < Duration::from_secs(10), "{fresh:?}");
    let left = fresh
        .lease_left
        .expect("every store reports the lease left");
    assert!(
        left <= Duration::from_secs(60) && left > Duration::from_secs(50),
        "{fresh:?}"
    );
    assert_eq!(info.fingerprint, held.fingerprint);
    assert_eq!((info.tag, info.size), (None, None));

    // A live holder renews: its renewals grow and its lease moves; its age keeps counting
    // from the claim.
    tokio::time::sleep(Duration::from_millis(30)).await;
    store
        .renew(&held.key, token, Duration::from_secs(120))
        .await
        .unwrap();
    store
        .renew(&held.key, token, Duration::from_secs(120))
        .await
        .unwrap();
    let info = charge("order-2").inspect(dyn_store).await.unwrap().unwrap();
    let renewed = in_progress_times(&info.status, token);
    assert_eq!(renewed.renewals, Some(2), "{renewed:?}");
    let moved = renewed.lease_left.unwrap();
    assert!(
        moved > Duration::from_secs(100),
        "the lease moved: {renewed:?}"
    );
    assert!(
        renewed.age.unwrap() >= Duration::from_millis(25),
        "{renewed:?}"
    );
    // A retried claim (its first reply lost) is neither a new claim nor a renewal.
    assert!(matches!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { taken_over: false }
    ));
    let retried = in_progress_times(
        &charge("order-2")
            .inspect(dyn_store)
            .await
            .unwrap()
            .unwrap()
            .status,
        token,
    );
    assert!(retried.renewals.unwrap() <= 2, "{retried:?}");

    let stats = store.stats().await.unwrap();
    assert_eq!((stats.in_progress, stats.completed), (1, 1), "{stats:?}");
    let oldest = stats.oldest_in_progress.expect("the oldest claim's age");
    assert!(oldest < Duration::from_secs(10), "{stats:?}");
    assert_eq!(stats.expired_unclaimed, Some(0), "{stats:?}");

    // Forget: the next call runs the body again.
    charge("order-1").forget(dyn_store).await.unwrap();
    assert!(charge("order-1")
        .inspect(dyn_store)
        .await
        .unwrap()
        .is_none());
    assert_eq!(run("order-1").await.unwrap(), "receipt for order-1");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    // Forgetting a claim in progress frees the key.
    charge("order-2").forget(dyn_store).await.unwrap();
    assert!(charge("order-2")
        .inspect(dyn_store)
        .await
        .unwrap()
        .is_none());
    assert_eq!(run("order-2").await.unwrap(), "receipt for order-2");
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    // Forgetting what is not there is fine.
    charge("order-3").forget(dyn_store).await.unwrap();

    let stats = store.stats().await.unwrap();
    assert_eq!((stats.in_progress, stats.completed), (0, 2), "{stats:?}");

    // An expired record: counted (where the store can tell), then purged.
    let key = fresh_key();
    let (req, token) = claim_request(key, Duration::from_secs(60));
    assert!(matches!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { .. }
    ));
    store
        .complete(&key, token, b"short-lived", Duration::from_millis(20))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.in_progress, stats.completed), (0, 2), "{stats:?}");
    if expired_known {
        assert_eq!(stats.expired, Some(1), "{stats:?}");
        assert_eq!(store.purge_expired(100).await.unwrap(), 1);
        assert_eq!(store.stats().await.unwrap().expired, Some(0));
    } else {
        assert_eq!(store.purge_expired(100).await.unwrap(), 0);
    }

    // A holder that died: its lease passes with nobody renewing it or taking it over.
    let dead = fresh_key();
    let (req, _) = claim_request(dead, Duration::from_millis(200));
    assert!(matches!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { .. }
    ));
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (stats.in_progress, stats.expired_unclaimed),
        (1, Some(0)),
        "{stats:?}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.in_progress, 0, "{stats:?}");
    assert_eq!(stats.expired_unclaimed, Some(1), "{stats:?}");
    assert_eq!(stats.oldest_in_progress, None, "{stats:?}");
    assert!(store.get(&dead).await.unwrap().is_none());
    // Taken over, it is live again.
    let (req, _) = claim_request(dead, Duration::from_secs(60));
    assert_eq!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { taken_over: true }
    );
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (stats.in_progress, stats.expired_unclaimed),
        (1, Some(0)),
        "{stats:?}"
    );
    store.remove(&dead).await.unwrap();

    // Clean up what this scenario left.
    for order in ["order-1", "order-2"] {
        charge(order).forget(dyn_store).await.unwrap();
    }
    store.remove(&key).await.unwrap();
}

/// The claim times of an in-progress status under `token`.
fn in_progress_times(status: &RecordStatus, token: FencingToken) -> ClaimTimes {
    match status {
        RecordStatus::InProgress { token: t, times } if *t == token => *times,
        other => panic!("expected in progress under {token:?}, got {other:?}"),
    }
}

async fn memory_inspect_forget_stats() {
    scenario(&MemoryStore::new(), true, false).await;
}

async fn tiered_inspect_forget_stats() {
    // The tiered store reports its shared store's counts; forget goes through to it.
    scenario(&TieredStore::new(MemoryStore::new()), true, true).await;
}

#[cfg(feature = "redis")]
async fn redis_inspect_forget_stats() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_REDIS_URL") else {
        return;
    };
    let prefix = format!("idem-admin-{}-{}:", std::process::id(), fresh_key().0[0]);
    let store = idem_stores::RedisStore::builder(url)
        .prefix(prefix)
        .build()
        .await
        .unwrap();
    scenario(&store, false, false).await;
    // And behind a tiered store.
    scenario(&TieredStore::new(store), false, true).await;
}

/// Valkey 8.1: claims renewed and settled with the native `SET … IFEQ` (the holder keeps its
/// record, renewals included, to compare), inspected by a store on the scripts.
#[cfg(feature = "redis")]
async fn valkey_native_inspect_forget_stats() {
    use idem_stores::redis::NativeCas;
    let Some(url) = idem_testkit::env_url("IDEM_TEST_VALKEY81_URL") else {
        return;
    };
    let prefix = format!(
        "idem-admin-native-{}-{}:",
        std::process::id(),
        fresh_key().0[0]
    );
    let native = idem_stores::RedisStore::builder(url.clone())
        .prefix(prefix.clone())
        .native_cas(NativeCas::Always)
        .build()
        .await
        .unwrap();
    scenario(&native, false, false).await;
    // A mixed fleet: what a native holder's renewals wrote, a script instance reads.
    let scripts = idem_stores::RedisStore::builder(url)
        .prefix(prefix)
        .native_cas(NativeCas::Never)
        .build()
        .await
        .unwrap();
    let key = fresh_key();
    let (req, token) = claim_request(key, Duration::from_secs(60));
    assert!(matches!(
        native.claim(&req).await.unwrap(),
        Claim::Acquired { .. }
    ));
    for _ in 0..3 {
        native
            .renew(&key, token, Duration::from_secs(60))
            .await
            .unwrap();
    }
    match scripts.get(&key).await.unwrap() {
        Some(idem_core::RecordState::InProgress { times, .. }) => {
            assert_eq!(times.renewals, Some(3), "{times:?}")
        }
        other => panic!("{other:?}"),
    }
    // The script instance marks it as waited on (its look), so the native holder's next
    // renewal goes to the script, which keeps counting; the completion lands.
    let waiter = scripts.wait(&key, Duration::from_millis(50)).await;
    assert!(waiter.is_ok());
    native
        .renew(&key, token, Duration::from_secs(60))
        .await
        .unwrap();
    match scripts.get(&key).await.unwrap() {
        Some(idem_core::RecordState::InProgress { times, .. }) => {
            assert_eq!(times.renewals, Some(4), "{times:?}")
        }
        other => panic!("{other:?}"),
    }
    native
        .complete(&key, token, b"v", Duration::from_secs(60))
        .await
        .unwrap();
    match scripts.get(&key).await.unwrap() {
        Some(idem_core::RecordState::Completed(rec)) => assert_eq!(&rec.value[..], b"v"),
        other => panic!("{other:?}"),
    }
    scripts.remove(&key).await.unwrap();
}

#[cfg(feature = "postgres")]
async fn postgres_inspect_forget_stats() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL") else {
        return;
    };
    let table = sql_common::unique_table("admin");
    let store = idem_stores::PostgresStore::builder()
        .url(url)
        .table(&table)
        .connect()
        .await
        .unwrap();
    store.migrate().await.unwrap();
    scenario(&store, true, false).await;
    sql_common::pg_drop_tables(store.pool(), &table).await;
}

#[cfg(feature = "mysql")]
async fn mysql_inspect_forget_stats() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let table = sql_common::unique_table("admin");
    let store = idem_stores::MySqlStore::builder()
        .url(url)
        .table(&table)
        .connect()
        .await
        .unwrap();
    store.migrate().await.unwrap();
    scenario(&store, true, false).await;
    sql_common::mysql_drop_tables(store.pool(), &table).await;
}

#[cfg(feature = "sqlite")]
async fn sqlite_inspect_forget_stats() {
    let dir = std::env::temp_dir().join(format!("idem-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("admin.db");
    let store = idem_stores::SqliteStore::builder()
        .url(format!("sqlite://{}", path.display()))
        .table("idem_records")
        .connect()
        .await
        .unwrap();
    store.migrate().await.unwrap();
    scenario(&store, true, false).await;
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() -> std::process::ExitCode {
    #[allow(unused_mut)]
    let mut cases = vec![idem_testkit::test_cases!([], current_thread;
        memory_inspect_forget_stats, tiered_inspect_forget_stats)];
    #[cfg(feature = "redis")]
    cases.push(
        idem_testkit::test_cases!([backends::REDIS], current_thread; redis_inspect_forget_stats),
    );
    #[cfg(feature = "redis")]
    cases.push(idem_testkit::test_cases!(
        [backends::VALKEY81], current_thread; valkey_native_inspect_forget_stats));
    #[cfg(feature = "postgres")]
    cases.push(
        idem_testkit::test_cases!([backends::POSTGRES], current_thread; postgres_inspect_forget_stats),
    );
    #[cfg(feature = "mysql")]
    cases.push(
        idem_testkit::test_cases!([backends::MYSQL], current_thread; mysql_inspect_forget_stats),
    );
    #[cfg(feature = "sqlite")]
    cases.push(idem_testkit::test_cases!([], current_thread; sqlite_inspect_forget_stats));
    idem_testkit::harness::run(cases)
}
