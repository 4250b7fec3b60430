//! `PostgresStore`: records in a PostgreSQL table, through a sqlx pool.
//!
//! - **Schema**: one row per hashed key (see [`PostgresStore::migrate`] for the DDL). The table
//!   name is the only text interpolated into SQL; it is validated as an identifier and quoted.
//!   Everything else is a bound parameter.
//! - **Claim** is one statement: a CTE reads the live record in the statement's snapshot; if
//!   there is none, `INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE <expired or lease passed>
//!   RETURNING` inserts or takes over; the statement returns the claimed row `UNION ALL` the
//!   live record. Postgres locks the conflicting row, so of any number of concurrent claims
//!   exactly one inserts or takes over. A replay or a conflict writes nothing (no lock, no WAL
//!   flush). In READ COMMITTED the `ON CONFLICT` check sees the newest committed row while the
//!   read sees the statement's snapshot: when the upsert meets a live row committed after the
//!   snapshot, the statement returns nothing, wrote nothing, and the claim simply runs again
//!   (never a check-then-insert).
//! - **Fencing**: complete, release and renew are `UPDATE`/`DELETE ... WHERE key = $1 AND
//!   token = $2 AND state = 'in_progress'`. A completed row keeps the token it was completed
//!   under, so a completion retried after a lost reply finds it and answers `Ok` (same
//!   statement); otherwise no row means [`StoreError::Fenced`]. A release never fails for
//!   that: it deletes only our own claim.
//! - **Retries** (contract v2): a claim that finds our own live claim restarts its lease in the
//!   same statement and answers `Acquired { taken_over: false }`.
//! - **Time** is the database's clock (`now()`), so processes with skewed clocks agree.
//! - **Waiting**: complete, release and remove `pg_notify` the table's channel with the key in
//!   the same statement. Each store keeps ONE listener connection (`LISTEN`) in a background
//!   task that wakes the local waiters of that key. While the listener is down, waiters poll
//!   with a bounded backoff.
//! - **Expiry**: [`PostgresStore::purge_expired`] deletes expired rows in batches (index on
//!   `expires_at`); [`SqlStoreBuilder::sweep_every`] runs it in the background.
//! - **Durable steps** live in a second table, `<table>_steps` (created by
//!   [`PostgresStore::migrate`]), one row per (key, step name, occurrence). A step write is one
//!   statement: `INSERT ... SELECT ... FROM (<the record in progress under the token> FOR SHARE)
//!   ON CONFLICT DO UPDATE`, so it writes only while the call is held under its token, and a
//!   takeover waits for it (or it for the takeover, and then writes nothing: fenced).
//!   [`Store::remove`] deletes the record and its steps in one statement; the sweep deletes
//!   expired steps too.
//! - **Missing table**: every operation on a table that does not exist fails with a
//!   [`StoreError::Backend`] that says to call [`PostgresStore::migrate`]; the store never
//!   creates it by itself.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use idem_core::{
    async_trait, Claim, ClaimRequest, CompletedRecord, FencingToken, Fingerprint, Key, RecordState,
    StepId, StepRecord, Store, StoreError,
};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Row};
use tokio::task::AbortHandle;

mod admin;
mod listener;
mod schema;
mod steps;

use super::base::{Core, Source, SqlBackend, SqlOptions};
use super::lanes::Lanes;
use super::{from_millis, millis, SqlStoreBuilder};
use listener::run_listener;
use schema::{Statements, Table};
use steps::StepStatements;

pub use super::DEFAULT_TABLE;

/// How many times a claim is re-run when its read raced with another writer.
const CLAIM_ATTEMPTS: usize = 32;
/// How many times a claim is re-run after its connection died under it.
const CONNECTION_RETRIES: usize = 2;

/// A PostgreSQL store. Cheap to clone (clones share the pool and the listener).
///
/// ```no_run
/// use std::time::Duration;
/// use idem_stores::PostgresStore;
///
/// # async fn demo() -> Result<(), idem_core::StoreError> {
/// let store = PostgresStore::builder()
///     .url("postgres://postgres@127.0.0.1:5432/app")
///     .table("idem_records")
///     .sweep_every(Duration::from_secs(60), 1000)
///     .connect()
///     .await?;
/// store.migrate().await?;
/// let shared: std::sync::Arc<dyn idem_core::Store> = std::sync::Arc::new(store);
/// # let _ = shared;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

