//! Chaos across processes (issue 10): 4 worker processes × 32 tasks call keys (200 fresh keys
//! every 3 s) with a 500 ms lease on one store, while the driver SIGKILLs a random worker every
//! 150–450 ms and starts a new one, for 30 s per store (Redis, PostgreSQL, MariaDB).
//!
//! Each body commits a `start` row and, 5–80 ms later (one in ten: 300–900 ms, across several
//! renewals), a `finish` row to a ledger table in PostgreSQL, with its process id; workers
//! print what each caller got. Afterwards the driver kills the last workers and calls every
//! key once more (each must answer within lease + 3 s), then classifies every key that was
//! executed more than once:
//!
//! - legitimate: every earlier execution's process had been killed before the later one
//!   started (before its `finish`, or after it and before its completion was stored);
//! - a failure: a later execution started while an earlier one's process was alive (running
//!   its body, or completing it, or done with it), callers of one key got different values,
//!   or a key did not answer in the final pass.
//!
//! **Steps mode** (`chaos_steps_*`): each body is three durable steps (`s0`, `s1`, `s2`), each
//! committing its own `start` and `finish` rows, and a `rec` row once `step(..).await` returned
//! (its record is written). Every execution of a step after the first is classified like a
//! call's: legitimate when every earlier execution's process had been killed before it
//! started — mid-step (before its `finish`), or after its effect and before its record — and a
//! failure when an earlier execution of that step had been recorded (a finished step ran
//! again). A re-execution beside a live holder that had lost its lease (it stalled past it, and
//! its step write was refused) is counted, not asserted here: the call mode asserts that
//! property. The run reports the re-executions per step: they are only ever of the step that
//! was interrupted. 30 s on PostgreSQL and Redis, 10 s on MariaDB.
//!
//! The parent re-executes this test binary (`--exact chaos_worker`) with `IDEM_CHAOS_ROLE`
//! set; without it `chaos_worker` does nothing. The store tests run one at a time.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/sql_common.rs"]
mod sql_common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_core::{
    step, Call, Claim, ClaimRequest, Error, FencingToken, Key, RecordState, StepId, StepRecord,
    StepStatus, Store, StoreError,
};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::AssertSqlSafe;

const WORKERS: usize = 4;
const TASKS: usize = 32;
/// Fresh keys per round; a round lasts `ROUND_MS`.
const KEYS: u64 = 200;
const ROUND_MS: u64 = 3000;
const LEASE: Duration = Duration::from_millis(500);
const CHAOS: Duration = Duration::from_secs(30);
/// The steps mode's run on a third store (PostgreSQL and Redis run `CHAOS`).
#[cfg_attr(not(feature = "mysql"), allow(dead_code))]
const CHAOS_STEPS_SHORT: Duration = Duration::from_secs(10);
/// The steps of a body in steps mode.
const STEPS: u64 = 3;
/// How long after its lease a key may still be blocked in the final pass.
const MARGIN: Duration = Duration::from_secs(3);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Steps mode: the (call, step) pairs whose `Done` record this process's store wrapper saw
/// written (`put_step` answered `Ok`). A step that returned without it (its write failed or
/// timed out: the step is then at least once) is not logged as recorded.
static RECORDED: Mutex<Option<HashSet<(Key, String)>>> = Mutex::new(None);

fn unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// A small xorshift, seeded per process.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        Rng(idem_core::FencingToken::random().0 | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Which store a run is on, and where its records live (a key prefix or a table).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Redis,
    Postgres,
    Mysql,
}

impl Kind {
    fn parse(s: &str) -> Kind {
        match s {
            "redis" => Kind::Redis,
            "postgres" => Kind::Postgres,
            "mysql" => Kind::Mysql,
            other => panic!("unknown store {other}"),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Redis => "redis",
            Kind::Postgres => "postgres",
            Kind::Mysql => "mysql",
        }
    }
    fn url_var(self) -> &'static str {
        match self {
            Kind::Redis => "IDEM_TEST_REDIS_URL",
            Kind::Postgres => "IDEM_TEST_POSTGRES_URL",
            Kind::Mysql => "IDEM_TEST_MYSQL_URL",
        }
    }
}

/// The one place that builds each store (their builders may change), with the stores' default
/// pools (10 connections): four workers, the driver and their ledger pools stay under
/// PostgreSQL's default 100 connections.
async fn store(kind: Kind, url: &str, target: &str) -> Arc<dyn Store> {
    match kind {
        #[cfg(feature = "redis")]
        Kind::Redis => Arc::new(
            idem_stores::RedisStore::builder(url)
                .prefix(target)
                .build()
                .await
                .expect("connect to Redis"),
        ),
        Kind::Postgres => Arc::new(
            idem_stores::PostgresStore::builder()
                .url(url)
                .table(target)
                .build()
                .expect("build the PostgreSQL store"),
        ),
        #[cfg(feature = "mysql")]
        Kind::Mysql => Arc::new(
            idem_stores::MySqlStore::builder()
                .url(url)
                .table(target)
                .build()
                .expect("build the MySQL store"),
        ),
        #[allow(unreachable_patterns)]
        other => panic!("{other:?} is not built into this test binary"),
    }
}

