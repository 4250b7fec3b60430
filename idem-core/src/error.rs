//! The one error type of idem, and its HTTP status mapping.

use std::time::Duration;

/// A boxed error from a store backend or a codec.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong around an idempotent call.
///
/// The function an attribute is put on returns `Result<T, E>` with `E: From<Error>`, so these
/// reach the caller through the function's own error type.
///
/// ```
/// use idem_core::Error;
/// let e = Error::KeyReused;
/// assert_eq!(e.http_status(), 422);
/// assert_eq!(e.outcome().as_str(), "key_reused");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another call holds the key under a live lease: `on_conflict = reject`, or the wait
    /// (`wait_timeout`) ran out. Retry later (HTTP 409).
    #[error("a call with this idempotency key is in progress{}", retry_hint(*.retry_after))]
    InProgress {
        /// When to retry: [`Error::retry_hint`] of the holder's remaining lease — the smaller
        /// of that lease and one second, since most bodies end long before their lease does
        /// (a client told to wait out a 30 s lease for a 300 ms body would wait 100× too
        /// long). The HTTP layer sends the same value as `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// The key was used before with different arguments (HTTP 422). The stored answer belongs
    /// to another request and is never replayed to this one.
    #[error("idempotency key reused with different arguments")]
    KeyReused,
    /// The key expression evaluated to `None` (HTTP 400).
    #[error("idempotency key is missing (the key expression evaluated to None)")]
    MissingKey,
    /// The stored record is not readable as this call's result (HTTP 500): it was written
    /// under another codec, `version` or pinned schema (`source` is `None`), or its payload
    /// does not decode as the return type (`source` is the decode error) — the return type
    /// changed meaning without a `version` bump. Never a garbled value, never a silent re-run:
    /// bump `version` when a type changes incompatibly (docs/records.md), or wait for the
    /// record's TTL.
    #[error("{}", incompatible_message(.expected, .found, .source.is_some()))]
    IncompatibleRecord {
        /// The compatibility tag this call expects.
        expected: String,
        /// The tag in the store (equal to `expected` when the tags match and the payload does
        /// not decode).
        found: String,
        /// The decode error, when the tags matched but the payload does not decode.
        #[source]
        source: Option<CodecError>,
    },
    /// The store failed or could not be reached; the body was not run (HTTP 503).
    #[error("idempotency store failed")]
    Store(#[source] StoreError),
    /// A value could not be encoded, or a stored record could not be decoded (HTTP 500).
    #[error("idempotency record codec failed")]
    Codec(#[source] CodecError),
    /// The claim was taken over while the body ran (the lease lapsed), so the result could not
    /// be recorded; the body's side effect may have happened twice (HTTP 500).
    #[error("idempotency lease lost: another caller took over the key while the body ran")]
    LeaseLost,
    /// The encoded result is larger than the store accepts; the claim was released (HTTP 500).
    #[error("encoded result is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Encoded size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// An option is out of range: a zero or overflowing `ttl`, `lease` or `wait_timeout`
    /// (HTTP 500). Nothing was claimed and the body was not run: fix the call site.
    #[error("invalid idempotency option `{option}`: {reason}")]
    InvalidOption {
        /// The option's name (`ttl`, `lease`, `wait_timeout`).
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The call names no store and no process default store was set (HTTP 500).
    #[error(
        "no idempotency store: pass `store = ...` to #[idempotent] or call \
         idem_core::set_default_store(...) at start-up"
    )]
    NoStore,
    /// The process is draining ([`shutdown`](crate::shutdown())): no new claim is taken and
    /// the body was not run (HTTP 503). Retry on another instance.
    #[error("the process is shutting down: no new idempotent calls are accepted")]
    ShuttingDown,
    /// Two annotated functions of this process have one namespace, so they would read each
    /// other's records (HTTP 500). The second one to run gets this error on every call and
    /// never runs its body; the first keeps working. Give one of them its own
    /// `namespace = ".."`, or, if both are one logical operation, add `shared` to both.
    #[error(
        "idempotency namespace `{namespace}` is used by two functions, `{first}` and \
         `{second}`: give `{second}` its own `namespace = \"..\"`, or add `shared` to both \
         if they are one operation"
    )]
    NamespaceCollision {
        /// The namespace both use.
        namespace: &'static str,
        /// The function that registered it first (and keeps it).
        first: &'static str,
        /// The function that was refused.
        second: &'static str,
    },
    /// [`step`](crate::step()) was called outside the body of an idempotent call (no
    /// `#[idempotent]` or [`Call`](crate::Call) around it, or in a task the body spawned): a
    /// step records its result beside the call's record, so there is nowhere to record it.
    /// The step's future was not run (HTTP 500).
    #[error(
        "durable step `{step}` ran outside an idempotent call: call step() in the body of an \
         #[idempotent] function or Call::run, in the body's own task (not a spawned one)"
    )]
    StepOutsideCall {
        /// The step's name.
        step: String,
    },
    /// A step was started inside another step's future: steps do not nest. The inner step's
    /// future was not run (HTTP 500).
    #[error(
        "durable step `{step}` was started inside another step: steps do not nest; run it \
         after the enclosing step, or make its work part of that step"
    )]
    StepNested {
        /// The inner step's name.
        step: String,
    },
    /// A step in a transactional call (`transaction = tx`, `in_transaction = tx`): the whole
    /// body already commits once, with its result, so a step inside it would be half
    /// durable. The step's future was not run (HTTP 500).
    #[error(
        "durable step `{step}` in a transactional call: the body already commits once with its \
         result; remove the step, or drop `transaction` and use step_in() for the parts that \
         write to the database"
    )]
    StepInTransaction {
        /// The step's name.
        step: String,
    },
    /// An at-most-once step was started by an earlier execution of this call that did not
    /// record how it ended (it crashed, or lost its lease, inside the step): it may or may not
    /// have happened, so it is not run again (HTTP 409). Find out from the downstream system
    /// (the step's [`step_key`](crate::step_key) is the key it saw), give the step an
    /// [`on_in_doubt`](crate::Step::on_in_doubt) hook that does, or
    /// [`forget`](crate::Call::forget) the call to start it over.
    #[error(
        "at-most-once step `{step}` was started by an earlier execution that did not finish \
         it: its outcome is unknown, so it is not run again; check the downstream system \
         (step_key() is the key it saw), add an on_in_doubt hook, or forget the call"
    )]
    StepInDoubt {
        /// The step.
        step: crate::StepId,
    },
    /// The call's store does not keep durable steps (a third-party store that predates them,
    /// or one that cannot be detached): the step's future was not run, rather than run again
    /// on every retry (HTTP 500).
    #[error(
        "the `{store}` store does not keep durable steps: use a store that does (memory, \
         tiered, Redis, PostgreSQL, MySQL, SQLite), or implement Store::supports_steps, \
         load_steps, put_step and clear_step (and detached)"
    )]
    StepsUnsupported {
        /// The store's name ([`Store::name`](crate::Store::name)).
        store: &'static str,
    },
    /// The call started more steps than its `max_steps` (HTTP 500). The step past the limit
    /// was not run.
    #[error(
        "the call started more than {limit} durable steps, its max_steps: raise max_steps \
         (Call::max_steps, Options::max_steps, #[idempotent(max_steps = ..)]) or do more in \
         each step"
    )]
    TooManySteps {
        /// The limit.
        limit: u32,
    },
}

