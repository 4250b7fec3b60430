//! The store conformance suite (`idem_testkit`) against MySQL / MariaDB.
//!
//! Runs when `IDEM_TEST_MYSQL_URL` is set (e.g. `mysql://root@127.0.0.1:3306/test`); prints
//! `skipped: ...` and passes otherwise (fails under `CI`). Every case of one run shares one
//! table, named after the process, dropped when the cases are done; tables of runs older than ten
//! minutes (a run that was killed) are dropped on the way.
#![cfg(feature = "mysql")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;

use std::sync::{Arc, OnceLock};

use idem_core::Store;
use idem_stores::MySqlStore;

fn table() -> &'static str {
    static TABLE: OnceLock<String> = OnceLock::new();
    TABLE.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!("idem_conf_{}_{nanos}", std::process::id())
    })
}

async fn store() -> Option<Arc<dyn Store>> {
    let url = idem_testkit::env_url("IDEM_TEST_MYSQL_URL")?;
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(&url)
        .await
        .expect("connect to IDEM_TEST_MYSQL_URL");
    drop_stale_tables(&pool).await;
    let store = MySqlStore::builder()
        .pool(pool)
        .table(table())
        .build()
        .expect("build");
    store.migrate().await.expect("migrate");
    Some(Arc::new(store))
}

/// Drops the tables that earlier runs of this suite left (a run cannot drop its own: its
/// cases end in any order).
async fn drop_stale_tables(pool: &sqlx::MySqlPool) {
    let stale: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(table_name AS CHAR) FROM information_schema.tables \
         WHERE table_schema = DATABASE() AND table_name LIKE 'idem\\_conf\\_%' \
         AND create_time < NOW() - INTERVAL 10 MINUTE",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    for t in stale {
        if t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP TABLE IF EXISTS `{t}`, `{t}_steps`"
            )))
            .execute(pool)
            .await;
        }
    }
}

idem_testkit::conformance_tests!(store());

/// The durable-steps cases on the same table (and its `_steps` table).
mod steps {
    use super::*;

    idem_testkit::step_conformance_tests!(store());
}

fn main() -> std::process::ExitCode {
    let code =
        idem_testkit::harness::run([cases(&[backends::MYSQL]), steps::cases(&[backends::MYSQL])]);
    drop_own_tables();
    code
}

/// Drops this run's tables once every case is done (stale ones of runs that were killed are
/// dropped by the next run, above).
fn drop_own_tables() {
    let Ok(url) = std::env::var("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(async {
        let Ok(pool) = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
        else {
            return;
        };
        let t = table();
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS `{t}`, `{t}_steps`"
        )))
        .execute(&pool)
        .await;
        pool.close().await;
    });
}
