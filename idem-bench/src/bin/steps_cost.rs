//! `idem-bench-steps-sql`: the cost of one durable step write on the SQL stores, against a raw
//! `INSERT` of the same size on the same pool, measured **side by side, alternating** (one write
//! of each way per turn, the order flipped every turn), one task on a current-thread runtime.
//!
//! Per database (each whose feature is on) and value size it reports the median latency of:
//!
//! - `raw`: `INSERT INTO <raw> (k, name, occurrence, value) VALUES (...)`, autocommit, a new row
//!   each time (the same primary key shape as the steps table);
//! - `put_step`: `Store::put_step` of a new step of one claimed call (one statement: the
//!   fenced upsert);
//! - `tx raw`: `BEGIN; INSERT <business row>; INSERT <raw row>; COMMIT`;
//! - `tx step`: `BEGIN; INSERT <business row>; put_step_in; COMMIT` (a transactional step:
//!   its statement replaces the raw insert, nothing else is added);
//!
//! and the ratios `put_step / raw` and `tx step / tx raw`.
//!
//! ```text
//! cargo run --release -p idem-bench --features postgres,mysql,sqlite --bin idem-bench-steps-sql -- \
//!     [--rounds 21] [--ops 40]
//! ```
//!
//! Servers: `IDEM_TEST_POSTGRES_URL` / `IDEM_TEST_MYSQL_URL`, else the local defaults; SQLite
//! is a file in the temp directory. Tables of its own, dropped at the end.
// Without a SQL feature the program only says it measured nothing; its helpers are unused.
#![cfg_attr(
    not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code, unused_imports, unused_macros)
)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
use std::future::Future;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
use std::pin::Pin;
use std::time::{Duration, Instant};

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
use idem_core::{
    ClaimRequest, FencingToken, Key, StepId, StepRecord, StepStatus, Store, TransactionalStore,
};

const TTL: Duration = Duration::from_secs(600);
const SIZES: [usize; 2] = [100, 4096];

/// One way of writing, run `ops` times in a row; `n` is a fresh number per write.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
type Op<'a> = Box<dyn Fn(u64) -> Pin<Box<dyn Future<Output = ()> + 'a>> + 'a>;

/// The median of `xs`.
fn median(xs: &mut [Duration]) -> Duration {
    xs.sort();
    xs.get(xs.len() / 2).copied().unwrap_or_default()
}

/// Runs each way once per turn, `rounds × ops` turns, the order flipped every turn (so that
/// the samples of each way are taken side by side, under the same load): the median per-op
/// latency of each.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
async fn interleaved(rounds: usize, ops: u64, ways: &[&Op<'_>]) -> Vec<Duration> {
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); ways.len()];
    let mut n = 0u64;
    // Warm-up (prepared statements, pool connections).
    for way in ways {
        for _ in 0..5 {
            n += 1;
            way(n).await;
        }
    }
    for turn in 0..rounds as u64 * ops {
        let order: Vec<usize> = if turn % 2 == 0 {
            (0..ways.len()).collect()
        } else {
            (0..ways.len()).rev().collect()
        };
        for i in order {
            n += 1;
            let t = Instant::now();
            ways[i](n).await;
            samples[i].push(t.elapsed());
        }
    }
    samples.iter_mut().map(|s| median(s)).collect()
}

/// The primary key of a raw row: distinct per process and write.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
fn raw_key() -> Vec<u8> {
    let mut k = vec![0u8; 32];
    k[..4].copy_from_slice(&std::process::id().to_le_bytes());
    k
}

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
fn step(n: u64, value: &[u8]) -> StepRecord {
    StepRecord::new(
        StepId::new("bench", u32::try_from(n).unwrap_or(u32::MAX)),
        StepStatus::Done,
        value.to_vec(),
    )
}

/// A call claimed for the run: the key and its token.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
async fn claimed(store: &dyn Store) -> (Key, FencingToken) {
    let mut key = [0u8; 32];
    key[..4].copy_from_slice(&std::process::id().to_le_bytes());
    key[4..12].copy_from_slice(&FencingToken::random().0.to_le_bytes());
    let key = Key(key);
    let token = FencingToken::random();
    let req = ClaimRequest {
        key,
        fingerprint: None,
        token,
        lease: TTL,
    };
    store.claim(&req).await.expect("claim");
    (key, token)
}

