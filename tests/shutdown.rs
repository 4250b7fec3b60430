//! The drain (`idem_core::shutdown`): a tokio runtime dropped right after a caller was dropped
//! mid-completion loses the detached completion (the record stays in progress, and once its
//! lease passes a retry runs the body again) — unless the runtime is drained first, which
//! finishes the completion. On the memory store, Redis (`IDEM_TEST_REDIS_URL`, feature
//! `redis`) and PostgreSQL (`IDEM_TEST_POSTGRES_URL`, feature `postgres`). And on the memory
//! store: new calls are refused while the drain runs, running bodies are waited for, a waiter
//! still gets a result completed during the drain, and the deadline reports what is held.
//!
//! The drain is process-wide, so the tests of this file run one at a time, each on runtimes
//! of its own.
//!
//! ```text
//! IDEM_TEST_REDIS_URL=redis://127.0.0.1:6379 IDEM_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1/test \
//!     cargo test --features redis,postgres --test shutdown
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "backends/mod.rs"]
mod backends;
// The run's own PostgreSQL table, dropped by `main` when the cases are done.
#[cfg(feature = "postgres")]
#[path = "../idem-stores/tests/support/pg_run_table.rs"]
mod pg_run_table;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use idem_core::shutdown::Stage;
use idem_core::{Call, Error, RecordState, ShutdownError, Store};
use idem_stores::MemoryStore;
use idem_testkit::{Fault, FaultyStore, Op};

static SERIAL: Mutex<()> = Mutex::new(());

/// One test at a time (the drain stops every call of the process), and never left draining.
fn serial() -> impl Drop {
    struct Resume(#[allow(dead_code)] MutexGuard<'static, ()>);
    impl Drop for Resume {
        fn drop(&mut self) {
            idem_core::shutdown::resume();
        }
    }
    Resume(SERIAL.lock().unwrap_or_else(PoisonError::into_inner))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn namespace(what: &str) -> &'static str {
    let salt = idem_testkit::fresh_key();
    Box::leak(format!("tests::shutdown::{what}::{salt}").into_boxed_str())
}

const LEASE: Duration = Duration::from_secs(1);

/// `Call::new(ns).key(key)` with a body that counts its runs, takes `body_time` and answers
/// `value`.
async fn counted(
    store: &dyn Store,
    ns: &'static str,
    key: &str,
    runs: &Arc<AtomicUsize>,
    value: u32,
    body_time: Duration,
) -> Result<u32, Error> {
    let runs = runs.clone();
    Call::new(ns)
        .key(key)
        .lease(LEASE)
        .run(store, async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(body_time).await;
            Ok::<_, Error>(value)
        })
        .await
}

