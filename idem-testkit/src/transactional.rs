//! Conformance for the transactional path ([`TransactionalStore`]): claim races,
//! fencing of a stale executor, release on `Err`, panic and drop inside the transaction,
//! duplicates that wait, and the rules of [`Call::run_within`].
//!
//! A backend proves itself with a [`TxHarness`] — its store, a business table the bodies
//! write to inside the transaction, and a way to read that table's committed rows — and the
//! [`transactional_conformance_tests!`](crate::transactional_conformance_tests) macro, which
//! stamps one test per case for [`harness::run`](crate::harness::run):
//!
//! ```ignore
//! // tests/tx_conformance.rs of a SQL backend (`harness = false` in its `[[test]]` entry)
//! idem_testkit::transactional_conformance_tests!(async {
//!     let url = idem_testkit::env_url("MY_DB_URL")?;
//!     Some(MyHarness::new(&url).await) // creates its tables
//! });
//!
//! fn main() -> std::process::ExitCode {
//!     idem_testkit::harness::run([cases(&[MY_DB])]) // MY_DB: a harness::Need
//! }
//! ```
//!
//! Every case uses fresh keys, so cases run in parallel against one server, and checks the
//! business table: after each scenario every key has exactly the rows of the attempts that
//! committed, and the record's value is the committed attempt's.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::fresh_key;
use idem_core::{
    async_trait, Call, Claim, ClaimRequest, CompletedRecord, Error, FencingToken, Key, OnConflict,
    RecordState, Store, StoreError, TransactionalStore,
};

/// The transaction type of a harness's store.
pub type TxOf<H> = <<H as TxHarness>::Store as TransactionalStore>::Tx;

/// What the transactional cases need: the store, and a business table on the same database.
#[async_trait]
pub trait TxHarness: Send + Sync + 'static {
    /// The store under test (cheap to clone).
    type Store: TransactionalStore + Clone + 'static;

    /// The store.
    fn store(&self) -> &Self::Store;

    /// Inserts one business row for `key`, marked `mark`, inside `tx`. No unique constraint:
    /// a second execution must show as a second row.
    async fn insert(&self, tx: &mut TxOf<Self>, key: &str, mark: &str) -> Result<(), StoreError>;

    /// The marks of `key`'s committed business rows.
    async fn rows(&self, key: &str) -> Vec<String>;

    /// A transaction the caller owns, for [`Call::run_within`]. Default: the store's own
    /// [`begin`](TransactionalStore::begin). (SQLite overrides it with a deferred `BEGIN`:
    /// an immediate one would hold the write lock that idem's claim needs.)
    async fn begin_caller(&self) -> Result<TxOf<Self>, StoreError> {
        self.store().begin().await
    }

    /// Whether another connection can write while a transaction that wrote is open (false
    /// on SQLite, whose one write lock the transaction holds). With `false`, the caller in
    /// the `run_within` cases writes nothing of its own before calling idem, and the stale
    /// executor is held before its transaction begins rather than inside it.
    fn concurrent_writers(&self) -> bool {
        true
    }

    /// Drops the harness's tables (called after each case, whatever its outcome).
    async fn cleanup(&self) {}
}

/// Stamps one test per transactional conformance case, for
/// [`harness::run`](crate::harness::run): an `async fn` per case and a
/// `pub fn cases(needs: &[Need]) -> Vec<Case>` in the calling module. The argument is an
/// expression evaluating to a future of `Option<H>` where `H: TxHarness`; `None` fails the case
/// (a missing server is a [`Need`](crate::harness::Need) of the cases).
#[macro_export]
macro_rules! transactional_conformance_tests {
    ($make:expr) => {
        $crate::transactional_conformance_tests!(@cases $make;
            tx_commits_with_record, tx_err_rolls_back_and_releases,
            tx_panic_rolls_back_and_releases, tx_drop_rolls_back_and_releases,
            tx_too_large_rolls_back, tx_claim_race, tx_waiters_get_the_committed_value,
            tx_stale_executor_is_fenced, tx_lease_outlives_the_body,
            tx_within_caller_commits, tx_within_caller_rolls_back,
            tx_within_held_past_the_lease);
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            async fn $case() {
                let ::std::option::Option::Some(h) = $make.await else {
                    ::std::panic!("the transactional harness factory returned None");
                };
                $crate::transactional::run_case(h, |h| {
                    $crate::transactional::$case(h)
                })
                .await;
            }
        )*

        /// One test per transactional conformance case, each with `needs`.
        pub fn cases(
            needs: &[$crate::harness::Need],
        ) -> ::std::vec::Vec<$crate::harness::Case> {
            $crate::test_cases!(needs, multi_thread(4); $($case),*)
        }
    };
}

