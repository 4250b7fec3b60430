//! The drain: shutting a process down without losing a finished body's result.
//!
//! Once a body has returned, its completion runs to its end even if the caller's future is
//! dropped: it is handed to a task spawned on the tokio runtime. A runtime that stops right
//! after (the end of `main`, a rolling deploy's SIGTERM) drops that task with the rest, and the
//! record stays in progress until its lease passes — then a retry runs the body again.
//! [`shutdown`] closes that window: it stops new claims, waits until every claim this process
//! holds is settled (bodies finished and their completions or releases acknowledged, detached
//! ones included), and says what it could not finish.
//!
//! ```
//! use std::time::Duration;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // ... serve until the shutdown signal, let the server finish its requests, then:
//! match idem_core::shutdown(Duration::from_secs(20)).await {
//!     Ok(()) => {} // every claim of this process is completed or released
//!     Err(e) => eprintln!("{e}"), // each unfinished call is in `e.calls()`
//! }
//! # idem_core::shutdown::resume();
//! # }
//! ```
//!
//! The drain is process-wide: it covers every call on every store of this process.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{Error, Key};

/// Drains idem: new claims are refused with [`Error::ShuttingDown`] from now on, and this
/// waits, at most `within`, until every claim this process holds is settled — bodies that are
/// running finish, and their completions (or releases) are acknowledged by the store,
/// including those handed to a detached task because the caller was dropped.
///
/// A call whose record is completed still gets its result (a look at the record, no claim):
/// a retry of a finished call, or a call that was waiting for another holder when the drain
/// started and whose holder completed by then. Others get [`Error::ShuttingDown`].
///
/// Returns `Ok(())` when nothing is held any more, or [`ShutdownError::Unfinished`] with each
/// call still held at the deadline (and how many claims were still in flight). A body still running then keeps its claim: releasing it
/// would let a retry run the body a second time while it may still make its side effect. It
/// ends with the process; its claim is taken over once its lease passes.
///
/// Call it after the server has stopped taking requests (axum's `with_graceful_shutdown`
/// returned) and before the tokio runtime is dropped. See [the module](self) for an example.
pub async fn shutdown(within: Duration) -> Result<(), ShutdownError> {
    let registry = &*REGISTRY;
    registry.draining.store(true, Ordering::SeqCst);
    tracing::info!(target: "idem", held = registry.in_flight.load(Ordering::SeqCst), "draining: new claims are refused");
    let deadline = Instant::now().checked_add(within);
    loop {
        let idle = registry.idle.notified();
        if registry.in_flight.load(Ordering::SeqCst) == 0 {
            tracing::info!(target: "idem", "drained: nothing is held");
            return Ok(());
        }
        match deadline {
            Some(deadline) => {
                if tokio::time::timeout_at(deadline, idle).await.is_err() {
                    break;
                }
            }
            None => idle.await,
        }
    }
    let calls = held_calls();
    let claims_in_flight = claims_in_flight();
    if calls.is_empty() && claims_in_flight == 0 {
        return Ok(());
    }
    for call in &calls {
        tracing::error!(target: "idem", namespace = call.namespace, key = %call.key, stage = %call.stage, "still held at the shutdown deadline");
    }
    if claims_in_flight > 0 {
        tracing::error!(target: "idem", claims_in_flight, "claims still in flight at the shutdown deadline");
    }
    Err(ShutdownError::Unfinished {
        calls,
        claims_in_flight,
    })
}

/// Whether a drain has started: new claims are refused.
///
/// ```
/// assert!(!idem_core::shutdown::is_draining());
/// ```
pub fn is_draining() -> bool {
    REGISTRY.draining.load(Ordering::SeqCst)
}

/// Accepts new claims again after [`shutdown`]: for a process that called off its shutdown,
/// and for tests that drain more than once in one process.
pub fn resume() {
    REGISTRY.draining.store(false, Ordering::SeqCst);
}

/// The calls this process holds a claim for right now. A claim still in flight is not
/// listed (it holds nothing yet: listing every claim would cost every replay an allocation
/// and two locks); [`claims_in_flight`] counts those.
pub fn held_calls() -> Vec<HeldCall> {
    let mut calls: Vec<HeldCall> = REGISTRY
        .shards
        .iter()
        .flat_map(|shard| {
            lock(shard)
                .values()
                .filter_map(Weak::upgrade)
                .map(|e| e.describe())
                .collect::<Vec<_>>()
        })
        .collect();
    calls.sort_by_key(|c| c.since);
    calls
}

/// How many claims of this process are in flight right now: sent (or about to be), not yet
/// answered. A drain waits for them too; one that acquires is then listed by [`held_calls`].
///
/// ```
/// assert_eq!(idem_core::shutdown::claims_in_flight(), 0);
/// ```
pub fn claims_in_flight() -> usize {
    REGISTRY.claiming.load(Ordering::SeqCst)
}

/// What a drain could not finish by its deadline.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShutdownError {
    /// These calls were still held, and this many claims in flight, at the deadline.
    #[error(
        "{} idempotent call(s) still held at the shutdown deadline{}",
        calls.len(),
        in_flight_note(*claims_in_flight)
    )]
    #[non_exhaustive]
    Unfinished {
        /// Each call still held, oldest first.
        calls: Vec<HeldCall>,
        /// Claims still in flight (sent, not answered): each may still acquire its key,
        /// which then stays blocked until its lease passes.
        claims_in_flight: usize,
    },
}

fn in_flight_note(n: usize) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(", and {n} claim(s) still in flight")
    }
}

