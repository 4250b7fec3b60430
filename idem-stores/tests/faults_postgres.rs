//! The fault scenarios of issue 10 on PostgreSQL (`IDEM_TEST_POSTGRES_URL`), through a
//! loopback proxy: see `support/fault_scenarios.rs` for what each one does and asserts.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/fault_scenarios.rs"]
mod fault_scenarios;
#[path = "support/proxy.rs"]
mod proxy;
#[path = "support/sql_common.rs"]
mod sql_common;

use std::sync::Arc;
use std::time::Duration;

use fault_scenarios::Rig;
use idem_stores::PostgresStore;
use proxy::Proxy;

/// The one place that builds the store (its builder may change).
fn store(url: &str, table: &str) -> PostgresStore {
    PostgresStore::builder()
        .url(url)
        .table(table)
        .acquire_timeout(Duration::from_secs(2))
        .build()
        .expect("build the PostgreSQL store")
}

async fn rig() -> Option<Rig> {
    let url = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL")?;
    sql_common::pg_drop_stale_tables(&url).await;
    let table = sql_common::unique_table("faults");
    let proxy = Proxy::for_url(&url).await;
    let rival = store(&url, &table);
    rival.migrate().await.expect("create the table");
    let holder = store(&proxy.url(&url), &table);
    let admin = rival.clone();
    let teardown = async move {
        let sql = format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_steps\"");
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(admin.pool())
            .await;
    };
    Some(Rig::new(
        "postgres",
        proxy,
        Arc::new(holder),
        Arc::new(rival),
        teardown,
    ))
}

fault_scenarios!(rig);

fn main() -> std::process::ExitCode {
    idem_testkit::harness::run([cases(&[backends::POSTGRES])])
}
