//! The durable-steps crash matrix (`idem_testkit::steps_crash`) on every store: a three-step
//! call (a transactional ledger step on the SQL stores, a plain ledger step on Redis and the
//! memory store; a plain step calling a fake downstream service with its `step_key()`; an
//! at-most-once step) interrupted before and after each step's write, then retried by three
//! callers at once.
//!
//! - SIGKILL (PostgreSQL, MariaDB, SQLite, Redis): for each of the nine points in turn, the
//!   parent re-executes this test binary (`--exact steps_crash_child`, `IDEM_STEPCRASH_ROLE`
//!   set) as a child that runs the point's call and stops there; the parent kills it as soon
//!   as it printed its marker, and retries the nine calls once their lease passed.
//! - Cancellation (the same stores, and memory): in process, each call's future is dropped at
//!   its point.
//!
//! The downstream service is a table in the store's database (`k`, `seen`, `applied`, one
//! upsert per call), or two hashes under the test's Redis prefix, in memory for the memory
//! store. Each test prints its store's table (store × interrupt × point × outcome).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, dead_code)]
// Each store is a feature: with only some of them, some imports serve no case.
#![cfg_attr(
    not(all(
        feature = "memory",
        feature = "redis",
        feature = "postgres",
        feature = "mysql",
        feature = "sqlite"
    )),
    allow(unused_imports, unused_variables)
)]

#[path = "support/backends.rs"]
mod backends;
#[cfg(feature = "redis")]
#[path = "support/redis_keys.rs"]
mod redis_keys;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
#[path = "support/sql_common.rs"]
mod sql_common;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
#[path = "support/tx_common.rs"]
mod tx_common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use idem_core::{async_trait, Error, StoreError};
use idem_testkit::steps_crash::{self, CrashBackend, Downstream, Matrix, Stop};

const ROLE: &str = "IDEM_STEPCRASH_ROLE";

/// One store's matrix at a time (they share the machine's two cores).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

/// Starts this binary as the child of `store`, on run `run`, stopping at `point`.
fn spawn_child(
    store: &str,
    env: &[(&str, String)],
    run: &str,
    point: steps_crash::Point,
) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "steps_crash_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(ROLE, store)
        .env("IDEM_STEPCRASH_RUN", run)
        .env("IDEM_STEPCRASH_POINT", point.name())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child")
}

fn report(store: &str, m: &Matrix) {
    println!("\n{}", m.table(store));
}

// ---------------------------------------------------------------------------------------------
// SQL stores: a transactional ledger step, the downstream in a table of the same database.

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
mod sql {
    use super::*;
    use idem_testkit::transactional::TxHarness;
    use sqlx::AssertSqlSafe;

    fn db(e: sqlx::Error) -> StoreError {
        StoreError::backend("downstream table", e)
    }

    /// The SQL dialect's downstream: one upsert per call (seen + 1; applied set once when the
    /// row is inserted).
    pub struct SqlDown<P> {
        pub pool: P,
        pub table: String,
    }

    macro_rules! sql_down {
        ($pool:ty, $db:ty, $upsert:expr, $like:expr) => {
            #[async_trait]
            impl Downstream for SqlDown<$pool> {
                async fn call(&self, key: &str) -> Result<(), StoreError> {
                    let sql = format!($upsert, t = self.table);
                    sqlx::query(AssertSqlSafe(sql))
                        .bind(key)
                        .execute(&self.pool)
                        .await
                        .map_err(db)?;
                    Ok(())
                }
                async fn list(&self, prefix: &str) -> Result<Vec<(String, u64, u64)>, StoreError> {
                    let sql = format!($like, t = self.table);
                    let rows: Vec<(String, i64, i64)> = sqlx::query_as(AssertSqlSafe(sql))
                        .bind(format!("{prefix}%"))
                        .fetch_all(&self.pool)
                        .await
                        .map_err(db)?;
                    Ok(rows
                        .into_iter()
                        .map(|(k, s, a)| (k, s as u64, a as u64))
                        .collect())
                }
            }
        };
    }
    #[cfg(feature = "postgres")]
    sql_down!(
        sqlx::PgPool,
        sqlx::Postgres,
        "INSERT INTO \"{t}\" (k, seen, applied) VALUES ($1, 1, 1) \
         ON CONFLICT (k) DO UPDATE SET seen = \"{t}\".seen + 1",
        "SELECT k, seen, applied FROM \"{t}\" WHERE k LIKE $1"
    );
    #[cfg(feature = "mysql")]
    sql_down!(
        sqlx::MySqlPool,
        sqlx::MySql,
        "INSERT INTO `{t}` (k, seen, applied) VALUES (?, 1, 1) \
         ON DUPLICATE KEY UPDATE seen = seen + 1",
        "SELECT k, seen, applied FROM `{t}` WHERE k LIKE ?"
    );
    #[cfg(feature = "sqlite")]
    sql_down!(
        sqlx::SqlitePool,
        sqlx::Sqlite,
        "INSERT INTO \"{t}\" (k, seen, applied) VALUES (?, 1, 1) \
         ON CONFLICT (k) DO UPDATE SET seen = seen + 1",
        "SELECT k, seen, applied FROM \"{t}\" WHERE k LIKE ?"
    );

