//! SQL stores on sqlx: PostgreSQL, MySQL/MariaDB and SQLite, one cargo feature each.
//!
//! The three stores share one builder ([`SqlStoreBuilder`]: the same option names on every
//! database) and one skeleton (`Core`: the operation timeout, the value limit, errors, local
//! waiters and the polling loop, the sweeper). What really differs lives in each database's
//! module: its statements (`schema`), its claim, and how its waiters are woken (PostgreSQL
//! `LISTEN/NOTIFY`; polling on the others).
//!
//! ```no_run
//! use std::time::Duration;
//! # async fn demo() -> Result<(), idem_core::StoreError> {
//! # #[cfg(all(feature = "postgres", feature = "mysql", feature = "sqlite"))] {
//! use idem_stores::{MySqlStore, PostgresStore, SqliteStore};
//! let pg = PostgresStore::builder()
//!     .url("postgres://app@127.0.0.1:5432/app")
//!     .table("idem_records")
//!     .operation_timeout(Duration::from_secs(5))
//!     .sweep_every(Duration::from_secs(60), 1000)
//!     .connect()
//!     .await?;
//! let my = MySqlStore::builder()
//!     .url("mysql://app@127.0.0.1:3306/app")
//!     .table("idem_records")
//!     .operation_timeout(Duration::from_secs(5))
//!     .sweep_every(Duration::from_secs(60), 1000)
//!     .connect()
//!     .await?;
//! let lite = SqliteStore::builder()
//!     .url("sqlite://idem.db")
//!     .table("idem_records")
//!     .operation_timeout(Duration::from_secs(5))
//!     .sweep_every(Duration::from_secs(60), 1000)
//!     .connect()
//!     .await?;
//! for migrate in [pg.migrate().await, my.migrate().await, lite.migrate().await] {
//!     migrate?; // once at start-up: no store creates its table by itself
//! }
//! # }
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use idem_core::{
    Claim, ClaimRequest, CompletedRecord, FencingToken, Fingerprint, Key, StoreError,
    DEFAULT_MAX_VALUE_SIZE,
};
use tokio::sync::{Notify, Semaphore};

use base::{Source, SqlOptions};

#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;
mod steps;
// Its documentation is its own inner doc only: an outer doc here would make rustdoc resolve
// the module's links from this scope, where its imports are not.
pub mod transactional;

/// The default table name of every SQL store.
pub const DEFAULT_TABLE: &str = "idem_records";

/// Durations are clamped to this many milliseconds (about 100 years) before reaching SQL.
const MAX_MILLIS: i64 = 100 * 365 * 86_400 * 1000;

/// Configures a SQL store: where it connects, its table, its limits and its sweeper. The same
/// options, under the same names, for every database; get one from
/// [`PostgresStore::builder`](postgres::PostgresStore::builder),
/// [`MySqlStore::builder`](mysql::MySqlStore::builder) or
/// [`SqliteStore::builder`](sqlite::SqliteStore::builder). A few options exist for one
/// database only (PostgreSQL's [`notify`](SqlStoreBuilder::notify), SQLite's
/// [`busy_timeout`](SqlStoreBuilder::busy_timeout) and [`durable`](SqlStoreBuilder::durable)).
///
/// ```
/// # #[cfg(feature = "sqlite")]
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), idem_core::StoreError> {
/// use std::time::Duration;
/// let store = idem_stores::SqliteStore::builder()
///     .url("sqlite::memory:")
///     .table("payments_idempotency")
///     .operation_timeout(Duration::from_secs(2))
///     .poll_interval(Duration::from_millis(5))
///     .poll_max(Duration::from_millis(100))
///     .max_value_size(256 << 10)
///     .connect()
///     .await?;
/// store.migrate().await?;
/// # Ok(()) }
/// # #[cfg(not(feature = "sqlite"))]
/// # fn main() {}
/// ```
pub struct SqlStoreBuilder<S: base::SqlBackend> {
    pub(crate) source: Source<S::Pool>,
    pub(crate) options: SqlOptions,
    pub(crate) extra: S::Extra,
}

impl<S: base::SqlBackend> Clone for SqlStoreBuilder<S> {
    fn clone(&self) -> Self {
        SqlStoreBuilder {
            source: self.source.clone(),
            options: self.options.clone(),
            extra: self.extra.clone(),
        }
    }
}

impl<S: base::SqlBackend> fmt::Debug for SqlStoreBuilder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlStoreBuilder")
            .field("database", &S::NAME)
            .field("source", &self.source)
            .field("options", &self.options)
            .field("extra", &self.extra)
            .finish()
    }
}

