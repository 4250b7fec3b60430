//! The execute loop: claim → replay | wait | reject | execute → complete | release.
//!
//! [`Call`] is the one entry point. `#[idempotent]` expands to a `Call` built from the
//! attribute's arguments and a `run` of the function's body; it can be used by hand too.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

// tokio's clock, so that a test under `tokio::time::pause()` moves leases and deadlines too.
use tokio::time::Instant;

use serde::{de::DeserializeOwned, Serialize};
use tracing::Instrument;

use crate::codec::{self, Codec, MsgPack};
use crate::error::{CodecError, Error, StoreError};
use crate::key::{self, Identity};
use crate::namespace::{Collision, Site};
use crate::observe::{emit, Outcome};
use crate::options::{MissingKey, OnConflict, Options};
use crate::shutdown::{Claiming, Stage, Tracked};
use crate::store::{Claim, ClaimRequest, FencingToken, Key, RecordState, Store};

tokio::task_local! {
    static CURRENT_KEY: Key;
}

/// The hashed key of the idempotent call whose body is running, if any.
///
/// Pass it (or something derived from it) as the idempotency key of a downstream API, so that
/// a retry after a crash between the remote side effect and the completion write is
/// deduplicated there too.
///
/// ```
/// assert!(idem_core::current_key().is_none()); // not inside an idempotent body
/// ```
pub fn current_key() -> Option<Key> {
    CURRENT_KEY.try_with(|k| *k).ok()
}

static DEFAULT_STORE: OnceLock<Arc<dyn Store>> = OnceLock::new();

/// Sets the process default store, used by calls that name no `store`. Once per process: a
/// second call returns the store it was given back as `Err`.
///
/// ```
/// # #[derive(Debug)] struct S;
/// # #[idem_core::async_trait] impl idem_core::Store for S {
/// #  async fn claim(&self, _: &idem_core::ClaimRequest) -> Result<idem_core::Claim, idem_core::StoreError> { unimplemented!() }
/// #  async fn complete(&self, _: &idem_core::Key, _: idem_core::FencingToken, _: &[u8], _: std::time::Duration) -> Result<(), idem_core::StoreError> { unimplemented!() }
/// #  async fn release(&self, _: &idem_core::Key, _: idem_core::FencingToken) -> Result<(), idem_core::StoreError> { unimplemented!() }
/// #  async fn renew(&self, _: &idem_core::Key, _: idem_core::FencingToken, _: std::time::Duration) -> Result<(), idem_core::StoreError> { unimplemented!() }
/// #  async fn get(&self, _: &idem_core::Key) -> Result<Option<idem_core::RecordState>, idem_core::StoreError> { unimplemented!() }
/// #  async fn wait(&self, _: &idem_core::Key, _: std::time::Duration) -> Result<(), idem_core::StoreError> { unimplemented!() }
/// #  async fn remove(&self, _: &idem_core::Key) -> Result<(), idem_core::StoreError> { unimplemented!() }
/// #  fn release_detached(&self, _: idem_core::Key, _: idem_core::FencingToken) {}
/// # }
/// let store = std::sync::Arc::new(S);
/// assert!(idem_core::set_default_store(store.clone()).is_ok());
/// assert!(idem_core::set_default_store(store).is_err());
/// ```
pub fn set_default_store(store: Arc<dyn Store>) -> Result<(), Arc<dyn Store>> {
    DEFAULT_STORE.set(store)
}

/// The process default store, if one was set (a [`with_default_store`] scope is not seen
/// here; calls see it).
pub fn default_store() -> Option<&'static dyn Store> {
    DEFAULT_STORE.get().map(|s| &**s)
}

tokio::task_local! {
    static SCOPED_STORE: Arc<dyn Store>;
}

/// Runs `fut` with `store` as the default store of every call inside it that names no store
/// (in this task), in place of the process default — so that each test gets a fresh store of
/// its own while [`set_default_store`] stays once per process.
///
/// ```
/// use std::sync::Arc;
/// use idem_core::{with_default_store, Call, Error};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let call = || Call::new("docs::scoped").key("k").run_on_default(async { Ok::<_, Error>(1) });
/// let store = Arc::new(idem_stores::MemoryStore::new());
/// assert_eq!(with_default_store(store.clone(), call()).await.unwrap(), 1);
/// // Another test's fresh store knows nothing of the first one's records.
/// let other = Arc::new(idem_stores::MemoryStore::new());
/// assert_eq!(with_default_store(other, call()).await.unwrap(), 1);
/// # }
/// ```
pub async fn with_default_store<F: Future>(store: Arc<dyn Store>, fut: F) -> F::Output {
    SCOPED_STORE.scope(store, fut).await
}

/// The store a call without `store =` uses: the innermost [`with_default_store`] scope, or
/// the process default.
fn call_default_store() -> Option<DefaultStore> {
    SCOPED_STORE
        .try_with(|s| DefaultStore::Scoped(s.clone()))
        .ok()
        .or_else(|| default_store().map(DefaultStore::Process))
}

enum DefaultStore {
    Scoped(Arc<dyn Store>),
    Process(&'static dyn Store),
}

impl DefaultStore {
    fn get(&self) -> &dyn Store {
        match self {
            DefaultStore::Scoped(s) => &**s,
            DefaultStore::Process(s) => *s,
        }
    }
}

/// One idempotent call: its identity (pinned when the builder methods run, before the body
/// exists), its options and its codec.
///
/// ```
/// use idem_core::Call;
/// # async fn demo(store: &dyn idem_core::Store) -> Result<u64, idem_core::Error> {
/// let order_id = "order-42";
/// let amount = 1999u64;
/// Call::new("shop::charge")
///     .key(&order_id)
///     .fingerprint(&(&amount,))
///     .ttl(std::time::Duration::from_secs(3600))
///     .run(store, async move { Ok::<_, idem_core::Error>(amount) })
///     .await
/// # }
/// ```
#[must_use = "a Call does nothing until `run`"]
pub struct Call<C: Codec = MsgPack> {
    pub(crate) namespace: &'static str,
    /// The canonical encodings of the key material (`None`: a missing key), scope and
    /// fingerprint, hashed when the call runs and the store is known.
    pub(crate) encodings: key::Encodings,
    /// The first argument that could not be hashed, or a namespace refused at this site.
    error: Option<Pending>,
    pub(crate) options: Options,
    pub(crate) codec: C,
}

impl Call<MsgPack> {
    /// A call in `namespace`. An `#[idempotent]` function's namespace is its path (e.g.
    /// `shop::charge`, `<shop::Stripe as shop::Gateway>::pay`) unless pinned with
    /// `namespace = ".."`; a `Call` built here with the same namespace and key finds its
    /// records. Calls built with `new` are not part of the once-per-function collision check.
    #[inline]
    pub fn new(namespace: &'static str) -> Self {
        Call {
            namespace,
            encodings: key::Encodings::new(),
            error: None,
            options: Options::default(),
            codec: MsgPack,
        }
    }

