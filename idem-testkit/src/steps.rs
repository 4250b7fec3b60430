//! The durable-steps conformance cases: what every store that keeps steps
//! ([`Store::supports_steps`]) must do, at the store level (fenced writes, replacement,
//! retention, expiry, limits) and through the runtime ([`idem_core::step()`]: occurrences,
//! resume, at-most-once, stored errors, refusals).
//!
//! [`step_conformance_tests!`](crate::step_conformance_tests) stamps one test per case, like
//! [`conformance_tests!`](crate::conformance_tests):
//!
//! ```no_run
//! // tests/steps.rs of a backend crate, with `harness = false` in its `[[test]]` entry
//! use std::sync::Arc;
//!
//! idem_testkit::step_conformance_tests!(async {
//!     Some(Arc::new(idem_stores::MemoryStore::new()) as Arc<dyn idem_core::Store>)
//! });
//!
//! fn main() -> std::process::ExitCode {
//!     idem_testkit::harness::run([cases(&[])])
//! }
//! ```
//!
//! The store must accept values of at least 64 KiB, and the cases use leases and TTLs of a
//! few hundred milliseconds, so they run in seconds.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_core::{
    async_trait, step, step_key, Call, Claim, ClaimRequest, Error, FencingToken, Key, RecordState,
    StepId, StepRecord, StepStatus, Store, StoreError,
};
use serde::{Deserialize, Serialize};

use super::{acquire, claim_request, fresh_key, LONG, PAST_SHORT, SHORT};

/// Stamps one test per durable-steps case, for [`harness::run`](crate::harness::run): an
/// `async fn` per case and a `pub fn cases(needs: &[harness::Need]) -> Vec<harness::Case>` in
/// the calling module (put it in a module of its own beside
/// [`conformance_tests!`](crate::conformance_tests)). The argument is an expression evaluating
/// to a future of `Option<Arc<dyn Store>>`, as for `conformance_tests!`.
#[macro_export]
macro_rules! step_conformance_tests {
    ($make:expr) => {
        $crate::step_conformance_tests!(@cases $make;
            step_put_load_round_trip, step_started_replaced_by_done, step_put_is_repeatable,
            step_fenced_wrong_token, step_fenced_after_takeover, step_fenced_after_complete,
            step_fenced_after_release, step_clear, step_release_keeps_steps,
            step_remove_deletes_steps, step_ttl_expiry, step_too_large, steps_of_calls_apart,
            steps_occurrences, steps_resume_after_err, steps_at_most_once_in_doubt,
            steps_in_doubt_reconciled, steps_at_most_once_err_clears, steps_store_errors,
            steps_refused_outside_and_nested, steps_unsupported_store, steps_too_many,
            steps_value_too_large, steps_other_arguments_ignored, steps_replay_reads_no_steps,
            steps_step_key_stable, steps_inspect_lists_steps);
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            async fn $case() {
                let store: ::std::option::Option<::std::sync::Arc<dyn $crate::__core::Store>> = $make.await;
                let ::std::option::Option::Some(store) = store else {
                    ::std::panic!("the conformance store factory returned None");
                };
                $crate::steps::$case(store).await;
            }
        )*

        /// One test per durable-steps case, each with `needs`.
        pub fn cases(
            needs: &[$crate::harness::Need],
        ) -> ::std::vec::Vec<$crate::harness::Case> {
            $crate::test_cases!(needs, multi_thread(4); $($case),*)
        }
    };
}

fn rec(name: &str, occurrence: u32, status: StepStatus, value: &[u8]) -> StepRecord {
    StepRecord::new(StepId::new(name, occurrence), status, value.to_vec())
}

async fn loaded(store: &dyn Store, key: &Key) -> Vec<StepRecord> {
    let mut steps = store.load_steps(key).await.expect("load_steps");
    steps.sort_by(|a, b| a.id.cmp(&b.id));
    steps
}

fn assert_supported(store: &dyn Store) {
    assert!(
        store.supports_steps(),
        "the step cases are for stores that keep steps"
    );
}