impl<S: base::SqlBackend> SqlStoreBuilder<S> {
    pub(crate) fn new() -> Self {
        SqlStoreBuilder {
            source: Source::None,
            options: S::default_options(),
            extra: S::Extra::default(),
        }
    }

    /// Connect to this URL (`postgres://user:password@host:port/db`,
    /// `mysql://user:password@host:port/db`, `sqlite://path/to/file.db` or `sqlite::memory:`).
    /// The store opens its own pool of [`max_connections`](Self::max_connections).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.source = Source::Url(url.into());
        self
    }

    /// Use an existing sqlx pool, shared with the rest of the application (its own size and
    /// timeouts apply; [`max_connections`](Self::max_connections) and
    /// [`acquire_timeout`](Self::acquire_timeout) do not).
    pub fn pool(mut self, pool: S::Pool) -> Self {
        self.source = Source::Pool(pool);
        self
    }

    /// The table. ASCII letters, digits and `_`, not starting with a digit; PostgreSQL and
    /// MySQL also take `schema.name` / `database.name`. It is the only text interpolated into
    /// SQL, validated and quoted. Default [`DEFAULT_TABLE`].
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.options.table = table.into();
        self
    }

    /// The size of the pool the store opens for [`url`](Self::url). Default: 10 on
    /// PostgreSQL, 16 on MySQL, 4 on a SQLite file (one writer at a time) and 1 in memory.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.options.max_connections = n.max(1);
        self
    }

    /// Connections kept apart for lease renewals and settles (completions, releases), so
    /// that new claims and bodies' store traffic in a saturated pool cannot starve a live
    /// holder's renewals. A renewal or settle takes an idle connection of the main pool if
    /// there is one, else whichever frees first: a reserved one or one of the main pool.
    /// The reserved connections are a small pool of their own, opened on first use with the
    /// main pool's connect options (also beside a pool given with [`pool`](Self::pool)).
    /// Default 2 on PostgreSQL and MySQL; 0 turns the lane off. SQLite has no lane (its
    /// writers queue on the database's one write lock, not on the pool).
    pub fn reserved_connections(mut self, n: u32) -> Self {
        self.options.reserved_connections = n;
        self
    }

    /// How long an operation waits for a pooled connection (store-opened pools). Default 5 s.
    pub fn acquire_timeout(mut self, d: Duration) -> Self {
        self.options.acquire_timeout = d;
        self
    }

    /// The bound on one store operation, connection wait and internal re-runs included; past
    /// it the operation fails with [`StoreError::Timeout`]. Default 10 s. Through the runtime
    /// each attempt is also bounded by the call's lease (claims, completions and renewals by
    /// the whole lease, releases by half of it), whichever is shorter.
    pub fn operation_timeout(mut self, d: Duration) -> Self {
        self.options.operation_timeout = d.max(Duration::from_millis(1));
        self
    }

    /// The largest encoded value accepted; larger ones are [`StoreError::TooLarge`]. Default
    /// 1 MiB (MySQL: at most 16 MiB − 1, a `MEDIUMBLOB`).
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.options.max_value_size = bytes;
        self
    }

    /// How long an in-progress row outlives its lease before the sweep may delete it (so that
    /// a late claim is still reported as a takeover). Default 60 s.
    pub fn lease_grace(mut self, d: Duration) -> Self {
        self.options.lease_grace = d;
        self
    }

    /// The first pause between two looks of a polling waiter; it doubles up to
    /// [`poll_max`](Self::poll_max). Default 10 ms.
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.options.poll_interval = d.max(Duration::from_millis(1));
        self
    }

    /// The longest pause between two looks of a polling waiter (always on MySQL and SQLite;
    /// on PostgreSQL while the `LISTEN` connection is down). Default 500 ms on PostgreSQL,
    /// 200 ms on MySQL, 250 ms on SQLite.
    pub fn poll_max(mut self, d: Duration) -> Self {
        self.options.poll_max = d.max(Duration::from_millis(1));
        self
    }

    /// Deletes expired rows every `interval`, `batch` rows per statement, in a background task
    /// that stops when the last clone of the store is dropped. Default: no sweeper (call the
    /// store's `purge_expired` yourself, or run one sweeper per deployment).
    pub fn sweep_every(mut self, interval: Duration, batch: u32) -> Self {
        self.options.sweep = Some((interval.max(Duration::from_millis(10)), batch.max(1)));
        self
    }

    /// Builds the store without touching the network: the pool connects on first use. Needs a
    /// tokio runtime. Fails only on a missing source, a malformed URL or table name, or an
    /// option the database cannot take.
    pub fn build(self) -> Result<S, StoreError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            StoreError::backend(
                format!(
                    "{}: the store needs a tokio runtime (build it inside one)",
                    S::NAME
                ),
                e,
            )
        })?;
        let sweep = self.options.sweep;
        let source = match self.source {
            Source::None => {
                // `MySqlStore::builder(pool)` was the old form: rustc's hint for it (remove
                // the argument) leads here, so say where the pool goes now.
                let old_form = if S::NAME == "mysql" {
                    " (the old `MySqlStore::builder(pool)` is now `MySqlStore::builder().pool(pool)`)"
                } else {
                    ""
                };
                return Err(config_error(format!(
                    "{}: the builder has no database: call .url(..) or .pool(..) before \
                     build(){old_form}",
                    S::NAME
                )));
            }
            source => source,
        };
        let store = S::build(source, self.options, self.extra)?;
        if let Some((interval, batch)) = sweep {
            runtime.spawn(base::run_sweeper::<S>(store.downgrade(), interval, batch));
        }
        Ok(store)
    }

    /// Builds the store and checks that the database answers (`SELECT 1`; a SQLite file is
    /// created if missing).
    pub async fn connect(self) -> Result<S, StoreError> {
        let store = self.build()?;
        store.ping().await?;
        Ok(store)
    }

    /// Deprecated name of [`operation_timeout`](Self::operation_timeout).
    #[deprecated(note = "use `operation_timeout`, the name every SQL store takes")]
    pub fn op_timeout(self, d: Duration) -> Self {
        self.operation_timeout(d)
    }
}

