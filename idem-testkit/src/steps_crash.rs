//! The durable-steps crash matrix: a three-step call interrupted at each point before and
//! after each step's write — by SIGKILL of a child process, or by dropping the call's future —
//! and then retried by several callers at once.
//!
//! The call (namespace [`NS`]) runs:
//!
//! 1. `ledger`: on SQL stores a transactional step ([`step_in`]) inserting one ledger row in
//!    the store's database; elsewhere a plain step calling the downstream service;
//! 2. `charge`: a plain step calling a fake downstream service with its [`step_key`];
//! 3. `email`: an [`at_most_once`](idem_core::Step::at_most_once) step calling the downstream
//!    service with its step key.
//!
//! The downstream service ([`Downstream`]) lives outside the process under test (a table, or
//! Redis keys): it counts each key it sees and applies each key once (an atomic upsert).
//!
//! A [`Stop`] wrapper around the store stops the call at its [`Point`]: before or after a
//! step's record is written (`put_step`, or `put_step_in` + `commit` for the transactional
//! step), or before the call's completion. In a child process ([`child`]) the stop prints a
//! marker line and hangs, and the parent ([`sigkill`]) SIGKILLs the child when every call has
//! reached its point; in process ([`cancel`]) the stop wakes the driver, which drops the call's
//! future. Afterwards [`RETRIERS`] callers retry each call at once and the matrix checks:
//!
//! - the ledger row exists once;
//! - the downstream saw each step's key at most twice (once more only when the step was
//!   interrupted between its effect and its record), applied it once, and each step had one
//!   key over all executions;
//! - the at-most-once step ran at most once; interrupted after its start (SIGKILL), every
//!   retry gets [`Error::StepInDoubt`];
//! - every retrier of a call gets the same result.
//!
//! The backends (one per store) live in the store's test file; see
//! `idem-stores/tests/steps_crash.rs`.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io::BufRead;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem_core::{
    async_trait, step, step_in, step_key, Call, Claim, ClaimRequest, Error, FencingToken, Key,
    RecordState, StepRecord, StepStatus, Store, StoreError, TransactionalStore,
};
use serde::{Deserialize, Serialize};

use crate::transactional::{TxHarness, TxOf};

/// The namespace of the matrix's calls.
pub const NS: &str = "idem::testkit::steps_crash";

/// How many callers retry each interrupted call at once.
pub const RETRIERS: usize = 3;

/// Where a call is interrupted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Point {
    /// Before the `ledger` step's record (inside its transaction, before the commit).
    LedgerBefore,
    /// After the `ledger` step's record (after the commit).
    LedgerAfter,
    /// After `charge` called the downstream, before its record.
    ChargeBefore,
    /// After `charge`'s record.
    ChargeAfter,
    /// Before `email`'s start record: it has not run.
    EmailBeforeStart,
    /// After `email`'s start record, before it runs.
    EmailAfterStart,
    /// After `email` ran, before its record.
    EmailBeforeDone,
    /// After `email`'s record.
    EmailAfterDone,
    /// After every step, before the call's completion.
    BeforeComplete,
}

impl Point {
    /// Every point, in the call's order.
    pub const ALL: [Point; 9] = [
        Point::LedgerBefore,
        Point::LedgerAfter,
        Point::ChargeBefore,
        Point::ChargeAfter,
        Point::EmailBeforeStart,
        Point::EmailAfterStart,
        Point::EmailBeforeDone,
        Point::EmailAfterDone,
        Point::BeforeComplete,
    ];