    /// A SQL store's harness (store + ledger table) and its downstream.
    pub struct SqlBackend<H, P> {
        pub h: H,
        pub down: SqlDown<P>,
        pub lease: Duration,
    }

    #[async_trait]
    impl<H: TxHarness, P: Send + Sync + 'static> CrashBackend for SqlBackend<H, P>
    where
        SqlDown<P>: Downstream,
    {
        type Store = H::Store;
        fn store(&self) -> &H::Store {
            self.h.store()
        }
        fn downstream(&self) -> &dyn Downstream {
            &self.down
        }
        fn lease(&self) -> Duration {
            self.lease
        }
        async fn ledger(&self, store: &Stop<H::Store>, call: &str) -> Result<String, Error> {
            steps_crash::ledger_in(&self.h, store, call).await
        }
        async fn ledger_rows(&self, call: &str) -> Result<Vec<String>, StoreError> {
            Ok(self.h.rows(call).await)
        }
    }

    /// The downstream table's DDL (`q` quotes an identifier).
    pub fn down_ddl(t: &str, q: char) -> String {
        format!(
            "CREATE TABLE {q}{t}{q} (k VARCHAR(255) PRIMARY KEY, seen BIGINT NOT NULL, \
             applied BIGINT NOT NULL)"
        )
    }
}

#[cfg(feature = "postgres")]
mod pg {
    use super::sql::*;
    use super::*;
    use crate::tx_common::pg::PgHarness;
    use idem_testkit::transactional::TxHarness;
    use sqlx::AssertSqlSafe;

    const LEASE: Duration = Duration::from_secs(1);

    pub async fn open(
        url: &str,
        table: &str,
        biz: &str,
        down: &str,
    ) -> SqlBackend<PgHarness, sqlx::PgPool> {
        let h = PgHarness::open(url, table, biz, 16).await;
        let pool = h.pool.clone();
        SqlBackend {
            h,
            down: SqlDown {
                pool,
                table: down.to_owned(),
            },
            lease: LEASE,
        }
    }

    pub async fn run() {
        let Some(url) = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL") else {
            return;
        };
        let _serial = SERIAL.lock().await;
        let h = PgHarness::new(&url, "stepcrash", 4).await;
        let (table, biz) = (h.table.clone(), h.biz.clone());
        let down = crate::sql_common::unique_table("stepcrash_down");
        sqlx::query(AssertSqlSafe(down_ddl(&down, '"')))
            .execute(&h.pool)
            .await
            .expect("create the downstream table");
        let b = Arc::new(open(&url, &table, &biz, &down).await);
        let env = [
            ("IDEM_STEPCRASH_URL", url.clone()),
            ("IDEM_STEPCRASH_TABLE", table.clone()),
            ("IDEM_STEPCRASH_BIZ", biz.clone()),
            ("IDEM_STEPCRASH_DOWN", down.clone()),
        ];
        let mut m = steps_crash::sigkill(Arc::clone(&b), |run, p| {
            spawn_child("postgres", &env, run, p)
        })
        .await;
        m.rows
            .extend(steps_crash::cancel(Arc::clone(&b)).await.rows);
        report("postgres", &m);
        for t in [format!("{table}_steps"), down] {
            sql_common::pg_drop_tables(&h.pool, &t).await;
        }
        h.cleanup().await;
        m.assert_passed("postgres");
    }
}

#[cfg(feature = "mysql")]
mod my {
    use super::sql::*;
    use super::*;
    use crate::tx_common::my::MyHarness;
    use idem_testkit::transactional::TxHarness;
    use sqlx::AssertSqlSafe;

    const LEASE: Duration = Duration::from_secs(1);