/// Creates the store's table (SQL) before the run.
async fn prepare(kind: Kind, url: &str, target: &str) {
    match kind {
        Kind::Postgres => idem_stores::PostgresStore::builder()
            .url(url)
            .table(target)
            .build()
            .unwrap()
            .migrate()
            .await
            .unwrap(),
        #[cfg(feature = "mysql")]
        Kind::Mysql => {
            let store = idem_stores::MySqlStore::builder()
                .url(url)
                .table(target)
                .max_connections(1)
                .build()
                .unwrap();
            store.migrate().await.unwrap();
            store.pool().close().await;
        }
        _ => {}
    }
}

/// Removes the run's records.
async fn cleanup(kind: Kind, url: &str, target: &str) {
    match kind {
        #[cfg(feature = "redis")]
        Kind::Redis => {
            let Ok(client) = redis::Client::open(url) else {
                return;
            };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                return;
            };
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{target}*"))
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            for chunk in keys.chunks(500) {
                let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
            }
        }
        Kind::Postgres => {
            if let Ok(pool) = ledger_pool(url, 1).await {
                for t in [target.to_owned(), format!("{target}_steps")] {
                    let sql = format!("DROP TABLE IF EXISTS \"{t}\", \"{t}_steps\"");
                    let _ = sqlx::query(AssertSqlSafe(sql)).execute(&pool).await;
                }
                pool.close().await;
            }
        }
        #[cfg(feature = "mysql")]
        Kind::Mysql => {
            if let Ok(pool) = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(1)
                .connect(url)
                .await
            {
                for t in [target.to_owned(), format!("{target}_steps")] {
                    let sql = format!("DROP TABLE IF EXISTS `{t}`, `{t}_steps`");
                    let _ = sqlx::query(AssertSqlSafe(sql)).execute(&pool).await;
                }
                pool.close().await;
            }
        }
        #[allow(unreachable_patterns)]
        _ => {}
    }
}

async fn ledger_pool(url: &str, max: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
}

/// The worker's store, wrapped to report its slow, failed and cancelled operations on
/// stdout (`OP <op> <slow|cancelled|error> <ms>`), so that a failed run says where the time
/// went: a renewal slower than `lease/4` or a claim or completion slower than `lease/2` is
/// past the runtime's bound on it.
#[derive(Debug, Clone)]
struct Timed(Arc<dyn Store>);

/// Reports one operation when it ends or is dropped unfinished.
struct Probe {
    op: &'static str,
    start: std::time::Instant,
    outcome: Option<&'static str>,
}

impl Probe {
    fn new(op: &'static str) -> Probe {
        Probe {
            op,
            start: std::time::Instant::now(),
            outcome: None,
        }
    }
    fn finish<T>(mut self, r: &Result<T, StoreError>) {
        self.outcome = Some(if r.is_err() { "error" } else { "ok" });
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let ms = self.start.elapsed().as_millis();
        let slow = match self.op {
            "renew" => LEASE / 4,
            "wait" => Duration::MAX,
            _ => LEASE / 2,
        };
        let outcome = match self.outcome {
            None => "cancelled",
            Some("ok") if self.start.elapsed() > slow => "slow",
            Some("ok") => return,
            Some(other) => other,
        };
        println!("OP {} {outcome} {ms}", self.op);
    }
}

#[idem_core::async_trait]
impl Store for Timed {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let p = Probe::new("claim");
        let r = self.0.claim(req).await;
        p.finish(&r);
        r
    }
    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let p = Probe::new("complete");
        let r = self.0.complete(key, token, value, ttl).await;
        p.finish(&r);
        r
    }
    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError> {
        let p = Probe::new("release");
        let r = self.0.release(key, token).await;
        p.finish(&r);
        r
    }
    async fn renew(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let p = Probe::new("renew");
        let r = self.0.renew(key, token, lease).await;
        p.finish(&r);
        r
    }
    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError> {
        self.0.get(key).await
    }
    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        let p = Probe::new("wait");
        let r = self.0.wait(key, timeout).await;
        p.finish(&r);
        r
    }
    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        self.0.remove(key).await
    }
    fn release_detached(&self, key: Key, token: FencingToken) {
        self.0.release_detached(key, token)
    }
    fn detached(&self) -> Option<Arc<dyn Store>> {
        self.0
            .detached()
            .map(|s| Arc::new(Timed(s)) as Arc<dyn Store>)
    }
    fn max_value_size(&self) -> usize {
        self.0.max_value_size()
    }
    fn visit_completed_now(
        &self,
        key: &Key,
        visit: &mut dyn FnMut(idem_core::CompletedRef<'_>),
    ) -> bool {
        self.0.visit_completed_now(key, visit)
    }
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn supports_steps(&self) -> bool {
        self.0.supports_steps()
    }
    async fn load_steps(&self, key: &Key) -> Result<Vec<StepRecord>, StoreError> {
        let p = Probe::new("load_steps");
        let r = self.0.load_steps(key).await;
        p.finish(&r);
        r
    }
    async fn put_step(
        &self,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let p = Probe::new("put_step");
        let r = self.0.put_step(key, token, step, ttl).await;
        p.finish(&r);
        if r.is_ok() && step.status == StepStatus::Done {
            RECORDED
                .lock()
                .unwrap()
                .get_or_insert_with(HashSet::new)
                .insert((*key, step.id.name.clone()));
        }
        r
    }
    async fn clear_step(
        &self,
        key: &Key,
        token: FencingToken,
        id: &StepId,
    ) -> Result<(), StoreError> {
        self.0.clear_step(key, token, id).await
    }
}

