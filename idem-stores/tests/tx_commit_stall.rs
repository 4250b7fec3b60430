//! A transaction's commit is bounded like every other store operation: a commit that stalls
//! 4 s (PostgreSQL and MariaDB: the `COMMIT` held 4 s by a proxy; SQLite: a commit hook that
//! sleeps 4 s in the driver's worker thread) under a 1 s lease gives the caller its value or a
//! clear error within the lease, answers a duplicate within its `wait_timeout`, and leaves
//! exactly one execution's writes, which every later call replays.
//!
//! PostgreSQL and MariaDB end the stalled transaction's session (the database rolls it back),
//! so the duplicate runs on a clean slate; SQLite cannot cancel a commit in its driver's
//! thread, so the commit lands when the hook returns and the duplicate gets the first value
//! or `InProgress`. Runs against the servers of `IDEM_TEST_POSTGRES_URL` and
//! `IDEM_TEST_MYSQL_URL` when they are set.
#![cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "support/backends.rs"]
mod backends;

#[path = "support/proxy.rs"]
mod proxy;
#[path = "support/sql_common.rs"]
mod sql_common;
#[path = "support/tx_common.rs"]
mod tx_common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem_core::{Call, Error, TransactionalStore};
use idem_testkit::transactional::{TxHarness, TxOf};

const LEASE: Duration = Duration::from_secs(1);
const STALL: Duration = Duration::from_secs(4);
const DUPLICATE_WAIT: Duration = Duration::from_secs(3);
/// Scheduling slack on a loaded machine (CI, six builders on two cores).
const SLACK: Duration = Duration::from_millis(700);

/// Makes the next commit stall, from inside the body's transaction.
type Arm<Tx> = Arc<
    dyn for<'a> Fn(
            &'a mut Tx,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>
        + Send
        + Sync,
>;

/// What a stalled-commit run saw.
struct Seen {
    first: Result<String, Error>,
    /// From the end of the first body to the first caller's answer.
    first_after_body: Duration,
    duplicate: Result<String, Error>,
    duplicate_took: Duration,
    replay: Result<String, Error>,
    rows: Vec<String>,
}

/// The scenario on any transactional harness; `arm` makes the next commit (the first call's)
/// stall for [`STALL`], from inside the body's transaction.
async fn stalled_commit<H>(h: Arc<H>, ns: &'static str, arm: Arm<TxOf<H>>) -> Seen
where
    H: TxHarness + 'static,
    H::Store: TransactionalStore,
{
    let key = format!("stall-{}", std::process::id());
    let body_done = Arc::new(Mutex::new(None::<Instant>));
    let first = {
        let (h, key, body_done) = (Arc::clone(&h), key.clone(), Arc::clone(&body_done));
        tokio::spawn(async move {
            let got = Call::new(ns)
                .key(&key)
                .lease(LEASE)
                .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
                    h.insert(tx, &key, "first").await.map_err(Error::Store)?;
                    arm(tx).await;
                    *body_done.lock().unwrap() = Some(Instant::now());
                    Ok::<_, Error>("first".to_owned())
                })
                .await;
            (got, Instant::now())
        })
    };
    // The duplicate arrives while the commit is stalled.
    let deadline = Instant::now() + Duration::from_secs(10);
    let ended = loop {
        if let Some(t) = *body_done.lock().unwrap() {
            break t;
        }
        assert!(Instant::now() < deadline, "the first body never ended");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let duplicate: Result<String, Error> = Call::new(ns)
        .key(&key)
        .lease(LEASE)
        .wait_timeout(DUPLICATE_WAIT)
        .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
            h.insert(tx, &key, "second").await.map_err(Error::Store)?;
            Ok::<_, Error>("second".to_owned())
        })
        .await;
    let duplicate_took = started.elapsed();
    let (first, answered) = first.await.unwrap();
    // Past the stall, whatever was in flight has landed or is gone.
    let settled = ended + STALL + Duration::from_millis(500);
    tokio::time::sleep_until(settled.into()).await;
    let replay: Result<String, Error> = Call::new(ns)
        .key(&key)
        .lease(LEASE)
        .wait_timeout(Duration::from_secs(5))
        .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
            h.insert(tx, &key, "third").await.map_err(Error::Store)?;
            Ok::<_, Error>("third".to_owned())
        })
        .await;
    let rows = h.rows(&key).await;
    h.cleanup().await;
    eprintln!(
        "{ns}: first {first:?} {:?} after its body; duplicate {duplicate:?} after {duplicate_took:?}; rows {rows:?}",
        answered.saturating_duration_since(ended)
    );
    Seen {
        first,
        first_after_body: answered.saturating_duration_since(ended),
        duplicate,
        duplicate_took,
        replay,
        rows,
    }
}