/// Written steps load back, every one, with their status and value; no steps → empty.
pub async fn step_put_load_round_trip(store: Arc<dyn Store>) {
    assert_supported(&*store);
    let key = fresh_key();
    assert!(loaded(&*store, &key).await.is_empty());
    let token = acquire(&*store, key, LONG).await;
    assert!(loaded(&*store, &key).await.is_empty());
    let big = vec![0xa5u8; 40 << 10];
    let written = [
        rec("a", 0, StepStatus::Done, b"one"),
        rec("a", 1, StepStatus::Failed, b"two"),
        rec("b \u{e9}:\0/#", 0, StepStatus::Started, b""),
        rec("big", 0, StepStatus::Done, &big),
    ];
    for r in &written {
        store
            .put_step(&key, token, r, LONG)
            .await
            .expect("put_step");
    }
    let mut expected = written.to_vec();
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(loaded(&*store, &key).await, expected);
}

/// A record with the same id replaces the earlier one (an at-most-once step's start becomes
/// its result).
pub async fn step_started_replaced_by_done(store: Arc<dyn Store>) {
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    store
        .put_step(&key, token, &rec("s", 0, StepStatus::Started, b""), LONG)
        .await
        .expect("put started");
    store
        .put_step(&key, token, &rec("s", 0, StepStatus::Done, b"value"), LONG)
        .await
        .expect("put done");
    assert_eq!(
        loaded(&*store, &key).await,
        vec![rec("s", 0, StepStatus::Done, b"value")]
    );
}

/// Writing the same record twice (a retry after a lost reply) leaves one.
pub async fn step_put_is_repeatable(store: Arc<dyn Store>) {
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    let r = rec("s", 0, StepStatus::Done, b"v");
    store.put_step(&key, token, &r, LONG).await.expect("put");
    store.put_step(&key, token, &r, LONG).await.expect("again");
    assert_eq!(loaded(&*store, &key).await, vec![r]);
}

async fn assert_fenced(store: &dyn Store, key: &Key, token: FencingToken, why: &str) {
    let r = rec("fenced", 0, StepStatus::Done, b"x");
    assert!(
        matches!(
            store.put_step(key, token, &r, LONG).await,
            Err(StoreError::Fenced)
        ),
        "put_step {why} must be fenced"
    );
    assert!(
        matches!(
            store.clear_step(key, token, &r.id).await,
            Err(StoreError::Fenced)
        ),
        "clear_step {why} must be fenced"
    );
    assert!(
        !loaded(store, key).await.iter().any(|s| s.id == r.id),
        "a fenced step write {why} wrote nothing"
    );
}

/// A token that does not hold the call writes no step; nor does any token on an absent key.
pub async fn step_fenced_wrong_token(store: Arc<dyn Store>) {
    let key = fresh_key();
    let _token = acquire(&*store, key, LONG).await;
    assert_fenced(
        &*store,
        &key,
        FencingToken::random(),
        "under a foreign token",
    )
    .await;
    assert_fenced(
        &*store,
        &fresh_key(),
        FencingToken::random(),
        "of an absent call",
    )
    .await;
}

/// After a takeover the old holder writes no step; the new one does.
pub async fn step_fenced_after_takeover(store: Arc<dyn Store>) {
    let key = fresh_key();
    let old = acquire(&*store, key, SHORT).await;
    tokio::time::sleep(PAST_SHORT).await;
    let (req, new) = claim_request(key, LONG);
    assert_eq!(
        store.claim(&req).await.expect("claim"),
        Claim::Acquired { taken_over: true }
    );
    assert_fenced(&*store, &key, old, "after a takeover").await;
    store
        .put_step(&key, new, &rec("s", 0, StepStatus::Done, b"new"), LONG)
        .await
        .expect("the new holder writes");
}

/// A completed call takes no more steps (and keeps its completed value).
pub async fn step_fenced_after_complete(store: Arc<dyn Store>) {
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    store
        .complete(&key, token, b"done", LONG)
        .await
        .expect("complete");
    assert_fenced(&*store, &key, token, "after the completion").await;
    assert!(matches!(
        store.get(&key).await.expect("get"),
        Some(RecordState::Completed(r)) if &r.value[..] == b"done"
    ));
}