/// The parts of [`base::SqlBackend`] that read the same on every store (`struct XStore {
/// inner: Arc<Inner> }`, `Inner { core, .. }`, inherent `purge_expired` and
/// `claim_statements`).
macro_rules! backend_plumbing {
    ($store:ident) => {
        fn core(&self) -> &Core {
            &self.inner.core
        }

        async fn purge(&self, batch: u32) -> Result<u64, StoreError> {
            self.purge_expired(batch).await
        }

        async fn claim_inner(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
            self.claim_statements(req).await
        }

        fn downgrade(&self) -> Weak<Inner> {
            Arc::downgrade(&self.inner)
        }

        fn from_inner(inner: Arc<Inner>) -> Self {
            $store { inner }
        }
    };
}
pub(crate) use backend_plumbing;

/// The skeleton the three stores share.
pub(crate) mod base {
    use super::*;

    /// Where a store gets its connections.
    #[derive(Clone)]
    pub enum Source<P> {
        None,
        Url(String),
        Pool(P),
    }

    impl<P> fmt::Debug for Source<P> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            // Never print a URL: it may hold a password.
            f.write_str(match self {
                Source::None => "None",
                Source::Url(_) => "Url(..)",
                Source::Pool(_) => "Pool(..)",
            })
        }
    }

    /// The options every SQL store takes, with the same names everywhere.
    #[derive(Clone, Debug)]
    pub struct SqlOptions {
        pub(crate) table: String,
        pub(crate) max_connections: u32,
        pub(crate) reserved_connections: u32,
        pub(crate) acquire_timeout: Duration,
        pub(crate) operation_timeout: Duration,
        pub(crate) max_value_size: usize,
        pub(crate) lease_grace: Duration,
        pub(crate) poll_interval: Duration,
        pub(crate) poll_max: Duration,
        pub(crate) sweep: Option<(Duration, u32)>,
    }

    impl SqlOptions {
        /// The defaults, with the database's pool size and longest polling pause.
        pub(crate) fn defaults(max_connections: u32, poll_max: Duration) -> Self {
            SqlOptions {
                table: DEFAULT_TABLE.to_owned(),
                max_connections,
                reserved_connections: 2,
                acquire_timeout: Duration::from_secs(5),
                operation_timeout: Duration::from_secs(10),
                max_value_size: DEFAULT_MAX_VALUE_SIZE,
                lease_grace: Duration::from_secs(60),
                poll_interval: Duration::from_millis(10),
                poll_max,
                sweep: None,
            }
        }
    }

    /// What a database's store provides to the shared builder and sweeper. Sealed: only the
    /// stores of this crate implement it.
    pub trait SqlBackend: Sized + Clone + Send + Sync + 'static {
        /// The sqlx pool type.
        type Pool: Clone + Send + Sync + 'static;
        /// Options only this database takes.
        type Extra: Clone + fmt::Debug + Default;
        /// The store's shared state, which the sweeper holds weakly.
        type Inner: Send + Sync + 'static;
        /// `postgres`, `mysql` or `sqlite`, for messages.
        const NAME: &'static str;
        /// The defaults of [`SqlStoreBuilder`].
        fn default_options() -> SqlOptions;
        /// Builds the store from a source that is not `None`.
        fn build(
            source: Source<Self::Pool>,
            options: SqlOptions,
            extra: Self::Extra,
        ) -> Result<Self, StoreError>;
        /// Checks that the database answers.
        fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
        /// One batch of the sweep.
        fn purge(&self, batch: u32) -> impl Future<Output = Result<u64, StoreError>> + Send;
        /// The shared skeleton.
        fn core(&self) -> &Core;
        /// The claim's statements, re-run until one answers (unbounded: [`claim`] bounds it).
        fn claim_inner(
            &self,
            req: &ClaimRequest,
        ) -> impl Future<Output = Result<Claim, StoreError>> + Send;
        /// A weak handle on the store's state.
        fn downgrade(&self) -> Weak<Self::Inner>;
        /// The store again, from its state.
        fn from_inner(inner: Arc<Self::Inner>) -> Self;
    }

    /// The state every SQL store has: its table, its limits, its local waiters.
    pub struct Core {
        /// The table as configured.
        pub(crate) table: String,
        pub(crate) op_timeout: Duration,
        /// Atomic: MySQL lowers it to fit the server's packet limit at `migrate()`.
        pub(crate) max_value_size: AtomicUsize,
        pub(crate) lease_grace_ms: i64,
        pub(crate) poll_interval: Duration,
        pub(crate) poll_max: Duration,
        pub(crate) waiters: Arc<Waiters>,
        /// Claims whose statement may still run, by token (see [`Core::claim_to_the_end`]).
        claims: Arc<Mutex<HashMap<FencingToken, Arc<Semaphore>>>>,
        /// Renewals in flight, by claim (see [`Core::renewal_turn`]).
        #[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
        renewals: Renewals,
    }

    /// Per claim in renewal: its turn, and how many renewals hold or wait for it.
    type Renewals = Arc<Mutex<HashMap<FencingToken, (Arc<Semaphore>, usize)>>>;

    /// A claim's turn to renew; the next renewal of that claim waits until it is dropped.
    /// (PostgreSQL and MySQL; SQLite's renewals are serialised by its single writer.)
    #[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
    pub(crate) struct RenewalTurn {
        renewals: Renewals,
        token: FencingToken,
        _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    }

    impl Drop for RenewalTurn {
        fn drop(&mut self) {
            let mut renewals = lock(&self.renewals);
            if let Some(slot) = renewals.get_mut(&self.token) {
                slot.1 -= 1;
                if slot.1 == 0 {
                    renewals.remove(&self.token);
                }
            }
        }
    }

    impl Core {
        pub(crate) fn new(table: String, options: &SqlOptions) -> Self {
            Core {
                table,
                op_timeout: options.operation_timeout,
                max_value_size: AtomicUsize::new(options.max_value_size),
                lease_grace_ms: millis(options.lease_grace),
                poll_interval: options.poll_interval,
                poll_max: options.poll_max.max(options.poll_interval),
                waiters: Arc::new(Waiters::default()),
                renewals: Arc::default(),
                claims: Arc::default(),
            }
        }

        pub(crate) fn max_value_size(&self) -> usize {
            self.max_value_size.load(Ordering::Relaxed)
        }

        /// [`StoreError::TooLarge`] for a value over the limit.
        pub(crate) fn check_size(&self, value: &[u8]) -> Result<(), StoreError> {
            let limit = self.max_value_size();
            if value.len() > limit {
                return Err(StoreError::TooLarge {
                    size: value.len(),
                    limit,
                });
            }
            Ok(())
        }

        /// A sqlx error as a store error. A missing table says how to create it, the same way
        /// on every database.
        pub(crate) fn fail(&self, what: &str, e: sqlx::Error) -> StoreError {
            if is_missing_table(&e) {
                return StoreError::backend(
                    format!(
                        "{what}: the table {:?} does not exist: call the store's migrate() once \
                         at start-up (or run its DDL in your migrations)",
                        self.table
                    ),
                    e,
                );
            }
            StoreError::backend(what.to_owned(), e)
        }

        /// Runs `fut` under the operation timeout, mapping its error.
        pub(crate) async fn timed<T>(
            &self,
            what: &str,
            fut: impl Future<Output = Result<T, sqlx::Error>>,
        ) -> Result<T, StoreError> {
            match tokio::time::timeout(self.op_timeout, fut).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(self.fail(what, e)),
                Err(_) => Err(StoreError::Timeout(self.op_timeout)),
            }
        }

        /// Runs a whole operation (several statements, re-runs) under the operation timeout.
        /// (Used by the MySQL store; the others bound their operations statement by statement.)
        #[cfg_attr(not(feature = "mysql"), allow(dead_code))]
        pub(crate) async fn bounded<T>(
            &self,
            fut: impl Future<Output = Result<T, StoreError>>,
        ) -> Result<T, StoreError> {
            match tokio::time::timeout(self.op_timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Timeout(self.op_timeout)),
            }
        }

        /// Runs a claim in a task of its own, so that a claim whose caller goes away still
        /// runs to its end, and a release under the same token (the runtime sends one when
        /// the caller is dropped mid-claim) waits for it in [`after_claim`](Self::after_claim).
        /// Without this, a dropped claim's statement — already sent, so the database runs and
        /// commits it anyway — could commit after the release, and block the key for its lease.
        pub(crate) async fn claim_to_the_end<T: Send + 'static>(
            &self,
            token: FencingToken,
            claim: impl Future<Output = Result<T, StoreError>> + Send + 'static,
        ) -> Result<T, StoreError> {
            // A claim sent again under the same token (the runtime's retry after a timeout)
            // starts once the earlier one ended: retries never hold more connections than
            // the first attempt.
            self.after_claim(token).await;
            let running = Arc::new(Semaphore::new(0));
            lock(&self.claims).insert(token, Arc::clone(&running));
            let done = ClaimDone {
                claims: Arc::clone(&self.claims),
                token,
                running,
            };
            let task = tokio::spawn(async move {
                let r = claim.await;
                drop(done);
                r
            });
            match task.await {
                Ok(r) => r,
                Err(e) => Err(StoreError::backend("claim task failed", e)),
            }
        }

        /// Waits until no other renewal of the claim under `token` is in flight. The runtime
        /// sends a second renewal beside a slow one (a hedge); on a pool, each would hold a
        /// connection of its own, so under latency every holder would take two or three.
        /// Here the hedge waits for the renewal in flight (the stores bound that wait by a
        /// quarter of the lease, in case the one in flight is stuck opening a connection) and
        /// then runs: it is never answered by the earlier one's result, which was sent
        /// earlier and covers less of the lease.
        #[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
        pub(crate) async fn renewal_turn(&self, token: FencingToken) -> RenewalTurn {
            let turn = {
                let mut renewals = lock(&self.renewals);
                let slot = renewals
                    .entry(token)
                    .or_insert_with(|| (Arc::new(Semaphore::new(1)), 0));
                slot.1 += 1;
                Arc::clone(&slot.0)
            };
            let mut guard = RenewalTurn {
                renewals: Arc::clone(&self.renewals),
                token,
                _permit: None,
            };
            guard._permit = turn.acquire_owned().await.ok();
            guard
        }

        /// Waits (at most the operation timeout) until no claim under `token` is running.
        pub(crate) async fn after_claim(&self, token: FencingToken) {
            let running = lock(&self.claims).get(&token).cloned();
            if let Some(running) = running {
                // Closed when the claim ends: `acquire` then returns at once.
                let _ = tokio::time::timeout(self.op_timeout, running.acquire()).await;
            }
        }

        /// The waiting loop of every SQL store: until `look` finds the key no longer held
        /// under a live lease, or `timeout` passes. `look` answers the holder's remaining
        /// lease. Between looks it sleeps until a local wake-up (a completion, release or
        /// removal through this store, or a notification), the lease's end, the timeout, or
        /// — while no notification channel is up — the next poll, the pause doubling from
        /// `poll_interval` to `poll_max`.
        pub(crate) async fn wait<F, Fut>(
            &self,
            key: &Key,
            timeout: Duration,
            mut look: F,
        ) -> Result<(), StoreError>
        where
            F: FnMut() -> Fut,
            Fut: Future<Output = Result<Option<Duration>, StoreError>>,
        {
            let deadline = Instant::now().checked_add(timeout);
            let sub = self.waiters.subscribe(*key);
            let mut poll = self.poll_interval;
            loop {
                // Subscribe first, then look: a wake-up after the look still wakes us.
                let notified = sub.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let listening = self.waiters.listening.load(Ordering::Acquire);
                let Some(lease) = look().await? else {
                    return Ok(());
                };
                let left = match deadline {
                    Some(d) => d.saturating_duration_since(Instant::now()),
                    None => timeout,
                };
                if left.is_zero() {
                    return Ok(());
                }
                // Look again when the lease passes (the holder may have died without a word).
                let mut nap = left.min(lease + Duration::from_millis(1));
                if !listening {
                    nap = nap.min(poll);
                    poll = (poll * 2).min(self.poll_max);
                }
                if tokio::time::timeout(nap, notified).await.is_ok() {
                    return Ok(());
                }
            }
        }
    }

    /// The least time one claim is given, whatever its lease.
    pub(crate) const CLAIM_BOUND_FLOOR: Duration = Duration::from_millis(250);

    /// `Store::claim` of every SQL store: the claim's statements, as one operation in a task
    /// of their own (see [`Core::claim_to_the_end`]), under the operation timeout or the
    /// claim's lease (at least [`CLAIM_BOUND_FLOOR`]), whichever is shorter: the runtime gives
    /// up on a claim after its lease, and a claim given up on stops there (its connection is
    /// closed, not left to finish a statement for nobody). The floor keeps a claim with a
    /// lease of a few milliseconds (a test's lapsed claim) from timing out before one round
    /// trip can answer.
    pub(crate) async fn claim<S: SqlBackend>(
        store: &S,
        req: &ClaimRequest,
    ) -> Result<Claim, StoreError> {
        let owned = store.clone();
        let req = req.clone();
        let limit = store
            .core()
            .op_timeout
            .min(req.lease.max(CLAIM_BOUND_FLOOR));
        store
            .core()
            .claim_to_the_end(req.token, async move {
                match tokio::time::timeout(limit, owned.claim_inner(&req)).await {
                    Ok(r) => r,
                    Err(_) => Err(StoreError::Timeout(limit)),
                }
            })
            .await
    }

    /// The error of a claim whose record changed under every one of its `attempts` runs.
    pub(crate) fn unsettled(name: &str, attempts: usize) -> StoreError {
        StoreError::backend(
            format!("{name}: claim"),
            std::io::Error::other(format!(
                "the record kept changing under {attempts} claims in a row"
            )),
        )
    }

    /// Marks a claim ended, when its task finishes or is dropped.
    struct ClaimDone {
        claims: Arc<Mutex<HashMap<FencingToken, Arc<Semaphore>>>>,
        token: FencingToken,
        running: Arc<Semaphore>,
    }

    impl Drop for ClaimDone {
        fn drop(&mut self) {
            let mut claims = lock(&self.claims);
            // A retried claim under the same token may have registered since: leave its entry.
            if claims
                .get(&self.token)
                .is_some_and(|r| Arc::ptr_eq(r, &self.running))
            {
                claims.remove(&self.token);
            }
            drop(claims);
            self.running.close();
        }
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deletes expired rows every `interval` until the store is dropped.
    pub(crate) async fn run_sweeper<S: SqlBackend>(
        store: Weak<S::Inner>,
        interval: Duration,
        batch: u32,
    ) {
        loop {
            tokio::time::sleep(interval).await;
            let Some(inner) = store.upgrade() else { return };
            let store = S::from_inner(inner);
            loop {
                match store.purge(batch).await {
                    Ok(n) if n >= u64::from(batch) => continue,
                    Ok(n) => {
                        tracing::debug!(target: "idem", store = S::NAME, removed = n, "sweep");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(target: "idem", store = S::NAME, error = %e, "sweep failed");
                        break;
                    }
                }
            }
        }
    }

    /// Local waiters, one `Notify` per key that someone waits on in this process. Woken by
    /// this store's own completions, releases and removals, and on PostgreSQL by the
    /// listener's notifications.
    #[derive(Default)]
    pub(crate) struct Waiters {
        slots: Mutex<HashMap<Key, (Arc<Notify>, usize)>>,
        /// Whether a notification channel is up (waiters then need not poll).
        pub(crate) listening: AtomicBool,
    }

    impl Waiters {
        fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, (Arc<Notify>, usize)>> {
            self.slots.lock().unwrap_or_else(|e| e.into_inner())
        }

        pub(crate) fn subscribe(self: &Arc<Self>, key: Key) -> Subscription {
            let mut slots = self.lock();
            let slot = slots
                .entry(key)
                .or_insert_with(|| (Arc::new(Notify::new()), 0));
            slot.1 += 1;
            Subscription {
                waiters: Arc::clone(self),
                key,
                notify: Arc::clone(&slot.0),
            }
        }

        pub(crate) fn wake(&self, key: &Key) {
            if let Some((notify, _)) = self.lock().get(key) {
                notify.notify_waiters();
            }
        }

        #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
        pub(crate) fn wake_all(&self) {
            for (notify, _) in self.lock().values() {
                notify.notify_waiters();
            }
        }

        #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
        pub(crate) fn set_listening(&self, on: bool) {
            self.listening.store(on, Ordering::Release);
            // Notifications may have been missed while the state changed: everyone looks.
            self.wake_all();
        }
    }

    pub(crate) struct Subscription {
        waiters: Arc<Waiters>,
        key: Key,
        pub(crate) notify: Arc<Notify>,
    }

    impl Drop for Subscription {
        fn drop(&mut self) {
            let mut slots = self.waiters.lock();
            if let Some(slot) = slots.get_mut(&self.key) {
                slot.1 -= 1;
                if slot.1 == 0 {
                    slots.remove(&self.key);
                }
            }
        }
    }
}

