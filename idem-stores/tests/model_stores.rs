//! Model-based tests of every store: random histories of operations from several logical
//! callers on a few keys, interleaved with clock advances and injected faults
//! ([`FaultyStore`]: a reply lost after the operation applied, a failure before it applied, a
//! delay past the operation's timeout), each answer checked against the reference model
//! [`idem_testkit::model`]. The model also names the invariant a wrong answer breaks:
//! two live holders of one key, a completed value that changed before it expired, a stale
//! token accepted.
//!
//! One test per store. Memory and tiered run on tokio's paused clock; Redis, PostgreSQL,
//! MariaDB and SQLite on real time with short leases (≥ 150 ms), where an operation that lands
//! within 50 ms of a deadline may see either side of it. Each test runs `CASES` proptest cases
//! of `HISTORIES` concurrent histories (each on its own keys) of at most `MAX_OPS` steps.
//!
//! A failure prints the seed, the shrunk history that failed with the answers it got, and the
//! command that replays it, e.g.
//! `IDEM_MODEL_SEED=123 cargo test -p idem-stores --features redis --test model_stores redis`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[path = "support/sql_common.rs"]
mod sql_common;

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use idem_core::{Bytes, ClaimRequest, FencingToken, Fingerprint, Key, Store};
use idem_testkit::model::{Answer, Model, ModelOp, Window};
use idem_testkit::{Fault, FaultyStore, Op};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};

/// Concurrent histories per proptest case (each on its own keys).
const HISTORIES: usize = 16;
/// Steps per history, at most.
const MAX_OPS: usize = 20;
/// Logical callers per history.
const CALLERS: u8 = 3;
/// Keys per history.
const KEYS: u8 = 2;

/// One step of a history.
#[derive(Clone, Copy, Debug)]
enum Action {
    /// A claim under a fresh token (the caller's new attempt).
    ClaimFresh,
    /// A claim under the caller's current token (a retry after an unknown outcome).
    ClaimRetry,
    /// Complete under the caller's current token.
    Complete,
    /// Release under the caller's current token.
    Release,
    /// Renew under the caller's current token.
    Renew,
    /// Read the record.
    Get,
    /// Remove the record (administration).
    Remove,
    /// Let the clock run (an index into the profile's sleeps).
    Sleep(u8),
}

/// The fault injected into one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultKind {
    None,
    /// Applied, then the reply is lost.
    LoseReply,
    /// Fails before it reaches the store.
    FailBefore,
    /// Delayed past the caller's timeout (the caller gives up; the outcome is unknown).
    DelayPast,
    /// Delayed, but within the caller's timeout.
    DelayWithin,
}

#[derive(Clone, Copy, Debug)]
struct Step {
    caller: u8,
    key: u8,
    action: Action,
    fault: FaultKind,
    /// The long lease / TTL rather than the short one.
    long: bool,
}

/// How one store is exercised.
struct Profile {
    name: &'static str,
    /// The command that replays a seed (`{seed}` is replaced).
    command: &'static str,
    margin: Duration,
    leases: [Duration; 2],
    ttls: [Duration; 2],
    sleeps: &'static [u64],
    /// A DelayPast fault's delay and the caller's timeout around it.
    delay_past: (Duration, Duration),
    /// A DelayWithin fault's delay and the caller's timeout around it.
    delay_within: (Duration, Duration),
    cases: u32,
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const PAUSED: Profile = Profile {
    name: "",
    command: "",
    margin: ms(2),
    leases: [ms(150), ms(400)],
    ttls: [ms(200), ms(1500)],
    sleeps: &[5, 60, 160, 420, 1600],
    delay_past: (ms(120), ms(100)),
    delay_within: (ms(40), ms(2000)),
    cases: 32,
};

#[cfg(any(
    feature = "redis",
    feature = "postgres",
    feature = "mysql",
    feature = "sqlite"
))]
const REAL: Profile = Profile {
    name: "",
    command: "",
    margin: ms(50),
    leases: [ms(150), ms(400)],
    ttls: [ms(200), ms(1500)],
    sleeps: &[20, 100, 250],
    delay_past: (ms(90), ms(60)),
    delay_within: (ms(30), ms(3000)),
    cases: 16,
};