impl ShutdownError {
    /// The calls still held at the deadline, oldest first.
    pub fn calls(&self) -> &[HeldCall] {
        match self {
            ShutdownError::Unfinished { calls, .. } => calls,
        }
    }

    /// How many claims were still in flight at the deadline (not in [`calls`](Self::calls)).
    pub fn claims_in_flight(&self) -> usize {
        match self {
            ShutdownError::Unfinished {
                claims_in_flight, ..
            } => *claims_in_flight,
        }
    }
}

/// One call this process holds a claim for.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeldCall {
    /// The call's namespace.
    pub namespace: &'static str,
    /// The hashed key.
    pub key: Key,
    /// Where the call is.
    pub stage: Stage,
    /// When its claim was sent.
    pub since: Instant,
}

/// Where a held call is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// The body is running.
    Running,
    /// The body returned; its completion or release is in flight (possibly in a detached
    /// task, the caller having gone away).
    Settling,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Running => "running",
            Stage::Settling => "settling",
        })
    }
}

/// A claim of this process about to be sent or in flight: counted for the drain (atomics
/// only), not listed. A replay or a conflict ends here, having cost no allocation and no lock;
/// a claim that acquires becomes a listed [`Tracked`].
pub(crate) struct Claiming {
    namespace: &'static str,
    key: Key,
    since: Instant,
}

impl Claiming {
    /// Counts a claim about to be sent, unless a drain has started.
    pub(crate) fn start(namespace: &'static str, key: Key) -> Result<Claiming, Error> {
        let registry = &*REGISTRY;
        // Counted first, then checked: a drain that starts meanwhile sees the count, or this
        // sees the drain.
        registry.in_flight.fetch_add(1, Ordering::SeqCst);
        registry.claiming.fetch_add(1, Ordering::SeqCst);
        if registry.draining.load(Ordering::SeqCst) {
            drop(Claiming {
                namespace,
                key,
                since: Instant::now(),
            });
            return Err(Error::ShuttingDown);
        }
        Ok(Claiming {
            namespace,
            key,
            since: Instant::now(),
        })
    }

    /// When the claim was sent (as good as: counted right before).
    pub(crate) fn since(&self) -> Instant {
        self.since
    }

    /// The claim acquired the key: listed as running from now on, its count handed over to
    /// the returned handle (the drain never sees it uncounted).
    pub(crate) fn acquired(self) -> Tracked {
        let registry = &*REGISTRY;
        let id = registry.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            id,
            namespace: self.namespace,
            key: self.key,
            stage: AtomicU8::new(Stage::Running as u8),
            since: self.since,
        });
        lock(registry.shard(id)).insert(id, Arc::downgrade(&entry));
        registry.claiming.fetch_sub(1, Ordering::SeqCst);
        // The in-flight count goes with the entry, which gives it back when dropped.
        std::mem::forget(self);
        Tracked(entry)
    }
}

impl Drop for Claiming {
    fn drop(&mut self) {
        let registry = &*REGISTRY;
        registry.claiming.fetch_sub(1, Ordering::SeqCst);
        registry.leave();
    }
}

/// One claim of this process that acquired its key, listed from then until its settle is
/// acknowledged; a clone goes with a settle handed to a detached task. The last clone to drop
/// takes it off the books.
#[derive(Clone)]
pub(crate) struct Tracked(Arc<Entry>);

impl Tracked {
    pub(crate) fn set(&self, stage: Stage) {
        self.0.stage.store(stage as u8, Ordering::Relaxed);
    }
}

struct Entry {
    id: u64,
    namespace: &'static str,
    key: Key,
    stage: AtomicU8,
    since: Instant,
}

impl Entry {
    fn describe(&self) -> HeldCall {
        let stage = match self.stage.load(Ordering::Relaxed) {
            s if s == Stage::Running as u8 => Stage::Running,
            _ => Stage::Settling,
        };
        HeldCall {
            namespace: self.namespace,
            key: self.key,
            stage,
            since: self.since,
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let registry = &*REGISTRY;
        lock(registry.shard(self.id)).remove(&self.id);
        registry.leave();
    }
}

const SHARDS: usize = 16;

/// The hash of the registry's ids: they are a counter of this process (no one picks them), so
/// a multiply spreads them enough; SipHash on every claim and every settle cost more than
/// the rest of the bookkeeping.
#[derive(Clone, Copy, Default)]
struct Ids;

impl std::hash::BuildHasher for Ids {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
    fn write_u64(&mut self, id: u64) {
        // The high half folded down: a shard's ids share their low bits (`id % SHARDS`).
        let p = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = p ^ (p >> 29);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

struct Registry {
    draining: AtomicBool,
    /// Claims in flight and listed calls: what the drain waits for.
    in_flight: AtomicUsize,
    /// Of those, the claims in flight (not listed).
    claiming: AtomicUsize,
    next_id: AtomicU64,
    /// Where each listed call is, for the report (sharded: every acquired claim passes here).
    shards: [Mutex<HashMap<u64, Weak<Entry>, Ids>>; SHARDS],
    /// Woken when the count reaches zero.
    idle: Notify,
}

impl Registry {
    fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Weak<Entry>, Ids>> {
        &self.shards[(id % SHARDS as u64) as usize]
    }

    fn leave(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| Registry {
    draining: AtomicBool::new(false),
    in_flight: AtomicUsize::new(0),
    claiming: AtomicUsize::new(0),
    next_id: AtomicU64::new(0),
    shards: std::array::from_fn(|_| Mutex::new(HashMap::with_hasher(Ids))),
    idle: Notify::new(),
});

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
