//! `idem-bench-wait`: how long after a call's body ends does a duplicate that was waiting for
//! it return the result? p50/p90/p99 per store, with the waiter in the same process as the
//! first call and in another process.
//!
//! ```text
//! idem-bench-wait [--samples N] [--out FILE] [STORE...]     STORE: memory redis postgres mysql sqlite
//! idem-bench-wait --child STORE TAG                        (internal: the other process)
//! ```
//!
//! One sample: the first call claims a fresh key and parks in its body; the duplicate starts,
//! finds the key in progress and waits in `Store::wait`; after a random 5–25 ms (so that a
//! polling store is caught at every phase of its poll) the body returns. The sample is the
//! time from the body's return (system clock, comparable across processes) to the duplicate's
//! return with the replayed value. It includes the completion write, the store's
//! notification (or poll), the duplicate's second claim and the decode.
//!
//! Beside each store: the raw notification it waits on (`Notify`, `PUBLISH`, `pg_notify`),
//! from the notify call to its receipt, as the baseline.
//!
//! Results go to `FILE` (default `$CARGO_TARGET_DIR/idem-bench/wait.json`) as JSON.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use idem_bench::{wall_us, Percentiles};
use idem_core::{Call, Error, Store};
use idem_stores::MemoryStore;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const NS: &str = "idem_bench::wait";
const LEASE: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(60);
/// The SQL table of the waiting bench (created by the store's `migrate`, dropped at the end).
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
const TABLE: &str = "idem_bench_wait";

#[derive(Serialize)]
struct Row {
    store: String,
    /// "same" or "cross" process, or "raw": the bare notification (no idem).
    waiter: &'static str,
    #[serde(flatten)]
    latency: Percentiles,
    /// Samples in which the duplicate ran the body itself (the measurement failed).
    errors: usize,
}

/// Opens `kind` with its bench configuration; `tag` names the run's keyspace, shared by the
/// two processes of a cross-process measurement.
async fn open(kind: &str, tag: &str) -> Result<Arc<dyn Store>, BoxError> {
    let _ = tag;
    match kind {
        "memory" => Ok(Arc::new(MemoryStore::new())),
        #[cfg(feature = "redis")]
        "redis" => {
            let store = idem_stores::RedisStore::builder(idem_bench::redis_url())
                .prefix(format!("{tag}:"))
                .connect_timeout(Duration::from_secs(3))
                .build()
                .await?;
            Ok(Arc::new(store))
        }
        #[cfg(feature = "postgres")]
        "postgres" => {
            let store = idem_stores::PostgresStore::builder()
                .url(idem_bench::postgres_url())
                .table(TABLE)
                .acquire_timeout(Duration::from_secs(3))
                .connect()
                .await?;
            store.migrate().await?;
            // Waiting is by LISTEN/NOTIFY: give the listener its connection first.
            for _ in 0..300 {
                if store.is_listening() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(Arc::new(store))
        }
        #[cfg(feature = "mysql")]
        "mysql" => {
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(3))
                .connect(&idem_bench::mysql_url())
                .await?;
            let store = idem_stores::MySqlStore::builder()
                .pool(pool)
                .table(TABLE)
                .build()?;
            store.migrate().await?;
            Ok(Arc::new(store))
        }
        #[cfg(feature = "sqlite")]
        "sqlite" => {
            let path = std::env::temp_dir().join(format!("{}.db", tag.replace(':', "-")));
            let store = idem_stores::SqliteStore::builder()
                .url(format!("sqlite://{}", path.display()))
                .table(TABLE)
                .connect()
                .await?;
            store.migrate().await?;
            Ok(Arc::new(store))
        }
        other => Err(format!("store {other:?} is unknown or its feature is off").into()),
    }
}

