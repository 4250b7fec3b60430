//! The native compare-and-set path (`SET … IFEQ`) on Valkey 8.1, and its coexistence with the
//! Lua scripts:
//!
//! - detection: Valkey 8.1 → native, Valkey 8.0 and Redis 7.0 → scripts, the builder's option
//!   forces either;
//! - `INFO commandstats` on a private Valkey 8.1: a fresh call and a renewal run no script;
//! - a mixed fleet (instances on the scripts and instances on the native commands, one server)
//!   runs every key once, wakes each other's waiters and fences each other's stale holders;
//! - a server upgraded under a running store (Redis 7.0, scripts → Valkey 8.1 loading the same
//!   data, native after the reconnect) keeps every key's promise;
//! - the native path on a three-master Valkey 8.1 cluster started by the test.
//!
//! Servers: `IDEM_TEST_VALKEY81_URL`, `IDEM_TEST_VALKEY80_URL`, `IDEM_TEST_REDIS_URL` (shared),
//! and `IDEM_TEST_VALKEY81_SERVER`, the `valkey-server` 8.1 binary for private servers
//! (`.ci/valkey env` prints all four).
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;

#[path = "support/redis_server.rs"]
mod redis_server;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::{Call, Claim, Error, RecordState, Store, StoreError};
use idem_stores::redis::NativeCas;
use idem_stores::RedisStore;
use idem_testkit::{claim_request, env_url, fresh_key};
use redis_server::{available, RedisCluster, RedisServer};

async fn connect(url: &str, native: NativeCas) -> RedisStore {
    RedisStore::builder(url)
        .prefix("idem-test-native:")
        .native_cas(native)
        .build()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// Calls per command (`set`, `evalsha`, ...) since the last `CONFIG RESETSTAT`.
fn commandstats(server: &RedisServer) -> BTreeMap<String, u64> {
    parse_commandstats(&server.command("INFO commandstats").unwrap())
}

fn parse_commandstats(info: &str) -> BTreeMap<String, u64> {
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// Script runs of any kind.
fn scripts_run(stats: &BTreeMap<String, u64>) -> u64 {
    [
        "eval",
        "evalsha",
        "eval_ro",
        "evalsha_ro",
        "fcall",
        "fcall_ro",
    ]
    .iter()
    .map(|c| stats.get(*c).copied().unwrap_or(0))
    .sum()
}

fn reset(server: &RedisServer) {
    assert!(server
        .command("CONFIG RESETSTAT")
        .unwrap()
        .starts_with("+OK"));
}

fn valkey81_binary() -> Option<String> {
    let bin = env_url("IDEM_TEST_VALKEY81_SERVER")?;
    available().then_some(bin)
}

/// A call whose body counts its runs in `runs`, sleeps `body`, and answers `value`.
async fn counted(
    store: &RedisStore,
    ns: &'static str,
    key: &str,
    runs: &Arc<AtomicUsize>,
    value: u64,
    lease: Duration,
    body: Duration,
) -> Result<u64, Error> {
    let runs = runs.clone();
    Call::new(ns)
        .key(key)
        .lease(lease)
        .wait_timeout(Duration::from_secs(20))
        .run(store, async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(body).await;
            Ok::<_, Error>(value)
        })
        .await
}

fn namespace(what: &str) -> &'static str {
    Box::leak(format!("valkey_native::{what}::{}", fresh_key()).into_boxed_str())
}

async fn the_path_is_detected_per_server_and_the_option_forces_it() {
    if let Some(url) = env_url("IDEM_TEST_VALKEY81_URL") {
        assert!(connect(&url, NativeCas::Auto).await.native_cas_active());
        assert!(!connect(&url, NativeCas::Never).await.native_cas_active());
        assert!(connect(&url, NativeCas::Always).await.native_cas_active());
    }
    if let Some(url) = env_url("IDEM_TEST_VALKEY80_URL") {
        assert!(!connect(&url, NativeCas::Auto).await.native_cas_active());
    }
    if let Some(url) = env_url("IDEM_TEST_REDIS_URL") {
        let store = connect(&url, NativeCas::Auto).await;
        if !server_has_ifeq(&url) {
            assert!(
                !store.native_cas_active(),
                "Redis before 8.4 has no SET IFEQ"
            );
        }
    }
}