/// The state clones of a [`PostgresStore`] share.
#[doc(hidden)]
pub struct Inner {
    core: Core,
    pool: PgPool,
    /// The pool again, and the reserved lane of renewals and settles.
    lanes: Lanes<sqlx::Postgres>,
    channel: String,
    sql: Statements,
    /// The steps table's statements.
    steps: StepStatements,
    listener: Option<AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(listener) = &self.listener {
            listener.abort();
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.inner.core.table)
            .field("pool_size", &self.inner.pool.size())
            .field("listening", &self.is_listening())
            .finish()
    }
}

/// Configures a [`PostgresStore`]: [`SqlStoreBuilder`] with PostgreSQL's
/// [`notify`](SqlStoreBuilder::notify).
pub type PostgresStoreBuilder = SqlStoreBuilder<PostgresStore>;

/// PostgreSQL's own options.
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct PgExtra {
    notify: bool,
}

impl Default for PgExtra {
    fn default() -> Self {
        PgExtra { notify: true }
    }
}

impl SqlStoreBuilder<PostgresStore> {
    /// Whether to keep one `LISTEN` connection that wakes waiters on notifications (default
    /// true). Without it, or while it is down, waiters poll.
    pub fn notify(mut self, on: bool) -> Self {
        self.extra.notify = on;
        self
    }

    /// Deprecated name of [`notify`](Self::notify).
    #[deprecated(note = "use `notify`")]
    pub fn listen(self, on: bool) -> Self {
        self.notify(on)
    }
}

impl SqlBackend for PostgresStore {
    type Pool = PgPool;
    type Extra = PgExtra;
    type Inner = Inner;
    const NAME: &'static str = "postgres";

    fn default_options() -> SqlOptions {
        SqlOptions::defaults(10, Duration::from_millis(500))
    }

    fn build(
        source: Source<PgPool>,
        options: SqlOptions,
        extra: PgExtra,
    ) -> Result<Self, StoreError> {
        let table = Table::parse(&options.table)?;
        let pool = match source {
            Source::Pool(pool) => pool,
            Source::Url(url) => {
                let connect: PgConnectOptions = url
                    .parse()
                    .map_err(|e| StoreError::backend("postgres: invalid connection URL", e))?;
                // No ping before each acquire: it doubles every operation's round trips
                // (a slow link then loses leases); a broken connection fails its statement,
                // which the store retries on a fresh one.
                PgPoolOptions::new()
                    .max_connections(options.max_connections)
                    .acquire_timeout(options.acquire_timeout)
                    .test_before_acquire(false)
                    .connect_lazy_with(connect)
            }
            Source::None => return Err(super::config_error("postgres: no .url(..) or .pool(..)")),
        };
        let core = Core::new(table.display.clone(), &options);
        let channel = table.display.clone();
        let listener = if extra.notify {
            let listener_pool = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(options.acquire_timeout)
                .max_lifetime(None)
                .idle_timeout(None)
                .connect_lazy_with((*pool.connect_options()).clone());
            let task = tokio::spawn(run_listener(
                listener_pool,
                channel.clone(),
                Arc::clone(&core.waiters),
            ));
            Some(task.abort_handle())
        } else {
            None
        };
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                sql: Statements::new(&table),
                steps: StepStatements::new(&table),
                core,
                lanes: Lanes::new(pool.clone(), options.reserved_connections, &options),
                pool,
                channel,
                listener,
            }),
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let pool = &self.inner.pool;
        self.inner
            .core
            .timed("postgres: connect", sqlx::query("SELECT 1").execute(pool))
            .await
            .map(drop)
    }

    super::backend_plumbing!(PostgresStore);
}

impl PostgresStore {
    /// A builder with the defaults: table [`DEFAULT_TABLE`], 10 connections, 5 s acquire
    /// timeout, 10 s operation timeout, 1 MiB values, `LISTEN` on, no sweeper.
    pub fn builder() -> PostgresStoreBuilder {
        SqlStoreBuilder::new()
    }