    /// The call of an annotated function: in its site's namespace, or, when another
    /// function of this process already holds that namespace, a call that fails with
    /// [`Error::NamespaceCollision`] before it claims anything.
    #[inline]
    pub(crate) fn at(site: &'static Site) -> Self {
        match site.namespace() {
            Ok(namespace) => Call::new(namespace),
            Err(collision) => {
                let mut call = Call::new(collision.namespace);
                call.error = Some(Pending::Namespace(collision));
                call
            }
        }
    }
}

/// Why a call will fail when it runs, found while it was built.
enum Pending {
    /// An argument's `Serialize` impl failed.
    Fingerprint(String),
    /// The namespace belongs to another function.
    Namespace(Collision),
}

impl<C: Codec> Call<C> {
    /// The key material (a value or a reference; `&k` and `k` hash alike). A top-level
    /// `None` is a missing key.
    #[inline]
    pub fn key<K: Serialize>(mut self, key: K) -> Self {
        let recorded = self.encodings.record_key(self.namespace, &key);
        self.encodings.key = self.noted(recorded);
        self
    }

    /// The tenant or principal: the same key under two scopes never shares a record.
    #[inline]
    pub fn scope<S: Serialize>(mut self, scope: S) -> Self {
        let recorded = self.encodings.record(&scope);
        self.encodings.scope = self.noted(recorded);
        self
    }

    /// The arguments checked against the stored fingerprint (with an explicit key).
    ///
    /// By value so that a tuple of argument references (what `#[idempotent]` passes) gets a
    /// type error under the one element that is not `Serialize`.
    #[inline]
    pub fn fingerprint<F: Serialize>(mut self, args: F) -> Self {
        // `Some(..)` so that a `None` argument list is a value, not a missing key.
        let recorded = self.encodings.record(&Some(&args));
        self.encodings.fingerprint = self.noted(recorded);
        self
    }

    /// A recorded encoding, or `None` with the first failure kept for `run` to report.
    fn noted(&mut self, recorded: Result<Option<key::Span>, CodecError>) -> Option<key::Span> {
        match recorded {
            Ok(span) => span,
            Err(e) => {
                self.error
                    .get_or_insert_with(|| Pending::Fingerprint(e.to_string()));
                None
            }
        }
    }

    /// Replaces all options.
    #[inline]
    pub fn options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }

    /// How long a completed result is replayed.
    #[inline]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.options.ttl = ttl;
        self
    }

    /// How long a claim is held while the body runs (renewed every third of it).
    #[inline]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.options.lease = lease;
        self
    }

    /// Wait for, or reject, a concurrent duplicate.
    #[inline]
    pub fn on_conflict(mut self, on_conflict: OnConflict) -> Self {
        self.options.on_conflict = on_conflict;
        self
    }

    /// How long a duplicate waits for the first call.
    #[inline]
    pub fn wait_timeout(mut self, wait_timeout: Duration) -> Self {
        self.options.wait_timeout = wait_timeout;
        self
    }

    /// The record version, part of the type tag.
    #[inline]
    pub fn version(mut self, version: u32) -> Self {
        self.options.version = version;
        self
    }

    /// What a `None` key does.
    #[inline]
    pub fn missing_key(mut self, missing_key: MissingKey) -> Self {
        self.options.missing_key = missing_key;
        self
    }

    /// Run unprotected when the store cannot claim.
    pub fn fail_open(mut self, fail_open: bool) -> Self {
        self.options.fail_open = fail_open;
        self
    }

    /// A limit on encoded results below the store's own.
    pub fn max_value_size(mut self, limit: usize) -> Self {
        self.options.max_value_size = Some(limit);
        self
    }

    /// The most durable steps ([`step`](crate::step())) one execution may start (default
    /// 1,000); the next fails with [`Error::TooManySteps`].
    pub fn max_steps(mut self, limit: u32) -> Self {
        self.options.max_steps = limit;
        self
    }

    /// Encode records with another codec.
    pub fn codec<C2: Codec>(self, codec: C2) -> Call<C2> {
        Call {
            namespace: self.namespace,
            encodings: self.encodings,
            error: self.error,
            options: self.options,
            codec,
        }
    }

    /// The portable identity of this call (`Ok(None)` for a missing key): the record key and
    /// fingerprint it has in every shared store (Redis, SQL, a custom store), the same as
    /// [`Identity::derive`]'s. A store whose records never leave this process
    /// ([`Store::process_local`], the memory store) gets process-local keys instead: use
    /// [`identity_for`](Self::identity_for) to know the key a call has in a given store.
    pub fn identity(&self) -> Result<Option<Identity>, Error> {
        self.checked()?;
        Ok(self.encodings.portable(self.namespace))
    }

    /// The identity this call has in `store`: [`identity`](Self::identity) for a shared
    /// store, the process-local one for a [`Store::process_local`] store.
    ///
    /// ```
    /// # use idem_core::Call;
    /// # fn demo(memory: &dyn idem_core::Store, redis: &dyn idem_core::Store) {
    /// let call = Call::new("shop::charge").key("order-42");
    /// let in_redis = call.identity_for(redis).unwrap().unwrap();
    /// let here = call.identity_for(memory).unwrap().unwrap();
    /// # let _ = (in_redis, here);
    /// # }
    /// ```
    pub fn identity_for(&self, store: &dyn Store) -> Result<Option<Identity>, Error> {
        self.checked()?;
        Ok(self.encodings.identity_for(self.namespace, store))
    }

    fn checked(&self) -> Result<(), Error> {
        match &self.error {
            Some(Pending::Fingerprint(msg)) => {
                Err(Error::Codec(CodecError::Fingerprint(msg.clone())))
            }
            Some(Pending::Namespace(collision)) => Err((*collision).into()),
            None => Ok(()),
        }
    }

    /// Runs `body` at most once per key: `Ok` values are stored and replayed, an `Err`
    /// releases the claim so that a retry runs again.
    pub async fn run<T, E, Fut>(self, store: &dyn Store, body: Fut) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        Fut: Future<Output = Result<T, E>>,
    {
        // A replay is answered here, before any inner future is built (each would move the
        // `Call` once more).
        match self.prepare_in::<ReleaseErrors, T, E>(store) {
            Prepared::Claim(ident) => {
                self.drive::<ReleaseErrors, T, E, Fut>(store, ident, body)
                    .await
            }
            Prepared::Done(result) => result,
            Prepared::Unprotected => unprotected(body).await,
        }
    }

    /// Like [`run`](Self::run), but `Err` values are stored and replayed too
    /// (`errors = store`).
    pub async fn run_storing_errors<T, E, Fut>(self, store: &dyn Store, body: Fut) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error> + Serialize + DeserializeOwned,
        Fut: Future<Output = Result<T, E>>,
    {
        match self.prepare_in::<StoreErrors, T, E>(store) {
            Prepared::Claim(ident) => {
                self.drive::<StoreErrors, T, E, Fut>(store, ident, body)
                    .await
            }
            Prepared::Done(result) => result,
            Prepared::Unprotected => unprotected(body).await,
        }
    }

    /// [`run`](Self::run) on the process default store ([`set_default_store`]); without one,
    /// fails with [`Error::NoStore`].
    pub async fn run_on_default<T, E, Fut>(self, body: Fut) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        Fut: Future<Output = Result<T, E>>,
    {
        match call_default_store() {
            Some(store) => self.run(store.get(), body).await,
            None => {
                emit(Outcome::StoreError, self.namespace, None);
                Err(Error::NoStore.into())
            }
        }
    }

    /// [`run_storing_errors`](Self::run_storing_errors) on the process default store.
    pub async fn run_storing_errors_on_default<T, E, Fut>(self, body: Fut) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error> + Serialize + DeserializeOwned,
        Fut: Future<Output = Result<T, E>>,
    {
        match call_default_store() {
            Some(store) => self.run_storing_errors(store.get(), body).await,
            None => {
                emit(Outcome::StoreError, self.namespace, None);
                Err(Error::NoStore.into())
            }
        }
    }

    /// What every run does before it claims: check the options, derive the identity, and try
    /// the store's in-process replay.
    pub(crate) fn prepare<P, T, E>(&self, store: &dyn Store) -> Prepared<Result<T, E>>
    where
        P: Policy<T, E>,
        E: From<Error>,
    {
        let ns = self.namespace;
        if let Err(e) = self.options.validate() {
            return Prepared::Done(Err(fail(e, ns, None)));
        }
        let ident = match self.identity_for(store) {
            Ok(Some(ident)) => ident,
            Ok(None) if self.options.missing_key == MissingKey::Run => {
                tracing::warn!(target: "idem", namespace = ns, "idempotency key is None: running unprotected (missing_key = run)");
                emit(Outcome::Unprotected, ns, None);
                return Prepared::Unprotected;
            }
            Ok(None) => return Prepared::Done(Err(fail(Error::MissingKey, ns, None))),
            Err(e) => return Prepared::Done(Err(fail(e, ns, None))),
        };
        // A replay held in this process: no span, no future, no claim, and the record is
        // decoded where the store holds it.
        let mut done = None;
        store.visit_completed_now(&ident.key, &mut |record| {
            if !mismatch(ident.fingerprint, record.fingerprint) {
                let tag = P::tag(C::NAME, self.options.version);
                done = Some(replay::<P, T, E, C>(
                    &self.codec,
                    &tag,
                    record.value,
                    Outcome::Replayed,
                    ns,
                    &ident.key,
                ));
            }
        });
        if let Some(result) = done {
            return Prepared::Done(result);
        }
        Prepared::Claim(ident)
    }

    /// [`prepare`](Self::prepare) with the store's name at hand for the outcome's `store`
    /// label (what [`drive`](Self::drive) gets from `in_store`).
    #[inline]
    pub(crate) fn prepare_in<P, T, E>(&self, store: &dyn Store) -> Prepared<Result<T, E>>
    where
        P: Policy<T, E>,
        E: From<Error>,
    {
        crate::observe::in_store_now(store.name(), || self.prepare::<P, T, E>(store))
    }

    /// A prepared call that claims: its span, its store label, and the steps. The future
    /// keeps the namespace, options and codec, not the whole `Call` (its recorded encodings
    /// are spent once the identity is derived): every future that holds this one is smaller
    /// by that much, and moving futures is a large part of an in-process call's cost.
    pub(crate) fn drive<P, T, E, Fut>(
        self,
        store: &dyn Store,
        ident: Identity,
        body: Fut,
    ) -> impl Future<Output = Result<T, E>> + use<'_, P, T, E, Fut, C>
    where
        P: Policy<T, E>,
        E: From<Error>,
        Fut: Future<Output = Result<T, E>>,
    {
        let Call {
            namespace: ns,
            options: opts,
            codec,
            ..
        } = self;
        let span =
            tracing::debug_span!(target: "idem", "idem.call", namespace = ns, key = %ident.key);
        let steps = Self::drive_claimed::<P, T, E, Fut>(ns, opts, codec, store, ident, body)
            .instrument(span);
        #[cfg(feature = "metrics")]
        return crate::observe::in_store(store.name(), steps);
        #[cfg(not(feature = "metrics"))]
        steps
    }

    /// The state machine's steps, one function each: claim (and wait), execute (with the
    /// lease keeper), settle (complete or release).
    async fn drive_claimed<P, T, E, Fut>(
        ns: &'static str,
        opts: Options,
        codec: C,
        store: &dyn Store,
        ident: Identity,
        body: Fut,
    ) -> Result<T, E>
    where
        P: Policy<T, E>,
        E: From<Error>,
        Fut: Future<Output = Result<T, E>>,
    {
        let key = ident.key;
        let tag = P::tag(C::NAME, opts.version);

        let held = match claim(store, &ident, &opts, ns).await {
            Claimed::Held(held) => held,
            Claimed::Completed { record, waited } => {
                let outcome = if waited {
                    Outcome::ReplayedAfterWait
                } else {
                    Outcome::Replayed
                };
                return replay::<P, T, E, C>(&codec, &tag, &record.value, outcome, ns, &key);
            }
            Claimed::Unprotected => return unprotected(body).await,
            Claimed::Failed(e, outcome) => {
                emit(outcome, ns, Some(&key));
                return Err(E::from(e));
            }
        };
        if held.taken_over {
            tracing::info!(target: "idem", %key, "took over a claim whose lease had passed");
        }

        let result = execute(store, &held, &opts, ns, false, body).await;

        // Settle: encode, then complete or release, to the end even if the caller goes away.
        // The envelope's head, then the payload encoded after it: one buffer, which the
        // store gets as it is (room for a small payload: most results are small). Built only
        // for a result that is stored.
        let envelope = match P::encode(&codec, &result, || codec::seal_head(&tag, 64)) {
            None => {
                settle(store, &held, &opts, ns, Settle::Fail).await;
                return result;
            }
            Some(Err(e)) => {
                settle(store, &held, &opts, ns, Settle::Discard).await;
                return Err(fail(Error::Codec(e), ns, Some(&key)));
            }
            Some(Ok(envelope)) => envelope,
        };
        let limit = opts
            .max_value_size
            .map_or(store.max_value_size(), |l| l.min(store.max_value_size()));
        if envelope.len() > limit {
            settle(store, &held, &opts, ns, Settle::Discard).await;
            return Err(fail(
                Error::TooLarge {
                    size: envelope.len(),
                    limit,
                },
                ns,
                Some(&key),
            ));
        }
        match settle(store, &held, &opts, ns, Settle::Complete(envelope)).await {
            Settled::Done => result,
            Settled::Failed(e) => Err(fail(e, ns, Some(&key))),
            Settled::Replaced(record) => {
                replay::<P, T, E, C>(&codec, &tag, &record.value, Outcome::Executed, ns, &key)
            }
        }
    }
}