/// A released call takes no more steps from its old holder.
pub async fn step_fenced_after_release(store: Arc<dyn Store>) {
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    store.release(&key, token).await.expect("release");
    assert_fenced(&*store, &key, token, "after the release").await;
}

/// `clear_step` removes one step, fenced; an absent one is `Ok`.
pub async fn step_clear(store: Arc<dyn Store>) {
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    let a = rec("a", 0, StepStatus::Started, b"");
    let b = rec("b", 0, StepStatus::Done, b"v");
    store.put_step(&key, token, &a, LONG).await.expect("put a");
    store.put_step(&key, token, &b, LONG).await.expect("put b");
    assert!(matches!(
        store.clear_step(&key, FencingToken::random(), &a.id).await,
        Err(StoreError::Fenced)
    ));
    store.clear_step(&key, token, &a.id).await.expect("clear");
    store
        .clear_step(&key, token, &a.id)
        .await
        .expect("clear of an absent step");
    assert_eq!(loaded(&*store, &key).await, vec![b]);
}

/// Releasing (and completing) a call keeps its steps; the next holder sees them and adds to
/// them.
pub async fn step_release_keeps_steps(store: Arc<dyn Store>) {
    let key = fresh_key();
    let first = acquire(&*store, key, LONG).await;
    let a = rec("a", 0, StepStatus::Done, b"1");
    store.put_step(&key, first, &a, LONG).await.expect("put");
    store.release(&key, first).await.expect("release");
    assert_eq!(loaded(&*store, &key).await, vec![a.clone()]);
    let second = acquire(&*store, key, LONG).await;
    let b = rec("b", 0, StepStatus::Done, b"2");
    store.put_step(&key, second, &b, LONG).await.expect("put");
    store
        .complete(&key, second, b"done", LONG)
        .await
        .expect("complete");
    assert_eq!(loaded(&*store, &key).await, vec![a, b]);
}

/// `remove` (forget) deletes the call's steps, whatever its state.
pub async fn step_remove_deletes_steps(store: Arc<dyn Store>) {
    for complete in [false, true] {
        let key = fresh_key();
        let token = acquire(&*store, key, LONG).await;
        let r = rec("a", 0, StepStatus::Done, b"1");
        store.put_step(&key, token, &r, LONG).await.expect("put");
        if complete {
            store
                .complete(&key, token, b"v", LONG)
                .await
                .expect("complete");
        }
        store.remove(&key).await.expect("remove");
        assert!(loaded(&*store, &key).await.is_empty(), "steps removed");
        assert!(store.get(&key).await.expect("get").is_none());
    }
}

/// A step record lives at least `ttl` after its write and is gone once every step record of
/// its call has passed its `ttl` (a store may keep a call's steps together until the latest
/// one expires, as Redis does with one hash per call).
pub async fn step_ttl_expiry(store: Arc<dyn Store>) {
    // Alone, a short-lived step is gone after its ttl.
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    let short = rec("short", 0, StepStatus::Done, b"1");
    store
        .put_step(&key, token, &short, SHORT)
        .await
        .expect("put");
    assert_eq!(loaded(&*store, &key).await, vec![short.clone()]);
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(loaded(&*store, &key).await, vec![]);

    // Beside a long-lived one, the long one outlives the short one's ttl.
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    let long = rec("long", 0, StepStatus::Done, b"2");
    store
        .put_step(&key, token, &short, SHORT)
        .await
        .expect("put");
    store.put_step(&key, token, &long, LONG).await.expect("put");
    assert_eq!(loaded(&*store, &key).await.len(), 2);
    tokio::time::sleep(PAST_SHORT).await;
    let left = loaded(&*store, &key).await;
    assert!(
        left.contains(&long),
        "the long-lived step is kept: {left:?}"
    );
    assert!(
        left.iter().all(|r| *r == long || *r == short),
        "nothing else appears: {left:?}"
    );
}