/// The body's error: the runtime's, or a ledger write that failed.
#[derive(Debug)]
#[allow(dead_code)] // read through Debug
enum ChaosError {
    Idem(Error),
    Ledger(String),
}

impl From<Error> for ChaosError {
    fn from(e: Error) -> Self {
        ChaosError::Idem(e)
    }
}

/// What every process needs to make one call.
struct Ctx {
    store: Arc<dyn Store>,
    ledger: PgPool,
    insert: String,
    run: String,
    seq: AtomicU64,
    steps: bool,
}

impl Ctx {
    /// One idempotent call of key `id`: the body writes `start`, sleeps, writes `finish`,
    /// and returns its execution id (`pid-task-seq`), distinct per execution.
    async fn call(&self, id: u64, task: usize, rng: &mut Rng) -> Result<String, ChaosError> {
        if self.steps {
            return self.call_steps(id, task, rng).await;
        }
        let pid = std::process::id();
        let sleep = if rng.below(10) == 0 {
            300 + rng.below(600)
        } else {
            5 + rng.below(75)
        };
        let exec = format!("{pid}-{task}-{}", self.seq.fetch_add(1, Ordering::Relaxed));
        Call::new("idem_chaos")
            .scope(&self.run)
            .key(id)
            .lease(LEASE)
            .ttl(Duration::from_secs(600))
            .wait_timeout(Duration::from_secs(10))
            .run(&*self.store, async {
                self.log(id, &exec, pid, "start").await?;
                tokio::time::sleep(Duration::from_millis(sleep)).await;
                self.log(id, &exec, pid, "finish").await?;
                Ok(exec.clone())
            })
            .await
    }

    /// Steps mode: the body runs steps `s0`..`s2`; each step's execution writes
    /// `s<n>.start`, sleeps, writes `s<n>.finish` and returns its execution id
    /// (`<exec>.s<n>`); once the step returned (recorded or replayed), the body writes
    /// `s<n>.rec` with the id it got. The call's value is the three ids.
    async fn call_steps(&self, id: u64, task: usize, rng: &mut Rng) -> Result<String, ChaosError> {
        let pid = std::process::id();
        let exec = format!("{pid}-{task}-{}", self.seq.fetch_add(1, Ordering::Relaxed));
        let sleeps: Vec<u64> = (0..STEPS)
            .map(|_| {
                if rng.below(10) == 0 {
                    300 + rng.below(600)
                } else {
                    5 + rng.below(75)
                }
            })
            .collect();
        Call::new("idem_chaos_steps")
            .scope(&self.run)
            .key(id)
            .lease(LEASE)
            .ttl(Duration::from_secs(600))
            .wait_timeout(Duration::from_secs(10))
            .run(&*self.store, async {
                let mut got = Vec::new();
                for (n, sleep) in sleeps.iter().enumerate() {
                    let step_exec = format!("{exec}.s{n}");
                    let value = step(format!("s{n}"), async {
                        self.log(id, &step_exec, pid, &format!("s{n}.start"))
                            .await?;
                        tokio::time::sleep(Duration::from_millis(*sleep)).await;
                        self.log(id, &step_exec, pid, &format!("s{n}.finish"))
                            .await?;
                        Ok::<_, ChaosError>(step_exec.clone())
                    })
                    .await?;
                    let recorded = idem_core::current_key().is_some_and(|k| {
                        RECORDED
                            .lock()
                            .unwrap()
                            .get_or_insert_with(HashSet::new)
                            .remove(&(k, format!("s{n}")))
                    });
                    if recorded {
                        self.log(id, &value, pid, &format!("s{n}.rec")).await?;
                    }
                    got.push(value);
                }
                Ok(got.join(" "))
            })
            .await
    }