    /// Connects to `url` with the defaults (table [`DEFAULT_TABLE`]).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder().url(url).connect().await
    }

    /// The pool (shared with clones of this store).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The table name as configured.
    pub fn table(&self) -> &str {
        &self.inner.core.table
    }

    /// The pool of the reserved lane (renewals, settles), or the main pool without one.
    pub(crate) fn priority_pool(&self) -> &PgPool {
        self.inner.lanes.priority_pool()
    }

    /// The bound on one store operation.
    pub(crate) fn operation_timeout(&self) -> Duration {
        self.inner.core.op_timeout
    }

    /// Whether the `LISTEN` connection is up (waiters are woken by notifications rather than
    /// polling).
    pub fn is_listening(&self) -> bool {
        self.inner.core.waiters.listening.load(Ordering::Acquire)
    }

    /// Creates the table and its expiry index if they do not exist. Safe to run concurrently
    /// from many processes (serialized by an advisory lock). The DDL:
    ///
    /// ```sql
    /// CREATE TABLE IF NOT EXISTS idem_records (
    ///     key         BYTEA       PRIMARY KEY CHECK (octet_length(key) = 32), -- hashed key
    ///     state       TEXT        NOT NULL CHECK (state IN ('in_progress', 'completed')),
    ///     token       BIGINT      NOT NULL,   -- fencing token of the current claim
    ///     attempt     INTEGER     NOT NULL DEFAULT 1, -- claims in a row; > 1 after a takeover
    ///     fingerprint BYTEA,                  -- 32-byte argument fingerprint, or NULL
    ///     value       BYTEA,                  -- the encoded record (type tag inside); NULL while in progress
    ///     lease_until TIMESTAMPTZ,            -- in progress: the lease's end (kept current by renewals)
    ///     expires_at  TIMESTAMPTZ NOT NULL,   -- when the sweep may delete the row
    ///     claimed_at  TIMESTAMPTZ,            -- when the current claim was made
    ///     renewals    INTEGER                 -- how many times its holder renewed it
    /// );
    /// CREATE INDEX IF NOT EXISTS idem_records_expires_at ON idem_records (expires_at);
    ///
    /// -- Durable steps: one row per step record of a call, beside the records table
    /// -- (added to a database of an earlier version by the same call).
    /// CREATE TABLE IF NOT EXISTS idem_records_steps (
    ///     key         BYTEA       NOT NULL CHECK (octet_length(key) = 32), -- the call's key
    ///     name        BYTEA       NOT NULL,   -- the step's name (UTF-8 bytes: NUL included)
    ///     occurrence  BIGINT      NOT NULL CHECK (occurrence >= 0), -- among steps of that name
    ///     status      SMALLINT    NOT NULL,   -- 1 started, 2 done, 3 failed
    ///     value       BYTEA       NOT NULL,   -- the step's envelope (opaque to the store)
    ///     expires_at  TIMESTAMPTZ NOT NULL,   -- when the sweep may delete the row
    ///     PRIMARY KEY (key, name, occurrence)
    /// );
    /// CREATE INDEX IF NOT EXISTS idem_records_steps_expires ON idem_records_steps (expires_at);
    /// ```
    ///
    /// On a table of the first layout (without `claimed_at` and `renewals`) it adds the two
    /// columns (`ALTER TABLE .. ADD COLUMN IF NOT EXISTS`, no rewrite); its rows keep NULL
    /// there, which `inspect` shows as unknown.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let pool = self.inner.pool.clone();
        let sql = self.inner.sql.clone();
        let steps = self.inner.steps.clone();
        let lock_name = self.inner.core.table.clone();
        self.inner
            .core
            .timed("postgres: migrate", async move {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                    .bind(format!("idem migrate {lock_name}"))
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(AssertSqlSafe(sql.create_table.clone()))
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(AssertSqlSafe(sql.add_columns.clone()))
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(AssertSqlSafe(sql.create_index.clone()))
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(AssertSqlSafe(steps.create_table.clone()))
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(AssertSqlSafe(steps.create_index.clone()))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await
            })
            .await
    }

    /// Deletes up to `batch` expired rows (completed past their TTL, in progress past their
    /// lease plus the grace period) and up to `batch` expired step records, and returns how
    /// many it deleted. Rows locked by a concurrent claim or step write are skipped. Call it
    /// until it returns less than `batch` to empty the backlog.
    pub async fn purge_expired(&self, batch: u32) -> Result<u64, StoreError> {
        let records = self.purge_expired_records(batch).await?;
        Ok(records + self.purge_expired_steps(batch).await?)
    }

    /// The sweep of the steps table. A database whose steps table was never created (an
    /// earlier version's, not migrated again yet) has none to delete.
    async fn purge_expired_steps(&self, batch: u32) -> Result<u64, StoreError> {
        let q =
            sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.steps.purge))).bind(i64::from(batch));
        match tokio::time::timeout(self.inner.core.op_timeout, q.execute(&self.inner.pool)).await {
            Ok(Ok(done)) => Ok(done.rows_affected()),
            Ok(Err(e)) if super::is_missing_table(&e) => Ok(0),
            Ok(Err(e)) => Err(self.inner.steps.fail("postgres: purge expired steps", e)),
            Err(_) => Err(StoreError::Timeout(self.inner.core.op_timeout)),
        }
    }

    /// The sweep of the records table.
    async fn purge_expired_records(&self, batch: u32) -> Result<u64, StoreError> {
        let pool = self.inner.pool.clone();
        let sql = Arc::clone(&self.inner.sql.purge);
        let done = self
            .inner
            .core
            .timed("postgres: purge expired", async move {
                sqlx::query(AssertSqlSafe(sql))
                    .bind(i64::from(batch))
                    .execute(&pool)
                    .await
            })
            .await?;
        Ok(done.rows_affected())
    }

    /// Runs a fenced statement that returns one row when it applied (or, for a completion,
    /// had already applied under this token); no row is [`StoreError::Fenced`], except for a
    /// release, which succeeds either way.
    async fn fenced(
        &self,
        what: &'static str,
        sql: &Arc<str>,
        key: &Key,
        token: FencingToken,
        extra: Extra<'_>,
    ) -> Result<(), StoreError> {
        // A release answers `Ok` whether or not it deleted anything.
        let extra_is_release = matches!(extra, Extra::Release);
        let mut q = sqlx::query(AssertSqlSafe(Arc::clone(sql)))
            .bind(&key.0[..])
            .bind(token.as_i64());
        q = match extra {
            Extra::Complete { value, ttl_ms } => q
                .bind(value)
                .bind(ttl_ms)
                .bind(self.inner.channel.as_str())
                .bind(key.to_hex()),
            Extra::Release => q.bind(self.inner.channel.as_str()).bind(key.to_hex()),
            Extra::Renew { lease_ms } => q.bind(lease_ms).bind(self.inner.core.lease_grace_ms),
        };
        // On the reserved lane: renewals and settles never queue behind claims and bodies.
        let row = self
            .inner
            .core
            .timed(what, async {
                let mut conn = self.inner.lanes.priority().await?;
                let row = q.fetch_optional(conn.conn()).await;
                conn.done();
                row
            })
            .await?;
        match (row, extra_is_release) {
            (Some(_), _) | (None, true) => Ok(()),
            (None, false) => Err(StoreError::Fenced),
        }
    }

    /// The holder's remaining lease, or `None` when the key is not in progress. A connection
    /// that dies under the read counts as `None`: the waiter returns early (allowed) and its
    /// caller claims again, which retries on a fresh connection.
    async fn lease_remaining(&self, key: &Key) -> Result<Option<Duration>, StoreError> {
        let pool = &self.inner.pool;
        let q = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.lease))).bind(&key.0[..]);
        let op_timeout = self.inner.core.op_timeout;
        let row = match tokio::time::timeout(op_timeout, q.fetch_optional(pool)).await {
            Ok(Ok(row)) => row,
            Ok(Err(e)) if is_connection_loss(&e) => return Ok(None),
            Ok(Err(e)) => return Err(self.inner.core.fail("postgres: wait", e)),
            Err(_) => return Err(StoreError::Timeout(op_timeout)),
        };
        match row {
            None => Ok(None),
            Some(row) => {
                let ms: i64 = row
                    .try_get(0)
                    .map_err(|e| StoreError::Corrupt(format!("postgres: lease: {e}")))?;
                Ok(Some(from_millis(ms)))
            }
        }
    }
}

