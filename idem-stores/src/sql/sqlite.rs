//! `SqliteStore`: records in a SQLite table (a file, or in memory), through a sqlx pool.
//!
//! - **Schema**: one row per hashed key (see [`SqliteStore::migrate`] for the DDL). The table
//!   name is the only text interpolated into SQL; it is validated as an identifier and quoted.
//! - **Claim** is one statement under SQLite's single write lock: `INSERT ... SELECT ... WHERE
//!   NOT EXISTS (<live record>) ON CONFLICT (key) DO UPDATE ... RETURNING attempt`. It inserts,
//!   or replaces an expired record (completed past its TTL, or a claim whose lease passed), and
//!   returns a row exactly when this claim took the key. When a live record holds the key it
//!   writes nothing (no page dirtied, no sync), and the record is then read and reported (in
//!   progress or completed); if it is gone by then, the claim runs again. Never a
//!   check-then-insert: the decision to insert is the statement's own.
//! - **Fencing**: `UPDATE`/`DELETE ... WHERE key = ?1 AND token = ?2`. A completed row keeps
//!   the token it was completed under, so a completion retried after a lost reply matches it
//!   and leaves it as it is (`Ok`); no row means [`StoreError::Fenced`]. A release deletes
//!   only our own claim and never fails for that. A claim that finds our own live claim
//!   restarts its lease in the claim statement (`Acquired { taken_over: false }`).
//! - **Time** is this process's clock, in Unix milliseconds, bound as a parameter (SQLite is
//!   local: every process sharing the file shares the machine's clock).
//! - **Waiting** is bounded polling with backoff (10 ms doubling to 250 ms by default); waiters
//!   in the same process are also woken at once by completions and releases through this
//!   store.
//! - **Expiry**: [`SqliteStore::purge_expired`] deletes expired rows in batches (index on
//!   `expires_at`); [`SqlStoreBuilder::sweep_every`] runs it in the background.
//! - **Durable steps** live in a second table, `<table>_steps` (created by
//!   [`SqliteStore::migrate`]), one row per (key, step name, occurrence). A step write is one
//!   statement under the write lock: `INSERT ... SELECT ... WHERE EXISTS (<the record in
//!   progress under the token>) ON CONFLICT DO UPDATE`; no row written is
//!   [`StoreError::Fenced`]. [`Store::remove`] deletes the record and its steps in one
//!   transaction; the sweep deletes expired steps too.
//! - **Missing table**: like the other SQL stores, this one never creates its table by
//!   itself: an operation on a missing table fails with a [`StoreError::Backend`] that says to
//!   call [`SqliteStore::migrate`].
//!
//! A file database is opened in WAL mode (synced on every commit unless `durable(false)`) with
//! a busy timeout, so several processes can share it. An in-memory database
//! (`sqlite::memory:`) lives in ONE connection (every connection to `:memory:` would otherwise
//! be a separate database) that the pool never closes.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_core::{
    async_trait, Claim, ClaimRequest, CompletedRecord, FencingToken, Fingerprint, Key, RecordState,
    StepId, StepRecord, Store, StoreError,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row};

mod admin;
mod schema;
mod steps;

use super::base::{Core, Source, SqlBackend, SqlOptions};
use super::{millis, SqlStoreBuilder};
use schema::{parse_table, Statements};
use steps::StepStatements;

pub use super::DEFAULT_TABLE;

/// How many times a claim is re-run when the live record it met was gone before it was read.
const CLAIM_ATTEMPTS: usize = 32;

/// A SQLite store. Cheap to clone (clones share the pool).
///
/// ```
/// use idem_stores::SqliteStore;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), idem_core::StoreError> {
/// let store = SqliteStore::builder().url("sqlite::memory:").connect().await?;
/// store.migrate().await?;
/// let shared: std::sync::Arc<dyn idem_core::Store> = std::sync::Arc::new(store);
/// # let _ = shared;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

