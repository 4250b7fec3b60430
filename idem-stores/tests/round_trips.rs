//! What one call costs in round trips, per store: a fresh call (claim + complete), a replay
//! and a renewal, counted on the server's side where it can tell (Redis `INFO commandstats`,
//! on a private server started for the test) and as the statements the driver sends for the
//! SQL stores (sqlx's `sqlx::query` events, counted by a tracing subscriber). Keeping a
//! claim's start, lease and renewals must cost none: a claim and a renewal stay one command or
//! one statement each.
//!
//! Private Redis servers need `redis-server` (and `IDEM_TEST_VALKEY81_SERVER`, a Valkey 8.1
//! binary, for the native `SET … IFEQ` path); SQL servers `IDEM_TEST_POSTGRES_URL` and
//! `IDEM_TEST_MYSQL_URL`.
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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idem_core::{Call, Claim, Error, Store};
use idem_testkit::{claim_request, fresh_key};

const N: u64 = 20;

/// Round trips per operation, for the report and the checks.
#[derive(Debug, PartialEq)]
struct Cost {
    fresh: f64,
    replay: f64,
    renew: f64,
}

/// Runs N fresh calls, N replays and N renewals, reading `count` (round trips so far) around
/// each batch.
async fn measure<F, Fut>(store: &dyn Store, count: F) -> Cost
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let run = |key: u64| {
        Call::new("round_trips::call")
            .key(key)
            .run(store, async { Ok::<_, Error>(7u32) })
    };
    let base = fresh_key().0[0] as u64 * 1_000_000 + u64::from(std::process::id()) * 1000;
    // Warm up: connections, scripts loaded (a renewal's too), the server's clock read.
    for i in 0..3 {
        run(base + 900 + i).await.unwrap();
        run(base + 900 + i).await.unwrap();
    }
    let warm = fresh_key();
    let (req, token) = claim_request(warm, Duration::from_secs(60));
    assert!(matches!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { .. }
    ));
    store
        .renew(&warm, token, Duration::from_secs(60))
        .await
        .unwrap();
    store.remove(&warm).await.unwrap();
    let before = count().await;
    for i in 0..N {
        run(base + i).await.unwrap();
    }
    let fresh = (count().await - before) as f64 / N as f64;
    let before = count().await;
    for i in 0..N {
        run(base + i).await.unwrap();
    }
    let replay = (count().await - before) as f64 / N as f64;
    let key = fresh_key();
    let (req, token) = claim_request(key, Duration::from_secs(60));
    assert!(matches!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { .. }
    ));
    let before = count().await;
    for _ in 0..N {
        store
            .renew(&key, token, Duration::from_secs(60))
            .await
            .unwrap();
    }
    let renew = (count().await - before) as f64 / N as f64;
    store.remove(&key).await.unwrap();
    for i in (0..N).chain(900..903) {
        Call::new("round_trips::call")
            .key(base + i)
            .forget(store)
            .await
            .unwrap();
    }
    Cost {
        fresh,
        replay,
        renew,
    }
}

// ---- Redis: a private server, `INFO commandstats` ----

