//! Claims written before stores kept their start and renewals still read, with those shown as
//! unknown, on every store that persists records: a table of the first SQL layout (upgraded by
//! `migrate()`, which adds the two columns) and a Redis record that ends with its fingerprint.
//! The old claim can still be renewed (its lease moves; its renewals stay unknown) and
//! completed; a new claim beside it has all three.
//!
//! Backend stores need `IDEM_TEST_REDIS_URL`, `IDEM_TEST_POSTGRES_URL`,
//! `IDEM_TEST_MYSQL_URL` (skipped without them, failing without them when `CI` is set).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// Built with one store feature (`cargo hack --each-feature`), the other stores' helpers sit unused.
#![cfg_attr(
    not(all(
        feature = "redis",
        feature = "postgres",
        feature = "mysql",
        feature = "sqlite"
    )),
    allow(dead_code, unused_imports)
)]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/sql_common.rs"]
#[allow(unused)]
mod sql_common;

use std::time::Duration;

use idem_core::{Claim, ClaimTimes, FencingToken, Key, RecordState, Store};
use idem_testkit::{claim_request, fresh_key};

/// The times `get` reports for the claim of `key` under `token`.
async fn times(store: &dyn Store, key: &Key, token: FencingToken) -> ClaimTimes {
    match store.get(key).await.unwrap() {
        Some(RecordState::InProgress {
            token: t, times, ..
        }) if t == token => times,
        other => panic!("expected in progress under {token:?}, got {other:?}"),
    }
}

/// `key` holds a claim under `token` written in the old layout, with a lease of about 60 s.
async fn old_claim_still_works(store: &dyn Store, key: Key, token: FencingToken) {
    let old = times(store, &key, token).await;
    assert_eq!((old.age, old.renewals), (None, None), "{old:?}");
    let left = old.lease_left.expect("the lease left is known");
    assert!(
        left > Duration::from_secs(30) && left <= Duration::from_secs(60),
        "{old:?}"
    );

    store
        .renew(&key, token, Duration::from_secs(120))
        .await
        .unwrap();
    let renewed = times(store, &key, token).await;
    assert!(
        renewed.lease_left.unwrap() > Duration::from_secs(100),
        "{renewed:?}"
    );
    assert_eq!((renewed.age, renewed.renewals), (None, None), "{renewed:?}");

    // A duplicate still sees the old claim as live.
    let (dup, _) = claim_request(key, Duration::from_secs(60));
    assert!(matches!(
        store.claim(&dup).await.unwrap(),
        Claim::InProgress { .. }
    ));

    store
        .complete(&key, token, b"done", Duration::from_secs(60))
        .await
        .unwrap();
    match store.get(&key).await.unwrap() {
        Some(RecordState::Completed(rec)) => assert_eq!(&rec.value[..], b"done"),
        other => panic!("expected completed, got {other:?}"),
    }
    store.remove(&key).await.unwrap();

    // A new claim beside it keeps all three.
    let fresh = fresh_key();
    let (req, new_token) = claim_request(fresh, Duration::from_secs(60));
    assert!(matches!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { .. }
    ));
    store
        .renew(&fresh, new_token, Duration::from_secs(60))
        .await
        .unwrap();
    let new = times(store, &fresh, new_token).await;
    assert_eq!(new.renewals, Some(1), "{new:?}");
    assert!(new.age.is_some() && new.lease_left.is_some(), "{new:?}");
    store.remove(&fresh).await.unwrap();
}

const TOKEN: FencingToken = FencingToken(0x1234_5678_9abc);

#[cfg(feature = "sqlite")]
async fn sqlite_table_of_the_first_layout() {
    use sqlx::AssertSqlSafe;
    let dir = std::env::temp_dir().join(format!("idem-upgrade-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("old.db");
    let _ = std::fs::remove_file(&path);
    let store = idem_stores::SqliteStore::builder()
        .url(format!("sqlite://{}", path.display()))
        .table("idem_records")
        .connect()
        .await
        .unwrap();
    // The first layout, and a claim written by a store of that version.
    sqlx::query(
        "CREATE TABLE idem_records (
            key BLOB PRIMARY KEY NOT NULL CHECK (length(key) = 32),
            state TEXT NOT NULL CHECK (state IN ('in_progress', 'completed')),
            token INTEGER NOT NULL,
            attempt INTEGER NOT NULL DEFAULT 1,
            fingerprint BLOB,
            value BLOB,
            lease_until INTEGER,
            expires_at INTEGER NOT NULL
        )",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let key = fresh_key();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    sqlx::query(AssertSqlSafe(
        "INSERT INTO idem_records (key, state, token, attempt, fingerprint, value, lease_until, \
         expires_at) VALUES (?1, 'in_progress', ?2, 1, NULL, NULL, ?3, ?4)"
            .to_owned(),
    ))
    .bind(&key.0[..])
    .bind(TOKEN.as_i64())
    .bind(now + 60_000)
    .bind(now + 120_000)
    .execute(store.pool())
    .await
    .unwrap();
    store.migrate().await.unwrap();
    store.migrate().await.unwrap(); // again: nothing left to add
    old_claim_still_works(&store, key, TOKEN).await;
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(feature = "postgres")]
async fn postgres_table_of_the_first_layout() {
    use sqlx::AssertSqlSafe;
    let Some(url) = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL") else {
        return;
    };
    let table = sql_common::unique_table("upgrade");
    let store = idem_stores::PostgresStore::builder()
        .url(url)
        .table(&table)
        .connect()
        .await
        .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE \"{table}\" (
            key BYTEA PRIMARY KEY CHECK (octet_length(key) = 32),
            state TEXT NOT NULL CHECK (state IN ('in_progress', 'completed')),
            token BIGINT NOT NULL,
            attempt INTEGER NOT NULL DEFAULT 1,
            fingerprint BYTEA,
            value BYTEA,
            lease_until TIMESTAMPTZ,
            expires_at TIMESTAMPTZ NOT NULL
        )"
    )))
    .execute(store.pool())
    .await
    .unwrap();
    let key = fresh_key();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO \"{table}\" (key, state, token, attempt, fingerprint, value, lease_until, \
         expires_at) VALUES ($1, 'in_progress', $2, 1, NULL, NULL, now() + interval '60 s', \
         now() + interval '120 s')"
    )))
    .bind(&key.0[..])
    .bind(TOKEN.as_i64())
    .execute(store.pool())
    .await
    .unwrap();
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    old_claim_still_works(&store, key, TOKEN).await;
    sql_common::pg_drop_tables(store.pool(), &table).await;
}

