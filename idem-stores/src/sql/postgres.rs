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
//!   `expires_at`); [`PostgresStoreBuilder::sweep_every`] runs it in the background.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use idem_core::{
    async_trait, Claim, ClaimRequest, CompletedRecord, FencingToken, Fingerprint, Key, RecordState,
    Store, StoreError, DEFAULT_MAX_VALUE_SIZE,
};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Row};
use tokio::task::AbortHandle;

mod listener;
mod schema;

use listener::{run_listener, Waiters};
use schema::{config_error, Statements, Table};

/// The default table name.
pub const DEFAULT_TABLE: &str = "idem_records";

/// Durations are clamped to this many milliseconds (about 100 years) before reaching SQL.
const MAX_MILLIS: i64 = 100 * 365 * 86_400 * 1000;
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

struct Inner {
    pool: PgPool,
    table: String,
    channel: String,
    sql: Statements,
    waiters: Arc<Waiters>,
    listener: Option<AbortHandle>,
    max_value_size: usize,
    lease_grace_ms: i64,
    op_timeout: Duration,
    poll_max: Duration,
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
            .field("table", &self.inner.table)
            .field("pool_size", &self.inner.pool.size())
            .field(
                "listening",
                &self.inner.waiters.listening.load(Ordering::Acquire),
            )
            .finish()
    }
}

/// Configures a [`PostgresStore`]: where to connect, the table, limits and the sweeper.
#[derive(Debug, Clone)]
pub struct PostgresStoreBuilder {
    source: Source,
    table: String,
    max_connections: u32,
    acquire_timeout: Duration,
    op_timeout: Duration,
    max_value_size: usize,
    lease_grace: Duration,
    poll_max: Duration,
    listen: bool,
    sweep: Option<(Duration, u32)>,
}

#[derive(Debug, Clone)]
enum Source {
    None,
    Url(String),
    Pool(PgPool),
}