/// Runs one case on its own task, then the harness's cleanup, then re-raises the case's
/// panic, if any.
pub async fn run_case<H, F, Fut>(harness: H, case: F)
where
    H: TxHarness,
    F: FnOnce(Arc<H>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let h = Arc::new(harness);
    let outcome = tokio::spawn(case(Arc::clone(&h))).await;
    h.cleanup().await;
    if let Err(e) = outcome {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
        panic!("case cancelled: {e}");
    }
}

/// The bodies' error (its fields are read through `Debug` in assertion messages).
#[derive(Debug)]
#[allow(dead_code)]
enum BodyError {
    Idem(Error),
    Business,
    Db(StoreError),
}

impl From<Error> for BodyError {
    fn from(e: Error) -> Self {
        BodyError::Idem(e)
    }
}

fn fresh(label: &str) -> String {
    format!("{label}-{}", &fresh_key().to_hex()[..20])
}

fn mark() -> String {
    format!("m{}", FencingToken::random().0)
}

/// The record key of `key` under `ns` (as `Call` derives it).
fn record_key(store: &dyn Store, ns: &'static str, key: &str) -> Key {
    Call::new(ns)
        .key(key)
        .identity_for(store)
        .expect("identity")
        .expect("a key")
        .key
}

async fn completed_value(store: &dyn Store, key: &Key) -> Option<CompletedRecord> {
    match store.get(key).await.expect("get") {
        Some(RecordState::Completed(r)) => Some(r),
        _ => None,
    }
}

/// A gate a task waits at until the test opens it.
#[derive(Debug, Default)]
pub struct Gate {
    open: AtomicBool,
    notify: Notify,
}