/// Step 5: decode a stored record as this call's result.
pub(crate) fn replay<P, T, E, C>(
    codec: &C,
    tag: &codec::TypeTag,
    record: &[u8],
    outcome: Outcome,
    ns: &'static str,
    key: &Key,
) -> Result<T, E>
where
    P: Policy<T, E>,
    E: From<Error>,
    C: Codec,
{
    let decoded = codec::open(tag, record).and_then(|payload| {
        P::decode(codec, payload).map_err(|e| match e {
            // The tags agree but the payload is not a `T`: the type changed meaning.
            e @ CodecError::Decode { .. } => Error::IncompatibleRecord {
                expected: tag.to_string(),
                found: tag.to_string(),
                source: Some(e),
            },
            e => Error::Codec(e),
        })
    });
    match decoded {
        Ok(result) => {
            emit(outcome, ns, Some(key));
            result
        }
        Err(e) => Err(fail(e, ns, Some(key))),
    }
}

/// Where [`Call::prepare`] leaves a call.
pub(crate) enum Prepared<R> {
    /// Go on and claim under this identity.
    Claim(Identity),
    /// The call is answered (a replay in this process, or an error).
    Done(R),
    /// `missing_key = run`: run the body without protection.
    Unprotected,
}

/// A claim this call holds.
pub(crate) struct Held {
    pub(crate) key: Key,
    pub(crate) token: FencingToken,
    pub(crate) taken_over: bool,
    /// When the claim that acquired was sent: the store's lease started no earlier.
    pub(crate) since: Instant,
    /// Counted for the drain until the settle is acknowledged.
    pub(crate) tracked: Tracked,
    /// The call's fingerprint: durable steps are recorded under it.
    pub(crate) fingerprint: Option<crate::Fingerprint>,
}

pub(crate) enum Claimed {
    Held(Held),
    Completed {
        record: crate::CompletedRecord,
        waited: bool,
    },
    /// `fail_open`: the store could not be reached; run without protection.
    Unprotected,
    /// The call ends here with this error, counted under this outcome.
    Failed(Error, Outcome),
}

/// How many times a claim is sent when the store fails (same token each time, so a claim that
/// applied but lost its reply is recognised as ours).
const CLAIM_ATTEMPTS: u32 = 3;
/// The least time a claim after a wait is given, however little of the wait is left.
const MIN_CLAIM_BUDGET: Duration = Duration::from_millis(50);
/// How many times a completion is sent (same token; a completion that applied but lost its
/// reply answers `Ok` the second time).
const COMPLETE_ATTEMPTS: u32 = 5;

/// The longest pause between two claim attempts of a caller that waited.
const WAITER_CLAIM_PAUSE: Duration = Duration::from_millis(200);

/// The pause before claim attempt `attempt + 1` after a transient failure, or `None` when
/// the failure is the answer. A caller that has not waited gets [`CLAIM_ATTEMPTS`] attempts:
/// it fails fast with the store's error. A caller that waited (`left`: what is left of its
/// `wait_timeout`) was granted that long to get its answer, and a store that fails now and
/// then (a connection cut and re-opened) must not cut it short: it tries again, pausing up
/// to [`WAITER_CLAIM_PAUSE`], as long as a claim still fits in what is left (a wait with no
/// end gets [`CLAIM_ATTEMPTS`] attempts, like a caller that has not waited).
fn claim_retry_pause(attempt: u32, left: Option<Duration>) -> Option<Duration> {
    let pause = Duration::from_millis(10 << (2 * attempt.min(4)));
    match left {
        None => (attempt < CLAIM_ATTEMPTS).then_some(pause),
        Some(left) => {
            let pause = pause.min(WAITER_CLAIM_PAUSE);
            (left > pause + MIN_CLAIM_BUDGET).then_some(pause)
        }
    }
}

/// A share of the lease, never below 5 ms: half of it bounds a release, a quarter is how
/// long the lease keeper waits on a renewal before it sends another beside it. A claim, a
/// completion and a renewal are each bounded by the whole lease: on a slow link they may
/// still land in time, and the keeper covers the lease meanwhile.
pub(crate) fn budget(lease: Duration, share: u32) -> Duration {
    (lease / share).max(Duration::from_millis(5))
}

/// Runs one store operation under a time budget. The first poll is free of timers, so an
/// in-process store that answers at once costs no timer registration.
pub(crate) async fn bounded<T>(
    op: Op<'_>,
    budget: Duration,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    #[cfg(feature = "metrics")]
    let started = Instant::now();
    let mut fut = pin!(fut);
    let r = match std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        Poll::Ready(r) => r,
        Poll::Pending => match tokio::time::timeout(budget, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(budget)),
        },
    };
    #[cfg(feature = "metrics")]
    crate::telemetry::store_op(op.0, op.1.name(), started.elapsed());
    let _ = op;
    r
}

/// A store's synchronous answer ([`Store::claim_now`], [`Store::complete_now`]), timed for
/// the metrics like [`bounded`] when there is one.
#[inline]
fn now<T>(op: Op<'_>, f: impl FnOnce() -> Option<T>) -> Option<T> {
    #[cfg(feature = "metrics")]
    let started = Instant::now();
    let r = f();
    #[cfg(feature = "metrics")]
    if r.is_some() {
        crate::telemetry::store_op(op.0, op.1.name(), started.elapsed());
    }
    let _ = op;
    r
}

