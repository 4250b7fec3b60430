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