fn step(profile: &Profile) -> impl Strategy<Value = Step> {
    let sleeps = profile.sleeps.len() as u8;
    let action = prop_oneof![
        4 => Just(Action::ClaimFresh),
        3 => Just(Action::ClaimRetry),
        4 => Just(Action::Complete),
        2 => Just(Action::Release),
        2 => Just(Action::Renew),
        3 => Just(Action::Get),
        1 => Just(Action::Remove),
        3 => (0..sleeps).prop_map(Action::Sleep),
    ];
    let fault = prop_oneof![
        10 => Just(FaultKind::None),
        2 => Just(FaultKind::LoseReply),
        1 => Just(FaultKind::FailBefore),
        1 => Just(FaultKind::DelayPast),
        1 => Just(FaultKind::DelayWithin),
    ];
    (0..CALLERS, 0..KEYS, action, fault, any::<bool>()).prop_map(
        |(caller, key, action, fault, long)| Step {
            caller,
            key,
            action,
            fault,
            long,
        },
    )
}

fn seed() -> u64 {
    match std::env::var("IDEM_MODEL_SEED") {
        Ok(s) => s.trim().parse().expect("IDEM_MODEL_SEED is a decimal u64"),
        Err(_) => FencingToken::random().0,
    }
}

fn rng(seed: u64) -> TestRng {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&seed.rotate_left(17).to_le_bytes());
    TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
}

/// Runs the profile's cases against `store` on `rt`; panics with the seed, the shrunk failing
/// history and the replay command on a violation.
fn check_store(profile: &'static Profile, rt: &tokio::runtime::Runtime, store: Arc<dyn Store>) {
    let seed = seed();
    let config = Config {
        cases: profile.cases,
        failure_persistence: None,
        max_shrink_iters: 400,
        max_shrink_time: 120_000,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(config, rng(seed));
    let strategy = prop::collection::vec(
        prop::collection::vec(step(profile), 1..=MAX_OPS),
        HISTORIES..=HISTORIES,
    );
    let started = std::time::Instant::now();
    let result = runner.run(&strategy, |histories| {
        rt.block_on(run_case(profile, store.clone(), histories))
            .map_err(TestCaseError::fail)
    });
    match result {
        Ok(()) => println!(
            "model[{}]: {} histories of ≤ {MAX_OPS} steps passed in {:?} (seed {seed})",
            profile.name,
            profile.cases as usize * HISTORIES,
            started.elapsed()
        ),
        Err(TestError::Fail(reason, _)) => panic!(
            "model[{}]: a store answer the contract does not allow (seed {seed})\n{reason}\n\
             replay: {}",
            profile.name,
            profile.command.replace("{seed}", &seed.to_string())
        ),
        Err(TestError::Abort(why)) => panic!("model[{}]: aborted: {why}", profile.name),
    }
}

async fn run_case(
    profile: &'static Profile,
    store: Arc<dyn Store>,
    histories: Vec<Vec<Step>>,
) -> Result<(), String> {
    let mut set = tokio::task::JoinSet::new();
    for (i, h) in histories.into_iter().enumerate() {
        let store = store.clone();
        set.spawn(async move { run_history(profile, store, i, h).await });
    }
    let mut first = None;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first.get_or_insert(e);
            }
            Err(e) => {
                first.get_or_insert(format!("a history panicked: {e}"));
            }
        }
    }
    first.map_or(Ok(()), Err)
}

/// What a caller holds on each key: its current token.
struct Caller {
    tokens: [Option<FencingToken>; KEYS as usize],
    fingerprint: Option<Fingerprint>,
}

fn op_kind(op: &ModelOp) -> Option<Op> {
    Some(match op {
        ModelOp::Claim { .. } => Op::Claim,
        ModelOp::Complete { .. } => Op::Complete,
        ModelOp::Release { .. } => Op::Release,
        ModelOp::Renew { .. } => Op::Renew,
        ModelOp::Get => Op::Get,
        ModelOp::Remove => return None,
    })
}

async fn bounded<T>(
    limit: Option<Duration>,
    f: impl Future<Output = Result<T, idem_core::StoreError>>,
) -> Result<T, idem_core::StoreError> {
    match limit {
        None => f.await,
        Some(d) => tokio::time::timeout(d, f)
            .await
            .unwrap_or(Err(idem_core::StoreError::Timeout(d))),
    }
}