impl Gate {
    /// A closed gate.
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate::default())
    }

    /// Opens the gate for every waiter, present and future.
    pub fn open(&self) {
        self.open.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Waits until the gate is open.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

/// A [`TransactionalStore`] wrapper with hooks, for the cases and for crash tests: renewals
/// that fail (a holder cut off from its store, whose lease lapses while its body runs), a
/// gate before `begin`, and delays before `commit` and before `complete` (to widen the window
/// between the body's return and the commit).
///
/// ```
/// use std::time::Duration;
/// use idem_testkit::transactional::TxHooks;
/// let store = TxHooks::new(idem_stores::MemoryStore::new())
///     .fail_renewals(true)
///     .commit_delay(|| Duration::from_millis(5));
/// # let _ = store;
/// ```
pub struct TxHooks<S> {
    inner: S,
    fail_renewals: bool,
    before_begin: Option<Arc<Gate>>,
    commit_delay: Option<DelayFn>,
    complete_delay: Option<DelayFn>,
    /// Called when `commit` (or `complete`) is called, before its delay.
    on_commit: Option<Arc<dyn Fn() + Send + Sync>>,
}

type DelayFn = Arc<dyn Fn() -> Duration + Send + Sync>;

impl<S: Clone> Clone for TxHooks<S> {
    fn clone(&self) -> Self {
        TxHooks {
            inner: self.inner.clone(),
            fail_renewals: self.fail_renewals,
            before_begin: self.before_begin.clone(),
            commit_delay: self.commit_delay.clone(),
            complete_delay: self.complete_delay.clone(),
            on_commit: self.on_commit.clone(),
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for TxHooks<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxHooks")
            .field("inner", &self.inner)
            .field("fail_renewals", &self.fail_renewals)
            .finish_non_exhaustive()
    }
}

impl<S> TxHooks<S> {
    /// `inner` without any hook.
    pub fn new(inner: S) -> Self {
        TxHooks {
            inner,
            fail_renewals: false,
            before_begin: None,
            commit_delay: None,
            complete_delay: None,
            on_commit: None,
        }
    }

    /// Every renewal fails (as a timeout) before it reaches the store.
    pub fn fail_renewals(mut self, on: bool) -> Self {
        self.fail_renewals = on;
        self
    }

    /// `begin` waits at `gate` first.
    pub fn gate_begin(mut self, gate: Arc<Gate>) -> Self {
        self.before_begin = Some(gate);
        self
    }

    /// `commit` sleeps `delay()` before it commits.
    pub fn commit_delay(mut self, delay: impl Fn() -> Duration + Send + Sync + 'static) -> Self {
        self.commit_delay = Some(Arc::new(delay));
        self
    }

    /// [`Store::complete`] sleeps `delay()` before it completes (the non-transactional path).
    pub fn complete_delay(mut self, delay: impl Fn() -> Duration + Send + Sync + 'static) -> Self {
        self.complete_delay = Some(Arc::new(delay));
        self
    }

    /// `hook()` runs when `commit` (or [`Store::complete`]) is called, before its delay.
    pub fn on_commit(mut self, hook: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_commit = Some(Arc::new(hook));
        self
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

#[async_trait]
impl<S: Store + Clone + 'static> Store for TxHooks<S> {
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
        if let Some(hook) = &self.on_commit {
            hook();
        }
        if let Some(delay) = &self.complete_delay {
            tokio::time::sleep(delay()).await;
        }
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
        if self.fail_renewals {
            return Err(StoreError::Timeout(Duration::from_millis(1)));
        }
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
        self.inner.detached()
    }
    fn max_value_size(&self) -> usize {
        self.inner.max_value_size()
    }
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn process_local(&self) -> bool {
        self.inner.process_local()
    }
}

#[async_trait]
impl<S: TransactionalStore + Clone + 'static> TransactionalStore for TxHooks<S> {
    type Tx = S::Tx;

    async fn begin(&self) -> Result<S::Tx, StoreError> {
        if let Some(gate) = &self.before_begin {
            gate.wait().await;
        }
        self.inner.begin().await
    }

    async fn complete_in(
        &self,
        tx: &mut S::Tx,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.complete_in(tx, key, token, value, ttl).await
    }

    async fn commit(&self, tx: S::Tx) -> Result<(), StoreError> {
        if let Some(hook) = &self.on_commit {
            hook();
        }
        if let Some(delay) = &self.commit_delay {
            tokio::time::sleep(delay()).await;
        }
        self.inner.commit(tx).await
    }
}

const NS: &str = "idem::testkit::tx";
const LONG: Duration = Duration::from_secs(30);
const SHORT: Duration = Duration::from_millis(400);

/// `Ok`: the business row and the record commit together; a repeat replays the value and
/// does not run the body.
pub async fn tx_commits_with_record<H: TxHarness>(h: Arc<H>) {
    let key = fresh("commit");
    let m = mark();
    let got: Result<String, BodyError> = Call::new(NS)
        .key(&key)
        .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
            h.insert(tx, &key, &m).await.map_err(BodyError::Db)?;
            Ok(m.clone())
        })
        .await;
    assert_eq!(got.expect("the call"), m);
    assert_eq!(h.rows(&key).await, vec![m.clone()]);
    let record = completed_value(h.store(), &record_key(h.store(), NS, &key)).await;
    let record = record.expect("the record is completed after the commit");
    assert!(
        record
            .expires_in
            .is_some_and(|e| e > Duration::from_secs(3600)),
        "a 24 h TTL: {:?}",
        record.expires_in
    );
    let ran = AtomicBool::new(false);
    let again: Result<String, BodyError> = Call::new(NS)
        .key(&key)
        .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
            ran.store(true, Ordering::SeqCst);
            h.insert(tx, &key, "again").await.map_err(BodyError::Db)?;
            Ok("again".to_owned())
        })
        .await;
    assert_eq!(again.expect("the replay"), m);
    assert!(!ran.load(Ordering::SeqCst), "a replay ran the body");
    assert_eq!(h.rows(&key).await, vec![m]);
}

