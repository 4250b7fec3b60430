//! `MySqlStore`: records in one MySQL / MariaDB (InnoDB) table, through a sqlx pool.
//!
//! # Schema
//!
//! [`MySqlStore::migrate`] creates the table (default name `idem_records`) if it is missing:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS `idem_records` (
//!     k           BINARY(32)  NOT NULL,  -- Key: blake3 of (namespace, scope, key); never raw
//!     state       ENUM('in_progress','completed') NOT NULL,
//!     token       BIGINT      NOT NULL,  -- FencingToken::as_i64 of the current claim
//!     live_until  BIGINT      NOT NULL,  -- ms since the epoch (server clock): lease end while
//!                                        -- in progress, ttl end once completed
//!     expires_at  BIGINT      NOT NULL,  -- ms: when the sweep may delete the row (completed:
//!                                        -- = live_until; in progress: lease end + grace)
//!     fingerprint BINARY(32)  NULL,
//!     value       MEDIUMBLOB  NULL,      -- the encoded envelope (type tag, version, value)
//!     PRIMARY KEY (k),
//!     KEY idem_expires_at (expires_at)
//! ) ENGINE=InnoDB
//! ```
//!
//! A record *counts* while `live_until` is in the future, whatever its state, so every
//! statement decides liveness from that one column. Times are the server's clock
//! (`UTC_TIMESTAMP(6)`, fixed for the length of a statement), so processes with skewed
//! clocks agree. The table name is the only thing ever interpolated into SQL, and it is
//! validated as a plain identifier; keys, tokens and values are bound parameters.
//!
//! # Claim: one `INSERT ... ON DUPLICATE KEY UPDATE`
//!
//! The statement is in `claim_sql` below. It is atomic under concurrent inserts because InnoDB
//! runs it as one step on the primary-key index: the insert either creates the row (holding
//! an exclusive lock on the new index record until the statement commits) or meets the
//! duplicate, takes an exclusive lock on the existing row — waiting for any other writer of
//! that key to commit first — and evaluates the `UPDATE` assignments against the latest
//! committed version of the row under that lock. No other statement can change the row
//! between the liveness test and the write, so of N concurrent claims of an absent key
//! exactly one inserts, and of N concurrent claims of a dead record exactly one replaces it.
//!
//! The statement reports what it found through the OK packet, in one round trip:
//! `LAST_INSERT_ID(expr)` in the first assignment hands the client a code computed from the
//! row as it was (1 = took over a lapsed claim, 2 = replaced an expired completed record,
//! 3 = live claim, 4 = live completed record); a plain insert never calls it and reports 0.
//! A conflict (3 or 4) then reads the row to return its fingerprint or value; if that read
//! finds the record gone or lapsed (it changed in between), the claim starts over, so the
//! answer is always a state the record really had.
//!
//! # Waiting, expiry
//!
//! MySQL has no notification channel: [`Store::wait`] polls the row with a backoff from
//! `poll_interval` (10 ms) doubling to `poll_max` (200 ms), bounded by the timeout and by the
//! holder's lease; waiters in this process are also woken at once by this store's own
//! completions and releases. Expired rows stay until [`MySqlStore::purge_expired`] (or the
//! task of [`SqlStoreBuilder::sweep_every`]) deletes them in batches, through the
//! `expires_at` index.
//!
//! # Durable steps
//!
//! A second table, `<table>_steps` (created by [`MySqlStore::migrate`], see there), keeps the
//! calls' step records, one row per (key, step name, occurrence). A step write is ONE
//! statement, `INSERT INTO <steps> ... SELECT ... FROM <table> WHERE k = ? AND token = ? AND
//! state = 'in_progress' LOCK IN SHARE MODE ON DUPLICATE KEY UPDATE ...`: it writes only while
//! the call is in progress under the writer's token, and its shared lock on the record row
//! makes a takeover wait for it (or it for the takeover, and then it selects nothing:
//! fenced). [`Store::remove`] deletes the record and its steps in one multi-table `DELETE`;
//! the sweep deletes expired steps too.
//!
//! # Missing table
//!
//! The store never creates its table by itself: an operation on a missing table fails with a
//! [`StoreError::Backend`] that says to call [`MySqlStore::migrate`].

mod admin;
mod steps;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use idem_core::{
    async_trait, Claim, ClaimRequest, CompletedRecord, FencingToken, Fingerprint, Key, RecordState,
    StepId, StepRecord, Store, StoreError,
};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::{AssertSqlSafe, Row};

use super::base::{Core, Source, SqlBackend, SqlOptions};
use super::lanes::Lanes;
use super::{config_error, SqlStoreBuilder};
use steps::StepStatements;

pub use super::DEFAULT_TABLE;

/// The largest value a `MEDIUMBLOB` holds.
const MEDIUMBLOB_MAX: usize = (1 << 24) - 1;
/// Room left in `max_allowed_packet` for the statement around a value.
const PACKET_OVERHEAD: usize = 16 << 10;
/// How often a claim starts over when the record changes between its two steps, or when
/// InnoDB picks it as a deadlock victim, before it gives up.
const CLAIM_ATTEMPTS: usize = 16;

