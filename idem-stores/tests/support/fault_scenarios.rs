//! Fault scenarios of issue 10, written once and stamped per server by
//! [`fault_scenarios!`](crate::fault_scenarios).
//!
//! Each scenario gets a [`Rig`]: a store that reaches its server through a [`Proxy`] (the
//! *holder* side, where the faults happen) and a second store on the same records that talks
//! to the server directly (the *rival* side, which would take a key over if the holder lost
//! its lease). Every scenario asserts, for its fault:
//!
//! - at most one execution of a body while the first holder is alive;
//! - every caller whose body finished gets its value (never `LeaseLost` when the store holds
//!   the completion), and every caller gets the same value;
//! - a key is never blocked past its lease after a lost reply or a cancelled caller;
//! - a store fault reaches the caller as `Error::Store` with its cause.
//!
//! Scenarios print one `fault:` line with what they measured.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_core::{
    async_trait, Call, Claim, ClaimRequest, Error, FencingToken, Key, RecordState, Store,
    StoreError,
};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::proxy::Proxy;

/// Cleanup of one rig (drop its table, delete its keys).
pub type Teardown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a scenario runs against.
pub struct Rig {
    /// The server's name, for the report lines.
    pub server: &'static str,
    /// Between `holder` and the server.
    pub proxy: Proxy,
    /// The store that reaches its server through the proxy.
    pub holder: Arc<dyn Store>,
    /// The same records, reached directly.
    pub rival: Arc<dyn Store>,
    /// Run after the scenario, even when it failed.
    teardown: std::sync::Mutex<Option<Teardown>>,
}

impl Rig {
    /// A rig from its parts.
    pub fn new(
        server: &'static str,
        proxy: Proxy,
        holder: Arc<dyn Store>,
        rival: Arc<dyn Store>,
        teardown: impl Future<Output = ()> + Send + 'static,
    ) -> Rig {
        Rig {
            server,
            proxy,
            holder,
            rival,
            teardown: std::sync::Mutex::new(Some(Box::pin(teardown))),
        }
    }
}

/// Runs one scenario in its own task, tears the rig down, then re-raises a failure.
pub async fn run<F, Fut>(rig: Option<Rig>, scenario: F)
where
    F: FnOnce(Arc<Rig>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(rig) = rig else {
        return;
    };
    let teardown = rig.teardown.lock().unwrap().take();
    let rig = Arc::new(rig);
    // Faults hit a store that is connected, as in production: open a few connections first
    // (through a slow link a fresh connection may take longer than an operation's budget).
    let warm: Vec<_> = (0..6)
        .map(|_| {
            let s = Subject::new("warm-up", Duration::from_secs(2));
            tokio::spawn(s.run(
                &rig.holder,
                Duration::from_millis(20),
                Duration::from_secs(5),
                false,
            ))
        })
        .collect();
    for w in warm {
        let _ = w.await;
    }
    let outcome =
        tokio::time::timeout(Duration::from_secs(60), tokio::spawn(scenario(rig.clone()))).await;
    rig.proxy.heal();
    if let Some(teardown) = teardown {
        teardown.await;
    }
    match outcome {
        Err(_) => panic!("{}: the scenario did not finish in 60 s", rig.server),
        Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Ok(Err(e)) => panic!("{}: scenario task failed: {e}", rig.server),
        Ok(Ok(())) => {}
    }
}

/// Stamps one test per scenario, for `idem_testkit::harness::run`: an `async fn` per
/// scenario and a `fn cases(needs) -> Vec<Case>`. `$rig` is an `async fn() -> Option<Rig>` of
/// the test file (its server is the `Need` passed to `cases`).
#[macro_export]
macro_rules! fault_scenarios {
    ($rig:path) => {
        $crate::fault_scenarios!(@stamp $rig;
            claim_reply_lost,
            completion_reply_lost,
            cut_after_claim,
            repeated_cuts_with_waiters,
            silent_partition,
            latency_against_short_lease,
            store_down_then_back,
            cancelled_during_claim,
            cancelled_during_wait,
            cancelled_during_body,
            cancelled_during_completion,
            cancelled_during_release,
        );
    };
    (@stamp $rig:path; $($name:ident),* $(,)?) => {
        $(
            async fn $name() {
                fault_scenarios::run($rig().await, fault_scenarios::$name).await;
            }
        )*

        fn cases(
            needs: &[idem_testkit::harness::Need],
        ) -> Vec<idem_testkit::harness::Case> {
            idem_testkit::test_cases!(needs, multi_thread(2); $($name),*)
        }
    };
}