    /// Its short name (`ledger.before`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Point::LedgerBefore => "ledger.before",
            Point::LedgerAfter => "ledger.after",
            Point::ChargeBefore => "charge.before",
            Point::ChargeAfter => "charge.after",
            Point::EmailBeforeStart => "email.before-start",
            Point::EmailAfterStart => "email.after-start",
            Point::EmailBeforeDone => "email.before-done",
            Point::EmailAfterDone => "email.after-done",
            Point::BeforeComplete => "complete.before",
        }
    }

    /// The point named `name`.
    pub fn parse(name: &str) -> Option<Point> {
        Point::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Whether the at-most-once step was interrupted after its start and before its record.
    pub fn in_doubt(self) -> bool {
        matches!(self, Point::EmailAfterStart | Point::EmailBeforeDone)
    }

    /// The point at a step write: `(step, status, before?)`.
    fn at(name: &str, status: StepStatus, before: bool) -> Option<Point> {
        Some(match (name, status, before) {
            ("ledger", StepStatus::Done, true) => Point::LedgerBefore,
            ("ledger", StepStatus::Done, false) => Point::LedgerAfter,
            ("charge", StepStatus::Done, true) => Point::ChargeBefore,
            ("charge", StepStatus::Done, false) => Point::ChargeAfter,
            ("email", StepStatus::Started, true) => Point::EmailBeforeStart,
            ("email", StepStatus::Started, false) => Point::EmailAfterStart,
            ("email", StepStatus::Done, true) => Point::EmailBeforeDone,
            ("email", StepStatus::Done, false) => Point::EmailAfterDone,
            _ => return None,
        })
    }
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The fake downstream service the steps call: it counts every key it sees and applies each
/// key once. It must keep its state outside the process under test.
#[async_trait]
pub trait Downstream: Send + Sync + 'static {
    /// Sees `key` (its count goes up by one) and applies it if it was not applied yet — in one
    /// atomic operation.
    async fn call(&self, key: &str) -> Result<(), StoreError>;

    /// Every key starting with `prefix`: `(key, seen, applied)`.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64, u64)>, StoreError>;
}

/// A store and its downstream service, for the matrix.
#[async_trait]
pub trait CrashBackend: Send + Sync + 'static {
    /// The store under test.
    type Store: Store + Clone + 'static;

    /// The store.
    fn store(&self) -> &Self::Store;

    /// The downstream service.
    fn downstream(&self) -> &dyn Downstream;

    /// The calls' lease (a killed call's retry waits for it).
    fn lease(&self) -> Duration;

    /// The first step, `ledger`, of call `call` on `store`: [`ledger_in`] on SQL stores,
    /// [`ledger_downstream`] elsewhere. Returns the ledger row's mark.
    async fn ledger(&self, store: &Stop<Self::Store>, call: &str) -> Result<String, Error>;

    /// The marks of `call`'s ledger rows.
    async fn ledger_rows(&self, call: &str) -> Result<Vec<String>, StoreError>;
}

/// The `ledger` step on a SQL store: a transactional step inserting one row marked with a fresh
/// mark for `call` (the row and the step's record commit together).
pub async fn ledger_in<H: TxHarness>(
    h: &H,
    store: &Stop<H::Store>,
    call: &str,
) -> Result<String, Error> {
    let mark = format!("m{:016x}", FencingToken::random().0);
    step_in(store, "ledger", async |tx: &mut TxOf<H>| {
        h.insert(tx, call, &mark).await.map_err(Error::Store)?;
        Ok::<_, Error>(mark.clone())
    })
    .await
}

/// The `ledger` step on a store without transactions: a plain step calling the downstream with
/// `<call>/ledger/<step key>` (the downstream's applied key is the ledger row).
pub async fn ledger_downstream(down: &dyn Downstream, call: &str) -> Result<String, Error> {
    step("ledger", async {
        let key = current_step_key()?;
        let mark = format!("{call}/ledger/{key}");
        down.call(&mark).await.map_err(Error::Store)?;
        Ok::<_, Error>(mark)
    })
    .await
}

/// The ledger rows of [`ledger_downstream`]: its applied keys.
pub async fn ledger_downstream_rows(
    down: &dyn Downstream,
    call: &str,
) -> Result<Vec<String>, StoreError> {
    let rows = down.list(&format!("{call}/ledger/")).await?;
    Ok(rows
        .into_iter()
        .filter(|(_, _, applied)| *applied > 0)
        .map(|(k, _, _)| k)
        .collect())
}

fn current_step_key() -> Result<String, Error> {
    step_key()
        .map(|k| k.to_hex())
        .ok_or(Error::Store(StoreError::Unsupported(
            "step_key() outside a step",
        )))
}

/// What a completed call returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The ledger row's mark.
    pub ledger: String,
    /// The key the downstream saw for `charge`.
    pub charge: String,
    /// The key the downstream saw for `email`.
    pub email: String,
}

/// The three-step call `call` on `store`.
pub async fn checkout<B: CrashBackend>(
    b: &B,
    store: &Stop<B::Store>,
    call: &str,
) -> Result<Receipt, Error> {
    Call::new(NS)
        .key(call)
        .lease(b.lease())
        .wait_timeout(b.lease() * 4 + Duration::from_secs(10))
        .run(store, async {
            let ledger = b.ledger(store, call).await?;
            let down = b.downstream();
            let charge = step("charge", async {
                let key = format!("{call}/charge/{}", current_step_key()?);
                down.call(&key).await.map_err(Error::Store)?;
                Ok::<_, Error>(key)
            })
            .await?;
            let email = step("email", async {
                let key = format!("{call}/email/{}", current_step_key()?);
                down.call(&key).await.map_err(Error::Store)?;
                Ok::<_, Error>(key)
            })
            .at_most_once()
            .await?;
            Ok(Receipt {
                ledger,
                charge,
                email,
            })
        })
        .await
}