/// `Err`: the transaction rolls back (no business row) and the claim is released, so that a
/// retry runs at once (well inside the 30 s lease).
pub async fn tx_err_rolls_back_and_releases<H: TxHarness>(h: Arc<H>) {
    let key = fresh("err");
    let got: Result<String, BodyError> = Call::new(NS)
        .key(&key)
        .lease(LONG)
        .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
            h.insert(tx, &key, "failed").await.map_err(BodyError::Db)?;
            Err(BodyError::Business)
        })
        .await;
    assert!(matches!(got, Err(BodyError::Business)), "{got:?}");
    assert!(h.rows(&key).await.is_empty(), "the failed attempt's row");
    assert_eq!(
        h.store()
            .get(&record_key(h.store(), NS, &key))
            .await
            .expect("get"),
        None
    );
    retry_runs_at_once(&h, &key).await;
}

/// A retry runs its body, and afterwards the key has exactly that one row. The retry waits
/// at most 10 s for the key, while a claim that was not released would hold it for its 30 s
/// lease (a release from a detached task may land a moment after the caller returned).
async fn retry_runs_at_once<H: TxHarness>(h: &Arc<H>, key: &str) {
    let m = mark();
    let retry = Call::new(NS)
        .key(key)
        .lease(LONG)
        .wait_timeout(Duration::from_secs(10))
        .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
            h.insert(tx, key, &m).await.map_err(BodyError::Db)?;
            Ok::<_, BodyError>(m.clone())
        });
    let got = tokio::time::timeout(Duration::from_secs(20), retry)
        .await
        .expect("the retry is bounded");
    assert_eq!(got.expect("the retry runs at once"), m);
    assert_eq!(h.rows(key).await, vec![m]);
}

/// A panic inside the transaction: rollback, release, and the panic reaches the caller.
pub async fn tx_panic_rolls_back_and_releases<H: TxHarness>(h: Arc<H>) {
    let key = fresh("panic");
    let task = {
        let (h, key) = (Arc::clone(&h), key.clone());
        tokio::spawn(async move {
            let _: Result<String, BodyError> = Call::new(NS)
                .key(&key)
                .lease(LONG)
                .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
                    h.insert(tx, &key, "panicked")
                        .await
                        .map_err(BodyError::Db)?;
                    panic!("boom inside the transaction");
                })
                .await;
        })
    };
    let joined = task.await;
    assert!(
        joined.as_ref().is_err_and(|e| e.is_panic()),
        "the panic reaches the caller"
    );
    assert!(h.rows(&key).await.is_empty(), "the panicked attempt's row");
    retry_runs_at_once(&h, &key).await;
}

/// The caller's future dropped while the body runs in the transaction: rollback (the
/// transaction is dropped) and release (from a detached task), so that a retry runs at once.
pub async fn tx_drop_rolls_back_and_releases<H: TxHarness>(h: Arc<H>) {
    let key = fresh("drop");
    let inside = Arc::new(Notify::new());
    let entered = inside.notified();
    tokio::pin!(entered);
    entered.as_mut().enable();
    let task = {
        let (h, key, inside) = (Arc::clone(&h), key.clone(), Arc::clone(&inside));
        tokio::spawn(async move {
            let _: Result<String, BodyError> = Call::new(NS)
                .key(&key)
                .lease(LONG)
                .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
                    h.insert(tx, &key, "dropped").await.map_err(BodyError::Db)?;
                    inside.notify_one();
                    std::future::pending::<()>().await;
                    Ok("never".to_owned())
                })
                .await;
        })
    };
    tokio::time::timeout(LONG, entered)
        .await
        .expect("the body started");
    task.abort();
    let _ = task.await;
    assert!(h.rows(&key).await.is_empty(), "the dropped attempt's row");
    retry_runs_at_once(&h, &key).await;
}

