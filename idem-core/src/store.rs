//! The `Store` trait: the contract every backend keeps, method by method.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::StoreError;

/// The hashed identity of one record: a 32-byte digest of (namespace, scope, key).
///
/// Raw keys never reach a store; backends store [`Key::to_hex`] (64 characters) or the bytes.
/// See [`crate::key`] for how it is derived.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// The digest as 64 lowercase hex characters.
    ///
    /// ```
    /// let k = idem_core::Key([0xab; 32]);
    /// assert_eq!(k.to_hex().len(), 64);
    /// assert!(k.to_hex().starts_with("abab"));
    /// ```
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A 32-byte digest of a call's arguments, stored with the claim so that a repeat with other
/// arguments is detected (`Error::KeyReused`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The digest as 64 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses 32 raw bytes, as a backend reads them back.
    ///
    /// ```
    /// use idem_core::Fingerprint;
    /// assert!(Fingerprint::from_slice(&[1; 32]).is_some());
    /// assert!(Fingerprint::from_slice(&[1; 3]).is_none());
    /// ```
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Fingerprint)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &self.to_hex()[..16])
    }
}

/// The fencing token of one claim. Each claim gets a fresh random token; complete, release and
/// renew are refused unless they carry the token that is current in the store.
///
/// Tokens are random 63-bit positive integers, so that SQL backends can keep them in a
/// `BIGINT` ([`FencingToken::as_i64`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct FencingToken(pub u64);

impl FencingToken {
    /// A fresh token, unique with overwhelming probability.
    ///
    /// ```
    /// let a = idem_core::FencingToken::random();
    /// let b = idem_core::FencingToken::random();
    /// assert_ne!(a, b);
    /// assert!(a.as_i64() > 0);
    /// ```
    pub fn random() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut h = blake3::Hasher::new_derive_key("idem fencing token v1");
        h.update(&std::process::id().to_le_bytes());
        h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        h.update(&now.as_nanos().to_le_bytes());
        let local = 0u8;
        h.update(&(std::ptr::addr_of!(local) as usize).to_le_bytes());
        let out = h.finalize();
        let mut b = [0u8; 8];
        b.copy_from_slice(&out.as_bytes()[..8]);
        FencingToken((u64::from_le_bytes(b) >> 1).max(1))
    }

    /// The token as a positive `i64`, for SQL `BIGINT` columns.
    pub fn as_i64(self) -> i64 {
        (self.0 & (i64::MAX as u64)) as i64
    }

    /// The inverse of [`as_i64`](Self::as_i64).
    pub fn from_i64(v: i64) -> Self {
        FencingToken(v as u64)
    }
}

/// What a caller asks of [`Store::claim`].
#[derive(Clone, Debug)]
pub struct ClaimRequest {
    /// The record.
    pub key: Key,
    /// The arguments' fingerprint, stored with a new claim (None: not checked).
    pub fingerprint: Option<Fingerprint>,
    /// The token this caller will hold if it acquires the claim.
    pub token: FencingToken,
    /// How long the claim is held before another caller may take it over.
    pub lease: Duration,
}

/// A completed record as the store returns it.
///
/// ```
/// use std::time::Duration;
/// use idem_core::CompletedRecord;
/// let r = CompletedRecord::new(None, b"idem...".to_vec(), Some(Duration::from_secs(60)));
/// assert_eq!(&r.value[..], b"idem...");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompletedRecord {
    /// The fingerprint stored at claim time.
    pub fingerprint: Option<Fingerprint>,
    /// The encoded value (an idem envelope; opaque to the store). Shared, not copied, by
    /// stores that keep it in memory.
    pub value: Bytes,
    /// How long the record still lives (its remaining TTL), as the store knows it when it
    /// answers. `None` only from a store that cannot tell; a cache in front of the store
    /// (`TieredStore`) keeps a record no longer than this.
    pub expires_in: Option<Duration>,
}

impl CompletedRecord {
    /// A completed record from its parts.
    pub fn new(
        fingerprint: Option<Fingerprint>,
        value: impl Into<Bytes>,
        expires_in: Option<Duration>,
    ) -> Self {
        CompletedRecord {
            fingerprint,
            value: value.into(),
            expires_in,
        }
    }
}