/// The body's error: the runtime's, or a failure the body chooses.
#[derive(Debug)]
pub enum TestError {
    /// From the runtime.
    Idem(Error),
    /// The body failed on purpose (its claim is released, not completed).
    Body,
}

impl From<Error> for TestError {
    fn from(e: Error) -> Self {
        TestError::Idem(e)
    }
}

type Answer = Result<String, TestError>;

/// One key of one scenario, and how many times its body ran.
#[derive(Clone)]
struct Subject {
    key: String,
    lease: Duration,
    runs: Arc<AtomicUsize>,
    /// Notified each time a body starts.
    started: Arc<Notify>,
    /// Notified each time a body returns.
    finished: Arc<Notify>,
}

impl Subject {
    fn new(tag: &str, lease: Duration) -> Self {
        Subject {
            key: format!(
                "{tag}-{}-{}",
                std::process::id(),
                idem_core::FencingToken::random().0
            ),
            lease,
            runs: Arc::new(AtomicUsize::new(0)),
            started: Arc::new(Notify::new()),
            finished: Arc::new(Notify::new()),
        }
    }

    fn call(&self, wait: Duration) -> Call {
        Call::new("idem_faults")
            .key(&self.key)
            .fingerprint((&self.key, "args"))
            .lease(self.lease)
            .ttl(Duration::from_secs(120))
            .wait_timeout(wait)
    }

    /// The fingerprint as the stores carry it in a claim, raw and as hex.
    fn fingerprint_patterns(&self) -> Vec<Vec<u8>> {
        let id = self
            .call(Duration::from_secs(1))
            .identity()
            .unwrap()
            .unwrap();
        let fp = id.fingerprint.unwrap();
        vec![fp.0.to_vec(), fp.to_hex().into_bytes()]
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    /// A call whose body runs for `body`, then returns `Ok(value)` (or fails when `value`
    /// is None). Each execution gets a distinct value, so a second one would show.
    fn run(
        &self,
        store: &Arc<dyn Store>,
        body: Duration,
        wait: Duration,
        fail: bool,
    ) -> impl Future<Output = Answer> + Send + 'static {
        let store = store.clone();
        let me = self.clone();
        async move {
            let runs = me.runs.clone();
            let key = me.key.clone();
            let (started, finished) = (me.started.clone(), me.finished.clone());
            me.call(wait)
                .run(&*store, async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    started.notify_waiters();
                    tokio::time::sleep(body).await;
                    finished.notify_waiters();
                    if fail {
                        return Err(TestError::Body);
                    }
                    Ok(format!("execution-{n}-{key}"))
                })
                .await
        }
    }
}

/// Every answer is `Ok` and the same; returns the value.
fn all_agree(server: &str, what: &str, answers: &[Answer]) -> String {
    let values: Vec<&String> = answers
        .iter()
        .map(|a| match a {
            Ok(v) => v,
            Err(e) => panic!("{server}: {what}: a caller got {e:?} (answers: {answers:?})"),
        })
        .collect();
    assert!(
        values.iter().all(|v| *v == values[0]),
        "{server}: {what}: callers got different values: {values:?}"
    );
    values[0].clone()
}

async fn join_all(tasks: Vec<tokio::task::JoinHandle<Answer>>) -> Vec<Answer> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("a caller panicked"));
    }
    out
}

/// A generous bound for "free again after its lease".
fn margin(lease: Duration) -> Duration {
    lease + Duration::from_secs(3)
}