enum Extra<'a> {
    Complete { value: &'a [u8], ttl_ms: i64 },
    Release,
    Renew { lease_ms: i64 },
}

impl PostgresStore {
    /// The claim: statement runs until one answers (see the module docs).
    async fn claim_statements(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let fingerprint = req.fingerprint.map(|f| f.0.to_vec());
        let mut retries = 0;
        for _ in 0..CLAIM_ATTEMPTS {
            let q = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.claim)))
                .bind(&req.key.0[..])
                .bind(req.token.as_i64())
                .bind(fingerprint.as_deref())
                .bind(millis(req.lease))
                .bind(self.inner.core.lease_grace_ms);
            let fetched = async {
                let mut conn = self.inner.lanes.acquire().await?;
                let row = q.fetch_optional(conn.conn()).await;
                conn.done();
                row
            };
            let row = match fetched.await {
                Ok(row) => row,
                // A connection that died under the statement (server restart, killed backend):
                // run the claim again on a fresh one. Safe: a claim that went through is
                // recognised by its token.
                Err(e) if is_connection_loss(&e) && retries < CONNECTION_RETRIES => {
                    retries += 1;
                    tracing::debug!(target: "idem", error = %e, "postgres: connection lost under a claim; retrying");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Err(e) => return Err(self.inner.core.fail("postgres: claim", e)),
            };
            if let Some(row) = row {
                return decode_claim(&row);
            }
            // The upsert met a live row committed after the statement's snapshot, which the
            // read could not see: nothing was written, so run the claim again.
            tokio::task::yield_now().await;
        }
        Err(super::base::unsettled("postgres", CLAIM_ATTEMPTS))
    }
}