impl PostgresStoreBuilder {
    /// Connect to this URL (`postgres://user:password@host:port/db`). The store opens its own
    /// pool of [`max_connections`](Self::max_connections).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.source = Source::Url(url.into());
        self
    }

    /// Use an existing pool (shared with the rest of the application). The listener opens one
    /// more connection with the pool's connect options.
    pub fn pool(mut self, pool: PgPool) -> Self {
        self.source = Source::Pool(pool);
        self
    }

    /// The table, `name` or `schema.name`: ASCII letters, digits and `_`, not starting with a
    /// digit, at most 48 bytes each and 63 in all (the name is also the `LISTEN` channel).
    /// Default [`DEFAULT_TABLE`].
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The pool's size when the store opens its own pool. Default 10.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long an operation waits for a pooled connection before it fails. Default 5 s.
    pub fn acquire_timeout(mut self, d: Duration) -> Self {
        self.acquire_timeout = d;
        self
    }

    /// The bound on one store operation (acquire plus statement); past it the operation fails
    /// with [`StoreError::Timeout`]. Default 10 s.
    pub fn operation_timeout(mut self, d: Duration) -> Self {
        self.op_timeout = d;
        self
    }

    /// The largest encoded value accepted. Default 1 MiB.
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes;
        self
    }

    /// How long an in-progress row outlives its lease before the sweep may delete it (so that
    /// a takeover is still reported as one). Default 60 s.
    pub fn lease_grace(mut self, d: Duration) -> Self {
        self.lease_grace = d;
        self
    }

    /// The longest pause between two looks of a waiter while the listener is down. Default
    /// 500 ms (the first looks come after 10 ms, doubling).
    pub fn poll_max(mut self, d: Duration) -> Self {
        self.poll_max = d.max(Duration::from_millis(1));
        self
    }

    /// Whether to keep a `LISTEN` connection (default true). Without it waiters poll.
    pub fn listen(mut self, on: bool) -> Self {
        self.listen = on;
        self
    }

    /// Deletes expired rows every `interval`, `batch` rows per statement, in a background task
    /// that stops when the last clone of the store is dropped. Default: no sweeper (call
    /// [`PostgresStore::purge_expired`] yourself, or run one sweeper per deployment).
    pub fn sweep_every(mut self, interval: Duration, batch: u32) -> Self {
        self.sweep = Some((interval.max(Duration::from_millis(10)), batch.max(1)));
        self
    }

    /// Builds the store without touching the network: the pool connects on first use and the
    /// listener connects in the background. Needs a tokio runtime.
    ///
    /// Fails only on a malformed URL or table name.
    pub fn build(self) -> Result<PostgresStore, StoreError> {
        let table = Table::parse(&self.table)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            StoreError::backend(
                "postgres: the store needs a tokio runtime (build it inside one)",
                e,
            )
        })?;
        let pool = match self.source {
            Source::Pool(pool) => pool,
            Source::Url(url) => {
                let options: PgConnectOptions = url
                    .parse()
                    .map_err(|e| StoreError::backend("postgres: invalid connection URL", e))?;
                PgPoolOptions::new()
                    .max_connections(self.max_connections)
                    .acquire_timeout(self.acquire_timeout)
                    .connect_lazy_with(options)
            }
            Source::None => {
                return Err(config_error(
                    "postgres: the builder needs .url(..) or .pool(..)",
                ))
            }
        };
        let waiters = Arc::new(Waiters::default());
        let channel = table.display.clone();
        let listener = if self.listen {
            let listener_pool = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(self.acquire_timeout)
                .max_lifetime(None)
                .idle_timeout(None)
                .connect_lazy_with((*pool.connect_options()).clone());
            let task = runtime.spawn(run_listener(
                listener_pool,
                channel.clone(),
                Arc::clone(&waiters),
            ));
            Some(task.abort_handle())
        } else {
            None
        };
        let store = PostgresStore {
            inner: Arc::new(Inner {
                sql: Statements::new(&table),
                pool,
                table: table.display,
                channel,
                waiters,
                listener,
                max_value_size: self.max_value_size,
                lease_grace_ms: millis(self.lease_grace),
                op_timeout: self.op_timeout,
                poll_max: self.poll_max,
            }),
        };
        if let Some((interval, batch)) = self.sweep {
            runtime.spawn(run_sweeper(Arc::downgrade(&store.inner), interval, batch));
        }
        Ok(store)
    }

    /// Builds the store and checks that the database answers (`SELECT 1`).
    pub async fn connect(self) -> Result<PostgresStore, StoreError> {
        let store = self.build()?;
        let pool = store.inner.pool.clone();
        store
            .timed("postgres: connect", async move {
                sqlx::query("SELECT 1").execute(&pool).await
            })
            .await?;
        Ok(store)
    }
}

