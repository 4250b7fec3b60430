//! Exactly-once across real OS processes sharing one Redis (`IDEM_TEST_REDIS_URL`).
//!
//! The parent tests re-execute this test binary (`current_exe() --exact child_entry`) with
//! `IDEM_REDIS_CHILD` naming the child's role; without it `child_entry` does nothing.
//!
//! - `cross_process_exactly_once`: 4 processes × 50 concurrent tasks × the same 200 keys; the
//!   body increments a Redis counter per key. Every counter ends at exactly 1 and every one of
//!   the 40 000 callers got the first (and only) execution's result.
//! - `crash_takeover`: a child claims a key and is SIGKILLed mid-body; a second caller gets
//!   `InProgress` while the lease is live, then runs the body exactly once after it passes.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/redis_keys.rs"]
mod redis_keys;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use idem_core::{idempotent, Error};
use idem_stores::RedisStore;
use redis::AsyncCommands;

const PROCESSES: usize = 4;
const TASKS: usize = 50;
const KEYS: usize = 200;
const PREFIX: &str = "idem-test:";

/// The store's prefix for one run's records (parent and children agree on it through the run
/// id), so that the run deletes them when it is done.
fn store_prefix(run: &str) -> String {
    format!("{PREFIX}xproc:{run}:rec:")
}

/// The body's error type: the runtime's errors, or the counter's.
#[derive(Debug)]
#[allow(dead_code)] // read through Debug
enum TestError {
    Idem(Error),
    Redis(String),
}

impl From<Error> for TestError {
    fn from(e: Error) -> Self {
        TestError::Idem(e)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

async fn counters(url: &str) -> redis::aio::ConnectionManager {
    redis::Client::open(url)
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap()
}

async fn cluster_counters(nodes: &[String]) -> redis::cluster_async::ClusterConnection {
    redis::cluster::ClusterClient::new(nodes.to_vec())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap()
}

/// One idempotent "charge" per key; its side effect is an `INCR` of that key's counter. The
/// run id scopes the records, so every test run starts from fresh keys; `who` (which caller
/// this is) is skipped, so duplicates share one fingerprint.
#[idempotent(
    key = key,
    scope = run,
    namespace = "redis_processes::charge",
    ttl = "10m",
    lease = "2s",
    wait_timeout = "30s",
    store = store,
    skip(store, counters, who)
)]
async fn charge<C>(
    store: &RedisStore,
    counters: &C,
    run: &str,
    key: usize,
    who: String,
) -> Result<String, TestError>
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync,
{
    let n: i64 = counters
        .clone()
        .incr(format!("{PREFIX}xproc:{run}:count:{key}"), 1)
        .await
        .map_err(|e| TestError::Redis(e.to_string()))?;
    tokio::time::sleep(Duration::from_millis(2)).await;
    Ok(format!("{who} saw count {n}"))
}

/// The crash victim, run by a child that is killed inside the body.
#[idempotent(
    key = run,
    namespace = "redis_processes::victim",
    shared,
    lease = "500ms",
    ttl = "10m",
    store = store,
    skip(store, counters)
)]
async fn victim(
    store: &RedisStore,
    counters: &redis::aio::ConnectionManager,
    run: &str,
) -> Result<String, TestError> {
    let mut conn = counters.clone();
    let _: i64 = conn
        .incr(format!("{PREFIX}xproc:{run}:runs"), 1)
        .await
        .unwrap();
    let _: () = conn
        .set(format!("{PREFIX}xproc:{run}:started"), 1)
        .await
        .unwrap();
    // The parent kills this process here.
    tokio::time::sleep(Duration::from_secs(60)).await;
    Ok("child".to_string())
}

/// The same record as [`victim`], for a caller that does not wait.
#[idempotent(
    key = run,
    namespace = "redis_processes::victim",
    shared,
    lease = "500ms",
    ttl = "10m",
    on_conflict = reject,
    store = store,
    skip(store, counters)
)]
async fn victim_rejecting(
    store: &RedisStore,
    counters: &redis::aio::ConnectionManager,
    run: &str,
) -> Result<String, TestError> {
    let _ = counters;
    Ok(format!("must not run in {run}"))
}

/// The same record as [`victim`], for the survivor that waits and takes over.
#[idempotent(
    key = run,
    namespace = "redis_processes::victim",
    shared,
    lease = "500ms",
    ttl = "10m",
    wait_timeout = "10s",
    store = store,
    skip(store, counters)
)]
async fn victim_survivor(
    store: &RedisStore,
    counters: &redis::aio::ConnectionManager,
    run: &str,
) -> Result<String, TestError> {
    let _: i64 = counters
        .clone()
        .incr(format!("{PREFIX}xproc:{run}:runs"), 1)
        .await
        .unwrap();
    Ok("survivor".to_string())
}

