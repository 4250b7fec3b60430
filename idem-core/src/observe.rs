//! Outcomes: one per call, emitted as a `tracing` event and counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How a call ended. Every call ends in exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The body ran and its result was recorded.
    Executed,
    /// A stored result was returned.
    Replayed,
    /// A stored result was returned after waiting for a concurrent call.
    ReplayedAfterWait,
    /// Rejected: another call holds the key (`on_conflict = reject`).
    InProgress,
    /// The key was used with other arguments.
    KeyReused,
    /// A waiter gave up after `wait_timeout`.
    WaitTimeout,
    /// The body ran after taking over a claim whose lease had passed.
    TakenOver,
    /// The claim was released without a result: the body panicked, the caller's future was
    /// dropped while the body ran, or (HTTP layer) a response was not stored.
    Released,
    /// The store failed; the body did not run.
    StoreError,
    /// The key was `None` (`missing_key = error`).
    MissingKey,
    /// The body ran without protection (`fail_open` or `missing_key = run`).
    Unprotected,
    /// The stored record belongs to another type or version.
    IncompatibleRecord,
    /// A value could not be encoded or a record decoded.
    CodecError,
    /// The result was over the size limit; the claim was released.
    TooLarge,
    /// The lease was lost while the body ran; the result was not recorded.
    LeaseLost,
    /// An option was out of range (`Error::InvalidOption`); nothing ran.
    InvalidOption,
    /// The caller's future was dropped before the body started (during the claim or the
    /// wait); a claim that may have applied was released.
    Cancelled,
    /// The process was draining (`idem_core::shutdown`): no claim was taken, nothing ran.
    ShuttingDown,
    /// The body ran and returned `Err`; with `errors = release` the claim was released so
    /// that a retry runs again. Counted apart from [`Released`](Outcome::Released) so that
    /// failing bodies can be alerted on.
    Failed,
}

impl Outcome {
    /// All outcomes, in counter order.
    pub const ALL: [Outcome; 19] = [
        Outcome::Executed,
        Outcome::Replayed,
        Outcome::ReplayedAfterWait,
        Outcome::InProgress,
        Outcome::KeyReused,
        Outcome::WaitTimeout,
        Outcome::TakenOver,
        Outcome::Released,
        Outcome::StoreError,
        Outcome::MissingKey,
        Outcome::Unprotected,
        Outcome::IncompatibleRecord,
        Outcome::CodecError,
        Outcome::TooLarge,
        Outcome::LeaseLost,
        Outcome::InvalidOption,
        Outcome::Cancelled,
        Outcome::ShuttingDown,
        Outcome::Failed,
    ];

    /// The `outcome` field value, e.g. `"replayed_after_wait"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Executed => "executed",
            Outcome::Replayed => "replayed",
            Outcome::ReplayedAfterWait => "replayed_after_wait",
            Outcome::InProgress => "in_progress",
            Outcome::KeyReused => "key_reused",
            Outcome::WaitTimeout => "wait_timeout",
            Outcome::TakenOver => "taken_over",
            Outcome::Released => "released",
            Outcome::StoreError => "store_error",
            Outcome::MissingKey => "missing_key",
            Outcome::Unprotected => "unprotected",
            Outcome::IncompatibleRecord => "incompatible_record",
            Outcome::CodecError => "codec_error",
            Outcome::TooLarge => "too_large",
            Outcome::LeaseLost => "lease_lost",
            Outcome::InvalidOption => "invalid_option",
            Outcome::Cancelled => "cancelled",
            Outcome::ShuttingDown => "shutting_down",
            Outcome::Failed => "failed",
        }
    }

    fn index(self) -> usize {
        Outcome::ALL.iter().position(|o| *o == self).unwrap_or(0)
    }
}

static COUNTERS: [AtomicU64; Outcome::ALL.len()] =
    [const { AtomicU64::new(0) }; Outcome::ALL.len()];

/// A snapshot of the process-wide outcome counters, for export to a metrics system.
///
/// ```
/// for (outcome, n) in idem_core::counters() {
///     println!("idem_calls_total{{outcome=\"{}\"}} {n}", outcome.as_str());
/// }
/// ```
pub fn counters() -> Vec<(Outcome, u64)> {
    Outcome::ALL
        .iter()
        .map(|o| (*o, COUNTERS[o.index()].load(Ordering::Relaxed)))
        .collect()
}

/// The count of one outcome so far.
pub fn count(outcome: Outcome) -> u64 {
    COUNTERS[outcome.index()].load(Ordering::Relaxed)
}

/// One finished call, as an [`Observed`] scope sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallOutcome {
    /// The call's namespace (the function unless pinned).
    pub namespace: &'static str,
    /// How it ended.
    pub outcome: Outcome,
}

