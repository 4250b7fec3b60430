//! MySqlStore beyond the conformance suite: the claim's outcome codes on a reused connection,
//! the sweep, outages (wrong port, killed connections), hostile keys and scopes seen from the
//! table, the value limit against `max_allowed_packet`, concurrent migrations.
//!
//! Runs when `IDEM_TEST_MYSQL_URL` is set (e.g. `mysql://root@127.0.0.1:3306/test`); prints
//! `skipped: ...` and passes otherwise (fails under `CI`). Each test makes its own tables and
//! drops them.
#![cfg(feature = "mysql")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/sql_common.rs"]
mod sql_common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::{Call, Claim, ClaimRequest, Error, FencingToken, Key, RecordState, Store};
use idem_stores::MySqlStore;
use idem_testkit::{env_url, fresh_key};
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
use sqlx::{AssertSqlSafe, Connection};

const LONG: Duration = Duration::from_secs(30);

/// A table name unique to this test and run, dropped when the guard goes out of scope — also
/// when the test fails — from a connection of its own.
struct Table(String);

impl Table {
    fn unique() -> Self {
        Table(format!(
            "idem_t_{}",
            FencingToken::random().0 % 1_000_000_000_000
        ))
    }
}

impl std::ops::Deref for Table {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        let Ok(url) = std::env::var("IDEM_TEST_MYSQL_URL") else {
            return;
        };
        let sql = format!("DROP TABLE IF EXISTS `{0}`, `{0}_steps`", self.0);
        // A thread with its own runtime: this may run while a test runtime unwinds.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut c = sqlx::MySqlConnection::connect(&url).await?;
                sqlx::query(AssertSqlSafe(sql)).execute(&mut c).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
    }
}

async fn pool(url: &str, max: u32) -> MySqlPool {
    MySqlPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .expect("connect to IDEM_TEST_MYSQL_URL")
}

/// A migrated store on a fresh table, and the table's guard.
async fn store_on(
    pool: MySqlPool,
    f: impl FnOnce(idem_stores::MySqlStoreBuilder) -> idem_stores::MySqlStoreBuilder,
) -> (MySqlStore, Table) {
    let table = Table::unique();
    let store = f(MySqlStore::builder().pool(pool).table(&*table))
        .build()
        .expect("build");
    store.migrate().await.expect("migrate");
    (store, table)
}

async fn count(pool: &MySqlPool, table: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!("SELECT COUNT(*) FROM `{table}`")))
        .fetch_one(pool)
        .await
        .expect("count")
}

fn req(key: Key, lease: Duration) -> ClaimRequest {
    ClaimRequest {
        key,
        fingerprint: None,
        token: FencingToken::random(),
        lease,
    }
}

/// The claim learns what it found from `LAST_INSERT_ID(...)` in the OK packet. On one pooled
/// connection, a conflict (which sets it) followed by a plain insert (which does not) must
/// still read as an insert: the value is the statement's, not the connection's.
async fn outcome_codes_do_not_leak_between_statements_on_one_connection() {
    let Some(url) = env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let pool = pool(&url, 1).await;
    let (store, _table) = store_on(pool.clone(), |b| b).await;
    for _ in 0..5 {
        let a = fresh_key();
        let ra = req(a, LONG);
        assert_eq!(
            store.claim(&ra).await.unwrap(),
            Claim::Acquired { taken_over: false }
        );
        assert!(matches!(
            store.claim(&req(a, LONG)).await.unwrap(),
            Claim::InProgress { .. }
        ));
        let b = fresh_key();
        assert_eq!(
            store.claim(&req(b, LONG)).await.unwrap(),
            Claim::Acquired { taken_over: false },
            "a fresh insert after a conflict on the same connection"
        );
        store.complete(&a, ra.token, b"done", LONG).await.unwrap();
        assert!(matches!(
            store.claim(&req(a, LONG)).await.unwrap(),
            Claim::Completed(_)
        ));
        assert_eq!(
            store.claim(&req(fresh_key(), LONG)).await.unwrap(),
            Claim::Acquired { taken_over: false },
            "a fresh insert after a replay on the same connection"
        );
    }
}

