//! SQL groups (`postgres`, and `mysql` / `sqlite` when their features are on): a raw
//! `INSERT ... ON CONFLICT DO NOTHING` (MySQL: `ON DUPLICATE KEY UPDATE k = k`) and a raw
//! `SELECT` by primary key on the store's own pool, against idem fresh call and replay.
//!
//! Servers: `IDEM_TEST_POSTGRES_URL` / `IDEM_TEST_MYSQL_URL`, else the local defaults; SQLite
//! is a file in the temp directory. The benches use their own tables (`idem_bench_raw`,
//! `idem_bench_records`), created at the start and dropped at the end.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use idem_core::{Call, Error, Store};
use tokio::runtime::Runtime;

const TTL: Duration = Duration::from_secs(60);
const REPLAY_N: u64 = 42;
const RAW_TABLE: &str = "idem_bench_raw";
const IDEM_TABLE: &str = "idem_bench_records";

static NEXT: AtomicU64 = AtomicU64::new(1_000_000);

fn next() -> u64 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Distinct per process, so that two runs never meet in a table.
fn raw_key(n: u64) -> Vec<u8> {
    let mut k = vec![0u8; 32];
    k[..8].copy_from_slice(&n.to_le_bytes());
    k[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    k
}

/// A value the size of idem's record of a `u64`.
const VALUE: &[u8] = b"idem\x01\x0e\x00msgpack;v0;u64\xcf\x00\x00\x00\x00\x00\x00\x00\x54";

async fn work(n: u64) -> Result<u64, Error> {
    Ok(n.wrapping_mul(2))
}

async fn idem_call(store: &dyn Store, n: u64) -> Result<u64, Error> {
    Call::new("idem_bench::sql")
        .key((std::process::id(), n))
        .fingerprint((&n,))
        .ttl(TTL)
        .run(store, work(n))
        .await
}

fn idem_benches(g: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, store: &dyn Store) {
    g.bench_function("idem_fresh", |b| {
        b.to_async(rt)
            .iter(|| async { idem_call(store, next()).await.unwrap() })
    });
    rt.block_on(idem_call(store, REPLAY_N)).unwrap();
    g.bench_function("idem_replay", |b| {
        b.to_async(rt)
            .iter(|| async { idem_call(store, black_box(REPLAY_N)).await.unwrap() })
    });
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use idem_stores::PostgresStore;
    use sqlx::AssertSqlSafe;

    async fn setup() -> Result<PostgresStore, Box<dyn std::error::Error>> {
        let store = PostgresStore::builder()
            .url(idem_bench::postgres_url())
            .table(IDEM_TABLE)
            .acquire_timeout(Duration::from_secs(3))
            .connect()
            .await?;
        store.migrate().await?;
        let pool = store.pool();
        sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {RAW_TABLE}")))
            .execute(pool)
            .await?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {RAW_TABLE} (key BYTEA PRIMARY KEY, value BYTEA NOT NULL, \
             expires_at TIMESTAMPTZ NOT NULL)"
        )))
        .execute(pool)
        .await?;
        Ok(store)
    }

    pub fn group(c: &mut Criterion) {
        let rt = idem_bench::multi_thread();
        let store = match rt.block_on(setup()) {
            Ok(s) => s,
            Err(e) => {
                println!("skipped: postgres is not reachable: {e}");
                return;
            }
        };
        let pool = store.pool().clone();
        let insert = format!(
            "INSERT INTO {RAW_TABLE} (key, value, expires_at) \
             VALUES ($1, $2, now() + interval '60 seconds') ON CONFLICT DO NOTHING"
        );
        let select = format!("SELECT value FROM {RAW_TABLE} WHERE key = $1");
        let mut g = c.benchmark_group("postgres");
        g.bench_function("raw_insert_on_conflict", |b| {
            b.to_async(&rt).iter(|| async {
                sqlx::query(AssertSqlSafe(insert.as_str()))
                    .bind(raw_key(next()))
                    .bind(VALUE)
                    .execute(&pool)
                    .await
                    .unwrap()
            })
        });
        rt.block_on(
            sqlx::query(AssertSqlSafe(insert.as_str()))
                .bind(raw_key(REPLAY_N))
                .bind(VALUE)
                .execute(&pool),
        )
        .unwrap();
        g.bench_function("raw_select", |b| {
            b.to_async(&rt).iter(|| async {
                sqlx::query(AssertSqlSafe(select.as_str()))
                    .bind(raw_key(REPLAY_N))
                    .fetch_optional(&pool)
                    .await
                    .unwrap()
            })
        });
        idem_benches(&mut g, &rt, &store);
        g.finish();
        rt.block_on(async {
            // `migrate()` made the store's steps table beside its records table.
            for t in [RAW_TABLE, IDEM_TABLE, &format!("{IDEM_TABLE}_steps")] {
                let drop = format!("DROP TABLE IF EXISTS {t}");
                let _ = sqlx::query(AssertSqlSafe(drop)).execute(&pool).await;
            }
        });
    }
}

#[cfg(feature = "mysql")]
mod mysql {
    use super::*;
    use idem_stores::MySqlStore;
    use sqlx::AssertSqlSafe;

