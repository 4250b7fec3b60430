//! PostgresStore beyond the conformance suite: several OS processes, a killed process, a lost
//! server, hostile keys at the table level, the sweep, notifications between stores.
//! Needs `IDEM_TEST_POSTGRES_URL` (skips without it, fails without it when `CI` is set).
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/sql_common.rs"]
mod sql_common;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::{idempotent, Call, Claim, Error, Key, OnConflict, Store, StoreError};
use idem_stores::PostgresStore;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row};

const ROLE: &str = "IDEM_PG_TEST_ROLE";
const TABLE_VAR: &str = "IDEM_PG_TEST_TABLE";

fn url() -> Option<String> {
    idem_testkit::env_url("IDEM_TEST_POSTGRES_URL")
}

async fn admin(url: &str) -> PgPool {
    sql_common::pg_drop_stale_tables(url).await;
    PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .expect("connect to IDEM_TEST_POSTGRES_URL")
}

async fn exec(pool: &PgPool, sql: String) {
    sqlx::query(AssertSqlSafe(sql))
        .execute(pool)
        .await
        .expect("admin statement");
}

async fn count(pool: &PgPool, sql: String) -> i64 {
    sqlx::query(AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .expect("count")
        .get::<i64, _>(0)
}

async fn store(url: &str, table: &str) -> PostgresStore {
    let store = PostgresStore::builder()
        .url(url)
        .table(table)
        .max_connections(8)
        .connect()
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    store
}

/// Re-runs this test binary as a child process playing `role` in test `test`.
fn child(role: &str, test: &str, table: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
    cmd.args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(ROLE, role)
        .env(TABLE_VAR, table)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

fn role_is(role: &str) -> bool {
    std::env::var(ROLE).is_ok_and(|r| r == role)
}

// ---------------------------------------------------------------------------------------------
// Cross-process exactly-once: 4 processes × 50 tasks × the same 200 keys.

const PROCESSES: usize = 4;
const TASKS: usize = 50;
const KEYS: usize = 200;
/// Each task visits all 200 keys, from its own offset: every key is called by all 200 tasks
/// (40,000 calls in all), at overlapping moments.
const KEYS_PER_TASK: usize = KEYS;

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
    store: PostgresStore,
    side: PgPool,
    side_table: String,
    task: usize,
    executed: Arc<AtomicUsize>,
}

impl Worker {
    /// The side effect: one row per execution. No unique constraint, so a second execution
    /// of a key would show as a second row.
    #[idempotent(key = key.clone(), ttl = "1h", lease = "3s", wait_timeout = "60s", store = self.store)]
    async fn work(&self, key: String) -> Result<String, WorkError> {
        let value = format!("{key}:{}:{}", std::process::id(), self.task);
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{}\" (key, value) VALUES ($1, $2)",
            self.side_table
        )))
        .bind(&key)
        .bind(&value)
        .execute(&self.side)
        .await
        .map_err(|e| WorkError::Db(e.to_string()))?;
        self.executed.fetch_add(1, Ordering::SeqCst);
        // Hold the claim a moment, so that duplicates pile up and wait.
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(value)
    }
}

async fn cross_process_exactly_once() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    let Some(url) = url() else { return };
    let admin = admin(&url).await;
    let table = sql_common::unique_table("xproc");
    let side = format!("{table}_side");
    exec(
        &admin,
        format!("CREATE TABLE \"{side}\" (key TEXT NOT NULL, value TEXT NOT NULL)"),
    )
    .await;
    store(&url, &table).await;

    let started = Instant::now();
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            child("exactly_once", "child_exactly_once", &table)
                .spawn()
                .expect("spawn child")
        })
        .collect();
    let mut executed = 0;
    for c in children {
        let out = c.wait_with_output().expect("child output");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {stdout}");
        let line = stdout
            .lines()
            .find_map(|l| l.split("child-result executed=").nth(1))
            .unwrap_or_else(|| panic!("no result line in {stdout}"));
        executed += line.trim().parse::<usize>().expect("executed count");
    }
    let elapsed = started.elapsed();

    let rows = count(&admin, format!("SELECT count(*) FROM \"{side}\"")).await;
    let distinct = count(
        &admin,
        format!("SELECT count(DISTINCT key) FROM \"{side}\""),
    )
    .await;
    println!(
        "cross-process: {} calls in {elapsed:?}, {rows} side-effect rows, {executed} executions",
        PROCESSES * TASKS * KEYS_PER_TASK
    );
    assert_eq!(rows, KEYS as i64, "exactly one side effect per key");
    assert_eq!(distinct, KEYS as i64);
    assert_eq!(executed, KEYS);
    exec(
        &admin,
        format!("DROP TABLE IF EXISTS \"{side}\", \"{side}_steps\""),
    )
    .await;
    exec(
        &admin,
        format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_steps\""),
    )
    .await;
}

