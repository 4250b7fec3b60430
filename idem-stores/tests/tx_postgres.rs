//! Transactional mode on `PostgresStore` (issue 13): the transactional conformance suite
//! (`idem_testkit::transactional`) with a business table on the same database, and the
//! PostgreSQL specifics: waiters are woken by the `NOTIFY` delivered at commit, never by a
//! rollback. Runs when `IDEM_TEST_POSTGRES_URL` is set.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/sql_common.rs"]
mod sql_common;
#[path = "support/tx_common.rs"]
mod tx_common;

use tx_common::pg::PgHarness;

async fn harness() -> Option<PgHarness> {
    let url = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL")?;
    Some(PgHarness::new(&url, "tx", 16).await)
}

idem_testkit::transactional_conformance_tests!(harness());

/// A caller's REPEATABLE READ transaction that took its snapshot before the claim cannot see
/// it: the completion says so (an error naming READ COMMITTED, and the claim is released),
/// rather than reporting a lost lease; nothing of the body stays.
async fn within_repeatable_read_names_the_fix() {
    use idem_core::{Call, Error, StoreError};
    use idem_testkit::transactional::TxHarness;
    let Some(h) = harness().await else {
        return;
    };
    let mut tx = idem_stores::PgTx::from(
        h.pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .await
            .unwrap(),
    );
    sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap(); // the snapshot
    let got: Result<String, Error> = Call::new("tx_postgres::rr")
        .key("rr-key")
        .run_within(&h.store, &mut tx, async |tx: &mut idem_stores::PgTx| {
            h.insert(tx, "rr-key", "rr").await.map_err(Error::Store)?;
            Ok("rr".to_owned())
        })
        .await;
    drop(tx);
    let rows = h.rows("rr-key").await;
    h.cleanup().await;
    match got {
        Err(Error::Store(e @ StoreError::Backend { .. })) => {
            assert!(e.to_string().contains("READ COMMITTED"), "{e}")
        }
        other => panic!("expected the READ COMMITTED error, got {other:?}"),
    }
    assert!(rows.is_empty());
}

/// A waiter on another store instance (another process, as far as it knows) whose polling is
/// turned down to once a minute is woken by the `NOTIFY` that the transactional completion
/// queued, delivered at the commit: it replays the committed value well inside its 10 s
/// wait, under a holder's 30 s lease.
async fn waiters_wake_at_commit_by_notify() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use idem_core::{Call, Error};
    use idem_stores::{PgTx, PostgresStore};
    use idem_testkit::transactional::TxHarness;

    let Some(h) = harness().await else {
        return;
    };
    let h = Arc::new(h);
    let slow_poller = PostgresStore::builder()
        .pool(h.pool.clone())
        .table(&h.table)
        .poll_interval(Duration::from_secs(60))
        .poll_max(Duration::from_secs(60))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !slow_poller.is_listening() {
        assert!(Instant::now() < deadline, "the listener never came up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let inside = Arc::new(tokio::sync::Notify::new());
    let entered = inside.notified();
    tokio::pin!(entered);
    entered.as_mut().enable();
    let first = {
        let (h, inside) = (Arc::clone(&h), Arc::clone(&inside));
        tokio::spawn(async move {
            Call::new("tx_postgres::notify")
                .key("notify-key")
                .lease(Duration::from_secs(30))
                .run_in_transaction(&h.store, async |tx: &mut PgTx| {
                    h.insert(tx, "notify-key", "first")
                        .await
                        .map_err(Error::Store)?;
                    inside.notify_one();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, Error>("first".to_owned())
                })
                .await
        })
    };
    entered.await;
    let waited = Instant::now();
    let second: Result<String, Error> = Call::new("tx_postgres::notify")
        .key("notify-key")
        .wait_timeout(Duration::from_secs(10))
        .run_in_transaction(&slow_poller, async |_tx: &mut PgTx| Ok("second".to_owned()))
        .await;
    let waited = waited.elapsed();
    let first = first.await.unwrap();
    let rows = h.rows("notify-key").await;
    h.cleanup().await;
    assert_eq!(first.unwrap(), "first");
    assert_eq!(
        second.unwrap(),
        "first",
        "the waiter replays the committed value"
    );
    assert_eq!(rows, vec!["first".to_owned()]);
    // Woken, not timed out: without the notification the waiter sleeps to its 10 s timeout
    // (then finds the value); the body holds its transaction for 0.3 s.
    assert!(
        waited < Duration::from_secs(5),
        "the waiter was not woken by the commit's NOTIFY (it waited {waited:?})"
    );
}

fn main() -> std::process::ExitCode {
    use backends::POSTGRES;
    idem_testkit::harness::run([
        cases(&[POSTGRES]),
        idem_testkit::test_cases!([POSTGRES], multi_thread(2);
            within_repeatable_read_names_the_fix, waiters_wake_at_commit_by_notify),
    ])
}