/// The claim is applied and its reply lost: the runtime's retry with the same token is
/// recognised, the body runs once, and the key is never blocked.
pub async fn claim_reply_lost(rig: Arc<Rig>) {
    let s = Subject::new("claim-lost", Duration::from_secs(2));
    rig.proxy.lose_reply_to(s.fingerprint_patterns());
    let first = s
        .run(
            &rig.holder,
            Duration::from_millis(50),
            Duration::from_secs(5),
            false,
        )
        .await;
    assert!(
        !rig.proxy.loss_armed(),
        "{}: no claim carried the fingerprint: the fault did not happen",
        rig.server
    );
    // Whatever the first caller got, the key is callable within its lease.
    let second = s
        .run(&rig.rival, Duration::ZERO, margin(s.lease), false)
        .await;
    println!(
        "fault: {} claim_reply_lost: lost {} replies; first {first:?}, then {second:?}; runs {}",
        rig.server,
        rig.proxy.lost_replies(),
        s.runs()
    );
    let value = all_agree(rig.server, "claim reply lost", &[first, second]);
    assert_eq!(s.runs(), 1, "{}: runs for {value}", rig.server);

    // Every attempt's reply lost: the caller gets `Error::Store`, its body does not run,
    // and the claims that applied do not block the key past its lease.
    let s = Subject::new("claim-lost-thrice", Duration::from_secs(2));
    // Three attempts by the runtime, and a store may resend once on a fresh connection.
    rig.proxy.lose_replies_to(s.fingerprint_patterns(), 8);
    let first = s
        .run(
            &rig.holder,
            Duration::from_millis(50),
            Duration::from_secs(5),
            false,
        )
        .await;
    let ran_first = s.runs();
    rig.proxy.heal();
    let second = s
        .run(&rig.rival, Duration::ZERO, margin(s.lease), false)
        .await;
    println!(
        "fault: {} claim_reply_lost_every_attempt: first {first:?}, then {second:?}; runs {}",
        rig.server,
        s.runs()
    );
    assert!(
        second.is_ok(),
        "{}: the key is blocked after lost claim replies: {second:?}",
        rig.server
    );
    match first {
        // The store's own retry got through (a store may retry a broken connection itself).
        Ok(v) => assert_eq!(Ok(v), second.map_err(|_| ()), "{}", rig.server),
        Err(TestError::Idem(Error::Store(_))) => {
            assert_eq!(
                ran_first, 0,
                "{}: a body ran for a failed claim",
                rig.server
            )
        }
        Err(e) => panic!("{}: every claim reply lost: {e:?}", rig.server),
    }
    assert_eq!(s.runs(), 1, "{}", rig.server);
}

/// The completion is applied and its reply lost: the caller gets its value (the retry finds
/// its own completion), and the store holds it.
pub async fn completion_reply_lost(rig: Arc<Rig>) {
    let s = Subject::new("complete-lost", Duration::from_secs(2));
    // The value is the only place where the execution's marker appears on the wire.
    let marker = format!("execution-1-{}", s.key).into_bytes();
    rig.proxy.lose_reply_to(vec![marker]);
    let first = s
        .run(
            &rig.holder,
            Duration::from_millis(50),
            Duration::from_secs(5),
            false,
        )
        .await;
    assert!(
        !rig.proxy.loss_armed(),
        "{}: no completion carried the value: the fault did not happen",
        rig.server
    );
    let second = s
        .run(&rig.rival, Duration::ZERO, margin(s.lease), false)
        .await;
    println!(
        "fault: {} completion_reply_lost: lost {} replies; first {first:?}, then {second:?}; runs {}",
        rig.server,
        rig.proxy.lost_replies(),
        s.runs()
    );
    all_agree(rig.server, "completion reply lost", &[first, second]);
    assert_eq!(s.runs(), 1, "{}", rig.server);
}