/// One line of the report.
struct Line {
    db: &'static str,
    size: usize,
    raw: Duration,
    step: Duration,
    tx_raw: Duration,
    tx_step: Duration,
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn ratio(a: Duration, b: Duration) -> String {
    format!("{:.2}", a.as_secs_f64() / b.as_secs_f64().max(1e-9))
}

/// The four ways of writing on one database, as a macro over its dialect: `$raw_ddl` and
/// `$biz_ddl` create the raw and business tables, `$insert_raw` / `$insert_biz` write them.
macro_rules! measure {
    ($db:literal, $store:expr, $pool:expr, $raw:expr, $biz:expr,
     $raw_ddl:expr, $biz_ddl:expr, $insert_raw:expr, $insert_biz:expr, $rounds:expr, $ops:expr) => {{
        use sqlx::AssertSqlSafe;
        let store = $store;
        let pool = $pool;
        for ddl in [$raw_ddl, $biz_ddl] {
            sqlx::query(AssertSqlSafe(ddl))
                .execute(&pool)
                .await
                .expect("create");
        }
        let mut lines = Vec::new();
        for size in SIZES {
            sqlx::query(AssertSqlSafe(format!("DELETE FROM {}", $raw)))
                .execute(&pool)
                .await
                .expect("empty the raw table");
            let (key, token) = claimed(&store).await;
            let value = vec![7u8; size];
            let insert_raw: String = $insert_raw;
            let insert_biz: String = $insert_biz;
            let raw_op: Op<'_> = Box::new(|n| {
                let (pool, sql, value) = (&pool, insert_raw.clone(), &value);
                Box::pin(async move {
                    sqlx::query(AssertSqlSafe(sql))
                        .bind(raw_key())
                        .bind(n as i64)
                        .bind(&value[..])
                        .execute(pool)
                        .await
                        .expect("raw insert");
                })
            });
            let step_op: Op<'_> = Box::new(|n| {
                let (store, value) = (&store, &value);
                Box::pin(async move {
                    store
                        .put_step(&key, token, &step(n, value), TTL)
                        .await
                        .expect("put step");
                })
            });
            let tx_raw: Op<'_> = Box::new(|n| {
                let (pool, raw_sql, biz_sql, value) =
                    (&pool, insert_raw.clone(), insert_biz.clone(), &value);
                Box::pin(async move {
                    let mut tx = pool.begin().await.expect("begin");
                    sqlx::query(AssertSqlSafe(biz_sql))
                        .bind(n as i64)
                        .execute(&mut *tx)
                        .await
                        .expect("business row");
                    sqlx::query(AssertSqlSafe(raw_sql))
                        .bind(raw_key())
                        .bind(n as i64 + (1 << 40))
                        .bind(&value[..])
                        .execute(&mut *tx)
                        .await
                        .expect("raw insert");
                    tx.commit().await.expect("commit");
                })
            });
            let tx_step: Op<'_> = Box::new(|n| {
                let (store, biz_sql, value) = (&store, insert_biz.clone(), &value);
                Box::pin(async move {
                    let mut tx = store.begin().await.expect("begin");
                    sqlx::query(AssertSqlSafe(biz_sql))
                        .bind(n as i64)
                        .execute(&mut *tx)
                        .await
                        .expect("business row");
                    store
                        .put_step_in(&mut tx, &key, token, &step(n + 1_000_000_000, value), TTL)
                        .await
                        .expect("put step in");
                    store.commit(tx).await.expect("commit");
                })
            });
            let m = interleaved($rounds, $ops, &[&raw_op, &step_op, &tx_raw, &tx_step]).await;
            lines.push(Line {
                db: $db,
                size,
                raw: m[0],
                step: m[1],
                tx_raw: m[2],
                tx_step: m[3],
            });
        }
        for t in [
            store.table().to_owned(),
            format!("{}_steps", store.table()),
            $raw,
            $biz,
        ] {
            let _ = sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {t}")))
                .execute(&pool)
                .await;
        }
        lines
    }};
}

#[cfg(feature = "postgres")]
async fn postgres(rounds: usize, ops: u64) -> Vec<Line> {
    let pid = std::process::id();
    let store = idem_stores::PostgresStore::builder()
        .url(idem_bench::postgres_url())
        .table(format!("idem_bench_steps_{pid}"))
        .max_connections(4)
        .connect()
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    let pool = store.pool().clone();
    let (raw, biz) = (
        format!("idem_bench_steps_raw_{pid}"),
        format!("idem_bench_steps_biz_{pid}"),
    );
    measure!(
        "postgres",
        store,
        pool,
        raw.clone(),
        biz.clone(),
        format!(
            "CREATE TABLE {raw} (key BYTEA NOT NULL, name TEXT NOT NULL DEFAULT 'bench', \
             occurrence BIGINT NOT NULL, value BYTEA NOT NULL, PRIMARY KEY (key, name, occurrence))"
        ),
        format!("CREATE TABLE {biz} (id BIGSERIAL PRIMARY KEY, n BIGINT NOT NULL)"),
        format!("INSERT INTO {raw} (key, occurrence, value) VALUES ($1, $2, $3)"),
        format!("INSERT INTO {biz} (n) VALUES ($1)"),
        rounds,
        ops
    )
}