/// The state clones of a [`SqliteStore`] share.
#[doc(hidden)]
pub struct Inner {
    core: Core,
    pool: SqlitePool,
    sql: Statements,
    /// The steps table's statements.
    steps: StepStatements,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("table", &self.inner.core.table)
            .field("pool_size", &self.inner.pool.size())
            .finish()
    }
}

/// Configures a [`SqliteStore`]: [`SqlStoreBuilder`] with SQLite's
/// [`busy_timeout`](SqlStoreBuilder::busy_timeout) and [`durable`](SqlStoreBuilder::durable).
pub type SqliteStoreBuilder = SqlStoreBuilder<SqliteStore>;

/// SQLite's own options.
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct SqliteExtra {
    busy_timeout: Duration,
    durable: bool,
}

impl Default for SqliteExtra {
    fn default() -> Self {
        SqliteExtra {
            busy_timeout: Duration::from_secs(5),
            durable: true,
        }
    }
}

impl SqlStoreBuilder<SqliteStore> {
    /// How long a statement waits for another connection's write lock. Default 5 s.
    pub fn busy_timeout(mut self, d: Duration) -> Self {
        self.extra.busy_timeout = d;
        self
    }

    /// For a file: `true` (default) syncs every commit to disk (`synchronous = FULL`), so
    /// records survive a power loss; `false` (`synchronous = NORMAL`) is about 3× faster and
    /// still survives a crash of the process, but a power loss may forget the last records
    /// (their calls would run again).
    pub fn durable(mut self, on: bool) -> Self {
        self.extra.durable = on;
        self
    }
}

impl SqlBackend for SqliteStore {
    type Pool = SqlitePool;
    type Extra = SqliteExtra;
    type Inner = Inner;
    const NAME: &'static str = "sqlite";

    fn default_options() -> SqlOptions {
        SqlOptions::defaults(4, Duration::from_millis(250))
    }

    fn build(
        source: Source<SqlitePool>,
        options: SqlOptions,
        extra: SqliteExtra,
    ) -> Result<Self, StoreError> {
        let table = parse_table(&options.table)?;
        let pool = match source {
            Source::Pool(pool) => pool,
            Source::Url(url) => {
                let connect = SqliteConnectOptions::from_str(&url)
                    .map_err(|e| StoreError::backend("sqlite: invalid database URL", e))?
                    .busy_timeout(extra.busy_timeout);
                if is_in_memory(&url) {
                    // One connection that lives as long as the pool: the database is in it.
                    SqlitePoolOptions::new()
                        .max_connections(1)
                        .min_connections(1)
                        .idle_timeout(None)
                        .max_lifetime(None)
                        .acquire_timeout(options.acquire_timeout)
                        .connect_lazy_with(connect)
                } else {
                    SqlitePoolOptions::new()
                        .max_connections(options.max_connections)
                        .acquire_timeout(options.acquire_timeout)
                        .connect_lazy_with(
                            connect
                                .create_if_missing(true)
                                .journal_mode(SqliteJournalMode::Wal)
                                .synchronous(if extra.durable {
                                    SqliteSynchronous::Full
                                } else {
                                    SqliteSynchronous::Normal
                                }),
                        )
                }
            }
            Source::None => return Err(super::config_error("sqlite: no .url(..) or .pool(..)")),
        };
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                sql: Statements::new(&table),
                steps: StepStatements::new(&table),
                core: Core::new(table, &options),
                pool,
            }),
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // Connections that open a new file at the same moment race to switch it to WAL, and
        // that switch answers SQLITE_BUSY at once (the busy timeout does not cover it): the
        // loser tries again shortly. Once the file is in WAL mode no connection needs to.
        let mut attempt = 0u64;
        loop {
            let opened = self
                .inner
                .core
                .timed(
                    "sqlite: connect",
                    sqlx::query("SELECT 1").execute(&self.inner.pool),
                )
                .await;
            match opened {
                Ok(_) => return Ok(()),
                Err(e) if attempt < 20 && is_busy(&e) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(5 * attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    super::backend_plumbing!(SqliteStore);
}

/// SQLITE_BUSY (5) or SQLITE_LOCKED (6), primary codes, from a connect.
fn is_busy(e: &StoreError) -> bool {
    let StoreError::Backend { source, .. } = e else {
        return false;
    };
    match source.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(db)) => db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| c & 0xff == 5 || c & 0xff == 6),
        _ => false,
    }
}