/// A value over the limit: `TooLarge`, rollback, release.
pub async fn tx_too_large_rolls_back<H: TxHarness>(h: Arc<H>) {
    let key = fresh("large");
    let got: Result<Vec<u8>, BodyError> = Call::new(NS)
        .key(&key)
        .lease(LONG)
        .max_value_size(1024)
        .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
            h.insert(tx, &key, "large").await.map_err(BodyError::Db)?;
            Ok(vec![7u8; 4096])
        })
        .await;
    assert!(
        matches!(got, Err(BodyError::Idem(Error::TooLarge { .. }))),
        "{got:?}"
    );
    assert!(h.rows(&key).await.is_empty(), "the oversized attempt's row");
    retry_runs_at_once(&h, &key).await;
}

/// 64 concurrent transactional calls on one key: one body commits one business row, and all
/// 64 callers get its value.
pub async fn tx_claim_race<H: TxHarness>(h: Arc<H>) {
    const CALLERS: usize = 64;
    let key = fresh("race");
    let bodies = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(CALLERS));
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (h, key, bodies, start) = (
                Arc::clone(&h),
                key.clone(),
                Arc::clone(&bodies),
                Arc::clone(&start),
            );
            tokio::spawn(async move {
                start.wait().await;
                let m = mark();
                Call::new(NS)
                    .key(&key)
                    .wait_timeout(LONG)
                    .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
                        bodies.fetch_add(1, Ordering::SeqCst);
                        h.insert(tx, &key, &m).await.map_err(BodyError::Db)?;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<_, BodyError>(m.clone())
                    })
                    .await
            })
        })
        .collect();
    let mut values = Vec::new();
    for t in tasks {
        values.push(t.await.expect("task").expect("every caller gets the value"));
    }
    let rows = h.rows(&key).await;
    assert_eq!(rows.len(), 1, "one business row: {rows:?}");
    assert!(
        values.iter().all(|v| *v == rows[0]),
        "every caller got the committed value"
    );
    assert_eq!(bodies.load(Ordering::SeqCst), 1, "one execution");
}

/// Duplicates wait on a transactional call whose body fails after a while: none of them ever
/// gets the rolled-back attempt's value; one of them runs next, and all get its committed
/// value.
pub async fn tx_waiters_get_the_committed_value<H: TxHarness>(h: Arc<H>) {
    const WAITERS: usize = 8;
    let key = fresh("waiters");
    let gate = Gate::new();
    let inside = Arc::new(Notify::new());
    let entered = inside.notified();
    tokio::pin!(entered);
    entered.as_mut().enable();
    let first = {
        let (h, key, gate, inside) = (
            Arc::clone(&h),
            key.clone(),
            Arc::clone(&gate),
            Arc::clone(&inside),
        );
        tokio::spawn(async move {
            Call::new(NS)
                .key(&key)
                .lease(LONG)
                .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
                    h.insert(tx, &key, "rolled-back")
                        .await
                        .map_err(BodyError::Db)?;
                    inside.notify_one();
                    gate.wait().await;
                    Err::<String, _>(BodyError::Business)
                })
                .await
        })
    };
    tokio::time::timeout(LONG, entered)
        .await
        .expect("the first body started");
    let waiters: Vec<_> = (0..WAITERS)
        .map(|_| {
            let (h, key) = (Arc::clone(&h), key.clone());
            tokio::spawn(async move {
                let m = mark();
                Call::new(NS)
                    .key(&key)
                    .lease(LONG)
                    .wait_timeout(LONG)
                    .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
                        h.insert(tx, &key, &m).await.map_err(BodyError::Db)?;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, BodyError>(m.clone())
                    })
                    .await
            })
        })
        .collect();
    // Let the duplicates reach their wait, then fail the first attempt.
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.open();
    let first = first.await.expect("task");
    assert!(matches!(first, Err(BodyError::Business)), "{first:?}");
    let mut values = Vec::new();
    for w in waiters {
        values.push(w.await.expect("task").expect("every waiter gets a value"));
    }
    let rows = h.rows(&key).await;
    assert_eq!(rows.len(), 1, "one committed row: {rows:?}");
    assert_ne!(rows[0], "rolled-back");
    assert!(
        values.iter().all(|v| *v == rows[0]),
        "every waiter got the committed value: {values:?} vs {rows:?}"
    );
    let record = completed_value(h.store(), &record_key(h.store(), NS, &key)).await;
    assert!(record.is_some(), "the record is completed");
}