/// The server's clock in milliseconds since the epoch. `UTC_TIMESTAMP` is fixed for the
/// duration of one statement and does not depend on the session's time zone.
const NOW_MS: &str =
    "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000)";

/// What the claim statement found, from its `LAST_INSERT_ID(...)`.
const FOUND_NOTHING: u64 = 0;
const FOUND_LAPSED_CLAIM: u64 = 1;
const FOUND_EXPIRED_RECORD: u64 = 2;
const FOUND_LIVE_CLAIM: u64 = 3;
const FOUND_LIVE_RECORD: u64 = 4;
/// Our own live claim (a retried claim whose first reply was lost): its lease restarts.
const FOUND_OWN_CLAIM: u64 = 5;

/// The claim statement. Binds: key, token, lease ms, lease + grace ms, fingerprint (insert);
/// then token ×2, token + fingerprint, token, token + lease + grace ms, token, token + lease
/// ms (update).
///
/// `ON DUPLICATE KEY UPDATE` assigns left to right and each assignment sees the columns
/// assigned before it. Liveness is read from `live_until` alone, so `live_until` is assigned
/// LAST: every earlier assignment still sees the old value, and they all take the same
/// branch. The code for the client is computed in the first assignment, while `state` is
/// still the old one. A live record is kept as it is unless it is our own claim, whose lease
/// restarts (the token never changes for a live record, so the test stays true throughout).
fn claim_sql(table: &str) -> String {
    let live = format!("live_until > {NOW_MS}");
    let keep = format!("({live} AND NOT (state = 'in_progress' AND token = ?))");
    format!(
        "INSERT INTO {table} (k, state, token, live_until, expires_at, fingerprint, value) \
         VALUES (?, 'in_progress', ?, {NOW_MS} + ?, {NOW_MS} + ?, ?, NULL) \
         ON DUPLICATE KEY UPDATE \
           token = IF(LAST_INSERT_ID(CASE \
                        WHEN {live} AND state = 'in_progress' AND token = ? \
                          THEN {FOUND_OWN_CLAIM} \
                        WHEN {live} AND state = 'in_progress' THEN {FOUND_LIVE_CLAIM} \
                        WHEN {live} THEN {FOUND_LIVE_RECORD} \
                        WHEN state = 'in_progress' THEN {FOUND_LAPSED_CLAIM} \
                        ELSE {FOUND_EXPIRED_RECORD} END) >= {FOUND_LIVE_CLAIM}, token, ?), \
           fingerprint = IF({keep}, fingerprint, ?), \
           value = IF({keep}, value, NULL), \
           expires_at = IF({keep}, expires_at, {NOW_MS} + ?), \
           state = IF({keep}, state, 'in_progress'), \
           live_until = IF({keep}, live_until, {NOW_MS} + ?)"
    )
}

/// A statement's text, shared by every run (cloning it for a query is a reference count).
type Sql = Arc<str>;

/// Every statement of the store, built once for its table.
#[derive(Debug)]
struct Statements {
    create: Sql,
    claim: Sql,
    read: Sql,
    complete: Sql,
    release: Sql,
    renew: Sql,
    held: Sql,
    get: Sql,
    probe: Sql,
    remove: Sql,
    purge: Sql,
}

impl Statements {
    fn new(table: &str) -> Self {
        Statements {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {table} ( \
                   k BINARY(32) NOT NULL, \
                   state ENUM('in_progress','completed') NOT NULL, \
                   token BIGINT NOT NULL, \
                   live_until BIGINT NOT NULL, \
                   expires_at BIGINT NOT NULL, \
                   fingerprint BINARY(32) NULL, \
                   value MEDIUMBLOB NULL, \
                   PRIMARY KEY (k), \
                   KEY idem_expires_at (expires_at) \
                 ) ENGINE=InnoDB"
            )
            .into(),
            claim: claim_sql(table).into(),
            read: format!(
                "SELECT CAST(state = 'completed' AS SIGNED) AS completed, token, fingerprint, \
                        value, CAST(live_until - {NOW_MS} AS SIGNED) AS remaining \
                 FROM {table} WHERE k = ?"
            )
            .into(),
            complete: format!(
                "UPDATE {table} SET state = 'completed', value = ?, \
                   live_until = {NOW_MS} + ?, expires_at = {NOW_MS} + ? \
                 WHERE k = ? AND token = ? AND state = 'in_progress'"
            )
            .into(),
            release: format!(
                "DELETE FROM {table} WHERE k = ? AND token = ? AND state = 'in_progress'"
            )
            .into(),
            renew: format!(
                "UPDATE {table} SET live_until = {NOW_MS} + ?, expires_at = {NOW_MS} + ? \
                 WHERE k = ? AND token = ? AND state = 'in_progress'"
            )
            .into(),
            held: format!(
                "SELECT CAST(state = 'completed' AS SIGNED) FROM {table} WHERE k = ? AND token = ?"
            )
            .into(),
            get: format!(
                "SELECT CAST(state = 'completed' AS SIGNED) AS completed, token, fingerprint, \
                        value, CAST(live_until - {NOW_MS} AS SIGNED) AS remaining \
                 FROM {table} WHERE k = ? AND live_until > {NOW_MS}"
            )
            .into(),
            probe: format!(
                "SELECT CAST(live_until - {NOW_MS} AS SIGNED) AS remaining FROM {table} \
                 WHERE k = ? AND state = 'in_progress' AND live_until > {NOW_MS}"
            )
            .into(),
            remove: format!("DELETE FROM {table} WHERE k = ?").into(),
            purge: format!(
                "DELETE FROM {table} WHERE expires_at < {NOW_MS} ORDER BY expires_at LIMIT ?"
            )
            .into(),
        }
    }
}