    async fn log(&self, id: u64, exec: &str, pid: u32, kind: &str) -> Result<(), ChaosError> {
        sqlx::query(AssertSqlSafe(self.insert.clone()))
            .bind(id as i64)
            .bind(exec)
            .bind(pid as i64)
            .bind(kind)
            .execute(&self.ledger)
            .await
            .map(|_| ())
            .map_err(|e| ChaosError::Ledger(e.to_string()))
    }
}

#[allow(clippy::too_many_arguments)]
async fn ctx(
    steps: bool,
    timed: bool,
    kind: Kind,
    url: &str,
    target: &str,
    ledger_url: &str,
    ledger: &str,
    run: &str,
) -> Ctx {
    let store = store(kind, url, target).await;
    Ctx {
        store: if timed { Arc::new(Timed(store)) } else { store },
        ledger: ledger_pool(ledger_url, 4)
            .await
            .expect("connect to the ledger"),
        insert: format!(
            "INSERT INTO \"{ledger}\" (k, exec, pid, kind, at_us) VALUES ($1, $2, $3, $4, \
             (extract(epoch from clock_timestamp()) * 1000000)::bigint)"
        ),
        run: run.to_owned(),
        seq: AtomicU64::new(0),
        steps,
    }
}

/// The worker side: does nothing unless `IDEM_CHAOS_ROLE` is set by the driver.
async fn chaos_worker() {
    if std::env::var_os("IDEM_CHAOS_ROLE").is_none() {
        return;
    }
    let var = |name: &str| std::env::var(name).unwrap();
    let kind = Kind::parse(&var("IDEM_CHAOS_STORE"));
    let ctx = Arc::new(
        ctx(
            var("IDEM_CHAOS_MODE") == "steps",
            true,
            kind,
            &var("IDEM_CHAOS_URL"),
            &var("IDEM_CHAOS_TARGET"),
            &var("IDEM_CHAOS_LEDGER_URL"),
            &var("IDEM_CHAOS_LEDGER"),
            &var("IDEM_CHAOS_RUN"),
        )
        .await,
    );
    let start_us: i64 = var("IDEM_CHAOS_START").parse().unwrap();
    let until_us: i64 = var("IDEM_CHAOS_UNTIL").parse().unwrap();
    // libtest prints "test chaos_worker ... " without a newline first.
    println!();
    // (key, value) pairs this process reported already: one line each.
    let seen = Arc::new(Mutex::new(HashSet::<(u64, String)>::new()));
    let calls = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (ctx, seen, calls) = (ctx.clone(), seen.clone(), calls.clone());
            tokio::spawn(async move {
                let mut rng = Rng::new();
                loop {
                    let now = unix_us();
                    if now >= until_us {
                        return;
                    }
                    let round = ((now - start_us).max(0) as u64 / 1000) / ROUND_MS;
                    let id = round * KEYS + rng.below(KEYS);
                    let r = ctx.call(id, task, &mut rng).await;
                    calls.fetch_add(1, Ordering::Relaxed);
                    match r {
                        Ok(v) => {
                            if seen.lock().unwrap().insert((id, v.clone())) {
                                println!("GOT {id} {v}");
                            }
                        }
                        Err(e) => println!("ERR {id} {e:?}"),
                    }
                    tokio::time::sleep(Duration::from_millis(2 + rng.below(10))).await;
                }
            })
        })
        .collect();
    let reporter = {
        let calls = calls.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let now = calls.load(Ordering::Relaxed);
                println!("CALLS {}", now - last);
                last = now;
            }
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    reporter.abort();
}

/// What the driver learned from the workers' output.
#[derive(Default)]
struct Reports {
    /// key -> values its callers got
    got: BTreeMap<u64, BTreeSet<String>>,
    errors: BTreeMap<String, u64>,
    calls: u64,
    /// (op, outcome) -> (count, longest ms): the store operations past their bound.
    ops: BTreeMap<String, (u64, u64)>,
}

fn read_reports(child: &mut Child, reports: Arc<Mutex<Reports>>) -> std::thread::JoinHandle<()> {
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            let mut parts = line.splitn(3, ' ');
            let mut r = reports.lock().unwrap();
            match (parts.next(), parts.next(), parts.next()) {
                (Some("GOT"), Some(id), Some(v)) => {
                    if let Ok(id) = id.parse() {
                        r.got.entry(id).or_default().insert(v.to_owned());
                    }
                }
                (Some("ERR"), Some(_), Some(e)) => {
                    let kind: String = e.chars().take(60).collect();
                    *r.errors.entry(kind).or_default() += 1;
                }
                (Some("CALLS"), Some(n), None) => r.calls += n.parse::<u64>().unwrap_or(0),
                (Some("OP"), Some(op), Some(rest)) => {
                    let (outcome, ms) = rest.split_once(' ').unwrap_or((rest, "0"));
                    let e = r.ops.entry(format!("{op} {outcome}")).or_default();
                    e.0 += 1;
                    e.1 = e.1.max(ms.parse().unwrap_or(0));
                }
                _ => {}
            }
        }
    })
}