/// A completed record lent by its store ([`Store::visit_completed_now`]): the fields of
/// [`CompletedRecord`], with the value borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompletedRef<'a> {
    /// The fingerprint stored at claim time.
    pub fingerprint: Option<Fingerprint>,
    /// The encoded value (an idem envelope).
    pub value: &'a [u8],
    /// How long the record still lives, as the store knows it when it answers.
    pub expires_in: Option<Duration>,
}

/// The answer of [`Store::claim`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The caller owns the key under the request's token.
    Acquired {
        /// True when an in-progress claim whose lease had passed was taken over.
        taken_over: bool,
    },
    /// The key holds a completed, unexpired record.
    Completed(CompletedRecord),
    /// Another caller holds the key under a live lease.
    InProgress {
        /// The holder's fingerprint.
        fingerprint: Option<Fingerprint>,
        /// How long the holder's lease still runs, if the store knows.
        lease_remaining: Option<Duration>,
    },
}

/// What a store knows of a claim's life, on its own clock: set by the claim, kept current by
/// renewals, so that an operator can tell a live holder (its lease keeps moving) from a dead
/// one (its lease runs out). Each part is `None` when the store cannot tell (a record written
/// before the store kept them, or a store that does not keep them).
///
/// ```
/// use std::time::Duration;
/// use idem_core::ClaimTimes;
/// let t = ClaimTimes::new(Some(Duration::from_secs(40)), Some(Duration::from_secs(20)), Some(3));
/// assert_eq!(t.renewals, Some(3));
/// assert_eq!(ClaimTimes::UNKNOWN.age, None);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClaimTimes {
    /// How long ago the claim was made (a takeover is a new claim).
    pub age: Option<Duration>,
    /// How long the holder's lease still runs.
    pub lease_left: Option<Duration>,
    /// How many times the holder has renewed its lease (0 for a fresh claim; a claim repeated
    /// after a lost reply is not a renewal).
    pub renewals: Option<u64>,
}

impl ClaimTimes {
    /// Nothing known.
    pub const UNKNOWN: ClaimTimes = ClaimTimes {
        age: None,
        lease_left: None,
        renewals: None,
    };

    /// Claim times from their parts.
    pub fn new(age: Option<Duration>, lease_left: Option<Duration>, renewals: Option<u64>) -> Self {
        ClaimTimes {
            age,
            lease_left,
            renewals,
        }
    }
}

/// The state of a record, as [`Store::get`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordState {
    /// Claimed under a live lease.
    InProgress {
        /// The holder's token.
        token: FencingToken,
        /// The holder's fingerprint.
        fingerprint: Option<Fingerprint>,
        /// The claim's age, lease left and renewals, as far as the store knows them.
        times: ClaimTimes,
    },
    /// Completed and unexpired.
    Completed(CompletedRecord),
}

/// One durable step's place in a call: its name, and its occurrence among the steps of that
/// name in one execution (0 for the first `step("line", ..)`, 1 for the second, ...).
///
/// ```
/// let id = idem_core::StepId::new("charge", 0);
/// assert_eq!(id.to_string(), "charge#0");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StepId {
    /// The step's name, as the body gives it.
    pub name: String,
    /// Its occurrence number among the steps of that name, from 0.
    pub occurrence: u32,
}

impl StepId {
    /// A step id from its parts.
    pub fn new(name: impl Into<String>, occurrence: u32) -> Self {
        StepId {
            name: name.into(),
            occurrence,
        }
    }
}

impl fmt::Display for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.name, self.occurrence)
    }
}

/// What a step record says about its step.
///
/// ```
/// use idem_core::StepStatus;
/// for s in [StepStatus::Started, StepStatus::Done, StepStatus::Failed] {
///     assert_eq!(StepStatus::from_code(s.code()), Some(s));
/// }
/// assert_eq!(StepStatus::from_code(9), None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StepStatus {
    /// An at-most-once step was started and has not (yet) finished: its outcome is unknown.
    Started,
    /// The step finished with `Ok`; the record's value is its encoded result.
    Done,
    /// The step finished with an `Err` that the body chose to store (a terminal error); the
    /// record's value is the encoded error.
    Failed,
}

impl StepStatus {
    /// A small number for stores that keep the status in a column or a field: 1, 2, 3.
    pub fn code(self) -> u8 {
        match self {
            StepStatus::Started => 1,
            StepStatus::Done => 2,
            StepStatus::Failed => 3,
        }
    }

    /// The inverse of [`code`](Self::code); `None` for a number that is none of them.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(StepStatus::Started),
            2 => Some(StepStatus::Done),
            3 => Some(StepStatus::Failed),
            _ => None,
        }
    }
}