/// The state clones of a [`MySqlStore`] share.
#[doc(hidden)]
pub struct Inner {
    core: Core,
    pool: MySqlPool,
    /// The pool again, and the reserved lane of renewals and settles.
    lanes: Lanes<sqlx::MySql>,
    sql: Statements,
    /// The steps table's statements.
    steps: StepStatements,
}

/// A [`Store`] on a MySQL or MariaDB table (InnoDB), through a sqlx connection pool. Cheap to
/// clone: clones share the pool.
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_core::StoreError> {
/// use std::time::Duration;
/// use idem_stores::MySqlStore;
/// let store = MySqlStore::builder()
///     .url("mysql://app@127.0.0.1:3306/app") // or .pool(existing_mysql_pool)
///     .table("payments_idempotency")
///     .max_value_size(256 << 10)
///     .operation_timeout(Duration::from_secs(5))
///     .sweep_every(Duration::from_secs(60), 1000)
///     .build()?;
/// store.migrate().await?; // CREATE TABLE IF NOT EXISTS, once at start-up
/// let shared: std::sync::Arc<dyn idem_core::Store> = std::sync::Arc::new(store);
/// # let _ = shared;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MySqlStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MySqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlStore")
            .field("table", &self.inner.core.table)
            .field("pool_size", &self.inner.pool.size())
            .finish()
    }
}

/// Configures a [`MySqlStore`]: [`SqlStoreBuilder`], with no MySQL-only option.
pub type MySqlStoreBuilder = SqlStoreBuilder<MySqlStore>;

impl SqlBackend for MySqlStore {
    type Pool = MySqlPool;
    type Extra = ();
    type Inner = Inner;
    const NAME: &'static str = "mysql";

    fn default_options() -> SqlOptions {
        SqlOptions::defaults(16, Duration::from_millis(200))
    }

    /// Fails if the table name is not a plain identifier or the value limit is over
    /// `MEDIUMBLOB`'s.
    fn build(source: Source<MySqlPool>, options: SqlOptions, _: ()) -> Result<Self, StoreError> {
        let quoted = quote_table(&options.table)?;
        if options.max_value_size > MEDIUMBLOB_MAX {
            return Err(config_error(format!(
                "mysql: max_value_size {} is over the MEDIUMBLOB limit of {MEDIUMBLOB_MAX} bytes",
                options.max_value_size
            )));
        }
        let pool = match source {
            Source::Pool(pool) => pool,
            Source::Url(url) => {
                let connect: MySqlConnectOptions = url
                    .parse()
                    .map_err(|e| StoreError::backend("mysql: invalid connection URL", e))?;
                // No ping before each acquire: it doubles every operation's round trips
                // (a slow link then loses leases); a broken connection fails its statement,
                // which the store retries on a fresh one.
                MySqlPoolOptions::new()
                    .max_connections(options.max_connections)
                    .acquire_timeout(options.acquire_timeout)
                    .test_before_acquire(false)
                    .connect_lazy_with(connect)
            }
            Source::None => return Err(config_error("mysql: no .url(..) or .pool(..)")),
        };
        Ok(MySqlStore {
            inner: Arc::new(Inner {
                sql: Statements::new(&quoted),
                steps: StepStatements::new(&options.table, &quoted),
                core: Core::new(options.table.clone(), &options),
                lanes: Lanes::new(pool.clone(), options.reserved_connections, &options),
                pool,
            }),
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let pool = &self.inner.pool;
        self.inner
            .core
            .timed("mysql: connect", sqlx::query("SELECT 1").execute(pool))
            .await
            .map(drop)
    }

    super::backend_plumbing!(MySqlStore);
}

/// Quotes a validated `name` or `database.name` with backticks.
fn quote_table(table: &str) -> Result<String, StoreError> {
    let parts: Vec<&str> = table.split('.').collect();
    if parts.len() > 2 || !parts.iter().all(|p| super::is_identifier(p, 64)) {
        return Err(config_error(format!(
            "table name {table:?} is not a plain identifier (letters, digits, `_`; optionally \
             `database.table`)"
        )));
    }
    Ok(parts
        .iter()
        .map(|p| format!("`{p}`"))
        .collect::<Vec<_>>()
        .join("."))
}

use super::millis as ms;

fn fingerprint(bytes: Option<Vec<u8>>) -> Result<Option<Fingerprint>, StoreError> {
    super::fingerprint("mysql", bytes)
}

/// InnoDB rolled the statement back to break a deadlock or a lock wait: safe to run again.
fn rolled_back(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            matches!(db.code().as_deref(), Some("40001"))
                || db
                    .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                    .is_some_and(|m| matches!(m.number(), 1213 | 1205))
        }
        _ => false,
    }
}

