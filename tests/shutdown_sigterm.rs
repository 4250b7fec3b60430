//! A rolling deploy: a process with 32 bodies in flight receives SIGTERM, drains
//! (`idem_core::shutdown`), and exits. Afterwards no key is in progress and no body runs twice:
//! every key is completed with the child's result, and a retry replays it.
//!
//! The process is this test binary run again as a child (`IDEM_SIGTERM_CHILD` set, only
//! `child_process_entry_point` selected). On Redis (`IDEM_TEST_REDIS_URL`, feature `redis`)
//! and PostgreSQL (`IDEM_TEST_POSTGRES_URL`, feature `postgres`) the parent checks the shared
//! store after the child exited; on the memory store, whose records die with the child, the
//! child checks its store after the drain and reports.
//!
//! ```text
//! IDEM_TEST_REDIS_URL=redis://127.0.0.1:6379 IDEM_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1/test \
//!     cargo test --features redis,postgres --test shutdown_sigterm
//! ```

#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "backends/mod.rs"]
mod backends;
// The run's keys on the shared Redis: this process's prefix, handed to its children, deleted
// by `main` when the cases are done.
#[cfg(feature = "redis")]
#[path = "../idem-stores/tests/support/redis_keys.rs"]
mod redis_keys;
// Likewise its PostgreSQL table.
#[cfg(feature = "postgres")]
#[path = "../idem-stores/tests/support/pg_run_table.rs"]
mod pg_run_table;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::{Call, Error, RecordState, Store};

const CHILD_VAR: &str = "IDEM_SIGTERM_CHILD";
const NS_VAR: &str = "IDEM_SIGTERM_NAMESPACE";
const BODIES: usize = 32;
const BODY_TIME: Duration = Duration::from_millis(1500);
const LEASE: Duration = Duration::from_secs(2);

/// A store of `kind`; `None`: skipped.
async fn open(kind: &str) -> Option<Arc<dyn Store>> {
    match kind {
        "memory" => Some(Arc::new(idem_stores::MemoryStore::new())),
        #[cfg(feature = "redis")]
        "redis" => {
            let url = idem_testkit::env_url("IDEM_TEST_REDIS_URL")?;
            Some(Arc::new(
                idem_stores::RedisStore::builder(url.as_str())
                    .prefix(redis_keys::run_prefix("sigterm"))
                    .build()
                    .await
                    .unwrap(),
            ))
        }
        #[cfg(feature = "postgres")]
        "postgres" => {
            let url = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL")?;
            let store = idem_stores::PostgresStore::builder()
                .url(url.as_str())
                .table(pg_run_table::run_table("sigterm"))
                .max_connections(8)
                .connect()
                .await
                .unwrap();
            store.migrate().await.unwrap();
            Some(Arc::new(store))
        }
        other => {
            println!("skipped: {other} needs `--features {other}`");
            None
        }
    }
}

fn call(ns: &'static str, i: usize) -> Call {
    Call::new(ns).key(i as u64).lease(LEASE)
}