/// A completed record past its ttl is claimed afresh (not a takeover); a lapsed claim is a
/// takeover with a lease remaining reported while it was live.
async fn expired_record_is_reclaimed_and_lapsed_claim_taken_over() {
    let Some(url) = env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let pool = pool(&url, 4).await;
    let (store, _table) = store_on(pool.clone(), |b| b).await;

    let key = fresh_key();
    let first = req(key, LONG);
    store.claim(&first).await.unwrap();
    store
        .complete(&key, first.token, b"v1", Duration::from_millis(200))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        store.get(&key).await.unwrap(),
        None,
        "expired record reads as absent"
    );
    let second = req(key, Duration::from_millis(200));
    assert_eq!(
        store.claim(&second).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
    match store.claim(&req(key, LONG)).await.unwrap() {
        Claim::InProgress {
            lease_remaining: Some(r),
            ..
        } => assert!(r <= Duration::from_millis(200), "{r:?}"),
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(350)).await;
    let third = req(key, LONG);
    assert_eq!(
        store.claim(&third).await.unwrap(),
        Claim::Acquired { taken_over: true }
    );
    assert!(matches!(
        store.complete(&key, second.token, b"late", LONG).await,
        Err(idem_core::StoreError::Fenced)
    ));
    store
        .complete(&key, third.token, b"v3", LONG)
        .await
        .unwrap();
    match store.get(&key).await.unwrap() {
        Some(RecordState::Completed(rec)) => assert_eq!(&rec.value[..], b"v3"),
        other => panic!("{other:?}"),
    }
}

/// MySQL reports rows *changed*: renewing twice within one millisecond writes the same
/// deadline. That must not read as a lost claim.
async fn back_to_back_renewals_are_not_fenced() {
    let Some(url) = env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let pool = pool(&url, 4).await;
    let (store, _table) = store_on(pool.clone(), |b| b).await;
    let key = fresh_key();
    let r = req(key, LONG);
    store.claim(&r).await.unwrap();
    let renewals: Vec<_> = (0..40)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.renew(&key, r.token, LONG).await })
        })
        .collect();
    for t in renewals {
        t.await.unwrap().expect("renew under the current token");
    }
    assert!(matches!(
        store.renew(&key, FencingToken::random(), LONG).await,
        Err(idem_core::StoreError::Fenced)
    ));
}