async fn run_history(
    profile: &Profile,
    store: Arc<dyn Store>,
    index: usize,
    history: Vec<Step>,
) -> Result<(), String> {
    let faulty = FaultyStore::new(store.clone());
    let keys: Vec<Key> = (0..KEYS).map(|_| idem_testkit::fresh_key()).collect();
    let mut callers: Vec<Caller> = (0..CALLERS)
        .map(|c| Caller {
            tokens: [None; KEYS as usize],
            fingerprint: (c < 2).then(|| Fingerprint([c + 1; 32])),
        })
        .collect();
    let mut model = Model::new(profile.margin);
    let mut trace = String::new();
    let origin = tokio::time::Instant::now();
    let mut outcome = Ok(());
    for (i, s) in history.iter().enumerate() {
        let key = keys[s.key as usize];
        let caller = &mut callers[s.caller as usize];
        let slot = &mut caller.tokens[s.key as usize];
        let lease = profile.leases[s.long as usize];
        let ttl = profile.ttls[s.long as usize];
        let current =
            |slot: &mut Option<FencingToken>| *slot.get_or_insert_with(FencingToken::random);
        let op = match s.action {
            Action::Sleep(n) => {
                let d = ms(profile.sleeps[n as usize]);
                tokio::time::sleep(d).await;
                let _ = writeln!(trace, "  #{i:<2} sleep {d:?}");
                continue;
            }
            Action::ClaimFresh => {
                *slot = Some(FencingToken::random());
                ModelOp::Claim {
                    token: current(slot),
                    fingerprint: caller.fingerprint,
                    lease,
                }
            }
            Action::ClaimRetry => ModelOp::Claim {
                token: current(slot),
                fingerprint: caller.fingerprint,
                lease,
            },
            Action::Complete => ModelOp::Complete {
                token: current(slot),
                value: Bytes::from(format!("h{index}c{}s{i}", s.caller)),
                ttl,
            },
            Action::Release => ModelOp::Release {
                token: current(slot),
            },
            Action::Renew => ModelOp::Renew {
                token: current(slot),
                lease,
            },
            Action::Get => ModelOp::Get,
            Action::Remove => ModelOp::Remove,
        };
        let mut limit = None;
        let fault = match op_kind(&op) {
            Some(_) => s.fault,
            None => FaultKind::None,
        };
        if let Some(kind) = op_kind(&op) {
            match fault {
                FaultKind::None => {}
                FaultKind::LoseReply => faulty.plan(Fault::LoseReply(kind)),
                FaultKind::FailBefore => faulty.plan(Fault::FailBefore(kind)),
                FaultKind::DelayPast => {
                    faulty.plan(Fault::Delay(kind, profile.delay_past.0));
                    limit = Some(profile.delay_past.1);
                }
                FaultKind::DelayWithin => {
                    faulty.plan(Fault::Delay(kind, profile.delay_within.0));
                    limit = Some(profile.delay_within.1);
                }
            }
        }
        let start = origin.elapsed();
        let answer = match &op {
            ModelOp::Claim {
                token,
                fingerprint,
                lease,
            } => {
                let req = ClaimRequest {
                    key,
                    fingerprint: *fingerprint,
                    token: *token,
                    lease: *lease,
                };
                Answer::of_claim(bounded(limit, faulty.claim(&req)).await)
            }
            ModelOp::Complete { token, value, ttl } => {
                Answer::of_unit(bounded(limit, faulty.complete(&key, *token, value, *ttl)).await)
            }
            ModelOp::Release { token } => {
                Answer::of_unit(bounded(limit, faulty.release(&key, *token)).await)
            }
            ModelOp::Renew { token, lease } => {
                Answer::of_unit(bounded(limit, faulty.renew(&key, *token, *lease)).await)
            }
            ModelOp::Get => Answer::of_get(bounded(limit, faulty.get(&key)).await),
            ModelOp::Remove => Answer::of_unit(faulty.remove(&key).await),
        };
        let window = Window::new(start, origin.elapsed());
        let _ = writeln!(
            trace,
            "  #{i:<2} caller {} key {} {:?} fault {:?} [{:?}..{:?}] -> {:?}",
            s.caller, s.key, op, fault, window.start, window.end, answer
        );
        if faulty.pending() != 0 {
            outcome = Err(format!("a planned fault did not strike at step {i}"));
            break;
        }
        if let Err(v) = model.observe(key, &op, window, &answer) {
            outcome = Err(format!(
                "history {index}, step {i}: {v}\nshrunk history:\n{history:#?}\nanswers:\n{trace}"
            ));
            break;
        }
    }
    for k in &keys {
        let _ = store.remove(k).await;
    }
    outcome
}