    pub async fn open(
        url: &str,
        table: &str,
        biz: &str,
        down: &str,
    ) -> SqlBackend<MyHarness, sqlx::MySqlPool> {
        let h = MyHarness::open(url, table, biz, 16).await;
        let pool = h.pool.clone();
        SqlBackend {
            h,
            down: SqlDown {
                pool,
                table: down.to_owned(),
            },
            lease: LEASE,
        }
    }

    pub async fn run() {
        let Some(url) = idem_testkit::env_url("IDEM_TEST_MYSQL_URL") else {
            return;
        };
        let _serial = SERIAL.lock().await;
        let h = MyHarness::new(&url, "stepcrash", 4).await;
        let (table, biz) = (h.table.clone(), h.biz.clone());
        let down = crate::sql_common::unique_table("stepcrash_down");
        sqlx::query(AssertSqlSafe(down_ddl(&down, '`')))
            .execute(&h.pool)
            .await
            .expect("create the downstream table");
        let b = Arc::new(open(&url, &table, &biz, &down).await);
        let env = [
            ("IDEM_STEPCRASH_URL", url.clone()),
            ("IDEM_STEPCRASH_TABLE", table.clone()),
            ("IDEM_STEPCRASH_BIZ", biz.clone()),
            ("IDEM_STEPCRASH_DOWN", down.clone()),
        ];
        let mut m =
            steps_crash::sigkill(Arc::clone(&b), |run, p| spawn_child("mysql", &env, run, p)).await;
        m.rows
            .extend(steps_crash::cancel(Arc::clone(&b)).await.rows);
        report("mariadb", &m);
        for t in [format!("{table}_steps"), down] {
            sql_common::mysql_drop_tables(&h.pool, &t).await;
        }
        h.cleanup().await;
        m.assert_passed("mariadb");
    }
}

#[cfg(feature = "sqlite")]
mod lite {
    use super::sql::*;
    use super::*;
    use crate::tx_common::lite::LiteHarness;
    use idem_testkit::transactional::TxHarness;
    use sqlx::AssertSqlSafe;

    /// SQLite's one write lock queues the nine calls and their retriers.
    const LEASE: Duration = Duration::from_secs(2);

    pub async fn open(
        path: &str,
        table: &str,
        biz: &str,
        down: &str,
    ) -> SqlBackend<LiteHarness, sqlx::SqlitePool> {
        let h = LiteHarness::open(std::path::Path::new(path), table, biz).await;
        let pool = h.store.pool().clone();
        SqlBackend {
            h,
            down: SqlDown {
                pool,
                table: down.to_owned(),
            },
            lease: LEASE,
        }
    }

    pub async fn run() {
        let _serial = SERIAL.lock().await;
        let path = crate::sql_common::sqlite_file("stepcrash");
        let h = LiteHarness::new(&path, "stepcrash").await;
        let (table, biz) = (h.table.clone(), h.biz.clone());
        let down = crate::sql_common::unique_table("stepcrash_down");
        sqlx::query(AssertSqlSafe(down_ddl(&down, '"')))
            .execute(h.store.pool())
            .await
            .expect("create the downstream table");
        let path = path.display().to_string();
        let b = Arc::new(open(&path, &table, &biz, &down).await);
        let env = [
            ("IDEM_STEPCRASH_URL", path.clone()),
            ("IDEM_STEPCRASH_TABLE", table.clone()),
            ("IDEM_STEPCRASH_BIZ", biz.clone()),
            ("IDEM_STEPCRASH_DOWN", down.clone()),
        ];
        let mut m =
            steps_crash::sigkill(Arc::clone(&b), |run, p| spawn_child("sqlite", &env, run, p))
                .await;
        m.rows
            .extend(steps_crash::cancel(Arc::clone(&b)).await.rows);
        report("sqlite", &m);
        h.cleanup().await;
        let _ = std::fs::remove_file(&path);
        m.assert_passed("sqlite");
    }
}

// ---------------------------------------------------------------------------------------------
// Redis: a plain ledger step; the downstream in two hashes under the test's prefix.

#[cfg(feature = "redis")]
mod rd {
    use super::*;
    use idem_stores::RedisStore;
    use redis::AsyncCommands;

    const LEASE: Duration = Duration::from_secs(1);

    fn db(e: redis::RedisError) -> StoreError {
        StoreError::backend("downstream hashes", e)
    }

    pub struct RedisDown {
        con: redis::aio::ConnectionManager,
        seen: String,
        applied: String,
    }