/// In a normal run: nothing. In the child: start 32 bodies, wait for SIGTERM, drain, report.
async fn child_process_entry_point() {
    let Ok(kind) = std::env::var(CHILD_VAR) else {
        return;
    };
    let ns: &'static str = Box::leak(std::env::var(NS_VAR).unwrap().into_boxed_str());
    let store = open(&kind).await.expect("the parent checked the store");
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    for i in 0..BODIES {
        let (store, started) = (store.clone(), started.clone());
        // Never awaited: the drain is what lets them finish before the runtime goes.
        tokio::spawn(async move {
            call(ns, i)
                .run(&*store, async move {
                    println!("RAN {i}");
                    started.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(BODY_TIME).await;
                    Ok::<_, Error>(format!("value {i} from pid {}", std::process::id()))
                })
                .await
        });
    }
    while started.load(Ordering::SeqCst) < BODIES {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("READY");
    term.recv().await;
    println!("SIGTERM");
    let drain = tokio::spawn(idem_core::shutdown(Duration::from_secs(10)));
    while !idem_core::shutdown::is_draining() {
        tokio::task::yield_now().await;
    }
    let late = Call::new(ns)
        .key("late")
        .run(&*store, async {
            println!("RAN late");
            Ok::<_, Error>(String::new())
        })
        .await;
    match late {
        Err(Error::ShuttingDown) => println!("REFUSED"),
        other => println!("NOT REFUSED {other:?}"),
    }
    match drain.await.unwrap() {
        Ok(()) => println!("DRAINED"),
        Err(e) => println!("UNFINISHED {e}: {:?}", e.calls()),
    }
    if kind == "memory" {
        let (mut completed, mut in_progress) = (0, 0);
        for i in 0..BODIES {
            let key = call(ns, i).identity_for(&*store).unwrap().unwrap().key;
            match store.get(&key).await.unwrap() {
                Some(RecordState::Completed(_)) => completed += 1,
                Some(RecordState::InProgress { .. }) => in_progress += 1,
                None => {}
            }
        }
        println!("MEMORY completed={completed} in_progress={in_progress}");
    }
    // Returning drops the runtime, as the end of `main` would.
}

/// The child process, killed if the test fails before it exits.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn sigterm_with_bodies_in_flight(kind: &str) {
    let Some(store) = open(kind).await else {
        return;
    };
    let salt = idem_testkit::fresh_key();
    let ns: &'static str =
        Box::leak(format!("tests::shutdown_sigterm::{kind}::{salt}").into_boxed_str());
    let mut child = Child(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_process_entry_point",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_VAR, kind)
            .env(NS_VAR, ns)
            .envs(child_env())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let next = |seen: &mut Vec<String>| -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines_rx.recv_timeout(left).ok()?;
        seen.push(line.clone());
        Some(line)
    };
    while let Some(line) = next(&mut seen) {
        if line.contains("READY") {
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("READY")),
        "{kind}: the child never had its bodies in flight: {seen:#?}"
    );
    let sent_at = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    while next(&mut seen).is_some() {}
    let exit = child.0.wait().unwrap();
    let drained_in = sent_at.elapsed();
    assert!(
        exit.success(),
        "{kind}: the child failed: {exit:?}\n{seen:#?}"
    );

    let ran: Vec<&str> = seen
        .iter()
        .filter_map(|l| l.split_once("RAN ").map(|(_, i)| i.trim()))
        .collect();
    let mut distinct = ran.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        ran.len(),
        BODIES,
        "{kind}: bodies run in the child: {ran:?}"
    );
    assert_eq!(distinct.len(), BODIES, "{kind}: a body ran twice: {ran:?}");
    let has = |what: &str| seen.iter().any(|l| l.contains(what));
    assert!(has("REFUSED") && !has("NOT REFUSED"), "{kind}: {seen:#?}");
    assert!(has("DRAINED") && !has("UNFINISHED"), "{kind}: {seen:#?}");
    assert!(
        drained_in < BODY_TIME + Duration::from_secs(5),
        "{kind}: the drain took {drained_in:?}"
    );

    if kind == "memory" {
        assert!(
            has(&format!("MEMORY completed={BODIES} in_progress=0")),
            "{kind}: {seen:#?}"
        );
    } else {
        // The shared store after the child exited: every key completed with the child's
        // value, and a retry replays it without running the body.
        let reruns = Arc::new(AtomicUsize::new(0));
        for i in 0..BODIES {
            let key = call(ns, i).identity_for(&*store).unwrap().unwrap().key;
            let state = store.get(&key).await.unwrap();
            assert!(
                matches!(state, Some(RecordState::Completed(_))),
                "{kind}: key {i} is not completed after the drain: {state:?}"
            );
            let reruns = reruns.clone();
            let replayed = call(ns, i)
                .run(&*store, async move {
                    reruns.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(String::new())
                })
                .await
                .unwrap();
            assert!(
                replayed.starts_with(&format!("value {i} from pid ")),
                "{kind}: {replayed}"
            );
            store.remove(&key).await.unwrap();
        }
        assert_eq!(reruns.load(Ordering::SeqCst), 0, "{kind}: a body ran twice");
    }
    println!(
        "shutdown_sigterm {kind}: {BODIES} bodies in flight, drained {drained_in:?} after SIGTERM"
    );
}

async fn memory_sigterm_drains_32_bodies() {
    if std::env::var_os(CHILD_VAR).is_none() {
        sigterm_with_bodies_in_flight("memory").await;
    }
}

async fn redis_sigterm_drains_32_bodies() {
    if std::env::var_os(CHILD_VAR).is_none() {
        sigterm_with_bodies_in_flight("redis").await;
    }
}

async fn postgres_sigterm_drains_32_bodies() {
    if std::env::var_os(CHILD_VAR).is_none() {
        sigterm_with_bodies_in_flight("postgres").await;
    }
}

fn main() -> std::process::ExitCode {
    use backends::{POSTGRES, REDIS};
    use idem_testkit::{harness, test_cases};
    let code = harness::run([
        harness::child_cases(
            CHILD_VAR,
            test_cases!([], multi_thread(2); child_process_entry_point),
        ),
        test_cases!([], multi_thread(2); memory_sigterm_drains_32_bodies),
        test_cases!([REDIS], multi_thread(2); redis_sigterm_drains_32_bodies),
        test_cases!([POSTGRES], multi_thread(2); postgres_sigterm_drains_32_bodies),
    ]);
    #[cfg(feature = "redis")]
    if redis_keys::owns_prefix() {
        redis_keys::delete_prefix_blocking(
            std::env::var("IDEM_TEST_REDIS_URL").ok(),
            &redis_keys::run_prefix("sigterm"),
        );
    }
    #[cfg(feature = "postgres")]
    pg_run_table::drop_run_table_blocking("sigterm");
    code
}

/// The environment a child needs to use the run's Redis keys and PostgreSQL table.
fn child_env() -> Vec<(&'static str, String)> {
    [
        #[cfg(feature = "redis")]
        (redis_keys::PREFIX_VAR, redis_keys::run_prefix("sigterm")),
        #[cfg(feature = "postgres")]
        (pg_run_table::TABLE_VAR, pg_run_table::run_table("sigterm")),
    ]
    .into_iter()
    .collect()
}
