//! Outcomes: one per call, emitted as a `tracing` event and counted.

use std::sync::atomic::{AtomicU64, Ordering};

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
    /// The claim was released: the body returned `Err` (with `errors = release`), panicked,
    /// or the caller's future was dropped.
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
}

impl Outcome {
    /// All outcomes, in counter order.
    pub const ALL: [Outcome; 17] = [
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

/// Counts and logs the end of one call.
pub(crate) fn emit(outcome: Outcome, namespace: &str, key: Option<&crate::Key>) {
    COUNTERS[outcome.index()].fetch_add(1, Ordering::Relaxed);
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
        "in_progress" | "key_reused" | "wait_timeout" | "taken_over" | "missing_key" => {
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