/// Reports the time since its start when dropped (metrics).
#[cfg(feature = "metrics")]
struct Timer<F: FnMut(Duration)>(Instant, F);

#[cfg(feature = "metrics")]
impl<F: FnMut(Duration)> Drop for Timer<F> {
    fn drop(&mut self) {
        (self.1)(self.0.elapsed());
    }
}

/// A store operation's name and store, for metrics.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) struct Op<'a>(pub(crate) &'static str, pub(crate) &'a dyn Store);

fn transient(e: &StoreError) -> bool {
    matches!(e, StoreError::Timeout(_) | StoreError::Backend { .. })
}

/// Step 1: claim, and on conflict wait and claim again, until this call holds the key or has
/// its answer.
pub(crate) async fn claim(
    store: &dyn Store,
    ident: &Identity,
    opts: &Options,
    ns: &'static str,
) -> Claimed {
    let key = ident.key;
    let deadline = Instant::now().checked_add(opts.wait_timeout);
    let mut waited = false;
    loop {
        // Counted for the drain from before the claim is sent (listed only if it acquires);
        // refused once the drain has started.
        let claiming = match Claiming::start(ns, key) {
            Ok(claiming) => claiming,
            // Boxed: a rare path, which would otherwise grow every call's future.
            Err(e) => return Box::pin(refused_while_draining(store, ident, opts, e, waited)).await,
        };
        let token = next_token();
        let req = ClaimRequest {
            key,
            fingerprint: ident.fingerprint,
            token,
            lease: opts.lease,
        };
        // If the caller goes away while the claim is in flight, a claim that applied is
        // released instead of blocking the key for a lease.
        let mut guard = ReleaseOnDrop {
            store,
            key,
            token,
            namespace: ns,
            outcome: Outcome::Cancelled,
            armed: true,
        };
        let since = claiming.since();
        let mut attempt = 1;
        #[cfg(feature = "metrics")]
        let claim_timer = Timer(since, |took| crate::telemetry::claim(ns, took));
        let answer = loop {
            // A caller that waited is answered within its wait_timeout: its claims get what
            // is left of it (a claim may queue behind a stalled commit's lock).
            let left = deadline
                .filter(|_| waited)
                .map(|d| d.saturating_duration_since(Instant::now()));
            let limit = left.map_or(opts.lease, |l| opts.lease.min(l.max(MIN_CLAIM_BUDGET)));
            // A store that answers at once does, without a future.
            let answer = match now(Op("claim", store), || store.claim_now(&req)) {
                Some(answer) => answer,
                None => bounded(Op("claim", store), limit, store.claim(&req)).await,
            };
            match answer {
                Err(e) if transient(&e) => match claim_retry_pause(attempt, left) {
                    Some(pause) => {
                        tracing::debug!(target: "idem", %key, attempt, error = %e, "claim failed; retrying with the same token");
                        tokio::time::sleep(pause).await;
                        attempt += 1;
                    }
                    None => break Err(e),
                },
                other => break other,
            }
        };
        #[cfg(feature = "metrics")]
        drop(claim_timer);
        let claim = match answer {
            Ok(claim) => claim,
            Err(e) => {
                // The claim may have applied with its reply lost: free it (a release of a
                // record that is not ours changes nothing).
                guard.outcome = Outcome::StoreError;
                guard.fire();
                if opts.fail_open && !matches!(e, StoreError::Corrupt(_)) {
                    tracing::warn!(target: "idem", namespace = ns, %key, error = %e, "store unreachable: running unprotected (fail_open)");
                    emit(Outcome::Unprotected, ns, Some(&key));
                    return Claimed::Unprotected;
                }
                let e = Error::from(e);
                let outcome = e.outcome();
                return Claimed::Failed(e, outcome);
            }
        };
        guard.armed = false;
        match claim {
            Claim::Acquired { taken_over } => {
                return Claimed::Held(Held {
                    key,
                    token,
                    taken_over,
                    since,
                    tracked: claiming.acquired(),
                    fingerprint: ident.fingerprint,
                });
            }
            Claim::Completed(record) => {
                if mismatch(ident.fingerprint, record.fingerprint) {
                    return Claimed::Failed(Error::KeyReused, Outcome::KeyReused);
                }
                return Claimed::Completed { record, waited };
            }
            Claim::InProgress {
                fingerprint,
                lease_remaining,
            } => {
                // A waiter holds nothing: the drain does not wait for it.
                drop(claiming);
                if mismatch(ident.fingerprint, fingerprint) {
                    return Claimed::Failed(Error::KeyReused, Outcome::KeyReused);
                }
                let retry_after = Some(Error::retry_hint(lease_remaining));
                if opts.on_conflict == OnConflict::Reject {
                    return Claimed::Failed(Error::InProgress { retry_after }, Outcome::InProgress);
                }
                let now = Instant::now();
                let left = deadline.map_or(opts.wait_timeout, |d| d.saturating_duration_since(now));
                if left.is_zero() {
                    return Claimed::Failed(
                        Error::InProgress { retry_after },
                        Outcome::WaitTimeout,
                    );
                }
                // Wake up at the latest when the holder's lease passes, to take it over.
                let wait_for = match lease_remaining {
                    Some(l) => left.min(l + Duration::from_millis(1)),
                    None => left,
                };
                tracing::debug!(target: "idem", %key, ?wait_for, "waiting for the call in progress");
                let wait_started = Instant::now();
                #[cfg(feature = "metrics")]
                let _timer = Timer(wait_started, |took| crate::telemetry::wait(ns, took));
                // A caller dropped while it waits holds nothing; it still ends as `Cancelled`.
                let cancelled = CountOnDrop(Some((Outcome::Cancelled, ns, key)));
                match store.wait(&key, wait_for).await {
                    Ok(()) => {}
                    // A failed wait is an early return: pause, then claim again (the claim
                    // reports the store's failure if it lasts).
                    Err(e) if transient(&e) => {
                        tracing::debug!(target: "idem", %key, error = %e, "wait failed; claiming again");
                        let pause = Duration::from_millis(20).min(left);
                        tokio::time::sleep(pause).await;
                    }
                    Err(e) => {
                        cancelled.disarm();
                        let e = Error::from(e);
                        let outcome = e.outcome();
                        return Claimed::Failed(e, outcome);
                    }
                }
                // A store may wake spuriously; never spin on claim while the holder runs.
                if waited && wait_started.elapsed() < Duration::from_millis(1) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                cancelled.disarm();
                waited = true;
            }
        }
    }
}