/// A stale executor ends with `LeaseLost`, and its writes are rolled back: the key has the
/// takeover's row only.
///
/// With concurrent writers (PostgreSQL, MariaDB) the stale executor's renewals fail and it is
/// held inside its body, after its INSERT, until its lease lapses and another caller takes the
/// key over and commits. On SQLite an open transaction holds the one write lock that a
/// takeover needs, so no takeover can happen inside it: the stale executor is held between
/// its claim and its `BEGIN` instead, while the test removes its claim
/// ([`Store::remove`]) and another caller claims, runs and commits.
pub async fn tx_stale_executor_is_fenced<H: TxHarness>(h: Arc<H>) {
    let key = fresh("stale");
    let rkey = record_key(h.store(), NS, &key);
    let begin_gate = Gate::new();
    let body_gate = Gate::new();
    let inside = Arc::new(Notify::new());
    let entered = inside.notified();
    tokio::pin!(entered);
    entered.as_mut().enable();
    let held_inside = h.concurrent_writers();
    let (stale_store, lease) = if held_inside {
        (TxHooks::new(h.store().clone()).fail_renewals(true), SHORT)
    } else {
        let hooks = TxHooks::new(h.store().clone()).gate_begin(Arc::clone(&begin_gate));
        (hooks, LONG)
    };
    let stale = {
        let (h, key, body_gate, inside) = (
            Arc::clone(&h),
            key.clone(),
            Arc::clone(&body_gate),
            Arc::clone(&inside),
        );
        tokio::spawn(async move {
            Call::new(NS)
                .key(&key)
                .lease(lease)
                .run_in_transaction(&stale_store, async |tx: &mut TxOf<H>| {
                    h.insert(tx, &key, "stale").await.map_err(BodyError::Db)?;
                    if held_inside {
                        inside.notify_one();
                        body_gate.wait().await;
                    }
                    Ok::<_, BodyError>("stale".to_owned())
                })
                .await
        })
    };
    if held_inside {
        tokio::time::timeout(LONG, entered)
            .await
            .expect("the stale body started");
        // Its renewals fail: the lease lapses (an in-progress record past its lease reads as
        // absent).
        let deadline = Instant::now() + LONG;
        while h.store().get(&rkey).await.expect("get").is_some() {
            assert!(Instant::now() < deadline, "the stale lease never lapsed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    } else {
        let deadline = Instant::now() + LONG;
        while h.store().get(&rkey).await.expect("get").is_none() {
            assert!(
                Instant::now() < deadline,
                "the stale executor never claimed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        h.store()
            .remove(&rkey)
            .await
            .expect("remove the stale claim");
    }
    let m = mark();
    let taken: Result<String, BodyError> = Call::new(NS)
        .key(&key)
        .lease(LONG)
        .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
            h.insert(tx, &key, &m).await.map_err(BodyError::Db)?;
            Ok(m.clone())
        })
        .await;
    assert_eq!(taken.expect("the takeover"), m);
    begin_gate.open();
    body_gate.open();
    let stale = stale.await.expect("task");
    assert!(
        matches!(stale, Err(BodyError::Idem(Error::LeaseLost))),
        "the stale executor: {stale:?}"
    );
    assert_eq!(
        h.rows(&key).await,
        vec![m.clone()],
        "the stale rows are rolled back"
    );
    let replay: Result<String, BodyError> = Call::new(NS)
        .key(&key)
        .run_in_transaction(h.store(), async |_tx: &mut TxOf<H>| Ok("ran".to_owned()))
        .await;
    assert_eq!(replay.expect("replay"), m);
}

/// A body longer than its lease (renewed while it runs, or — on SQLite — holding the write
/// lock that a takeover needs): a duplicate that comes meanwhile gets its value, and the key
/// has one row.
pub async fn tx_lease_outlives_the_body<H: TxHarness>(h: Arc<H>) {
    let key = fresh("long");
    let inside = Arc::new(Notify::new());
    let entered = inside.notified();
    tokio::pin!(entered);
    entered.as_mut().enable();
    let first = {
        let (h, key, inside) = (Arc::clone(&h), key.clone(), Arc::clone(&inside));
        tokio::spawn(async move {
            Call::new(NS)
                .key(&key)
                .lease(SHORT)
                .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
                    h.insert(tx, &key, "long").await.map_err(BodyError::Db)?;
                    inside.notify_one();
                    tokio::time::sleep(SHORT * 3).await;
                    Ok::<_, BodyError>("long".to_owned())
                })
                .await
        })
    };
    tokio::time::timeout(LONG, entered)
        .await
        .expect("the body started");
    let second: Result<String, BodyError> = Call::new(NS)
        .key(&key)
        .lease(SHORT)
        .wait_timeout(LONG)
        .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
            h.insert(tx, &key, "second").await.map_err(BodyError::Db)?;
            Ok("second".to_owned())
        })
        .await;
    assert_eq!(first.await.expect("task").expect("the long call"), "long");
    assert_eq!(second.expect("the duplicate"), "long");
    assert_eq!(h.rows(&key).await, vec!["long".to_owned()]);
}