/// A step value over `max_value_size` is refused and nothing is written.
pub async fn step_too_large(store: Arc<dyn Store>) {
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    let limit = store.max_value_size();
    let r = rec("big", 0, StepStatus::Done, &vec![1u8; limit + 1]);
    assert!(matches!(
        store.put_step(&key, token, &r, LONG).await,
        Err(StoreError::TooLarge { .. })
    ));
    assert!(loaded(&*store, &key).await.is_empty());
}

/// Steps belong to their call: another call's steps are not loaded with them.
pub async fn steps_of_calls_apart(store: Arc<dyn Store>) {
    let (k1, k2) = (fresh_key(), fresh_key());
    let t1 = acquire(&*store, k1, LONG).await;
    let t2 = acquire(&*store, k2, LONG).await;
    let a = rec("s", 0, StepStatus::Done, b"1");
    let b = rec("s", 0, StepStatus::Done, b"2");
    store.put_step(&k1, t1, &a, LONG).await.expect("put");
    store.put_step(&k2, t2, &b, LONG).await.expect("put");
    assert_eq!(loaded(&*store, &k1).await, vec![a]);
    assert_eq!(loaded(&*store, &k2).await, vec![b]);
    // A token of one call does not write into the other.
    assert_fenced(&*store, &k1, t2, "under another call's token").await;
}

/// A unique call key for a runtime case.
fn call_key() -> String {
    fresh_key().to_hex()
}

/// A loop of `step("line", ..)` numbers its occurrences 0, 1, ...; a retry after the call
/// failed replays them in order and runs only the new ones.
pub async fn steps_occurrences(store: Arc<dyn Store>) {
    let key = call_key();
    let runs = AtomicU32::new(0);
    let call = |lines: u32, fail: bool| {
        let runs = &runs;
        Call::new("testkit::steps::occurrences")
            .key(&key)
            .run(&*store, async move {
                let mut out = Vec::new();
                for i in 0..lines {
                    out.push(
                        step("line", async {
                            runs.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, Error>(i * 10)
                        })
                        .await?,
                    );
                }
                if fail {
                    return Err(Error::MissingKey);
                }
                Ok(out)
            })
    };
    assert!(call(3, true).await.is_err());
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert_eq!(
        call(5, false).await.expect("resumed"),
        vec![0, 10, 20, 30, 40]
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        5,
        "the three recorded lines were not run again"
    );
}

/// A call whose body fails after some steps resumes at the first unfinished step.
pub async fn steps_resume_after_err(store: Arc<dyn Store>) {
    let key = call_key();
    let counts: [AtomicU32; 3] = Default::default();
    let fail_at = AtomicU32::new(2);
    let call = || {
        Call::new("testkit::steps::resume")
            .key(&key)
            .run(&*store, async {
                let mut total = 0u32;
                for (i, n) in counts.iter().enumerate() {
                    let name = ["order", "charge", "email"][i];
                    let v = step(name, async {
                        n.fetch_add(1, Ordering::SeqCst);
                        if fail_at.load(Ordering::SeqCst) == i as u32 {
                            return Err(Error::MissingKey);
                        }
                        Ok::<_, Error>(i as u32 + 1)
                    })
                    .await?;
                    total += v;
                }
                Ok::<_, Error>(total)
            })
    };
    assert!(call().await.is_err());
    fail_at.store(99, Ordering::SeqCst);
    assert_eq!(call().await.expect("resumed"), 6);
    let runs: Vec<u32> = counts.iter().map(|n| n.load(Ordering::SeqCst)).collect();
    assert_eq!(runs, vec![1, 1, 2], "only the failed step ran again");
    // Completed: replayed without running anything.
    assert_eq!(call().await.expect("replay"), 6);
    let again: Vec<u32> = counts.iter().map(|n| n.load(Ordering::SeqCst)).collect();
    assert_eq!(again, runs);
}

/// Runs an at-most-once step that never finishes and drops the call mid-step (a crash inside
/// the step), leaving the step started.
async fn interrupt_inside(store: &dyn Store, ns: &'static str, key: &str) {
    let call = Call::new(ns)
        .key(key)
        .lease(Duration::from_millis(300))
        .run(store, async {
            step("email", async {
                std::future::pending::<()>().await;
                Ok::<_, Error>(0u32)
            })
            .at_most_once()
            .await
        });
    let interrupted = tokio::time::timeout(Duration::from_millis(200), call).await;
    assert!(
        interrupted.is_err(),
        "the call was cut short inside its step"
    );
}