/// A child's share of the exactly-once run: 50 tasks, each calling `charge` on all 200 keys.
async fn exactly_once_child<C>(store: RedisStore, counters: C, run: &'static str)
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    let start_at: u64 = std::env::var("IDEM_XPROC_START").unwrap().parse().unwrap();
    tokio::time::sleep(Duration::from_millis(start_at.saturating_sub(unix_ms()))).await;
    let pid = std::process::id();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = store.clone();
            let counters = counters.clone();
            tokio::spawn(async move {
                let mut out = Vec::with_capacity(KEYS);
                for j in 0..KEYS {
                    // Tasks start at different keys and walk them all, so every key sees
                    // concurrent duplicates from every process.
                    let key = (j + t * 7) % KEYS;
                    let r = charge(&store, &counters, run, key, format!("{pid}/{t}")).await;
                    out.push((key, r));
                }
                out
            })
        })
        .collect();
    for t in tasks {
        for (key, r) in t.await.unwrap() {
            match r {
                Ok(v) => println!("RESULT {key} {v}"),
                Err(e) => println!("ERROR {key} {e:?}"),
            }
        }
    }
}

/// The child side: does nothing unless `IDEM_REDIS_CHILD` is set by a parent test.
async fn child_entry() {
    let Ok(role) = std::env::var("IDEM_REDIS_CHILD") else {
        return;
    };
    let url = std::env::var("IDEM_TEST_REDIS_URL").unwrap();
    let run = leak(std::env::var("IDEM_XPROC_RUN").unwrap());
    if let Ok(nodes) = std::env::var("IDEM_XPROC_CLUSTER") {
        let nodes: Vec<String> = nodes.split(',').map(String::from).collect();
        let store = RedisStore::cluster_builder(nodes.clone())
            .prefix(store_prefix(run))
            .build()
            .await
            .unwrap();
        let counters = cluster_counters(&nodes).await;
        assert_eq!(role, "exactly_once");
        return exactly_once_child(store, counters, run).await;
    }
    let store = RedisStore::builder(url.as_str())
        .prefix(store_prefix(run))
        .build()
        .await
        .unwrap();
    let counters = counters(&url).await;
    match role.as_str() {
        "exactly_once" => exactly_once_child(store, counters, run).await,
        "crash" => {
            let r = victim(&store, &counters, run).await;
            println!("UNEXPECTED {r:?}");
        }
        other => panic!("unknown child role {other}"),
    }
}

fn child(role: &str, url: &str, run: &str, extra: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_entry",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env("IDEM_REDIS_CHILD", role)
    .env("IDEM_TEST_REDIS_URL", url)
    .env("IDEM_XPROC_RUN", run)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd
}

fn run_id() -> String {
    format!("{}-{}", std::process::id(), unix_ms())
}

/// Runs 4 children against one server (`cluster` None) or a cluster, and checks that every
/// counter is 1 and every caller got the same, first result.
async fn exactly_once_across_processes<C>(url: &str, cluster: Option<String>, mut counters: C)
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync,
{
    let run = run_id();
    let start_at = unix_ms() + 1500;
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            let mut extra = vec![("IDEM_XPROC_START", start_at.to_string())];
            if let Some(nodes) = &cluster {
                extra.push(("IDEM_XPROC_CLUSTER", nodes.clone()));
            }
            child("exactly_once", url, &run, &extra).spawn().unwrap()
        })
        .collect();
    let outputs: Vec<_> = tokio::task::spawn_blocking(move || {
        children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();

    let mut results: HashMap<usize, Vec<String>> = HashMap::new();
    for out in &outputs {
        assert!(out.status.success(), "a child failed: {:?}", out.status);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // The harness prints "test child_entry ... " without a newline before the body.
            assert!(!line.contains("ERROR "), "a call failed: {line}");
            if let Some(rest) = line.split_once("RESULT ").map(|(_, r)| r) {
                let (key, value) = rest.split_once(' ').unwrap();
                results
                    .entry(key.parse().unwrap())
                    .or_default()
                    .push(value.to_string());
            }
        }
    }
    assert_eq!(results.len(), KEYS, "every key was called");
    for key in 0..KEYS {
        let values = &results[&key];
        assert_eq!(
            values.len(),
            PROCESSES * TASKS,
            "every caller answered for key {key}"
        );
        assert!(
            values.iter().all(|v| v == &values[0]),
            "key {key}: callers got different results: {:?}",
            values.iter().collect::<std::collections::HashSet<_>>()
        );
        assert!(
            values[0].ends_with("saw count 1"),
            "key {key}: {}",
            values[0]
        );
        let n: i64 = counters
            .get(format!("{PREFIX}xproc:{run}:count:{key}"))
            .await
            .unwrap();
        assert_eq!(n, 1, "key {key}: the body ran {n} times");
    }
    // Leave nothing behind on a shared server: the counters, and the records (a cluster is
    // this test's own, and goes with it).
    if cluster.is_none() {
        redis_keys::delete_prefix(url, &store_prefix(&run)).await;
    }
    let _: () = counters
        .del(
            (0..KEYS)
                .map(|key| format!("{PREFIX}xproc:{run}:count:{key}"))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap_or(());
    println!(
        "{} processes x {} tasks x {} keys{}: every counter is 1, {} callers agree",
        PROCESSES,
        TASKS,
        KEYS,
        if cluster.is_some() {
            " on a 3-master cluster"
        } else {
            ""
        },
        PROCESSES * TASKS * KEYS
    );
}

async fn cross_process_exactly_once() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_REDIS_URL") else {
        return;
    };
    exactly_once_across_processes(&url, None, counters(&url).await).await;
}

