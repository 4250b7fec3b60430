//! Renewals and settles get through a saturated pool: a holder process whose pool of
//! [`POOL`] connections is wanted by 8× as many tasks — each claiming fresh keys and running
//! a body that holds pool connections with slow statements — while busy loops saturate the
//! CPU, and a second process (a store with a pool of its own, on the same table) that keeps
//! trying to take the holder's keys over. A renewal that waits behind the claims and bodies'
//! statements arrives after the lease, and the second process runs the body again while the
//! holder is alive; with the reserved lane of renewals and settles, no key runs twice.
//!
//! Everything runs in one test process, so every holder is alive throughout: any key executed
//! twice is a duplicate. Bounded to about 15 s per store. Runs when `IDEM_TEST_POSTGRES_URL`
//! (and for MariaDB `IDEM_TEST_MYSQL_URL`) is set. The `*_without_lane` variants (ignored:
//! run them with `--ignored`) are the control: the same load with `reserved_connections(0)`.
#![cfg(any(feature = "postgres", feature = "mysql"))]
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "support/backends.rs"]
mod backends;

#[path = "support/sql_common.rs"]
mod sql_common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem_core::{Call, Error, OnConflict, Store};

/// The holder's pool, and 8× as many tasks.
const POOL: u32 = 2;
const TASKS: usize = 8 * POOL as usize;
const LEASE: Duration = Duration::from_secs(1);
const RUN: Duration = Duration::from_secs(10);
/// Each body runs this many slow statements (each holding a pool connection).
const BODY_STATEMENTS: usize = 3;

/// One run's tally.
#[derive(Debug, Default)]
struct Tally {
    executions: u64,
    duplicates: u64,
    duplicate_keys: Vec<String>,
    holder_ok: u64,
    holder_lease_lost: u64,
    holder_store_errors: u64,
    competitor_runs: u64,
}

/// The store-specific parts: two stores on one table (holder, competitor) and a slow
/// statement on the holder's pool.
trait Side: Send + Sync + 'static {
    fn holder(&self) -> Arc<dyn Store>;
    fn competitor(&self) -> Arc<dyn Store>;
    fn slow_statement(&self) -> impl std::future::Future<Output = Result<(), Error>> + Send;
}

/// Spins `n` threads until `stop`.
fn busy_loops(n: usize, stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let stop = Arc::clone(stop);
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect()
}