    #[async_trait]
    impl Downstream for RedisDown {
        async fn call(&self, key: &str) -> Result<(), StoreError> {
            let mut con = self.con.clone();
            let _: () = redis::pipe()
                .atomic()
                .hincr(&self.seen, key, 1)
                .ignore()
                .hset_nx(&self.applied, key, 1)
                .ignore()
                .query_async(&mut con)
                .await
                .map_err(db)?;
            Ok(())
        }
        async fn list(&self, prefix: &str) -> Result<Vec<(String, u64, u64)>, StoreError> {
            let mut con = self.con.clone();
            let seen: std::collections::HashMap<String, u64> =
                con.hgetall(&self.seen).await.map_err(db)?;
            let applied: std::collections::HashMap<String, u64> =
                con.hgetall(&self.applied).await.map_err(db)?;
            let mut out: Vec<(String, u64, u64)> = seen
                .into_iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, s)| {
                    let a = applied.get(&k).copied().unwrap_or(0);
                    (k, s, a)
                })
                .collect();
            out.sort();
            Ok(out)
        }
    }

    pub struct RedisBackend {
        store: RedisStore,
        down: RedisDown,
    }

    #[async_trait]
    impl CrashBackend for RedisBackend {
        type Store = RedisStore;
        fn store(&self) -> &RedisStore {
            &self.store
        }
        fn downstream(&self) -> &dyn Downstream {
            &self.down
        }
        fn lease(&self) -> Duration {
            LEASE
        }
        async fn ledger(&self, _store: &Stop<RedisStore>, call: &str) -> Result<String, Error> {
            steps_crash::ledger_downstream(&self.down, call).await
        }
        async fn ledger_rows(&self, call: &str) -> Result<Vec<String>, StoreError> {
            steps_crash::ledger_downstream_rows(&self.down, call).await
        }
    }

    pub async fn open(url: &str, prefix: &str) -> RedisBackend {
        let store = RedisStore::builder(url)
            .prefix(prefix)
            .build()
            .await
            .expect("the Redis store");
        let con = redis::Client::open(url)
            .expect("the Redis URL")
            .get_connection_manager()
            .await
            .expect("connect to Redis");
        RedisBackend {
            store,
            down: RedisDown {
                con,
                seen: format!("{prefix}down:seen"),
                applied: format!("{prefix}down:applied"),
            },
        }
    }

    pub async fn run() {
        let Some(url) = idem_testkit::env_url("IDEM_TEST_REDIS_URL") else {
            return;
        };
        let _serial = SERIAL.lock().await;
        let prefix = format!("idem-test:stepcrash:{}:", steps_crash::run_id());
        let b = Arc::new(open(&url, &prefix).await);
        let env = [
            ("IDEM_STEPCRASH_URL", url.clone()),
            ("IDEM_STEPCRASH_PREFIX", prefix.clone()),
        ];
        let mut m =
            steps_crash::sigkill(Arc::clone(&b), |run, p| spawn_child("redis", &env, run, p)).await;
        m.rows
            .extend(steps_crash::cancel(Arc::clone(&b)).await.rows);
        report("redis", &m);
        crate::redis_keys::delete_prefix(&url, &prefix).await;
        m.assert_passed("redis");
    }
}

// ---------------------------------------------------------------------------------------------
// Memory: cancellation only (a killed process takes its memory store with it).

#[cfg(feature = "memory")]
mod mem {
    use super::*;
    use idem_stores::MemoryStore;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct MemDown(Mutex<BTreeMap<String, (u64, u64)>>);

    #[async_trait]
    impl Downstream for MemDown {
        async fn call(&self, key: &str) -> Result<(), StoreError> {
            let mut m = self.0.lock().unwrap();
            let e = m.entry(key.to_owned()).or_insert((0, 1));
            e.0 += 1;
            Ok(())
        }
        async fn list(&self, prefix: &str) -> Result<Vec<(String, u64, u64)>, StoreError> {
            let m = self.0.lock().unwrap();
            Ok(m.iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, (s, a))| (k.clone(), *s, *a))
                .collect())
        }
    }

    pub struct MemBackend {
        store: MemoryStore,
        down: MemDown,
    }

    #[async_trait]
    impl CrashBackend for MemBackend {
        type Store = MemoryStore;
        fn store(&self) -> &MemoryStore {
            &self.store
        }
        fn downstream(&self) -> &dyn Downstream {
            &self.down
        }
        fn lease(&self) -> Duration {
            Duration::from_secs(1)
        }
        async fn ledger(&self, _store: &Stop<MemoryStore>, call: &str) -> Result<String, Error> {
            steps_crash::ledger_downstream(&self.down, call).await
        }
        async fn ledger_rows(&self, call: &str) -> Result<Vec<String>, StoreError> {
            steps_crash::ledger_downstream_rows(&self.down, call).await
        }
    }

    pub async fn run() {
        let b = Arc::new(MemBackend {
            store: MemoryStore::new(),
            down: MemDown::default(),
        });
        let m = steps_crash::cancel(b).await;
        report("memory", &m);
        m.assert_passed("memory");
    }
}