type Hook = Arc<dyn Fn(Point) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A forwarding store that stops once at its [`Point`]: it awaits its hook there (which
/// prints a marker and hangs in a child process, or wakes the driver and waits for it).
/// Without a point it only forwards.
///
/// ```
/// use idem_core::{step, Call, Error};
/// use idem_testkit::steps_crash::{Point, Stop};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let reached = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
/// let seen = reached.clone();
/// let store = Stop::new(idem_stores::MemoryStore::new(), Some(Point::ChargeAfter), move |_| {
///     seen.store(true, std::sync::atomic::Ordering::SeqCst);
///     async {} // go on at once
/// });
/// let got = Call::new("docs::stop")
///     .key("k")
///     .run(&store, async { step("charge", async { Ok::<_, Error>(7) }).await })
///     .await;
/// assert_eq!(got.unwrap(), 7);
/// assert!(reached.load(std::sync::atomic::Ordering::SeqCst));
/// # }
/// ```
pub struct Stop<S> {
    inner: S,
    point: Option<Point>,
    hook: Hook,
    fired: Arc<AtomicBool>,
    /// The transactional step's record was written in the open transaction.
    pending_commit: Arc<AtomicBool>,
}

impl<S: Clone> Clone for Stop<S> {
    fn clone(&self) -> Self {
        Stop {
            inner: self.inner.clone(),
            point: self.point,
            hook: Arc::clone(&self.hook),
            fired: Arc::clone(&self.fired),
            pending_commit: Arc::clone(&self.pending_commit),
        }
    }
}

impl<S> fmt::Debug for Stop<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stop")
            .field("point", &self.point)
            .finish_non_exhaustive()
    }
}

impl<S> Stop<S> {
    /// `inner`, stopping at `point` by awaiting `hook(point)` once.
    pub fn new<F, Fut>(inner: S, point: Option<Point>, hook: F) -> Self
    where
        F: Fn(Point) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Stop {
            inner,
            point,
            hook: Arc::new(move |p| Box::pin(hook(p))),
            fired: Arc::new(AtomicBool::new(false)),
            pending_commit: Arc::new(AtomicBool::new(false)),
        }
    }

    /// `inner`, never stopping.
    pub fn none(inner: S) -> Self {
        Stop::new(inner, None, |_| async {})
    }

    async fn reach(&self, at: Option<Point>) {
        if at.is_some() && at == self.point && !self.fired.swap(true, Ordering::SeqCst) {
            (self.hook)(self.point.unwrap_or(Point::BeforeComplete)).await;
        }
    }
}

#[async_trait]
impl<S: Store + Clone + 'static> Store for Stop<S> {
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
        self.reach(Some(Point::BeforeComplete)).await;
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
        // Step writes go through the detached handle: it must stop too.
        Some(Arc::new(self.clone()))
    }
    fn max_value_size(&self) -> usize {
        self.inner.max_value_size()
    }
    fn visit_completed_now(
        &self,
        key: &Key,
        visit: &mut dyn FnMut(idem_core::CompletedRef<'_>),
    ) -> bool {
        self.inner.visit_completed_now(key, visit)
    }
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn process_local(&self) -> bool {
        self.inner.process_local()
    }
    fn supports_steps(&self) -> bool {
        self.inner.supports_steps()
    }
    async fn load_steps(&self, key: &Key) -> Result<Vec<StepRecord>, StoreError> {
        self.inner.load_steps(key).await
    }
    async fn put_step(
        &self,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.reach(Point::at(&step.id.name, step.status, true))
            .await;
        self.inner.put_step(key, token, step, ttl).await?;
        self.reach(Point::at(&step.id.name, step.status, false))
            .await;
        Ok(())
    }
    async fn clear_step(
        &self,
        key: &Key,
        token: FencingToken,
        id: &idem_core::StepId,
    ) -> Result<(), StoreError> {
        self.inner.clear_step(key, token, id).await
    }
}