/// Starts a holder whose body runs `body`, waits until it is inside, then runs `fault`
/// and `rivals` callers on the rival store and `waiters` callers on the holder's store.
/// The holder and the rivals must get the holder's value, the waiters too unless
/// `waiters_may_fail` (then they may get `Error::Store`), and the body must run once.
#[allow(clippy::too_many_arguments)]
async fn holder_under_fault(
    rig: &Rig,
    name: &str,
    lease: Duration,
    body: Duration,
    rivals: usize,
    waiters: usize,
    waiters_may_fail: bool,
    fault: impl Future<Output = ()>,
) {
    let s = Subject::new(name, lease);
    let started = s.started.notified();
    let holder = tokio::spawn(s.run(&rig.holder, body, Duration::from_secs(20), false));
    if tokio::time::timeout(Duration::from_secs(10), started)
        .await
        .is_err()
    {
        let r = if holder.is_finished() {
            format!("{:?}", holder.await)
        } else {
            "still waiting".to_owned()
        };
        panic!(
            "{}: {name}: the holder never started its body: {r}",
            rig.server
        );
    }
    let mut tasks = vec![holder];
    // The waiters go through a store that counts the conflicts its claims were answered.
    // Waiters that must get the value are waiting before the fault starts: a caller's first
    // claim is not a wait, and one that meets the fault fails closed (`Error::Store`, body
    // not run), as the contract says of any store failure; a caller that is waiting keeps
    // its `wait_timeout`. (Where waiters may fail, the fault starts at once, as before.)
    let watched = Arc::new(Watched {
        inner: rig.holder.clone(),
        conflicts: AtomicUsize::new(0),
    });
    let waiting: Arc<dyn Store> = watched.clone();
    for _ in 0..rivals {
        tasks.push(tokio::spawn(s.run(
            &rig.rival,
            body,
            Duration::from_secs(20),
            false,
        )));
    }
    for _ in 0..waiters {
        tasks.push(tokio::spawn(s.run(
            &waiting,
            body,
            Duration::from_secs(20),
            false,
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !waiters_may_fail && watched.conflicts.load(Ordering::SeqCst) < waiters {
        assert!(
            Instant::now() < deadline,
            "{}: {name}: the waiters never started waiting",
            rig.server
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fault.await;
    let answers = join_all(tasks).await;
    let errors: Vec<_> = answers.iter().filter(|a| a.is_err()).collect();
    println!(
        "fault: {} {name}: {} callers, {} errors {errors:?}, runs {}, cut {} connections",
        rig.server,
        answers.len(),
        errors.len(),
        s.runs(),
        rig.proxy.cut_connections()
    );
    // The holder and the rivals must all get the value; callers on the faulted side may
    // fail only as `Error::Store` (their body never ran), and only where the fault allows it.
    let (mut must, mut may) = (Vec::new(), Vec::new());
    for (i, a) in answers.into_iter().enumerate() {
        if i > rivals && waiters_may_fail {
            may.push(a);
        } else {
            must.push(a);
        }
    }
    let value = all_agree(rig.server, name, &must);
    for a in &may {
        match a {
            Ok(v) => assert_eq!(
                v, &value,
                "{}: {name}: a waiter got another value",
                rig.server
            ),
            Err(TestError::Idem(Error::Store(_))) => {}
            Err(e) => panic!("{}: {name}: a waiter got {e:?}", rig.server),
        }
    }
    assert_eq!(
        s.runs(),
        1,
        "{}: {name}: the body ran again while its holder was alive",
        rig.server
    );
}

/// A store that counts the claims it answered [`Claim::InProgress`]: a caller answered so is
/// waiting.
#[derive(Debug)]
struct Watched {
    inner: Arc<dyn Store>,
    conflicts: AtomicUsize,
}

#[async_trait]
impl Store for Watched {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let claim = self.inner.claim(req).await?;
        if matches!(claim, Claim::InProgress { .. }) {
            self.conflicts.fetch_add(1, Ordering::SeqCst);
        }
        Ok(claim)
    }
    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
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
    fn release_detached(&self, key: Key, token: FencingToken) {
        self.inner.release_detached(key, token)
    }
    fn detached(&self) -> Option<Arc<dyn Store>> {
        self.inner.detached()
    }
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn process_local(&self) -> bool {
        self.inner.process_local()
    }
}

/// Every connection is cut right after the claim, while the body runs for 3 leases.
pub async fn cut_after_claim(rig: Arc<Rig>) {
    let lease = Duration::from_millis(600);
    let proxy = &rig.proxy;
    holder_under_fault(
        &rig,
        "cut_after_claim",
        lease,
        lease * 3,
        4,
        2,
        false,
        async {
            proxy.cut_all();
        },
    )
    .await;
}

/// Every connection is cut every 250 ms while the holder runs and 8 waiters wait on the
/// holder's side of the proxy: every waiter gets the holder's value (a waiter's claims that
/// fail on a cut connection are retried within its `wait_timeout`), and the holder keeps its
/// lease through the cuts. The interval leaves room for one fresh connection and one
/// statement between two cuts (a PostgreSQL connection alone took 120–210 ms on a loaded
/// 2-core machine: at 100 ms no renewal could ever get through, which no lease survives).
pub async fn repeated_cuts_with_waiters(rig: Arc<Rig>) {
    let lease = Duration::from_millis(1000);
    let proxy = &rig.proxy;
    holder_under_fault(
        &rig,
        "repeated_cuts",
        lease,
        lease * 3,
        0,
        8,
        false,
        async {
            for _ in 0..12 {
                tokio::time::sleep(Duration::from_millis(250)).await;
                proxy.cut_all();
            }
        },
    )
    .await;
}

/// A silent partition of 0.7 s under a 1.5 s lease: nothing passes, then everything does.
pub async fn silent_partition(rig: Arc<Rig>) {
    let lease = Duration::from_millis(1500);
    let proxy = &rig.proxy;
    holder_under_fault(
        &rig,
        "silent_partition",
        lease,
        Duration::from_millis(3500),
        4,
        0,
        false,
        async {
            // Land it anywhere in the renewal period.
            tokio::time::sleep(Duration::from_millis(
                idem_core::FencingToken::random().0 % 500,
            ))
            .await;
            proxy.black_hole(Duration::from_millis(700));
        },
    )
    .await;
}

/// 120 ms each way against a 600 ms lease.
///
/// First the link turns slow while a holder runs (renewals and the completion cross it):
/// everyone gets the holder's value, and the body runs once. Then a call starts on the slow
/// link: a 240 ms round trip does not fit every store's claim in the runtime's bound on one
/// operation (`lease/2` = 300 ms; a store that needs two round trips cannot make it), so that
/// caller may get `Error::Store` (its body not run); it never causes a second execution.
pub async fn latency_against_short_lease(rig: Arc<Rig>) {
    let lease = Duration::from_millis(600);
    let proxy = &rig.proxy;
    holder_under_fault(&rig, "latency_120ms", lease, lease * 3, 4, 2, true, async {
        proxy.set_latency(Duration::from_millis(120));
    })
    .await;
    let s = Subject::new("latency-cold", lease);
    let slow = s
        .run(
            &rig.holder,
            Duration::from_millis(100),
            Duration::from_secs(10),
            false,
        )
        .await;
    let direct = s
        .run(&rig.rival, Duration::ZERO, margin(lease), false)
        .await;
    println!(
        "fault: {} latency_120ms_from_the_claim: slow caller {slow:?}, direct caller {direct:?}, runs {}",
        rig.server,
        s.runs()
    );
    match &slow {
        Ok(_) => {
            all_agree(rig.server, "latency from the claim", &[slow, direct]);
        }
        Err(TestError::Idem(Error::Store(_))) => {
            assert!(direct.is_ok(), "{}: {direct:?}", rig.server)
        }
        Err(e) => panic!("{}: latency from the claim: {e:?}", rig.server),
    }
    assert_eq!(s.runs(), 1, "{}", rig.server);
}

/// The store is down: a call fails with `Error::Store` and its cause, without running its
/// body. It comes back: calls work again. And a holder whose store goes away for a moment
/// (shorter than a third of its lease) keeps its claim.
pub async fn store_down_then_back(rig: Arc<Rig>) {
    let s = Subject::new("down", Duration::from_millis(600));
    rig.proxy.set_down(true);
    let down = s
        .run(&rig.holder, Duration::ZERO, Duration::from_secs(1), false)
        .await;
    match &down {
        Err(TestError::Idem(Error::Store(e))) => {
            let cause = std::error::Error::source(e)
                .map(|c| c.to_string())
                .unwrap_or_default();
            println!(
                "fault: {} store_down: Error::Store: {e} (cause: {cause})",
                rig.server
            );
            assert!(
                !e.to_string().is_empty(),
                "{}: Error::Store without a cause",
                rig.server
            );
        }
        other => panic!(
            "{}: with the store down, expected Error::Store, got {other:?}",
            rig.server
        ),
    }
    assert_eq!(s.runs(), 0, "{}: a body ran without its store", rig.server);
    rig.proxy.set_down(false);
    // Back: the store reconnects (give it its reconnect backoff).
    let deadline = Instant::now() + Duration::from_secs(15);
    let back = loop {
        let r = s
            .run(&rig.holder, Duration::ZERO, Duration::from_secs(5), false)
            .await;
        if r.is_ok() || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        back.is_ok(),
        "{}: after the store came back: {back:?}",
        rig.server
    );
    assert_eq!(s.runs(), 1, "{}", rig.server);
    println!("fault: {} store_back: {back:?}", rig.server);

    // Down for 150 ms (a quarter of the lease) while a holder runs.
    let lease = Duration::from_millis(600);
    let proxy = &rig.proxy;
    holder_under_fault(
        &rig,
        "down_during_body",
        lease,
        lease * 3,
        4,
        0,
        false,
        async {
            proxy.set_down(true);
            tokio::time::sleep(Duration::from_millis(150)).await;
            proxy.set_down(false);
        },
    )
    .await;
}

/// Drops a call after `cancel` resolves; returns whether the call had finished first.
async fn cancel_when<F: Future<Output = Answer>>(
    call: F,
    cancel: impl Future<Output = ()>,
) -> Option<Answer> {
    tokio::select! {
        r = call => Some(r),
        _ = cancel => None,
    }
}

/// Asserts that a fresh call on the rival side gets a value within the lease plus a margin
/// (the key is not blocked), and returns it.
async fn callable(rig: &Rig, s: &Subject, what: &str) -> String {
    let r = s
        .run(&rig.rival, Duration::ZERO, margin(s.lease), false)
        .await;
    match r {
        Ok(v) => v,
        Err(e) => panic!(
            "{}: {what}: the key is not callable after its lease: {e:?}",
            rig.server
        ),
    }
}

/// The caller goes away while its claim is on the (slow) wire: the key is not blocked.
pub async fn cancelled_during_claim(rig: Arc<Rig>) {
    let s = Subject::new("cancel-claim", Duration::from_secs(2));
    rig.proxy.set_latency(Duration::from_millis(100));
    let r = cancel_when(
        s.run(&rig.holder, Duration::ZERO, Duration::from_secs(5), false),
        tokio::time::sleep(Duration::from_millis(120)),
    )
    .await;
    assert!(
        r.is_none(),
        "{}: the call finished before its cancel: {r:?}",
        rig.server
    );
    rig.proxy.set_latency(Duration::ZERO);
    let v = callable(&rig, &s, "cancelled during claim").await;
    println!(
        "fault: {} cancelled_during_claim: then {v}, runs {}",
        rig.server,
        s.runs()
    );
    assert_eq!(s.runs(), 1, "{}", rig.server);
}

/// A waiter goes away: the holder is not disturbed, and a later caller gets its value.
pub async fn cancelled_during_wait(rig: Arc<Rig>) {
    let s = Subject::new("cancel-wait", Duration::from_secs(2));
    let started = s.started.notified();
    let holder = tokio::spawn(s.run(
        &rig.rival,
        Duration::from_millis(800),
        Duration::from_secs(5),
        false,
    ));
    started.await;
    rig.proxy.set_latency(Duration::from_millis(20));
    let r = cancel_when(
        s.run(&rig.holder, Duration::ZERO, Duration::from_secs(10), false),
        tokio::time::sleep(Duration::from_millis(300)),
    )
    .await;
    assert!(
        r.is_none(),
        "{}: the waiter finished before its cancel: {r:?}",
        rig.server
    );
    let held = holder.await.unwrap();
    rig.proxy.set_latency(Duration::ZERO);
    let later = s
        .run(&rig.holder, Duration::ZERO, Duration::from_secs(5), false)
        .await;
    println!(
        "fault: {} cancelled_during_wait: holder {held:?}, later {later:?}, runs {}",
        rig.server,
        s.runs()
    );
    all_agree(rig.server, "cancelled during wait", &[held, later]);
    assert_eq!(s.runs(), 1, "{}", rig.server);
}

/// The caller goes away while its body runs: the claim is released (the body did not
/// finish, so running it again is right), and the key is free at once.
pub async fn cancelled_during_body(rig: Arc<Rig>) {
    let s = Subject::new("cancel-body", Duration::from_secs(2));
    let started = s.started.notified();
    let r = cancel_when(
        s.run(
            &rig.holder,
            Duration::from_secs(5),
            Duration::from_secs(5),
            false,
        ),
        started,
    )
    .await;
    assert!(r.is_none(), "{}: {r:?}", rig.server);
    let v = callable(&rig, &s, "cancelled during body").await;
    println!(
        "fault: {} cancelled_during_body: then {v}, runs {}",
        rig.server,
        s.runs()
    );
    assert_eq!(
        s.runs(),
        2,
        "{}: the cancelled body and the next caller's",
        rig.server
    );
}

/// The caller goes away while the completion is on the (slow) wire: the completion still
/// lands (from a detached task), and the next caller gets the value without a second run.
pub async fn cancelled_during_completion(rig: Arc<Rig>) {
    let s = Subject::new("cancel-complete", Duration::from_secs(2));
    // The link turns slow once the claim is done, so that the step after the body lasts.
    let (started, finished) = (s.started.notified(), s.finished.notified());
    let r = cancel_when(
        s.run(
            &rig.holder,
            Duration::from_millis(400),
            Duration::from_secs(5),
            false,
        ),
        async {
            started.await;
            rig.proxy.set_latency(Duration::from_millis(100));
            finished.await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        },
    )
    .await;
    assert!(
        r.is_none(),
        "{}: the call finished before its cancel: {r:?}",
        rig.server
    );
    let v = callable(&rig, &s, "cancelled during completion").await;
    rig.proxy.set_latency(Duration::ZERO);
    println!(
        "fault: {} cancelled_during_completion: then {v}, runs {}",
        rig.server,
        s.runs()
    );
    assert_eq!(
        s.runs(),
        1,
        "{}: the completion was abandoned and the body ran again",
        rig.server
    );
    assert_eq!(v, format!("execution-1-{}", s.key), "{}", rig.server);
}

/// The caller goes away while the release of its failed body is on the wire: the key is
/// free for the next caller (within the lease at worst).
pub async fn cancelled_during_release(rig: Arc<Rig>) {
    let s = Subject::new("cancel-release", Duration::from_secs(2));
    // The link turns slow once the claim is done, so that the step after the body lasts.
    let (started, finished) = (s.started.notified(), s.finished.notified());
    let r = cancel_when(
        s.run(
            &rig.holder,
            Duration::from_millis(400),
            Duration::from_secs(5),
            true,
        ),
        async {
            started.await;
            rig.proxy.set_latency(Duration::from_millis(100));
            finished.await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        },
    )
    .await;
    assert!(
        r.is_none(),
        "{}: the call finished before its cancel: {r:?}",
        rig.server
    );
    let v = callable(&rig, &s, "cancelled during release").await;
    rig.proxy.set_latency(Duration::ZERO);
    println!(
        "fault: {} cancelled_during_release: then {v}, runs {}",
        rig.server,
        s.runs()
    );
    assert_eq!(
        s.runs(),
        2,
        "{}: the failed body and the next caller's",
        rig.server
    );
}