/// The message of [`Error::IncompatibleRecord`]: a tag mismatch names both tags; a payload
/// that does not decode under a matching tag says so, with the tag once.
fn incompatible_message(expected: &str, found: &str, undecodable: bool) -> String {
    if undecodable {
        format!(
            "stored record does not decode as this call's return type (tag `{found}`): \
             the type changed without a `version` bump"
        )
    } else {
        format!("stored record is incompatible: expected `{expected}`, found `{found}`")
    }
}

fn retry_hint(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!(" (retry after {} ms)", d.as_millis()),
        None => String::new(),
    }
}

/// The most an `InProgress` retry hint ever says: one second.
pub const MAX_RETRY_HINT: Duration = Duration::from_secs(1);

impl Error {
    /// The retry hint of an `InProgress` answer, from the holder's remaining lease (if the
    /// store knows it): the smaller of that and [`MAX_RETRY_HINT`], and at least 10 ms.
    ///
    /// ```
    /// use std::time::Duration;
    /// use idem_core::Error;
    /// assert_eq!(Error::retry_hint(Some(Duration::from_secs(29))), Duration::from_secs(1));
    /// assert_eq!(Error::retry_hint(Some(Duration::from_millis(200))), Duration::from_millis(200));
    /// assert_eq!(Error::retry_hint(None), Duration::from_secs(1));
    /// ```
    pub fn retry_hint(lease_remaining: Option<Duration>) -> Duration {
        lease_remaining
            .unwrap_or(MAX_RETRY_HINT)
            .clamp(Duration::from_millis(10), MAX_RETRY_HINT)
    }