/// Where operations get their connections: the main pool, and the reserved lane of lease
/// renewals and settles. A connection in use by an operation that is dropped before it
/// finished (the runtime gave up on it) is closed unless the database answers within a short
/// drain, rather than returned to the pool, where it would stay busy until the database
/// answered a statement nobody waits for.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) mod lanes {
    use std::time::Duration;

    use sqlx::pool::{Pool, PoolConnection, PoolOptions};
    use sqlx::Database;

    /// The main pool and the reserved lane.
    pub(crate) struct Lanes<DB: Database> {
        pub(crate) main: Pool<DB>,
        reserved: Option<Pool<DB>>,
    }

    impl<DB: Database> Lanes<DB> {
        /// `main`, and a lane of `reserved` connections opened lazily with its options.
        pub(crate) fn new(main: Pool<DB>, reserved: u32, options: &super::SqlOptions) -> Self {
            let reserved = (reserved > 0).then(|| {
                // The main pool's acquire rules (a pool given by the user may test
                // connections before handing them out; the store's own does not).
                let _ = options;
                PoolOptions::<DB>::new()
                    .max_connections(reserved)
                    .acquire_timeout(main.options().get_acquire_timeout())
                    .test_before_acquire(main.options().get_test_before_acquire())
                    .connect_lazy_with((*main.connect_options()).clone())
            });
            Lanes { main, reserved }
        }

        /// A connection of the main pool, for claims and reads.
        pub(crate) async fn acquire(&self) -> Result<InUse<DB>, sqlx::Error> {
            Ok(InUse::new(finish_anyway(&self.main).await?))
        }

        /// A connection for a renewal or a settle: an idle one of the main pool, else the
        /// first to free up of the lane and the main pool.
        pub(crate) async fn priority(&self) -> Result<InUse<DB>, sqlx::Error> {
            // Plain acquires, raced: the loser is cancelled before it opens a connection that
            // would then sit idle in its pool. (Never `try_acquire`: it skips the pool's test
            // of an idle connection.)
            let conn = match &self.reserved {
                None => self.main.acquire().await?,
                Some(lane) if self.main.num_idle() > 0 => tokio::select! {
                    biased;
                    c = self.main.acquire() => c?,
                    c = lane.acquire() => c?,
                },
                Some(lane) => tokio::select! {
                    biased;
                    c = lane.acquire() => c?,
                    c = self.main.acquire() => c?,
                },
            };
            Ok(InUse::new(conn))
        }

        /// The pool of the reserved lane (the main pool when there is none), for a statement
        /// that must not queue behind the main pool's traffic.
        pub(crate) fn priority_pool(&self) -> &Pool<DB> {
            self.reserved.as_ref().unwrap_or(&self.main)
        }
    }

    /// Waits for a connection of `pool` in a task of its own: if the operation is given up on
    /// while the connection is being opened (on a slow link that takes several round trips,
    /// more than a short lease), the connection is still opened and goes back to the pool for
    /// the next operation, instead of every attempt starting over and none ever getting one.
    pub(crate) async fn finish_anyway<DB: Database>(
        pool: &Pool<DB>,
    ) -> Result<PoolConnection<DB>, sqlx::Error> {
        match tokio::spawn(pool.acquire()).await {
            Ok(r) => r,
            Err(e) => Err(sqlx::Error::Io(std::io::Error::other(e))),
        }
    }

    /// A pooled connection used by one operation. Dropped before [`done`](Self::done) (the
    /// operation was given up on mid-statement), it is given [`DRAIN`] to receive the answer
    /// nobody waits for any more, then closed: it never stays busy in the pool for longer.
    pub(crate) struct InUse<DB: Database> {
        /// Always `Some` until dropped.
        conn: Option<PoolConnection<DB>>,
    }

    /// How long a connection whose operation was given up on may take to receive the answer
    /// that nobody waits for any more (a round trip, on a slow link) before it is closed.
    const DRAIN: Duration = Duration::from_secs(1);

    impl<DB: Database> InUse<DB> {
        fn new(conn: PoolConnection<DB>) -> Self {
            InUse { conn: Some(conn) }
        }

        /// The connection, to run statements on.
        pub(crate) fn conn(&mut self) -> &mut DB::Connection {
            match self.conn.as_mut() {
                Some(conn) => conn,
                None => unreachable!("the connection is taken only when the guard drops"),
            }
        }

        /// The operation got its answer: the connection goes back to the pool.
        pub(crate) fn done(mut self) {
            drop(self.conn.take());
        }
    }

    impl<DB: Database> Drop for InUse<DB> {
        fn drop(&mut self) {
            let Some(mut conn) = self.conn.take() else {
                return;
            };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move {
                        use sqlx::Connection;
                        let drained = tokio::time::timeout(DRAIN, conn.ping()).await;
                        if !matches!(drained, Ok(Ok(()))) {
                            conn.close_on_drop();
                        }
                    });
                }
                Err(_) => conn.close_on_drop(),
            }
        }
    }
}