/// `run_within` and the caller's commit: the record stays in progress until the caller
/// commits, then both the body's rows and the record are visible and the value replays.
pub async fn tx_within_caller_commits<H: TxHarness>(h: Arc<H>) {
    let key = fresh("within");
    let rkey = record_key(h.store(), NS, &key);
    let caller_row = format!("{key}-caller");
    let mut tx = h.begin_caller().await.expect("begin");
    if h.concurrent_writers() {
        h.insert(&mut tx, &caller_row, "caller")
            .await
            .expect("caller insert");
    }
    let m = mark();
    let got: Result<String, BodyError> = Call::new(NS)
        .key(&key)
        .lease(LONG)
        .run_within(h.store(), &mut tx, async |tx: &mut TxOf<H>| {
            h.insert(tx, &key, &m).await.map_err(BodyError::Db)?;
            Ok(m.clone())
        })
        .await;
    assert_eq!(got.expect("run_within"), m);
    assert!(
        matches!(
            h.store().get(&rkey).await.expect("get"),
            Some(RecordState::InProgress { .. })
        ),
        "in progress until the caller commits"
    );
    assert!(
        h.rows(&key).await.is_empty(),
        "nothing visible before the commit"
    );
    let dup: Result<String, BodyError> = Call::new(NS)
        .key(&key)
        .on_conflict(OnConflict::Reject)
        .run_in_transaction(h.store(), async |_tx: &mut TxOf<H>| Ok("dup".to_owned()))
        .await;
    assert!(
        matches!(dup, Err(BodyError::Idem(Error::InProgress { .. }))),
        "a duplicate before the caller's commit: {dup:?}"
    );
    h.store().commit(tx).await.expect("the caller commits");
    assert_eq!(h.rows(&key).await, vec![m.clone()]);
    if h.concurrent_writers() {
        assert_eq!(h.rows(&caller_row).await, vec!["caller".to_owned()]);
    }
    let replay: Result<String, BodyError> = Call::new(NS)
        .key(&key)
        .run_in_transaction(h.store(), async |_tx: &mut TxOf<H>| Ok("ran".to_owned()))
        .await;
    assert_eq!(replay.expect("replay"), m);
}