/// One execution, from the ledger.
#[derive(Debug, Clone)]
struct Exec {
    exec: String,
    pid: u32,
    start: i64,
    finish: Option<i64>,
}

/// The run's verdict.
#[derive(Debug, Default)]
struct Verdict {
    keys: usize,
    executions: usize,
    rerun_keys: usize,
    legit_reruns: usize,
    /// A re-run after its holder was killed between its body's end and its completion.
    reruns_after_finish: usize,
    alive_duplicates: Vec<String>,
    disagreeing: Vec<String>,
    stuck: Vec<String>,
    phantom: Vec<String>,
}

fn classify(
    ledger: &BTreeMap<u64, Vec<Exec>>,
    killed: &HashMap<u32, i64>,
    got: &BTreeMap<u64, BTreeSet<String>>,
) -> Verdict {
    let mut v = Verdict {
        keys: ledger.len(),
        ..Verdict::default()
    };
    for (id, execs) in ledger {
        v.executions += execs.len();
        if execs.len() > 1 {
            v.rerun_keys += 1;
        }
        let completed: HashSet<&str> = got
            .get(id)
            .map(|g| g.iter().map(String::as_str).collect())
            .unwrap_or_default();
        for (j, later) in execs.iter().enumerate().skip(1) {
            let mut bad = None;
            let mut after_finish = false;
            for earlier in &execs[..j] {
                let dead_by = killed.get(&earlier.pid).copied();
                match (earlier.finish, dead_by) {
                    (Some(f), _) if later.start < f => {
                        bad = Some(format!("started during {}'s body", earlier.exec))
                    }
                    (Some(_), _) if completed.contains(earlier.exec.as_str()) => {
                        bad = Some(format!("ran again after {} was completed", earlier.exec))
                    }
                    (_, Some(k)) if k <= later.start => after_finish |= earlier.finish.is_some(),
                    (Some(_), _) => {
                        bad = Some(format!(
                            "started after {} finished, its process alive",
                            earlier.exec
                        ))
                    }
                    (None, _) => {
                        bad = Some(format!(
                            "started during {}'s body, its process alive",
                            earlier.exec
                        ))
                    }
                }
            }
            match bad {
                Some(why) => {
                    // Times in ms from the first execution's start.
                    let t0 = execs[0].start;
                    let ms = |us: i64| (us - t0) / 1000;
                    let history: Vec<String> = execs[..=j]
                        .iter()
                        .map(|e| {
                            format!(
                                "{} {}..{} killed {}",
                                e.exec,
                                ms(e.start),
                                e.finish.map_or("-".into(), |f| ms(f).to_string()),
                                killed
                                    .get(&e.pid)
                                    .map_or("-".into(), |k| ms(*k).to_string())
                            )
                        })
                        .collect();
                    v.alive_duplicates.push(format!(
                        "key {id}: {} {why} [{}]",
                        later.exec,
                        history.join("; ")
                    ))
                }
                None if after_finish => v.reruns_after_finish += 1,
                None => v.legit_reruns += 1,
            }
        }
    }
    for (id, values) in got {
        if values.len() > 1 {
            v.disagreeing.push(format!("key {id}: {values:?}"));
        }
        let finished: HashSet<&str> = ledger
            .get(id)
            .map(|e| {
                e.iter()
                    .filter(|x| x.finish.is_some())
                    .map(|x| x.exec.as_str())
                    .collect()
            })
            .unwrap_or_default();
        for value in values {
            if !finished.contains(value.as_str()) {
                v.phantom
                    .push(format!("key {id}: {value} has no finish row"));
            }
        }
    }
    v
}

async fn read_ledger(pool: &PgPool, ledger: &str) -> BTreeMap<u64, Vec<Exec>> {
    let rows: Vec<(i64, String, i64, String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT k, exec, pid, kind, at_us FROM \"{ledger}\" ORDER BY at_us, id"
    )))
    .fetch_all(pool)
    .await
    .unwrap();
    let mut by_exec: HashMap<String, (u64, Exec)> = HashMap::new();
    for (k, exec, pid, kind, at) in rows {
        let e = by_exec.entry(exec.clone()).or_insert_with(|| {
            (
                k as u64,
                Exec {
                    exec,
                    pid: pid as u32,
                    start: at,
                    finish: None,
                },
            )
        });
        if kind == "start" {
            e.1.start = at;
        } else {
            e.1.finish = Some(at);
        }
    }
    let mut out: BTreeMap<u64, Vec<Exec>> = BTreeMap::new();
    for (k, e) in by_exec.into_values() {
        out.entry(k).or_default().push(e);
    }
    for execs in out.values_mut() {
        execs.sort_by_key(|e| e.start);
    }
    out
}