/// An at-most-once step interrupted after its start is never run again: the retry gets
/// `StepInDoubt`.
pub async fn steps_at_most_once_in_doubt(store: Arc<dyn Store>) {
    let key = call_key();
    let ns = "testkit::steps::in_doubt";
    interrupt_inside(&*store, ns, &key).await;
    let runs = AtomicU32::new(0);
    let retry = Call::new(ns)
        .key(&key)
        .wait_timeout(Duration::from_secs(5))
        .run(&*store, async {
            step("email", async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(1u32)
            })
            .at_most_once()
            .await
        })
        .await;
    match retry {
        Err(Error::StepInDoubt { step }) => assert_eq!(step, StepId::new("email", 0)),
        other => panic!("expected StepInDoubt, got {other:?}"),
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the step in doubt did not run"
    );
}

/// An `on_in_doubt` hook decides a step in doubt; its value is recorded as the step's.
pub async fn steps_in_doubt_reconciled(store: Arc<dyn Store>) {
    let key = call_key();
    let ns = "testkit::steps::reconciled";
    interrupt_inside(&*store, ns, &key).await;
    let (runs, hooks) = (AtomicU32::new(0), AtomicU32::new(0));
    let seen = std::sync::Mutex::new(Vec::new());
    let retry = || {
        Call::new(ns)
            .key(&key)
            .wait_timeout(Duration::from_secs(5))
            .run(&*store, async {
                step("email", async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(1u32)
                })
                .at_most_once()
                .on_in_doubt(|| async {
                    hooks.fetch_add(1, Ordering::SeqCst);
                    seen.lock().unwrap().push(step_key());
                    Ok(7u32)
                })
                .await
            })
    };
    assert_eq!(retry().await.expect("reconciled"), 7);
    assert_eq!(retry().await.expect("replayed"), 7);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(
        hooks.load(Ordering::SeqCst),
        1,
        "the reconciled value was recorded"
    );
    assert!(
        seen.lock().unwrap()[0].is_some(),
        "the hook sees the step key"
    );
}

/// An at-most-once step whose `Err` is not stored is known not to have finished: it runs
/// again on the retry (no `StepInDoubt`).
pub async fn steps_at_most_once_err_clears(store: Arc<dyn Store>) {
    let key = call_key();
    let runs = AtomicU32::new(0);
    let call = || {
        Call::new("testkit::steps::amo_err")
            .key(&key)
            .run(&*store, async {
                step("s", async {
                    if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err(Error::MissingKey);
                    }
                    Ok::<_, Error>(5u8)
                })
                .at_most_once()
                .await
            })
    };
    assert!(matches!(call().await, Err(Error::MissingKey)));
    assert_eq!(call().await.expect("ran again"), 5);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A step error of the cases' own type, storable.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub enum StepCaseError {
    /// idem's error, as text.
    Idem(String),
    /// A terminal business error.
    Declined(u32),
}

impl From<Error> for StepCaseError {
    fn from(e: Error) -> Self {
        StepCaseError::Idem(e.to_string())
    }
}

/// `.store_errors()` records the step's `Err`: the retry gets it back without running the
/// step.
pub async fn steps_store_errors(store: Arc<dyn Store>) {
    let key = call_key();
    let runs = AtomicU32::new(0);
    let call = || {
        Call::new("testkit::steps::store_errors")
            .key(&key)
            .run(&*store, async {
                step("charge", async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Err::<u32, _>(StepCaseError::Declined(51))
                })
                .store_errors()
                .await
            })
    };
    assert_eq!(call().await, Err(StepCaseError::Declined(51)));
    assert_eq!(call().await, Err(StepCaseError::Declined(51)));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the stored error was replayed"
    );
}

