//! Durable steps: a retried call resumes at its first unfinished step.
//!
//! Inside the body of an idempotent call, [`step`] runs one part of the work and records its
//! `Ok` value in the call's store, fenced by the call's token, before it returns. A later
//! execution of the same call (a retry after a crash, a takeover after the lease, a retry after
//! the call returned `Err`) gets the recorded value back without running the part again, so
//! execution resumes at the first unfinished step. docs/steps.md has the semantics.
//!
//! ```
//! use idem_core::{step, step_key, Call, Error};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Error> {
//! let store = idem_stores::MemoryStore::new();
//! let receipt = Call::new("docs::checkout")
//!     .key("order-7")
//!     .run(&store, async {
//!         let order = step("order.insert", async { Ok::<_, Error>(42u64) }).await?;
//!         let charge = step("charge", async {
//!             // A key the payment gateway deduplicates a re-run of this step with.
//!             let key = step_key().expect("inside a step");
//!             Ok::<_, Error>(format!("ch_{}", &key.to_hex()[..8]))
//!         })
//!         .await?;
//!         step("email", async { Ok::<_, Error>(()) }).at_most_once().await?;
//!         Ok::<_, Error>((order, charge))
//!     })
//!     .await?;
//! assert_eq!(receipt.0, 42);
//! # Ok(()) }
//! ```

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};
use tokio::task::futures::TaskLocalFuture;

use crate::codec::{Codec, MsgPack};
use crate::error::{CodecError, Error, StoreError};
use crate::options::Options;
use crate::runtime::{bounded, Op};
use crate::store::{
    FencingToken, Fingerprint, Key, StepId, StepRecord, StepStatus, Store, TransactionalStore,
};

tokio::task_local! {
    /// The steps of the call whose body runs in this task.
    static STEPS: Calls;
    /// The step whose future runs in this task.
    static IN_STEP: InStep;
}

/// The step context of one execution of a call's body, set by the runtime around the body.
pub(crate) enum Calls {
    /// A claimed call: steps are recorded.
    Held(StepCtx),
    /// A transactional call: steps are refused.
    InTransaction,
    /// An unprotected run (`fail_open`, `missing_key = run`): steps run their future, and
    /// nothing is recorded.
    Unprotected,
}

/// What a step needs of its call, and what the steps of one execution share.
pub(crate) struct StepCtx {
    /// An owned handle to the call's store; `None` when it keeps no steps (or cannot be
    /// detached).
    store: Option<Arc<dyn Store>>,
    store_name: &'static str,
    key: Key,
    token: FencingToken,
    fingerprint: Option<Fingerprint>,
    ttl: Duration,
    lease: Duration,
    max_steps: u32,
    max_value_size: usize,
    state: Mutex<ExecState>,
}