/// Steps mode: per step, its executions by key (from `s<n>.start` and `s<n>.finish` rows) and
/// the execution ids each key's `s<n>.rec` rows name (the step's recorded values).
#[allow(clippy::type_complexity)]
async fn read_steps_ledger(
    pool: &PgPool,
    ledger: &str,
) -> (
    Vec<BTreeMap<u64, Vec<Exec>>>,
    Vec<BTreeMap<u64, BTreeSet<String>>>,
) {
    let rows: Vec<(i64, String, i64, String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT k, exec, pid, kind, at_us FROM \"{ledger}\" ORDER BY at_us, id"
    )))
    .fetch_all(pool)
    .await
    .unwrap();
    let mut by_exec: Vec<HashMap<String, (u64, Exec)>> = vec![HashMap::new(); STEPS as usize];
    let mut recorded: Vec<BTreeMap<u64, BTreeSet<String>>> = vec![BTreeMap::new(); STEPS as usize];
    for (k, exec, pid, kind, at) in rows {
        let Some((n, what)) = kind
            .strip_prefix('s')
            .and_then(|r| r.split_once('.'))
            .and_then(|(n, w)| Some((n.parse::<usize>().ok()?, w)))
        else {
            continue;
        };
        if n >= STEPS as usize {
            continue;
        }
        if what == "rec" {
            recorded[n].entry(k as u64).or_default().insert(exec);
            continue;
        }
        let e = by_exec[n].entry(exec.clone()).or_insert_with(|| {
            (
                k as u64,
                Exec {
                    exec,
                    pid: pid as u32,
                    start: at,
                    finish: None,
                },
            )
        });
        if what == "start" {
            e.1.start = at;
        } else {
            e.1.finish = Some(at);
        }
    }
    let per_step = by_exec
        .into_iter()
        .map(|m| {
            let mut out: BTreeMap<u64, Vec<Exec>> = BTreeMap::new();
            for (k, e) in m.into_values() {
                out.entry(k).or_default().push(e);
            }
            for execs in out.values_mut() {
                execs.sort_by_key(|e| e.start);
            }
            out
        })
        .collect();
    (per_step, recorded)
}

/// Steps mode: prints the re-executions per step and asserts that none was of a finished
/// step (or ran beside a live one), that callers agree and no key is stuck.
fn check_steps(
    kind: Kind,
    duration: Duration,
    kills: usize,
    reports: &Reports,
    verdicts: &[Verdict],
    stuck: &[String],
) {
    let disagreeing: Vec<String> = reports
        .got
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(id, v)| format!("key {id}: {v:?}"))
        .collect();
    // A re-execution of a recorded step is a failure; one beside a live holder that lost its
    // lease (it stalled past it under load: the call-mode run asserts those) is counted.
    let finished_reruns: Vec<Vec<String>> = verdicts
        .iter()
        .map(|v| {
            v.alive_duplicates
                .iter()
                .filter(|d| d.contains("was completed"))
                .cloned()
                .collect()
        })
        .collect();
    let per_step: Vec<String> = verdicts
        .iter()
        .zip(&finished_reruns)
        .enumerate()
        .map(|(n, (v, finished))| {
            format!(
                "s{n}: {} keys, {} executions, {} re-executions ({} killed mid-step, {} killed \
                 between its effect and its record, {} after a lost lease), {} of a finished \
                 step",
                v.keys,
                v.executions,
                v.legit_reruns + v.reruns_after_finish + v.alive_duplicates.len(),
                v.legit_reruns,
                v.reruns_after_finish,
                v.alive_duplicates.len() - finished.len(),
                finished.len()
            )
        })
        .collect();
    println!(
        "chaos steps {}: {WORKERS} workers x {TASKS} tasks, lease {LEASE:?}, {duration:?}: {} \
         calls, {kills} SIGKILLs, {} keys answered; {}; disagreeing keys: {}, stuck keys: {}; \
         caller errors: {:?}; store operations past their bound (count, longest ms): {:?}",
        kind.name(),
        reports.calls,
        reports.got.len(),
        per_step.join("; "),
        disagreeing.len(),
        stuck.len(),
        reports.errors,
        reports.ops,
    );
    let show = |v: &[String]| v.iter().take(10).cloned().collect::<Vec<_>>();
    for (n, (v, finished)) in verdicts.iter().zip(&finished_reruns).enumerate() {
        assert!(
            finished.is_empty(),
            "{}: step s{n} ran again after it was recorded: {:?}",
            kind.name(),
            show(finished)
        );
        assert!(
            v.disagreeing.is_empty(),
            "{}: step s{n} recorded two values: {:?}",
            kind.name(),
            show(&v.disagreeing)
        );
        assert!(
            v.phantom.is_empty(),
            "{}: step s{n} returned values no execution finished: {:?}",
            kind.name(),
            show(&v.phantom)
        );
    }
    assert!(
        disagreeing.is_empty(),
        "{}: callers of one key got different values: {:?}",
        kind.name(),
        show(&disagreeing)
    );
    assert!(
        stuck.is_empty(),
        "{}: keys blocked past lease + {MARGIN:?}: {:?}",
        kind.name(),
        show(stuck)
    );
    assert!(
        verdicts[STEPS as usize - 1].executions >= KEYS as usize,
        "the run did too little"
    );
}