impl SqliteStore {
    /// What a claim finds before it writes: a live record that answers it, our own live
    /// claim (a retry whose first reply was lost), or nothing live.
    async fn read_live(&self, req: &ClaimRequest) -> Result<Seen, StoreError> {
        let now = now_ms();
        let q = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.live)))
            .bind(&req.key.0[..])
            .bind(now);
        let row = self
            .inner
            .core
            .timed("sqlite: claim", q.fetch_optional(&self.inner.pool))
            .await?;
        let Some(row) = row else {
            return Ok(Seen::Nothing);
        };
        let state: String = col(&row, "state")?;
        let fingerprint = fingerprint(col(&row, "fingerprint")?)?;
        match state.as_str() {
            "in_progress" if col::<i64>(&row, "token")? == req.token.as_i64() => Ok(Seen::Ours),
            "in_progress" => {
                let until: i64 = col(&row, "lease_until")?;
                Ok(Seen::Other(Claim::InProgress {
                    fingerprint,
                    lease_remaining: Some(ms_until(until, now)),
                }))
            }
            "completed" => Ok(Seen::Other(Claim::Completed(completed(
                &row,
                fingerprint,
                now,
            )?))),
            other => Err(StoreError::Corrupt(format!(
                "sqlite: unknown state {other:?}"
            ))),
        }
    }

    /// A builder with the defaults: table [`DEFAULT_TABLE`], 4 connections (1 in memory), 5 s
    /// busy timeout, 10 s operation timeout, 1 MiB values, no sweeper.
    pub fn builder() -> SqliteStoreBuilder {
        SqlStoreBuilder::new()
    }

    /// Connects to `url` with the defaults.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder().url(url).connect().await
    }

    /// The pool (shared with clones of this store).
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.inner.core.table
    }

    /// Creates the table and its expiry index if they do not exist. The DDL (times are Unix
    /// milliseconds):
    ///
    /// ```sql
    /// CREATE TABLE IF NOT EXISTS idem_records (
    ///     key         BLOB    PRIMARY KEY NOT NULL CHECK (length(key) = 32), -- hashed key
    ///     state       TEXT    NOT NULL CHECK (state IN ('in_progress', 'completed')),
    ///     token       INTEGER NOT NULL,   -- fencing token of the current claim
    ///     attempt     INTEGER NOT NULL DEFAULT 1, -- claims in a row; > 1 after a takeover
    ///     fingerprint BLOB,               -- 32-byte argument fingerprint, or NULL
    ///     value       BLOB,               -- the encoded record (type tag inside); NULL while in progress
    ///     lease_until INTEGER,            -- in progress: the lease's end
    ///     expires_at  INTEGER NOT NULL    -- when the sweep may delete the row
    /// );
    /// CREATE INDEX IF NOT EXISTS idem_records_expires_at ON idem_records (expires_at);
    ///
    /// -- Durable steps: one row per step record of a call, beside the records table
    /// -- (added to a database of an earlier version by the same call).
    /// CREATE TABLE IF NOT EXISTS idem_records_steps (
    ///     key         BLOB    NOT NULL CHECK (length(key) = 32), -- the call's key
    ///     name        TEXT    NOT NULL,   -- the step's name
    ///     occurrence  INTEGER NOT NULL CHECK (occurrence >= 0), -- among steps of that name
    ///     status      INTEGER NOT NULL,   -- 1 started, 2 done, 3 failed
    ///     value       BLOB    NOT NULL,   -- the step's envelope (opaque to the store)
    ///     expires_at  INTEGER NOT NULL,   -- when the sweep may delete the row
    ///     PRIMARY KEY (key, name, occurrence)
    /// ) WITHOUT ROWID;
    /// CREATE INDEX IF NOT EXISTS idem_records_steps_expires ON idem_records_steps (expires_at);
    /// ```
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let pool = self.inner.pool.clone();
        let sql = self.inner.sql.clone();
        let steps = self.inner.steps.clone();
        self.inner
            .core
            .timed("sqlite: migrate", async move {
                for ddl in [
                    &sql.create_table,
                    &sql.create_index,
                    &steps.create_table,
                    &steps.create_index,
                ] {
                    sqlx::query(AssertSqlSafe(ddl.clone()))
                        .execute(&pool)
                        .await?;
                }
                Ok(())
            })
            .await
    }

    /// Deletes up to `batch` expired rows (completed past their TTL, in progress past their
    /// lease plus the grace period) and up to `batch` expired step records, and returns how
    /// many it deleted.
    pub async fn purge_expired(&self, batch: u32) -> Result<u64, StoreError> {
        let q = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.purge)))
            .bind(now_ms())
            .bind(i64::from(batch));
        let done = self
            .inner
            .core
            .timed("sqlite: purge expired", q.execute(&self.inner.pool))
            .await?;
        let q = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.steps.purge)))
            .bind(now_ms())
            .bind(i64::from(batch));
        let op_timeout = self.inner.core.op_timeout;
        let steps = match tokio::time::timeout(op_timeout, q.execute(&self.inner.pool)).await {
            Ok(Ok(steps)) => steps.rows_affected(),
            // A database whose steps table was never created (an earlier version's, not
            // migrated again yet) has no steps to delete.
            Ok(Err(e)) if super::is_missing_table(&e) => 0,
            Ok(Err(e)) => return Err(self.inner.steps.fail("sqlite: purge expired steps", e)),
            Err(_) => return Err(StoreError::Timeout(op_timeout)),
        };
        Ok(done.rows_affected() + steps)
    }

    /// The record and its steps, in one transaction.
    async fn remove_with_steps(&self, key: &Key) -> Result<(), sqlx::Error> {
        let mut tx = self.inner.pool.begin_with("BEGIN IMMEDIATE").await?;
        for sql in [&self.inner.sql.remove, &self.inner.steps.remove] {
            sqlx::query(AssertSqlSafe(Arc::clone(sql)))
                .bind(&key.0[..])
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    async fn lease_remaining(&self, key: &Key) -> Result<Option<Duration>, StoreError> {
        let q = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.lease)))
            .bind(&key.0[..])
            .bind(now_ms());
        let row = self
            .inner
            .core
            .timed("sqlite: wait", q.fetch_optional(&self.inner.pool))
            .await?;
        match row {
            None => Ok(None),
            Some(row) => {
                let until: i64 = col(&row, "lease_until")?;
                let ms = until.saturating_sub(now_ms());
                Ok(Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0))))
            }
        }
    }

    async fn fenced(
        &self,
        what: &'static str,
        q: sqlx::query::Query<'_, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    ) -> Result<(), StoreError> {
        let done = self
            .inner
            .core
            .timed(what, q.execute(&self.inner.pool))
            .await?;
        if done.rows_affected() == 0 {
            Err(StoreError::Fenced)
        } else {
            Ok(())
        }
    }
}