/// One durable step's record, as a store keeps it beside its call's record.
///
/// ```
/// use idem_core::{StepId, StepRecord, StepStatus};
/// let r = StepRecord::new(StepId::new("charge", 0), StepStatus::Done, b"..".to_vec());
/// assert_eq!(r.status, StepStatus::Done);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepRecord {
    /// Which step.
    pub id: StepId,
    /// Started, done or failed.
    pub status: StepStatus,
    /// The encoded step envelope (opaque to the store; written by the runtime).
    pub value: Bytes,
}

impl StepRecord {
    /// A step record from its parts.
    pub fn new(id: StepId, status: StepStatus, value: impl Into<Bytes>) -> Self {
        StepRecord {
            id,
            status,
            value: value.into(),
        }
    }
}

/// Where idempotency records live. Object safe: use it as `Arc<dyn Store>`.
///
/// A store keeps one record per [`Key`], in one of three states: absent, *in progress* (claimed
/// under a fencing token with a lease expiry) or *completed* (an encoded value with a record
/// expiry). Every method is a single atomic step; no method may check and then write in two
/// steps that another caller can interleave. Times are the store's own clock (a remote store
/// uses the server's clock, so that processes with skewed clocks agree).
///
/// `idem_testkit` (the `idem-testkit` crate) is the conformance suite: a backend is correct when
/// it passes it.
///
/// # Unknown outcomes
///
/// Any operation may time out or lose its reply after the store applied it, and the runtime
/// then sends it again, with the same token. Every method is therefore safe to repeat:
///
/// - a [`claim`](Self::claim) that finds the key in progress under the request's own token
///   answers `Acquired` (the first attempt applied) and restarts the lease;
/// - a [`complete`](Self::complete) that finds the key completed under the caller's token
///   answers `Ok` (the first attempt applied), so a completed record remembers the token it
///   was completed under;
/// - a [`release`](Self::release) of a record that is gone, completed, or held under another
///   token answers `Ok` and changes nothing;
/// - a [`renew`](Self::renew) is naturally repeatable.
///
/// # Implementing
///
/// ```
/// use std::time::Duration;
/// use idem_core::{async_trait, Claim, ClaimRequest, FencingToken, Key, RecordState, Store, StoreError};
///
/// #[derive(Debug)]
/// struct Unreachable;
///
/// #[async_trait]
/// impl Store for Unreachable {
///     async fn claim(&self, _: &ClaimRequest) -> Result<Claim, StoreError> {
///         Err(StoreError::Timeout(Duration::from_secs(1)))
///     }
///     async fn complete(&self, _: &Key, _: FencingToken, _: &[u8], _: Duration) -> Result<(), StoreError> {
///         Err(StoreError::Fenced)
///     }
///     async fn release(&self, _: &Key, _: FencingToken) -> Result<(), StoreError> { Ok(()) }
///     async fn renew(&self, _: &Key, _: FencingToken, _: Duration) -> Result<(), StoreError> {
///         Err(StoreError::Fenced)
///     }
///     async fn get(&self, _: &Key) -> Result<Option<RecordState>, StoreError> { Ok(None) }
///     async fn wait(&self, _: &Key, _: Duration) -> Result<(), StoreError> { Ok(()) }
///     async fn remove(&self, _: &Key) -> Result<(), StoreError> { Ok(()) }
/// }
/// let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(Unreachable);
/// # let _ = store;
/// ```
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// Claims `req.key`, atomically, in one step (one round trip for a remote store):
    ///
    /// - absent, or completed but past its expiry → store an in-progress record with
    ///   `req.token`, `req.fingerprint`, a lease ending `req.lease` from now, the claim's
    ///   start (now) and no renewals yet ([`ClaimTimes`]); return
    ///   `Acquired { taken_over: false }`;
    /// - in progress under `req.token` itself (a retried claim whose first reply was lost) →
    ///   restart the lease; return `Acquired { taken_over: false }`;
    /// - in progress with a lease that has passed → replace it the same way; return
    ///   `Acquired { taken_over: true }`;
    /// - in progress under a live lease → `InProgress` with the holder's fingerprint;
    /// - completed and unexpired → `Completed` with the stored fingerprint, value and
    ///   remaining TTL.
    ///
    /// Of any number of concurrent claims of an absent key, exactly one is `Acquired`.
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError>;

    /// Completes the claim held under `token`: the record becomes completed with `value`,
    /// keeps its fingerprint, remembers `token`, and expires `ttl` from now. Answers `Ok` at
    /// once, changing nothing, if the record is already completed under `token` (a retry whose
    /// first attempt applied). Otherwise refused with [`StoreError::Fenced`] unless the record
    /// is in progress under `token` (a store may treat a claim whose lease has passed as gone,
    /// but must refuse once another token holds it). A value over
    /// [`max_value_size`](Self::max_value_size) is refused with [`StoreError::TooLarge`].
    /// Wakes the key's waiters.
    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Removes the in-progress record held under `token`, so that the next claim acquires at
    /// once, and wakes the key's waiters. A record that is absent, completed, or held under
    /// another token is left as it is and the answer is still `Ok` (a repeated release, or one
    /// that comes after the lease was taken over): release never removes someone else's claim
    /// or a completed record, and never fails for that.
    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError>;

    /// Extends the lease of the claim held under `token` to `lease` from now, and counts the
    /// renewal (for [`ClaimTimes::renewals`], written by the same step). Refused with
    /// [`StoreError::Fenced`] if the record is not in progress under `token`.
    async fn renew(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError>;

    /// Reads the record: `None` when absent or expired (an in-progress record whose lease
    /// has passed also reads as `None`). An in-progress record reports its [`ClaimTimes`]
    /// (the claim's age, the lease left and the renewals), read in the same step; a store that
    /// keeps none of them answers [`ClaimTimes::UNKNOWN`].
    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError>;

    /// Waits until the record is not in progress under a live lease (completed, released,
    /// removed or lapsed), or until `timeout` passes, whichever is first. Returns at once if it
    /// is not in progress now. It must not miss a completion that happens while it starts
    /// (subscribe first, then look). Spurious early returns are allowed: the caller claims
    /// again. Waiting must be cheap: no blocked thread, and a notification rather than a tight
    /// poll where the backend has one.
    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError>;

    /// Removes the record whatever its state (administration and tests).
    async fn remove(&self, key: &Key) -> Result<(), StoreError>;

    /// Releases the claim held under `token` from a synchronous context — the runtime calls it
    /// when the caller's future is dropped mid-body. It must not block. The default spawns
    /// [`release`](Self::release) on the current tokio runtime through
    /// [`detached`](Self::detached); if neither works, the claim is freed when its lease
    /// passes.
    fn release_detached(&self, key: Key, token: FencingToken) {
        let (Some(store), Ok(rt)) = (self.detached(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        rt.spawn(async move {
            if let Err(e) = store.release(&key, token).await {
                tracing::warn!(target: "idem", %key, error = %e, "detached release failed; the claim lapses with its lease");
            }
        });
    }

    /// An owned handle to this store (a cheap clone sharing its connections), that the
    /// runtime moves into a spawned task to finish a completion or a release after the
    /// caller's future was dropped (once the body has returned, its completion runs to its
    /// end). `None` (the default) means the store cannot be detached: a
    /// completion cut short by a dropped caller is then left to the lease.
    fn detached(&self) -> Option<Arc<dyn Store>> {
        None
    }

    /// The largest encoded value this store accepts, in bytes. Default: 1 MiB.
    fn max_value_size(&self) -> usize {
        DEFAULT_MAX_VALUE_SIZE
    }

    /// A synchronous look for a live completed record that this process already holds (the
    /// memory store, or `TieredStore`'s local tier), tried by the runtime before anything
    /// else so that a replay costs no future, no span and no claim. The record is lent to
    /// `visit` while the store holds it (no copy, no allocation: the runtime checks and
    /// decodes it in place); the answer is whether `visit` was called. It must never lend a
    /// record past its expiry, nor block or do I/O; and `visit` runs the caller's decoding
    /// (user `Deserialize` code), so a store calls it holding no lock. Default: nothing
    /// (always ask [`claim`](Self::claim)). This is the one to implement;
    /// [`completed_now`](Self::completed_now) is built on it.
    ///
    /// ```
    /// use idem_core::{CompletedRef, Key, Store};
    /// # async fn demo(store: &dyn Store, key: Key) {
    /// let mut size = None;
    /// let found = store.visit_completed_now(&key, &mut |r: CompletedRef<'_>| size = Some(r.value.len()));
    /// assert_eq!(found, size.is_some());
    /// # }
    /// ```
    fn visit_completed_now(&self, key: &Key, visit: &mut dyn FnMut(CompletedRef<'_>)) -> bool {
        let _ = (key, visit);
        false
    }

    /// [`visit_completed_now`](Self::visit_completed_now)'s record as an owned copy, for a
    /// caller that keeps it. Not meant to be overridden.
    fn completed_now(&self, key: &Key) -> Option<CompletedRecord> {
        let mut owned = None;
        self.visit_completed_now(key, &mut |r| {
            owned = Some(CompletedRecord::new(
                r.fingerprint,
                r.value.to_vec(),
                r.expires_in,
            ));
        });
        owned
    }

    /// A synchronous [`claim`](Self::claim), for a store that answers at once without I/O
    /// (the memory store): the runtime tries it first, so that such a claim costs no boxed
    /// future and no timer. `Some` is the claim's answer, with `claim`'s whole contract;
    /// `None` asks `claim`. Never blocks or does I/O. Default: `None`.
    fn claim_now(&self, req: &ClaimRequest) -> Option<Result<Claim, StoreError>> {
        let _ = req;
        None
    }

    /// A synchronous [`complete`](Self::complete), like [`claim_now`](Self::claim_now): `Some`
    /// is the completion's answer, with `complete`'s whole contract; `None` asks `complete`.
    /// Default: `None`.
    fn complete_now(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Option<Result<(), StoreError>> {
        let _ = (key, token, value, ttl);
        None
    }

    /// A short name of the backend (`"memory"`, `"redis"`, `"postgres"`, ...), the `store`
    /// label of idem's metrics. Default: `"custom"`.
    fn name(&self) -> &'static str {
        "custom"
    }

    /// Whether this store's records never leave this process: never shared with another
    /// process, never persisted past it (the memory store). Calls on such a store derive
    /// their keys and fingerprints with a fast process-local keyed hash instead of the
    /// portable digest (see [`key`](crate::key#process-local-keys)); a key then means
    /// nothing outside this process. Default: `false`. A store that answers `true` while its
    /// records are shared or persisted would give the same call a different key in each
    /// process — never do that; a wrapper forwards its inner store's answer.
    ///
    /// ```
    /// # use idem_core::Store;
    /// fn portable_keys(store: &dyn Store) -> bool {
    ///     !store.process_local()
    /// }
    /// # let _ = portable_keys;
    /// ```
    fn process_local(&self) -> bool {
        false
    }

    /// Whether this store keeps durable steps ([`load_steps`](Self::load_steps),
    /// [`put_step`](Self::put_step), [`clear_step`](Self::clear_step)). Default: `false`, and
    /// a call whose body uses a step on such a store gets a clear error instead of a silent
    /// re-run. A wrapper forwards its inner store's answer.
    fn supports_steps(&self) -> bool {
        false
    }

    /// Reads every live (unexpired) step record of the call `key`, in one step (one round
    /// trip for a remote store), whatever the state of the call's own record: a call that
    /// was released (its body returned `Err`, or its holder died) keeps its finished steps, so
    /// that the next execution resumes after them. Any order. An empty list when there are
    /// none.
    async fn load_steps(&self, key: &Key) -> Result<Vec<StepRecord>, StoreError> {
        let _ = key;
        Err(StoreError::Unsupported("durable steps"))
    }

    /// Writes one step record of the call `key`, atomically and fenced like
    /// [`complete`](Self::complete): only while the call's record is in progress under `token`
    /// — otherwise [`StoreError::Fenced`] and nothing is written (a holder that lost its lease
    /// cannot write a step). A record with the same [`StepId`] is replaced (an at-most-once
    /// step's `Started` becomes `Done`). The step record lives at least `ttl` from now (the
    /// call's TTL); a store may keep a call's step records together until the latest one's
    /// expiry (the runtime writes every step of a call with the same TTL). It is removed with
    /// the call's record by [`remove`](Self::remove); completing or
    /// releasing the call leaves it as it is. A value over
    /// [`max_value_size`](Self::max_value_size) is refused with [`StoreError::TooLarge`].
    /// Repeatable: writing the same record twice leaves one. A remote store keeps the step
    /// records where the call's record is (one Redis cluster slot, one database).
    async fn put_step(
        &self,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let _ = (key, token, step, ttl);
        Err(StoreError::Unsupported("durable steps"))
    }

    /// Removes one step record of the call `key`, fenced like [`put_step`](Self::put_step)
    /// (an at-most-once step whose body returned an `Err` it did not store: it is known not
    /// to have finished, so the next execution may run it again). Absent → `Ok`.
    async fn clear_step(
        &self,
        key: &Key,
        token: FencingToken,
        id: &StepId,
    ) -> Result<(), StoreError> {
        let _ = (key, token, id);
        Err(StoreError::Unsupported("durable steps"))
    }
}

/// A store whose records live in a database that can also hold the body's own writes, so that
/// the body's statements and the completion record commit in one transaction (transactional
/// mode; used by [`Call::run_in_transaction`](crate::Call::run_in_transaction)
/// and [`Call::run_within`](crate::Call::run_within)).
///
/// The claim stays a short statement of its own ([`Store::claim`]), so that duplicates see it
/// at once and wait. The completion is written inside the transaction and becomes visible, and
/// wakes waiters, only when the transaction commits; a rolled-back transaction leaves the
/// claim in progress under its token and no value anywhere.
#[diagnostic::on_unimplemented(
    message = "`{Self}` has no transactions: transactional mode needs a SQL store (`PostgresStore`, `MySqlStore`, `SqliteStore`)",
    label = "not a store with transactions",
    note = "remove `transaction`/`in_transaction` to run without one, or use a SQL store whose database also holds the body's writes"
)]
#[async_trait]
pub trait TransactionalStore: Store {
    /// The open transaction the body runs its statements in (for the sqlx stores, a
    /// `sqlx::Transaction<'static, DB>`). Dropping it without [`commit`](Self::commit) must
    /// roll it back, as sqlx's does.
    type Tx: Send;

    /// Opens a transaction on the store's database.
    async fn begin(&self) -> Result<Self::Tx, StoreError>;

    /// Writes the completion inside `tx`, fenced by the token: the record becomes completed
    /// with `value` (expiring `ttl` after the commit's clock, or near it) only if it is in
    /// progress under `token` — otherwise [`StoreError::Fenced`], and the caller rolls back.
    /// A store with notifications queues the wake-up inside the transaction, so that waiters
    /// are woken at commit and never by a value that is rolled back.
    async fn complete_in(
        &self,
        tx: &mut Self::Tx,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Commits `tx`. If the reply is lost, the runtime finds out what happened by claiming
    /// again with its own token (in progress under it: rolled back; completed: committed).
    async fn commit(&self, tx: Self::Tx) -> Result<(), StoreError>;

    /// Writes a step record inside `tx`, fenced by `token` like [`Store::put_step`]: the step's
    /// own statements and its record commit together (a transactional step runs exactly
    /// once). [`StoreError::Fenced`] when the call's record is not in progress under
    /// `token`; the caller then rolls back. Default: unsupported.
    async fn put_step_in(
        &self,
        tx: &mut Self::Tx,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let _ = (tx, key, token, step, ttl);
        Err(StoreError::Unsupported("transactional steps"))
    }
}

// `store = self.db` with an `Arc<PostgresStore>` field (or a `&` or `Box` of one) works in
// transactional mode too.
macro_rules! forward_transactional_store {
    ($($ty:ty),*) => {$(
        #[async_trait]
        impl<S: TransactionalStore> TransactionalStore for $ty {
            type Tx = S::Tx;
            async fn begin(&self) -> Result<Self::Tx, StoreError> {
                (**self).begin().await
            }
            async fn complete_in(
                &self,
                tx: &mut Self::Tx,
                key: &Key,
                token: FencingToken,
                value: &[u8],
                ttl: Duration,
            ) -> Result<(), StoreError> {
                (**self).complete_in(tx, key, token, value, ttl).await
            }
            async fn commit(&self, tx: Self::Tx) -> Result<(), StoreError> {
                (**self).commit(tx).await
            }
            async fn put_step_in(
                &self,
                tx: &mut Self::Tx,
                key: &Key,
                token: FencingToken,
                step: &StepRecord,
                ttl: Duration,
            ) -> Result<(), StoreError> {
                (**self).put_step_in(tx, key, token, step, ttl).await
            }
        }
    )*};
}

forward_transactional_store!(&S, Arc<S>, Box<S>);

/// The default limit on an encoded value: 1 MiB.
pub const DEFAULT_MAX_VALUE_SIZE: usize = 1 << 20;

/// The future a store method returns once `async_trait` has desugared it.
type StoreFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'a>>;

// Forwarding impls hand back the inner store's future as it is, instead of boxing a second
// future around it: `store = self.store` with an `Arc<S>` field costs no extra allocation.
macro_rules! forward_store {
    ($($ty:ty),*) => {$(
        impl<S: Store + ?Sized> Store for $ty {
            fn claim<'a, 'b, 'f>(&'a self, req: &'b ClaimRequest) -> StoreFuture<'f, Claim>
            where
                'a: 'f,
                'b: 'f,
                Self: 'f,
            {
                (**self).claim(req)
            }
            fn complete<'a, 'b, 'c, 'f>(
                &'a self,
                key: &'b Key,
                token: FencingToken,
                value: &'c [u8],
                ttl: Duration,
            ) -> StoreFuture<'f, ()>
            where
                'a: 'f,
                'b: 'f,
                'c: 'f,
                Self: 'f,
            {
                (**self).complete(key, token, value, ttl)
            }
            fn release<'a, 'b, 'f>(&'a self, key: &'b Key, token: FencingToken) -> StoreFuture<'f, ()>
            where
                'a: 'f,
                'b: 'f,
                Self: 'f,
            {
                (**self).release(key, token)
            }
            fn renew<'a, 'b, 'f>(
                &'a self,
                key: &'b Key,
                token: FencingToken,
                lease: Duration,
            ) -> StoreFuture<'f, ()>
            where
                'a: 'f,
                'b: 'f,
                Self: 'f,
            {
                (**self).renew(key, token, lease)
            }
            fn get<'a, 'b, 'f>(&'a self, key: &'b Key) -> StoreFuture<'f, Option<RecordState>>
            where
                'a: 'f,
                'b: 'f,
                Self: 'f,
            {
                (**self).get(key)
            }
            fn wait<'a, 'b, 'f>(&'a self, key: &'b Key, timeout: Duration) -> StoreFuture<'f, ()>
            where
                'a: 'f,
                'b: 'f,
                Self: 'f,
            {
                (**self).wait(key, timeout)
            }
            fn remove<'a, 'b, 'f>(&'a self, key: &'b Key) -> StoreFuture<'f, ()>
            where
                'a: 'f,
                'b: 'f,
                Self: 'f,
            {
                (**self).remove(key)
            }
            fn release_detached(&self, key: Key, token: FencingToken) {
                (**self).release_detached(key, token)
            }
            fn detached(&self) -> Option<Arc<dyn Store>> {
                (**self).detached()
            }
            fn max_value_size(&self) -> usize {
                (**self).max_value_size()
            }
            fn visit_completed_now(
                &self,
                key: &Key,
                visit: &mut dyn FnMut(CompletedRef<'_>),
            ) -> bool {
                (**self).visit_completed_now(key, visit)
            }
            fn claim_now(&self, req: &ClaimRequest) -> Option<Result<Claim, StoreError>> {
                (**self).claim_now(req)
            }
            fn complete_now(
                &self,
                key: &Key,
                token: FencingToken,
                value: &[u8],
                ttl: Duration,
            ) -> Option<Result<(), StoreError>> {
                (**self).complete_now(key, token, value, ttl)
            }
            fn name(&self) -> &'static str {
                (**self).name()
            }
            fn process_local(&self) -> bool {
                (**self).process_local()
            }
            fn supports_steps(&self) -> bool {
                (**self).supports_steps()
            }
            fn load_steps<'a, 'b, 'f>(&'a self, key: &'b Key) -> StoreFuture<'f, Vec<StepRecord>>
            where
                'a: 'f,
                'b: 'f,
                Self: 'f,
            {
                (**self).load_steps(key)
            }
            fn put_step<'a, 'b, 'c, 'f>(
                &'a self,
                key: &'b Key,
                token: FencingToken,
                step: &'c StepRecord,
                ttl: Duration,
            ) -> StoreFuture<'f, ()>
            where
                'a: 'f,
                'b: 'f,
                'c: 'f,
                Self: 'f,
            {
                (**self).put_step(key, token, step, ttl)
            }
            fn clear_step<'a, 'b, 'c, 'f>(
                &'a self,
                key: &'b Key,
                token: FencingToken,
                id: &'c StepId,
            ) -> StoreFuture<'f, ()>
            where
                'a: 'f,
                'b: 'f,
                'c: 'f,
                Self: 'f,
            {
                (**self).clear_step(key, token, id)
            }
        }
    )*};
}

forward_store!(&S, Arc<S>, Box<S>);

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}
