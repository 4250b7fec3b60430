//! SqliteStore beyond the conformance suite: a file shared by OS processes, reopening a file,
//! separate in-memory databases, hostile keys at the table level, the sweep, polling waiters.
//! Needs no server.
#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "support/sql_common.rs"]
mod sql_common;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::{idempotent, Call, Claim, Error, Key, Store};
use idem_stores::SqliteStore;
use sqlx::sqlite::SqlitePool;
use sqlx::{AssertSqlSafe, Row};

const ROLE: &str = "IDEM_SQLITE_TEST_ROLE";
const FILE_VAR: &str = "IDEM_SQLITE_TEST_FILE";
const TABLE_VAR: &str = "IDEM_SQLITE_TEST_TABLE";

fn file_url(path: &std::path::Path) -> String {
    format!("sqlite://{}", path.display())
}

async fn open(url: &str, table: &str) -> SqliteStore {
    let store = SqliteStore::builder()
        .url(url)
        .table(table)
        .connect()
        .await
        .expect("open");
    store.migrate().await.expect("migrate");
    store
}

async fn exec(pool: &SqlitePool, sql: String) {
    sqlx::query(AssertSqlSafe(sql))
        .execute(pool)
        .await
        .expect("statement");
}

async fn snapshot(pool: &SqlitePool, table: &str) -> HashMap<Vec<u8>, (String, Option<Vec<u8>>)> {
    sqlx::query(AssertSqlSafe(format!(
        "SELECT key, state, value FROM \"{table}\""
    )))
    .fetch_all(pool)
    .await
    .expect("snapshot")
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2))))
    .collect()
}

use idem_testkit::{claim_request as claim_req, completed};

// ---------------------------------------------------------------------------------------------
// Several OS processes on one database file.

const PROCESSES: usize = 4;
const TASKS: usize = 50;
const KEYS: usize = 200;
const KEYS_PER_TASK: usize = 40;

#[derive(Debug)]
#[allow(dead_code)] // read through Debug when a call fails
enum WorkError {
    Idem(Error),
    Db(String),
}

impl From<Error> for WorkError {
    fn from(e: Error) -> Self {
        WorkError::Idem(e)
    }
}

struct Worker {
    store: SqliteStore,
    side_table: String,
    task: usize,
    executed: Arc<AtomicUsize>,
}