impl SqliteStore {
    /// The claim: statement runs until one answers (see the module docs).
    async fn claim_statements(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        for _ in 0..CLAIM_ATTEMPTS {
            // Read first: a live record is the answer as it stands, and a read takes no write
            // lock, so replays and conflicts do not queue behind writers.
            let ours = match self.read_live(req).await? {
                Seen::Other(answer) => return Ok(answer),
                Seen::Ours => true,
                Seen::Nothing => false,
            };
            let now = now_ms();
            let lease_until = now.saturating_add(millis(req.lease));
            let q = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.claim)))
                .bind(&req.key.0[..])
                .bind(req.token.as_i64())
                .bind(req.fingerprint.as_ref().map(|f| &f.0[..]))
                .bind(now)
                .bind(lease_until)
                .bind(lease_until.saturating_add(self.inner.core.lease_grace_ms));
            let row = self
                .inner
                .core
                .timed("sqlite: claim", q.fetch_optional(&self.inner.pool))
                .await?;
            if let Some(row) = row {
                // Our own claim, retried, restarted its lease: it is not a takeover.
                return Ok(Claim::Acquired {
                    taken_over: !ours && col::<i64>(&row, "attempt")? > 1,
                });
            }
            // A live record took the key between the read and the claim: read it next turn.
        }
        Err(super::base::unsettled("sqlite", CLAIM_ATTEMPTS))
    }
}