/// The outcomes of the idempotent calls made inside one [`observe`] scope, in order.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    calls: Arc<Mutex<Vec<CallOutcome>>>,
}

impl Observed {
    /// Every call's outcome so far, in the order they ended.
    pub fn calls(&self) -> Vec<CallOutcome> {
        self.lock().clone()
    }

    /// The outcome of the last call that ended, if any.
    pub fn last(&self) -> Option<Outcome> {
        self.lock().last().map(|c| c.outcome)
    }

    /// How many calls ended with `outcome`.
    pub fn count(&self, outcome: Outcome) -> usize {
        self.lock().iter().filter(|c| c.outcome == outcome).count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<CallOutcome>> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }
}

tokio::task_local! {
    static OBSERVER: Observed;
}

/// Runs `fut` and reports the outcome of every idempotent call that ends inside it, in this
/// task — how a caller tells a replay from a run without changing a function's signature,
/// and how a test asserts outcomes without the process-wide [`counters`]. Scopes nest: the
/// innermost one sees the calls. (A completion that a dropped caller left to a detached task
/// is counted in [`counters`] only.)
///
/// ```
/// use idem_core::{observe, Call, Error, Outcome};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = idem_stores::MemoryStore::new();
/// let charge = || Call::new("docs::observe").key("k").run(&store, async { Ok::<_, Error>(5) });
/// let (first, seen) = observe(charge()).await;
/// assert_eq!((first.unwrap(), seen.last()), (5, Some(Outcome::Executed)));
/// let (again, seen) = observe(charge()).await;
/// assert_eq!((again.unwrap(), seen.last()), (5, Some(Outcome::Replayed)));
/// # }
/// ```
pub async fn observe<F: std::future::Future>(fut: F) -> (F::Output, Observed) {
    let observed = Observed::default();
    let out = OBSERVER.scope(observed.clone(), fut).await;
    (out, observed)
}

#[cfg(feature = "metrics")]
tokio::task_local! {
    /// The `store` label of the calls that end inside [`in_store`].
    static STORE: &'static str;
}

/// Runs one call's future with its store's name at hand, for the `store` label of
/// `idem_calls_total`. Without the `metrics` feature, the future itself.
#[cfg(feature = "metrics")]
pub(crate) async fn in_store<F: std::future::Future>(store: &'static str, fut: F) -> F::Output {
    STORE.scope(store, fut).await
}

#[cfg(not(feature = "metrics"))]
pub(crate) async fn in_store<F: std::future::Future>(_store: &'static str, fut: F) -> F::Output {
    fut.await
}

/// Runs `f` with the store's name at hand, like [`in_store`], without a future.
#[cfg(feature = "metrics")]
#[inline]
pub(crate) fn in_store_now<R>(store: &'static str, f: impl FnOnce() -> R) -> R {
    STORE.sync_scope(store, f)
}

#[cfg(not(feature = "metrics"))]
#[inline]
pub(crate) fn in_store_now<R>(_store: &'static str, f: impl FnOnce() -> R) -> R {
    f()
}

/// Counts and logs the end of one call.
pub fn emit(outcome: Outcome, namespace: &'static str, key: Option<&crate::Key>) {
    #[cfg(feature = "metrics")]
    let store = STORE.try_with(|s| *s).unwrap_or("none");
    #[cfg(not(feature = "metrics"))]
    let store = "none";
    emit_for(store, outcome, namespace, key);
}

/// [`emit`] for a call that ends outside a store's scope, on a store known by name (the HTTP
/// layer's refusals).
pub fn emit_for(
    store: &'static str,
    outcome: Outcome,
    namespace: &'static str,
    key: Option<&crate::Key>,
) {
    COUNTERS[outcome.index()].fetch_add(1, Ordering::Relaxed);
    let _ = OBSERVER.try_with(|o| o.lock().push(CallOutcome { namespace, outcome }));
    #[cfg(feature = "metrics")]
    crate::telemetry::call(namespace, store, outcome);
    #[cfg(not(feature = "metrics"))]
    let _ = store;
    // Formatted only if a subscriber takes the event: no allocation on the hot path.
    let key = KeyField(key);
    let outcome = outcome.as_str();
    macro_rules! event {
        ($level:ident) => {
            tracing::$level!(target: "idem", outcome, namespace, key = %key, "idempotent call")
        };
    }
    match outcome {
        "executed" | "replayed" | "replayed_after_wait" | "released" => event!(debug),
        "in_progress" | "key_reused" | "wait_timeout" | "taken_over" | "missing_key" | "failed" => {
            event!(info)
        }
        "lease_lost" => event!(error),
        _ => event!(warn),
    }
}

struct KeyField<'a>(Option<&'a crate::Key>);

impl std::fmt::Display for KeyField<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(k) => std::fmt::Display::fmt(k, f),
            None => f.write_str("-"),
        }
    }
}