/// One of the processes of `cross_process_exactly_once`.
async fn child_exactly_once() {
    if !role_is("exactly_once") {
        return;
    }
    let url = std::env::var("IDEM_TEST_POSTGRES_URL").expect("url");
    let table = std::env::var(TABLE_VAR).expect("table");
    let side_table = format!("{table}_side");
    let store = store(&url, &table).await;
    let side = PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .expect("side pool");
    let executed = Arc::new(AtomicUsize::new(0));
    let pid = std::process::id() as usize;
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let worker = Worker {
                store: store.clone(),
                side: side.clone(),
                side_table: side_table.clone(),
                task,
                executed: Arc::clone(&executed),
            };
            tokio::spawn(async move {
                let mut got = Vec::with_capacity(KEYS_PER_TASK);
                let start = task * (KEYS / TASKS) + pid % (KEYS / TASKS);
                for i in 0..KEYS_PER_TASK {
                    let key = format!("key-{}", (start + i) % KEYS);
                    let value = worker.work(key.clone()).await.expect("call");
                    got.push((key, value));
                }
                got
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.expect("task"));
    }
    // Every caller got the first (the only) result.
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT key, value FROM \"{side_table}\""
    )))
    .fetch_all(&side)
    .await
    .expect("side rows");
    let first: HashMap<String, String> = rows
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
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
// Crash takeover: a child claims, runs its body, and is SIGKILLed mid-body.

const CRASH_LEASE: Duration = Duration::from_millis(900);

fn crash_call(ns: &'static str) -> Call {
    Call::new(ns).key("the-order").lease(CRASH_LEASE)
}

async fn crash_takeover_after_sigkill() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    let Some(url) = url() else { return };
    let admin = admin(&url).await;
    let table = sql_common::unique_table("crash");
    let side = format!("{table}_side");
    exec(
        &admin,
        format!("CREATE TABLE \"{side}\" (who TEXT NOT NULL, at TIMESTAMPTZ DEFAULT now())"),
    )
    .await;
    let store = store(&url, &table).await;

    let mut child = child("crash", "child_crash", &table)
        .spawn()
        .expect("spawn child");
    // Wait until the child is inside its body (it wrote its marker row).
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&admin, format!("SELECT count(*) FROM \"{side}\"")).await == 0 {
        assert!(Instant::now() < deadline, "child never started its body");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let it renew its lease a few times, then kill it without a word (SIGKILL).
    tokio::time::sleep(CRASH_LEASE).await;
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("reap child");
    assert!(!status.success());
    let killed_at = Instant::now();

    // While the dead child's lease is still live, a duplicate is refused (reject) ...
    let ran = Arc::new(AtomicUsize::new(0));
    let r = crash_call("crash")
        .on_conflict(OnConflict::Reject)
        .run(&store, {
            let ran = ran.clone();
            async move {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>("parent".to_string())
            }
        })
        .await;
    assert!(
        matches!(r, Err(Error::InProgress { .. })),
        "a live lease must block: {r:?}"
    );
    // ... and a waiting duplicate takes over once the lease has passed, running once.
    let body = {
        let ran = ran.clone();
        let admin = admin.clone();
        let side = side.clone();
        async move {
            ran.fetch_add(1, Ordering::SeqCst);
            exec(
                &admin,
                format!("INSERT INTO \"{side}\" (who) VALUES ('parent')"),
            )
            .await;
            Ok::<_, Error>("parent".to_string())
        }
    };
    let got = crash_call("crash")
        .wait_timeout(Duration::from_secs(10))
        .run(&store, body)
        .await
        .expect("takeover");
    let took = killed_at.elapsed();
    assert_eq!(got, "parent");
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    assert!(
        took < CRASH_LEASE + Duration::from_secs(2),
        "takeover took {took:?}"
    );
    println!("takeover {took:?} after SIGKILL (lease {CRASH_LEASE:?})");
    // A further call replays the takeover's result.
    let again = crash_call("crash")
        .run(&store, async { Ok::<_, Error>("ran again".to_string()) })
        .await
        .expect("replay");
    assert_eq!(again, "parent");
    assert_eq!(
        count(
            &admin,
            format!("SELECT count(*) FROM \"{side}\" WHERE who = 'parent'")
        )
        .await,
        1
    );
    exec(
        &admin,
        format!("DROP TABLE IF EXISTS \"{side}\", \"{side}_steps\""),
    )
    .await;
    exec(
        &admin,
        format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_steps\""),
    )
    .await;
}