/// SIGKILLs a worker and notes when: the process was alive until just before the signal.
fn kill(c: &mut Child, killed: &mut HashMap<u32, i64>) {
    killed.insert(c.id(), unix_us());
    let _ = c.kill();
    let _ = c.wait();
}

fn spawn_worker(envs: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "chaos_worker",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env("IDEM_CHAOS_ROLE", "worker")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start a worker")
}

async fn chaos(kind: Kind, steps: bool, duration: Duration) {
    let _serial = SERIAL.lock().await;
    let Some(url) = idem_testkit::env_url(kind.url_var()) else {
        return;
    };
    let Some(ledger_url) = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL") else {
        return;
    };
    sql_common::pg_drop_stale_tables(&ledger_url).await;
    let ledger = sql_common::unique_table("chaos_ledger");
    let target = match kind {
        Kind::Redis => format!("idem-chaos:{}:", std::process::id()),
        _ => sql_common::unique_table("chaos"),
    };
    let run = format!("{}-{}", std::process::id(), unix_us());
    prepare(kind, &url, &target).await;
    let admin = ledger_pool(&ledger_url, 2).await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE \"{ledger}\" (id BIGSERIAL PRIMARY KEY, k BIGINT NOT NULL, exec TEXT NOT \
         NULL, pid BIGINT NOT NULL, kind TEXT NOT NULL, at_us BIGINT NOT NULL)"
    )))
    .execute(&admin)
    .await
    .unwrap();

    let start_us = unix_us() + 1_500_000;
    let until_us = start_us + duration.as_micros() as i64;
    let envs: Vec<(&str, String)> = vec![
        ("IDEM_CHAOS_STORE", kind.name().to_owned()),
        ("IDEM_CHAOS_URL", url.clone()),
        ("IDEM_CHAOS_TARGET", target.clone()),
        ("IDEM_CHAOS_LEDGER_URL", ledger_url.clone()),
        ("IDEM_CHAOS_LEDGER", ledger.clone()),
        ("IDEM_CHAOS_RUN", run.clone()),
        ("IDEM_CHAOS_START", start_us.to_string()),
        ("IDEM_CHAOS_UNTIL", until_us.to_string()),
        (
            "IDEM_CHAOS_MODE",
            if steps { "steps" } else { "call" }.to_owned(),
        ),
    ];
    let reports = Arc::new(Mutex::new(Reports::default()));
    let mut readers = Vec::new();
    let mut workers: Vec<Child> = (0..WORKERS)
        .map(|_| {
            let mut c = spawn_worker(&envs);
            readers.push(read_reports(&mut c, reports.clone()));
            c
        })
        .collect();
    let mut killed: HashMap<u32, i64> = HashMap::new();
    let mut rng = Rng::new();
    while unix_us() < until_us {
        tokio::time::sleep(Duration::from_millis(150 + rng.below(300))).await;
        if unix_us() < start_us + 300_000 {
            continue;
        }
        let i = rng.below(WORKERS as u64) as usize;
        kill(&mut workers[i], &mut killed);
        workers[i] = spawn_worker(&envs);
        readers.push(read_reports(&mut workers[i], reports.clone()));
    }
    // The last kills: whatever was in flight is abandoned.
    for w in &mut workers {
        kill(w, &mut killed);
    }
    let kills = killed.len();
    tokio::task::spawn_blocking(move || {
        for r in readers {
            let _ = r.join();
        }
    })
    .await
    .unwrap();

    // Final pass: every key answers within lease + margin.
    let mut ids: BTreeSet<u64> = read_ledger(&admin, &ledger).await.into_keys().collect();
    ids.extend(reports.lock().unwrap().got.keys().copied());
    let ctx = Arc::new(
        ctx(
            steps,
            false,
            kind,
            &url,
            &target,
            &ledger_url,
            &ledger,
            &run,
        )
        .await,
    );
    let ids: Vec<u64> = ids.into_iter().collect();
    let stuck = Arc::new(Mutex::new(Vec::new()));
    let passes: Vec<_> = (0..16)
        .map(|t| {
            let (ctx, ids, reports, stuck) =
                (ctx.clone(), ids.clone(), reports.clone(), stuck.clone());
            tokio::spawn(async move {
                let mut rng = Rng::new();
                for id in ids.into_iter().skip(t).step_by(16) {
                    let call = ctx.call(id, 1000 + t, &mut rng);
                    match tokio::time::timeout(LEASE + MARGIN, call).await {
                        Ok(Ok(v)) => {
                            reports.lock().unwrap().got.entry(id).or_default().insert(v);
                        }
                        Ok(Err(e)) => stuck.lock().unwrap().push(format!("key {id}: {e:?}")),
                        Err(_) => stuck.lock().unwrap().push(format!("key {id}: no answer")),
                    }
                }
            })
        })
        .collect();
    for p in passes {
        p.await.unwrap();
    }

    if steps {
        let stuck = std::mem::take(&mut *stuck.lock().unwrap());
        let reports = std::mem::take(&mut *reports.lock().unwrap());
        let (per_step, recorded) = read_steps_ledger(&admin, &ledger).await;
        let verdicts: Vec<Verdict> = per_step
            .iter()
            .zip(&recorded)
            .map(|(l, r)| classify(l, &killed, r))
            .collect();
        let _ = sqlx::query(AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS \"{ledger}\", \"{ledger}_steps\""
        )))
        .execute(&admin)
        .await;
        cleanup(kind, &url, &target).await;
        check_steps(kind, duration, kills, &reports, &verdicts, &stuck);
        return;
    }
    let executions = read_ledger(&admin, &ledger).await;
    let reports = std::mem::take(&mut *reports.lock().unwrap());
    let mut verdict = classify(&executions, &killed, &reports.got);
    verdict.stuck = std::mem::take(&mut *stuck.lock().unwrap());

    // Clean up before any assertion can fail.
    let _ = sqlx::query(AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS \"{ledger}\", \"{ledger}_steps\""
    )))
    .execute(&admin)
    .await;
    cleanup(kind, &url, &target).await;

    println!(
        "chaos {}: {WORKERS} workers x {TASKS} tasks, lease {LEASE:?}, {:?}: {} calls, {kills} \
         SIGKILLs, {} keys, {} executions; {} keys ran more than once: {} re-runs after the \
         holder was killed mid-body, {} after it was killed between body and completion; \
         duplicates with the holder alive: {}, disagreeing keys: {}, stuck keys: {}, values \
         without a finish: {}; caller errors: {:?}; store operations past their bound \
         (count, longest ms): {:?}",
        kind.name(),
        duration,
        reports.calls,
        verdict.keys,
        verdict.executions,
        verdict.rerun_keys,
        verdict.legit_reruns,
        verdict.reruns_after_finish,
        verdict.alive_duplicates.len(),
        verdict.disagreeing.len(),
        verdict.stuck.len(),
        verdict.phantom.len(),
        reports.errors,
        reports.ops,
    );
    let show = |v: &Vec<String>| v.iter().take(10).cloned().collect::<Vec<_>>();
    assert!(
        verdict.alive_duplicates.is_empty(),
        "{}: executed again while the holder was alive: {:?}",
        kind.name(),
        show(&verdict.alive_duplicates)
    );
    assert!(
        verdict.disagreeing.is_empty(),
        "{}: callers of one key got different values: {:?}",
        kind.name(),
        show(&verdict.disagreeing)
    );
    assert!(
        verdict.stuck.is_empty(),
        "{}: keys blocked past lease + {MARGIN:?}: {:?}",
        kind.name(),
        show(&verdict.stuck)
    );
    assert!(
        verdict.phantom.is_empty(),
        "{}: values no execution finished: {:?}",
        kind.name(),
        show(&verdict.phantom)
    );
    assert!(
        verdict.executions >= KEYS as usize,
        "the run did too little"
    );
}