/// A store of `kind` on the current runtime (a remote store's connections belong to the
/// runtime that opened them, so each runtime opens its own). `None`: skipped.
async fn open(kind: &str, memory: &Arc<MemoryStore>) -> Option<Arc<dyn Store>> {
    match kind {
        "memory" => Some(memory.clone()),
        #[cfg(feature = "redis")]
        "redis" => {
            let url = idem_testkit::env_url("IDEM_TEST_REDIS_URL")?;
            Some(Arc::new(
                idem_stores::RedisStore::connect(&url).await.unwrap(),
            ))
        }
        #[cfg(feature = "postgres")]
        "postgres" => {
            let url = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL")?;
            let store = idem_stores::PostgresStore::builder()
                .url(url.as_str())
                .table(pg_run_table::run_table("shutdown"))
                .max_connections(4)
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

/// The caller is dropped while its completion is in flight (the store delays it, and the
/// detached retry too), then the runtime is dropped — after a drain, or right away.
fn dropped_mid_completion_then_runtime_dropped(kind: &str, drain: bool) {
    let _serial = serial();
    let ns = namespace(&format!("{kind}_{drain}"));
    let runs = Arc::new(AtomicUsize::new(0));
    let memory = Arc::new(MemoryStore::new());

    let first = runtime();
    let opened = first.block_on(async {
        let Some(store) = open(kind, &memory).await else {
            return false;
        };
        let faulty = FaultyStore::new(store);
        // The caller's completion, and the detached task's after the caller is gone.
        faulty.plan(Fault::Delay(Op::Complete, Duration::from_millis(400)));
        faulty.plan(Fault::Delay(Op::Complete, Duration::from_millis(400)));
        let call = counted(&faulty, ns, "k", &runs, 1, Duration::from_millis(20));
        assert!(
            tokio::time::timeout(Duration::from_millis(150), call)
                .await
                .is_err(),
            "the caller is dropped during its completion"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        if drain {
            let held = idem_core::shutdown::held_calls();
            assert!(
                held.iter()
                    .any(|c| c.namespace == ns && c.stage == Stage::Settling),
                "the detached completion is counted: {held:?}"
            );
            idem_core::shutdown(Duration::from_secs(5))
                .await
                .expect("the drain finishes the detached completion");
        }
        true
    });
    drop(first);
    if !opened {
        return;
    }

    let second = runtime();
    second.block_on(async {
        idem_core::shutdown::resume();
        let store = open(kind, &memory).await.unwrap();
        let key = Call::new(ns)
            .key("k")
            .identity_for(&*store)
            .unwrap()
            .unwrap()
            .key;
        let state = store.get(&key).await.unwrap();
        if drain {
            assert!(
                matches!(state, Some(RecordState::Completed(_))),
                "{kind}: drained, the completion is stored: {state:?}"
            );
            let again = counted(&*store, ns, "k", &runs, 2, Duration::ZERO).await;
            assert_eq!(
                again.unwrap(),
                1,
                "{kind}: a retry replays the first result"
            );
            assert_eq!(runs.load(Ordering::SeqCst), 1, "{kind}: the body ran twice");
        } else {
            // What the docs say of a runtime stopped without a drain: the detached completion
            // went with it, the record is left in progress, and after the lease the body runs
            // again.
            assert!(
                matches!(state, Some(RecordState::InProgress { .. })),
                "{kind}: without a drain the record is left in progress: {state:?}"
            );
            tokio::time::sleep(LEASE + Duration::from_millis(300)).await;
            let again = counted(&*store, ns, "k", &runs, 2, Duration::ZERO).await;
            assert_eq!(again.unwrap(), 2, "{kind}: the retry ran the body again");
            assert_eq!(runs.load(Ordering::SeqCst), 2);
        }
        store.remove(&key).await.unwrap();
    });
}

fn memory_runtime_dropped_after_a_drain_keeps_the_completion() {
    dropped_mid_completion_then_runtime_dropped("memory", true);
}

fn memory_runtime_dropped_without_a_drain_loses_the_completion() {
    dropped_mid_completion_then_runtime_dropped("memory", false);
}

fn redis_runtime_dropped_after_a_drain_keeps_the_completion() {
    dropped_mid_completion_then_runtime_dropped("redis", true);
}

fn redis_runtime_dropped_without_a_drain_loses_the_completion() {
    dropped_mid_completion_then_runtime_dropped("redis", false);
}

fn postgres_runtime_dropped_after_a_drain_keeps_the_completion() {
    dropped_mid_completion_then_runtime_dropped("postgres", true);
}

fn postgres_runtime_dropped_without_a_drain_loses_the_completion() {
    dropped_mid_completion_then_runtime_dropped("postgres", false);
}

/// While the drain waits for a running body, a new call is refused with `ShuttingDown` (503)
/// and its body does not run; the drain ends when the body's completion is stored.
fn new_calls_are_refused_and_running_bodies_finish() {
    let _serial = serial();
    runtime().block_on(async {
        let store = Arc::new(MemoryStore::new());
        let ns = namespace("refused");
        let runs = Arc::new(AtomicUsize::new(0));
        let running = {
            let (store, runs) = (store.clone(), runs.clone());
            tokio::spawn(async move {
                counted(&*store, ns, "running", &runs, 7, Duration::from_millis(400)).await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the body is running");
        let drain = tokio::spawn(idem_core::shutdown(Duration::from_secs(5)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(idem_core::shutdown::is_draining());
        assert!(!drain.is_finished(), "the drain waits for the running body");

        let refused = counted(&*store, ns, "new", &runs, 8, Duration::ZERO).await;
        let e = refused.expect_err("a new call during the drain is refused");
        assert!(matches!(e, Error::ShuttingDown), "{e:?}");
        assert_eq!(e.http_status(), 503);
        assert_eq!(e.outcome(), idem_core::Outcome::ShuttingDown);
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "the refused body did not run"
        );

        drain
            .await
            .unwrap()
            .expect("drained once the body completed");
        assert_eq!(running.await.unwrap().unwrap(), 7);
        let key = Call::new(ns)
            .key("running")
            .identity_for(&*store)
            .unwrap()
            .unwrap()
            .key;
        assert!(matches!(
            store.get(&key).await.unwrap(),
            Some(RecordState::Completed(_))
        ));
        // A replay held in this process is still answered during the drain.
        let replay = counted(&*store, ns, "running", &runs, 9, Duration::ZERO).await;
        assert_eq!(replay.unwrap(), 7);
        assert!(idem_core::shutdown::held_calls().is_empty());
    });
}

/// A duplicate waiting for the holder when the drain starts gets the holder's result, which is
/// completed during the drain, instead of a refusal.
fn a_waiter_gets_the_result_completed_during_the_drain() {
    let _serial = serial();
    runtime().block_on(async {
        let store = Arc::new(MemoryStore::new());
        let ns = namespace("waiter");
        let runs = Arc::new(AtomicUsize::new(0));
        let holder = {
            let (store, runs) = (store.clone(), runs.clone());
            tokio::spawn(async move {
                counted(&*store, ns, "k", &runs, 1, Duration::from_millis(300)).await
            })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        let waiter = {
            let (store, runs) = (store.clone(), runs.clone());
            tokio::spawn(async move { counted(&*store, ns, "k", &runs, 2, Duration::ZERO).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        idem_core::shutdown(Duration::from_secs(5))
            .await
            .expect("drained");
        assert_eq!(holder.await.unwrap().unwrap(), 1);
        assert_eq!(
            waiter.await.unwrap().unwrap(),
            1,
            "the waiter replays the holder's result"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    });
}

/// A body that outlives the deadline is reported, with its key and stage, and keeps its claim.
fn the_deadline_reports_what_is_still_held() {
    let _serial = serial();
    runtime().block_on(async {
        let store = Arc::new(MemoryStore::new());
        let ns = namespace("deadline");
        let runs = Arc::new(AtomicUsize::new(0));
        let slow = {
            let (store, runs) = (store.clone(), runs.clone());
            tokio::spawn(async move {
                counted(&*store, ns, "slow", &runs, 1, Duration::from_secs(30)).await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        let e = idem_core::shutdown(Duration::from_millis(300))
            .await
            .expect_err("the body outlives the deadline");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(3));
        let ShutdownError::Unfinished { calls, .. } = &e else {
            panic!("{e:?}")
        };
        let key = Call::new(ns)
            .key("slow")
            .identity_for(&*store)
            .unwrap()
            .unwrap()
            .key;
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0].namespace, ns);
        assert_eq!(calls[0].key, key);
        assert_eq!(calls[0].stage, Stage::Running);
        assert_eq!(e.calls(), &calls[..]);
        assert!(e.to_string().contains("1 idempotent call"), "{e}");
        assert_eq!(e.claims_in_flight(), 0);
        assert!(
            matches!(
                store.get(&key).await.unwrap(),
                Some(RecordState::InProgress { .. })
            ),
            "a running body keeps its claim"
        );
        // Cancelled: its claim is released as for any dropped caller.
        slow.abort();
        let _ = slow.await;
        assert!(store.get(&key).await.unwrap().is_none());
    });
}

/// A claim in flight is counted, not listed (a replay or a conflict, which holds nothing once
/// its claim answers, costs no entry): the drain waits for it, and for the body it acquires;
/// one still in flight at the deadline is reported by count.
fn a_claim_in_flight_is_waited_for_and_reported() {
    let _serial = serial();
    runtime().block_on(async {
        let memory = Arc::new(MemoryStore::new());
        let store = Arc::new(FaultyStore::new(memory.clone()));
        let ns = namespace("claim_in_flight");
        let runs = Arc::new(AtomicUsize::new(0));
        let listed = |ns: &str| {
            idem_core::shutdown::held_calls()
                .iter()
                .filter(|c| c.namespace == ns)
                .count()
        };

        // Sent before the drain, answered during it: the drain waits for the claim, then for
        // the body it acquired.
        store.plan(Fault::Delay(Op::Claim, Duration::from_millis(400)));
        let first = {
            let (store, runs) = (store.clone(), runs.clone());
            tokio::spawn(async move {
                counted(&*store, ns, "k", &runs, 1, Duration::from_millis(100)).await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(idem_core::shutdown::claims_in_flight(), 1);
        assert_eq!(listed(ns), 0, "a claim in flight is not listed");
        idem_core::shutdown(Duration::from_secs(5))
            .await
            .expect("the claim and its body finish within the deadline");
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "the body ran before the drain returned"
        );
        assert_eq!(first.await.unwrap().unwrap(), 1);
        idem_core::shutdown::resume();

        // A replay through the claim: counted while in flight, never listed.
        store.plan(Fault::Delay(Op::Claim, Duration::from_millis(300)));
        let replay = {
            let (store, runs) = (store.clone(), runs.clone());
            tokio::spawn(async move { counted(&*store, ns, "k", &runs, 2, Duration::ZERO).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(idem_core::shutdown::claims_in_flight(), 1);
        assert_eq!(listed(ns), 0, "a replay is not listed");
        assert_eq!(replay.await.unwrap().unwrap(), 1, "the replay");
        assert_eq!(idem_core::shutdown::claims_in_flight(), 0);

        // Still in flight at the deadline: reported by count, nothing listed.
        store.plan(Fault::Delay(Op::Claim, Duration::from_secs(2)));
        let late = {
            let (store, runs) = (store.clone(), runs.clone());
            tokio::spawn(
                async move { counted(&*store, ns, "late", &runs, 3, Duration::ZERO).await },
            )
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let e = idem_core::shutdown(Duration::from_millis(300))
            .await
            .expect_err("the claim outlives the deadline");
        assert!(e.calls().iter().all(|c| c.namespace != ns), "{e:?}");
        assert_eq!(e.claims_in_flight(), 1, "{e:?}");
        assert!(e.to_string().contains("1 claim(s) still in flight"), "{e}");
        late.abort();
        let _ = late.await;
        for k in ["k", "late"] {
            let key = Call::new(ns)
                .key(k)
                .identity_for(&*store)
                .unwrap()
                .unwrap()
                .key;
            memory.remove(&key).await.unwrap();
        }
    });
}

/// During the drain a retry of a finished call still gets its result from the store (a look,
/// not a claim), while a new key is refused and its body does not run.
fn a_finished_call_is_answered_during_the_drain(kind: &str) {
    let _serial = serial();
    runtime().block_on(async {
        let memory = Arc::new(MemoryStore::new());
        let Some(store) = open(kind, &memory).await else {
            return;
        };
        let ns = namespace(&format!("answered_{kind}"));
        let runs = Arc::new(AtomicUsize::new(0));
        let first = counted(&*store, ns, "done", &runs, 5, Duration::ZERO).await;
        assert_eq!(first.unwrap(), 5);
        idem_core::shutdown(Duration::from_secs(5))
            .await
            .expect("nothing is held");
        let retry = counted(&*store, ns, "done", &runs, 6, Duration::ZERO).await;
        assert_eq!(retry.unwrap(), 5, "{kind}: the retry replays");
        let new = counted(&*store, ns, "new", &runs, 7, Duration::ZERO).await;
        assert!(matches!(new, Err(Error::ShuttingDown)), "{kind}: {new:?}");
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "{kind}: a body ran during the drain"
        );
        for k in ["done", "new"] {
            let key = Call::new(ns)
                .key(k)
                .identity_for(&*store)
                .unwrap()
                .unwrap()
                .key;
            store.remove(&key).await.unwrap();
        }
    });
}

fn memory_a_finished_call_is_answered_during_the_drain() {
    a_finished_call_is_answered_during_the_drain("memory");
}

fn redis_a_finished_call_is_answered_during_the_drain() {
    a_finished_call_is_answered_during_the_drain("redis");
}

fn postgres_a_finished_call_is_answered_during_the_drain() {
    a_finished_call_is_answered_during_the_drain("postgres");
}

fn main() -> std::process::ExitCode {
    use backends::{POSTGRES, REDIS};
    use idem_testkit::test_cases;
    let code = idem_testkit::harness::run([
        test_cases!([], sync;
            memory_runtime_dropped_after_a_drain_keeps_the_completion,
            memory_runtime_dropped_without_a_drain_loses_the_completion,
            new_calls_are_refused_and_running_bodies_finish,
            a_waiter_gets_the_result_completed_during_the_drain,
            the_deadline_reports_what_is_still_held,
            a_claim_in_flight_is_waited_for_and_reported,
            memory_a_finished_call_is_answered_during_the_drain),
        test_cases!([REDIS], sync;
            redis_runtime_dropped_after_a_drain_keeps_the_completion,
            redis_runtime_dropped_without_a_drain_loses_the_completion,
            redis_a_finished_call_is_answered_during_the_drain),
        test_cases!([POSTGRES], sync;
            postgres_runtime_dropped_after_a_drain_keeps_the_completion,
            postgres_runtime_dropped_without_a_drain_loses_the_completion,
            postgres_a_finished_call_is_answered_during_the_drain),
    ]);
    #[cfg(feature = "postgres")]
    pg_run_table::drop_run_table_blocking("shutdown");
    code
}