/// The same against a three-master Redis Cluster started for this test.
async fn cross_process_exactly_once_on_a_cluster() {
    if !redis_server::available() {
        return;
    }
    let cluster = redis_server::RedisCluster::start();
    let urls = cluster.urls();
    let counters = cluster_counters(&urls).await;
    exactly_once_across_processes(&urls[0], Some(urls.join(",")), counters).await;
}

async fn crash_takeover() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_REDIS_URL") else {
        return;
    };
    let run = leak(run_id());
    let mut counters = counters(&url).await;
    let marker = format!("{PREFIX}xproc:{run}:started");
    let runs = format!("{PREFIX}xproc:{run}:runs");
    // Connected before the kill, so that the first call below comes well within the lease.
    let store = RedisStore::builder(url.as_str())
        .prefix(store_prefix(run))
        .build()
        .await
        .unwrap();
    let mut victim = child("crash", &url, run, &[]).spawn().unwrap();

    // Wait until the child is inside the body, then kill it without a chance to clean up.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let started: Option<i64> = counters.get(&marker).await.unwrap();
        if started.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the child never entered the body"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    let killed_at = Instant::now();

    // The dead child's lease is still live: a rejecting caller gets InProgress.
    let r = victim_rejecting(&store, &counters, run).await;
    assert!(
        matches!(r, Err(TestError::Idem(Error::InProgress { .. }))),
        "expected InProgress while the lease is live, got {r:?}"
    );

    // A waiting caller waits for the lease to pass, takes over and runs the body once.
    let r = victim_survivor(&store, &counters, run).await;
    let waited = killed_at.elapsed();
    assert_eq!(r.unwrap(), "survivor");
    // Renewed every third of its 500 ms lease, the dead claim had at least ~330 ms to run.
    assert!(
        waited >= Duration::from_millis(200),
        "took over after {waited:?}, while the dead holder's lease was live"
    );
    assert!(
        waited < Duration::from_secs(5),
        "took over {waited:?} after the kill"
    );
    let n: i64 = counters.get(&runs).await.unwrap();
    assert_eq!(n, 2, "the child's run and exactly one takeover run");

    // Everyone after that gets the survivor's result; no body runs again.
    for _ in 0..3 {
        assert_eq!(
            victim_survivor(&store, &counters, run).await.unwrap(),
            "survivor"
        );
        assert_eq!(
            victim_rejecting(&store, &counters, run).await.unwrap(),
            "survivor"
        );
    }
    let n: i64 = counters.get(&runs).await.unwrap();
    assert_eq!(n, 2);
    let _: () = counters.del(&[&runs, &marker]).await.unwrap();
    redis_keys::delete_prefix(&url, &store_prefix(run)).await;
    println!("took over {waited:?} after SIGKILL (lease 500 ms)");
}

fn main() -> std::process::ExitCode {
    use backends::{REDIS, REDIS_SERVER};
    idem_testkit::harness::run([
        idem_testkit::harness::child_cases(
            "IDEM_REDIS_CHILD",
            idem_testkit::test_cases!([], multi_thread(4); child_entry),
        ),
        idem_testkit::test_cases!([REDIS], multi_thread(2); cross_process_exactly_once, crash_takeover),
        idem_testkit::test_cases!([REDIS_SERVER], multi_thread(2); cross_process_exactly_once_on_a_cluster),
    ])
}