/// The child role: does nothing unless a parent started this process.
async fn steps_crash_child() {
    let Ok(store) = std::env::var(ROLE) else {
        return;
    };
    let run = var("IDEM_STEPCRASH_RUN");
    let point = steps_crash::Point::parse(&var("IDEM_STEPCRASH_POINT")).expect("a point");
    let url = var("IDEM_STEPCRASH_URL");
    match store.as_str() {
        #[cfg(feature = "postgres")]
        "postgres" => {
            let (t, b, d) = (
                var("IDEM_STEPCRASH_TABLE"),
                var("IDEM_STEPCRASH_BIZ"),
                var("IDEM_STEPCRASH_DOWN"),
            );
            steps_crash::child(Arc::new(pg::open(&url, &t, &b, &d).await), &run, point).await
        }
        #[cfg(feature = "mysql")]
        "mysql" => {
            let (t, b, d) = (
                var("IDEM_STEPCRASH_TABLE"),
                var("IDEM_STEPCRASH_BIZ"),
                var("IDEM_STEPCRASH_DOWN"),
            );
            steps_crash::child(Arc::new(my::open(&url, &t, &b, &d).await), &run, point).await
        }
        #[cfg(feature = "sqlite")]
        "sqlite" => {
            let (t, b, d) = (
                var("IDEM_STEPCRASH_TABLE"),
                var("IDEM_STEPCRASH_BIZ"),
                var("IDEM_STEPCRASH_DOWN"),
            );
            steps_crash::child(Arc::new(lite::open(&url, &t, &b, &d).await), &run, point).await
        }
        #[cfg(feature = "redis")]
        "redis" => {
            let prefix = var("IDEM_STEPCRASH_PREFIX");
            steps_crash::child(Arc::new(rd::open(&url, &prefix).await), &run, point).await
        }
        other => panic!("unknown store {other}"),
    }
}

#[cfg(feature = "postgres")]
async fn crash_matrix_postgres() {
    if std::env::var_os(ROLE).is_none() {
        pg::run().await
    }
}

#[cfg(feature = "mysql")]
async fn crash_matrix_mariadb() {
    if std::env::var_os(ROLE).is_none() {
        my::run().await
    }
}

#[cfg(feature = "sqlite")]
async fn crash_matrix_sqlite() {
    if std::env::var_os(ROLE).is_none() {
        lite::run().await
    }
}

#[cfg(feature = "redis")]
async fn crash_matrix_redis() {
    if std::env::var_os(ROLE).is_none() {
        rd::run().await
    }
}

#[cfg(feature = "memory")]
async fn cancel_matrix_memory() {
    if std::env::var_os(ROLE).is_none() {
        mem::run().await
    }
}

fn main() -> std::process::ExitCode {
    #[allow(unused_mut)] // no store feature: only the child and memory cases
    let mut cases = vec![idem_testkit::harness::child_cases(
        ROLE,
        idem_testkit::test_cases!([], multi_thread(2); steps_crash_child),
    )];
    #[cfg(feature = "postgres")]
    cases.push(
        idem_testkit::test_cases!([backends::POSTGRES], multi_thread(2); crash_matrix_postgres),
    );
    #[cfg(feature = "mysql")]
    cases.push(idem_testkit::test_cases!([backends::MYSQL], multi_thread(2); crash_matrix_mariadb));
    #[cfg(feature = "sqlite")]
    cases.push(idem_testkit::test_cases!([], multi_thread(2); crash_matrix_sqlite));
    #[cfg(feature = "redis")]
    cases.push(idem_testkit::test_cases!([backends::REDIS], multi_thread(2); crash_matrix_redis));
    #[cfg(feature = "memory")]
    cases.push(idem_testkit::test_cases!([], multi_thread(2); cancel_matrix_memory));
    idem_testkit::harness::run(cases)
}