/// Outside a call, and nested in another step, a step is refused and its future not run.
pub async fn steps_refused_outside_and_nested(store: Arc<dyn Store>) {
    let runs = AtomicU32::new(0);
    let outside = step("alone", async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Error>(1u8)
    })
    .await;
    assert!(matches!(outside, Err(Error::StepOutsideCall { step }) if step == "alone"));
    let nested = Call::new("testkit::steps::nested")
        .key(call_key())
        .run(&*store, async {
            step("outer", async {
                step("inner", async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(1u8)
                })
                .await
            })
            .await
        })
        .await;
    assert!(matches!(nested, Err(Error::StepNested { step }) if step == "inner"));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// On a store that keeps no steps, the first step fails with `StepsUnsupported` and its future
/// is not run (no silent re-run on every retry).
pub async fn steps_unsupported_store(store: Arc<dyn Store>) {
    let plain = Spy::new(store, false);
    let runs = AtomicU32::new(0);
    let r = Call::new("testkit::steps::unsupported")
        .key(call_key())
        .run(&plain, async {
            step("s", async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(1u8)
            })
            .await
        })
        .await;
    assert!(
        matches!(r, Err(Error::StepsUnsupported { store: "custom" })),
        "{r:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// Past `max_steps`, a step fails with `TooManySteps` and does not run.
pub async fn steps_too_many(store: Arc<dyn Store>) {
    let runs = AtomicU32::new(0);
    let r = Call::new("testkit::steps::too_many")
        .key(call_key())
        .max_steps(3)
        .run(&*store, async {
            for _ in 0..4 {
                step("s", async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(())
                })
                .await?;
            }
            Ok(())
        })
        .await;
    assert!(matches!(r, Err(Error::TooManySteps { limit: 3 })), "{r:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// A step value over the call's `max_value_size` fails with `TooLarge` and is not recorded.
pub async fn steps_value_too_large(store: Arc<dyn Store>) {
    let key = call_key();
    let r = Call::new("testkit::steps::too_large")
        .key(&key)
        .max_value_size(1000)
        .run(&*store, async {
            step("big", async { Ok::<_, Error>("x".repeat(2000)) }).await
        })
        .await;
    assert!(
        matches!(r, Err(Error::TooLarge { limit: 1000, .. })),
        "{r:?}"
    );
}

/// After a release, a call with other arguments under the same key does not replay the first
/// one's steps.
pub async fn steps_other_arguments_ignored(store: Arc<dyn Store>) {
    let key = call_key();
    let runs = AtomicU32::new(0);
    let call = |amount: u32, fail: bool| {
        let runs = &runs;
        Call::new("testkit::steps::fingerprint")
            .key(&key)
            .fingerprint((amount,))
            .run(&*store, async move {
                let v = step("charge", async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(amount)
                })
                .await?;
                if fail {
                    return Err(Error::MissingKey);
                }
                Ok(v)
            })
    };
    assert!(call(10, true).await.is_err());
    assert_eq!(call(20, false).await.expect("other arguments"), 20);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the first call's step was not replayed"
    );
}

/// One execution reads the recorded steps once, however many steps it has; a replay of the
/// completed call reads none.
pub async fn steps_replay_reads_no_steps(store: Arc<dyn Store>) {
    let counting = Spy::new(store, true);
    let loads = Arc::clone(&counting.loads);
    let store: Arc<dyn Store> = Arc::new(counting);
    let key = call_key();
    let call = || {
        Call::new("testkit::steps::loads")
            .key(&key)
            .run(&*store, async {
                let mut sum = 0;
                for i in 0..4u32 {
                    sum += step("n", async move { Ok::<_, Error>(i) }).await?;
                }
                Ok::<_, Error>(sum)
            })
    };
    assert_eq!(call().await.expect("run"), 6);
    assert_eq!(loads.load(Ordering::SeqCst), 1, "one read for four steps");
    assert_eq!(call().await.expect("replay"), 6);
    assert_eq!(loads.load(Ordering::SeqCst), 1, "a replay reads no steps");
}

