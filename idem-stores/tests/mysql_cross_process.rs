//! Across OS processes on MySQL / MariaDB.
//!
//! - Exactly-once: 4 processes × 50 concurrent tasks call the same 200 keys through an
//!   `#[idempotent]` method; each body inserts one row into a side-effect table (no unique
//!   constraint, so a second execution would show). Afterwards there are exactly 200 rows,
//!   and every one of the 40 000 callers got the result of the one execution of its key.
//! - Crash takeover: a process killed with SIGKILL in the middle of a body loses its claim
//!   when its lease passes; a caller in another process takes over and runs the body.
//!
//! The parent re-executes this test binary (`std::env::current_exe()`) with a role variable
//! and `--exact <test>`. Runs when `IDEM_TEST_MYSQL_URL` is set.
#![cfg(feature = "mysql")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::{idempotent, Error, FencingToken};
use idem_stores::MySqlStore;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
use sqlx::AssertSqlSafe;

const PROCESSES: usize = 4;
const TASKS: usize = 50;
const KEYS: u32 = 200;
const TEST_NAME: &str = "cross_process_exactly_once";
const ROLE: &str = "IDEM_MYSQL_XP_ROLE";

async fn pool(url: &str, max: u32) -> MySqlPool {
    MySqlPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(20))
        .connect(url)
        .await
        .expect("connect to IDEM_TEST_MYSQL_URL")
}

async fn cross_process_exactly_once() {
    if std::env::var_os(ROLE).is_some() {
        return child().await;
    }
    let Some(url) = idem_testkit::env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let run = FencingToken::random().0 % 1_000_000_000_000;
    let table = format!("idem_xp_{run}");
    let effects = format!("idem_xp_fx_{run}");
    let admin = pool(&url, 2).await;
    let store = MySqlStore::builder()
        .pool(admin.clone())
        .table(&table)
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE `{effects}` (id BIGINT AUTO_INCREMENT PRIMARY KEY, k INT NOT NULL, \
         result VARCHAR(100) NOT NULL) ENGINE=InnoDB"
    )))
    .execute(&admin)
    .await
    .unwrap();

    // All children start their calls at the same instant (wall clock), after connecting.
    let start_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 2500;
    let t0 = Instant::now();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCESSES)
        .map(|i| {
            std::process::Command::new(&exe)
                .args(["--exact", TEST_NAME, "--nocapture", "--test-threads", "1"])
                .env(ROLE, i.to_string())
                .env("IDEM_MYSQL_XP_TABLE", &table)
                .env("IDEM_MYSQL_XP_EFFECTS", &effects)
                .env("IDEM_MYSQL_XP_START", start_at.to_string())
                .env("IDEM_TEST_MYSQL_URL", &url)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::inherit())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("child"))
        .collect();
    let elapsed = t0.elapsed();

    // key -> result -> how many callers got it
    let mut seen: BTreeMap<u32, BTreeMap<String, usize>> = BTreeMap::new();
    let mut errors = Vec::new();
    for (i, out) in outputs.iter().enumerate() {
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            errors.push(format!("child {i} failed: {}\n{text}", out.status));
        }
        for line in text.lines() {
            let mut parts = line.splitn(4, ' ');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some("XP"), Some(k), Some(n), Some(result)) => {
                    *seen
                        .entry(k.parse().unwrap())
                        .or_default()
                        .entry(result.to_owned())
                        .or_default() += n.parse::<usize>().unwrap();
                }
                (Some("XPERR"), ..) => errors.push(line.to_owned()),
                _ => {}
            }
        }
    }
    let rows: Vec<(i32, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT k, result FROM `{effects}` ORDER BY k"
    )))
    .fetch_all(&admin)
    .await
    .unwrap();
    // Drop the tables before any assertion can fail.
    for t in [&table, &effects] {
        sqlx::query(AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS `{t}`, `{t}_steps`"
        )))
        .execute(&admin)
        .await
        .unwrap();
    }
    assert!(
        errors.is_empty(),
        "{} calls failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
    assert_eq!(rows.len(), KEYS as usize, "side effects: one row per key");
    let keys: BTreeSet<i32> = rows.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys.len(), KEYS as usize, "every key ran exactly once");
    for (k, result) in &rows {
        let got = seen.get(&(*k as u32)).expect("a key no caller reported");
        assert_eq!(
            got.len(),
            1,
            "key {k}: callers got different results {got:?}"
        );
        assert_eq!(
            got.get(result),
            Some(&(PROCESSES * TASKS)),
            "key {k}: {got:?}"
        );
    }
    println!(
        "cross-process: {PROCESSES} processes x {TASKS} tasks x {KEYS} keys = {} calls in {:?}; \
         {} side effects",
        PROCESSES * TASKS * KEYS as usize,
        elapsed,
        rows.len()
    );
}