/// A claim refused because the process drains. A look (no claim) still answers a call whose
/// record is completed — a retry of a finished call, or a caller that waited for a holder that
/// completed meanwhile; others get the refusal.
async fn refused_while_draining(
    store: &dyn Store,
    ident: &Identity,
    opts: &Options,
    e: Error,
    waited: bool,
) -> Claimed {
    let look = bounded(
        Op("get", store),
        budget(opts.lease, 2),
        store.get(&ident.key),
    )
    .await;
    if let Ok(Some(RecordState::Completed(record))) = look {
        if mismatch(ident.fingerprint, record.fingerprint) {
            return Claimed::Failed(Error::KeyReused, Outcome::KeyReused);
        }
        return Claimed::Completed { record, waited };
    }
    let outcome = e.outcome();
    Claimed::Failed(e, outcome)
}

/// A body run without protection (`fail_open`, `missing_key = run`): its durable steps run
/// their futures and record nothing.
pub(crate) async fn unprotected<Fut: Future>(body: Fut) -> Fut::Output {
    crate::step::scope(crate::step::Calls::Unprotected, body).await
}

/// Step 2: run the body once, keeping the lease; a panic releases the claim and continues,
/// a dropped caller releases it from a detached task. The body's durable steps are recorded
/// under the claim (refused in a transactional call, `in_transaction`).
pub(crate) async fn execute<T, E, Fut>(
    store: &dyn Store,
    held: &Held,
    opts: &Options,
    ns: &'static str,
    in_transaction: bool,
    body: Fut,
) -> Result<T, E>
where
    Fut: Future<Output = Result<T, E>>,
{
    let guard = ReleaseOnDrop {
        store,
        key: held.key,
        token: held.token,
        namespace: ns,
        outcome: Outcome::Released,
        armed: true,
    };
    #[cfg(feature = "metrics")]
    let _timer = Timer(Instant::now(), |took| crate::telemetry::body(ns, took));
    let outcome = {
        let steps = if in_transaction {
            crate::step::Calls::InTransaction
        } else {
            crate::step::Calls::Held(crate::step::StepCtx::new(
                store,
                held.key,
                held.token,
                held.fingerprint,
                opts,
            ))
        };
        let body = pin!(crate::step::scope(steps, CURRENT_KEY.scope(held.key, body)));
        let mut body = CatchUnwind(body);
        // A body that finishes in its first poll needs no renewal timer.
        match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll(cx))).await {
            Poll::Ready(r) => r,
            Poll::Pending => {
                let keeper = pin!(keep_lease(
                    store, held.key, held.token, opts.lease, held.since
                ));
                tokio::select! {
                    biased;
                    r = body => r,
                    never = keeper => match never {},
                }
            }
        }
    };
    guard.disarm();
    match outcome {
        Ok(result) => result,
        Err(panic) => {
            // Boxed: a rare path, which would otherwise grow every call's future.
            Box::pin(settle(store, held, opts, ns, Settle::Release)).await;
            std::panic::resume_unwind(panic);
        }
    }
}

/// What step 3 does with the claim.
#[derive(Clone)]
pub(crate) enum Settle {
    /// Store this envelope as the result.
    Complete(Vec<u8>),
    /// Free the key so that a retry runs again.
    Release,
    /// Free the key after the body returned `Err`: a release counted as `failed`.
    Fail,
    /// Free the key; the caller counts the call with its own outcome (`too_large`, ...).
    Discard,
}

impl Settle {
    /// The outcome a release counts, if it counts one.
    fn released(&self) -> Option<Outcome> {
        match self {
            Settle::Fail => Some(Outcome::Failed),
            Settle::Release => Some(Outcome::Released),
            Settle::Discard | Settle::Complete(_) => None,
        }
    }
}

pub(crate) enum Settled {
    Done,
    Failed(Error),
    /// The completion failed, and the store holds another execution's result: the caller
    /// gets that one, so that callers agree.
    Replaced(crate::CompletedRecord),
}

/// Step 3: complete or release, with retries, keeping the lease until the store acknowledges.
/// If the caller's future is dropped meanwhile, the same work finishes in a detached task.
pub(crate) async fn settle(
    store: &dyn Store,
    held: &Held,
    opts: &Options,
    ns: &'static str,
    action: Settle,
) -> Settled {
    held.tracked.set(Stage::Settling);
    // A store that completes at once: no lease keeper, no guard, no future. Anything but
    // success or fencing goes the whole way below (which asks again, with the same token).
    if let Settle::Complete(envelope) = &action {
        let answer = now(Op("complete", store), || {
            store.complete_now(&held.key, held.token, envelope, opts.ttl)
        });
        match answer {
            Some(Ok(())) => {
                #[cfg(feature = "metrics")]
                crate::telemetry::record_size(ns, envelope.len());
                let outcome = if held.taken_over {
                    Outcome::TakenOver
                } else {
                    Outcome::Executed
                };
                emit(outcome, ns, Some(&held.key));
                return Settled::Done;
            }
            Some(Err(StoreError::Fenced)) => return Settled::Failed(Error::LeaseLost),
            _ => {}
        }
    }
    // Boxed: a store that completes at once (above) never builds this future, and its size
    // (the lease keeper and the retries) would otherwise be part of every call's future.
    Box::pin(settle_kept(store, held, opts, ns, action)).await
}

/// [`settle`] through the store's futures, keeping the lease until the store acknowledges.
async fn settle_kept(
    store: &dyn Store,
    held: &Held,
    opts: &Options,
    ns: &'static str,
    action: Settle,
) -> Settled {
    // Borrows only: the options and the envelope are copied for a detached task only if the
    // caller is dropped, not on every call.
    let mut guard = SettleOnDrop {
        store,
        held,
        opts,
        namespace: ns,
        action: &action,
        armed: true,
    };
    let keeper = pin!(keep_lease(
        store, held.key, held.token, opts.lease, held.since
    ));
    let work = pin!(settle_once(
        store,
        held.key,
        held.token,
        held.taken_over,
        opts,
        ns,
        &action
    ));
    let settled = tokio::select! {
        biased;
        r = work => r,
        never = keeper => match never {},
    };
    guard.armed = false;
    settled
}