/// Whether the database says the table does not exist: PostgreSQL `42P01`
/// (undefined_table), MySQL/MariaDB `42S02` (ER_NO_SUCH_TABLE), SQLite `no such table`.
pub(crate) fn is_missing_table(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            matches!(db.code().as_deref(), Some("42P01" | "42S02"))
                || db.message().starts_with("no such table")
        }
        _ => false,
    }
}

/// A table-name part every backend accepts: ASCII letters, digits and `_`, not starting with a
/// digit, 1 to `max_len` bytes. Table names are the only text interpolated into SQL.
pub(crate) fn is_identifier(part: &str, max_len: usize) -> bool {
    !part.is_empty()
        && part.len() <= max_len
        && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !part.as_bytes()[0].is_ascii_digit()
}

/// A configuration mistake (bad URL or table name), as a store error.
pub(crate) fn config_error(message: impl Into<String>) -> StoreError {
    let message = message.into();
    StoreError::backend(
        message.clone(),
        std::io::Error::new(std::io::ErrorKind::InvalidInput, message),
    )
}

/// A duration in whole milliseconds for SQL, clamped to about 100 years.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).map_or(MAX_MILLIS, |ms| ms.min(MAX_MILLIS))
}

/// A count of milliseconds read back from SQL (never negative) as a duration.
#[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
pub(crate) fn from_millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A fingerprint column: NULL or 32 bytes.
pub(crate) fn fingerprint(
    name: &str,
    bytes: Option<Vec<u8>>,
) -> Result<Option<Fingerprint>, StoreError> {
    match bytes {
        None => Ok(None),
        Some(b) => Fingerprint::from_slice(&b).map(Some).ok_or_else(|| {
            StoreError::Corrupt(format!("{name}: fingerprint of {} bytes", b.len()))
        }),
    }
}