impl Worker {
    #[idempotent(key = key.clone(), ttl = "1h", lease = "5s", wait_timeout = "60s", store = self.store)]
    async fn work(&self, key: String) -> Result<String, WorkError> {
        let value = format!("{key}:{}:{}", std::process::id(), self.task);
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{}\" (key, value) VALUES (?1, ?2)",
            self.side_table
        )))
        .bind(&key)
        .bind(&value)
        .execute(self.store.pool())
        .await
        .map_err(|e| WorkError::Db(e.to_string()))?;
        self.executed.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(value)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_process_exactly_once_on_a_file() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    let path = sql_common::sqlite_file("xproc");
    let _ = std::fs::remove_file(&path);
    let table = sql_common::unique_table("xproc");
    let side = format!("{table}_side");
    let store = open(&file_url(&path), &table).await;
    exec(
        store.pool(),
        format!("CREATE TABLE \"{side}\" (key TEXT NOT NULL, value TEXT NOT NULL)"),
    )
    .await;

    let started = Instant::now();
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(std::env::current_exe().expect("exe"))
                .args(["--exact", "child_exactly_once", "--nocapture"])
                .env(ROLE, "exactly_once")
                .env(FILE_VAR, &path)
                .env(TABLE_VAR, &table)
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    let mut executed = 0;
    for c in children {
        let out = c.wait_with_output().expect("child output");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {stdout}");
        let n = stdout
            .lines()
            .find_map(|l| l.split("child-result executed=").nth(1))
            .unwrap_or_else(|| panic!("no result line in {stdout}"));
        executed += n.trim().parse::<usize>().expect("count");
    }
    let rows: i64 = sqlx::query(AssertSqlSafe(format!("SELECT count(*) FROM \"{side}\"")))
        .fetch_one(store.pool())
        .await
        .expect("count")
        .get(0);
    println!(
        "sqlite cross-process: {} calls in {:?}, {rows} side-effect rows",
        PROCESSES * TASKS * KEYS_PER_TASK,
        started.elapsed()
    );
    assert_eq!(rows, KEYS as i64);
    assert_eq!(executed, KEYS);
    store.pool().close().await;
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_exactly_once() {
    if std::env::var(ROLE).map_or(true, |r| r != "exactly_once") {
        return;
    }
    let path = std::env::var(FILE_VAR).expect("file");
    let table = std::env::var(TABLE_VAR).expect("table");
    let store = open(&file_url(std::path::Path::new(&path)), &table).await;
    let side_table = format!("{table}_side");
    let executed = Arc::new(AtomicUsize::new(0));
    let pid = std::process::id() as usize;
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let worker = Worker {
                store: store.clone(),
                side_table: side_table.clone(),
                task,
                executed: Arc::clone(&executed),
            };
            tokio::spawn(async move {
                let start = task * (KEYS / TASKS) + pid % (KEYS / TASKS);
                let mut got = Vec::new();
                for i in 0..KEYS_PER_TASK {
                    let key = format!("key-{}", (start + i) % KEYS);
                    got.push((key.clone(), worker.work(key).await.expect("call")));
                }
                got
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.expect("task"));
    }
    let first: HashMap<String, String> = sqlx::query(AssertSqlSafe(format!(
        "SELECT key, value FROM \"{side_table}\""
    )))
    .fetch_all(store.pool())
    .await
    .expect("side rows")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    for (key, value) in &results {
        assert_eq!(
            first.get(key),
            Some(value),
            "caller of {key} got another result"
        );
    }
    println!(
        "\nchild-result executed={}",
        executed.load(Ordering::SeqCst)
    );
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_keeps_records_across_stores() {
    let path = sql_common::sqlite_file("reopen");
    let _ = std::fs::remove_file(&path);
    let table = sql_common::unique_table("reopen");
    let runs = Arc::new(AtomicUsize::new(0));
    let call = |store: SqliteStore| {
        let runs = runs.clone();
        async move {
            Call::new("reopen")
                .key("k")
                .run(&store, async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(42u32)
                })
                .await
        }
    };
    let a = open(&file_url(&path), &table).await;
    assert_eq!(call(a.clone()).await.expect("first"), 42);
    a.pool().close().await;
    drop(a);
    let b = open(&file_url(&path), &table).await;
    assert_eq!(call(b.clone()).await.expect("replay"), 42);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    b.pool().close().await;
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_stores_are_separate_databases() {
    let a = open("sqlite::memory:", "idem_records").await;
    let b = open("sqlite::memory:", "idem_records").await;
    let key = idem_testkit::fresh_key();
    completed(&a, key, Duration::from_secs(60)).await;
    assert!(a.get(&key).await.expect("get").is_some());
    assert!(b.get(&key).await.expect("get").is_none());
    // A clone shares the database, through its one connection.
    assert!(a.clone().get(&key).await.expect("get").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_keys_touch_only_their_own_record() {
    let store = open("sqlite::memory:", "idem_records").await;
    for i in 0..3u32 {
        let v: u32 = Call::new("canary")
            .key(i)
            .run(&store, async move { Ok::<_, Error>(i) })
            .await
            .expect("canary");
        assert_eq!(v, i);
    }
    let mut seen = HashSet::new();
    for key in sql_common::hostile_strings() {
        for scope in sql_common::hostile_strings().iter().take(4) {
            let before = snapshot(store.pool(), "idem_records").await;
            let want = format!("{key:?}/{scope:?}");
            let w = want.clone();
            let got: String = Call::new("hostile")
                .key(&key)
                .scope(scope)
                .run(&store, async move { Ok::<_, Error>(w) })
                .await
                .expect("hostile call");
            assert_eq!(got, want);
            let after = snapshot(store.pool(), "idem_records").await;
            assert_eq!(after.len(), before.len() + 1);
            for (k, row) in &before {
                assert_eq!(after.get(k), Some(row));
            }
            let new: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
            assert_eq!(new.len(), 1);
            assert_eq!(new[0].len(), 32);
            assert!(seen.insert(new[0].clone()));
        }
    }
    for key in sql_common::hostile_strings() {
        for scope in sql_common::hostile_strings().iter().take(4) {
            let got: String = Call::new("hostile")
                .key(&key)
                .scope(scope)
                .run(&store, async { Ok::<_, Error>("ran again".into()) })
                .await
                .expect("replay");
            assert_eq!(got, format!("{key:?}/{scope:?}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_removes_expired_rows_only_in_batches() {
    let store = SqliteStore::builder()
        .url("sqlite::memory:")
        .lease_grace(Duration::ZERO)
        .connect()
        .await
        .expect("open");
    store.migrate().await.expect("migrate");
    let live_completed: Vec<Key> = (0..20).map(|_| idem_testkit::fresh_key()).collect();
    let live_claims: Vec<Key> = (0..5).map(|_| idem_testkit::fresh_key()).collect();
    for k in &live_completed {
        completed(&store, *k, Duration::from_secs(3600)).await;
    }
    for k in &live_claims {
        store
            .claim(&claim_req(*k, Duration::from_secs(3600)).0)
            .await
            .expect("claim");
    }
    for _ in 0..240 {
        completed(&store, idem_testkit::fresh_key(), Duration::from_millis(1)).await;
    }
    for _ in 0..10 {
        let (req, _) = claim_req(idem_testkit::fresh_key(), Duration::from_millis(1));
        store.claim(&req).await.expect("claim");
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut batches = Vec::new();
    loop {
        let n = store.purge_expired(100).await.expect("purge");
        batches.push(n);
        if n < 100 {
            break;
        }
    }
    assert_eq!(batches, vec![100, 100, 50]);
    let left: HashSet<Vec<u8>> = snapshot(store.pool(), "idem_records")
        .await
        .into_keys()
        .collect();
    let want: HashSet<Vec<u8>> = live_completed
        .iter()
        .chain(&live_claims)
        .map(|k| k.0.to_vec())
        .collect();
    assert_eq!(left, want, "exactly the live rows remain");

    // The background sweeper, on a file, stops when the store is dropped.
    let path = sql_common::sqlite_file("sweeper");
    let _ = std::fs::remove_file(&path);
    let swept = SqliteStore::builder()
        .url(file_url(&path))
        .sweep_every(Duration::from_millis(30), 7)
        .connect()
        .await
        .expect("open");
    swept.migrate().await.expect("migrate");
    let live = idem_testkit::fresh_key();
    completed(&swept, live, Duration::from_secs(3600)).await;
    for _ in 0..30 {
        completed(&swept, idem_testkit::fresh_key(), Duration::from_millis(1)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = snapshot(swept.pool(), "idem_records").await.len();
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "sweeper left {n} rows");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(swept.get(&live).await.expect("get").is_some());
    swept.pool().close().await;
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_of_another_store_see_completions_by_polling() {
    let path = sql_common::sqlite_file("poll");
    let _ = std::fs::remove_file(&path);
    let url = file_url(&path);
    let a = open(&url, "idem_records").await;
    let b = SqliteStore::builder()
        .url(&url)
        .poll_max(Duration::from_millis(50))
        .connect()
        .await
        .expect("open");
    let key = idem_testkit::fresh_key();
    let (req, token) = claim_req(key, Duration::from_secs(30));
    assert_eq!(
        a.claim(&req).await.expect("claim"),
        Claim::Acquired { taken_over: false }
    );
    let waiter = tokio::spawn({
        let b = b.clone();
        async move {
            b.wait(&key, Duration::from_secs(20)).await.expect("wait");
            Instant::now()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let done = Instant::now();
    a.complete(&key, token, b"x", Duration::from_secs(60))
        .await
        .expect("complete");
    let woke = waiter.await.expect("waiter");
    let lag = woke.saturating_duration_since(done);
    println!("sqlite polling wake-up lag {lag:?} (poll_max 50ms)");
    assert!(lag < Duration::from_millis(500), "{lag:?}");
    a.pool().close().await;
    b.pool().close().await;
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeovers_are_reported_and_table_names_validated() {
    let store = open("sqlite::memory:", "idem_records").await;
    let key = idem_testkit::fresh_key();
    let (req, _) = claim_req(key, Duration::from_millis(30));
    assert_eq!(
        store.claim(&req).await.expect("claim"),
        Claim::Acquired { taken_over: false }
    );
    tokio::time::sleep(Duration::from_millis(60)).await;
    let (req, token) = claim_req(key, Duration::from_secs(30));
    assert_eq!(
        store.claim(&req).await.expect("claim"),
        Claim::Acquired { taken_over: true }
    );
    store
        .complete(&key, token, b"done", Duration::from_millis(30))
        .await
        .expect("complete");
    tokio::time::sleep(Duration::from_millis(60)).await;
    let (req, _) = claim_req(key, Duration::from_secs(30));
    assert_eq!(
        store.claim(&req).await.expect("claim"),
        Claim::Acquired { taken_over: false }
    );
    store.migrate().await.expect("migrate twice");
    for bad in ["x; DROP TABLE y", "a\"b", "", "1x", "main.t"] {
        assert!(SqliteStore::builder()
            .url("sqlite::memory:")
            .table(bad)
            .build()
            .is_err());
    }
}

/// Many concurrent claims of a record that has just lapsed: exactly one takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_takeovers_have_one_winner() {
    let path = sql_common::sqlite_file("race");
    let _ = std::fs::remove_file(&path);
    let store = open(&file_url(&path), "idem_records").await;
    for round in 0..10 {
        let key = idem_testkit::fresh_key();
        let (req, token) = claim_req(key, Duration::from_millis(40));
        store.claim(&req).await.expect("claim");
        let lapsed_claim = round % 2 == 0;
        if !lapsed_claim {
            store
                .complete(&key, token, b"old", Duration::from_millis(40))
                .await
                .expect("complete");
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    let (req, _) = claim_req(key, Duration::from_secs(30));
                    store.claim(&req).await
                })
            })
            .collect();
        let mut acquired = 0;
        for t in tasks {
            match t.await.expect("task").expect("claim must not fail") {
                Claim::Acquired { taken_over } => {
                    assert_eq!(taken_over, lapsed_claim);
                    acquired += 1;
                }
                Claim::InProgress { .. } => {}
                Claim::Completed(r) => panic!("an expired record was replayed: {r:?}"),
            }
        }
        assert_eq!(acquired, 1, "round {round}");
    }
    store.pool().close().await;
    let _ = std::fs::remove_file(&path);
}

// ---------------------------------------------------------------------------------------------
// Crash takeover: a child process claims on the shared file and is SIGKILLed mid-body.

const CRASH_LEASE: Duration = Duration::from_millis(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_takeover_after_sigkill() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    let path = sql_common::sqlite_file("crash");
    let _ = std::fs::remove_file(&path);
    let table = sql_common::unique_table("crash");
    let store = open(&file_url(&path), &table).await;
    exec(
        store.pool(),
        format!("CREATE TABLE \"{table}_side\" (who TEXT NOT NULL)"),
    )
    .await;
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .args(["--exact", "child_crash", "--nocapture"])
        .env(ROLE, "crash")
        .env(FILE_VAR, &path)
        .env(TABLE_VAR, &table)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn child");
    let side_count = |who: &'static str| {
        let pool = store.pool().clone();
        let table = table.clone();
        async move {
            sqlx::query(AssertSqlSafe(format!(
                "SELECT count(*) FROM \"{table}_side\" WHERE who = ?1"
            )))
            .bind(who)
            .fetch_one(&pool)
            .await
            .expect("count")
            .get::<i64, _>(0)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while side_count("child").await == 0 {
        assert!(Instant::now() < deadline, "child never started its body");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(CRASH_LEASE).await;
    child.kill().expect("SIGKILL");
    assert!(!child.wait().expect("reap").success());
    let killed_at = Instant::now();

    let r = Call::new("crash")
        .key("order")
        .lease(CRASH_LEASE)
        .on_conflict(idem_core::OnConflict::Reject)
        .run(&store, async { Ok::<_, Error>("parent".to_string()) })
        .await;
    assert!(matches!(r, Err(Error::InProgress { .. })), "{r:?}");
    let got = Call::new("crash")
        .key("order")
        .lease(CRASH_LEASE)
        .wait_timeout(Duration::from_secs(10))
        .run(&store, {
            let pool = store.pool().clone();
            let table = table.clone();
            async move {
                exec(
                    &pool,
                    format!("INSERT INTO \"{table}_side\" (who) VALUES ('parent')"),
                )
                .await;
                Ok::<_, Error>("parent".to_string())
            }
        })
        .await
        .expect("takeover");
    assert_eq!(got, "parent");
    let took = killed_at.elapsed();
    assert!(took < CRASH_LEASE + Duration::from_secs(2), "{took:?}");
    println!("sqlite takeover {took:?} after SIGKILL (lease {CRASH_LEASE:?})");
    let again = Call::new("crash")
        .key("order")
        .run(&store, async { Ok::<_, Error>("ran again".to_string()) })
        .await
        .expect("replay");
    assert_eq!(again, "parent");
    assert_eq!(side_count("parent").await, 1);
    store.pool().close().await;
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_crash() {
    if std::env::var(ROLE).map_or(true, |r| r != "crash") {
        return;
    }
    let path = std::env::var(FILE_VAR).expect("file");
    let table = std::env::var(TABLE_VAR).expect("table");
    let store = open(&file_url(std::path::Path::new(&path)), &table).await;
    let pool = store.pool().clone();
    let _ = Call::new("crash")
        .key("order")
        .lease(CRASH_LEASE)
        .run(&store, async move {
            exec(
                &pool,
                format!("INSERT INTO \"{table}_side\" (who) VALUES ('child')"),
            )
            .await;
            tokio::time::sleep(Duration::from_secs(120)).await;
            Ok::<_, Error>("child".to_string())
        })
        .await;
    panic!("the child should have been killed mid-body");
}

/// Contract v2 at the row level, in memory and on a file: a retried claim restarts its lease,
/// a retried completion keeps the first value, foreign releases change nothing, failed
/// renewals keep the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn contract_v2_retries_are_recognised() {
    let memory = open("sqlite::memory:", "idem_records").await;
    sql_common::contract::all(Arc::new(memory)).await;
    let path = sql_common::sqlite_file("v2");
    let file = open(&file_url(&path), "idem_records").await;
    sql_common::contract::all(Arc::new(file.clone())).await;
    file.pool().close().await;
    let _ = std::fs::remove_file(&path);
}

/// A table that was never migrated, in memory and on a file: every operation says to call
/// `migrate()` (SQLite never creates the table by itself, like the other SQL stores).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_says_to_migrate() {
    let memory = SqliteStore::builder()
        .url("sqlite::memory:")
        .connect()
        .await
        .expect("open");
    sql_common::contract::missing_table_says_to_migrate(&memory, "idem_records").await;
    let path = sql_common::sqlite_file("nomigrate");
    let file = SqliteStore::builder()
        .url(file_url(&path))
        .table("never_migrated")
        .connect()
        .await
        .expect("open");
    sql_common::contract::missing_table_says_to_migrate(&file, "never_migrated").await;
    file.pool().close().await;
    let _ = std::fs::remove_file(&path);
}