impl PostgresStore {
    /// A builder with the defaults: table [`DEFAULT_TABLE`], 10 connections, 5 s acquire
    /// timeout, 10 s operation timeout, 1 MiB values, `LISTEN` on, no sweeper.
    pub fn builder() -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            source: Source::None,
            table: DEFAULT_TABLE.to_owned(),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            op_timeout: Duration::from_secs(10),
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
            lease_grace: Duration::from_secs(60),
            poll_max: Duration::from_millis(500),
            listen: true,
            sweep: None,
        }
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
        &self.inner.table
    }

    /// Whether the `LISTEN` connection is up (waiters are woken by notifications rather than
    /// polling).
    pub fn is_listening(&self) -> bool {
        self.inner.waiters.listening.load(Ordering::Acquire)
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
    ///     lease_until TIMESTAMPTZ,            -- in progress: the lease's end
    ///     expires_at  TIMESTAMPTZ NOT NULL    -- when the sweep may delete the row
    /// );
    /// CREATE INDEX IF NOT EXISTS idem_records_expires_at ON idem_records (expires_at);
    /// ```
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let pool = self.inner.pool.clone();
        let sql = self.inner.sql.clone();
        let lock_name = self.inner.table.clone();
        self.timed("postgres: migrate", async move {
            let mut tx = pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind(format!("idem migrate {lock_name}"))
                .execute(&mut *tx)
                .await?;
            sqlx::query(AssertSqlSafe(sql.create_table.clone()))
                .execute(&mut *tx)
                .await?;
            sqlx::query(AssertSqlSafe(sql.create_index.clone()))
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        })
        .await
    }

    /// Deletes up to `batch` expired rows (completed past their TTL, in progress past their
    /// lease plus the grace period) and returns how many it deleted. Rows locked by a
    /// concurrent claim are skipped. Call it until it returns less than `batch` to empty the
    /// backlog.
    pub async fn purge_expired(&self, batch: u32) -> Result<u64, StoreError> {
        let pool = self.inner.pool.clone();
        let sql = Arc::clone(&self.inner.sql.purge);
        let done = self
            .timed("postgres: purge expired", async move {
                sqlx::query(AssertSqlSafe(sql))
                    .bind(i64::from(batch))
                    .execute(&pool)
                    .await
            })
            .await?;
        Ok(done.rows_affected())
    }

    /// Runs `fut` under the operation timeout, mapping its error.
    async fn timed<T>(
        &self,
        what: &'static str,
        fut: impl std::future::Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.inner.op_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(sqlx::Error::PoolTimedOut)) => {
                Err(StoreError::backend(what, sqlx::Error::PoolTimedOut))
            }
            Ok(Err(e)) => Err(StoreError::backend(what, e)),
            Err(_) => Err(StoreError::Timeout(self.inner.op_timeout)),
        }
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
        let pool = &self.inner.pool;
        // A release answers `Ok` whether or not it deleted anything (SPEC §3.10).
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
            Extra::Renew { lease_ms } => q.bind(lease_ms).bind(self.inner.lease_grace_ms),
        };
        let row = self.timed(what, q.fetch_optional(pool)).await?;
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
        let row = match tokio::time::timeout(self.inner.op_timeout, q.fetch_optional(pool)).await {
            Ok(Ok(row)) => row,
            Ok(Err(e)) if is_connection_loss(&e) => return Ok(None),
            Ok(Err(e)) => return Err(StoreError::backend("postgres: wait", e)),
            Err(_) => return Err(StoreError::Timeout(self.inner.op_timeout)),
        };
        match row {
            None => Ok(None),
            Some(row) => {
                let ms: i64 = row
                    .try_get(0)
                    .map_err(|e| StoreError::backend("postgres: wait", e))?;
                Ok(Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0))))
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
    async fn claim_inner(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let fingerprint = req.fingerprint.map(|f| f.0.to_vec());
        let mut retries = 0;
        for _ in 0..CLAIM_ATTEMPTS {
            let q = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.claim)))
                .bind(&req.key.0[..])
                .bind(req.token.as_i64())
                .bind(fingerprint.as_deref())
                .bind(millis(req.lease))
                .bind(self.inner.lease_grace_ms);
            let row = match tokio::time::timeout(
                self.inner.op_timeout,
                q.fetch_optional(&self.inner.pool),
            )
            .await
            {
                Ok(Ok(row)) => row,
                // A connection that died under the statement (server restart, killed backend):
                // run the claim again on a fresh one. Safe: a claim that went through is
                // recognised by its token.
                Ok(Err(e)) if is_connection_loss(&e) && retries < CONNECTION_RETRIES => {
                    retries += 1;
                    tracing::debug!(target: "idem", error = %e, "postgres: connection lost under a claim; retrying");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Ok(Err(e)) => return Err(StoreError::backend("postgres: claim", e)),
                Err(_) => return Err(StoreError::Timeout(self.inner.op_timeout)),
            };
            if let Some(row) = row {
                return decode_claim(&row);
            }
            // The upsert met a live row committed after the statement's snapshot, which the
            // read could not see: nothing was written, so run the claim again.
            tokio::task::yield_now().await;
        }
        Err(StoreError::backend(
            "postgres: claim",
            std::io::Error::other(format!(
                "the record kept changing under {CLAIM_ATTEMPTS} claims in a row"
            )),
        ))
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        // The whole claim, its internal re-runs included, is one operation under the
        // operation timeout.
        match tokio::time::timeout(self.inner.op_timeout, self.claim_inner(req)).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(self.inner.op_timeout)),
        }
    }

    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if value.len() > self.inner.max_value_size {
            return Err(StoreError::TooLarge {
                size: value.len(),
                limit: self.inner.max_value_size,
            });
        }
        let sql = Arc::clone(&self.inner.sql.complete);
        let extra = Extra::Complete {
            value,
            ttl_ms: millis(ttl),
        };
        let r = self
            .fenced("postgres: complete", &sql, key, token, extra)
            .await;
        self.inner.waiters.wake(key);
        r
    }

    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError> {
        let sql = Arc::clone(&self.inner.sql.release);
        let r = self
            .fenced("postgres: release", &sql, key, token, Extra::Release)
            .await;
        self.inner.waiters.wake(key);
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
        self.fenced("postgres: renew", &sql, key, token, extra)
            .await
    }

    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError> {
        let q = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.get))).bind(&key.0[..]);
        let row = self
            .timed("postgres: get", q.fetch_optional(&self.inner.pool))
            .await?;
        let Some(row) = row else { return Ok(None) };
        let state: String = col(&row, "state")?;
        let fingerprint = fingerprint(col(&row, "fingerprint")?)?;
        match state.as_str() {
            "in_progress" => Ok(Some(RecordState::InProgress {
                token: FencingToken::from_i64(col(&row, "token")?),
                fingerprint,
            })),
            "completed" => Ok(Some(RecordState::Completed(completed(&row, fingerprint)?))),
            other => Err(StoreError::Corrupt(format!(
                "postgres: unknown state {other:?}"
            ))),
        }
    }

    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        let start = Instant::now();
        let deadline = start.checked_add(timeout);
        let sub = self.inner.waiters.subscribe(*key);
        let mut poll = Duration::from_millis(10);
        loop {
            // Subscribe first, then look: a notification after the look still wakes us.
            let notified = sub.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let listening = self.inner.waiters.listening.load(Ordering::Acquire);
            let Some(lease) = self.lease_remaining(key).await? else {
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
                poll = (poll * 2).min(self.inner.poll_max);
            }
            if tokio::time::timeout(nap, notified).await.is_ok() {
                return Ok(());
            }
        }
    }

    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        let q = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.remove)))
            .bind(&key.0[..])
            .bind(self.inner.channel.as_str())
            .bind(key.to_hex());
        self.timed("postgres: remove", q.fetch_all(&self.inner.pool))
            .await?;
        self.inner.waiters.wake(key);
        Ok(())
    }

    fn detached(&self) -> Option<Arc<dyn Store>> {
        Some(Arc::new(self.clone()))
    }

    fn max_value_size(&self) -> usize {
        self.inner.max_value_size
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
                lease_remaining: Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
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
    let value: Option<Vec<u8>> = col(row, "value")?;
    let expires_ms: i64 = col(row, "expires_ms")?;
    Ok(CompletedRecord::new(
        fingerprint,
        value.unwrap_or_default(),
        Some(Duration::from_millis(
            u64::try_from(expires_ms).unwrap_or(0),
        )),
    ))
}

fn col<'r, T>(row: &'r PgRow, name: &str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(name)
        .map_err(|e| StoreError::Corrupt(format!("postgres: column {name}: {e}")))
}

fn fingerprint(bytes: Option<Vec<u8>>) -> Result<Option<Fingerprint>, StoreError> {
    match bytes {
        None => Ok(None),
        Some(b) => Fingerprint::from_slice(&b).map(Some).ok_or_else(|| {
            StoreError::Corrupt(format!("postgres: fingerprint of {} bytes", b.len()))
        }),
    }
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

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).map_or(MAX_MILLIS, |ms| ms.min(MAX_MILLIS))
}

/// Deletes expired rows every `interval` until the store is dropped.
async fn run_sweeper(store: Weak<Inner>, interval: Duration, batch: u32) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(inner) = store.upgrade() else { return };
        let store = PostgresStore { inner };
        loop {
            match store.purge_expired(batch).await {
                Ok(n) if n >= u64::from(batch) => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(target: "idem", error = %e, "postgres store: sweep failed");
                    break;
                }
            }
        }
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

    #[test]
    fn durations_are_clamped() {
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        assert_eq!(millis(Duration::MAX), MAX_MILLIS);
    }
}