/// `run_within` and the caller's rollback: the completion is undone with the caller's writes;
/// the claim stays in progress until its lease passes, then a retry runs again.
pub async fn tx_within_caller_rolls_back<H: TxHarness>(h: Arc<H>) {
    let key = fresh("within-rb");
    let rkey = record_key(h.store(), NS, &key);
    let mut tx = h.begin_caller().await.expect("begin");
    let got: Result<String, BodyError> = Call::new(NS)
        .key(&key)
        .lease(SHORT)
        .run_within(h.store(), &mut tx, async |tx: &mut TxOf<H>| {
            h.insert(tx, &key, "rolled-back")
                .await
                .map_err(BodyError::Db)?;
            Ok("rolled-back".to_owned())
        })
        .await;
    assert_eq!(got.expect("run_within"), "rolled-back");
    drop(tx); // the caller rolls back
    assert!(
        !matches!(
            h.store().get(&rkey).await.expect("get"),
            Some(RecordState::Completed(_))
        ),
        "a rolled-back completion is never visible"
    );
    let m = mark();
    let retry: Result<String, BodyError> = Call::new(NS)
        .key(&key)
        .lease(LONG)
        .wait_timeout(LONG)
        .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
            h.insert(tx, &key, &m).await.map_err(BodyError::Db)?;
            Ok(m.clone())
        })
        .await;
    assert_eq!(retry.expect("the retry runs after the lease"), m);
    assert_eq!(h.rows(&key).await, vec![m]);
}

/// `run_within` with the caller holding its transaction past the lease: the completion
/// written in it row-locks the record (PostgreSQL, MariaDB) or holds the write lock (SQLite),
/// so a takeover waits for the caller's commit and then replays the committed value.
pub async fn tx_within_held_past_the_lease<H: TxHarness>(h: Arc<H>) {
    let key = fresh("within-held");
    let mut tx = h.begin_caller().await.expect("begin");
    let got: Result<String, BodyError> = Call::new(NS)
        .key(&key)
        .lease(SHORT)
        .run_within(h.store(), &mut tx, async |tx: &mut TxOf<H>| {
            h.insert(tx, &key, "held").await.map_err(BodyError::Db)?;
            Ok("held".to_owned())
        })
        .await;
    assert_eq!(got.expect("run_within"), "held");
    tokio::time::sleep(SHORT * 2).await; // the lease has passed; the caller still holds tx
    let done = Arc::new(AtomicBool::new(false));
    let ran = Arc::new(AtomicBool::new(false));
    let other = {
        let (h, key, done, ran) = (
            Arc::clone(&h),
            key.clone(),
            Arc::clone(&done),
            Arc::clone(&ran),
        );
        tokio::spawn(async move {
            let r: Result<String, BodyError> = Call::new(NS)
                .key(&key)
                .lease(LONG)
                .wait_timeout(LONG)
                .run_in_transaction(h.store(), async |tx: &mut TxOf<H>| {
                    ran.store(true, Ordering::SeqCst);
                    h.insert(tx, &key, "other").await.map_err(BodyError::Db)?;
                    Ok("other".to_owned())
                })
                .await;
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    tokio::time::sleep(SHORT).await;
    assert!(
        !done.load(Ordering::SeqCst),
        "a takeover went through while the caller held the completed record"
    );
    h.store().commit(tx).await.expect("the caller commits");
    let other = other.await.expect("task");
    assert_eq!(other.expect("the duplicate replays"), "held");
    assert!(!ran.load(Ordering::SeqCst), "the duplicate ran its body");
    assert_eq!(h.rows(&key).await, vec!["held".to_owned()]);
}