/// What every store must show.
fn check_common(seen: &Seen) {
    // The caller has its value or a clear error within the lease (the stall is 4 s).
    assert!(
        seen.first_after_body < LEASE + SLACK,
        "the first caller waited {:?} after its body for a commit stalled {STALL:?} (lease {LEASE:?})",
        seen.first_after_body
    );
    match &seen.first {
        Ok(v) => assert_eq!(v, "first"),
        Err(Error::Store(_)) => {}
        Err(e) => panic!("the first caller got {e:?}, neither its value nor a store error"),
    }
    // The duplicate is answered within its wait_timeout.
    assert!(
        seen.duplicate_took < DUPLICATE_WAIT + SLACK,
        "the duplicate waited {:?} (wait_timeout {DUPLICATE_WAIT:?})",
        seen.duplicate_took
    );
    // Exactly one execution's writes, and every later call replays that execution's value.
    assert_eq!(seen.rows.len(), 1, "business rows: {:?}", seen.rows);
    let replay = seen
        .replay
        .as_ref()
        .expect("the call after the stall replays");
    assert_eq!(
        *replay, seen.rows[0],
        "the replay is the committed execution's value"
    );
    if let Ok(v) = &seen.first {
        assert_eq!(v, replay);
    }
    if let Ok(v) = &seen.duplicate {
        assert_eq!(v, replay, "the duplicate's answer is the committed one");
    }
}

#[cfg(feature = "postgres")]
async fn postgres_stalled_commit_is_bounded_by_the_lease() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL") else {
        return;
    };
    let proxy = Arc::new(proxy::Proxy::for_url(&url).await);
    let h = Arc::new(tx_common::pg::PgHarness::new(&proxy.url(&url), "stall", 16).await);
    let arm: Arm<idem_stores::PgTx> = {
        let proxy = Arc::clone(&proxy);
        Arc::new(move |_| {
            proxy.stall_request_to(vec![b"COMMIT".to_vec()], STALL);
            Box::pin(async {})
        })
    };
    let seen = stalled_commit(h, "tx_commit_stall::pg", arm).await;
    check_common(&seen);
    // The stalled transaction's session was ended: it rolled back, the claim was released,
    // and the duplicate ran on a clean slate.
    assert!(
        matches!(seen.first, Err(Error::Store(_))),
        "{:?}",
        seen.first
    );
    assert_eq!(seen.duplicate.as_deref().ok(), Some("second"));
}

#[cfg(feature = "mysql")]
async fn mysql_stalled_commit_is_bounded_by_the_lease() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let proxy = Arc::new(proxy::Proxy::for_url(&url).await);
    let h = Arc::new(tx_common::my::MyHarness::new(&proxy.url(&url), "stall", 16).await);
    let arm: Arm<idem_stores::MySqlTx> = {
        let proxy = Arc::clone(&proxy);
        Arc::new(move |_| {
            proxy.stall_request_to(vec![b"COMMIT".to_vec()], STALL);
            Box::pin(async {})
        })
    };
    let seen = stalled_commit(h, "tx_commit_stall::mysql", arm).await;
    check_common(&seen);
    assert!(
        matches!(seen.first, Err(Error::Store(_))),
        "{:?}",
        seen.first
    );
    assert_eq!(seen.duplicate.as_deref().ok(), Some("second"));
}

#[cfg(feature = "sqlite")]
async fn sqlite_stalled_commit_is_bounded_by_the_lease() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let path = sql_common::sqlite_file("stall");
    let h = Arc::new(tx_common::lite::LiteHarness::new(&path, "stall").await);
    // One stalled commit: the hook stays on the pooled connection, so it stalls once.
    let once = Arc::new(AtomicBool::new(true));
    let arm: Arm<idem_stores::SqliteTx> = Arc::new(move |tx: &mut idem_stores::SqliteTx| {
        let once = Arc::clone(&once);
        Box::pin(async move {
            let mut handle = tx.lock_handle().await.expect("lock the sqlite handle");
            handle.set_commit_hook(move || {
                if once.swap(false, Ordering::SeqCst) {
                    std::thread::sleep(STALL);
                }
                true
            });
        })
    });
    let seen = stalled_commit(h, "tx_commit_stall::sqlite", arm).await;
    let _ = std::fs::remove_file(&path);
    check_common(&seen);
    // SQLite's commit cannot be cancelled in its driver: it lands when the hook returns, so
    // the first execution is the one that stays.
    assert_eq!(seen.rows, vec!["first".to_owned()]);
}

fn main() -> std::process::ExitCode {
    use backends::{MYSQL, POSTGRES};
    use idem_testkit::test_cases;
    idem_testkit::harness::run([
        test_cases!([POSTGRES], multi_thread(2); postgres_stalled_commit_is_bounded_by_the_lease),
        test_cases!([MYSQL], multi_thread(2); mysql_stalled_commit_is_bounded_by_the_lease),
        test_cases!([], multi_thread(2); sqlite_stalled_commit_is_bounded_by_the_lease),
    ])
}