/// The process killed by `crash_takeover_after_sigkill`.
async fn child_crash() {
    if !role_is("crash") {
        return;
    }
    let url = std::env::var("IDEM_TEST_POSTGRES_URL").expect("url");
    let table = std::env::var(TABLE_VAR).expect("table");
    let store = store(&url, &table).await;
    let side = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("side pool");
    let _ = crash_call("crash")
        .run(&store, async move {
            exec(
                &side,
                format!("INSERT INTO \"{table}_side\" (who) VALUES ('child')"),
            )
            .await;
            // Killed in here.
            tokio::time::sleep(Duration::from_secs(120)).await;
            Ok::<_, Error>("child".to_string())
        })
        .await;
    panic!("the child should have been killed mid-body");
}

// ---------------------------------------------------------------------------------------------
// Outages.

async fn unreachable_server_fails_closed() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    // Nothing listens on port 1: the call fails with Error::Store and the body never runs.
    let store = PostgresStore::builder()
        .url("postgres://postgres@127.0.0.1:1/test")
        .acquire_timeout(Duration::from_millis(500))
        .build()
        .expect("build");
    let ran = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let r = Call::new("outage")
        .key("k")
        .run(&store, {
            let ran = ran.clone();
            async move {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(())
            }
        })
        .await;
    assert!(matches!(r, Err(Error::Store(_))), "{r:?}");
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!store.is_listening());
    // `connect` reports it too.
    let e = PostgresStore::builder()
        .url("postgres://postgres@127.0.0.1:1/test")
        .acquire_timeout(Duration::from_millis(300))
        .connect()
        .await;
    assert!(matches!(e, Err(StoreError::Backend { .. })), "{e:?}");
}