/// A current-thread runtime on tokio's paused clock.
fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime")
}

/// A multi-thread runtime on real time.
#[cfg(any(
    feature = "redis",
    feature = "postgres",
    feature = "mysql",
    feature = "sqlite"
))]
fn real_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn memory() {
    static P: Profile = Profile {
        name: "memory",
        command: "IDEM_MODEL_SEED={seed} cargo test -p idem-stores --test model_stores memory",
        ..PAUSED
    };
    let rt = paused_runtime();
    let store = rt.block_on(async { idem_stores::MemoryStore::new() });
    check_store(&P, &rt, Arc::new(store));
}

fn tiered() {
    static P: Profile = Profile {
        name: "tiered",
        command: "IDEM_MODEL_SEED={seed} cargo test -p idem-stores --test model_stores tiered",
        ..PAUSED
    };
    let rt = paused_runtime();
    let store =
        rt.block_on(async { idem_stores::TieredStore::new(idem_stores::MemoryStore::new()) });
    check_store(&P, &rt, Arc::new(store));
}

#[cfg(feature = "redis")]
fn redis() {
    static P: Profile = Profile {
        name: "redis",
        command: "IDEM_MODEL_SEED={seed} cargo test -p idem-stores --features redis --test model_stores redis",
        ..REAL
    };
    let Some(url) = idem_testkit::env_url("IDEM_TEST_REDIS_URL") else {
        return;
    };
    let rt = real_runtime();
    let store = rt
        .block_on(
            idem_stores::RedisStore::builder(url)
                .prefix("idem-model:")
                .build(),
        )
        .expect("connect to IDEM_TEST_REDIS_URL");
    check_store(&P, &rt, Arc::new(store));
}

#[cfg(feature = "postgres")]
fn postgres() {
    static P: Profile = Profile {
        name: "postgres",
        command: "IDEM_MODEL_SEED={seed} cargo test -p idem-stores --features postgres --test model_stores postgres",
        ..REAL
    };
    let Some(url) = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL") else {
        return;
    };
    let rt = real_runtime();
    let store = rt.block_on(async {
        sql_common::pg_drop_stale_tables(&url).await;
        let store = idem_stores::PostgresStore::builder()
            .url(url)
            .table(sql_common::unique_table("model"))
            .max_connections(8)
            .connect()
            .await
            .expect("connect to IDEM_TEST_POSTGRES_URL");
        store.migrate().await.expect("migrate");
        store
    });
    let table = store.table().to_owned();
    let pool = store.pool().clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check_store(&P, &rt, Arc::new(store))
    }));
    rt.block_on(async {
        let sql = format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_steps\"");
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
    });
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

#[cfg(feature = "mysql")]
fn mysql() {
    static P: Profile = Profile {
        name: "mysql",
        command: "IDEM_MODEL_SEED={seed} cargo test -p idem-stores --features mysql --test model_stores mysql",
        ..REAL
    };
    let Some(url) = idem_testkit::env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let rt = real_runtime();
    let table = format!("idem_model_{}", std::process::id());
    let store = rt.block_on(async {
        let store = idem_stores::MySqlStore::builder()
            .url(url)
            .table(table.clone())
            .max_connections(8)
            .connect()
            .await
            .expect("connect to IDEM_TEST_MYSQL_URL");
        store.migrate().await.expect("migrate");
        store
    });
    let pool = store.pool().clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check_store(&P, &rt, Arc::new(store))
    }));
    rt.block_on(async {
        let sql = format!("DROP TABLE IF EXISTS `{table}`, `{table}_steps`");
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
    });
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

#[cfg(feature = "sqlite")]
fn sqlite() {
    static P: Profile = Profile {
        name: "sqlite",
        command: "IDEM_MODEL_SEED={seed} cargo test -p idem-stores --features sqlite --test model_stores sqlite",
        ..REAL
    };
    let rt = real_runtime();
    let store = rt.block_on(async {
        let path = sql_common::sqlite_file("model");
        let store = idem_stores::SqliteStore::builder()
            .url(format!("sqlite://{}", path.display()))
            .table(sql_common::unique_table("model"))
            .connect()
            .await
            .expect("open database file");
        store.migrate().await.expect("migrate");
        store
    });
    check_store(&P, &rt, Arc::new(store));
}

// Regression tests for the store bugs the model found, named after them. The first two were
// fixed in afe9e5e, the last in the commit that made TieredStore cache a completion only when
// its first attempt answered.