/// Printed through `Debug` in the `XPERR` lines.
#[derive(Debug)]
#[allow(dead_code)]
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
    store: MySqlStore,
    side: MySqlPool,
    insert: String,
    process: usize,
}

impl Worker {
    /// The side effect: one row per execution, in a table with no unique constraint on `k`,
    /// so that a second execution of a key would show as a second row.
    #[idempotent(key = k, lease = "3s", wait_timeout = "60s", store = self.store, skip(task))]
    async fn charge(&self, k: u32, task: usize) -> Result<String, WorkError> {
        let result = format!("p{}-t{task}-{}", self.process, FencingToken::random().0);
        sqlx::query(AssertSqlSafe(self.insert.clone()))
            .bind(k)
            .bind(&result)
            .execute(&self.side)
            .await
            .map_err(|e| WorkError::Db(e.to_string()))?;
        Ok(result)
    }
}

/// One child process: 50 tasks, each calling all 200 keys, starting at a different key so
/// that every key is contended from the first moment.
async fn child() {
    let var = |name: &str| std::env::var(name).unwrap();
    let me: usize = var(ROLE).parse().unwrap();
    let (table, effects) = (var("IDEM_MYSQL_XP_TABLE"), var("IDEM_MYSQL_XP_EFFECTS"));
    let pool = pool(&var("IDEM_TEST_MYSQL_URL"), 24).await;
    let store = MySqlStore::builder()
        .pool(pool.clone())
        .table(&table)
        .build()
        .unwrap();
    let worker = Arc::new(Worker {
        store,
        side: pool,
        insert: format!("INSERT INTO `{effects}` (k, result) VALUES (?, ?)"),
        process: me,
    });
    let start_at: u128 = var("IDEM_MYSQL_XP_START").parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    tokio::time::sleep(Duration::from_millis(start_at.saturating_sub(now) as u64)).await;

    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let worker = worker.clone();
            tokio::spawn(async move {
                let mut got = Vec::with_capacity(KEYS as usize);
                for i in 0..KEYS {
                    let k = (i + (t as u32) * 4 + (me as u32) * 2) % KEYS;
                    let r = worker.charge(k, t).await;
                    got.push((k, r.map_err(|e| format!("{e:?}"))));
                }
                got
            })
        })
        .collect();
    // libtest prints "test <name> ... " without a newline before the test's own output.
    println!();
    let mut counts: BTreeMap<(u32, String), usize> = BTreeMap::new();
    for t in tasks {
        for (k, r) in t.await.unwrap() {
            match r {
                Ok(v) => *counts.entry((k, v)).or_default() += 1,
                Err(e) => println!("XPERR {k} {e}"),
            }
        }
    }
    for ((k, v), n) in counts {
        println!("XP {k} {n} {v}");
    }
}

const CRASH_ROLE: &str = "IDEM_MYSQL_CRASH_ROLE";
const CRASH_TEST: &str = "crash_takeover_after_sigkill";

struct Stepper {
    store: MySqlStore,
    side: MySqlPool,
    insert: String,
}

impl Stepper {
    /// Records that it started, then (in the child) hangs until it is killed.
    #[idempotent(key = k, lease = "500ms", wait_timeout = "20s", store = self.store, skip(hang))]
    async fn step(&self, k: u32, hang: bool) -> Result<String, WorkError> {
        let result = format!("pid{}", std::process::id());
        sqlx::query(AssertSqlSafe(self.insert.clone()))
            .bind(k)
            .bind(&result)
            .execute(&self.side)
            .await
            .map_err(|e| WorkError::Db(e.to_string()))?;
        if hang {
            tokio::time::sleep(Duration::from_secs(120)).await;
        }
        Ok(result)
    }
}