struct Server {
    child: std::process::Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(bin: &str) -> Server {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = std::process::Command::new(bin)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the server");
    let url = format!("redis://127.0.0.1:{port}");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Server { child, url }
}

/// Commands the server ran, by name, without those of the measurement itself (`INFO`) and of
/// the store's background readings (`TIME`, the server's clock every 5 s).
#[cfg(feature = "redis")]
async fn commands(conn: &mut redis::aio::MultiplexedConnection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|f| f.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .filter(|(name, _)| name != "info" && name != "time")
        .collect()
}

/// Counts the commands clients send to the server at `addr` (round trips), from a `MONITOR`
/// feed: commands that scripts run (`[0 lua]`) are not round trips, nor are the store's
/// background readings (`TIME`, `INFO`).
#[cfg(feature = "redis")]
fn monitor(addr: &str) -> std::sync::Arc<AtomicU64> {
    use std::io::{BufRead, Write};
    let sent = std::sync::Arc::new(AtomicU64::new(0));
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.write_all(b"MONITOR\r\n").unwrap();
    let counter = std::sync::Arc::clone(&sent);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            let lower = line.to_ascii_lowercase();
            if line.starts_with('+')
                && line.contains('[')
                && !lower.contains(" lua]")
                && !lower.contains("] \"info\"")
                && !lower.contains("] \"time\"")
            {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    sent
}

#[cfg(feature = "redis")]
async fn redis_on(bin: &str, native: bool) -> Cost {
    let server = start_server(bin);
    let store = idem_stores::RedisStore::builder(server.url.clone())
        .native_cas(if native {
            idem_stores::redis::NativeCas::Always
        } else {
            idem_stores::redis::NativeCas::Never
        })
        .build()
        .await
        .unwrap();
    let sent = monitor(server.url.trim_start_matches("redis://"));
    let total = || async {
        // The feed trails the replies a little.
        tokio::time::sleep(Duration::from_millis(100)).await;
        sent.load(Ordering::SeqCst)
    };
    let mut conn = redis::Client::open(server.url.clone())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let before = commands(&mut conn).await;
    let cost = measure(&store, total).await;
    let after = commands(&mut conn).await;
    let ran: BTreeMap<_, _> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .collect();
    println!(
        "{}: every command the server ran (script bodies included) during the measurement: {ran:?}",
        if native { "native" } else { "scripts" }
    );
    drop(server);
    cost
}

#[cfg(feature = "redis")]
async fn redis_scripts() {
    let cost = redis_on("redis-server", false).await;
    println!("redis (scripts): {cost:?}");
    // claim (SET NX GET) + complete (EVALSHA); replay (GET); renew (EVALSHA).
    assert_eq!(
        cost,
        Cost {
            fresh: 2.0,
            replay: 1.0,
            renew: 1.0
        }
    );
}

#[cfg(feature = "redis")]
async fn valkey_native() {
    let Some(bin) = idem_testkit::env_url("IDEM_TEST_VALKEY81_SERVER") else {
        return;
    };
    let cost = redis_on(&bin, true).await;
    println!("valkey 8.1 (SET IFEQ): {cost:?}");
    // claim (SET NX GET) + complete (SET IFEQ); replay (GET); renew (SET IFEQ).
    assert_eq!(
        cost,
        Cost {
            fresh: 2.0,
            replay: 1.0,
            renew: 1.0
        }
    );
}

// ---- SQL: statements sent, from sqlx's `sqlx::query` events ----

static STATEMENTS: AtomicU64 = AtomicU64::new(0);

/// Counts sqlx's statement events; everything else is off.
struct Counter;

impl tracing::Subscriber for Counter {
    fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
        meta.target() == "sqlx::query"
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if event.metadata().target() == "sqlx::query" {
            // A connection's set-up (MySQL's `SET sql_mode=..., time_zone=...` when the pool
            // opens one) is not a round trip of any operation: a pool opens connections when
            // it likes (the renewal lane's first connection, say).
            let mut setup = SetUp(false);
            event.record(&mut setup);
            if !setup.0 {
                STATEMENTS.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Whether an event's statement is a connection's set-up (`SET ...`).
struct SetUp(bool);

impl tracing::field::Visit for SetUp {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "db.statement" || field.name() == "summary" {
            self.0 |= value.trim_start().to_ascii_uppercase().starts_with("SET ");
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "db.statement" || field.name() == "summary" {
            let text = format!("{value:?}");
            let text = text.trim_start_matches(['"', ' ', '\n']);
            self.0 |= text.to_ascii_uppercase().starts_with("SET ");
        }
    }
}

fn count_statements() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(Counter);
    });
}

async fn statements() -> u64 {
    // Whatever the previous phase left running (a settle finishing in a task of its own)
    // lands before the count is read, not in the next phase's.
    tokio::time::sleep(Duration::from_millis(100)).await;
    STATEMENTS.load(Ordering::SeqCst)
}

#[cfg(feature = "sqlite")]
async fn sqlite() {
    let dir = std::env::temp_dir().join(format!("idem-rt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = idem_stores::SqliteStore::builder()
        .url(format!("sqlite://{}", dir.join("rt.db").display()))
        .connect()
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let cost = measure(&store, statements).await;
    println!("sqlite: {cost:?}");
    // The claim reads, then writes (`SqliteStore`'s claim); the completion; the renewal.
    assert_eq!(
        cost,
        Cost {
            fresh: 3.0,
            replay: 1.0,
            renew: 1.0
        }
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(feature = "postgres")]
async fn postgres() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL") else {
        return;
    };
    let table = sql_common::unique_table("rt");
    let store = idem_stores::PostgresStore::builder()
        .url(url)
        .table(&table)
        .notify(false)
        .connect()
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let cost = measure(&store, statements).await;
    println!("postgres: {cost:?}");
    assert_eq!(
        cost,
        Cost {
            fresh: 2.0,
            replay: 1.0,
            renew: 1.0
        }
    );
    sql_common::pg_drop_tables(store.pool(), &table).await;
}

#[cfg(feature = "mysql")]
async fn mysql() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let table = sql_common::unique_table("rt");
    let store = idem_stores::MySqlStore::builder()
        .url(url)
        .table(&table)
        .connect()
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let cost = measure(&store, statements).await;
    println!("mysql: {cost:?}");
    // The claim's upsert, its outcome code read back (`LAST_INSERT_ID`), the completion.
    assert_eq!(
        cost,
        Cost {
            fresh: 3.0,
            replay: 1.0,
            renew: 1.0
        }
    );
    sql_common::mysql_drop_tables(store.pool(), &table).await;
}

/// The SQL stores one after another: the statement counter is process-wide.
#[cfg(all(feature = "sqlite", feature = "postgres", feature = "mysql"))]
async fn sql_statements() {
    count_statements();
    sqlite().await;
    postgres().await;
    mysql().await;
}

// Each store's cases only with its feature: pushed one by one.
#[allow(clippy::vec_init_then_push)]
fn main() -> std::process::ExitCode {
    #[allow(unused_mut)]
    let mut cases: Vec<Vec<idem_testkit::harness::Case>> = Vec::new();
    #[cfg(feature = "redis")]
    cases.push(idem_testkit::test_cases!([backends::REDIS_SERVER], current_thread; redis_scripts));
    #[cfg(feature = "redis")]
    cases.push(
        idem_testkit::test_cases!([backends::VALKEY81_SERVER], current_thread; valkey_native),
    );
    #[cfg(all(feature = "sqlite", feature = "postgres", feature = "mysql"))]
    cases.push(idem_testkit::test_cases!(
        [backends::POSTGRES, backends::MYSQL], current_thread; sql_statements));
    idem_testkit::harness::run(cases)
}