#[cfg(feature = "redis")]
async fn chaos_redis() {
    chaos(Kind::Redis, false, CHAOS).await;
}

async fn chaos_postgres() {
    chaos(Kind::Postgres, false, CHAOS).await;
}

#[cfg(feature = "mysql")]
async fn chaos_mysql() {
    chaos(Kind::Mysql, false, CHAOS).await;
}

#[cfg(feature = "redis")]
async fn chaos_steps_redis() {
    chaos(Kind::Redis, true, CHAOS).await;
}

async fn chaos_steps_postgres() {
    chaos(Kind::Postgres, true, CHAOS).await;
}

#[cfg(feature = "mysql")]
async fn chaos_steps_mysql() {
    chaos(Kind::Mysql, true, CHAOS_STEPS_SHORT).await;
}

fn main() -> std::process::ExitCode {
    use backends::POSTGRES;
    #[allow(unused_mut)]
    let mut cases = vec![
        idem_testkit::harness::child_cases(
            "IDEM_CHAOS_ROLE",
            idem_testkit::test_cases!([], multi_thread(2); chaos_worker),
        ),
        idem_testkit::test_cases!([POSTGRES], multi_thread(2); chaos_postgres, chaos_steps_postgres),
    ];
    #[cfg(feature = "redis")]
    cases.push(idem_testkit::test_cases!(
        [backends::REDIS, POSTGRES], multi_thread(2); chaos_redis, chaos_steps_redis
    ));
    #[cfg(feature = "mysql")]
    cases.push(idem_testkit::test_cases!(
        [backends::MYSQL, POSTGRES], multi_thread(2); chaos_mysql, chaos_steps_mysql
    ));
    idem_testkit::harness::run(cases)
}
