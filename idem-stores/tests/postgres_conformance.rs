//! The store conformance suite on `PostgresStore` (needs `IDEM_TEST_POSTGRES_URL`).
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/sql_common.rs"]
mod sql_common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use idem_stores::PostgresStore;

/// One table for this test process, shared by the cases (they use fresh random keys).
fn table() -> &'static str {
    static TABLE: OnceLock<String> = OnceLock::new();
    TABLE.get_or_init(|| sql_common::unique_table("conf"))
}

async fn store() -> Option<Arc<dyn idem_core::Store>> {
    let url = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL")?;
    sql_common::pg_drop_stale_tables(&url).await;
    let store = PostgresStore::builder()
        .url(url)
        .table(table())
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .max_value_size(256 << 10)
        .connect()
        .await
        .expect("connect to IDEM_TEST_POSTGRES_URL");
    store.migrate().await.expect("migrate");
    Some(Arc::new(store))
}

idem_testkit::conformance_tests!(store());

/// The same cases with no `LISTEN` connection: waiters fall back to bounded polling, as they
/// do while the listener is reconnecting.
mod polling {
    use super::*;

    async fn store() -> Option<Arc<dyn idem_core::Store>> {
        let url = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL")?;
        let store = PostgresStore::builder()
            .url(url)
            .table(table())
            .max_connections(4)
            .notify(false)
            .max_value_size(256 << 10)
            .connect()
            .await
            .expect("connect to IDEM_TEST_POSTGRES_URL");
        store.migrate().await.expect("migrate");
        Some(Arc::new(store))
    }

    idem_testkit::conformance_tests!(store());
}

/// The durable-steps cases on the same table (and its `_steps` table).
mod steps {
    use super::*;

    idem_testkit::step_conformance_tests!(store());
}

fn main() -> std::process::ExitCode {
    use backends::POSTGRES;
    idem_testkit::harness::run([
        cases(&[POSTGRES]),
        polling::cases(&[POSTGRES]),
        steps::cases(&[POSTGRES]),
    ])
}