#[async_trait]
impl<S: TransactionalStore + Clone + 'static> TransactionalStore for Stop<S> {
    type Tx = S::Tx;

    async fn begin(&self) -> Result<S::Tx, StoreError> {
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
        self.inner.commit(tx).await?;
        if self.pending_commit.swap(false, Ordering::SeqCst) {
            self.reach(Some(Point::LedgerAfter)).await;
        }
        Ok(())
    }
    async fn put_step_in(
        &self,
        tx: &mut S::Tx,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.reach(Point::at(&step.id.name, step.status, true))
            .await;
        self.inner.put_step_in(tx, key, token, step, ttl).await?;
        self.pending_commit.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// The call name of `point` in run `run`.
pub fn call_name(run: &str, point: Point) -> String {
    format!("{run}-{}", point.name())
}

/// The child process's role: runs the call of `point` in run `run` until it stops at its
/// point (it prints `STOP <point>` and hangs there, until the parent kills the process); a call
/// that ends instead prints `END <point> <result>` and returns (the parent reports it).
pub async fn child<B: CrashBackend>(b: Arc<B>, run: &str, point: Point) {
    // A test harness may have printed the test's name without a newline.
    println!();
    let call = call_name(run, point);
    let stop = Stop::new(b.store().clone(), Some(point), |p| async move {
        println!("STOP {p}");
        std::future::pending::<()>().await;
    });
    let got = checkout(&*b, &stop, &call).await;
    println!("END {point} {got:?}");
}

/// One point's row of the matrix.
#[derive(Clone, Debug)]
pub struct Row {
    /// `sigkill` or `cancel`.
    pub interrupt: &'static str,
    /// The point.
    pub point: Point,
    /// What the retriers got (`ok`, `StepInDoubt`, or the error), one word if all agree.
    pub outcome: String,
    /// Ledger rows of the call.
    pub ledger_rows: usize,
    /// How many times the downstream saw each step's key: (ledger on non-SQL stores, charge,
    /// email); `None` for the transactional ledger.
    pub seen: (Option<u64>, u64, u64),
    /// What went wrong (empty: the row passed).
    pub failures: Vec<String>,
}

/// The matrix's result on one store.
#[derive(Clone, Debug, Default)]
pub struct Matrix {
    /// One row per interrupt and point.
    pub rows: Vec<Row>,
}

impl Matrix {
    /// The failures of every row, `interrupt point: what`.
    pub fn failures(&self) -> Vec<String> {
        self.rows
            .iter()
            .flat_map(|r| {
                r.failures
                    .iter()
                    .map(move |f| format!("{} {}: {f}", r.interrupt, r.point))
            })
            .collect()
    }

    /// The table (markdown), one line per row, headed by `store`.
    pub fn table(&self, store: &str) -> String {
        let mut out = String::from(
            "| store | interrupt | point | retriers got | ledger rows | ledger seen | charge seen | email ran | pass |\n\
             |---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            out.push_str(&format!(
                "| {store} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.interrupt,
                r.point,
                r.outcome,
                r.ledger_rows,
                r.seen.0.map_or("tx".to_owned(), |n| n.to_string()),
                r.seen.1,
                r.seen.2,
                if r.failures.is_empty() { "yes" } else { "NO" }
            ));
        }
        out
    }

    /// Panics with every failure if there is one.
    pub fn assert_passed(&self, store: &str) {
        let failures = self.failures();
        assert!(
            failures.is_empty(),
            "{store}: the crash matrix failed:\n{}",
            failures.join("\n")
        );
    }
}

/// A fresh run id (call names are `<run>-<point>`).
pub fn run_id() -> String {
    format!("r{:012x}", FencingToken::random().0 & 0xffff_ffff_ffff)
}

/// The SIGKILL half: for each point in turn, `spawn(run, point)` starts a child process
/// (running [`child`] with `run` and `point`, its stdout piped); the driver SIGKILLs it as soon
/// as it printed its `STOP` marker (well within the call's lease: the runtime bounds a store
/// operation by the lease, so a stop longer than that would let the call go on). Then every
/// call is retried with [`RETRIERS`] callers at once.
pub async fn sigkill<B: CrashBackend>(
    b: Arc<B>,
    mut spawn: impl FnMut(&str, Point) -> std::process::Child,
) -> Matrix {
    let run = run_id();
    let mut missed: BTreeMap<Point, String> = BTreeMap::new();
    for p in Point::ALL {
        let mut child = spawn(&run, p);
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = child.stdout.take().map(|out| {
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut reached = Err("no marker in 20 s".to_owned());
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) if line.contains("STOP ") => {
                    reached = Ok(());
                    break;
                }
                Ok(line) if line.contains("END ") => {
                    reached = Err(line);
                    break;
                }
                Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    reached = Err("the child exited".to_owned());
                    break;
                }
            }
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        drop(rx);
        if let Some(r) = reader {
            let _ = r.join();
        }
        if let Err(e) = reached {
            missed.insert(p, e);
        }
    }
    let mut matrix = settle(&b, &run, "sigkill").await;
    for row in &mut matrix.rows {
        if let Some(e) = missed.get(&row.point) {
            row.failures
                .push(format!("the child did not reach the point: {e}"));
        }
    }
    matrix
}