#[cfg(feature = "mysql")]
async fn mysql(rounds: usize, ops: u64) -> Vec<Line> {
    let pid = std::process::id();
    let store = idem_stores::MySqlStore::builder()
        .url(idem_bench::mysql_url())
        .table(format!("idem_bench_steps_{pid}"))
        .max_connections(4)
        .connect()
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    let pool = store.pool().clone();
    let (raw, biz) = (
        format!("idem_bench_steps_raw_{pid}"),
        format!("idem_bench_steps_biz_{pid}"),
    );
    measure!(
        "mysql",
        store,
        pool,
        raw.clone(),
        biz.clone(),
        format!(
            "CREATE TABLE {raw} (k BINARY(32) NOT NULL, name VARBINARY(512) NOT NULL DEFAULT 'bench', \
             occurrence BIGINT NOT NULL, value MEDIUMBLOB NOT NULL, \
             PRIMARY KEY (k, name, occurrence)) ENGINE=InnoDB"
        ),
        format!(
            "CREATE TABLE {biz} (id BIGINT AUTO_INCREMENT PRIMARY KEY, n BIGINT NOT NULL) \
             ENGINE=InnoDB"
        ),
        format!("INSERT INTO {raw} (k, occurrence, value) VALUES (?, ?, ?)"),
        format!("INSERT INTO {biz} (n) VALUES (?)"),
        rounds,
        ops
    )
}

#[cfg(feature = "sqlite")]
async fn sqlite(rounds: usize, ops: u64) -> Vec<Line> {
    let pid = std::process::id();
    let file = std::env::temp_dir().join(format!("idem-bench-steps-{pid}.db"));
    let store = idem_stores::SqliteStore::builder()
        .url(format!("sqlite://{}", file.display()))
        .table("idem_bench_steps")
        .connect()
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    let pool = store.pool().clone();
    let lines = measure!(
        "sqlite",
        store,
        pool,
        "idem_bench_steps_raw".to_owned(),
        "idem_bench_steps_biz".to_owned(),
        "CREATE TABLE idem_bench_steps_raw (key BLOB NOT NULL, name TEXT NOT NULL DEFAULT 'bench', \
         occurrence INTEGER NOT NULL, value BLOB NOT NULL, PRIMARY KEY (key, name, occurrence)) \
         WITHOUT ROWID"
            .to_owned(),
        "CREATE TABLE idem_bench_steps_biz (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)".to_owned(),
        "INSERT INTO idem_bench_steps_raw (key, occurrence, value) VALUES (?1, ?2, ?3)".to_owned(),
        "INSERT INTO idem_bench_steps_biz (n) VALUES (?1)".to_owned(),
        rounds,
        ops
    );
    for suffix in ["", "-wal", "-shm"] {
        let mut name = file.clone().into_os_string();
        name.push(suffix);
        let _ = std::fs::remove_file(name);
    }
    lines
}

fn main() {
    let mut rounds = 21usize;
    let mut ops = 40u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().and_then(|v| v.parse::<u64>().ok());
        match (a.as_str(), v) {
            ("--rounds", Some(v)) => rounds = usize::try_from(v).unwrap_or(21),
            ("--ops", Some(v)) => ops = v,
            _ => {
                eprintln!("usage: idem-bench-steps-sql [--rounds N] [--ops N]");
                std::process::exit(2);
            }
        }
    }
    let rt = idem_bench::current_thread();
    #[allow(unused_mut)]
    let mut lines: Vec<Line> = Vec::new();
    #[cfg(feature = "postgres")]
    lines.extend(rt.block_on(postgres(rounds, ops)));
    #[cfg(feature = "mysql")]
    lines.extend(rt.block_on(mysql(rounds, ops)));
    #[cfg(feature = "sqlite")]
    lines.extend(rt.block_on(sqlite(rounds, ops)));
    let _ = (&rt, rounds, ops);
    println!("| database | value | raw INSERT ms | put_step ms | ratio | tx + raw INSERT ms | tx + put_step_in ms | ratio |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for l in &lines {
        println!(
            "| {} | {} B | {} | {} | {} | {} | {} | {} |",
            l.db,
            l.size,
            ms(l.raw),
            ms(l.step),
            ratio(l.step, l.raw),
            ms(l.tx_raw),
            ms(l.tx_step),
            ratio(l.tx_step, l.tx_raw)
        );
    }
}