/// The connection broke under the statement (reset, closed, killed, server shut down).
fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            // ER_SERVER_SHUTDOWN, MariaDB's ER_CONNECTION_KILLED
            .is_some_and(|m| matches!(m.number(), 1053 | 1927)),
        _ => false,
    }
}

/// Runs one statement, again if InnoDB rolled it back (deadlock victim, lock wait timeout;
/// up to `CLAIM_ATTEMPTS` runs) or if the connection broke under it (once, on a fresh
/// connection). Also says whether a broken connection was retried: the first run may then
/// have been applied, and the caller must allow for it.
async fn run_retrying<T, F, Fut>(mut op: F) -> Result<(T, bool), sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut lost = false;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match op().await {
            Ok(v) => return Ok((v, lost)),
            Err(e) if rolled_back(&e) && attempt < CLAIM_ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(attempt as u64)).await;
            }
            Err(e) if !lost && connection_lost(&e) => lost = true,
            Err(e) => return Err(e),
        }
    }
}

impl MySqlStore {
    /// A builder with the defaults: table [`DEFAULT_TABLE`], 16 connections, 5 s acquire
    /// timeout, 10 s operation timeout, 1 MiB values, no sweeper.
    ///
    /// Give it the database with [`url`](SqlStoreBuilder::url) or
    /// [`pool`](SqlStoreBuilder::pool). Code written for the first version, which took the
    /// pool here (`MySqlStore::builder(pool)`), becomes `MySqlStore::builder().pool(pool)`;
    /// a builder given neither fails to build with an error that says so.
    pub fn builder() -> MySqlStoreBuilder {
        SqlStoreBuilder::new()
    }