/// The cancellation half, in process: each point's call in turn runs until its stop, and the
/// driver drops its future there, then lets the writes it left in detached tasks go on. Then
/// every call is retried with [`RETRIERS`] callers at once.
pub async fn cancel<B: CrashBackend>(b: Arc<B>) -> Matrix {
    let run = run_id();
    let mut missed: BTreeMap<Point, String> = BTreeMap::new();
    for p in Point::ALL {
        let call = call_name(&run, p);
        let (open_tx, open_rx) = tokio::sync::watch::channel(false);
        let (reached_tx, reached_rx) = tokio::sync::oneshot::channel::<()>();
        let reached_tx = Arc::new(Mutex::new(Some(reached_tx)));
        let stop = Stop::new(b.store().clone(), Some(p), move |_| {
            let reached = reached_tx.lock().ok().and_then(|mut t| t.take());
            let mut open = open_rx.clone();
            async move {
                if let Some(t) = reached {
                    let _ = t.send(());
                }
                let _ = open.wait_for(|o| *o).await;
            }
        });
        {
            let call_fut = checkout(&*b, &stop, &call);
            tokio::select! {
                got = call_fut => {
                    missed.insert(p, format!("ended without reaching its point: {got:?}"));
                }
                _ = reached_rx => {}
            }
            // The call's future is dropped here.
        }
        // Let the writes that the dropped future left in detached tasks go on.
        let _ = open_tx.send(true);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut matrix = settle(&b, &run, "cancel").await;
    for row in &mut matrix.rows {
        if let Some(e) = missed.get(&row.point) {
            row.failures.push(e.clone());
        }
    }
    matrix
}

fn outcome(r: &Result<Receipt, Error>) -> String {
    match r {
        Ok(_) => "ok".to_owned(),
        Err(Error::StepInDoubt { .. }) => "StepInDoubt".to_owned(),
        Err(e) => format!("{e:?}"),
    }
}

/// Retries every point's call with [`RETRIERS`] callers at once, and checks the row.
async fn settle<B: CrashBackend>(b: &Arc<B>, run: &str, interrupt: &'static str) -> Matrix {
    let tasks: Vec<_> = Point::ALL
        .into_iter()
        .map(|p| {
            let b = Arc::clone(b);
            let call = call_name(run, p);
            tokio::spawn(async move {
                let retriers: Vec<_> = (0..RETRIERS)
                    .map(|_| {
                        let (b, call) = (Arc::clone(&b), call.clone());
                        tokio::spawn(async move {
                            let store = Stop::none(b.store().clone());
                            checkout(&*b, &store, &call).await
                        })
                    })
                    .collect();
                let mut got = Vec::new();
                for r in retriers {
                    got.push(r.await.map_err(|e| format!("panicked: {e}")));
                }
                check(&*b, interrupt, p, &call, got).await
            })
        })
        .collect();
    let mut rows = Vec::new();
    for (t, p) in tasks.into_iter().zip(Point::ALL) {
        rows.push(t.await.unwrap_or_else(|e| Row {
            interrupt,
            point: p,
            outcome: "panicked".to_owned(),
            ledger_rows: 0,
            seen: (None, 0, 0),
            failures: vec![format!("the check panicked: {e}")],
        }));
    }
    Matrix { rows }
}

async fn check<B: CrashBackend>(
    b: &B,
    interrupt: &'static str,
    p: Point,
    call: &str,
    got: Vec<Result<Result<Receipt, Error>, String>>,
) -> Row {
    let mut failures = Vec::new();
    let got: Vec<Result<Receipt, Error>> = got
        .into_iter()
        .filter_map(|r| match r {
            Ok(r) => Some(r),
            Err(e) => {
                failures.push(e);
                None
            }
        })
        .collect();
    let outcomes: Vec<String> = got.iter().map(outcome).collect();
    let same = got.windows(2).all(|w| match (&w[0], &w[1]) {
        (Ok(a), Ok(b)) => a == b,
        (Err(a), Err(b)) => format!("{a:?}") == format!("{b:?}"),
        _ => false,
    });
    if !same {
        failures.push(format!("the retriers got different results: {got:?}"));
    }
    let outcome_word = if same {
        outcomes.first().cloned().unwrap_or_default()
    } else {
        outcomes.join("/")
    };
    let expect_doubt = p.in_doubt();
    for r in &got {
        match r {
            Ok(_) => {
                // A dropped future's step write may land from its detached task before the
                // release: the in-doubt step is then recorded as done.
                if expect_doubt && !(interrupt == "cancel" && p == Point::EmailBeforeDone) {
                    failures.push("expected StepInDoubt, the retry completed".to_owned());
                }
            }
            Err(Error::StepInDoubt { .. }) if expect_doubt => {}
            Err(e) => failures.push(format!("the retry failed: {e:?}")),
        }
    }

    // The ledger row exists once.
    let ledger_rows = match b.ledger_rows(call).await {
        Ok(rows) => rows,
        Err(e) => {
            failures.push(format!("reading the ledger: {e}"));
            Vec::new()
        }
    };
    if ledger_rows.len() != 1 {
        failures.push(format!(
            "{} ledger rows: {ledger_rows:?}",
            ledger_rows.len()
        ));
    }
    if let Some(Ok(receipt)) = got.first() {
        if ledger_rows.first() != Some(&receipt.ledger) {
            failures.push(format!(
                "the result's ledger mark {} is not the row's {ledger_rows:?}",
                receipt.ledger
            ));
        }
    }

    // The downstream: per step one key over all executions, seen at most twice, applied once.
    fn seen_of(
        failures: &mut Vec<String>,
        step: &str,
        list: Vec<(String, u64, u64)>,
        max_runs: u64,
    ) -> u64 {
        if list.len() > 1 {
            failures.push(format!(
                "{step}: {} distinct step keys: {list:?}",
                list.len()
            ));
        }
        let seen: u64 = list.iter().map(|(_, s, _)| s).sum();
        for (k, s, applied) in &list {
            if *s > max_runs {
                failures.push(format!("{step}: key {k} seen {s} times"));
            }
            if *applied != 1 {
                failures.push(format!("{step}: key {k} applied {applied} times"));
            }
        }
        seen
    }
    let down = b.downstream();
    let mut lists = Vec::new();
    for step in ["ledger", "charge", "email"] {
        match down.list(&format!("{call}/{step}/")).await {
            Ok(l) => lists.push(l),
            Err(e) => {
                failures.push(format!("reading the downstream: {e}"));
                lists.push(Vec::new());
            }
        }
    }
    let mut lists = lists.into_iter();
    let ledger_list = lists.next().unwrap_or_default();
    let transactional_ledger = ledger_list.is_empty();
    let ledger_seen = if transactional_ledger {
        None
    } else {
        Some(seen_of(&mut failures, "ledger", ledger_list, 2))
    };
    let charge_seen = seen_of(&mut failures, "charge", lists.next().unwrap_or_default(), 2);
    let email_seen = seen_of(&mut failures, "email", lists.next().unwrap_or_default(), 1);

    // Exactly where a re-run is expected (SIGKILL: the process is gone, nothing more lands).
    if interrupt == "sigkill" {
        let rerun = |at: Point| if p == at { 2 } else { 1 };
        if let Some(s) = ledger_seen {
            if s != rerun(Point::LedgerBefore) {
                failures.push(format!("ledger seen {s} times"));
            }
        }
        if charge_seen != rerun(Point::ChargeBefore) {
            failures.push(format!("charge seen {charge_seen} times"));
        }
        let email_expected = u64::from(p != Point::EmailAfterStart);
        if email_seen != email_expected {
            failures.push(format!(
                "email ran {email_seen} times, expected {email_expected}"
            ));
        }
    } else {
        if charge_seen == 0 {
            failures.push("charge never ran".to_owned());
        }
        if p == Point::EmailBeforeDone && email_seen != 1 {
            failures.push(format!("email ran {email_seen} times, expected 1"));
        }
    }
    if !expect_doubt && email_seen != 1 {
        failures.push(format!("email ran {email_seen} times, expected 1"));
    }

    Row {
        interrupt,
        point: p,
        outcome: outcome_word,
        ledger_rows: ledger_rows.len(),
        seen: (ledger_seen, charge_seen, email_seen),
        failures,
    }
}