/// Whether the server at `url` accepts `SET … IFEQ` (a probe independent of the store's
/// detection).
fn server_has_ifeq(url: &str) -> bool {
    let port: u16 = url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(6379);
    let probe = format!("idem-test-native:probe:{}", fresh_key());
    let reply = raw_command(port, &format!("SET {probe} v IFEQ v"));
    let _ = raw_command(port, &format!("DEL {probe}"));
    !reply.starts_with('-')
}

fn raw_command(port: u16, cmd: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

/// A private Valkey 8.1: a fresh call (claim + completion) and a renewal run no script, only
/// `SET`s; the same calls through a store forced onto the scripts do run scripts (the count
/// is live).
async fn a_fresh_call_and_a_renewal_run_no_script_on_valkey_8_1() {
    let Some(bin) = valkey81_binary() else { return };
    let server = RedisServer::start_binary(&bin, redis_server::spare_port(false), &[]);
    let store = connect(&server.url(), NativeCas::Auto).await;
    assert!(store.native_cas_active());
    let ns = namespace("commandstats");
    let runs = Arc::new(AtomicUsize::new(0));

    // Fresh calls through the runtime.
    reset(&server);
    for i in 0..20u64 {
        let v = counted(
            &store,
            ns,
            &format!("k{i}"),
            &runs,
            i,
            Duration::from_secs(10),
            Duration::ZERO,
        )
        .await;
        assert_eq!(v.unwrap(), i);
    }
    let stats = commandstats(&server);
    assert_eq!(
        scripts_run(&stats),
        0,
        "fresh calls ran a script: {stats:?}"
    );
    assert!(stats.get("set").copied().unwrap_or(0) >= 40, "{stats:?}");

    // Renewals: explicit, and the runtime's lease keeper on a body that outlives its lease.
    reset(&server);
    let key = fresh_key();
    let (req, token) = claim_request(key, Duration::from_millis(500));
    assert_eq!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
    for _ in 0..3 {
        store
            .renew(&key, token, Duration::from_secs(2))
            .await
            .unwrap();
    }
    store
        .complete(&key, token, b"v", Duration::from_secs(30))
        .await
        .unwrap();
    let v = counted(
        &store,
        ns,
        "long",
        &runs,
        7,
        Duration::from_millis(300),
        Duration::from_millis(700),
    )
    .await;
    assert_eq!(v.unwrap(), 7);
    let stats = commandstats(&server);
    assert_eq!(scripts_run(&stats), 0, "renewals ran a script: {stats:?}");
    // 2 claims, 2 completions, 3 explicit renewals and at least one by the lease keeper.
    assert!(stats.get("set").copied().unwrap_or(0) >= 8, "{stats:?}");
    // The renewed lease holds: the key was in progress with a 2 s lease after 500 ms.

    // The same through the scripts: they are counted.
    let scripts = connect(&server.url(), NativeCas::Never).await;
    reset(&server);
    let v = counted(
        &scripts,
        ns,
        "scripted",
        &runs,
        9,
        Duration::from_secs(10),
        Duration::ZERO,
    )
    .await;
    assert_eq!(v.unwrap(), 9);
    assert!(scripts_run(&commandstats(&server)) >= 1);
}

/// A renewal on the native path really extends the lease (the record lives lease + grace).
async fn a_native_renewal_extends_the_lease_and_is_fenced_for_others() {
    let Some(url) = env_url("IDEM_TEST_VALKEY81_URL") else {
        return;
    };
    let store = connect(&url, NativeCas::Auto).await;
    let key = fresh_key();
    let (req, token) = claim_request(key, Duration::from_millis(300));
    store.claim(&req).await.unwrap();
    store
        .renew(&key, token, Duration::from_secs(5))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (other, _) = claim_request(key, Duration::from_secs(5));
    assert!(matches!(
        store.claim(&other).await.unwrap(),
        Claim::InProgress { .. }
    ));
    assert!(matches!(
        store
            .renew(
                &key,
                idem_core::FencingToken::random(),
                Duration::from_secs(5)
            )
            .await,
        Err(StoreError::Fenced)
    ));
    store
        .complete(&key, token, b"v", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(matches!(
        store.renew(&key, token, Duration::from_secs(5)).await,
        Err(StoreError::Fenced)
    ));
}

/// Instances on the scripts and instances on the native commands share one Valkey 8.1.
async fn a_mixed_fleet_runs_every_key_once() {
    let Some(url) = env_url("IDEM_TEST_VALKEY81_URL") else {
        return;
    };
    let native = connect(&url, NativeCas::Auto).await;
    let scripts = connect(&url, NativeCas::Never).await;
    assert!(native.native_cas_active() && !scripts.native_cas_active());
    let ns = namespace("mixed");
    let keys = 16;
    let runs: Vec<Arc<AtomicUsize>> = (0..keys).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let mut tasks = Vec::new();
    for caller in 0..8u64 {
        for (k, runs) in runs.iter().enumerate() {
            let store = if caller % 2 == 0 {
                native.clone()
            } else {
                scripts.clone()
            };
            let runs = runs.clone();
            tasks.push(tokio::spawn(async move {
                let v = counted(
                    &store,
                    ns,
                    &format!("k{k}"),
                    &runs,
                    caller,
                    Duration::from_secs(10),
                    Duration::from_millis(40),
                )
                .await;
                (k, v.unwrap())
            }));
        }
    }
    let mut answers: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    for t in tasks {
        let (k, v) = t.await.unwrap();
        answers.entry(k).or_default().push(v);
    }
    for (k, runs) in runs.iter().enumerate() {
        assert_eq!(runs.load(Ordering::SeqCst), 1, "key {k} ran more than once");
        let vs = &answers[&k];
        assert!(
            vs.iter().all(|v| *v == vs[0]),
            "key {k}: callers disagree {vs:?}"
        );
    }
}

/// Each kind of instance wakes the other's waiters: a waiter marks the claim, so a native
/// completion finds the value changed and completes through the script, which publishes.
async fn a_mixed_fleet_wakes_each_others_waiters() {
    let Some(url) = env_url("IDEM_TEST_VALKEY81_URL") else {
        return;
    };
    let native = connect(&url, NativeCas::Auto).await;
    let scripts = connect(&url, NativeCas::Never).await;
    for (holder, waiter) in [(&native, &scripts), (&scripts, &native)] {
        let ns = namespace("wake");
        let runs = Arc::new(AtomicUsize::new(0));
        let h = {
            let (holder, runs) = (holder.clone(), runs.clone());
            tokio::spawn(async move {
                counted(
                    &holder,
                    ns,
                    "k",
                    &runs,
                    1,
                    Duration::from_secs(30),
                    Duration::from_millis(300),
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        let v = counted(
            waiter,
            ns,
            "k",
            &runs,
            2,
            Duration::from_secs(30),
            Duration::ZERO,
        )
        .await;
        assert_eq!(v.unwrap(), 1, "the waiter gets the holder's value");
        // Woken by the completion's publish (the lease is 30 s; polling alone would take far
        // longer than this without notifications).
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "waiter woken after {:?}",
            t.elapsed()
        );
        assert_eq!(h.await.unwrap().unwrap(), 1);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}

/// A lapsed holder on one path is fenced by a taker on the other, both ways.
async fn a_mixed_fleet_fences_stale_holders() {
    let Some(url) = env_url("IDEM_TEST_VALKEY81_URL") else {
        return;
    };
    let native = connect(&url, NativeCas::Auto).await;
    let scripts = connect(&url, NativeCas::Never).await;
    for (first, second) in [(&native, &scripts), (&scripts, &native)] {
        let key = fresh_key();
        let (req, old) = claim_request(key, Duration::from_millis(200));
        assert_eq!(
            first.claim(&req).await.unwrap(),
            Claim::Acquired { taken_over: false }
        );
        tokio::time::sleep(Duration::from_millis(350)).await;
        let (req, new) = claim_request(key, Duration::from_secs(10));
        assert_eq!(
            second.claim(&req).await.unwrap(),
            Claim::Acquired { taken_over: true }
        );
        assert!(matches!(
            first.renew(&key, old, Duration::from_secs(5)).await,
            Err(StoreError::Fenced)
        ));
        assert!(matches!(
            first
                .complete(&key, old, b"stale", Duration::from_secs(30))
                .await,
            Err(StoreError::Fenced)
        ));
        first.release(&key, old).await.unwrap();
        second
            .renew(&key, new, Duration::from_secs(10))
            .await
            .unwrap();
        second
            .complete(&key, new, b"fresh", Duration::from_secs(30))
            .await
            .unwrap();
        match first.get(&key).await.unwrap() {
            Some(RecordState::Completed(rec)) => assert_eq!(&rec.value[..], b"fresh"),
            other => panic!("{other:?}"),
        }
        // A release on the native path frees the key for the other path at once.
        let key = fresh_key();
        let (req, token) = claim_request(key, Duration::from_secs(30));
        first.claim(&req).await.unwrap();
        first.release(&key, token).await.unwrap();
        let (req, _) = claim_request(key, Duration::from_secs(30));
        assert_eq!(
            second.claim(&req).await.unwrap(),
            Claim::Acquired { taken_over: false }
        );
    }
}

/// Retries `f` until it stops failing with a connection error (the store reconnects on its
/// own), for up to 10 s.
async fn through_reconnect<T, F, Fut>(mut f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f().await {
            Err(StoreError::Backend { .. } | StoreError::Timeout(_))
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => return r,
        }
    }
}

/// Redis 7.0 (scripts) is replaced by Valkey 8.1 on the same port and data under a running
/// store: after the reconnect the store uses the native path, and every key keeps its
/// promise — a completed key replays, a claim held across the upgrade completes (and is not
/// run again), a body in flight across it completes once, and a fresh key runs no script.
async fn an_upgrade_under_a_running_store_keeps_every_promise() {
    let Some(valkey) = valkey81_binary() else {
        return;
    };
    let mut server =
        RedisServer::start_binary("redis-server", redis_server::spare_port(false), &[]);
    let store = connect(&server.url(), NativeCas::Auto).await;
    assert!(!store.native_cas_active(), "Redis 7.0: scripts");
    let ns = namespace("upgrade");
    let runs = Arc::new(AtomicUsize::new(0));

    // Before: a completed key, a held claim, and a body that will be running during the
    // upgrade.
    assert_eq!(
        counted(
            &store,
            ns,
            "done",
            &runs,
            1,
            Duration::from_secs(30),
            Duration::ZERO
        )
        .await
        .unwrap(),
        1
    );
    let held = fresh_key();
    let (req, token) = claim_request(held, Duration::from_secs(30));
    assert_eq!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
    let in_flight = {
        let (store, runs) = (store.clone(), runs.clone());
        tokio::spawn(async move {
            counted(
                &store,
                ns,
                "flight",
                &runs,
                2,
                Duration::from_secs(30),
                Duration::from_millis(1500),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    // The upgrade: the data saved, Redis stopped, Valkey 8.1 started on it.
    assert!(server.command("SAVE").unwrap().starts_with("+OK"));
    server.kill();
    server.restart_binary(&valkey);
    assert!(server
        .command("INFO server")
        .unwrap()
        .contains("valkey_version:8.1"));

    // The held claim completes under its token (the store reconnects on its own).
    through_reconnect(|| store.complete(&held, token, b"held", Duration::from_secs(30)))
        .await
        .unwrap();
    // Detected again after the reconnect (the store checks every 5 s); meanwhile the scripts
    // kept working on the new server.
    let deadline = Instant::now() + Duration::from_secs(8);
    while !store.native_cas_active() {
        assert!(
            Instant::now() < deadline,
            "native after the reconnect to Valkey 8.1"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The body in flight completes once.
    assert_eq!(in_flight.await.unwrap().unwrap(), 2);
    // Every key replays; nothing runs again.
    assert_eq!(
        counted(
            &store,
            ns,
            "done",
            &runs,
            10,
            Duration::from_secs(30),
            Duration::ZERO
        )
        .await
        .unwrap(),
        1
    );
    assert_eq!(
        counted(
            &store,
            ns,
            "flight",
            &runs,
            10,
            Duration::from_secs(30),
            Duration::ZERO
        )
        .await
        .unwrap(),
        2
    );
    match store
        .claim(&claim_request(held, Duration::from_secs(30)).0)
        .await
        .unwrap()
    {
        Claim::Completed(rec) => assert_eq!(&rec.value[..], b"held"),
        other => panic!("{other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    // A fresh key: native only.
    reset(&server);
    assert_eq!(
        counted(
            &store,
            ns,
            "fresh",
            &runs,
            3,
            Duration::from_secs(30),
            Duration::ZERO
        )
        .await
        .unwrap(),
        3
    );
    let stats = commandstats(&server);
    assert_eq!(scripts_run(&stats), 0, "{stats:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// A three-master Valkey 8.1 cluster: the native path is detected on every node, calls run
/// once, waiters are woken, stale holders fenced, and fresh calls run no script on any node.
async fn the_native_path_on_a_valkey_cluster() {
    let Some(bin) = valkey81_binary() else { return };
    let cluster = RedisCluster::start_binary(&bin);
    let store = RedisStore::cluster_builder(cluster.urls())
        .prefix("idem-test-native:")
        .build()
        .await
        .unwrap();
    assert!(store.native_cas_active(), "every node is Valkey 8.1");
    let store: Arc<dyn Store> = Arc::new(store);
    for n in &cluster.nodes {
        reset(n);
    }
    let ns = namespace("cluster");
    let runs = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        for _ in 0..3 {
            let (store, runs) = (store.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                Call::new(ns)
                    .key(i)
                    .lease(Duration::from_secs(10))
                    .run(&*store, async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<_, Error>(i)
                    })
                    .await
                    .map(|v| (i, v))
            }));
        }
    }
    for t in tasks {
        let (i, v) = t.await.unwrap().unwrap();
        assert_eq!(i, v);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 32, "each key ran once");
    let sets: u64 = cluster
        .nodes
        .iter()
        .map(|n| commandstats(n).get("set").copied().unwrap_or(0))
        .sum();
    assert!(sets >= 64, "claims and completions are SETs: {sets}");
    // Waiters (the concurrent callers above) mark claims, whose completions then publish
    // through the script; fresh calls without waiters run none.
    for n in &cluster.nodes {
        reset(n);
    }
    for i in 100..116u64 {
        let runs = runs.clone();
        let v = Call::new(ns)
            .key(i)
            .run(&*store, async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(i)
            })
            .await
            .unwrap();
        assert_eq!(v, i);
    }
    for n in &cluster.nodes {
        let stats = commandstats(n);
        assert_eq!(scripts_run(&stats), 0, "node {}: {stats:?}", n.port());
    }
    idem_testkit::fencing(store.clone()).await;
    idem_testkit::lease_takeover(store.clone()).await;
    idem_testkit::wait_wakes_on_complete(store.clone()).await;
    idem_testkit::complete_reply_lost_after_expiry(store.clone()).await;
}

fn main() -> std::process::ExitCode {
    use backends::{REDIS_SERVER, VALKEY80, VALKEY81, VALKEY81_SERVER};
    use idem_testkit::test_cases;
    idem_testkit::harness::run([
        test_cases!([VALKEY80, VALKEY81], multi_thread(4);
            the_path_is_detected_per_server_and_the_option_forces_it),
        test_cases!([VALKEY81], multi_thread(4);
            a_native_renewal_extends_the_lease_and_is_fenced_for_others,
            a_mixed_fleet_runs_every_key_once,
            a_mixed_fleet_wakes_each_others_waiters,
            a_mixed_fleet_fences_stale_holders),
        test_cases!([VALKEY81_SERVER, REDIS_SERVER], multi_thread(4);
            a_fresh_call_and_a_renewal_run_no_script_on_valkey_8_1,
            an_upgrade_under_a_running_store_keeps_every_promise,
            the_native_path_on_a_valkey_cluster),
    ])
}