/// `purge_expired` deletes expired completed records and lapsed claims (past the grace),
/// `batch` at a time, and leaves every live record alone.
async fn sweep_removes_expired_rows_only_in_batches() {
    let Some(url) = env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let pool = pool(&url, 8).await;
    let (store, table) =
        store_on(pool.clone(), |b| b.lease_grace(Duration::from_millis(100))).await;
    let short = Duration::from_millis(150);
    let mut live = Vec::new();
    // 25 completed records that expire, 5 claims that lapse, 10 live records, 5 live claims.
    for i in 0..45 {
        let key = fresh_key();
        let lease = if (25..30).contains(&i) { short } else { LONG };
        let r = req(key, lease);
        assert_eq!(
            store.claim(&r).await.unwrap(),
            Claim::Acquired { taken_over: false }
        );
        match i {
            0..=24 => store.complete(&key, r.token, b"old", short).await.unwrap(),
            25..=29 => {}
            30..=39 => {
                store.complete(&key, r.token, b"live", LONG).await.unwrap();
                live.push(key);
            }
            _ => live.push(key),
        }
    }
    // Expired long enough ago: the completed ones at 150 ms, the claims at 150 + 100 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&pool, &table).await, 45);
    let mut batches = Vec::new();
    loop {
        let n = store.purge_expired(12).await.unwrap();
        batches.push(n);
        if n < 12 {
            break;
        }
    }
    assert_eq!(batches, vec![12, 12, 6], "30 expired rows in batches of 12");
    assert_eq!(count(&pool, &table).await, 15);
    for key in &live {
        assert!(
            store.get(key).await.unwrap().is_some(),
            "a live record was swept"
        );
    }
    assert_eq!(store.purge_expired(100).await.unwrap(), 0);

    // The background sweeper does the same on its own.
    let key = fresh_key();
    let r = req(key, LONG);
    store.claim(&r).await.unwrap();
    store
        .complete(&key, r.token, b"x", Duration::from_millis(50))
        .await
        .unwrap();
    let sweeper = MySqlStore::builder()
        .pool(pool.clone())
        .table(&*table)
        .sweep_every(Duration::from_millis(50), 5)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while count(&pool, &table).await != 15 {
        assert!(
            Instant::now() < deadline,
            "the sweeper did not remove the expired row"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    drop(sweeper);
}

/// Keys and scopes full of quotes, semicolons, backslashes and NUL bytes are hashed and bound:
/// each call makes exactly its own row, a sentinel record is untouched, the table survives.
async fn hostile_keys_and_scopes_touch_only_their_own_record() {
    let Some(url) = env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let pool = pool(&url, 8).await;
    let (store, table) = store_on(pool.clone(), |b| b).await;
    let sentinel = fresh_key();
    let s = req(sentinel, LONG);
    store.claim(&s).await.unwrap();
    store
        .complete(&sentinel, s.token, b"sentinel", LONG)
        .await
        .unwrap();

    let drop_it = format!("x'); DROP TABLE `{table}`; --");
    let keys: Vec<String> = vec![
        drop_it.clone(),
        "'".into(),
        "\"".into(),
        "`".into(),
        ";".into(),
        "\\".into(),
        "\0".into(),
        "a\0b'c;d".into(),
        "' OR '1'='1".into(),
        format!("{drop_it}\0{drop_it}"),
    ];
    let scopes = [None, Some("tenant'; DELETE FROM x; --"), Some("\0\0")];
    let runs = AtomicUsize::new(0);
    for round in 0..2 {
        for (i, key) in keys.iter().enumerate() {
            for (j, scope) in scopes.iter().enumerate() {
                let mut call = Call::new("mysql::hostile").key(key);
                if let Some(scope) = scope {
                    call = call.scope(scope);
                }
                let got: Result<String, Error> = call
                    .run(&store, async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok(format!("{i}/{j}"))
                    })
                    .await;
                assert_eq!(got.unwrap(), format!("{i}/{j}"), "round {round}");
            }
        }
    }
    let distinct = keys.len() * scopes.len();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        distinct,
        "each record ran once, then replayed"
    );
    assert_eq!(count(&pool, &table).await, distinct as i64 + 1);
    match store.get(&sentinel).await.unwrap() {
        Some(RecordState::Completed(rec)) => assert_eq!(&rec.value[..], b"sentinel"),
        other => panic!("sentinel changed: {other:?}"),
    }
}

/// Table names are validated; nothing but a plain identifier reaches SQL.
async fn hostile_table_names_are_refused() {
    let pool = MySqlPoolOptions::new()
        .connect_lazy("mysql://root@127.0.0.1:1/none")
        .unwrap();
    for bad in ["t; DROP TABLE x", "t`", "", "a.b.c", "1t", "t--", "t'"] {
        assert!(
            MySqlStore::builder()
                .pool(pool.clone())
                .table(bad)
                .build()
                .is_err(),
            "{bad:?} accepted"
        );
    }
    assert!(MySqlStore::builder()
        .pool(pool.clone())
        .table("db.t_1")
        .build()
        .is_ok());
    assert!(MySqlStore::builder()
        .pool(pool)
        .max_value_size(64 << 20)
        .build()
        .is_err());
}

