//! Replay hints (`RedisStoreBuilder::replay_hints`), against a private `redis-server`: a key a
//! store saw completed is claimed with a native `GET` (counted in `INFO commandstats`), and a
//! hint that went stale — the record expired, was removed, was claimed again by another
//! process, or was overwritten with foreign data — never changes an answer: the call runs,
//! waits or fails exactly as it would without the hint.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_core::{Call, Error, OnConflict, Store};
use idem_stores::RedisStore;
use redis_server::{available, RedisServer};

async fn store(server: &RedisServer, hints: usize) -> RedisStore {
    RedisStore::builder(server.url())
        .prefix("hints:")
        .replay_hints(hints)
        .build()
        .await
        .unwrap()
}

/// Calls per command (`get`, `set`, `evalsha`, ...) since the last `CONFIG RESETSTAT`.
fn commandstats(server: &RedisServer) -> BTreeMap<String, u64> {
    let info = server.command("INFO commandstats").unwrap();
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

fn reset(server: &RedisServer) {
    assert!(server
        .command("CONFIG RESETSTAT")
        .unwrap()
        .starts_with("+OK"));
}

struct Counted {
    runs: Arc<AtomicUsize>,
}

impl Counted {
    fn new() -> Self {
        Counted {
            runs: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    async fn call(&self, store: &dyn Store, key: &str, ttl: Duration) -> Result<usize, Error> {
        let runs = self.runs.clone();
        Call::new("tests::redis_hints")
            .key(key)
            .ttl(ttl)
            .on_conflict(OnConflict::Reject)
            .run(
                store,
                async move { Ok(runs.fetch_add(1, Ordering::SeqCst) + 1) },
            )
            .await
    }
}

/// A replay of a key this store completed, or replayed before, is one `GET`: no `SET`, no
/// script. With the hints off it is the claim's `SET … NX PX … GET`, as for a store that has
/// never seen the key.
async fn a_key_seen_completed_is_replayed_with_a_native_get() {
    if !available() {
        return;
    }
    let server = RedisServer::start();
    let hinted = store(&server, 1024).await;
    let other = store(&server, 1024).await;
    let off = store(&server, 0).await;
    let c = Counted::new();
    let hour = Duration::from_secs(3600);

    assert_eq!(c.call(&hinted, "a", hour).await.unwrap(), 1);
    reset(&server);
    for _ in 0..10 {
        assert_eq!(c.call(&hinted, "a", hour).await.unwrap(), 1);
    }
    let stats = commandstats(&server);
    assert_eq!(stats.get("get"), Some(&10), "{stats:?}");
    assert_eq!(stats.get("set"), None, "{stats:?}");
    assert_eq!(stats.get("evalsha"), None, "{stats:?}");

    // Another store (another process) learns the key from its first replay.
    reset(&server);
    for _ in 0..3 {
        assert_eq!(c.call(&other, "a", hour).await.unwrap(), 1);
    }
    let stats = commandstats(&server);
    assert_eq!(
        stats.get("set"),
        Some(&1),
        "the first replay claims: {stats:?}"
    );
    assert_eq!(stats.get("get"), Some(&2), "the next ones read: {stats:?}");

    // Hints off: every replay is a claim.
    reset(&server);
    for _ in 0..3 {
        assert_eq!(c.call(&off, "a", hour).await.unwrap(), 1);
    }
    let stats = commandstats(&server);
    assert_eq!(stats.get("set"), Some(&3), "{stats:?}");
    assert_eq!(stats.get("get"), None, "{stats:?}");
    assert_eq!(c.runs(), 1);
}

/// Stale hints: the record expired, another process removed it, another process holds a new
/// claim on it, or someone wrote foreign data over it. Each time the call does what it would
/// have done without the hint.
async fn a_stale_hint_never_changes_an_answer() {
    if !available() {
        return;
    }
    let server = RedisServer::start();
    let hinted = store(&server, 1024).await;
    let other = store(&server, 0).await;
    let c = Counted::new();

    // Expired: the body runs again.
    assert_eq!(
        c.call(&hinted, "short", Duration::from_millis(200))
            .await
            .unwrap(),
        1
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        c.call(&hinted, "short", Duration::from_secs(60))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        c.call(&hinted, "short", Duration::from_secs(60))
            .await
            .unwrap(),
        2,
        "and is replayed after"
    );

    // Removed by another process (`Call::forget` there): the body runs again here.
    assert_eq!(
        c.call(&hinted, "gone", Duration::from_secs(60))
            .await
            .unwrap(),
        3
    );
    Call::new("tests::redis_hints")
        .key("gone")
        .forget(&other)
        .await
        .unwrap();
    assert_eq!(
        c.call(&hinted, "gone", Duration::from_secs(60))
            .await
            .unwrap(),
        4
    );

    // Removed, then claimed by another process whose body is still running: here the key is
    // in progress (`InProgress` with `on_conflict = reject`), not a replay and not a run.
    assert_eq!(
        c.call(&hinted, "busy", Duration::from_secs(60))
            .await
            .unwrap(),
        5
    );
    let busy = Call::new("tests::redis_hints").key("busy");
    busy.forget(&other).await.unwrap();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = {
        let other = other.clone();
        tokio::spawn(async move {
            Call::new("tests::redis_hints")
                .key("busy")
                .ttl(Duration::from_secs(60))
                .run(&other, async move {
                    started_tx.send(()).unwrap();
                    finish_rx.await.unwrap();
                    Ok::<_, Error>(100usize)
                })
                .await
        })
    };
    started_rx.await.unwrap();
    let during = c.call(&hinted, "busy", Duration::from_secs(60)).await;
    assert!(
        matches!(during, Err(Error::InProgress { .. })),
        "{during:?}"
    );
    finish_tx.send(()).unwrap();
    assert_eq!(holder.await.unwrap().unwrap(), 100);
    assert_eq!(
        c.call(&hinted, "busy", Duration::from_secs(60))
            .await
            .unwrap(),
        100,
        "the other process's value"
    );

    // Foreign data over the record: a codec error, as without the hint, never a run.
    assert_eq!(
        c.call(&hinted, "vandal", Duration::from_secs(60))
            .await
            .unwrap(),
        6
    );
    let name = format!(
        "hints:{{{}}}",
        Call::new("tests::redis_hints")
            .key("vandal")
            .identity()
            .unwrap()
            .unwrap()
            .key
            .to_hex()
    );
    assert!(server
        .command(&format!("SET {name} not-an-idem-record"))
        .unwrap()
        .starts_with("+OK"));
    let vandalized = c.call(&hinted, "vandal", Duration::from_secs(60)).await;
    assert!(matches!(vandalized, Err(Error::Codec(_))), "{vandalized:?}");
    assert_eq!(
        c.runs(),
        6,
        "no body ran for the stale hints but the ones said"
    );
}

fn main() -> std::process::ExitCode {
    idem_testkit::harness::run([
        idem_testkit::test_cases!([backends::REDIS_SERVER], current_thread;
        a_key_seen_completed_is_replayed_with_a_native_get,
        a_stale_hint_never_changes_an_answer),
    ])
}