async fn settle_once(
    store: &dyn Store,
    key: Key,
    token: FencingToken,
    taken_over: bool,
    opts: &Options,
    ns: &'static str,
    action: &Settle,
) -> Settled {
    let envelope = match action {
        Settle::Release | Settle::Fail | Settle::Discard => {
            release(store, &key, token, opts.lease).await;
            if let Some(outcome) = action.released() {
                emit(outcome, ns, Some(&key));
            }
            return Settled::Done;
        }
        Settle::Complete(envelope) => envelope,
    };
    #[cfg(feature = "metrics")]
    crate::telemetry::record_size(ns, envelope.len());
    let mut backoff = Duration::from_millis(20);
    for attempt in 1..=COMPLETE_ATTEMPTS {
        // A store that answers at once does, without a future.
        let answer = match now(Op("complete", store), || {
            store.complete_now(&key, token, envelope, opts.ttl)
        }) {
            Some(answer) => answer,
            None => {
                bounded(
                    Op("complete", store),
                    opts.lease,
                    store.complete(&key, token, envelope, opts.ttl),
                )
                .await
            }
        };
        match answer {
            Ok(()) => {
                let outcome = if taken_over {
                    Outcome::TakenOver
                } else {
                    Outcome::Executed
                };
                emit(outcome, ns, Some(&key));
                return Settled::Done;
            }
            Err(StoreError::Fenced) => return Settled::Failed(Error::LeaseLost),
            Err(StoreError::TooLarge { size, limit }) => {
                release(store, &key, token, opts.lease).await;
                return Settled::Failed(Error::TooLarge { size, limit });
            }
            Err(e) if attempt < COMPLETE_ATTEMPTS => {
                tracing::warn!(target: "idem", %key, attempt, error = %e, "completion write failed; retrying with the same token");
                tokio::time::sleep(backoff).await;
                backoff *= 3;
            }
            Err(e) => {
                tracing::error!(target: "idem", %key, error = %e, "completion write failed {COMPLETE_ATTEMPTS} times");
                return Box::pin(after_failed_completion(
                    store, key, token, envelope, opts, ns,
                ))
                .await;
            }
        }
    }
    Settled::Done
}

/// The completion could not be written. The side effect happened, so the caller gets its
/// value — unless a look at the record shows that callers would then disagree: a
/// completed record that is not ours is what every other caller gets, so this one gets it
/// too; a claim held by someone else means the lease was lost.
async fn after_failed_completion(
    store: &dyn Store,
    key: Key,
    token: FencingToken,
    envelope: &[u8],
    opts: &Options,
    ns: &'static str,
) -> Settled {
    let look = bounded(Op("get", store), opts.lease, store.get(&key)).await;
    match look {
        Ok(Some(RecordState::Completed(record))) if record.value[..] != envelope[..] => {
            Settled::Replaced(record)
        }
        Ok(Some(RecordState::InProgress { token: holder, .. })) if holder != token => {
            Settled::Failed(Error::LeaseLost)
        }
        Ok(Some(RecordState::Completed(_))) => {
            emit(Outcome::Executed, ns, Some(&key));
            Settled::Done
        }
        _ => {
            // The record stays in progress until its lease passes; a retry after that runs
            // again.
            tracing::error!(target: "idem", %key, "result not recorded: the claim lapses with its lease");
            emit(Outcome::Executed, ns, Some(&key));
            Settled::Done
        }
    }
}

/// Finishes a settle whose caller went away, on an owned handle of the store.
struct SettleOnDrop<'a> {
    store: &'a dyn Store,
    held: &'a Held,
    opts: &'a Options,
    namespace: &'static str,
    action: &'a Settle,
    /// Until the settle finished.
    armed: bool,
}

impl Drop for SettleOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (action, opts) = (self.action.clone(), self.opts.clone());
        let Held {
            key,
            token,
            taken_over,
            ..
        } = *self.held;
        let ns = self.namespace;
        // The detached task keeps the call counted for the drain until it is done.
        let tracked = self.held.tracked.clone();
        let detached = self
            .store
            .detached()
            .zip(tokio::runtime::Handle::try_current().ok());
        let Some((store, rt)) = detached else {
            match action {
                Settle::Release | Settle::Fail | Settle::Discard => {
                    self.store.release_detached(key, token);
                    if let Some(outcome) = action.released() {
                        emit(outcome, ns, Some(&key));
                    }
                }
                Settle::Complete(_) => {
                    tracing::error!(target: "idem", %key, "caller dropped during the completion and the store cannot be detached: the result may be lost, the claim lapses with its lease");
                    emit(Outcome::Executed, ns, Some(&key));
                }
            }
            return;
        };
        let name = store.name();
        rt.spawn(crate::observe::in_store(name, async move {
            let store = &*store;
            // Renew at once: how much of the lease is left is not known here.
            let since = Instant::now()
                .checked_sub(opts.lease)
                .unwrap_or_else(Instant::now);
            let keeper = pin!(keep_lease(store, key, token, opts.lease, since));
            let work = pin!(settle_once(
                store, key, token, taken_over, &opts, ns, &action
            ));
            let settled = tokio::select! {
                biased;
                r = work => r,
                never = keeper => match never {},
            };
            if let Settled::Failed(e) = settled {
                tracing::error!(target: "idem", %key, error = %e, "detached completion failed");
                emit(e.outcome(), ns, Some(&key));
            }
            drop(tracked);
        }));
    }
}

/// A fresh fencing token for one claim attempt, without a BLAKE3 hasher per call (that was
/// ~15% of a replay on `MemoryStore`; see docs/benchmarks.md): one
/// [`FencingToken::random`] per process seeds a counter whose values go through splitmix64's
/// finaliser, a bijection of `u64`. Tokens of one process are distinct (up to the dropped low
/// bit, as likely to collide as random ones); the seeds keep processes apart.
fn next_token() -> FencingToken {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| FencingToken::random().0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    FencingToken((z >> 1).max(1))
}

fn mismatch(ours: Option<crate::Fingerprint>, stored: Option<crate::Fingerprint>) -> bool {
    matches!((ours, stored), (Some(a), Some(b)) if a != b)
}

/// Counts and logs a call that ends in `e`, and converts it to the function's error type.
pub(crate) fn fail<E: From<Error>>(e: Error, namespace: &'static str, key: Option<&Key>) -> E {
    emit(e.outcome(), namespace, key);
    E::from(e)
}

/// Releases with a few retries (a release is safe to repeat); on failure the claim lapses
/// with its lease.
pub(crate) async fn release(store: &dyn Store, key: &Key, token: FencingToken, lease: Duration) {
    let mut attempt = 1;
    loop {
        match bounded(
            Op("release", store),
            budget(lease, 2),
            store.release(key, token),
        )
        .await
        {
            Ok(()) | Err(StoreError::Fenced) => return,
            Err(e) if transient(&e) && attempt < CLAIM_ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(10 << (2 * attempt))).await;
                attempt += 1;
            }
            Err(e) => {
                tracing::warn!(target: "idem", %key, error = %e, "release failed; the claim lapses with its lease");
                return;
            }
        }
    }
}