/// With the server unreachable (nothing listens on the port), a call fails with
/// `Error::Store` promptly and its body never runs.
async fn unreachable_server_fails_closed() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let pool = MySqlPoolOptions::new()
        .acquire_timeout(Duration::from_millis(1500))
        .connect_lazy(&format!("mysql://root@127.0.0.1:{port}/test"))
        .unwrap();
    let store = MySqlStore::builder().pool(pool).build().unwrap();
    let ran = AtomicUsize::new(0);
    let t = Instant::now();
    let got: Result<u32, Error> = Call::new("mysql::outage")
        .key("k")
        .run(&store, async {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok(1)
        })
        .await;
    assert!(matches!(got, Err(Error::Store(_))), "{got:?}");
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "the body ran without the store"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    println!("unreachable: Error::Store after {:?}: {got:?}", t.elapsed());
    assert!(store.migrate().await.is_err());
}

/// KILL every connection of the store's pool from another session: the same store (no
/// rebuild) serves the next calls, and no call runs its body twice.
async fn killed_connections_are_replaced() {
    let Some(url) = env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let pool = pool(&url, 4).await;
    let (store, _table) = store_on(pool.clone(), |b| b).await;
    let runs = AtomicUsize::new(0);
    let call = |k: u32| {
        let runs = &runs;
        let store = &store;
        async move {
            Call::new("mysql::kill")
                .key(k)
                .run(store, async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<u32, Error>(k)
                })
                .await
        }
    };
    assert_eq!(call(0).await.unwrap(), 0);

    // Open all four pooled connections at once and learn their ids.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(pool.acquire().await.unwrap());
    }
    let mut ids = Vec::new();
    for c in held.iter_mut() {
        let id: u64 = sqlx::query_scalar("SELECT CAST(CONNECTION_ID() AS UNSIGNED)")
            .fetch_one(&mut **c)
            .await
            .unwrap();
        ids.push(id);
    }
    drop(held);
    let mut admin = sqlx::MySqlConnection::connect(&url).await.unwrap();
    for id in &ids {
        sqlx::query("KILL CONNECTION ?")
            .bind(id)
            .execute(&mut admin)
            .await
            .expect("kill");
    }
    // Wait until the server has dropped them all.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let alive: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM information_schema.processlist WHERE id IN ({})",
            ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
        )))
        .fetch_one(&mut admin)
        .await
        .unwrap();
        if alive == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "killed connections linger");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The same store recovers: every following call succeeds (the pool tests a connection
    // before handing it out and replaces the dead ones). A failure, if a dead connection
    // slipped through, must be Error::Store without running the body.
    let mut failures = 0;
    for k in 1..=20u32 {
        match call(k).await {
            Ok(v) => assert_eq!(v, k),
            Err(Error::Store(_)) => failures += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(failures <= 4, "{failures} calls failed after the kill");
    for k in 1..=20u32 {
        assert_eq!(call(k).await.unwrap(), k, "recovered");
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        21,
        "each key ran exactly once ({failures} failures before recovery)"
    );
    println!(
        "killed {} connections; {failures} calls failed afterwards",
        ids.len()
    );
}

/// The value limit is lowered to fit `max_allowed_packet`, and a value at the lowered limit
/// still round-trips.
async fn value_limit_fits_max_allowed_packet() {
    let Some(url) = env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let pool = pool(&url, 2).await;
    let packet: u64 = sqlx::query_scalar("SELECT CAST(@@max_allowed_packet AS UNSIGNED)")
        .fetch_one(&pool)
        .await
        .unwrap();
    let (store, _table) = store_on(pool.clone(), |b| b.max_value_size((1 << 24) - 1)).await;
    let limit = store.max_value_size();
    assert!(
        limit as u64 <= packet && limit < (1 << 24),
        "limit {limit}, packet {packet}"
    );
    let key = fresh_key();
    let r = req(key, LONG);
    store.claim(&r).await.unwrap();
    let value = vec![0xa5u8; limit];
    store
        .complete(&key, r.token, &value, LONG)
        .await
        .expect("a value at the limit");
    match store.claim(&req(key, LONG)).await.unwrap() {
        Claim::Completed(rec) => assert!(rec.value == value),
        other => panic!("{other:?}"),
    }
}

/// Several processes start at once: `migrate` is safe to run concurrently and repeatedly.
async fn concurrent_migrations_are_idempotent() {
    let Some(url) = env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let pool = pool(&url, 8).await;
    let table = Table::unique();
    let store = MySqlStore::builder()
        .pool(pool.clone())
        .table(&*table)
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.migrate().await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("migrate");
    }
    store.migrate().await.expect("again");
    let store: Arc<dyn Store> = Arc::new(store);
    assert_eq!(
        store.claim(&req(fresh_key(), LONG)).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
}

/// A claim under a token that already holds the key is that holder's own claim (a run of the
/// statement whose answer was lost with its connection): it is acquired, not a conflict.
async fn a_claim_under_its_own_token_is_acquired() {
    let Some(url) = env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let pool = pool(&url, 2).await;
    let (store, _table) = store_on(pool.clone(), |b| b).await;
    let key = fresh_key();
    let r = req(key, LONG);
    assert_eq!(
        store.claim(&r).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
    assert_eq!(
        store.claim(&r).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
    assert!(matches!(
        store.claim(&req(key, LONG)).await.unwrap(),
        Claim::InProgress { .. }
    ));
    store.complete(&key, r.token, b"v", LONG).await.unwrap();
}

/// The connection running a claim is killed while the claim waits for a row lock: the store
/// runs the statement again on a fresh connection and the caller gets its answer, not an
/// error.
async fn a_claim_whose_connection_is_killed_mid_statement_is_retried() {
    let Some(url) = env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let pool = pool(&url, 4).await;
    let (store, table) = store_on(pool.clone(), |b| b).await;
    let key = fresh_key();
    let first = req(key, LONG);
    store.claim(&first).await.unwrap();
    store
        .complete(&key, first.token, b"old", Duration::from_millis(50))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Lock the (expired) row from another session, so that the claim blocks on it.
    let mut admin = sqlx::MySqlConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut admin).await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "SELECT k FROM `{table}` WHERE k = ? FOR UPDATE"
    )))
    .bind(&key.0[..])
    .fetch_all(&mut admin)
    .await
    .unwrap();
    let claim = {
        let store = store.clone();
        tokio::spawn(async move { store.claim(&req(key, LONG)).await })
    };
    // Find the claim's connection, blocked in the INSERT, and kill it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let victim: u64 = loop {
        let id: Option<u64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT CAST(id AS UNSIGNED) FROM information_schema.processlist \
             WHERE info LIKE 'INSERT INTO `{table}`%' LIMIT 1"
        )))
        .fetch_optional(&mut admin)
        .await
        .unwrap();
        if let Some(id) = id {
            break id;
        }
        assert!(Instant::now() < deadline, "the claim never blocked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut killer = sqlx::MySqlConnection::connect(&url).await.unwrap();
    sqlx::query("KILL CONNECTION ?")
        .bind(victim)
        .execute(&mut killer)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    sqlx::query("COMMIT").execute(&mut admin).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), claim)
        .await
        .expect("claim hangs")
        .unwrap();
    println!("claim after its connection was killed: {got:?}");
    assert_eq!(got.unwrap(), Claim::Acquired { taken_over: false });
}