async fn overload<S: Side>(side: Arc<S>, ns: &'static str) -> Tally {
    let executions: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let in_flight: Arc<Mutex<Vec<String>>> = Arc::default();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let spinners = busy_loops(3, &stop);
    let run = format!(
        "{}-{}",
        std::process::id(),
        idem_core::FencingToken::random().0
    );
    let until = Instant::now() + RUN;
    let next = Arc::new(AtomicU64::new(0));

    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (side, executions, in_flight, tally, next, run) = (
            Arc::clone(&side),
            Arc::clone(&executions),
            Arc::clone(&in_flight),
            Arc::clone(&tally),
            Arc::clone(&next),
            run.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let store = side.holder();
            while Instant::now() < until {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let key = format!("{run}-{n}");
                // One body in four runs across several renewals.
                let long = n % 4 == 0;
                let got: Result<u64, Error> = Call::new(ns)
                    .key(&key)
                    .lease(LEASE)
                    .wait_timeout(Duration::from_millis(100))
                    .run(&*store, async {
                        *executions.lock().unwrap().entry(key.clone()).or_default() += 1;
                        in_flight.lock().unwrap().push(key.clone());
                        for _ in 0..BODY_STATEMENTS {
                            side.slow_statement().await?;
                        }
                        if long {
                            tokio::time::sleep(LEASE * 2).await;
                        }
                        in_flight.lock().unwrap().retain(|k| *k != key);
                        Ok::<_, Error>(n)
                    })
                    .await;
                let mut t = tally.lock().unwrap();
                match got {
                    Ok(_) => t.holder_ok += 1,
                    Err(Error::LeaseLost) => t.holder_lease_lost += 1,
                    Err(_) => t.holder_store_errors += 1,
                }
            }
        }));
    }

    // The other process: tries to take over whatever the holder is running.
    let competitor = {
        let (side, executions, in_flight, tally) = (
            Arc::clone(&side),
            Arc::clone(&executions),
            Arc::clone(&in_flight),
            Arc::clone(&tally),
        );
        tokio::spawn(async move {
            let store = side.competitor();
            while Instant::now() < until {
                let keys: Vec<String> = in_flight.lock().unwrap().clone();
                for key in keys {
                    let got: Result<u64, Error> = Call::new(ns)
                        .key(&key)
                        .lease(LEASE)
                        .on_conflict(OnConflict::Reject)
                        .run(&*store, async {
                            *executions.lock().unwrap().entry(key.clone()).or_default() += 1;
                            Ok::<_, Error>(u64::MAX)
                        })
                        .await;
                    if matches!(got, Ok(u64::MAX)) {
                        tally.lock().unwrap().competitor_runs += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let probe = {
        let side = Arc::clone(&side);
        tokio::spawn(async move {
            let store = side.holder();
            let mut lat = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                let r = store
                    .renew(&idem_core::Key([7; 32]), idem_core::FencingToken(5), LEASE)
                    .await;
                lat.push((
                    t.elapsed().as_millis(),
                    r.is_ok() || matches!(r, Err(idem_core::StoreError::Fenced)),
                ));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            lat.sort();
            eprintln!(
                "probe renew latencies (ms): median {:?} p90 {:?} max {:?} fails {}",
                lat[lat.len() / 2],
                lat[lat.len() * 9 / 10],
                lat.last(),
                lat.iter().filter(|x| !x.1).count()
            );
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    probe.await.unwrap();
    competitor.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
    let mut t = std::mem::take(&mut *tally.lock().unwrap());
    for (key, n) in executions.lock().unwrap().iter() {
        t.executions += n;
        if *n > 1 {
            t.duplicates += n - 1;
            t.duplicate_keys.push(key.clone());
        }
    }
    eprintln!("{ns}: {t:?}");
    t
}

fn check(t: &Tally) {
    assert!(t.holder_ok > 0, "no call succeeded under the load: {t:?}");
    assert_eq!(
        t.duplicates, 0,
        "keys ran twice while their holder was alive: {t:?}"
    );
    assert_eq!(t.holder_lease_lost, 0, "{t:?}");
}

#[cfg(feature = "postgres")]
mod pg {
    use super::*;
    use idem_stores::PostgresStore;
    use sqlx::AssertSqlSafe;

    pub struct Pg {
        holder: PostgresStore,
        competitor: PostgresStore,
        pub url: String,
        pub table: String,
    }

    impl Side for Pg {
        fn holder(&self) -> Arc<dyn Store> {
            Arc::new(self.holder.clone())
        }
        fn competitor(&self) -> Arc<dyn Store> {
            Arc::new(self.competitor.clone())
        }
        async fn slow_statement(&self) -> Result<(), Error> {
            sqlx::query("SELECT pg_sleep(0.2)")
                .execute(self.holder.pool())
                .await
                .map_err(|e| Error::Store(idem_core::StoreError::backend("body", e)))?;
            Ok(())
        }
    }

    pub async fn side(url: &str, reserved: u32) -> Pg {
        sql_common::pg_drop_stale_tables(url).await;
        let table = sql_common::unique_table("overload");
        let holder = PostgresStore::builder()
            .url(url)
            .table(&table)
            .max_connections(POOL)
            .reserved_connections(reserved)
            .connect()
            .await
            .expect("connect");
        holder.migrate().await.expect("migrate");
        let competitor = PostgresStore::builder()
            .url(url)
            .table(&table)
            .max_connections(4)
            .connect()
            .await
            .expect("connect");
        Pg {
            holder,
            competitor,
            url: url.to_owned(),
            table,
        }
    }

    pub async fn cleanup(side: &Pg) {
        let sql = format!("DROP TABLE IF EXISTS \"{0}\", \"{0}_steps\"", side.table);
        let _ = sqlx::query(AssertSqlSafe(sql))
            .execute(side.competitor.pool())
            .await;
    }
}

#[cfg(feature = "mysql")]
mod my {
    use super::*;
    use idem_stores::MySqlStore;
    use sqlx::AssertSqlSafe;

    pub struct My {
        holder: MySqlStore,
        competitor: MySqlStore,
        pub table: String,
    }

    impl Side for My {
        fn holder(&self) -> Arc<dyn Store> {
            Arc::new(self.holder.clone())
        }
        fn competitor(&self) -> Arc<dyn Store> {
            Arc::new(self.competitor.clone())
        }
        async fn slow_statement(&self) -> Result<(), Error> {
            sqlx::query("SELECT SLEEP(0.2)")
                .execute(self.holder.pool())
                .await
                .map_err(|e| Error::Store(idem_core::StoreError::backend("body", e)))?;
            Ok(())
        }
    }

    pub async fn side(url: &str, reserved: u32) -> My {
        let table = sql_common::unique_table("overload");
        let holder = MySqlStore::builder()
            .url(url)
            .table(&table)
            .max_connections(POOL)
            .reserved_connections(reserved)
            .connect()
            .await
            .expect("connect");
        holder.migrate().await.expect("migrate");
        let competitor = MySqlStore::builder()
            .url(url)
            .table(&table)
            .max_connections(4)
            .connect()
            .await
            .expect("connect");
        My {
            holder,
            competitor,
            table,
        }
    }

    pub async fn cleanup(side: &My) {
        let sql = format!("DROP TABLE IF EXISTS `{0}`, `{0}_steps`", side.table);
        let _ = sqlx::query(AssertSqlSafe(sql))
            .execute(side.competitor.pool())
            .await;
    }
}

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[cfg(feature = "postgres")]
async fn postgres_renewals_get_through_a_saturated_pool() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let side = Arc::new(pg::side(&url, 2).await);
    let t = overload(Arc::clone(&side), "overload_pool::pg").await;
    pg::cleanup(&side).await;
    check(&t);
}

#[cfg(feature = "postgres")]
async fn postgres_without_lane() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let side = Arc::new(pg::side(&url, 0).await);
    overload(Arc::clone(&side), "overload_pool::pg_control").await;
    pg::cleanup(&side).await;
}

#[cfg(feature = "mysql")]
async fn mysql_renewals_get_through_a_saturated_pool() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let side = Arc::new(my::side(&url, 2).await);
    let t = overload(Arc::clone(&side), "overload_pool::mysql").await;
    my::cleanup(&side).await;
    check(&t);
}

#[cfg(feature = "mysql")]
async fn mysql_without_lane() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let side = Arc::new(my::side(&url, 0).await);
    overload(Arc::clone(&side), "overload_pool::mysql_control").await;
    my::cleanup(&side).await;
}

/// The control runs: ignored (in CI too), run with `--ignored` to measure the same load without
/// the reserved lane.
const CONTROL: idem_testkit::harness::Need = idem_testkit::harness::Need::disabled(
    "control run",
    "the same load without the reserved lane, a measurement and not a check (run with --ignored)",
);

fn main() -> std::process::ExitCode {
    use backends::{MYSQL, POSTGRES};
    use idem_testkit::test_cases;
    idem_testkit::harness::run([
        test_cases!([POSTGRES], multi_thread(2); postgres_renewals_get_through_a_saturated_pool),
        test_cases!([POSTGRES, CONTROL], multi_thread(2); postgres_without_lane),
        test_cases!([MYSQL], multi_thread(2); mysql_renewals_get_through_a_saturated_pool),
        test_cases!([MYSQL, CONTROL], multi_thread(2); mysql_without_lane),
    ])
}
