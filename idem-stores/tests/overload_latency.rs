//! Failures do not multiply under latency: transactional calls through a proxy that adds
//! [`LATENCY`] each way — a round trip just above the sizing rule's `lease/4` for a
//! [`LEASE`] lease — with 1, 2, 4 and 8 tasks per process, then again with the latency gone.
//!
//! An operation the runtime gives up on stops using its connection (a claim is bounded by its
//! lease, a connection abandoned mid-statement is closed rather than left busy in the pool, a
//! begin abandoned after its `BEGIN` was sent leaves no transaction open on its connection),
//! and a claim sent again waits for the earlier one of its token; so more tasks mean more
//! calls that finish, not a pool that fills with abandoned work. Checked: the successes per
//! second with 8 tasks are at least those with 1 (degrading gradually, not collapsing), every
//! call succeeds as soon as the latency drops, and no key runs twice. The success-rate curve
//! is printed (`--nocapture`). About 25 s per store; runs when `IDEM_TEST_POSTGRES_URL` (and
//! for MariaDB `IDEM_TEST_MYSQL_URL`) is set.
#![cfg(any(feature = "postgres", feature = "mysql"))]
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "support/backends.rs"]
mod backends;

#[path = "support/proxy.rs"]
mod proxy;
#[path = "support/sql_common.rs"]
mod sql_common;
#[path = "support/tx_common.rs"]
mod tx_common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::{Call, Error, TransactionalStore};
use idem_testkit::transactional::{TxHarness, TxOf};

const LEASE: Duration = Duration::from_millis(600);
/// Each way: a round trip of 2 × 80 ms, just above `lease/4` = 150 ms.
const LATENCY: Duration = Duration::from_millis(80);
const PHASE: Duration = Duration::from_secs(4);
const RECOVERY: Duration = Duration::from_secs(2);

/// One phase's count.
#[derive(Clone, Debug, Default)]
struct Phase {
    tasks: usize,
    calls: u64,
    ok: u64,
    store_errors: u64,
    lease_lost: u64,
    in_progress: u64,
    took: Duration,
    /// The first error seen, for the report.
    first_error: Option<&'static str>,
}

impl Phase {
    fn rate(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.ok as f64 / self.calls as f64
        }
    }
    fn per_second(&self) -> f64 {
        self.ok as f64 / self.took.as_secs_f64().max(1e-3)
    }
}

/// `tasks` tasks calling fresh keys for `d`.
async fn phase<H>(h: &Arc<H>, ns: &'static str, run: &str, tasks: usize, d: Duration) -> Phase
where
    H: TxHarness + 'static,
    H::Store: TransactionalStore,
{
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + d;
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (h, next, prefix) = (Arc::clone(h), Arc::clone(&next), format!("{run}-{tasks}"));
        handles.push(tokio::spawn(async move {
            let mut p = Phase::default();
            while Instant::now() < until {
                let key = format!("{prefix}-{}", next.fetch_add(1, Ordering::Relaxed));
                let got: Result<String, Error> = Call::new(ns)
                    .key(&key)
                    .lease(LEASE)
                    .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
                        h.insert(tx, &key, "x").await.map_err(Error::Store)?;
                        Ok::<_, Error>(key.clone())
                    })
                    .await;
                p.calls += 1;
                if let Err(e) = &got {
                    if p.first_error.is_none() {
                        eprintln!("{ns}: {tasks} tasks: {e:?}");
                        p.first_error = Some("seen");
                    }
                }
                match got {
                    Ok(_) => p.ok += 1,
                    Err(Error::LeaseLost) => p.lease_lost += 1,
                    Err(Error::InProgress { .. }) => p.in_progress += 1,
                    Err(_) => p.store_errors += 1,
                }
            }
            p
        }));
    }
    let mut total = Phase {
        tasks,
        ..Phase::default()
    };
    for handle in handles {
        let p = handle.await.unwrap();
        total.calls += p.calls;
        total.ok += p.ok;
        total.store_errors += p.store_errors;
        total.lease_lost += p.lease_lost;
        total.in_progress += p.in_progress;
    }
    total.took = started.elapsed();
    total
}