/// The raw notification under each store's waiting: the delay from a `notify` (memory:
/// `tokio::sync::Notify`; Redis: `PUBLISH`; PostgreSQL: `pg_notify`) to its receipt by a
/// listener, on the same client libraries. `None`: the store has no notification (it polls).
async fn raw_notify(kind: &str, samples: usize) -> Result<Option<Vec<Duration>>, BoxError> {
    let mut out = Vec::with_capacity(samples);
    match kind {
        "memory" => {
            let notify = Arc::new(tokio::sync::Notify::new());
            for i in 0..samples + 10 {
                let waiter = {
                    let notify = notify.clone();
                    tokio::spawn(async move {
                        notify.notified().await;
                        wall_us()
                    })
                };
                tokio::time::sleep(Duration::from_millis(2)).await;
                let t0 = wall_us();
                notify.notify_one();
                let t1 = waiter.await?;
                if i >= 10 {
                    out.push(Duration::from_secs_f64((t1 - t0).max(0.0) / 1e6));
                }
            }
        }
        #[cfg(feature = "redis")]
        "redis" => {
            use futures_util::StreamExt;
            let client = redis::Client::open(idem_bench::redis_url())?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            let channel = format!("{}:raw-notify", idem_bench::run_prefix());
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            let mut messages = pubsub.into_on_message();
            for i in 0..samples + 10 {
                let t0 = wall_us();
                let _: i64 = redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg("x")
                    .query_async(&mut conn)
                    .await?;
                messages.next().await.ok_or("the subscription ended")?;
                let t1 = wall_us();
                if i >= 10 {
                    out.push(Duration::from_secs_f64((t1 - t0).max(0.0) / 1e6));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        #[cfg(feature = "postgres")]
        "postgres" => {
            let url = idem_bench::postgres_url();
            let pool = sqlx::PgPool::connect(&url).await?;
            let mut listener = sqlx::postgres::PgListener::connect(&url).await?;
            listener.listen("idem_bench_raw_notify").await?;
            for i in 0..samples + 10 {
                let t0 = wall_us();
                sqlx::query("SELECT pg_notify('idem_bench_raw_notify', 'x')")
                    .execute(&pool)
                    .await?;
                listener.recv().await?;
                let t1 = wall_us();
                if i >= 10 {
                    out.push(Duration::from_secs_f64((t1 - t0).max(0.0) / 1e6));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        _ => return Ok(None),
    }
    Ok(Some(out))
}

/// Removes what `open` created on the server.
async fn clean_up(kind: &str, tag: &str) {
    let _ = tag;
    match kind {
        #[cfg(feature = "postgres")]
        "postgres" => {
            let url = idem_bench::postgres_url();
            if let Ok(pool) = sqlx::PgPool::connect(&url).await {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP TABLE IF EXISTS {TABLE}, {TABLE}_steps"
                )))
                .execute(&pool)
                .await;
            }
        }
        #[cfg(feature = "mysql")]
        "mysql" => {
            let url = idem_bench::mysql_url();
            if let Ok(pool) = sqlx::MySqlPool::connect(&url).await {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP TABLE IF EXISTS {TABLE}, {TABLE}_steps"
                )))
                .execute(&pool)
                .await;
            }
        }
        #[cfg(feature = "sqlite")]
        "sqlite" => {
            let path = std::env::temp_dir().join(format!("{}.db", tag.replace(':', "-")));
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
        _ => {}
    }
}

/// The first call: claims `key`, says so, parks until `go`, and returns the system time at
/// which its body returned.
async fn hold(
    store: &dyn Store,
    key: &str,
    claimed: oneshot::Sender<()>,
    go: oneshot::Receiver<()>,
) -> Result<f64, Error> {
    let mut t0 = 0.0;
    Call::new(NS)
        .key(key)
        .lease(LEASE)
        .ttl(TTL)
        .run(store, async {
            let _ = claimed.send(());
            let _ = go.await;
            t0 = wall_us();
            Ok::<u64, Error>(1)
        })
        .await?;
    Ok(t0)
}

/// The duplicate: returns the value it got and the system time at which it got it.
async fn duplicate(store: &dyn Store, key: &str) -> Result<(u64, f64), Error> {
    let v = Call::new(NS)
        .key(key)
        .lease(LEASE)
        .ttl(TTL)
        .wait_timeout(Duration::from_secs(10))
        .run(store, async { Ok::<u64, Error>(2) })
        .await?;
    Ok((v, wall_us()))
}

/// A small xorshift generator for the settle times (no dependency for that).
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        Jitter((wall_us() as u64) | 1)
    }
    /// 5–25 ms.
    fn settle(&mut self) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_micros(5_000 + self.0 % 20_000)
    }
}

async fn same_process(
    store: Arc<dyn Store>,
    tag: &str,
    samples: usize,
) -> Result<(Vec<Duration>, usize), BoxError> {
    let mut jitter = Jitter::new();
    let mut out = Vec::with_capacity(samples);
    let mut errors = 0;
    // The first few are warm-up (connections, script loading), not counted.
    for i in 0..samples + 10 {
        let key = format!("{tag}:same:{i}");
        let (claimed_tx, claimed_rx) = oneshot::channel();
        let (go_tx, go_rx) = oneshot::channel();
        let holder = {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move { hold(&*store, &key, claimed_tx, go_rx).await })
        };
        claimed_rx.await?;
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { duplicate(&*store, &key).await })
        };
        tokio::time::sleep(jitter.settle()).await;
        let _ = go_tx.send(());
        let t0 = holder.await??;
        let (v, t1) = waiter.await??;
        if i < 10 {
            continue;
        }
        if v == 1 {
            out.push(Duration::from_secs_f64((t1 - t0).max(0.0) / 1e6));
        } else {
            errors += 1;
        }
    }
    Ok((out, errors))
}

async fn cross_process(
    store: Arc<dyn Store>,
    kind: &str,
    tag: &str,
    samples: usize,
) -> Result<(Vec<Duration>, usize), BoxError> {
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .args(["--child", kind, tag])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut to_child = child.stdin.take().ok_or("no stdin")?;
    let mut from_child = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    expect(&mut from_child, "ready").await?;
    let mut jitter = Jitter::new();
    let mut out = Vec::with_capacity(samples);
    let mut errors = 0;
    for i in 0..samples + 10 {
        let key = format!("{tag}:cross:{i}");
        to_child
            .write_all(format!("hold {key}\n").as_bytes())
            .await?;
        expect(&mut from_child, "claimed").await?;
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { duplicate(&*store, &key).await })
        };
        tokio::time::sleep(jitter.settle()).await;
        to_child.write_all(b"go\n").await?;
        let done = expect(&mut from_child, "done ").await?;
        let t0: f64 = done["done ".len()..].trim().parse()?;
        let (v, t1) = waiter.await??;
        if i < 10 {
            continue;
        }
        if v == 1 {
            out.push(Duration::from_secs_f64((t1 - t0).max(0.0) / 1e6));
        } else {
            errors += 1;
        }
    }
    drop(to_child);
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    Ok((out, errors))
}