/// A completed record read back: its value must be there.
pub(crate) fn completed(
    name: &str,
    fingerprint: Option<Fingerprint>,
    value: Option<Vec<u8>>,
    expires_in: Duration,
) -> Result<CompletedRecord, StoreError> {
    let value = value
        .ok_or_else(|| StoreError::Corrupt(format!("{name}: completed record without a value")))?;
    Ok(CompletedRecord::new(fingerprint, value, Some(expires_in)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runtime releases a claim whose caller was dropped mid-claim: that release must not
    /// overtake the claim's statement, which the database runs anyway.
    #[tokio::test]
    async fn a_release_waits_for_a_dropped_claim_of_its_token() {
        use std::sync::atomic::AtomicBool;
        let options = SqlOptions::defaults(1, Duration::from_millis(100));
        let core = base::Core::new("t".to_owned(), &options);
        let token = FencingToken::random();
        let done = Arc::new(AtomicBool::new(false));
        let finished = Arc::clone(&done);
        let claim = core.claim_to_the_end(token, async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            finished.store(true, Ordering::SeqCst);
            Ok(())
        });
        let dropped = tokio::time::timeout(Duration::from_millis(20), claim).await;
        assert!(dropped.is_err(), "the caller is dropped mid-claim");
        assert!(!done.load(Ordering::SeqCst));
        core.after_claim(token).await;
        assert!(
            done.load(Ordering::SeqCst),
            "the release overtook the claim"
        );
        // No claim under a token: no wait.
        tokio::time::timeout(
            Duration::from_secs(1),
            core.after_claim(FencingToken::random()),
        )
        .await
        .expect("after_claim without a claim returns at once");
    }

    #[test]
    fn durations_are_clamped() {
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        assert_eq!(millis(Duration::MAX), MAX_MILLIS);
        assert_eq!(from_millis(-5), Duration::ZERO);
    }
}
