//! Transactional mode on `PostgresStore` (issue 13): the transactional conformance suite
//! (`idem_core::testkit::transactional`) with a business table on the same database, and the
//! PostgreSQL specifics: waiters are woken by the `NOTIFY` delivered at commit, never by a
//! rollback. Runs when `IDEM_TEST_POSTGRES_URL` is set.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/sql_common.rs"]
mod sql_common;
#[path = "support/tx_common.rs"]
mod tx_common;

use tx_common::pg::PgHarness;

async fn harness() -> Option<PgHarness> {
    let url = idem_core::testkit::env_url("IDEM_TEST_POSTGRES_URL")?;
    Some(PgHarness::new(&url, "tx", 16).await)
}

idem_core::transactional_conformance_tests!(harness());

/// A caller's REPEATABLE READ transaction that took its snapshot before the claim cannot see
/// it: the completion says so (an error naming READ COMMITTED, and the claim is released),
/// rather than reporting a lost lease; nothing of the body stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn within_repeatable_read_names_the_fix() {
    use idem_core::testkit::transactional::TxHarness;
    use idem_core::{Call, Error, StoreError};
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