mod found {
    use super::*;
    use idem_core::{Claim, CompletedRecord};
    use idem_stores::{MemoryStore, TieredStore};

    fn request(key: Key, token: FencingToken) -> ClaimRequest {
        ClaimRequest {
            key,
            fingerprint: None,
            token,
            lease: ms(5_000),
        }
    }

    /// Seed 3391856293444018084: claim, complete (ttl 200 ms), claim again → the local tier
    /// answers `Completed` with `expires_in: None` (the contract: every store fills it).
    pub(super) async fn tiered_local_replay_reports_no_expiry() {
        let store = TieredStore::new(MemoryStore::new());
        let key = idem_testkit::fresh_key();
        let t = FencingToken::random();
        store.claim(&request(key, t)).await.unwrap();
        store.complete(&key, t, b"v", ms(60_000)).await.unwrap();
        let again = store
            .claim(&request(key, FencingToken::random()))
            .await
            .unwrap();
        let Claim::Completed(CompletedRecord { expires_in, .. }) = again else {
            panic!("completed expected, got {again:?}");
        };
        let left = expires_in.expect("a replay reports how long the record still lives");
        assert!(left <= ms(60_000) && left > ms(50_000), "{left:?}");
    }

    /// A record that another process completed (learned from the shared store's `Completed`
    /// answer, with its remaining TTL) is cached for the whole `local_ttl`, ignoring
    /// `expires_in`: it is replayed after it expired in the shared store.
    pub(super) async fn tiered_caches_a_replayed_record_past_its_expiry() {
        let shared = MemoryStore::new();
        let tiered = TieredStore::new(shared.clone());
        let key = idem_testkit::fresh_key();
        let t = FencingToken::random();
        shared.claim(&request(key, t)).await.unwrap();
        shared.complete(&key, t, b"v", ms(200)).await.unwrap();
        let seen = tiered
            .claim(&request(key, FencingToken::random()))
            .await
            .unwrap();
        assert!(matches!(seen, Claim::Completed(_)), "{seen:?}");
        tokio::time::sleep(ms(400)).await;
        let later = tiered
            .claim(&request(key, FencingToken::random()))
            .await
            .unwrap();
        assert_eq!(
            later,
            Claim::Acquired { taken_over: false },
            "the record expired 200 ms ago in the shared store"
        );
    }

    /// A completion whose reply was lost in the shared store, retried with another value:
    /// the shared store keeps the first value (Ok, nothing changes); the local tier used to
    /// cache the retry's value and replay it.
    pub(super) async fn tiered_completion_retry_caches_the_retried_value() {
        let faulty = FaultyStore::new(Arc::new(MemoryStore::new()));
        let tiered = TieredStore::new(faulty.clone());
        let key = idem_testkit::fresh_key();
        let t = FencingToken::random();
        tiered.claim(&request(key, t)).await.unwrap();
        faulty.plan(Fault::LoseReply(Op::Complete));
        assert!(tiered
            .complete(&key, t, b"first", ms(60_000))
            .await
            .is_err());
        tiered
            .complete(&key, t, b"retry", ms(60_000))
            .await
            .unwrap();
        let seen = tiered
            .claim(&request(key, FencingToken::random()))
            .await
            .unwrap();
        let Claim::Completed(r) = seen else {
            panic!("completed expected, got {seen:?}");
        };
        assert_eq!(&r.value[..], b"first", "the stored value never changes");
    }
}

fn main() -> std::process::ExitCode {
    #[allow(unused_mut)]
    let mut cases = vec![
        idem_testkit::test_cases!([], sync; memory, tiered),
        idem_testkit::test_cases!([], current_thread;
            found::tiered_local_replay_reports_no_expiry,
            found::tiered_caches_a_replayed_record_past_its_expiry,
            found::tiered_completion_retry_caches_the_retried_value),
    ];
    #[cfg(feature = "redis")]
    cases.push(idem_testkit::test_cases!([backends::REDIS], sync; redis));
    #[cfg(feature = "postgres")]
    cases.push(idem_testkit::test_cases!([backends::POSTGRES], sync; postgres));
    #[cfg(feature = "mysql")]
    cases.push(idem_testkit::test_cases!([backends::MYSQL], sync; mysql));
    #[cfg(feature = "sqlite")]
    cases.push(idem_testkit::test_cases!([], sync; sqlite));
    idem_testkit::harness::run(cases)
}