async fn terminated_connections_recover() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    let Some(url) = url() else { return };
    let admin = admin(&url).await;
    let table = sql_common::unique_table("term");
    let app = format!("idem_term_{}", std::process::id());
    let sep = if url.contains('?') { '&' } else { '?' };
    let store = store(&format!("{url}{sep}application_name={app}"), &table).await;
    let kill_all = || {
        let admin = admin.clone();
        let app = app.clone();
        async move {
            sqlx::query(
                "SELECT count(pg_terminate_backend(pid))::bigint FROM pg_stat_activity \
                 WHERE application_name = $1 AND pid <> pg_backend_pid()",
            )
            .bind(&app)
            .fetch_one(&admin)
            .await
            .expect("terminate")
            .get::<i64, _>(0)
        }
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let call = |i: usize| {
        let runs = runs.clone();
        Call::new("term")
            .key(i)
            .lease(Duration::from_millis(500))
            .run(&store, async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, Error>(i)
            })
    };
    // Warm up: the pool and the listener are connected.
    for i in 0..5 {
        assert_eq!(call(i).await.expect("warm-up"), i);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store.is_listening() {
        assert!(Instant::now() < deadline, "listener never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed = kill_all().await;
    assert!(
        killed >= 2,
        "expected the pool's and the listener's connections, killed {killed}"
    );

    // Calls right after the kill, some mid-body when the next kill comes: each one either
    // succeeds or fails with Error::Store / LeaseLost — never a panic, never a hang.
    let mut outcomes = HashMap::new();
    let mid = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        kill_all().await
    };
    // 30 calls over 10 keys (3 concurrent callers per key: one runs, two wait for it).
    let runs_before = runs.load(Ordering::SeqCst);
    let keys: Vec<usize> = (0..30).map(|i| 100 + i % 10).collect();
    let (_, results) = tokio::join!(mid, futures_join(keys.iter().map(|&k| call(k)).collect()));
    // A body runs only for a call that claimed, which ends Ok (executed) or LeaseLost (ran,
    // then fenced); a duplicate that waited ends Ok with the replayed value. Error::Store
    // comes from a claim or a wait, before any body.
    let mut claimed_max = 0;
    for (&k, r) in keys.iter().zip(results) {
        let outcome = match r {
            Ok(v) => {
                assert_eq!(v, k);
                claimed_max += 1;
                "ok"
            }
            Err(Error::LeaseLost) => {
                claimed_max += 1;
                "lease_lost"
            }
            Err(Error::Store(_)) => "store_error",
            Err(e) => panic!("unexpected error {e:?}"),
        };
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    let ran = runs.load(Ordering::SeqCst) - runs_before;
    assert!(
        ran >= 1 && ran <= claimed_max,
        "{ran} bodies ran, {claimed_max} calls could have"
    );
    println!("after pg_terminate_backend: {outcomes:?}, {ran} bodies ran for 10 keys");
    // Every key that was answered now replays the same value, without running again.
    let before = runs.load(Ordering::SeqCst);
    for k in 100..110 {
        assert_eq!(call(k).await.expect("after the outage"), k);
    }
    assert!(runs.load(Ordering::SeqCst) - before <= 10);

    // The same store works afterwards, with no rebuilding: every key answers, each body ran
    // at most once for a completed key, and the listener is back.
    let before = runs.load(Ordering::SeqCst);
    for i in 0..5 {
        assert_eq!(call(i).await.expect("replay after outage"), i);
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        before,
        "completed keys must replay"
    );
    for i in 200..205 {
        assert_eq!(call(i).await.expect("new key after outage"), i);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store.is_listening() {
        assert!(Instant::now() < deadline, "listener never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    exec(
        &admin,
        format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_steps\""),
    )
    .await;
}

/// Awaits all futures concurrently (tokio tasks need 'static; these borrow the store).
async fn futures_join<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futs.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|v| v.expect("ready")).collect()
}

// ---------------------------------------------------------------------------------------------
// Hostile keys, the sweep, notifications, migrations.

async fn snapshot(pool: &PgPool, table: &str) -> HashMap<Vec<u8>, (String, Option<Vec<u8>>)> {
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

async fn hostile_keys_touch_only_their_own_record() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    let Some(url) = url() else { return };
    let admin = admin(&url).await;
    let table = sql_common::unique_table("hostile");
    let store = store(&url, &table).await;
    // Canary records that must not change.
    for i in 0..3 {
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
            let before = snapshot(&admin, &table).await;
            let want = format!("{key:?}/{scope:?}");
            let w = want.clone();
            let got: String = Call::new("hostile")
                .key(&key)
                .scope(scope)
                .run(&store, async move { Ok::<_, Error>(w) })
                .await
                .expect("hostile call");
            assert_eq!(got, want);
            let after = snapshot(&admin, &table).await;
            // Exactly one new row, 32 bytes of key; every other row unchanged.
            assert_eq!(after.len(), before.len() + 1, "key {key:?} scope {scope:?}");
            for (k, row) in &before {
                assert_eq!(after.get(k), Some(row));
            }
            let new: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
            assert_eq!(new.len(), 1);
            assert_eq!(new[0].len(), 32);
            assert!(seen.insert(new[0].clone()));
        }
    }
    // And each replays its own value.
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
    exec(
        &admin,
        format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_steps\""),
    )
    .await;
}

use idem_testkit::{claim_request as claim_req, completed};