#[async_trait]
impl Store for SqliteStore {
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
        let q = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.complete)))
            .bind(&key.0[..])
            .bind(token.as_i64())
            .bind(value)
            .bind(now_ms().saturating_add(millis(ttl)));
        let r = self.fenced("sqlite: complete", q).await;
        self.inner.core.waiters.wake(key);
        r
    }

    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError> {
        // A claim under this token still running (its caller went away) ends first.
        self.inner.core.after_claim(token).await;
        let q = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.release)))
            .bind(&key.0[..])
            .bind(token.as_i64());
        // Ok whether or not it deleted anything: only our own claim is ever deleted.
        self.inner
            .core
            .timed("sqlite: release", q.execute(&self.inner.pool))
            .await?;
        self.inner.core.waiters.wake(key);
        Ok(())
    }

    async fn renew(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let lease_until = now_ms().saturating_add(millis(lease));
        let q = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.renew)))
            .bind(&key.0[..])
            .bind(token.as_i64())
            .bind(lease_until)
            .bind(lease_until.saturating_add(self.inner.core.lease_grace_ms));
        self.fenced("sqlite: renew", q).await
    }

    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError> {
        let now = now_ms();
        let q = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.get)))
            .bind(&key.0[..])
            .bind(now);
        let row = self
            .inner
            .core
            .timed("sqlite: get", q.fetch_optional(&self.inner.pool))
            .await?;
        let Some(row) = row else { return Ok(None) };
        let state: String = col(&row, "state")?;
        let fingerprint = fingerprint(col(&row, "fingerprint")?)?;
        match state.as_str() {
            "in_progress" => Ok(Some(RecordState::InProgress {
                token: FencingToken::from_i64(col(&row, "token")?),
                fingerprint,
            })),
            "completed" => Ok(Some(RecordState::Completed(completed(
                &row,
                fingerprint,
                now,
            )?))),
            other => Err(StoreError::Corrupt(format!(
                "sqlite: unknown state {other:?}"
            ))),
        }
    }

    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        // Other processes' completions are seen by the next look; this store's own wake its
        // local waiters at once.
        self.inner
            .core
            .wait(key, timeout, || self.lease_remaining(key))
            .await
    }

    /// Deletes the record and its step records in one transaction. (On a database whose
    /// steps table was never created, the record alone.)
    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        let op_timeout = self.inner.core.op_timeout;
        match tokio::time::timeout(op_timeout, self.remove_with_steps(key)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if super::is_missing_table(&e) => {
                let q =
                    sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.remove))).bind(&key.0[..]);
                self.inner
                    .core
                    .timed("sqlite: remove", q.execute(&self.inner.pool))
                    .await?;
            }
            Ok(Err(e)) => return Err(self.inner.core.fail("sqlite: remove", e)),
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
        let q = sqlx::query(AssertSqlSafe(Arc::clone(&steps.load)))
            .bind(&key.0[..])
            .bind(now_ms());
        let op_timeout = self.inner.core.op_timeout;
        let rows = match tokio::time::timeout(op_timeout, q.fetch_all(&self.inner.pool)).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => return Err(steps.fail("sqlite: load steps", e)),
            Err(_) => return Err(StoreError::Timeout(op_timeout)),
        };
        rows.iter()
            .map(|row| {
                super::steps::record(
                    "sqlite",
                    col(row, "name")?,
                    col(row, "occurrence")?,
                    col(row, "status")?,
                    col(row, "value")?,
                )
            })
            .collect()
    }

    /// The fenced upsert (see the module docs).
    async fn put_step(
        &self,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.core.check_size(&step.value)?;
        super::steps::check_name("sqlite", &step.id)?;
        let steps = &self.inner.steps;
        let op_timeout = self.inner.core.op_timeout;
        let written = tokio::time::timeout(op_timeout, async {
            let mut conn = self.inner.pool.acquire().await?;
            steps.put_on(&mut conn, key, token, step, ttl).await
        })
        .await;
        match written {
            Ok(Ok(0)) => Err(StoreError::Fenced),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(steps.fail("sqlite: put step", e)),
            Err(_) => Err(StoreError::Timeout(op_timeout)),
        }
    }

    /// One fenced `DELETE` of the step row; when it deletes nothing, a read tells a step that
    /// was not there (`Ok`) from a record that is not held (fenced).
    async fn clear_step(
        &self,
        key: &Key,
        token: FencingToken,
        id: &StepId,
    ) -> Result<(), StoreError> {
        super::steps::check_name("sqlite", id)?;
        let steps = &self.inner.steps;
        let op_timeout = self.inner.core.op_timeout;
        let cleared = tokio::time::timeout(op_timeout, async {
            let done = sqlx::query(AssertSqlSafe(Arc::clone(&steps.clear)))
                .bind(&key.0[..])
                .bind(token.as_i64())
                .bind(id.name.as_str())
                .bind(i64::from(id.occurrence))
                .execute(&self.inner.pool)
                .await?;
            if done.rows_affected() > 0 {
                return Ok(true);
            }
            // A record held under our token now was held when the delete ran (a token,
            // once gone, never comes back).
            let held = sqlx::query(AssertSqlSafe(Arc::clone(&steps.held)))
                .bind(&key.0[..])
                .bind(token.as_i64())
                .fetch_optional(&self.inner.pool)
                .await?;
            Ok(held.is_some())
        })
        .await;
        match cleared {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(StoreError::Fenced),
            Ok(Err(e)) => Err(steps.fail("sqlite: clear step", e)),
            Err(_) => Err(StoreError::Timeout(op_timeout)),
        }
    }

    fn detached(&self) -> Option<Arc<dyn Store>> {
        Some(Arc::new(self.clone()))
    }

    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn max_value_size(&self) -> usize {
        self.inner.core.max_value_size()
    }
}