/// `step_key()` is the same for a step on every execution, and differs between steps and
/// occurrences; outside a step's future it is `None`.
pub async fn steps_step_key_stable(store: Arc<dyn Store>) {
    let key = call_key();
    let seen = std::sync::Mutex::new(Vec::new());
    let call = |fail: bool| {
        let seen = &seen;
        Call::new("testkit::steps::step_key")
            .key(&key)
            .run(&*store, async move {
                assert!(step_key().is_none(), "no step key between steps");
                for name in ["a", "a", "b"] {
                    step(name, async {
                        seen.lock().unwrap().push(step_key().expect("a step key"));
                        // Fails the first time, so that every step runs twice.
                        if fail {
                            return Err(Error::MissingKey);
                        }
                        Ok::<_, Error>(())
                    })
                    .await
                    .or_else(|e| if fail { Ok(()) } else { Err(e) })?;
                }
                if fail {
                    return Err(Error::MissingKey);
                }
                Ok(())
            })
    };
    assert!(call(true).await.is_err());
    call(false).await.expect("second run");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 6);
    assert_eq!(&seen[..3], &seen[3..], "the same keys on both executions");
    assert_ne!(seen[0], seen[1]);
    assert_ne!(seen[1], seen[2]);
}

/// `Call::inspect` lists a call's steps.
pub async fn steps_inspect_lists_steps(store: Arc<dyn Store>) {
    let key = call_key();
    let call = || Call::new("testkit::steps::inspect").key(&key);
    call()
        .run(&*store, async {
            step("a", async { Ok::<_, Error>(1u8) }).await?;
            step("a", async { Ok::<_, Error>(2u8) }).await?;
            step("b", async { Ok::<_, Error>(3u8) })
                .at_most_once()
                .await?;
            Ok::<_, Error>(())
        })
        .await
        .expect("run");
    let info = call()
        .inspect(&*store)
        .await
        .expect("inspect")
        .expect("a record");
    let ids: Vec<String> = info.steps.iter().map(|s| s.id.to_string()).collect();
    assert_eq!(ids, ["a#0", "a#1", "b#0"]);
    assert!(info
        .steps
        .iter()
        .all(|s| s.status == StepStatus::Done && s.size > 0));
}

/// The one forwarding wrapper of the step cases: it hides the inner store's steps (a
/// third-party store that predates them: `keeps_steps == false`, and it has no detached
/// handle, like a store that implements nothing optional) or keeps them and counts
/// `load_steps`. Its detached handle is itself, so that the runtime's step operations (which
/// go through the detached handle) pass through the counter. Its `name` is the default,
/// `"custom"`.
#[derive(Debug, Clone)]
struct Spy {
    inner: Arc<dyn Store>,
    keeps_steps: bool,
    loads: Arc<AtomicUsize>,
}

impl Spy {
    fn new(inner: Arc<dyn Store>, keeps_steps: bool) -> Self {
        Spy {
            inner,
            keeps_steps,
            loads: Arc::new(AtomicUsize::new(0)),
        }
    }
}

#[async_trait]
impl Store for Spy {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        self.inner.claim(req).await
    }
    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.complete(key, token, value, ttl).await
    }
    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
    async fn renew(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.inner.renew(key, token, lease).await
    }
    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError> {
        self.inner.get(key).await
    }
    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        self.inner.wait(key, timeout).await
    }
    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        self.inner.remove(key).await
    }
    fn detached(&self) -> Option<Arc<dyn Store>> {
        self.keeps_steps
            .then(|| Arc::new(self.clone()) as Arc<dyn Store>)
    }
    fn process_local(&self) -> bool {
        self.inner.process_local()
    }
    fn supports_steps(&self) -> bool {
        self.keeps_steps && self.inner.supports_steps()
    }
    async fn load_steps(&self, key: &Key) -> Result<Vec<StepRecord>, StoreError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        self.inner.load_steps(key).await
    }
    async fn put_step(
        &self,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.put_step(key, token, step, ttl).await
    }
    async fn clear_step(
        &self,
        key: &Key,
        token: FencingToken,
        id: &idem_core::StepId,
    ) -> Result<(), StoreError> {
        self.inner.clear_step(key, token, id).await
    }
}