#[async_trait]
impl Store for PostgresStore {
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
        let sql = Arc::clone(&self.inner.sql.complete);
        let extra = Extra::Complete {
            value,
            ttl_ms: millis(ttl),
        };
        let r = self
            .fenced("postgres: complete", &sql, key, token, extra)
            .await;
        self.inner.core.waiters.wake(key);
        r
    }

    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError> {
        // A claim under this token still running (its caller went away) ends first.
        self.inner.core.after_claim(token).await;
        let sql = Arc::clone(&self.inner.sql.release);
        let r = self
            .fenced("postgres: release", &sql, key, token, Extra::Release)
            .await;
        self.inner.core.waiters.wake(key);
        r
    }

    async fn renew(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let sql = Arc::clone(&self.inner.sql.renew);
        let extra = Extra::Renew {
            lease_ms: millis(lease),
        };
        // One renewal of a claim at a time: a hedge waits for the one in flight, for a
        // quarter of the lease at most (that one may be stuck opening a connection).
        let _turn = tokio::time::timeout(lease / 4, self.inner.core.renewal_turn(token)).await;
        self.fenced("postgres: renew", &sql, key, token, extra)
            .await
    }

    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError> {
        let q = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.get))).bind(&key.0[..]);
        let row = self
            .inner
            .core
            .timed("postgres: get", q.fetch_optional(&self.inner.pool))
            .await?;
        let Some(row) = row else { return Ok(None) };
        let state: String = col(&row, "state")?;
        let fingerprint = fingerprint(col(&row, "fingerprint")?)?;
        match state.as_str() {
            "in_progress" => Ok(Some(RecordState::InProgress {
                token: FencingToken::from_i64(col(&row, "token")?),
                fingerprint,
                times: super::claim_times(
                    col(&row, "age_ms")?,
                    col(&row, "lease_ms")?,
                    col(&row, "renewals")?,
                ),
            })),
            "completed" => Ok(Some(RecordState::Completed(completed(&row, fingerprint)?))),
            other => Err(StoreError::Corrupt(format!(
                "postgres: unknown state {other:?}"
            ))),
        }
    }

    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        self.inner
            .core
            .wait(key, timeout, || self.lease_remaining(key))
            .await
    }

    /// Deletes the record and its step records in one statement. (On a database whose steps
    /// table was never created, the record alone.)
    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        let run = |sql: &Arc<str>| {
            sqlx::query(AssertSqlSafe(Arc::clone(sql)))
                .bind(&key.0[..])
                .bind(self.inner.channel.as_str())
                .bind(key.to_hex())
                .fetch_all(&self.inner.pool)
        };
        let op_timeout = self.inner.core.op_timeout;
        match tokio::time::timeout(op_timeout, run(&self.inner.steps.remove)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if super::is_missing_table(&e) => {
                self.inner
                    .core
                    .timed("postgres: remove", run(&self.inner.sql.remove))
                    .await?;
            }
            Ok(Err(e)) => return Err(self.inner.core.fail("postgres: remove", e)),
            Err(_) => return Err(StoreError::Timeout(op_timeout)),
        }
        self.inner.core.waiters.wake(key);
        Ok(())
    }

    fn supports_steps(&self) -> bool {
        true
    }

    /// One `SELECT` of the call's unexpired step rows.
    async fn load_steps(&self, key: &Key) -> Result<Vec<StepRecord>, StoreError> {
        let steps = &self.inner.steps;
        let q = sqlx::query(AssertSqlSafe(Arc::clone(&steps.load))).bind(&key.0[..]);
        let rows =
            match tokio::time::timeout(self.inner.core.op_timeout, q.fetch_all(&self.inner.pool))
                .await
            {
                Ok(Ok(rows)) => rows,
                Ok(Err(e)) => return Err(steps.fail("postgres: load steps", e)),
                Err(_) => return Err(StoreError::Timeout(self.inner.core.op_timeout)),
            };
        rows.iter()
            .map(|row| {
                let name: Vec<u8> = col(row, "name")?;
                let name = String::from_utf8(name).map_err(|e| {
                    StoreError::Corrupt(format!("postgres: a step name is not UTF-8: {e}"))
                })?;
                super::steps::record(
                    "postgres",
                    name,
                    col(row, "occurrence")?,
                    col(row, "status")?,
                    col(row, "value")?,
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
        super::steps::check_name("postgres", &step.id)?;
        let steps = &self.inner.steps;
        let written = tokio::time::timeout(self.inner.core.op_timeout, async {
            let mut conn = self.inner.lanes.priority().await?;
            let n = steps.put_on(conn.conn(), key, token, step, ttl).await;
            conn.done();
            n
        })
        .await;
        match written {
            Ok(Ok(0)) => Err(StoreError::Fenced),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(steps.fail("postgres: put step", e)),
            Err(_) => Err(StoreError::Timeout(self.inner.core.op_timeout)),
        }
    }

    /// One fenced `DELETE` of the step row.
    async fn clear_step(
        &self,
        key: &Key,
        token: FencingToken,
        id: &StepId,
    ) -> Result<(), StoreError> {
        super::steps::check_name("postgres", id)?;
        let steps = &self.inner.steps;
        let held = tokio::time::timeout(self.inner.core.op_timeout, async {
            let mut conn = self.inner.lanes.priority().await?;
            let held = steps.clear_on(conn.conn(), key, token, id).await;
            conn.done();
            held
        })
        .await;
        match held {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(StoreError::Fenced),
            Ok(Err(e)) => Err(steps.fail("postgres: clear step", e)),
            Err(_) => Err(StoreError::Timeout(self.inner.core.op_timeout)),
        }
    }

    fn detached(&self) -> Option<Arc<dyn Store>> {
        Some(Arc::new(self.clone()))
    }

    fn name(&self) -> &'static str {
        "postgres"
    }

    fn max_value_size(&self) -> usize {
        self.inner.core.max_value_size()
    }
}

/// Reads the row of the claim statement.
fn decode_claim(row: &PgRow) -> Result<Claim, StoreError> {
    if col::<bool>(row, "acquired")? {
        return Ok(Claim::Acquired {
            taken_over: col::<bool>(row, "taken_over")?,
        });
    }
    let state: String = col(row, "state")?;
    let fingerprint = fingerprint(col(row, "fingerprint")?)?;
    match state.as_str() {
        "in_progress" => {
            let ms: i64 = col(row, "lease_ms")?;
            Ok(Claim::InProgress {
                fingerprint,
                lease_remaining: Some(from_millis(ms)),
            })
        }
        "completed" => Ok(Claim::Completed(completed(row, fingerprint)?)),
        other => Err(StoreError::Corrupt(format!(
            "postgres: unknown state {other:?}"
        ))),
    }
}

/// A completed record from a row with `value` and `expires_ms` (remaining TTL, DB clock).
fn completed(row: &PgRow, fingerprint: Option<Fingerprint>) -> Result<CompletedRecord, StoreError> {
    let expires_ms: i64 = col(row, "expires_ms")?;
    super::completed(
        "postgres",
        fingerprint,
        col(row, "value")?,
        from_millis(expires_ms),
    )
}

fn col<'r, T>(row: &'r PgRow, name: &str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(name)
        .map_err(|e| StoreError::Corrupt(format!("postgres: column {name}: {e}")))
}

fn fingerprint(bytes: Option<Vec<u8>>) -> Result<Option<Fingerprint>, StoreError> {
    super::fingerprint("postgres", bytes)
}

/// Whether an error means the connection died (the statement may or may not have run).
fn is_connection_loss(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        // Class 08: connection exception; 57P01-57P03: admin shutdown, crash shutdown,
        // cannot connect now.
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn building_outside_a_runtime_is_an_error() {
        let r = PostgresStore::builder()
            .url("postgres://u@127.0.0.1:1/db")
            .build();
        assert!(matches!(r, Err(StoreError::Backend { .. })));
    }
}