/// The curve under latency, then the recovery phase without it.
async fn curve<H>(h: Arc<H>, proxy: &proxy::Proxy, ns: &'static str) -> (Vec<Phase>, Phase)
where
    H: TxHarness + 'static,
    H::Store: TransactionalStore,
{
    let run = format!("lat-{}", std::process::id());
    proxy.set_latency(LATENCY);
    let mut phases = Vec::new();
    for tasks in [1, 2, 4, 8] {
        phases.push(phase(&h, ns, &run, tasks, PHASE).await);
    }
    proxy.set_latency(Duration::ZERO);
    let recovered = phase(&h, ns, &format!("{run}-after"), 8, RECOVERY).await;
    eprintln!("{ns}: latency {LATENCY:?} each way, lease {LEASE:?}");
    eprintln!("| tasks | calls | ok | success | ok/s | store errors | lease lost | in progress |");
    for p in phases.iter().chain([&recovered]) {
        eprintln!(
            "| {} | {} | {} | {:.0}% | {:.1} | {} | {} | {} |",
            p.tasks,
            p.calls,
            p.ok,
            p.rate() * 100.0,
            p.per_second(),
            p.store_errors,
            p.lease_lost,
            p.in_progress
        );
    }
    (phases, recovered)
}

/// The store tests run one at a time (they measure).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn check(phases: &[Phase], recovered: &Phase, rows: &[(String, String)]) {
    let (one, eight) = (&phases[0], &phases[3]);
    assert!(
        eight.per_second() >= one.per_second(),
        "8 tasks finished fewer calls per second than 1: failures multiplied ({phases:?})"
    );
    assert!(recovered.calls > 0);
    // Recovery is at once: every call succeeds. (A begin abandoned under the latency must not
    // leave its connection in an open transaction, or a recovery call's claim runs inside it
    // and ends as a lost lease: see `abandoned_begin_leaves_no_open_transaction`.)
    assert_eq!(
        recovered.ok, recovered.calls,
        "calls still fail once the latency is gone: {recovered:?}"
    );
    let mut per_key: HashMap<&str, u32> = HashMap::new();
    for (k, _) in rows {
        *per_key.entry(k.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = per_key.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "keys that ran twice: {twice:?}");
}

#[cfg(feature = "postgres")]
async fn postgres_degrades_gradually_and_recovers() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let proxy = proxy::Proxy::for_url(&url).await;
    let h = Arc::new(tx_common::pg::PgHarness::new(&proxy.url(&url), "lat", 10).await);
    let (phases, recovered) = curve(Arc::clone(&h), &proxy, "overload_latency::pg").await;
    let rows = h.all_rows().await;
    h.cleanup().await;
    check(&phases, &recovered, &rows);
}

#[cfg(feature = "mysql")]
async fn mysql_degrades_gradually_and_recovers() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let proxy = proxy::Proxy::for_url(&url).await;
    let h = Arc::new(tx_common::my::MyHarness::new(&proxy.url(&url), "lat", 10).await);
    let (phases, recovered) = curve(Arc::clone(&h), &proxy, "overload_latency::mysql").await;
    let rows = h.all_rows().await;
    h.cleanup().await;
    check(&phases, &recovered, &rows);
}