type ChildOut = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// The child's next line, which must start with `what`.
async fn expect(from_child: &mut ChildOut, what: &str) -> Result<String, BoxError> {
    match from_child.next_line().await? {
        Some(line) if line.starts_with(what) => Ok(line),
        other => Err(format!("child said {other:?}, expected {what:?}").into()),
    }
}

/// The other process: holds keys on command (`hold KEY`, then `go`) and reports when each
/// body returned (`done WALL_US`).
async fn child(kind: &str, tag: &str) -> Result<(), BoxError> {
    let store = open(kind, tag).await?;
    let mut stdout = tokio::io::stdout();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    stdout.write_all(b"ready\n").await?;
    stdout.flush().await?;
    while let Some(line) = lines.next_line().await? {
        let Some(key) = line.strip_prefix("hold ") else {
            return Err(format!("unexpected command {line:?}").into());
        };
        let (claimed_tx, claimed_rx) = oneshot::channel();
        let (go_tx, go_rx) = oneshot::channel();
        let holder = {
            let (store, key) = (store.clone(), key.to_owned());
            tokio::spawn(async move { hold(&*store, &key, claimed_tx, go_rx).await })
        };
        claimed_rx.await?;
        stdout.write_all(b"claimed\n").await?;
        stdout.flush().await?;
        match lines.next_line().await? {
            Some(go) if go == "go" => {}
            other => return Err(format!("expected go, got {other:?}").into()),
        }
        let _ = go_tx.send(());
        let t0 = holder.await??;
        stdout.write_all(format!("done {t0}\n").as_bytes()).await?;
        stdout.flush().await?;
    }
    Ok(())
}

async fn run(args: Vec<String>) -> Result<(), BoxError> {
    if let [flag, kind, tag] = args.as_slice() {
        if flag == "--child" {
            return child(kind, tag).await;
        }
    }
    let mut samples = 300usize;
    let mut out = idem_bench::out_dir().join("wait.json");
    let mut stores = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--samples" => samples = it.next().ok_or("--samples N")?.parse()?,
            "--out" => out = it.next().ok_or("--out FILE")?.into(),
            "--bench" => {} // passed by `cargo bench`
            _ => stores.push(a),
        }
    }
    if stores.is_empty() {
        stores.push("memory".into());
    }
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for kind in &stores {
        let tag = format!("{}-{kind}", idem_bench::run_prefix());
        let store = match open(kind, &tag).await {
            Ok(s) => s,
            Err(e) => {
                println!("skipped: {kind}: {e}");
                continue;
            }
        };
        // Polling stores are slow to wake: fewer samples keep the run short.
        let n = match kind.as_str() {
            "mysql" | "sqlite" => samples.min(150),
            _ => samples,
        };
        let mut modes = vec!["same"];
        if kind != "memory" {
            modes.push("cross");
        }
        for mode in modes {
            let result = if mode == "same" {
                same_process(store.clone(), &tag, n).await
            } else {
                cross_process(store.clone(), kind, &tag, n).await
            };
            match result {
                Ok((durations, errors)) => {
                    let p = Percentiles::of(durations);
                    println!(
                        "{kind}/{mode}: p50 {:.0} µs, p99 {:.0} µs ({} samples, {errors} errors)",
                        p.p50_us, p.p99_us, p.samples
                    );
                    rows.insert(
                        format!("{kind}/{mode}"),
                        Row {
                            store: kind.clone(),
                            waiter: mode,
                            latency: p,
                            errors,
                        },
                    );
                }
                Err(e) => println!("failed: {kind}/{mode}: {e}"),
            }
        }
        drop(store);
        clean_up(kind, &tag).await;
        match raw_notify(kind, samples).await {
            Ok(Some(durations)) => {
                let p = Percentiles::of(durations);
                println!(
                    "{kind}/raw: p50 {:.0} µs, p99 {:.0} µs ({} samples)",
                    p.p50_us, p.p99_us, p.samples
                );
                rows.insert(
                    format!("{kind}/raw"),
                    Row {
                        store: kind.clone(),
                        waiter: "raw",
                        latency: p,
                        errors: 0,
                    },
                );
            }
            Ok(None) => {}
            Err(e) => println!("failed: {kind}/raw: {e}"),
        }
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&rows)?)?;
    println!("wrote {}", out.display());
    Ok(())
}

fn main() -> std::process::ExitCode {
    let rt = idem_bench::multi_thread();
    match rt.block_on(run(std::env::args().skip(1).collect())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("idem-bench-wait: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