    async fn setup() -> Result<MySqlStore, Box<dyn std::error::Error>> {
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(3))
            .connect(&idem_bench::mysql_url())
            .await?;
        let store = MySqlStore::builder().pool(pool).table(IDEM_TABLE).build()?;
        store.migrate().await?;
        let pool = store.pool();
        sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {RAW_TABLE}")))
            .execute(pool)
            .await?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {RAW_TABLE} (k BINARY(32) NOT NULL PRIMARY KEY, \
             value MEDIUMBLOB NOT NULL, expires_at BIGINT NOT NULL) ENGINE=InnoDB"
        )))
        .execute(pool)
        .await?;
        Ok(store)
    }

    pub fn group(c: &mut Criterion) {
        let rt = idem_bench::multi_thread();
        let store = match rt.block_on(setup()) {
            Ok(s) => s,
            Err(e) => {
                println!("skipped: mysql is not reachable: {e}");
                return;
            }
        };
        let pool = store.pool().clone();
        let insert = format!(
            "INSERT INTO {RAW_TABLE} (k, value, expires_at) VALUES (?, ?, ?) \
             ON DUPLICATE KEY UPDATE k = k"
        );
        let select = format!("SELECT value FROM {RAW_TABLE} WHERE k = ?");
        let mut g = c.benchmark_group("mysql");
        g.bench_function("raw_insert_on_conflict", |b| {
            b.to_async(&rt).iter(|| async {
                sqlx::query(AssertSqlSafe(insert.as_str()))
                    .bind(raw_key(next()))
                    .bind(VALUE)
                    .bind(0i64)
                    .execute(&pool)
                    .await
                    .unwrap()
            })
        });
        rt.block_on(
            sqlx::query(AssertSqlSafe(insert.as_str()))
                .bind(raw_key(REPLAY_N))
                .bind(VALUE)
                .bind(0i64)
                .execute(&pool),
        )
        .unwrap();
        g.bench_function("raw_select", |b| {
            b.to_async(&rt).iter(|| async {
                sqlx::query(AssertSqlSafe(select.as_str()))
                    .bind(raw_key(REPLAY_N))
                    .fetch_optional(&pool)
                    .await
                    .unwrap()
            })
        });
        idem_benches(&mut g, &rt, &store);
        g.finish();
        rt.block_on(async {
            // `migrate()` made the store's steps table beside its records table.
            for t in [RAW_TABLE, IDEM_TABLE, &format!("{IDEM_TABLE}_steps")] {
                let drop = format!("DROP TABLE IF EXISTS {t}");
                let _ = sqlx::query(AssertSqlSafe(drop)).execute(&pool).await;
            }
        });
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use idem_stores::SqliteStore;
    use sqlx::AssertSqlSafe;

    fn path() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("idem-bench-{}.db", std::process::id()))
    }

    async fn setup() -> Result<SqliteStore, Box<dyn std::error::Error>> {
        let url = format!("sqlite://{}", path().display());
        let store = SqliteStore::builder()
            .url(url)
            .table(IDEM_TABLE)
            .connect()
            .await?;
        store.migrate().await?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {RAW_TABLE} (key BLOB PRIMARY KEY NOT NULL, value BLOB NOT NULL, \
             expires_at INTEGER NOT NULL)"
        )))
        .execute(store.pool())
        .await?;
        Ok(store)
    }

    pub fn group(c: &mut Criterion) {
        let rt = idem_bench::multi_thread();
        let store = match rt.block_on(setup()) {
            Ok(s) => s,
            Err(e) => {
                println!("skipped: sqlite: {e}");
                return;
            }
        };
        let pool = store.pool().clone();
        let insert = format!(
            "INSERT INTO {RAW_TABLE} (key, value, expires_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT DO NOTHING"
        );
        let select = format!("SELECT value FROM {RAW_TABLE} WHERE key = ?1");
        let mut g = c.benchmark_group("sqlite");
        g.bench_function("raw_insert_on_conflict", |b| {
            b.to_async(&rt).iter(|| async {
                sqlx::query(AssertSqlSafe(insert.as_str()))
                    .bind(raw_key(next()))
                    .bind(VALUE)
                    .bind(0i64)
                    .execute(&pool)
                    .await
                    .unwrap()
            })
        });
        rt.block_on(
            sqlx::query(AssertSqlSafe(insert.as_str()))
                .bind(raw_key(REPLAY_N))
                .bind(VALUE)
                .bind(0i64)
                .execute(&pool),
        )
        .unwrap();
        g.bench_function("raw_select", |b| {
            b.to_async(&rt).iter(|| async {
                sqlx::query(AssertSqlSafe(select.as_str()))
                    .bind(raw_key(REPLAY_N))
                    .fetch_optional(&pool)
                    .await
                    .unwrap()
            })
        });
        idem_benches(&mut g, &rt, &store);
        g.finish();
        rt.block_on(pool.close());
        drop(store);
        let p = path();
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", p.display()));
        }
    }
}

fn sql_groups(c: &mut Criterion) {
    #[cfg(feature = "postgres")]
    postgres::group(c);
    #[cfg(feature = "mysql")]
    mysql::group(c);
    #[cfg(feature = "sqlite")]
    sqlite::group(c);
    let _ = c;
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = sql_groups
}
criterion_main!(benches);