    /// A store on a new pool for `url` (`mysql://user:password@host:port/database`), with the
    /// default table and limits. Connects lazily: an unreachable server shows as
    /// [`StoreError`]s from the operations (and from [`migrate`](Self::migrate)), not here.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder().url(url).build()
    }

    /// The pool the store runs on.
    pub fn pool(&self) -> &MySqlPool {
        &self.inner.pool
    }

    /// The table name as configured.
    pub fn table(&self) -> &str {
        &self.inner.core.table
    }

    /// Deletes expired rows every `every`, `batch` rows per statement, in a background task
    /// that stops when the returned handle or the last clone of the store is dropped.
    ///
    /// Kept for one release from the first version; the sweeper is now an option of the
    /// builder, the same on the three SQL stores:
    /// `MySqlStore::builder().pool(pool).sweep_every(every, batch)`. Outside a tokio runtime
    /// nothing is spawned and a warning is logged.
    #[deprecated(
        since = "0.1.0",
        note = "use `MySqlStore::builder().sweep_every(every, batch)`, as on the other SQL stores"
    )]
    #[allow(deprecated)]
    pub fn spawn_sweeper(&self, every: Duration, batch: u32) -> Sweeper {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(target: "idem", store = "mysql", "spawn_sweeper outside a tokio runtime: no sweeper");
            return Sweeper { task: None };
        };
        let every = every.max(Duration::from_millis(10));
        let task = runtime.spawn(super::base::run_sweeper::<MySqlStore>(
            self.downgrade(),
            every,
            batch.max(1),
        ));
        Sweeper { task: Some(task) }
    }

    /// The pool of the reserved lane (renewals, settles), or the main pool without one.
    pub(crate) fn priority_pool(&self) -> &MySqlPool {
        self.inner.lanes.priority_pool()
    }

    /// The bound on one store operation.
    pub(crate) fn operation_timeout(&self) -> Duration {
        self.inner.core.op_timeout
    }

    /// Creates the table and its expiry index if they are missing (safe to run at every
    /// start, from several processes at once), and lowers the value limit to what the
    /// server's `max_allowed_packet` lets through.
    ///
    /// It also creates the steps table of durable steps beside it (on a database of an
    /// earlier version too), named `<table>_steps` (a table name over 58 bytes keeps its
    /// first 41 and a hash of the whole name):
    ///
    /// ```sql
    /// CREATE TABLE IF NOT EXISTS `idem_records_steps` (
    ///     k           BINARY(32)       NOT NULL,  -- the call's key
    ///     name        VARBINARY(512)   NOT NULL,  -- the step's name (bytes: compared exactly)
    ///     occurrence  INT UNSIGNED     NOT NULL,  -- among steps of that name
    ///     status      TINYINT UNSIGNED NOT NULL,  -- 1 started, 2 done, 3 failed
    ///     value       MEDIUMBLOB       NOT NULL,  -- the step's envelope (opaque to the store)
    ///     expires_at  BIGINT           NOT NULL,  -- ms (server clock): when the sweep may delete it
    ///     PRIMARY KEY (k, name, occurrence),
    ///     KEY idem_steps_expires_at (expires_at)
    /// ) ENGINE=InnoDB
    /// ```
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let inner = &*self.inner;
        inner
            .core
            .bounded(async {
                sqlx::query(AssertSqlSafe(inner.sql.create.clone()))
                    .execute(&inner.pool)
                    .await
                    .map_err(|e| self.inner.core.fail("mysql: create table", e))?;
                sqlx::query(AssertSqlSafe(inner.steps.create.clone()))
                    .execute(&inner.pool)
                    .await
                    .map_err(|e| inner.steps.fail("mysql: create the steps table", e))?;
                let packet: u64 =
                    sqlx::query_scalar("SELECT CAST(@@max_allowed_packet AS UNSIGNED)")
                        .fetch_one(&inner.pool)
                        .await
                        .map_err(|e| StoreError::backend("mysql: read max_allowed_packet", e))?;
                let fits = usize::try_from(packet)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(PACKET_OVERHEAD);
                let limit = inner.core.max_value_size();
                if limit > fits {
                    tracing::warn!(
                        max_value_size = limit,
                        max_allowed_packet = packet,
                        "idem mysql store: lowering max_value_size to fit the server's \
                     max_allowed_packet"
                    );
                    inner.core.max_value_size.store(fits, Ordering::Relaxed);
                }
                Ok(())
            })
            .await
    }

    /// Deletes up to `batch` rows whose expiry has passed (completed records past their ttl,
    /// claims past their lease and the grace period) and up to `batch` expired step records,
    /// and returns how many it deleted. Never deletes a live record: a row that a claim
    /// revives meanwhile no longer matches.
    pub async fn purge_expired(&self, batch: u32) -> Result<u64, StoreError> {
        let inner = &*self.inner;
        self.inner
            .core
            .bounded(async {
                let (r, _) = run_retrying(|| {
                    sqlx::query(AssertSqlSafe(inner.sql.purge.clone()))
                        .bind(batch)
                        .execute(&inner.pool)
                })
                .await
                .map_err(|e| self.inner.core.fail("mysql: purge expired rows", e))?;
                // A database whose steps table was never created (an earlier version's, not
                // migrated again yet) has no steps to delete.
                let steps = match run_retrying(|| {
                    sqlx::query(AssertSqlSafe(inner.steps.purge.clone()))
                        .bind(batch)
                        .execute(&inner.pool)
                })
                .await
                {
                    Ok((s, _)) => s.rows_affected(),
                    Err(e) if super::is_missing_table(&e) => 0,
                    Err(e) => return Err(inner.steps.fail("mysql: purge expired steps", e)),
                };
                Ok(r.rows_affected() + steps)
            })
            .await
    }

    /// One run of the claim statement: what it found (`FOUND_*`), and whether a broken
    /// connection was retried.
    async fn claim_once(&self, req: &ClaimRequest) -> Result<(u64, bool), sqlx::Error> {
        let inner = &*self.inner;
        let lease = ms(req.lease);
        let until = lease.saturating_add(inner.core.lease_grace_ms);
        let fp = req.fingerprint.map(|f| f.0.to_vec());
        let token = req.token.as_i64();
        let (r, lost) = run_retrying(|| async {
            let mut c = inner.lanes.acquire().await?;
            let r = sqlx::query(AssertSqlSafe(inner.sql.claim.clone()))
                .bind(&req.key.0[..])
                .bind(token)
                .bind(lease)
                .bind(until)
                .bind(fp.clone())
                .bind(token) // own claim?
                .bind(token) // the new token
                .bind(token)
                .bind(fp.clone())
                .bind(token)
                .bind(token)
                .bind(until)
                .bind(token)
                .bind(token)
                .bind(lease)
                .execute(c.conn())
                .await;
            c.done();
            r
        })
        .await?;
        Ok((r.last_insert_id(), lost))
    }

    /// What a claim finds before it writes: a live record that answers it, our own live
    /// claim (a retry whose first reply was lost), or nothing live.
    async fn read_live(&self, req: &ClaimRequest) -> Result<Seen, StoreError> {
        let inner = &*self.inner;
        let (row, _) = run_retrying(|| async {
            let mut c = inner.lanes.acquire().await?;
            let r = sqlx::query(AssertSqlSafe(inner.sql.read.clone()))
                .bind(&req.key.0[..])
                .fetch_optional(c.conn())
                .await;
            c.done();
            r
        })
        .await
        .map_err(|e| self.inner.core.fail("mysql: read record", e))?;
        let Some(row) = row else {
            return Ok(Seen::Nothing);
        };
        let remaining: i64 = row.try_get("remaining").map_err(corrupt)?;
        if remaining <= 0 {
            return Ok(Seen::Nothing);
        }
        let completed: i64 = row.try_get("completed").map_err(corrupt)?;
        let token: i64 = row.try_get("token").map_err(corrupt)?;
        let fingerprint = fingerprint(row.try_get("fingerprint").map_err(corrupt)?)?;
        let remaining = Duration::from_millis(remaining.unsigned_abs());
        Ok(if completed != 0 {
            let value: Option<Vec<u8>> = row.try_get("value").map_err(corrupt)?;
            Seen::Other(Claim::Completed(completed_record(
                fingerprint,
                value,
                remaining,
            )?))
        } else if token == req.token.as_i64() {
            // Our own claim: an earlier run of the upsert was applied but its answer was lost.
            // Tokens are fresh per claim, so the holder is us; the upsert restarts the lease.
            Seen::Ours
        } else {
            Seen::Other(Claim::InProgress {
                fingerprint,
                lease_remaining: Some(remaining),
            })
        })
    }

    async fn claim_statements(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        for _ in 0..CLAIM_ATTEMPTS {
            // Read first: a live record is the answer as it stands (a completed record only
            // expires or is deleted, a live claim is a true conflict at the time of the read),
            // so replays and conflicts cost one SELECT and take no lock.
            if let Seen::Other(answer) = self.read_live(req).await? {
                return Ok(answer);
            }
            let (found, _) = self
                .claim_once(req)
                .await
                .map_err(|e| self.inner.core.fail("mysql: claim", e))?;
            match found {
                FOUND_NOTHING | FOUND_EXPIRED_RECORD | FOUND_OWN_CLAIM => {
                    return Ok(Claim::Acquired { taken_over: false })
                }
                FOUND_LAPSED_CLAIM => return Ok(Claim::Acquired { taken_over: true }),
                // Someone else's record became live between the read and the upsert: read
                // it on the next turn.
                FOUND_LIVE_CLAIM | FOUND_LIVE_RECORD => {}
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "mysql claim reported an unknown outcome {other}"
                    )))
                }
            }
        }
        Err(super::base::unsettled("mysql", CLAIM_ATTEMPTS))
    }

    /// The state of the row on `key` if `token` is its token: `Some(true)` completed,
    /// `Some(false)` in progress, `None` when it is absent or someone else's.
    async fn state_under(
        &self,
        key: &Key,
        token: FencingToken,
    ) -> Result<Option<bool>, StoreError> {
        let inner = &*self.inner;
        let (completed, _) = run_retrying(|| async {
            let mut c = inner.lanes.priority().await?;
            let r = sqlx::query_scalar::<_, i64>(AssertSqlSafe(self.inner.sql.held.clone()))
                .bind(&key.0[..])
                .bind(token.as_i64())
                .fetch_optional(c.conn())
                .await;
            c.done();
            r
        })
        .await
        .map_err(|e| self.inner.core.fail("mysql: read claim", e))?;
        Ok(completed.map(|c| c != 0))
    }
}