/// A TCP proxy in front of the server that can be stopped (every connection cut, the port
/// closed) and started again on the same port: a server outage as clients see it, without
/// stopping the shared server. Plain threads, so that it shares nothing with the test's
/// runtime.
struct Proxy {
    port: u16,
    upstream: String,
    running: Option<ProxyRun>,
}

struct ProxyRun {
    stop: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    acceptor: std::thread::JoinHandle<()>,
}

impl Proxy {
    fn start(upstream: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut p = Proxy {
            port,
            upstream: upstream.to_owned(),
            running: None,
        };
        p.resume();
        p
    }

    fn resume(&mut self) {
        let listener = std::net::TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop2, conns2, upstream) = (stop.clone(), conns.clone(), self.upstream.clone());
        let acceptor = std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                    continue;
                };
                let mut guard = conns2.lock().unwrap();
                guard.push(client.try_clone().unwrap());
                guard.push(server.try_clone().unwrap());
                drop(guard);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        self.running = Some(ProxyRun {
            stop,
            conns,
            acceptor,
        });
    }

    /// Cuts every connection and closes the port.
    fn stop(&mut self) {
        if let Some(run) = self.running.take() {
            run.stop.store(true, Ordering::SeqCst);
            // Wake the acceptor so that it sees the flag and drops the listener.
            let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
            let _ = run.acceptor.join();
            for c in run.conns.lock().unwrap().drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The server goes away (every pooled connection cut, the port closed): calls fail with
/// `Error::Store` within the store's bounds and never run their body. When it is back on the
/// same address the same store serves again, and each key runs exactly once.
async fn outage_and_recovery_through_a_stopped_proxy() {
    let Some(url) = env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let opts: sqlx::mysql::MySqlConnectOptions = url.parse().unwrap();
    let upstream = format!("{}:{}", opts.get_host(), opts.get_port());
    let mut proxy = Proxy::start(&upstream);
    let pool = MySqlPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_millis(1500))
        .connect_with(opts.clone().port(proxy.port))
        .await
        .unwrap();
    let (store, _table) = store_on(pool, |b| b.operation_timeout(Duration::from_secs(3))).await;
    let runs = AtomicUsize::new(0);
    let call = |k: u32| {
        let (runs, store) = (&runs, &store);
        async move {
            Call::new("mysql::proxy_outage")
                .key(k)
                .run(store, async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<u32, Error>(k)
                })
                .await
        }
    };
    assert_eq!(call(0).await.unwrap(), 0);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    proxy.stop();
    for k in 1..=3 {
        let t = Instant::now();
        let got = call(k).await;
        assert!(matches!(got, Err(Error::Store(_))), "{got:?}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        println!(
            "server away: call {k} -> Error::Store after {:?}",
            t.elapsed()
        );
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a body ran while the store was away"
    );

    proxy.resume();
    for k in 0..=3 {
        assert_eq!(call(k).await.unwrap(), k);
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        4,
        "keys 1..=3 ran once each, key 0 replayed"
    );
}