#[cfg(feature = "mysql")]
async fn mysql_table_of_the_first_layout() {
    use sqlx::AssertSqlSafe;
    let Some(url) = idem_testkit::env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let table = sql_common::unique_table("upgrade");
    let store = idem_stores::MySqlStore::builder()
        .url(url)
        .table(&table)
        .connect()
        .await
        .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE `{table}` ( \
           k BINARY(32) NOT NULL, \
           state ENUM('in_progress','completed') NOT NULL, \
           token BIGINT NOT NULL, \
           live_until BIGINT NOT NULL, \
           expires_at BIGINT NOT NULL, \
           fingerprint BINARY(32) NULL, \
           value MEDIUMBLOB NULL, \
           PRIMARY KEY (k), \
           KEY idem_expires_at (expires_at) \
         ) ENGINE=InnoDB"
    )))
    .execute(store.pool())
    .await
    .unwrap();
    let key = fresh_key();
    let now = "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000)";
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO `{table}` (k, state, token, live_until, expires_at, fingerprint, value) \
         VALUES (?, 'in_progress', ?, {now} + 60000, {now} + 120000, NULL, NULL)"
    )))
    .bind(&key.0[..])
    .bind(TOKEN.as_i64())
    .execute(store.pool())
    .await
    .unwrap();
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    old_claim_still_works(&store, key, TOKEN).await;
    sql_common::mysql_drop_tables(store.pool(), &table).await;
}

/// A v2 in-progress record as stores wrote it before they kept the claim's start and
/// renewals: header, token, grace (f64 ms), no fingerprint, and nothing after it.
#[cfg(feature = "redis")]
async fn redis_record_without_start_and_renewals() {
    use redis::AsyncCommands;
    let Some(url) = idem_testkit::env_url("IDEM_TEST_REDIS_URL") else {
        return;
    };
    let prefix = format!("idem-upgrade-{}-{}:", std::process::id(), fresh_key().0[0]);
    let store = idem_stores::RedisStore::builder(url.clone())
        .prefix(prefix)
        .build()
        .await
        .unwrap();
    let key = fresh_key();
    let grace = 60_000u64;
    let mut old = Vec::new();
    old.extend_from_slice(b"i2p");
    old.extend_from_slice(&TOKEN.0.to_be_bytes());
    old.extend_from_slice(&(grace as f64).to_be_bytes());
    old.push(0);
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = conn
        .pset_ex(store.redis_key(&key), old, 60_000 + grace)
        .await
        .unwrap();
    old_claim_still_works(&store, key, TOKEN).await;
}

// Each store's cases only with its feature: pushed one by one.
#[allow(clippy::vec_init_then_push)]
fn main() -> std::process::ExitCode {
    #[allow(unused_mut)]
    let mut cases: Vec<Vec<idem_testkit::harness::Case>> = Vec::new();
    #[cfg(feature = "sqlite")]
    cases.push(idem_testkit::test_cases!([], current_thread; sqlite_table_of_the_first_layout));
    #[cfg(feature = "postgres")]
    cases.push(idem_testkit::test_cases!(
        [backends::POSTGRES], current_thread; postgres_table_of_the_first_layout));
    #[cfg(feature = "mysql")]
    cases.push(idem_testkit::test_cases!(
        [backends::MYSQL], current_thread; mysql_table_of_the_first_layout));
    #[cfg(feature = "redis")]
    cases.push(idem_testkit::test_cases!(
        [backends::REDIS], current_thread; redis_record_without_start_and_renewals));
    idem_testkit::harness::run(cases)
}