    /// The HTTP status this error maps to: 409 `InProgress` and `StepInDoubt`, 422 `KeyReused`, 400 `MissingKey`,
    /// 503 `Store` and `ShuttingDown`, 500 for the rest.
    ///
    /// ```
    /// assert_eq!(idem_core::Error::InProgress { retry_after: None }.http_status(), 409);
    /// assert_eq!(idem_core::Error::MissingKey.http_status(), 400);
    /// ```
    pub fn http_status(&self) -> u16 {
        match self {
            Error::InProgress { .. } | Error::StepInDoubt { .. } => 409,
            Error::KeyReused => 422,
            Error::MissingKey => 400,
            Error::Store(_) | Error::ShuttingDown => 503,
            Error::IncompatibleRecord { .. }
            | Error::Codec(_)
            | Error::LeaseLost
            | Error::TooLarge { .. }
            | Error::InvalidOption { .. }
            | Error::NoStore
            | Error::NamespaceCollision { .. }
            | Error::StepOutsideCall { .. }
            | Error::StepNested { .. }
            | Error::StepInTransaction { .. }
            | Error::StepsUnsupported { .. }
            | Error::TooManySteps { .. } => 500,
        }
    }

    /// The outcome a call that ends with this error is counted under.
    pub fn outcome(&self) -> crate::Outcome {
        use crate::Outcome;
        match self {
            Error::InProgress { .. } => Outcome::InProgress,
            Error::KeyReused => Outcome::KeyReused,
            Error::MissingKey => Outcome::MissingKey,
            Error::IncompatibleRecord { .. } => Outcome::IncompatibleRecord,
            Error::Store(_) | Error::NoStore => Outcome::StoreError,
            Error::InvalidOption { .. }
            | Error::NamespaceCollision { .. }
            | Error::StepOutsideCall { .. }
            | Error::StepNested { .. }
            | Error::StepInTransaction { .. }
            | Error::StepsUnsupported { .. }
            | Error::TooManySteps { .. } => Outcome::InvalidOption,
            // The body returned it: the call ends as failed.
            Error::StepInDoubt { .. } => Outcome::Failed,
            Error::Codec(_) => Outcome::CodecError,
            Error::LeaseLost => Outcome::LeaseLost,
            Error::TooLarge { .. } => Outcome::TooLarge,
            Error::ShuttingDown => Outcome::ShuttingDown,
        }
    }
}

/// A failure reported by a [`Store`](crate::Store).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A fenced operation (`complete`, `release`, `renew`) carried a token that is no longer
    /// current: the claim expired or was taken over.
    #[error("fencing token is no longer current")]
    Fenced,
    /// The store holds data under this key that it cannot read (written by another program,
    /// or corrupted).
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    /// The value is larger than this store accepts.
    #[error("value of {size} bytes is over the store's limit of {limit} bytes")]
    TooLarge {
        /// Size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The operation did not finish in time.
    #[error("store operation timed out after {0:?}")]
    Timeout(Duration),
    /// The store does not implement this operation (a third-party store that predates
    /// durable steps, for example). The runtime turns it into a clear error for the caller;
    /// nothing is run in its place.
    #[error("this store does not support `{0}`")]
    Unsupported(&'static str),
    /// The backend failed: connection, protocol, server error.
    #[error("store backend error: {message}")]
    Backend {
        /// What was being done.
        message: String,
        /// The backend's error.
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    /// Wraps a backend error with a short description of what was being done.
    ///
    /// ```
    /// let e = idem_core::StoreError::backend("claim", std::io::Error::other("refused"));
    /// assert!(std::error::Error::source(&e).is_some());
    /// ```
    pub fn backend(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StoreError::Backend {
            message: message.into(),
            source: source.into(),
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Fenced => Error::LeaseLost,
            StoreError::Corrupt(msg) => Error::Codec(CodecError::Corrupt(msg)),
            StoreError::TooLarge { size, limit } => Error::TooLarge { size, limit },
            other => Error::Store(other),
        }
    }
}

/// A failure to encode or decode a value or a record.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The value could not be encoded.
    #[error("could not encode the value with codec `{codec}`")]
    Encode {
        /// Codec name.
        codec: &'static str,
        /// The codec's error.
        #[source]
        source: BoxError,
    },
    /// The stored bytes could not be decoded as the expected type.
    #[error("could not decode the stored value with codec `{codec}`")]
    Decode {
        /// Codec name.
        codec: &'static str,
        /// The codec's error.
        #[source]
        source: BoxError,
    },
    /// The stored record is not an idem record (foreign data or corruption).
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    /// An argument or key could not be fingerprinted (its `Serialize` impl failed).
    #[error("could not fingerprint the arguments: {0}")]
    Fingerprint(String),
}