async fn sweep_removes_expired_rows_only_in_batches() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    let Some(url) = url() else { return };
    let admin = admin(&url).await;
    let table = sql_common::unique_table("sweep");
    let store = PostgresStore::builder()
        .url(&url)
        .table(&table)
        .lease_grace(Duration::ZERO)
        .connect()
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    let live_completed: Vec<Key> = (0..20).map(|_| idem_testkit::fresh_key()).collect();
    let live_claims: Vec<Key> = (0..5).map(|_| idem_testkit::fresh_key()).collect();
    for k in &live_completed {
        completed(&store, *k, Duration::from_secs(3600)).await;
    }
    for k in &live_claims {
        let (req, _) = claim_req(*k, Duration::from_secs(3600));
        store.claim(&req).await.expect("claim");
    }
    for _ in 0..240 {
        completed(&store, idem_testkit::fresh_key(), Duration::from_millis(1)).await;
    }
    for _ in 0..10 {
        // Lapsed claims (lease passed, no grace): expired too.
        let (req, _) = claim_req(idem_testkit::fresh_key(), Duration::from_millis(1));
        store.claim(&req).await.expect("claim");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut batches = Vec::new();
    loop {
        let n = store.purge_expired(100).await.expect("purge");
        batches.push(n);
        if n < 100 {
            break;
        }
    }
    assert_eq!(batches, vec![100, 100, 50]);
    let left: HashSet<Vec<u8>> = snapshot(&admin, &table).await.into_keys().collect();
    let want: HashSet<Vec<u8>> = live_completed
        .iter()
        .chain(&live_claims)
        .map(|k| k.0.to_vec())
        .collect();
    assert_eq!(left, want, "exactly the live rows remain");
    for k in &live_completed {
        assert!(store.get(k).await.expect("get").is_some());
    }

    // The background sweeper does the same, and stops with the store.
    let swept = PostgresStore::builder()
        .url(&url)
        .table(&table)
        .sweep_every(Duration::from_millis(50), 7)
        .connect()
        .await
        .expect("connect");
    for _ in 0..30 {
        completed(&swept, idem_testkit::fresh_key(), Duration::from_millis(1)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = count(&admin, format!("SELECT count(*) FROM \"{table}\"")).await;
        if n == 25 {
            break;
        }
        assert!(Instant::now() < deadline, "sweeper left {n} rows");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(swept);
    exec(
        &admin,
        format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_steps\""),
    )
    .await;
}

async fn notifications_wake_waiters_of_another_store() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    let Some(url) = url() else { return };
    let admin = admin(&url).await;
    let table = sql_common::unique_table("notify");
    let a = store(&url, &table).await;
    // B polls at most every 10 s: only a notification can wake it quickly.
    let b = PostgresStore::builder()
        .url(&url)
        .table(&table)
        .poll_max(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(a.is_listening() && b.is_listening()) {
        assert!(Instant::now() < deadline, "listeners never came up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut latencies = Vec::new();
    for round in 0..10 {
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
        tokio::time::sleep(Duration::from_millis(100)).await;
        let done_at = Instant::now();
        if round % 2 == 0 {
            a.complete(&key, token, b"x", Duration::from_secs(60))
                .await
                .expect("complete");
        } else {
            a.release(&key, token).await.expect("release");
        }
        let woke = waiter.await.expect("waiter");
        latencies.push(woke.saturating_duration_since(done_at));
    }
    latencies.sort();
    println!(
        "cross-store wake-up latency: median {:?}, max {:?}",
        latencies[5], latencies[9]
    );
    assert!(latencies[9] < Duration::from_secs(2), "{latencies:?}");
    exec(
        &admin,
        format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_steps\""),
    )
    .await;
}

async fn claims_report_takeovers_and_migrate_is_concurrent_safe() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    let Some(url) = url() else { return };
    let admin = admin(&url).await;
    let table = sql_common::unique_table("migrate");
    let stores: Vec<PostgresStore> = {
        let mut v = Vec::new();
        for _ in 0..6 {
            v.push(
                PostgresStore::builder()
                    .url(&url)
                    .table(&table)
                    .max_connections(2)
                    .notify(false)
                    .build()
                    .expect("build"),
            );
        }
        v
    };
    let results = futures_join(stores.iter().map(|s| s.migrate()).collect()).await;
    for r in results {
        r.expect("concurrent migrate");
    }
    let store = &stores[0];
    store.migrate().await.expect("migrate again");

    let key = idem_testkit::fresh_key();
    let (req, _) = claim_req(key, Duration::from_millis(50));
    assert_eq!(
        store.claim(&req).await.expect("claim"),
        Claim::Acquired { taken_over: false }
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (req, token) = claim_req(key, Duration::from_secs(30));
    assert_eq!(
        store.claim(&req).await.expect("claim"),
        Claim::Acquired { taken_over: true }
    );
    store
        .complete(&key, token, b"done", Duration::from_millis(50))
        .await
        .expect("complete");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Claiming an expired completed record is not a takeover.
    let (req, _) = claim_req(key, Duration::from_secs(30));
    assert_eq!(
        store.claim(&req).await.expect("claim"),
        Claim::Acquired { taken_over: false }
    );

    // Table names are validated, never interpolated raw.
    for bad in ["x; DROP TABLE y", "a\"b", "", "1x", "a.b.c"] {
        assert!(PostgresStore::builder()
            .url(&url)
            .table(bad)
            .build()
            .is_err());
    }
    exec(
        &admin,
        format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_steps\""),
    )
    .await;
}

/// Many concurrent claims of a record that has just lapsed (an in-progress lease passed, or a
/// completed record expired): exactly one takes it, the others see the winner's claim. In READ
/// COMMITTED the losers' reads may show the old row; the claim must re-run, never misreport.
async fn racing_takeovers_have_one_winner() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    let Some(url) = url() else { return };
    let admin = admin(&url).await;
    let table = sql_common::unique_table("race");
    let store = Arc::new(store(&url, &table).await);
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
        let claims = futures_join(
            (0..32)
                .map(|_| {
                    let store = store.clone();
                    async move {
                        let (req, _) = claim_req(key, Duration::from_secs(30));
                        store.claim(&req).await
                    }
                })
                .collect(),
        )
        .await;
        let mut acquired = 0;
        for c in claims {
            match c.expect("claim must not fail") {
                Claim::Acquired { taken_over } => {
                    assert_eq!(taken_over, lapsed_claim);
                    acquired += 1;
                }
                Claim::InProgress {
                    lease_remaining, ..
                } => assert!(lease_remaining.expect("lease") > Duration::from_secs(20)),
                Claim::Completed(r) => panic!("an expired record was replayed: {r:?}"),
            }
        }
        assert_eq!(acquired, 1, "round {round}");
    }
    exec(
        &admin,
        format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_steps\""),
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// A real outage: the store reaches the server through a TCP proxy that the test stops (every
// connection cut, the port closed) and starts again on the same port.

