//! A simulated runtime: many concurrent `Call`s and `#[idempotent]` functions over a chaos
//! store (random delays, lost replies, failures before apply, delays past the runtime's
//! operation budget) on a `MemoryStore`, with callers cancelled at random points and bodies
//! that panic or fail, all under tokio's paused clock. Each run is one seed; checked:
//!
//! - a body never starts while another holder of its key lives (a holder lives from its
//!   body's start until its call's future completes or is dropped — or until its body ends
//!   in `Err` or a panic: the release that follows may be retried after it applied);
//! - every caller that gets `Ok` on a key gets the same value;
//! - no key stays blocked past its lease: after the run, a new call on every key answers
//!   within lease + margin, with the value the others got if there was one;
//! - the outcome counters add up to the calls (each call ends in exactly one outcome,
//!   `Cancelled` for one dropped before its body, also for one dropped during its settle,
//!   which the detached task counts).
//!
//! `IDEM_SIM_RUNS` (default 1000) runs; a failure prints its seed, and
//! `IDEM_SIM_SEED=<seed> cargo test --test simulation` replays that one run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_core::{
    async_trait, idempotent, Claim, ClaimRequest, FencingToken, Key, OnConflict, Outcome,
    RecordState, Store, StoreError,
};
use idem_stores::MemoryStore;

/// A small deterministic generator (splitmix64): one seed, one run.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn ms(&mut self, max: u64) -> Duration {
        Duration::from_millis(self.below(max + 1))
    }
}

/// The faults of one run: each store operation may be delayed, fail before it applies, lose
/// its reply after it applied, or be delayed past the runtime's budget — but never twice in
/// a row for the same operation and token (or key), so that a holder that retries always
/// reaches its store inside its lease (the runtime's promise is conditional on that).
#[derive(Debug)]
struct ChaosState {
    rng: Rng,
    lease: Duration,
    faulted: HashSet<(u8, u64)>,
    /// No faults at all (the probes after the run).
    quiet: bool,
}

#[derive(Clone, Debug)]
struct Chaos {
    inner: Arc<dyn Store>,
    state: Arc<Mutex<ChaosState>>,
}

enum Plan {
    Pass(Duration),
    FailBefore,
    LoseReply,
}

impl Chaos {
    fn plan(&self, op: u8, id: u64) -> Plan {
        let mut s = self.state.lock().unwrap();
        let lease = s.lease;
        if s.quiet {
            return Plan::Pass(Duration::ZERO);
        }
        let again = !s.faulted.insert((op, id));
        if again {
            s.faulted.remove(&(op, id));
            let d = s.rng.ms(2);
            return Plan::Pass(d);
        }
        let roll = s.rng.below(100);
        let plan = match roll {
            0..=7 => Plan::FailBefore,
            8..=15 => Plan::LoseReply,
            // Past the budget of every operation (half the lease at most).
            16..=19 => Plan::Pass(lease.mul_f64(0.6)),
            _ => {
                let max = (lease.as_millis() as u64 / 10).max(1);
                Plan::Pass(s.rng.ms(max))
            }
        };
        if matches!(plan, Plan::Pass(d) if d < lease / 2) {
            s.faulted.remove(&(op, id));
        }
        plan
    }

    async fn run<T>(
        &self,
        op: u8,
        id: u64,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match self.plan(op, id) {
            Plan::Pass(d) => {
                if !d.is_zero() {
                    tokio::time::sleep(d).await;
                }
                f.await
            }
            Plan::FailBefore => Err(StoreError::Timeout(Duration::from_millis(1))),
            Plan::LoseReply => {
                let _ = f.await;
                Err(StoreError::Timeout(Duration::from_millis(1)))
            }
        }
    }
}

fn key_id(k: &Key) -> u64 {
    u64::from_le_bytes(k.0[..8].try_into().unwrap())
}