/// What [`SqliteStore::read_live`] found.
enum Seen {
    Nothing,
    Ours,
    Other(Claim),
}

/// A completed record from a row with `value` and `expires_at` (Unix ms).
fn completed(
    row: &SqliteRow,
    fingerprint: Option<Fingerprint>,
    now: i64,
) -> Result<CompletedRecord, StoreError> {
    let expires_at: i64 = col(row, "expires_at")?;
    super::completed(
        "sqlite",
        fingerprint,
        col(row, "value")?,
        ms_until(expires_at, now),
    )
}

/// The time from `now` to `until` (both Unix ms), zero when past.
fn ms_until(until: i64, now: i64) -> Duration {
    Duration::from_millis(u64::try_from(until.saturating_sub(now)).unwrap_or(0))
}

fn col<'r, T>(row: &'r SqliteRow, name: &str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
{
    row.try_get(name)
        .map_err(|e| StoreError::Corrupt(format!("sqlite: column {name}: {e}")))
}

fn fingerprint(bytes: Option<Vec<u8>>) -> Result<Option<Fingerprint>, StoreError> {
    super::fingerprint("sqlite", bytes)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

fn is_in_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn building_outside_a_runtime_is_an_error() {
        let r = SqliteStore::builder().url("sqlite::memory:").build();
        assert!(matches!(r, Err(StoreError::Backend { .. })));
    }

    #[test]
    fn memory_urls_are_recognised() {
        assert!(is_in_memory("sqlite::memory:"));
        assert!(is_in_memory("sqlite://x?mode=memory&cache=shared"));
        assert!(!is_in_memory("sqlite:///tmp/x.db"));
    }
}
