//! The store conformance suite on `SqliteStore`, in memory and on a file. Needs no server.
#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/sql_common.rs"]
mod sql_common;

/// Each case gets its own in-memory database.
mod memory {
    use std::sync::Arc;

    use idem_stores::SqliteStore;

    async fn store() -> Option<Arc<dyn idem_core::Store>> {
        let store = SqliteStore::builder()
            .url("sqlite::memory:")
            .max_value_size(256 << 10)
            .connect()
            .await
            .expect("open in-memory database");
        store.migrate().await.expect("migrate");
        Some(Arc::new(store))
    }

    idem_testkit::conformance_tests!(store());
}

/// The cases share one database file per test process (one table each), as processes would.
mod file {
    use std::sync::Arc;

    use idem_stores::SqliteStore;

    async fn store() -> Option<Arc<dyn idem_core::Store>> {
        let path = super::sql_common::sqlite_file("conf");
        let store = SqliteStore::builder()
            .url(format!("sqlite://{}", path.display()))
            .table(super::sql_common::unique_table("conf"))
            .max_value_size(256 << 10)
            .connect()
            .await
            .expect("open database file");
        store.migrate().await.expect("migrate");
        Some(Arc::new(store))
    }

    idem_testkit::conformance_tests!(store());

    /// The durable-steps cases on a database file.
    pub mod steps {
        idem_testkit::step_conformance_tests!(super::store());
    }
}

fn main() -> std::process::ExitCode {
    idem_testkit::harness::run([
        memory::cases(&[]),
        file::cases(&[]),
        file::steps::cases(&[]),
    ])
}