/// What [`MySqlStore::read_live`] found.
enum Seen {
    Nothing,
    Ours,
    Other(Claim),
}

/// A completed record read back, with its remaining TTL (server clock).
fn completed_record(
    fingerprint: Option<Fingerprint>,
    value: Option<Vec<u8>>,
    remaining: Duration,
) -> Result<CompletedRecord, StoreError> {
    super::completed("mysql", fingerprint, value, remaining)
}

fn corrupt(e: sqlx::Error) -> StoreError {
    StoreError::Corrupt(format!("mysql row: {e}"))
}

#[async_trait]
impl Store for MySqlStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        super::base::claim(self, req).await
    }

    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.core.check_size(value)?;
        let ttl = ms(ttl);
        let inner = &*self.inner;
        let done = self
            .inner
            .core
            .bounded(async {
                let (r, _) = run_retrying(|| async {
                    let mut c = inner.lanes.priority().await?;
                    let r = sqlx::query(AssertSqlSafe(inner.sql.complete.clone()))
                        .bind(value)
                        .bind(ttl)
                        .bind(ttl)
                        .bind(&key.0[..])
                        .bind(token.as_i64())
                        .execute(c.conn())
                        .await;
                    c.done();
                    r
                })
                .await
                .map_err(|e| self.inner.core.fail("mysql: complete", e))?;
                if r.rows_affected() > 0 {
                    return Ok(());
                }
                // An earlier attempt (whose reply was lost, here or in the runtime) may have
                // completed the record already: only this token's holder completes under it, and
                // a completed record keeps its token, so this is our value (left as it is).
                if self.state_under(key, token).await? == Some(true) {
                    return Ok(());
                }
                Err(StoreError::Fenced)
            })
            .await;
        inner.core.waiters.wake(key);
        done
    }

    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError> {
        // A claim under this token still running (its caller went away) ends first.
        self.inner.core.after_claim(token).await;
        let inner = &*self.inner;
        self.inner
            .core
            .bounded(async {
                // Deletes only our own claim; a record that is gone, completed or someone
                // else's is left as it is, and the release still succeeds.
                run_retrying(|| async {
                    let mut c = inner.lanes.priority().await?;
                    let r = sqlx::query(AssertSqlSafe(inner.sql.release.clone()))
                        .bind(&key.0[..])
                        .bind(token.as_i64())
                        .execute(c.conn())
                        .await;
                    c.done();
                    r
                })
                .await
                .map_err(|e| self.inner.core.fail("mysql: release", e))?;
                Ok(())
            })
            .await?;
        inner.core.waiters.wake(key);
        Ok(())
    }

    async fn renew(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let lease_timeout = lease / 4;
        let lease = ms(lease);
        let until = lease.saturating_add(self.inner.core.lease_grace_ms);
        let inner = &*self.inner;
        // One renewal of a claim at a time: a hedge waits for the one in flight, for a
        // quarter of the lease at most (that one may be stuck opening a connection).
        let _turn = tokio::time::timeout(lease_timeout, inner.core.renewal_turn(token)).await;
        self.inner
            .core
            .bounded(async {
                let (r, _) = run_retrying(|| async {
                    let mut c = inner.lanes.priority().await?;
                    let r = sqlx::query(AssertSqlSafe(inner.sql.renew.clone()))
                        .bind(lease)
                        .bind(until)
                        .bind(&key.0[..])
                        .bind(token.as_i64())
                        .execute(c.conn())
                        .await;
                    c.done();
                    r
                })
                .await
                .map_err(|e| self.inner.core.fail("mysql: renew", e))?;
                // sqlx asks the server for rows *matched* (CLIENT_FOUND_ROWS); on a connection
                // that counts rows *changed*, a renew writing the deadline the row already has
                // (twice in one millisecond) reports 0. Tell that from a lost claim.
                if r.rows_affected() > 0 || self.state_under(key, token).await? == Some(false) {
                    Ok(())
                } else {
                    Err(StoreError::Fenced)
                }
            })
            .await
    }

    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError> {
        let inner = &*self.inner;
        let row = self
            .inner
            .core
            .bounded(async {
                run_retrying(|| {
                    sqlx::query(AssertSqlSafe(inner.sql.get.clone()))
                        .bind(&key.0[..])
                        .fetch_optional(&inner.pool)
                })
                .await
                .map(|(row, _)| row)
                .map_err(|e| self.inner.core.fail("mysql: get", e))
            })
            .await?;
        let Some(row) = row else { return Ok(None) };
        let completed: i64 = row.try_get("completed").map_err(corrupt)?;
        let fingerprint = fingerprint(row.try_get("fingerprint").map_err(corrupt)?)?;
        Ok(Some(if completed != 0 {
            let value: Option<Vec<u8>> = row.try_get("value").map_err(corrupt)?;
            let remaining: i64 = row.try_get("remaining").map_err(corrupt)?;
            RecordState::Completed(completed_record(
                fingerprint,
                value,
                Duration::from_millis(remaining.max(0).unsigned_abs()),
            )?)
        } else {
            let token: i64 = row.try_get("token").map_err(corrupt)?;
            RecordState::InProgress {
                token: FencingToken::from_i64(token),
                fingerprint,
            }
        }))
    }

    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        // Polling cannot miss a completion: each look reads the row as it is now.
        let inner = &*self.inner;
        let look = || async {
            let remaining: Option<i64> = inner
                .core
                .bounded(async {
                    run_retrying(|| {
                        sqlx::query_scalar(AssertSqlSafe(inner.sql.probe.clone()))
                            .bind(&key.0[..])
                            .fetch_optional(&inner.pool)
                    })
                    .await
                    .map(|(remaining, _)| remaining)
                    .map_err(|e| inner.core.fail("mysql: wait", e))
                })
                .await?;
            Ok(remaining.filter(|r| *r > 0).map(super::from_millis))
        };
        inner.core.wait(key, timeout, look).await
    }

    /// Deletes the record and its step records in one multi-table statement. (On a database
    /// whose steps table was never created, the record alone.)
    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let run = |sql: &Sql| {
            let sql = sql.clone();
            run_retrying(move || {
                sqlx::query(AssertSqlSafe(sql.clone()))
                    .bind(&key.0[..])
                    .execute(&inner.pool)
            })
        };
        self.inner
            .core
            .bounded(async {
                match run(&inner.steps.remove).await {
                    Ok(_) => Ok(()),
                    Err(e) if super::is_missing_table(&e) => run(&inner.sql.remove)
                        .await
                        .map(drop)
                        .map_err(|e| self.inner.core.fail("mysql: remove", e)),
                    Err(e) => Err(self.inner.core.fail("mysql: remove", e)),
                }
            })
            .await?;
        inner.core.waiters.wake(key);
        Ok(())
    }

    fn supports_steps(&self) -> bool {
        true
    }

    /// One `SELECT` of the call's unexpired step rows.
    async fn load_steps(&self, key: &Key) -> Result<Vec<StepRecord>, StoreError> {
        let inner = &*self.inner;
        let rows = inner
            .core
            .bounded(async {
                run_retrying(|| {
                    sqlx::query(AssertSqlSafe(inner.steps.load.clone()))
                        .bind(&key.0[..])
                        .fetch_all(&inner.pool)
                })
                .await
                .map(|(rows, _)| rows)
                .map_err(|e| inner.steps.fail("mysql: load steps", e))
            })
            .await?;
        rows.iter()
            .map(|row| {
                let name: Vec<u8> = row.try_get("name").map_err(corrupt)?;
                let name = String::from_utf8(name)
                    .map_err(|e| StoreError::Corrupt(format!("mysql: step name: {e}")))?;
                super::steps::record(
                    "mysql",
                    name,
                    row.try_get("occurrence").map_err(corrupt)?,
                    row.try_get("status").map_err(corrupt)?,
                    row.try_get("value").map_err(corrupt)?,
                )
            })
            .collect()
    }

    /// The fenced upsert (see the module docs), on the reserved lane like a completion.
    async fn put_step(
        &self,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.core.check_size(&step.value)?;
        super::steps::check_name("mysql", &step.id)?;
        let inner = &*self.inner;
        inner
            .core
            .bounded(async {
                let (written, _) = run_retrying(|| async {
                    let mut c = inner.lanes.priority().await?;
                    let r = inner.steps.put_on(c.conn(), key, token, step, ttl).await;
                    c.done();
                    r
                })
                .await
                .map_err(|e| inner.steps.fail("mysql: put step", e))?;
                // 0 rows: fenced, or (on a connection without CLIENT_FOUND_ROWS) a row
                // replaced by an identical one. A record in progress under our token now
                // was so when the statement ran (a token, once gone, never comes back).
                if written > 0 || self.state_under(key, token).await? == Some(false) {
                    Ok(())
                } else {
                    Err(StoreError::Fenced)
                }
            })
            .await
    }

    /// One fenced `DELETE` of the step row.
    async fn clear_step(
        &self,
        key: &Key,
        token: FencingToken,
        id: &StepId,
    ) -> Result<(), StoreError> {
        super::steps::check_name("mysql", id)?;
        let inner = &*self.inner;
        inner
            .core
            .bounded(async {
                let (r, _) = run_retrying(|| async {
                    let mut c = inner.lanes.priority().await?;
                    let r = sqlx::query(AssertSqlSafe(inner.steps.clear.clone()))
                        .bind(&key.0[..])
                        .bind(id.name.as_bytes())
                        .bind(id.occurrence)
                        .bind(token.as_i64())
                        .execute(c.conn())
                        .await;
                    c.done();
                    r
                })
                .await
                .map_err(|e| inner.steps.fail("mysql: clear step", e))?;
                // 0 rows: fenced, or no such step (Ok while the record is held).
                if r.rows_affected() > 0 || self.state_under(key, token).await? == Some(false) {
                    Ok(())
                } else {
                    Err(StoreError::Fenced)
                }
            })
            .await
    }

    fn detached(&self) -> Option<Arc<dyn Store>> {
        Some(Arc::new(self.clone()))
    }

    fn name(&self) -> &'static str {
        "mysql"
    }

    fn max_value_size(&self) -> usize {
        self.inner.core.max_value_size()
    }
}

#[cfg(test)]
mod tests {
    use super::quote_table;

    #[test]
    fn table_names_are_plain_identifiers() {
        assert_eq!(
            quote_table("idem_records").ok().as_deref(),
            Some("`idem_records`")
        );
        assert_eq!(
            quote_table("app.idem").ok().as_deref(),
            Some("`app`.`idem`")
        );
        for bad in [
            "",
            "1abc",
            "a-b",
            "a`b",
            "a;drop table x",
            "a.b.c",
            "a.",
            "é",
            "a b",
        ] {
            assert!(quote_table(bad).is_err(), "{bad:?} accepted");
        }
        assert!(quote_table(&"x".repeat(65)).is_err());
    }
}

/// The handle of [`MySqlStore::spawn_sweeper`]'s task; dropping it stops the task.
#[deprecated(
    since = "0.1.0",
    note = "use `MySqlStore::builder().sweep_every(every, batch)`, as on the other SQL stores"
)]
#[derive(Debug)]
pub struct Sweeper {
    task: Option<tokio::task::JoinHandle<()>>,
}

#[allow(deprecated)]
impl Drop for Sweeper {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