async fn stepper(url: &str, table: &str, effects: &str) -> Stepper {
    let side = pool(url, 4).await;
    Stepper {
        store: MySqlStore::builder()
            .pool(side.clone())
            .table(table)
            .build()
            .unwrap(),
        side,
        insert: format!("INSERT INTO `{effects}` (k, result) VALUES (?, ?)"),
    }
}

/// A process holding a claim (lease 500 ms, renewed while its body runs) is killed with
/// SIGKILL mid-body. Another process calling the same key waits, takes the claim over once
/// the lease has passed, runs the body and records its result; the dead process's token can
/// no longer complete anything.
async fn crash_takeover_after_sigkill() {
    if std::env::var_os(CRASH_ROLE).is_some() {
        let var = |name: &str| std::env::var(name).unwrap();
        let s = stepper(
            &var("IDEM_TEST_MYSQL_URL"),
            &var("IDEM_MYSQL_XP_TABLE"),
            &var("IDEM_MYSQL_XP_EFFECTS"),
        )
        .await;
        let _ = s.step(7, true).await;
        return;
    }
    let Some(url) = idem_testkit::env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let run = FencingToken::random().0 % 1_000_000_000_000;
    let (table, effects) = (format!("idem_ck_{run}"), format!("idem_ck_fx_{run}"));
    let s = stepper(&url, &table, &effects).await;
    s.store.migrate().await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE `{effects}` (id BIGINT AUTO_INCREMENT PRIMARY KEY, k INT NOT NULL, \
         result VARCHAR(100) NOT NULL) ENGINE=InnoDB"
    )))
    .execute(&s.side)
    .await
    .unwrap();
    let effect_rows = || async {
        sqlx::query_as::<_, (String,)>(AssertSqlSafe(format!(
            "SELECT result FROM `{effects}` ORDER BY id"
        )))
        .fetch_all(&s.side)
        .await
        .unwrap()
    };

    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", CRASH_TEST, "--nocapture", "--test-threads", "1"])
        .env(CRASH_ROLE, "child")
        .env("IDEM_MYSQL_XP_TABLE", &table)
        .env("IDEM_MYSQL_XP_EFFECTS", &effects)
        .env("IDEM_TEST_MYSQL_URL", &url)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the child is inside its body, then let it renew its lease a few times.
    let deadline = Instant::now() + Duration::from_secs(30);
    while effect_rows().await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the child never started its body"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Past its 500 ms lease, the child's claim is still live: it renews while its body runs.
    let live: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM `{table}` WHERE state = 'in_progress' AND live_until > \
         TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000"
    )))
    .fetch_one(&s.side)
    .await
    .unwrap();
    assert_eq!(live, 1, "the running child's claim lapsed: renewal failed");
    child.kill().unwrap(); // SIGKILL: no release, no cleanup
    child.wait().unwrap();
    let killed_at = Instant::now();

    let taken_over_before = idem_core::count(idem_core::Outcome::TakenOver);
    let got = s.step(7, false).await.map_err(|e| format!("{e:?}"));
    let took = killed_at.elapsed();
    let rows = effect_rows().await;
    for t in [&table, &effects] {
        sqlx::query(AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS `{t}`, `{t}_steps`"
        )))
        .execute(&s.side)
        .await
        .unwrap();
    }
    let mine = format!("pid{}", std::process::id());
    assert_eq!(got.unwrap(), mine);
    assert_eq!(rows.len(), 2, "the killed body and the takeover: {rows:?}");
    assert_eq!(rows[1].0, mine);
    assert_eq!(
        idem_core::count(idem_core::Outcome::TakenOver),
        taken_over_before + 1,
        "the call was counted as a takeover"
    );
    assert!(took < Duration::from_secs(5), "takeover took {took:?}");
    println!("SIGKILLed holder taken over after {took:?}");
}

fn main() -> std::process::ExitCode {
    idem_testkit::harness::run([
        idem_testkit::test_cases!([backends::MYSQL], multi_thread(2);
        cross_process_exactly_once, crash_takeover_after_sigkill),
    ])
}