#[async_trait]
impl Store for Chaos {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        self.run(0, req.token.0, self.inner.claim(req)).await
    }
    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.run(1, token.0, self.inner.complete(key, token, value, ttl))
            .await
    }
    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError> {
        self.run(2, token.0, self.inner.release(key, token)).await
    }
    async fn renew(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.run(3, token.0, self.inner.renew(key, token, lease))
            .await
    }
    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError> {
        self.run(4, key_id(key), self.inner.get(key)).await
    }
    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        self.run(5, key_id(key), self.inner.wait(key, timeout))
            .await
    }
    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        self.inner.remove(key).await
    }
    fn detached(&self) -> Option<Arc<dyn Store>> {
        Some(Arc::new(self.clone()))
    }
    // A wrapper forwards this: the probes run on the memory store itself and must derive the
    // same (process-local) keys as the calls that went through the chaos.
    fn process_local(&self) -> bool {
        self.inner.process_local()
    }
}

#[derive(Debug)]
enum SimError {
    Idem(#[allow(dead_code)] idem_core::Error),
    Body,
}

impl From<idem_core::Error> for SimError {
    fn from(e: idem_core::Error) -> Self {
        SimError::Idem(e)
    }
}

/// What one run has seen.
#[derive(Default)]
struct Sim {
    /// Holders alive per key slot: call ids whose body started and whose future lives.
    alive: Mutex<HashMap<usize, Vec<usize>>>,
    violations: Mutex<Vec<String>>,
}

impl Sim {
    fn violation(&self, v: String) {
        self.violations.lock().unwrap().push(v);
    }
}

/// A caller's holder: alive from its body's start until the call's future ends or drops.
struct Holder {
    sim: Arc<Sim>,
    slot: usize,
    id: usize,
    started: AtomicBool,
    /// The body started (never reset).
    began: AtomicBool,
}

impl Holder {
    fn start(&self) {
        if std::env::var_os("IDEM_SIM_VERBOSE").is_some() {
            println!(
                "{:?} call {} slot {}: body starts",
                tokio::time::Instant::now(),
                self.id,
                self.slot
            );
        }
        let mut alive = self.sim.alive.lock().unwrap();
        let here = alive.entry(self.slot).or_default();
        if !here.is_empty() {
            self.sim.violation(format!(
                "key slot {}: body of call {} started while call(s) {:?} held it",
                self.slot, self.id, here
            ));
        }
        here.push(self.id);
        self.started.store(true, Ordering::SeqCst);
        self.began.store(true, Ordering::SeqCst);
    }
}

impl Holder {
    /// The body ended without a value (an `Err` or a panic): the runtime releases the claim,
    /// and may retry the release after its holder's body is over, so another body may start
    /// from here on.
    fn end(&self) {
        if self.started.swap(false, Ordering::SeqCst) {
            if let Ok(mut alive) = self.sim.alive.lock() {
                if let Some(v) = alive.get_mut(&self.slot) {
                    v.retain(|&i| i != self.id);
                }
            }
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if self.started.load(Ordering::SeqCst) {
            if let Ok(mut alive) = self.sim.alive.lock() {
                if let Some(v) = alive.get_mut(&self.slot) {
                    v.retain(|&i| i != self.id);
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum End {
    Ok,
    Err,
    Panic,
}

#[derive(Clone, Copy, Debug)]
struct BodyPlan {
    id: usize,
    duration: Duration,
    end: End,
}

async fn body(holder: &Holder, plan: BodyPlan) -> Result<u64, SimError> {
    holder.start();
    tokio::time::sleep(plan.duration).await;
    match plan.end {
        End::Ok => Ok(plan.id as u64),
        End::Err => {
            holder.end();
            Err(SimError::Body)
        }
        End::Panic => {
            holder.end();
            std::panic::panic_any(SimulatedPanic)
        }
    }
}

struct SimulatedPanic;

/// The `#[idempotent]` path: a fixed lease, its own namespace (and so its own key slots).
#[idempotent(key = key, store = store, lease = "600ms", wait_timeout = "20s", skip(store, holder, plan))]
async fn charged(
    store: &Chaos,
    holder: &Holder,
    plan: BodyPlan,
    key: String,
) -> Result<u64, SimError> {
    body(holder, plan).await
}

const MACRO_LEASE: Duration = Duration::from_millis(600);

struct Outcomes {
    ok: Vec<(usize, u64)>,
}

/// One simulated run; returns the violations it saw.
async fn run(seed: u64) -> Vec<String> {
    let mut rng = Rng(seed);
    let lease = Duration::from_millis(150 + rng.below(850));
    let store = Arc::new(MemoryStore::new());
    let chaos = Chaos {
        inner: store.clone(),
        state: Arc::new(Mutex::new(ChaosState {
            rng: Rng(seed ^ 0xDEAD_BEEF),
            lease,
            faulted: HashSet::new(),
            quiet: false,
        })),
    };
    let sim = Arc::new(Sim::default());
    let keys = 1 + rng.below(3) as usize;
    let calls = 3 + rng.below(10) as usize;
    let before = idem_core::counters();
    let results = Arc::new(Mutex::new(Outcomes { ok: Vec::new() }));
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..calls {
        let by_macro = rng.chance(30);
        let k = rng.below(keys as u64) as usize;
        // Slots: Call keys 0..keys, macro keys keys..2*keys (another namespace).
        let slot = if by_macro { keys + k } else { k };
        let this_lease = if by_macro { MACRO_LEASE } else { lease };
        let start = rng.ms(2 * this_lease.as_millis() as u64);
        let plan = BodyPlan {
            id,
            duration: rng.ms(2 * this_lease.as_millis() as u64),
            end: match rng.below(10) {
                0 => End::Err,
                1 => End::Panic,
                _ => End::Ok,
            },
        };
        let cancel = rng
            .chance(35)
            .then(|| rng.ms(3 * this_lease.as_millis() as u64));
        let reject = rng.chance(15);
        let (chaos, sim, results) = (chaos.clone(), sim.clone(), results.clone());
        tasks.spawn(async move {
            tokio::time::sleep(start).await;
            if std::env::var_os("IDEM_SIM_VERBOSE").is_some() {
                println!(
                    "{:?} call {id} slot {slot} macro {by_macro} reject {reject} {plan:?} \
                     cancel {cancel:?}: starts",
                    tokio::time::Instant::now()
                );
            }
            let holder = Holder {
                sim,
                slot,
                id,
                started: AtomicBool::new(false),
                began: AtomicBool::new(false),
            };
            let call = async {
                if by_macro {
                    charged(&chaos, &holder, plan, format!("k{k}")).await
                } else {
                    idem_core::Call::new("simulation::call")
                        .key(k)
                        .lease(lease)
                        .ttl(Duration::from_secs(3600))
                        .wait_timeout(Duration::from_secs(20))
                        .on_conflict(if reject {
                            OnConflict::Reject
                        } else {
                            OnConflict::Wait
                        })
                        .run(&chaos, body(&holder, plan))
                        .await
                }
            };
            let r = match cancel {
                Some(d) => tokio::time::timeout(d, call).await.ok(),
                None => Some(call.await),
            };
            let started = holder.began.load(Ordering::SeqCst);
            drop(holder);
            if std::env::var_os("IDEM_SIM_VERBOSE").is_some() {
                let r = r.as_ref().map(|r| r.as_ref().map_err(|e| format!("{e:?}")));
                println!(
                    "call {id} slot {slot} macro {by_macro} reject {reject} start {start:?} \
                     {plan:?} cancel {cancel:?} body started {started} -> {r:?}"
                );
            }
            if let Some(Ok(v)) = r {
                results.lock().unwrap().ok.push((slot, v));
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    // Let detached settles and releases finish.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let mut violations = std::mem::take(&mut *sim.violations.lock().unwrap());
    let mut values: HashMap<usize, u64> = HashMap::new();
    for (slot, v) in results.lock().unwrap().ok.iter() {
        match values.get(slot) {
            Some(first) if first != v => violations.push(format!(
                "key slot {slot}: callers got Ok({first}) and Ok({v})"
            )),
            _ => {
                values.insert(*slot, *v);
            }
        }
    }

    // No key stays blocked past its lease: a fresh call on every key answers within lease +
    // margin (on the plain store: the chaos is over), with the value others got.
    let probes = 2 * keys;
    for slot in 0..probes {
        let (k, this_lease) = if slot < keys {
            (slot, lease)
        } else {
            (slot - keys, MACRO_LEASE)
        };
        let holder = Holder {
            sim: sim.clone(),
            slot,
            id: usize::MAX,
            started: AtomicBool::new(false),
            began: AtomicBool::new(false),
        };
        let plan = BodyPlan {
            id: 1_000_000 + slot,
            duration: Duration::ZERO,
            end: End::Ok,
        };
        let limit = this_lease + Duration::from_millis(100);
        let r = if slot < keys {
            let call = idem_core::Call::new("simulation::call")
                .key(k)
                .lease(lease)
                .ttl(Duration::from_secs(3600))
                .wait_timeout(limit)
                .run(&*store, body(&holder, plan));
            tokio::time::timeout(limit, call).await
        } else {
            let plain = Chaos {
                inner: store.clone(),
                state: Arc::new(Mutex::new(ChaosState {
                    rng: Rng(0),
                    lease: MACRO_LEASE,
                    faulted: HashSet::new(),
                    quiet: true,
                })),
            };
            tokio::time::timeout(limit, charged(&plain, &holder, plan, format!("k{k}"))).await
        };
        match r {
            Err(_) => violations.push(format!(
                "key slot {slot}: still blocked {limit:?} after the run"
            )),
            Ok(Err(e)) => violations.push(format!("key slot {slot}: probe failed: {e:?}")),
            Ok(Ok(v)) => {
                if let Some(first) = values.get(&slot) {
                    if *first != v {
                        violations.push(format!(
                            "key slot {slot}: probe got Ok({v}), callers got Ok({first})"
                        ));
                    }
                }
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let after = idem_core::counters();
    let total: u64 = after
        .iter()
        .zip(&before)
        .map(|((_, a), (_, b))| a - b)
        .sum();
    let expected = (calls + probes) as u64;
    // Each call ends in exactly one outcome (0fee94e: also a caller dropped while it waits).
    if total != expected {
        let delta: Vec<(Outcome, u64)> = after
            .iter()
            .zip(&before)
            .filter(|((_, a), (_, b))| a != b)
            .map(|((o, a), (_, b))| (*o, a - b))
            .collect();
        violations.push(format!(
            "outcome counters add up to {total}, not {expected} calls: {delta:?}"
        ));
    }
    violations
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("IDEM_SIM_SEED") {
        return vec![s.trim().parse().expect("IDEM_SIM_SEED is a decimal u64")];
    }
    let runs: u64 = std::env::var("IDEM_SIM_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let base = FencingToken::random().0;
    (0..runs)
        .map(|i| base.wrapping_add(i.wrapping_mul(0x9E37_79B9)))
        .collect()
}

/// The tests of this file read the process-wide counters: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn simulated_runs() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info.payload().is::<SimulatedPanic>() {
            quiet(info);
        }
    }));
    let seeds = seeds();
    let started = std::time::Instant::now();
    for (i, &seed) in seeds.iter().enumerate() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        let violations = rt.block_on(run(seed));
        if !violations.is_empty() {
            panic!(
                "simulated run {i} (seed {seed}) broke the runtime's promises:\n  {}\n\
                 replay: IDEM_SIM_SEED={seed} cargo test --test simulation",
                violations.join("\n  ")
            );
        }
    }
    println!(
        "simulation: {} runs passed in {:?}",
        seeds.len(),
        started.elapsed()
    );
}

/// Found by the simulation (seed 8758282174334263672, call 3): a caller dropped while it waits
/// for another holder's result (on_conflict = wait) ends in no outcome at all — neither the
/// `Cancelled` counter nor its tracing event — because the runtime arms its drop guard only
/// around the claim, not around `store.wait`. Fixed in 0fee94e.
#[test]
fn cancelled_while_waiting_counts_an_outcome() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = Arc::new(MemoryStore::new());
        let call = || {
            idem_core::Call::new("simulation::waiting")
                .key("k")
                .lease(Duration::from_secs(1))
        };
        let s = store.clone();
        let holder = tokio::spawn(async move {
            call()
                .run(&*s, async {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    Ok::<_, idem_core::Error>(1)
                })
                .await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let before = idem_core::count(Outcome::Cancelled);
        let waiter = call().run(&*store, async { Ok::<_, idem_core::Error>(2) });
        assert!(tokio::time::timeout(Duration::from_millis(100), waiter)
            .await
            .is_err());
        assert_eq!(holder.await.unwrap().unwrap(), 1);
        assert_eq!(
            idem_core::count(Outcome::Cancelled) - before,
            1,
            "a waiter dropped before its body started ends as Cancelled"
        );
    });
}