/// A begin that the runtime gives up on after its `BEGIN` was sent (the link is slower than
/// the budget) leaves no transaction open on its connection: the next operation on that
/// connection — another call's claim — commits. (Cancelled between sending `BEGIN` and its
/// answer, sqlx returns the connection to the pool with the server's transaction open; a
/// claim run inside it stays uncommitted, invisible to its own completion, which then reports
/// a lost lease with no competitor.) One connection in the store's pool, so the claim gets
/// the connection whose begin was abandoned; the claim is looked up through another store
/// on a direct connection.
async fn abandoned_begin_leaves_no_open_transaction<S>(
    proxy: &proxy::Proxy,
    via: S,
    direct: S,
    idle: fn(&S) -> usize,
) where
    S: TransactionalStore,
{
    use idem_core::{Claim, ClaimRequest, FencingToken, Key, RecordState};
    // The pool's one connection is open and idle: the begin takes it at once.
    let warm = ClaimRequest {
        key: Key([7; 32]),
        fingerprint: None,
        token: FencingToken::random(),
        lease: Duration::from_secs(30),
    };
    via.claim(&warm).await.expect("claim before the latency");
    // ... and back in the pool (its return tests it with a round trip).
    let deadline = Instant::now() + Duration::from_secs(5);
    while idle(&via) == 0 {
        assert!(
            Instant::now() < deadline,
            "the connection never went back to the pool"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.set_latency(Duration::from_millis(300));
    let abandoned = tokio::time::timeout(Duration::from_millis(100), via.begin()).await;
    assert!(
        abandoned.is_err(),
        "the begin answered within 100 ms over a 600 ms round trip"
    );
    proxy.set_latency(Duration::ZERO);
    let req = ClaimRequest {
        key: Key([9; 32]),
        fingerprint: None,
        token: FencingToken::random(),
        lease: Duration::from_secs(30),
    };
    let claimed = via.claim(&req).await.expect("claim after the latency");
    assert!(matches!(claimed, Claim::Acquired { .. }), "{claimed:?}");
    let seen = direct
        .get(&req.key)
        .await
        .expect("look from another connection");
    assert!(
        matches!(seen, Some(RecordState::InProgress { token, .. }) if token == req.token),
        "the claim did not commit: it ran inside the abandoned begin's transaction ({seen:?})"
    );
}

#[cfg(feature = "postgres")]
async fn postgres_abandoned_begin_leaves_no_open_transaction() {
    use idem_stores::PostgresStore;
    let Some(url) = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let table = sql_common::unique_table("begin");
    let proxy = proxy::Proxy::for_url(&url).await;
    let direct = PostgresStore::builder()
        .url(&url)
        .table(&table)
        .connect()
        .await
        .unwrap();
    direct.migrate().await.unwrap();
    let via = PostgresStore::builder()
        .url(proxy.url(&url))
        .table(&table)
        .max_connections(1)
        .reserved_connections(0)
        .notify(false)
        .connect()
        .await
        .unwrap();
    let run = tokio::spawn({
        let direct = direct.clone();
        async move {
            abandoned_begin_leaves_no_open_transaction(&proxy, via, direct, |s| s.pool().num_idle())
                .await
        }
    })
    .await;
    let drop_table = format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_steps\"");
    let _ = sqlx::query(sqlx::AssertSqlSafe(drop_table))
        .execute(direct.pool())
        .await;
    if let Err(panic) = run {
        std::panic::resume_unwind(panic.into_panic());
    }
}

#[cfg(feature = "mysql")]
async fn mysql_abandoned_begin_leaves_no_open_transaction() {
    use idem_stores::MySqlStore;
    let Some(url) = idem_testkit::env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let table = sql_common::unique_table("begin");
    let proxy = proxy::Proxy::for_url(&url).await;
    let direct = MySqlStore::builder()
        .url(&url)
        .table(&table)
        .connect()
        .await
        .unwrap();
    direct.migrate().await.unwrap();
    let via = MySqlStore::builder()
        .url(proxy.url(&url))
        .table(&table)
        .max_connections(1)
        .reserved_connections(0)
        .connect()
        .await
        .unwrap();
    let run = tokio::spawn({
        let direct = direct.clone();
        async move {
            abandoned_begin_leaves_no_open_transaction(&proxy, via, direct, |s| s.pool().num_idle())
                .await
        }
    })
    .await;
    let drop_table = format!("DROP TABLE IF EXISTS `{table}`, `{table}_steps`");
    let _ = sqlx::query(sqlx::AssertSqlSafe(drop_table))
        .execute(direct.pool())
        .await;
    if let Err(panic) = run {
        std::panic::resume_unwind(panic.into_panic());
    }
}

fn main() -> std::process::ExitCode {
    use backends::{MYSQL, POSTGRES};
    use idem_testkit::test_cases;
    idem_testkit::harness::run([
        test_cases!([POSTGRES], multi_thread(2);
            postgres_degrades_gradually_and_recovers, postgres_abandoned_begin_leaves_no_open_transaction),
        test_cases!([MYSQL], multi_thread(2);
            mysql_degrades_gradually_and_recovers, mysql_abandoned_begin_leaves_no_open_transaction),
    ])
}