/// Contract v2 at the row level: a retried claim restarts its lease, a retried completion
/// keeps the first value, foreign releases change nothing, failed renewals keep the lease.
async fn contract_v2_retries_are_recognised() {
    let Some(url) = env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let (store, _table) = store_on(pool(&url, 4).await, |b| b).await;
    sql_common::contract::all(Arc::new(store)).await;
}

/// A table that was never migrated: every operation says to call `migrate()`.
async fn a_missing_table_says_to_migrate() {
    let Some(url) = env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let table = Table::unique();
    let store = MySqlStore::builder()
        .url(url)
        .table(&*table)
        .max_connections(2)
        .connect()
        .await
        .expect("connect");
    sql_common::contract::missing_table_says_to_migrate(&store, &table).await;
}

fn main() -> std::process::ExitCode {
    use backends::MYSQL;
    idem_testkit::harness::run([
        idem_testkit::test_cases!([], current_thread; hostile_table_names_are_refused),
        idem_testkit::test_cases!([], multi_thread(2); unreachable_server_fails_closed),
        idem_testkit::test_cases!([MYSQL], multi_thread(2);
            outcome_codes_do_not_leak_between_statements_on_one_connection,
            expired_record_is_reclaimed_and_lapsed_claim_taken_over,
            back_to_back_renewals_are_not_fenced,
            sweep_removes_expired_rows_only_in_batches,
            hostile_keys_and_scopes_touch_only_their_own_record,
            killed_connections_are_replaced,
            value_limit_fits_max_allowed_packet,
            concurrent_migrations_are_idempotent,
            a_claim_under_its_own_token_is_acquired,
            a_claim_whose_connection_is_killed_mid_statement_is_retried,
            outage_and_recovery_through_a_stopped_proxy,
            a_missing_table_says_to_migrate),
        idem_testkit::test_cases!([MYSQL], multi_thread(4); contract_v2_retries_are_recognised),
    ])
}