/// The mutable part of a [`StepCtx`].
#[derive(Default)]
struct ExecState {
    /// The next occurrence number of each step name (a short list: a body has few names).
    occurrences: Vec<(Cow<'static, str>, u32)>,
    /// Steps started in this execution.
    started: u32,
    /// The call's recorded steps, read once, by the first step that needs them.
    loaded: Option<Arc<Loaded>>,
}

/// The recorded steps of a call that belong to it (same fingerprint), by id.
type Loaded = HashMap<StepId, (StepStatus, crate::Bytes)>;

impl StepCtx {
    pub(crate) fn new(
        store: &dyn Store,
        key: Key,
        token: FencingToken,
        fingerprint: Option<Fingerprint>,
        opts: &Options,
    ) -> Self {
        let store_max = store.max_value_size();
        StepCtx {
            store: if store.supports_steps() {
                store.detached()
            } else {
                None
            },
            store_name: store.name(),
            key,
            token,
            fingerprint,
            ttl: opts.ttl,
            lease: opts.lease,
            max_steps: opts.max_steps,
            max_value_size: opts.max_value_size.map_or(store_max, |l| l.min(store_max)),
            state: Mutex::new(ExecState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ExecState> {
        // Every update is a single map or counter operation: a poisoned lock is consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Runs `body` with `calls` as its step context.
pub(crate) fn scope<F: Future>(calls: Calls, body: F) -> TaskLocalFuture<Calls, F> {
    STEPS.scope(calls, body)
}

/// The step whose future is running: its key is derived only if asked for.
struct InStep {
    call: Key,
    name: Cow<'static, str>,
    occurrence: u32,
}

impl InStep {
    // A `&Cow`, not a `&str`: cloning it keeps a `'static` name borrowed (no allocation).
    #[allow(clippy::ptr_arg)]
    fn of(call: Key, id: &StepId, name: &Cow<'static, str>) -> Self {
        InStep {
            call,
            name: name.clone(),
            occurrence: id.occurrence,
        }
    }
}

/// A stable key for the step whose future is running: derived from the call's record key, the
/// step's name and its occurrence, so it is the same on every execution of the call. Pass it
/// as the idempotency key of the downstream call the step makes (a payment gateway, a mail
/// API), so that a step re-run after a crash between the downstream effect and the step's
/// record is deduplicated there. `None` outside a step's future (call it inside the `async`
/// block given to [`step`], not while building it).
///
/// ```
/// assert!(idem_core::step_key().is_none());
/// ```
pub fn step_key() -> Option<Key> {
    IN_STEP
        .try_with(|s| derive_step_key(&s.call, &s.name, s.occurrence))
        .ok()
}

/// The key of step `name#occurrence` of the call `key`.
fn derive_step_key(key: &Key, name: &str, occurrence: u32) -> Key {
    let mut h = blake3::Hasher::new_derive_key("idem step key v1");
    h.update(&key.0);
    h.update(&(name.len() as u64).to_le_bytes());
    h.update(name.as_bytes());
    h.update(&occurrence.to_le_bytes());
    Key(*h.finalize().as_bytes())
}

/// A durable step of the running call: `fut` runs at most until it returns `Ok` once; its value
/// is recorded in the call's store (fenced by the call's token) before the step returns, and a
/// later execution of the same call returns the recorded value without running `fut`.
///
/// - **Identity**: the step's `name` and its occurrence among the steps of that name in this
///   execution (a loop of `step("line", ..)` is `line#0`, `line#1`, ...).
/// - **Errors**: an `Err` is returned and not recorded (a retry runs the step again), unless
///   the step is [`store_errors`](Step::store_errors).
/// - **Crashes**: a plain step is *at least once* (a crash after its effect and before its
///   record runs it again: use [`step_key`] downstream); [`at_most_once`](Step::at_most_once)
///   records the start first and never runs a started step again
///   ([`Error::StepInDoubt`]); [`step_in`] is exactly once on a SQL store.
/// - **Refusals** (the future is not run): outside a call [`Error::StepOutsideCall`], inside
///   another step [`Error::StepNested`], in a transactional call
///   [`Error::StepInTransaction`], on a store without steps [`Error::StepsUnsupported`], past
///   [`Options::max_steps`] [`Error::TooManySteps`]. A value over the store's
///   `max_value_size` is [`Error::TooLarge`].
///
/// Code between steps runs again on every execution: it must be deterministic or harmless.
///
/// ```
/// use idem_core::{step, Call, Error};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = idem_stores::MemoryStore::new();
/// let runs = std::sync::atomic::AtomicU32::new(0);
/// let call = |fail: bool| {
///     let runs = &runs;
///     Call::new("docs::step").key("k").run(&store, async move {
///         let a = step("a", async {
///             runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
///             Ok::<_, Error>(1u32)
///         })
///         .await?;
///         if fail {
///             return Err(Error::MissingKey); // the call fails after step `a`
///         }
///         Ok(a + 1)
///     })
/// };
/// assert!(call(true).await.is_err());
/// assert_eq!(call(false).await.unwrap(), 2); // resumed: `a` was not run again
/// assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
/// # }
/// ```
pub fn step<F, T, E>(name: impl Into<Cow<'static, str>>, fut: F) -> Step<F>
where
    F: Future<Output = Result<T, E>>,
{
    Step {
        name: name.into(),
        fut,
        at_most_once: false,
        hook: NoReconcile,
        policy: PhantomData,
    }
}

/// A durable step, built by [`step`]; `.await` it (it is [`IntoFuture`]).
#[must_use = "a step does nothing until it is awaited"]
pub struct Step<F, P = PlainErrors, H = NoReconcile> {
    name: Cow<'static, str>,
    fut: F,
    at_most_once: bool,
    hook: H,
    policy: PhantomData<fn() -> P>,
}

impl<F, P, H> Step<F, P, H> {
    /// Records the step's start before running it, so that it never runs twice: an execution
    /// that finds the step started but not finished (the previous one crashed or lost its
    /// lease inside it) does not run it and gets [`Error::StepInDoubt`] — or the answer of
    /// the [`on_in_doubt`](Self::on_in_doubt) hook. An `Err` that is not stored clears the
    /// start (the step is known not to have finished), so a retry runs it again. One more
    /// store write than a plain step.
    pub fn at_most_once(mut self) -> Self {
        self.at_most_once = true;
        self
    }

    /// Records an `Err` too (a terminal error): a later execution gets the same `Err` back
    /// without running the step. Needs `E: Serialize + DeserializeOwned`.
    pub fn store_errors(self) -> Step<F, StoredErrors, H> {
        Step {
            name: self.name,
            fut: self.fut,
            at_most_once: self.at_most_once,
            hook: self.hook,
            policy: PhantomData,
        }
    }

    /// For an [`at_most_once`](Self::at_most_once) step found started but not finished: run
    /// `hook` instead of failing with [`Error::StepInDoubt`]. The hook finds out what happened
    /// (typically by asking the downstream system about [`step_key`], which it sees as the
    /// step did) and returns the step's value — recorded as the step's result — or an `Err`,
    /// which leaves the step in doubt.
    ///
    /// ```
    /// use idem_core::{step, step_key, Error};
    /// # async fn lookup(_: idem_core::Key) -> Result<bool, Error> { Ok(true) }
    /// # async fn body() -> Result<bool, Error> {
    /// let sent = step("email", async { Ok::<_, Error>(true) })
    ///     .at_most_once()
    ///     .on_in_doubt(|| async { lookup(step_key().expect("in the step")).await })
    ///     .await?;
    /// # Ok(sent) }
    /// ```
    pub fn on_in_doubt<G>(self, hook: G) -> Step<F, P, Reconcile<G>> {
        Step {
            name: self.name,
            fut: self.fut,
            at_most_once: self.at_most_once,
            hook: Reconcile(hook),
            policy: PhantomData,
        }
    }
}

/// How a step treats its `Err` ([`PlainErrors`] or [`StoredErrors`]).
pub trait StepErrors<E> {
    /// Encodes an `Err` to record, or `None`: not recorded.
    fn encode(error: &E) -> Option<Result<Vec<u8>, CodecError>>;
    /// Decodes a recorded `Err`, or `None`: this step does not read recorded errors.
    fn decode(bytes: &[u8]) -> Option<Result<E, CodecError>>;
}

/// A step's `Err` is returned, not recorded (the default).
#[derive(Debug)]
pub struct PlainErrors;

/// A step's `Err` is recorded and returned again by later executions
/// ([`Step::store_errors`]).
#[derive(Debug)]
pub struct StoredErrors;

impl<E> StepErrors<E> for PlainErrors {
    fn encode(_: &E) -> Option<Result<Vec<u8>, CodecError>> {
        None
    }
    fn decode(_: &[u8]) -> Option<Result<E, CodecError>> {
        None
    }
}

impl<E: Serialize + DeserializeOwned> StepErrors<E> for StoredErrors {
    fn encode(error: &E) -> Option<Result<Vec<u8>, CodecError>> {
        Some(MsgPack.encode(error))
    }
    fn decode(bytes: &[u8]) -> Option<Result<E, CodecError>> {
        Some(MsgPack.decode(bytes))
    }
}

/// What an at-most-once step found in doubt does ([`NoReconcile`] or [`Reconcile`]).
pub trait InDoubt<T, E> {
    /// The hook's future.
    type Future: Future<Output = Result<T, E>>;
    /// The hook's future, or `None`: fail with [`Error::StepInDoubt`].
    fn reconcile(self) -> Option<Self::Future>;
}

/// No reconcile hook: a step in doubt fails with [`Error::StepInDoubt`].
#[derive(Debug)]
pub struct NoReconcile;

/// A reconcile hook ([`Step::on_in_doubt`]).
#[derive(Debug)]
pub struct Reconcile<G>(G);

impl<T, E> InDoubt<T, E> for NoReconcile {
    type Future = std::future::Ready<Result<T, E>>;
    fn reconcile(self) -> Option<Self::Future> {
        None
    }
}

impl<G, Fut, T, E> InDoubt<T, E> for Reconcile<G>
where
    G: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    type Future = Fut;
    fn reconcile(self) -> Option<Fut> {
        Some((self.0)())
    }
}

impl<F, T, E, P, H> IntoFuture for Step<F, P, H>
where
    F: Future<Output = Result<T, E>>,
    T: Serialize + DeserializeOwned,
    E: From<Error>,
    P: StepErrors<E>,
    H: InDoubt<T, E>,
{
    type Output = Result<T, E>;
    type IntoFuture = StepFuture<F, T, E, P, H>;

    fn into_future(self) -> Self::IntoFuture {
        StepFuture {
            name: self.name,
            fut: Some(self.fut),
            hook: Some(self.hook),
            at_most_once: self.at_most_once,
            state: State::Start,
            policy: PhantomData,
        }
    }
}

/// A boxed future of the runtime's own store work (owned, so it can finish detached).
type Work<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The future of an awaited [`Step`].
#[must_use = "futures do nothing unless polled"]
pub struct StepFuture<F, T, E, P, H: InDoubt<T, E>> {
    name: Cow<'static, str>,
    /// The step's future, until it runs.
    fut: Option<F>,
    hook: Option<H>,
    at_most_once: bool,
    state: State<F, T, E, H::Future>,
    policy: PhantomData<fn() -> P>,
}

// The step's future and the hook are moved into a `Box` before they are pinned, never pinned
// where they are: the step future itself may move.
impl<F, T, E, P, H: InDoubt<T, E>> Unpin for StepFuture<F, T, E, P, H> {}

/// The next state of a step, or its answer.
type Next<F, T, E, R> = Result<State<F, T, E, R>, Result<T, E>>;

enum State<F, T, E, R> {
    Start,
    Loading(Work<Result<Arc<Loaded>, Error>>, Running),
    /// Recording an at-most-once step's start.
    Starting(Work<Result<(), StoreError>>, Running),
    Running(Pin<Box<TaskLocalFuture<InStep, F>>>, Running),
    /// An unprotected run's future: nothing is recorded.
    Unprotected(Pin<Box<TaskLocalFuture<InStep, F>>>),
    Reconciling(Pin<Box<TaskLocalFuture<InStep, R>>>, Running),
    /// Recording how the step ended; then the result is returned.
    Recording(Work<Result<(), StoreError>>, Option<Result<T, E>>, Running),
    /// The step's answer, returned at the next turn of the poll loop.
    Ready(Result<T, E>),
    Done,
}

/// A step that passed its checks: its id, an owned view of its call, and its span.
struct Running {
    id: StepId,
    handle: Handle,
    span: tracing::Span,
    /// The outcome counted when its record is written: `ran`, or `reconciled`.
    recorded: &'static str,
}

/// What the store work of a step needs of its call (owned).
#[derive(Clone)]
struct Handle {
    store: Arc<dyn Store>,
    key: Key,
    token: FencingToken,
    fingerprint: Option<Fingerprint>,
    ttl: Duration,
    lease: Duration,
    max_value_size: usize,
}

impl Handle {
    fn store_name(&self) -> &'static str {
        self.store.name()
    }
}

/// A step that may run: its id, its call, and the call's recorded steps if already read.
struct Admitted {
    running: Running,
    loaded: Option<Arc<Loaded>>,
}

/// The checks every step makes before it touches the store, in order: in a call, not nested,
/// not in a transactional call, a store that keeps steps, under `max_steps`. `Ok(None)`: an
/// unprotected run (the future runs, nothing is recorded).
// A `&Cow`, not a `&str`: the occurrence list keeps a clone (no allocation for a `'static`
// name).
#[allow(clippy::ptr_arg)]
fn admit(name: &Cow<'static, str>) -> Result<Option<Admitted>, Error> {
    let outside = || Error::StepOutsideCall {
        step: name.to_string(),
    };
    if IN_STEP.try_with(|_| ()).is_ok() {
        return Err(Error::StepNested {
            step: name.to_string(),
        });
    }
    STEPS
        .try_with(|calls| match calls {
            Calls::Unprotected => Ok(None),
            Calls::InTransaction => Err(Error::StepInTransaction {
                step: name.to_string(),
            }),
            Calls::Held(ctx) => {
                let Some(store) = ctx.store.clone() else {
                    return Err(Error::StepsUnsupported {
                        store: ctx.store_name,
                    });
                };
                let mut state = ctx.state();
                if state.started >= ctx.max_steps {
                    return Err(Error::TooManySteps {
                        limit: ctx.max_steps,
                    });
                }
                state.started += 1;
                let occurrence = match state.occurrences.iter_mut().find(|(n, _)| n == name) {
                    Some((_, n)) => {
                        let o = *n;
                        *n += 1;
                        o
                    }
                    None => {
                        state.occurrences.push((name.clone(), 1));
                        0
                    }
                };
                let id = StepId::new(name.to_string(), occurrence);
                let span = tracing::debug_span!(target: "idem", "idem.step", step = %name, occurrence, replayed = tracing::field::Empty);
                Ok(Some(Admitted {
                    running: Running {
                        id,
                        handle: Handle {
                            store,
                            key: ctx.key,
                            token: ctx.token,
                            fingerprint: ctx.fingerprint,
                            ttl: ctx.ttl,
                            lease: ctx.lease,
                            max_value_size: ctx.max_value_size,
                        },
                        span,
                        recorded: "ran",
                    },
                    loaded: state.loaded.clone(),
                }))
            }
        })
        .unwrap_or_else(|_| Err(outside()))
}

/// Keeps the recorded steps read by one step for the next ones of the execution.
fn remember_loaded(loaded: &Arc<Loaded>) {
    let _ = STEPS.try_with(|calls| {
        if let Calls::Held(ctx) = calls {
            let mut state = ctx.state();
            if state.loaded.is_none() {
                state.loaded = Some(loaded.clone());
            }
        }
    });
}

/// Reads the call's recorded steps, in one store operation (retried on transient failures),
/// keeping those of this call's fingerprint.
async fn load(h: Handle) -> Result<Arc<Loaded>, Error> {
    let mut attempt = 1;
    let records = loop {
        match bounded(
            Op("load_steps", &*h.store),
            h.lease,
            h.store.load_steps(&h.key),
        )
        .await
        {
            Ok(records) => break records,
            Err(e) if transient(&e) && attempt < ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(10 << (2 * attempt))).await;
                attempt += 1;
            }
            Err(e) => return Err(store_error(e, &h)),
        }
    };
    let mut loaded = HashMap::with_capacity(records.len());
    for record in records {
        let Some((fingerprint, payload_at)) = open_envelope(&record.value) else {
            return Err(Error::Codec(CodecError::Corrupt(format!(
                "step record `{}` is not an idem step envelope",
                record.id
            ))));
        };
        // A step of a call with other arguments under a reused key (after a release).
        if fingerprint != h.fingerprint {
            continue;
        }
        let payload = record.value.slice(payload_at..);
        loaded.insert(record.id, (record.status, payload));
    }
    Ok(Arc::new(loaded))
}

/// How many times a step write or read is sent on transient failures (the same record each
/// time: writes are repeatable).
const ATTEMPTS: u32 = 5;

fn transient(e: &StoreError) -> bool {
    matches!(e, StoreError::Timeout(_) | StoreError::Backend { .. })
}

fn store_error(e: StoreError, h: &Handle) -> Error {
    match e {
        StoreError::Unsupported(_) => Error::StepsUnsupported {
            store: h.store_name(),
        },
        e => Error::from(e),
    }
}

/// What a step writes.
enum Write {
    Put(StepRecord),
    Clear(StepId),
}

/// One fenced step write, bounded by the lease and retried on transient failures, like the
/// completion's.
async fn write(h: Handle, what: Write) -> Result<(), StoreError> {
    let mut backoff = Duration::from_millis(20);
    let mut attempt = 1;
    loop {
        let r = match &what {
            Write::Put(record) => {
                bounded(
                    Op("put_step", &*h.store),
                    h.lease,
                    h.store.put_step(&h.key, h.token, record, h.ttl),
                )
                .await
            }
            Write::Clear(id) => {
                bounded(
                    Op("clear_step", &*h.store),
                    h.lease,
                    h.store.clear_step(&h.key, h.token, id),
                )
                .await
            }
        };
        match r {
            Err(e) if transient(&e) && attempt < ATTEMPTS => {
                tracing::warn!(target: "idem", key = %h.key, attempt, error = %e, "step write failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 3;
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// The step envelope: MessagePack `[fingerprint (bin 32) or nil, payload (bin)]`.
fn seal_envelope(fingerprint: Option<Fingerprint>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 40);
    out.push(0x92);
    match fingerprint {
        Some(fp) => {
            out.extend_from_slice(&[0xc4, 32]);
            out.extend_from_slice(&fp.0);
        }
        None => out.push(0xc0),
    }
    let len = payload.len();
    if let Ok(l) = u8::try_from(len) {
        out.extend_from_slice(&[0xc4, l]);
    } else if let Ok(l) = u16::try_from(len) {
        out.push(0xc5);
        out.extend_from_slice(&l.to_be_bytes());
    } else {
        out.push(0xc6);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// The fingerprint of a step envelope and where its payload starts; `None` if it is not one.
fn open_envelope(bytes: &[u8]) -> Option<(Option<Fingerprint>, usize)> {
    let (&head, rest) = bytes.split_first()?;
    if head != 0x92 {
        return None;
    }
    let (fingerprint, rest) = match rest.split_first()? {
        (0xc0, rest) => (None, rest),
        (0xc4, rest) if rest.first() == Some(&32) && rest.len() >= 33 => {
            (Fingerprint::from_slice(&rest[1..33]), &rest[33..])
        }
        _ => return None,
    };
    let (&kind, rest) = rest.split_first()?;
    let (len, header) = match kind {
        0xc4 => (usize::from(*rest.first()?), 1),
        0xc5 => (
            usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?])),
            2,
        ),
        0xc6 => {
            let b = rest.get(..4)?;
            (u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize, 4)
        }
        _ => return None,
    };
    if rest.len() != header + len {
        return None;
    }
    Some((fingerprint, bytes.len() - len))
}

/// The record of a step with `payload`, or `TooLarge`.
fn record(
    h: &Handle,
    id: &StepId,
    status: StepStatus,
    payload: &[u8],
) -> Result<StepRecord, Error> {
    let envelope = seal_envelope(h.fingerprint, payload);
    if envelope.len() > h.max_value_size {
        return Err(Error::TooLarge {
            size: envelope.len(),
            limit: h.max_value_size,
        });
    }
    Ok(StepRecord::new(id.clone(), status, envelope))
}

/// The `Done` record of a step whose value is `value`, encoded straight into its envelope
/// (one buffer: the payload is a `bin 32` whose length is filled in after encoding), or
/// `TooLarge`.
fn done_record<V: Serialize>(h: &Handle, id: &StepId, value: &V) -> Result<StepRecord, Error> {
    // Room for the head (40 bytes) and a small value without growing.
    let mut out = Vec::with_capacity(128);
    out.push(0x92);
    match h.fingerprint {
        Some(fp) => {
            out.extend_from_slice(&[0xc4, 32]);
            out.extend_from_slice(&fp.0);
        }
        None => out.push(0xc0),
    }
    out.extend_from_slice(&[0xc6, 0, 0, 0, 0]);
    let at = out.len();
    // The default codec's encoding (`MsgPack`: structs as maps).
    value
        .serialize(&mut rmp_serde::Serializer::new(&mut out).with_struct_map())
        .map_err(|e| {
            Error::Codec(CodecError::Encode {
                codec: MsgPack::NAME,
                source: Box::new(e),
            })
        })?;
    let len = u32::try_from(out.len() - at).unwrap_or(u32::MAX);
    if out.len() > h.max_value_size || len == u32::MAX {
        return Err(Error::TooLarge {
            size: out.len(),
            limit: h.max_value_size,
        });
    }
    out[at - 4..at].copy_from_slice(&len.to_be_bytes());
    Ok(StepRecord::new(id.clone(), StepStatus::Done, out))
}

/// Counts one step outcome (`idem_steps_total`, feature `metrics`).
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
fn count(store: &'static str, outcome: &'static str) {
    #[cfg(feature = "metrics")]
    crate::telemetry::step(store, outcome);
}

impl<F, T, E, P, H> Future for StepFuture<F, T, E, P, H>
where
    F: Future<Output = Result<T, E>>,
    T: Serialize + DeserializeOwned,
    E: From<Error>,
    P: StepErrors<E>,
    H: InDoubt<T, E>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T, E>> {
        let this = self.get_mut();
        loop {
            match std::mem::replace(&mut this.state, State::Done) {
                State::Start => match admit(&this.name) {
                    Err(e) => {
                        tracing::debug!(target: "idem", step = %this.name, error = %e, "step refused");
                        return Poll::Ready(Err(E::from(e)));
                    }
                    Ok(None) => {
                        // Unprotected: run the future as it is, nothing recorded.
                        let Some(fut) = this.fut.take() else {
                            return Poll::Ready(Err(E::from(Error::StepOutsideCall {
                                step: this.name.to_string(),
                            })));
                        };
                        let scope = InStep {
                            call: crate::current_key().unwrap_or(Key([0; 32])),
                            name: this.name.clone(),
                            occurrence: 0,
                        };
                        this.state = State::Unprotected(Box::pin(IN_STEP.scope(scope, fut)));
                    }
                    Ok(Some(Admitted { running, loaded })) => match loaded {
                        Some(loaded) => this.state = this.decide(&loaded, running),
                        None => {
                            let work = Box::pin(load(running.handle.clone()));
                            this.state = State::Loading(work, running);
                        }
                    },
                },
                State::Loading(mut work, running) => {
                    let _e = running.span.enter();
                    match work.as_mut().poll(cx) {
                        Poll::Pending => {
                            drop(_e);
                            this.state = State::Loading(work, running);
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => {
                            count(running.handle.store_name(), "store_error");
                            return Poll::Ready(Err(E::from(e)));
                        }
                        Poll::Ready(Ok(loaded)) => {
                            remember_loaded(&loaded);
                            drop(_e);
                            this.state = this.decide(&loaded, running);
                        }
                    }
                }
                State::Starting(mut work, running) => {
                    let _e = running.span.enter();
                    match work.as_mut().poll(cx) {
                        Poll::Pending => {
                            drop(_e);
                            this.state = State::Starting(work, running);
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => {
                            count(running.handle.store_name(), "store_error");
                            return Poll::Ready(Err(E::from(store_error(e, &running.handle))));
                        }
                        Poll::Ready(Ok(())) => {
                            drop(_e);
                            this.state = this.run(running);
                        }
                    }
                }
                State::Running(mut fut, running) => {
                    let _e = running.span.enter();
                    let result = match fut.as_mut().poll(cx) {
                        Poll::Pending => {
                            drop(_e);
                            this.state = State::Running(fut, running);
                            return Poll::Pending;
                        }
                        Poll::Ready(result) => result,
                    };
                    drop(_e);
                    match this.ran(result, running) {
                        Ok(state) => this.state = state,
                        Err(result) => return Poll::Ready(result),
                    }
                }
                State::Unprotected(mut fut) => match fut.as_mut().poll(cx) {
                    Poll::Pending => {
                        this.state = State::Unprotected(fut);
                        return Poll::Pending;
                    }
                    Poll::Ready(result) => return Poll::Ready(result),
                },
                State::Ready(result) => return Poll::Ready(result),
                State::Reconciling(mut fut, running) => {
                    let _e = running.span.enter();
                    let result = match fut.as_mut().poll(cx) {
                        Poll::Pending => {
                            drop(_e);
                            this.state = State::Reconciling(fut, running);
                            return Poll::Pending;
                        }
                        Poll::Ready(result) => result,
                    };
                    drop(_e);
                    match result {
                        Ok(value) => {
                            let mut running = running;
                            running.recorded = "reconciled";
                            match this.record_done(value, running) {
                                Ok(state) => this.state = state,
                                Err(result) => return Poll::Ready(result),
                            }
                        }
                        // Still in doubt: the start stays recorded.
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                State::Recording(mut work, result, running) => {
                    let _e = running.span.enter();
                    let written = match work.as_mut().poll(cx) {
                        Poll::Pending => {
                            drop(_e);
                            this.state = State::Recording(work, result, running);
                            return Poll::Pending;
                        }
                        Poll::Ready(w) => w,
                    };
                    let Some(result) = result else {
                        return Poll::Ready(Err(E::from(Error::LeaseLost)));
                    };
                    let store = running.handle.store_name();
                    return Poll::Ready(match (written, result) {
                        (Ok(()), result) => {
                            count(
                                store,
                                if result.is_ok() {
                                    running.recorded
                                } else {
                                    "failed"
                                },
                            );
                            result
                        }
                        (Err(StoreError::Fenced), _) => {
                            tracing::error!(target: "idem", step = %running.id, "step not recorded: the call's lease was lost");
                            count(store, "lease_lost");
                            Err(E::from(Error::LeaseLost))
                        }
                        (Err(e @ StoreError::TooLarge { .. }), _) => {
                            count(store, "too_large");
                            Err(E::from(Error::from(e)))
                        }
                        (Err(StoreError::Unsupported(_)), _) => {
                            Err(E::from(Error::StepsUnsupported { store }))
                        }
                        (Err(e), result) => {
                            // The step ran; its record could not be written. It is at least
                            // once: a later execution runs it again.
                            tracing::error!(target: "idem", step = %running.id, error = %e, "step record not written; a retry of the call runs the step again");
                            count(store, "store_error");
                            result
                        }
                    });
                }
                State::Done => {
                    return Poll::Ready(Err(E::from(Error::StepOutsideCall {
                        step: this.name.to_string(),
                    })))
                }
            }
        }
    }
}

impl<F, T, E, P, H> StepFuture<F, T, E, P, H>
where
    F: Future<Output = Result<T, E>>,
    T: Serialize + DeserializeOwned,
    E: From<Error>,
    P: StepErrors<E>,
    H: InDoubt<T, E>,
{
    /// What the recorded steps say about this one: replay it, fail, reconcile, or run it.
    fn decide(&mut self, loaded: &Loaded, running: Running) -> State<F, T, E, H::Future> {
        let store = running.handle.store_name();
        match loaded.get(&running.id) {
            Some((StepStatus::Done, payload)) => {
                running.span.record("replayed", true);
                let _e = running.span.enter();
                let r = MsgPack.decode::<T>(payload).map_err(Error::Codec);
                count(store, "replayed");
                tracing::debug!(target: "idem", step = %running.id, "step replayed");
                self.ready(r.map_err(E::from))
            }
            Some((StepStatus::Failed, payload)) => match P::decode(payload) {
                Some(decoded) => {
                    running.span.record("replayed", true);
                    count(store, "replayed");
                    self.ready(match decoded {
                        Ok(e) => Err(e),
                        Err(codec) => Err(E::from(Error::Codec(codec))),
                    })
                }
                // Recorded by a version that stored this step's errors: run it again.
                None => self.start(running),
            },
            Some((StepStatus::Started, _)) if self.at_most_once => {
                running.span.record("replayed", false);
                let hook = self.hook.take().and_then(InDoubt::reconcile);
                match hook {
                    Some(fut) => {
                        let scope = InStep::of(running.handle.key, &running.id, &self.name);
                        State::Reconciling(Box::pin(IN_STEP.scope(scope, fut)), running)
                    }
                    None => {
                        count(store, "in_doubt");
                        tracing::warn!(target: "idem", step = %running.id, "at-most-once step in doubt: not run again");
                        self.ready(Err(E::from(Error::StepInDoubt { step: running.id })))
                    }
                }
            }
            _ => self.start(running),
        }
    }

    /// A result to return at the next turn of the poll loop.
    fn ready(&mut self, result: Result<T, E>) -> State<F, T, E, H::Future> {
        State::Ready(result)
    }

    /// Runs the step, after recording its start if it is at most once.
    fn start(&mut self, running: Running) -> State<F, T, E, H::Future> {
        running.span.record("replayed", false);
        if !self.at_most_once {
            return self.run(running);
        }
        let started = match record(&running.handle, &running.id, StepStatus::Started, &[]) {
            Ok(r) => r,
            Err(e) => return self.ready(Err(E::from(e))),
        };
        let work = Box::pin(write(running.handle.clone(), Write::Put(started)));
        State::Starting(work, running)
    }

    fn run(&mut self, running: Running) -> State<F, T, E, H::Future> {
        let Some(fut) = self.fut.take() else {
            return self.ready(Err(E::from(Error::StepOutsideCall {
                step: self.name.to_string(),
            })));
        };
        let scope = InStep::of(running.handle.key, &running.id, &self.name);
        State::Running(Box::pin(IN_STEP.scope(scope, fut)), running)
    }

    /// The step's future returned: record how it ended.
    fn ran(&mut self, result: Result<T, E>, running: Running) -> Next<F, T, E, H::Future> {
        match result {
            Ok(value) => self.record_done(value, running),
            Err(e) => {
                let what = match P::encode(&e) {
                    Some(Ok(payload)) => {
                        match record(&running.handle, &running.id, StepStatus::Failed, &payload) {
                            Ok(r) => Write::Put(r),
                            Err(too_large) => {
                                tracing::warn!(target: "idem", step = %running.id, error = %too_large, "step error not recorded");
                                return Err(Err(e));
                            }
                        }
                    }
                    Some(Err(codec)) => {
                        tracing::warn!(target: "idem", step = %running.id, error = %codec, "step error not recorded");
                        return Err(Err(e));
                    }
                    None if self.at_most_once => Write::Clear(running.id.clone()),
                    None => {
                        count(running.handle.store_name(), "failed");
                        return Err(Err(e));
                    }
                };
                let work = Box::pin(write(running.handle.clone(), what));
                Ok(State::Recording(work, Some(Err(e)), running))
            }
        }
    }

    fn record_done(&mut self, value: T, running: Running) -> Next<F, T, E, H::Future> {
        let done = match done_record(&running.handle, &running.id, &value) {
            Ok(r) => r,
            Err(e) => {
                if matches!(e, Error::TooLarge { .. }) {
                    count(running.handle.store_name(), "too_large");
                }
                return Err(Err(E::from(e)));
            }
        };
        let work = Box::pin(write(running.handle.clone(), Write::Put(done)));
        Ok(State::Recording(work, Some(Ok(value)), running))
    }
}

impl<F, T, E, P, H: InDoubt<T, E>> Drop for StepFuture<F, T, E, P, H> {
    fn drop(&mut self) {
        // Dropped while recording a step that ran: finish the write from a detached task,
        // so that a retry does not run the step again (the write is fenced: if the call was
        // released meanwhile, it is refused and nothing is written).
        if let State::Recording(work, Some(_), running) =
            std::mem::replace(&mut self.state, State::Done)
        {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let id = running.id;
                rt.spawn(async move {
                    if let Err(e) = work.await {
                        tracing::debug!(target: "idem", step = %id, error = %e, "detached step write failed");
                    }
                });
            }
        }
    }
}

/// A transactional step on a SQL store: `body` runs its statements in a transaction that idem
/// opens on the call's store, and the step's record is written in the same transaction
/// ([`TransactionalStore::put_step_in`], fenced by the call's token) and committed with them.
/// Exactly once: a crash before the commit leaves neither the writes nor the record (the retry
/// runs the step again on a clean slate); after it, both (the retry returns the recorded
/// value without running `body`). `store` must be the call's own store.
///
/// An `Err` from `body` rolls the transaction back and is returned, not recorded. A lost lease
/// rolls back and fails with [`Error::LeaseLost`]. The refusals of [`step`] apply.
///
/// ```no_run
/// # async fn demo<S: idem_core::TransactionalStore>(store: &S) -> Result<u64, idem_core::Error> {
/// use idem_core::{step_in, Call, Error};
/// Call::new("shop::checkout")
///     .key("order-42")
///     .run(store, async {
///         let ledger_id = step_in(store, "ledger", async |tx: &mut S::Tx| {
///             // INSERT INTO ledger ... on `tx`
///             # let _ = tx;
///             Ok::<_, Error>(7u64)
///         })
///         .await?;
///         Ok::<_, Error>(ledger_id)
///     })
///     .await
/// # }
/// ```
pub async fn step_in<S, T, E, F>(
    store: &S,
    name: impl Into<Cow<'static, str>>,
    body: F,
) -> Result<T, E>
where
    S: TransactionalStore,
    T: Serialize + DeserializeOwned,
    E: From<Error>,
    F: AsyncFnOnce(&mut S::Tx) -> Result<T, E>,
{
    let name = name.into();
    let Admitted { running, loaded } = match admit(&name) {
        Ok(Some(admitted)) => admitted,
        Ok(None) => {
            // Unprotected: a plain transaction, no record.
            let mut tx = store.begin().await.map_err(|e| E::from(e.into()))?;
            let value = body(&mut tx).await?;
            store.commit(tx).await.map_err(|e| E::from(e.into()))?;
            return Ok(value);
        }
        Err(e) => return Err(E::from(e)),
    };
    let span = running.span.clone();
    tracing::Instrument::instrument(transactional(store, running, loaded, body), span).await
}

async fn transactional<S, T, E, F>(
    store: &S,
    running: Running,
    loaded: Option<Arc<Loaded>>,
    body: F,
) -> Result<T, E>
where
    S: TransactionalStore,
    T: Serialize + DeserializeOwned,
    E: From<Error>,
    F: AsyncFnOnce(&mut S::Tx) -> Result<T, E>,
{
    let h = &running.handle;
    let store_name = h.store_name();
    let loaded = match loaded {
        Some(l) => l,
        None => {
            let l = load(h.clone()).await?;
            remember_loaded(&l);
            l
        }
    };
    if let Some((StepStatus::Done, payload)) = loaded.get(&running.id) {
        running.span.record("replayed", true);
        count(store_name, "replayed");
        return MsgPack
            .decode(payload)
            .map_err(|e| E::from(Error::Codec(e)));
    }
    running.span.record("replayed", false);
    let mut tx = bounded(Op("begin", store), h.lease, store.begin())
        .await
        .map_err(|e| E::from(store_error(e, h)))?;
    let scope = InStep {
        call: h.key,
        name: Cow::Owned(running.id.name.clone()),
        occurrence: running.id.occurrence,
    };
    let value = match IN_STEP.scope(scope, body(&mut tx)).await {
        Ok(value) => value,
        Err(e) => {
            drop(tx);
            count(store_name, "failed");
            return Err(e);
        }
    };
    let done = done_record(h, &running.id, &value).map_err(E::from)?;
    let written = bounded(
        Op("put_step", store),
        h.lease,
        store.put_step_in(&mut tx, &h.key, h.token, &done, h.ttl),
    )
    .await;
    if let Err(e) = written {
        drop(tx);
        count(store_name, "store_error");
        return Err(E::from(store_error(e, h)));
    }
    match bounded(Op("commit", store), h.lease, store.commit(tx)).await {
        Ok(()) => {
            count(store_name, "ran");
            Ok(value)
        }
        Err(e) => {
            // The reply may be lost after the commit landed: the record tells.
            let landed = load(h.clone())
                .await
                .is_ok_and(|l| matches!(l.get(&running.id), Some((StepStatus::Done, _))));
            if landed {
                count(store_name, "ran");
                Ok(value)
            } else {
                count(store_name, "store_error");
                Err(E::from(store_error(e, h)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip() {
        for len in [0usize, 1, 255, 256, 65_535, 65_536, 70_000] {
            let payload = vec![7u8; len];
            for fp in [None, Some(Fingerprint([3; 32]))] {
                let env = seal_envelope(fp, &payload);
                let (back, at) = open_envelope(&env).expect("an envelope");
                assert_eq!(back, fp);
                assert_eq!(&env[at..], &payload[..]);
                // It is MessagePack: a two-element array of (nil | bin 32, bin).
                let decoded: (Option<serde_bytes_like::Bin>, serde_bytes_like::Bin) =
                    rmp_serde::from_slice(&env).expect("msgpack");
                assert_eq!(decoded.1 .0.len(), len);
                assert_eq!(decoded.0.is_some(), fp.is_some());
            }
        }
        assert!(open_envelope(b"").is_none());
        assert!(open_envelope(&[0x92, 0xc0, 0xc4, 3, 1]).is_none());
    }

    mod serde_bytes_like {
        /// Bytes deserialized from a MessagePack `bin`.
        pub(super) struct Bin(pub(super) Vec<u8>);
        impl<'de> serde::Deserialize<'de> for Bin {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = Bin;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("bytes")
                    }
                    fn visit_bytes<E>(self, v: &[u8]) -> Result<Bin, E> {
                        Ok(Bin(v.to_vec()))
                    }
                }
                d.deserialize_bytes(V)
            }
        }
    }

    #[test]
    fn done_records_are_step_envelopes() {
        let h = Handle {
            store: Arc::new(NoStore),
            key: Key([1; 32]),
            token: FencingToken(1),
            fingerprint: Some(Fingerprint([9; 32])),
            ttl: Duration::from_secs(1),
            lease: Duration::from_secs(1),
            max_value_size: 1 << 20,
        };
        let r = done_record(&h, &StepId::new("s", 0), &"abc".repeat(100)).unwrap();
        let (fp, at) = open_envelope(&r.value).unwrap();
        assert_eq!(fp, h.fingerprint);
        let back: String = MsgPack.decode(&r.value[at..]).unwrap();
        assert_eq!(back, "abc".repeat(100));
        let small = Handle {
            max_value_size: 50,
            ..h
        };
        assert!(matches!(
            done_record(&small, &StepId::new("s", 0), &"abc".repeat(100)),
            Err(Error::TooLarge { limit: 50, .. })
        ));
    }

    #[derive(Debug)]
    struct NoStore;

    #[async_trait::async_trait]
    impl Store for NoStore {
        async fn claim(&self, _: &crate::ClaimRequest) -> Result<crate::Claim, StoreError> {
            Err(StoreError::Fenced)
        }
        async fn complete(
            &self,
            _: &Key,
            _: FencingToken,
            _: &[u8],
            _: Duration,
        ) -> Result<(), StoreError> {
            Err(StoreError::Fenced)
        }
        async fn release(&self, _: &Key, _: FencingToken) -> Result<(), StoreError> {
            Ok(())
        }
        async fn renew(&self, _: &Key, _: FencingToken, _: Duration) -> Result<(), StoreError> {
            Err(StoreError::Fenced)
        }
        async fn get(&self, _: &Key) -> Result<Option<crate::RecordState>, StoreError> {
            Ok(None)
        }
        async fn wait(&self, _: &Key, _: Duration) -> Result<(), StoreError> {
            Ok(())
        }
        async fn remove(&self, _: &Key) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[test]
    fn step_keys_are_stable_and_distinct() {
        let k = Key([1; 32]);
        let a = derive_step_key(&k, "charge", 0);
        assert_eq!(a, derive_step_key(&k, "charge", 0));
        assert_ne!(a, derive_step_key(&k, "charge", 1));
        assert_ne!(a, derive_step_key(&k, "charg", 0));
        assert_ne!(a, derive_step_key(&Key([2; 32]), "charge", 0));
    }
}