/// Keeps the claim's lease alive while the body runs and until the settle is acknowledged.
///
/// The lease is taken to run from when the last successful claim or renewal was *sent*
/// (`covered_from`), the earliest the store can have started it. A renewal is sent every
/// third of the lease. A renewal that is slow is not cancelled — on a slow link it may still
/// land in time — but hedged: after a quarter of the lease without an answer, or right after
/// a failure (following a short pause), another one is sent beside it, up to
/// [`RENEWALS_IN_FLIGHT`] at once, each bounded by the lease. So a holder that reaches its
/// store at least once per `lease/3` never loses its claim, and a round trip of up to most of
/// the lease still renews it.
pub(crate) async fn keep_lease(
    store: &dyn Store,
    key: Key,
    token: FencingToken,
    lease: Duration,
    covered_from: Instant,
) -> std::convert::Infallible {
    let period = (lease / 3).max(Duration::from_millis(1));
    let hedge_after = budget(lease, 4);
    let pause = (lease / 30).clamp(Duration::from_millis(1), Duration::from_millis(250));
    let mut next = covered_from + period;
    let mut in_flight: Vec<(Instant, Renewal<'_>)> = Vec::with_capacity(RENEWALS_IN_FLIGHT);
    loop {
        let can_send = in_flight.len() < RENEWALS_IN_FLIGHT;
        let answered = std::future::poll_fn(|cx| {
            for i in 0..in_flight.len() {
                if let Poll::Ready(r) = in_flight[i].1.as_mut().poll(cx) {
                    let (sent, _) = in_flight.swap_remove(i);
                    return Poll::Ready((sent, r));
                }
            }
            Poll::Pending
        });
        tokio::select! {
            biased;
            (sent, r) = answered => match r {
                Ok(()) => {
                    // Newer renewals still in flight may land later; they can only extend.
                    next = next.max(sent + period);
                    if next <= Instant::now() {
                        next = sent + period;
                    }
                }
                Err(StoreError::Fenced) => {
                    tracing::error!(target: "idem", %key, "lease lost while the body runs");
                    std::future::pending::<()>().await;
                }
                Err(e) => {
                    tracing::warn!(target: "idem", %key, error = %e, "lease renewal failed; retrying");
                    next = next.min(Instant::now() + pause);
                }
            },
            () = tokio::time::sleep_until(next), if can_send => {
                let sent = Instant::now();
                let renewal = bounded(Op("renew", store), lease, store.renew(&key, token, lease));
                in_flight.push((sent, Box::pin(renewal)));
                next = sent + hedge_after;
            }
        }
    }
}

/// One renewal in flight.
type Renewal<'a> = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;

/// How many renewals of one claim may be in flight at once (see [`keep_lease`]).
const RENEWALS_IN_FLIGHT: usize = 3;

/// Counts the call under an outcome if it is dropped while armed.
struct CountOnDrop(Option<(Outcome, &'static str, Key)>);

impl CountOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CountOnDrop {
    fn drop(&mut self) {
        if let Some((outcome, ns, key)) = self.0.take() {
            emit(outcome, ns, Some(&key));
        }
    }
}

/// Releases the claim from a detached task if the caller's future is dropped while it is
/// armed, and counts the call under `outcome`.
struct ReleaseOnDrop<'a> {
    store: &'a dyn Store,
    key: Key,
    token: FencingToken,
    namespace: &'static str,
    outcome: Outcome,
    armed: bool,
}

impl ReleaseOnDrop<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }

    /// Releases now, without counting: the caller counts the call itself.
    fn fire(&mut self) {
        self.armed = false;
        self.store.release_detached(self.key, self.token);
    }
}

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.store.release_detached(self.key, self.token);
            emit(self.outcome, self.namespace, Some(&self.key));
        }
    }
}

/// Polls a future, turning a panic into a value so that the claim can be released before the
/// panic continues.
pub(crate) struct CatchUnwind<'a, F>(pub(crate) Pin<&'a mut F>);

impl<F: Future> Future for CatchUnwind<'_, F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// What is stored, and how a record is read back.
pub(crate) trait Policy<T, E> {
    fn tag(codec: &'static str, version: u32) -> codec::TypeTag;
    /// The stored form of `result` appended to `head()`; `None`: do not store, release.
    fn encode<C: Codec>(
        codec: &C,
        result: &Result<T, E>,
        head: impl FnOnce() -> Vec<u8>,
    ) -> Option<Result<Vec<u8>, CodecError>>;
    fn decode<C: Codec>(codec: &C, payload: &[u8]) -> Result<Result<T, E>, CodecError>;
}

pub(crate) struct ReleaseErrors;

/// `value` encoded at the end of `out`.
fn encode_after<C: Codec, V: Serialize + ?Sized>(
    codec: &C,
    value: &V,
    mut out: Vec<u8>,
) -> Result<Vec<u8>, CodecError> {
    codec.encode_into(value, &mut out)?;
    Ok(out)
}

impl<T: Serialize + DeserializeOwned, E> Policy<T, E> for ReleaseErrors {
    fn tag(codec: &'static str, version: u32) -> codec::TypeTag {
        codec::TypeTag::of::<T>(codec, version)
    }
    fn encode<C: Codec>(
        codec: &C,
        result: &Result<T, E>,
        head: impl FnOnce() -> Vec<u8>,
    ) -> Option<Result<Vec<u8>, CodecError>> {
        let value = result.as_ref().ok()?;
        Some(encode_after(codec, value, head()))
    }
    fn decode<C: Codec>(codec: &C, payload: &[u8]) -> Result<Result<T, E>, CodecError> {
        codec.decode(payload).map(Ok)
    }
}

pub(crate) struct StoreErrors;

impl<T, E> Policy<T, E> for StoreErrors
where
    T: Serialize + DeserializeOwned,
    E: Serialize + DeserializeOwned,
{
    fn tag(codec: &'static str, version: u32) -> codec::TypeTag {
        codec::TypeTag::of::<Result<T, E>>(codec, version)
    }
    fn encode<C: Codec>(
        codec: &C,
        result: &Result<T, E>,
        head: impl FnOnce() -> Vec<u8>,
    ) -> Option<Result<Vec<u8>, CodecError>> {
        Some(encode_after(codec, result, head()))
    }
    fn decode<C: Codec>(codec: &C, payload: &[u8]) -> Result<Result<T, E>, CodecError> {
        codec.decode(payload)
    }
}
