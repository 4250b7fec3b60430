//! Upgrading from the first version's `MySqlStore` API: a builder given no database (what
//! rustc's hint for the old `MySqlStore::builder(pool)` leads to) says where the pool goes
//! now, and the deprecated `spawn_sweeper` still sweeps.
//!
//! The builder test needs no server. The sweeper test runs when `IDEM_TEST_MYSQL_URL` is set
//! (e.g. `mysql://root@127.0.0.1:3306/test`); it prints `skipped: ...` and passes otherwise
//! (fails under `CI`). It makes its own table and drops it.
#![cfg(feature = "mysql")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;

use std::error::Error as _;
use std::time::Duration;

use idem_core::{Claim, ClaimRequest, FencingToken, Store};
use idem_stores::MySqlStore;
use idem_testkit::{env_url, fresh_key};
use sqlx::mysql::MySqlPoolOptions;
use sqlx::AssertSqlSafe;

async fn a_builder_without_a_database_names_the_new_form() {
    let err = MySqlStore::builder().build().unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(".url(..) or .pool(..)"),
        "names both sources: {message}"
    );
    assert!(
        message.contains("`MySqlStore::builder().pool(pool)`"),
        "names the migration of the old form: {message}"
    );
    assert!(err.source().is_some(), "a typed source: {err:?}");
}

async fn other_sql_builders_without_a_database_do_not_mention_mysql() {
    #[cfg(feature = "sqlite")]
    {
        let err = idem_stores::SqliteStore::builder().build().unwrap_err();
        let message = err.to_string();
        assert!(message.contains(".url(..) or .pool(..)"), "{message}");
        assert!(!message.contains("MySqlStore"), "{message}");
    }
}

#[allow(deprecated)]
async fn deprecated_spawn_sweeper_still_purges_expired_rows() {
    let Some(url) = env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let pool = MySqlPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await
        .expect("connect to IDEM_TEST_MYSQL_URL");
    let table = format!("idem_shim_{}", FencingToken::random().0 % 1_000_000_000_000);
    let store = MySqlStore::builder()
        .pool(pool.clone())
        .table(&table)
        .lease_grace(Duration::from_millis(1))
        .build()
        .unwrap();
    store.migrate().await.unwrap();

    let count = || async {
        sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!("SELECT COUNT(*) FROM `{table}`")))
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    // Three completed records that expire at once, and one that lives.
    let short = Duration::from_millis(50);
    for ttl in [short, short, short, Duration::from_secs(600)] {
        let key = fresh_key();
        let req = ClaimRequest {
            key,
            fingerprint: None,
            token: FencingToken::random(),
            lease: Duration::from_secs(30),
        };
        assert_eq!(
            store.claim(&req).await.unwrap(),
            Claim::Acquired { taken_over: false }
        );
        store.complete(&key, req.token, b"v", ttl).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        count().await,
        4,
        "nothing purges the expired rows by itself"
    );

    let sweeper = store.spawn_sweeper(Duration::from_millis(20), 2);
    let mut left = count().await;
    for _ in 0..100 {
        if left == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = count().await;
    }
    drop(sweeper);
    let result = count().await;

    sqlx::query(AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS `{table}`, `{table}_steps`"
    )))
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(result, 1, "the sweeper removed the three expired rows only");
}

fn main() -> std::process::ExitCode {
    use backends::MYSQL;
    use idem_testkit::test_cases;
    idem_testkit::harness::run([
        test_cases!([MYSQL], current_thread;
            a_builder_without_a_database_names_the_new_form,
            other_sql_builders_without_a_database_do_not_mention_mysql),
        test_cases!([MYSQL], multi_thread(2); deprecated_spawn_sweeper_still_purges_expired_rows),
    ])
}