struct Proxy {
    port: u16,
    upstream: std::net::SocketAddr,
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr, port: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let tasks: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let accept = tokio::spawn({
            let tasks = tasks.clone();
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let pipe = tokio::spawn(async move {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    tasks.lock().unwrap().push(pipe.abort_handle());
                }
            }
        });
        tasks.lock().unwrap().push(accept.abort_handle());
        Proxy {
            port,
            upstream,
            tasks,
        }
    }

    /// Closes the port and cuts every connection.
    async fn stop(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        // Let the aborted tasks drop their sockets.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    async fn restart(self) -> Proxy {
        Proxy::start(self.upstream, self.port).await
    }
}

async fn database_outage_and_recovery_through_a_proxy() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    let Some(url) = url() else { return };
    let admin = admin(&url).await;
    let table = sql_common::unique_table("proxy");
    let options: sqlx::postgres::PgConnectOptions = url.parse().expect("url");
    let upstream = tokio::net::lookup_host((options.get_host(), options.get_port()))
        .await
        .expect("resolve")
        .next()
        .expect("an address");
    let proxy = Proxy::start(upstream, 0).await;
    // The application's own pool, handed to the store.
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy_with(options.clone().host("127.0.0.1").port(proxy.port));
    let store = PostgresStore::builder()
        .pool(pool)
        .table(&table)
        .acquire_timeout(Duration::from_millis(500))
        .operation_timeout(Duration::from_secs(2))
        .build()
        .expect("build");
    store.migrate().await.expect("migrate");
    let runs = Arc::new(AtomicUsize::new(0));
    let call = |i: u32| {
        let runs = runs.clone();
        Call::new("proxy").key(i).run(&store, async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(i)
        })
    };
    for i in 0..3 {
        assert_eq!(call(i).await.expect("before the outage"), i);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store.is_listening() {
        assert!(Instant::now() < deadline, "listener never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Outage: every call fails with Error::Store, and no body runs.
    proxy.stop().await;
    let before = runs.load(Ordering::SeqCst);
    let started = Instant::now();
    for i in 10..15 {
        let r = call(i).await;
        assert!(matches!(r, Err(Error::Store(_))), "{r:?}");
    }
    for i in 0..3 {
        // Even keys that were completed: the store cannot be read, so nothing is replayed
        // or run.
        let r = call(i).await;
        assert!(matches!(r, Err(Error::Store(_))), "{r:?}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), before, "no body may run");
    println!("8 calls failed closed in {:?}", started.elapsed());
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.is_listening() {
        assert!(
            Instant::now() < deadline,
            "the listener did not notice the outage"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Recovery on the same port: the same store (no rebuild) works again, listener included.
    let _proxy = proxy.restart().await;
    let back = Instant::now();
    let deadline = back + Duration::from_secs(10);
    loop {
        match call(10).await {
            Ok(v) => {
                assert_eq!(v, 10);
                break;
            }
            Err(Error::Store(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the store did not recover: {e:?}"),
        }
    }
    println!(
        "first call succeeded {:?} after the server came back",
        back.elapsed()
    );
    for i in 0..3 {
        assert_eq!(call(i).await.expect("replay after the outage"), i);
    }
    assert_eq!(runs.load(Ordering::SeqCst), before + 1);
    while !store.is_listening() {
        assert!(Instant::now() < deadline, "the listener did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    exec(
        &admin,
        format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_steps\""),
    )
    .await;
}

/// Contract v2 at the row level: a retried claim restarts its lease, a retried completion
/// keeps the first value, foreign releases change nothing, failed renewals keep the lease.
async fn contract_v2_retries_are_recognised() {
    let Some(url) = url() else { return };
    let table = sql_common::unique_table("v2");
    let s = store(&url, &table).await;
    sql_common::contract::all(Arc::new(s)).await;
    exec(
        &admin(&url).await,
        format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_steps\""),
    )
    .await;
}

/// A table that was never migrated: every operation says to call `migrate()`.
async fn a_missing_table_says_to_migrate() {
    let Some(url) = url() else { return };
    let table = sql_common::unique_table("nomigrate");
    let store = PostgresStore::builder()
        .url(url)
        .table(&table)
        .max_connections(2)
        .connect()
        .await
        .expect("connect");
    sql_common::contract::missing_table_says_to_migrate(&store, &table).await;
}

fn main() -> std::process::ExitCode {
    use backends::POSTGRES;
    idem_testkit::harness::run([
        idem_testkit::harness::child_cases(
            ROLE,
            idem_testkit::test_cases!([], multi_thread(2); child_exactly_once, child_crash),
        ),
        idem_testkit::test_cases!([], multi_thread(2); unreachable_server_fails_closed),
        idem_testkit::test_cases!([POSTGRES], multi_thread(2);
            cross_process_exactly_once,
            crash_takeover_after_sigkill,
            terminated_connections_recover,
            hostile_keys_touch_only_their_own_record,
            sweep_removes_expired_rows_only_in_batches,
            notifications_wake_waiters_of_another_store,
            claims_report_takeovers_and_migrate_is_concurrent_safe,
            racing_takeovers_have_one_winner,
            database_outage_and_recovery_through_a_proxy,
            a_missing_table_says_to_migrate),
        idem_testkit::test_cases!([POSTGRES], multi_thread(4); contract_v2_retries_are_recognised),
    ])
}
