//! Transactional mode for the SQL stores: [`TransactionalStore`] for [`PostgresStore`],
//! [`MySqlStore`] and [`SqliteStore`].
//!
//! The body runs its statements in a transaction on the store's database (`Tx` is a sqlx
//! `Transaction<'static, DB>` in a newtype that dereferences to the connection: [`PgTx`],
//! [`MySqlTx`], [`SqliteTx`]); on `Ok`, the
//! completion is written in the same transaction by [`complete_in`](TransactionalStore::complete_in):
//!
//! ```sql
//! UPDATE <table> SET state = 'completed', value = <value>, <expiry from the DB clock>
//!  WHERE key = <key> AND token = <the claim's token> AND state = 'in_progress'
//! ```
//!
//! Zero rows (and the record not already completed under that token) is
//! [`StoreError::Fenced`]: the lease was lost, the runtime rolls the transaction back, and the
//! stale executor's writes go with it. The statement has the same columns and meaning as the
//! store's own [`Store::complete`] (the completed row keeps the token, the expiry is counted on
//! the database's clock — the process's clock on SQLite, as the SQLite store does everywhere —
//! and values over [`Store::max_value_size`] are refused with [`StoreError::TooLarge`]).
//!
//! The statements are written against the table each store documents in its `migrate`; they
//! reach the store only through its public API (`pool()`, `table()`).
//!
//! | store | begin | completion in the transaction | waiters |
//! |---|---|---|---|
//! | PostgreSQL | `BEGIN` (the pool's default isolation, READ COMMITTED unless changed) | fenced `UPDATE` + `pg_notify` in the same statement | woken at commit: PostgreSQL delivers `NOTIFY` only when the transaction commits, never for a rollback |
//! | MySQL / MariaDB | `BEGIN` (InnoDB, the server's isolation) | fenced `UPDATE`, server clock | poll; they read committed rows only |
//! | SQLite | `BEGIN IMMEDIATE` (the write lock is taken up front, see below) | fenced `UPDATE` | poll; they read committed rows only |
//!
//! On SQLite a transaction that reads first and writes later fails with `SQLITE_BUSY` if
//! another connection (the lease keeper's renewal, for one) wrote in between, so the
//! transactions idem opens begin `IMMEDIATE`: the body then owns SQLite's single write lock
//! until the commit, other writers (claims and renewals included) wait for it up to their busy
//! timeout, and no takeover can happen while the transaction is open.
//!
//! The pool must have room for the transaction's connection and one more (claims and lease
//! renewals run on their own connections, never inside the body's transaction). An in-memory
//! SQLite database has one connection: transactional calls on it run one at a time, and
//! [`Call::run_within`](idem_core::Call::run_within) cannot work there (the claim would wait
//! for the caller's connection).

use std::time::Duration;

use idem_core::{
    async_trait, FencingToken, Key, StepRecord, Store, StoreError, TransactionalStore,
};
use sqlx::AssertSqlSafe;

#[cfg(feature = "mysql")]
use crate::MySqlStore;
#[cfg(feature = "postgres")]
use crate::PostgresStore;
#[cfg(feature = "sqlite")]
use crate::SqliteStore;

/// Defines a transaction type: a sqlx `Transaction<'static, DB>` in a newtype without
/// lifetime parameters. (With the plain sqlx type, whose `'static` the compiler loses inside
/// the runtime's future, a call that runs an async closure on it is not provably `Send`, so it
/// could not be spawned or serve an axum handler — rust-lang/rust#110338 and its family.)
macro_rules! tx_type {
    ($(#[$doc:meta])* $feature:literal, $name:ident, $db:ty, $conn:ty) => {
        $(#[$doc])*
        ///
        /// It dereferences to the connection, as a sqlx `Transaction` does: run statements
        /// with `.execute(&mut **tx)`. Dropping it without a commit rolls it back.
        #[cfg(feature = $feature)]
        #[cfg_attr(docsrs, doc(cfg(feature = $feature)))]
        #[derive(Debug)]
        pub struct $name(sqlx::Transaction<'static, $db>, #[allow(dead_code)] Option<Session>);

        #[cfg(feature = $feature)]
        impl $name {
            /// Commits the transaction (for a transaction the caller owns, as with
            /// [`Call::run_within`](idem_core::Call::run_within)).
            pub async fn commit(self) -> Result<(), sqlx::Error> {
                self.0.commit().await
            }

            /// Rolls the transaction back.
            pub async fn rollback(self) -> Result<(), sqlx::Error> {
                self.0.rollback().await
            }

            /// The sqlx transaction (for APIs that take one, e.g. a savepoint with
            /// `sqlx::Acquire::begin`).
            pub fn transaction(&mut self) -> &mut sqlx::Transaction<'static, $db> {
                &mut self.0
            }

            /// The sqlx transaction, by value.
            pub fn into_inner(self) -> sqlx::Transaction<'static, $db> {
                self.0
            }
        }

        #[cfg(feature = $feature)]
        impl From<sqlx::Transaction<'static, $db>> for $name {
            fn from(tx: sqlx::Transaction<'static, $db>) -> Self {
                $name(tx, None)
            }
        }

        #[cfg(feature = $feature)]
        impl std::ops::Deref for $name {
            type Target = $conn;
            fn deref(&self) -> &$conn {
                &self.0
            }
        }

        #[cfg(feature = $feature)]
        impl std::ops::DerefMut for $name {
            fn deref_mut(&mut self) -> &mut $conn {
                &mut self.0
            }
        }
    };
}

tx_type!(
    /// The transaction a body runs in on a [`PostgresStore`]: run statements on it with
    /// `.execute(&mut **tx)`.
    ///
    /// ```no_run
    /// use idem_core::Call;
    /// use idem_stores::{PgTx, PostgresStore};
    ///
    /// # async fn demo(store: &PostgresStore) -> Result<i64, idem_core::Error> {
    /// let order_id: i64 = Call::new("orders::place")
    ///     .key("order-42")
    ///     .run_in_transaction(store, async |tx: &mut PgTx| {
    ///         let id: i64 = idem_stores::sqlx::query_scalar("INSERT INTO orders (sku) VALUES ($1) RETURNING id")
    ///             .bind("sku-1")
    ///             .fetch_one(&mut **tx)
    ///             .await
    ///             .map_err(|e| idem_core::StoreError::backend("insert order", e))?;
    ///         Ok::<_, idem_core::Error>(id)
    ///     })
    ///     .await?;
    /// # Ok(order_id) }
    /// ```
    "postgres", PgTx, sqlx::Postgres, sqlx::PgConnection
);

tx_type!(

    /// The transaction a body runs in on a [`MySqlStore`] (MySQL, MariaDB).
    ///
    /// ```no_run
    /// use idem_core::Call;
    /// use idem_stores::{MySqlStore, MySqlTx};
    ///
    /// # async fn demo(store: &MySqlStore) -> Result<u64, idem_core::Error> {
    /// Call::new("orders::place")
    ///     .key("order-42")
    ///     .run_in_transaction(store, async |tx: &mut MySqlTx| {
    ///         let done = idem_stores::sqlx::query("INSERT INTO orders (sku) VALUES (?)")
    ///             .bind("sku-1")
    ///             .execute(&mut **tx)
    ///             .await
    ///             .map_err(|e| idem_core::StoreError::backend("insert order", e))?;
    ///         Ok::<_, idem_core::Error>(done.last_insert_id())
    ///     })
    ///     .await
    /// # }
    /// ```
    "mysql", MySqlTx, sqlx::MySql, sqlx::MySqlConnection
);

tx_type!(

    /// The transaction a body runs in on a [`SqliteStore`] (opened `BEGIN IMMEDIATE` by
    /// [`Call::run_in_transaction`](idem_core::Call::run_in_transaction)).
    ///
    /// ```
    /// use idem_core::Call;
    /// use idem_stores::{SqliteStore, SqliteTx};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), idem_core::Error> {
    /// let store = SqliteStore::connect("sqlite::memory:").await?;
    /// store.migrate().await?;
    /// idem_stores::sqlx::query("CREATE TABLE orders (id INTEGER PRIMARY KEY, sku TEXT)")
    ///     .execute(store.pool())
    ///     .await
    ///     .map_err(|e| idem_core::StoreError::backend("create", e))?;
    /// for _ in 0..2 {
    ///     let id: i64 = Call::new("orders::place")
    ///         .key("order-42")
    ///         .run_in_transaction(&store, async |tx: &mut SqliteTx| {
    ///             let done = idem_stores::sqlx::query("INSERT INTO orders (sku) VALUES (?)")
    ///                 .bind("sku-1")
    ///                 .execute(&mut **tx)
    ///                 .await
    ///                 .map_err(|e| idem_core::StoreError::backend("insert order", e))?;
    ///             Ok::<_, idem_core::Error>(done.last_insert_rowid())
    ///         })
    ///         .await?;
    ///     assert_eq!(id, 1); // the second call replays the first one's id
    /// }
    /// # Ok(()) }
    /// ```
    "sqlite", SqliteTx, sqlx::Sqlite, sqlx::SqliteConnection
);

/// Durations are clamped to this many milliseconds (about 100 years) before reaching SQL, as
/// the stores do.
const MAX_MILLIS: i64 = 100 * 365 * 86_400 * 1000;

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).map_or(MAX_MILLIS, |ms| ms.min(MAX_MILLIS))
}

/// `table` (as a store's `table()` shows it, quoted or not) with each part quoted by `q`.
/// Store table names are validated identifiers (no quote characters inside), so stripping and
/// re-quoting is exact.
fn quoted(table: &str, q: char) -> String {
    table
        .split('.')
        .map(|part| {
            let bare = part.trim_matches(|c| c == '"' || c == '`');
            format!("{q}{bare}{q}")
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The table name without quotes (PostgreSQL's notification channel).
#[cfg(feature = "postgres")]
fn bare(table: &str) -> String {
    table.replace(['"', '`'], "")
}

fn check_size(store: &dyn Store, value: &[u8]) -> Result<(), StoreError> {
    let limit = store.max_value_size();
    if value.len() > limit {
        return Err(StoreError::TooLarge {
            size: value.len(),
            limit,
        });
    }
    Ok(())
}

/// The database session a transaction runs on, learned by its completion: what a commit that
/// is given up on needs to end that session (and so roll the transaction back, unless the
/// commit had already landed).
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
struct Session {
    /// PostgreSQL's backend pid, MySQL's connection id.
    id: i64,
    /// PostgreSQL: the transaction's id (32 bits, as `pg_stat_activity` shows it), so that
    /// only this transaction's session is ended, never a later one on a reused pid.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    xid: Option<i64>,
}

/// Runs its action if dropped while armed: a commit future dropped before the database
/// answered (the runtime gave up on it) ends the transaction's session from a task, so that
/// the abandoned commit stops holding its connection and the record's row lock.
#[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
struct EndSessionOnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for EndSessionOnDrop<F> {
    fn drop(&mut self) {
        if let Some(end) = self.0.take() {
            end();
        }
    }
}

/// `BEGIN` on a connection of `pool`. A connection being opened when the runtime gives up
/// on the begin (a slow link: opening one takes several round trips) is opened anyway and
/// goes back to the pool, so that the next call finds it rather than starting over.
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn begin_on<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
) -> Result<sqlx::Transaction<'static, DB>, sqlx::Error> {
    let conn = super::lanes::finish_anyway(pool).await?;
    sqlx::Transaction::begin(conn, None).await
}

/// Commits `tx`; if the future is dropped before the commit answered, spawns `end(session)`.
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn commit_or_end<DB, E, Fut>(
    tx: sqlx::Transaction<'static, DB>,
    session: Option<Session>,
    what: &'static str,
    end: E,
) -> Result<(), StoreError>
where
    DB: sqlx::Database,
    E: FnOnce(Session) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let guard = EndSessionOnDrop(session.map(|s| {
        move || {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                tracing::warn!(target: "idem", session = s.id, "commit given up on: ending its database session");
                rt.spawn(end(s));
            }
        }
    }));
    let r = tx.commit().await.map_err(|e| StoreError::backend(what, e));
    let mut guard = guard;
    guard.0 = None;
    r
}

#[cfg(feature = "postgres")]
#[async_trait]
impl TransactionalStore for PostgresStore {
    type Tx = PgTx;

    /// `BEGIN` on a connection of the store's pool.
    async fn begin(&self) -> Result<PgTx, StoreError> {
        begin_on(self.pool())
            .await
            .map(PgTx::from)
            .map_err(|e| StoreError::backend("postgres: begin", e))
    }

    /// The fenced completion, and `pg_notify(<table>, <key hex>)` in the same statement: the
    /// notification is queued in the transaction and delivered when it commits (never if it
    /// rolls back), so waiters wake at the commit. The expiry counts from
    /// `statement_timestamp()` (in a transaction, `now()` is the transaction's start).
    async fn complete_in(
        &self,
        tx: &mut PgTx,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        check_size(self, value)?;
        let t = quoted(self.table(), '"');
        // $1 key, $2 token, $3 value, $4 ttl ms, $5 channel, $6 key hex. One row when the
        // record is now completed under $2 (by this statement, or by an earlier one of this
        // transaction); none when fenced.
        let sql = format!(
            "WITH done AS (
                UPDATE {t} SET state = 'completed', value = $3, lease_until = NULL,
                               expires_at = statement_timestamp()
                                            + $4::float8 * interval '1 millisecond'
                 WHERE key = $1 AND token = $2 AND state = 'in_progress'
                RETURNING key
            )
            SELECT pg_backend_pid()::int8 AS pid, txid_current() % 4294967296 AS xid
              FROM done WHERE pg_notify($5, $6) IS NOT NULL
            UNION ALL
            SELECT pg_backend_pid()::int8, txid_current() % 4294967296
              FROM {t} WHERE key = $1 AND token = $2 AND state = 'completed'"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(&key.0[..])
            .bind(token.as_i64())
            .bind(value)
            .bind(millis(ttl))
            .bind(bare(self.table()))
            .bind(key.to_hex())
            .fetch_optional(&mut **tx)
            .await
            .map_err(|e| StoreError::backend("postgres: complete in transaction", e))?;
        if let Some(row) = row {
            use sqlx::Row;
            let id: i64 = row.try_get("pid").unwrap_or(0);
            let xid: Option<i64> = row.try_get("xid").ok();
            tx.1 = (id > 0).then_some(Session { id, xid });
            return Ok(());
        }
        // Under REPEATABLE READ or SERIALIZABLE the statement reads the transaction's
        // snapshot, which may predate the claim (a caller's transaction that ran a statement
        // before `run_within`): the claim is then invisible, and "fenced" would be a lie.
        let level: String = sqlx::query_scalar("SELECT current_setting('transaction_isolation')")
            .fetch_one(&mut **tx)
            .await
            .map_err(|e| StoreError::backend("postgres: complete in transaction", e))?;
        if level != "read committed" {
            let message = format!(
                "postgres: the completion cannot see the claim from a {level} transaction; \
                 transactional mode needs READ COMMITTED (PostgreSQL's default)"
            );
            return Err(StoreError::backend(
                message.clone(),
                std::io::Error::new(std::io::ErrorKind::Unsupported, message),
            ));
        }
        Err(StoreError::Fenced)
    }

    /// The store's fenced step write (`INSERT ... SELECT ... FOR SHARE ... ON CONFLICT DO
    /// UPDATE`), run in `tx`: the step row commits with the transaction's other writes, and
    /// the record row stays locked for share until then, so a takeover waits for the commit
    /// (and then sees the step) or the write finds the record taken over (fenced).
    async fn put_step_in(
        &self,
        tx: &mut PgTx,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if self.put_step_on(&mut tx.0, key, token, step, ttl).await? > 0 {
            return Ok(());
        }
        // As for the completion: a REPEATABLE READ or SERIALIZABLE snapshot may predate the
        // claim, which it then cannot see.
        let level: String = sqlx::query_scalar("SELECT current_setting('transaction_isolation')")
            .fetch_one(&mut **tx)
            .await
            .map_err(|e| StoreError::backend("postgres: put step in transaction", e))?;
        if level != "read committed" {
            let message = format!(
                "postgres: the step cannot see the claim from a {level} transaction; \
                 transactional steps need READ COMMITTED (PostgreSQL's default)"
            );
            return Err(StoreError::backend(
                message.clone(),
                std::io::Error::new(std::io::ErrorKind::Unsupported, message),
            ));
        }
        Err(StoreError::Fenced)
    }

    /// `COMMIT`. If the runtime gives up on it (its future is dropped before the answer),
    /// the transaction's backend is terminated from another connection — only while it still
    /// runs this transaction — so the database rolls it back unless the commit had landed.
    async fn commit(&self, tx: PgTx) -> Result<(), StoreError> {
        let store = self.clone();
        commit_or_end(tx.0, tx.1, "postgres: commit", move |s| async move {
            let end = sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE pid::int8 = $1 AND backend_xid::text::int8 = $2",
            )
            .bind(s.id)
            .bind(s.xid.unwrap_or(-1))
            .execute(store.priority_pool());
            let r = tokio::time::timeout(store.operation_timeout(), end).await;
            if !matches!(r, Ok(Ok(_))) {
                tracing::warn!(target: "idem", session = s.id, "postgres: could not end the session of an abandoned commit");
            }
        })
        .await
    }
}

/// The server's clock in milliseconds since the epoch, as `MySqlStore` counts it
/// (`UTC_TIMESTAMP` is the statement's time, also inside a transaction).
#[cfg(feature = "mysql")]
const MYSQL_NOW_MS: &str =
    "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000)";

#[cfg(feature = "mysql")]
#[async_trait]
impl TransactionalStore for MySqlStore {
    type Tx = MySqlTx;

    /// `BEGIN` on a connection of the store's pool (the server's isolation level).
    async fn begin(&self) -> Result<MySqlTx, StoreError> {
        begin_on(self.pool())
            .await
            .map(MySqlTx::from)
            .map_err(|e| StoreError::backend("mysql: begin", e))
    }

    /// The fenced completion. The `UPDATE` reads the newest committed row under its lock
    /// (InnoDB's locking read, whatever the isolation level), so a takeover committed after
    /// the transaction began is seen and refused.
    async fn complete_in(
        &self,
        tx: &mut MySqlTx,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        check_size(self, value)?;
        let t = quoted(self.table(), '`');
        let ttl = millis(ttl);
        let update = format!(
            "UPDATE {t} SET state = 'completed', value = ?, \
               live_until = {MYSQL_NOW_MS} + ?, expires_at = {MYSQL_NOW_MS} + ? \
             WHERE k = ? AND token = ? AND state = 'in_progress'"
        );
        let done = sqlx::query(AssertSqlSafe(update))
            .bind(value)
            .bind(ttl)
            .bind(ttl)
            .bind(&key.0[..])
            .bind(token.as_i64())
            .execute(&mut **tx)
            .await
            .map_err(|e| StoreError::backend("mysql: complete in transaction", e))?;
        // sqlx counts rows matched (CLIENT_FOUND_ROWS).
        if done.rows_affected() > 0 {
            // The session, for a commit that is given up on (see `commit`).
            // (Unprepared: one round trip, where a prepared statement's first use on a
            // connection costs two.)
            let row = sqlx::raw_sql("SELECT CONNECTION_ID()")
                .fetch_optional(&mut **tx)
                .await
                .map_err(|e| StoreError::backend("mysql: complete in transaction", e))?;
            tx.1 = row
                .and_then(|row| sqlx::Row::try_get::<u64, _>(&row, 0).ok())
                .and_then(|id| i64::try_from(id).ok())
                .map(|id| Session { id, xid: None });
            return Ok(());
        }
        // Already completed under this token (by an earlier statement of this transaction)?
        let held = format!(
            "SELECT CAST(state = 'completed' AS SIGNED) FROM {t} WHERE k = ? AND token = ?"
        );
        let completed: Option<i64> = sqlx::query_scalar(AssertSqlSafe(held))
            .bind(&key.0[..])
            .bind(token.as_i64())
            .fetch_optional(&mut **tx)
            .await
            .map_err(|e| StoreError::backend("mysql: complete in transaction", e))?;
        if completed == Some(1) {
            Ok(())
        } else {
            Err(StoreError::Fenced)
        }
    }

    /// The store's fenced step write (`INSERT ... SELECT ... LOCK IN SHARE MODE ON DUPLICATE
    /// KEY UPDATE`), run in `tx`: the step row commits with the transaction's other writes,
    /// and the record row stays locked for share until then. The locking read sees the newest
    /// committed record whatever the isolation level.
    async fn put_step_in(
        &self,
        tx: &mut MySqlTx,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if self.put_step_on(&mut tx.0, key, token, step, ttl).await? {
            Ok(())
        } else {
            Err(StoreError::Fenced)
        }
    }

    /// `COMMIT`. If the runtime gives up on it (its future is dropped before the answer),
    /// the transaction's connection is killed (`KILL CONNECTION`) from another one, so the
    /// server rolls it back unless the commit had landed. (Should the commit land in the
    /// few milliseconds before the kill, and its connection serve another operation
    /// meanwhile, that operation sees a cut connection, which every operation survives.)
    async fn commit(&self, tx: MySqlTx) -> Result<(), StoreError> {
        let store = self.clone();
        commit_or_end(tx.0, tx.1, "mysql: commit", move |s| async move {
            // An integer of ours: nothing from outside reaches this statement.
            let kill = format!("KILL CONNECTION {}", s.id);
            let end = sqlx::raw_sql(AssertSqlSafe(kill)).execute(store.priority_pool());
            let r = tokio::time::timeout(store.operation_timeout(), end).await;
            if !matches!(r, Ok(Ok(_))) {
                tracing::warn!(target: "idem", session = s.id, "mysql: could not end the session of an abandoned commit");
            }
        })
        .await
    }
}

#[cfg(feature = "sqlite")]
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(feature = "sqlite")]
#[async_trait]
impl TransactionalStore for SqliteStore {
    type Tx = SqliteTx;

    /// `BEGIN IMMEDIATE`: the transaction holds SQLite's write lock from its start (waiting
    /// for it up to the busy timeout), so that its first write can never fail because another
    /// connection wrote after its first read.
    async fn begin(&self) -> Result<SqliteTx, StoreError> {
        self.pool()
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map(SqliteTx::from)
            .map_err(|e| StoreError::backend("sqlite: begin", e))
    }

    /// The fenced completion (expiry on this process's clock, as `SqliteStore` counts it).
    async fn complete_in(
        &self,
        tx: &mut SqliteTx,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        check_size(self, value)?;
        let t = quoted(self.table(), '"');
        // Matches the record in progress under ?2, which it completes, and the record already
        // completed under ?2, which it leaves as it is: one row either way, none when fenced.
        let sql = format!(
            "UPDATE {t} SET value = CASE WHEN state = 'completed' THEN value ELSE ?3 END,
                            expires_at = CASE WHEN state = 'completed' THEN expires_at
                                              ELSE ?4 END,
                            lease_until = NULL,
                            state = 'completed'
              WHERE key = ?1 AND token = ?2"
        );
        let done = sqlx::query(AssertSqlSafe(sql))
            .bind(&key.0[..])
            .bind(token.as_i64())
            .bind(value)
            .bind(now_ms().saturating_add(millis(ttl)))
            .execute(&mut **tx)
            .await
            .map_err(|e| StoreError::backend("sqlite: complete in transaction", e))?;
        if done.rows_affected() == 0 {
            Err(StoreError::Fenced)
        } else {
            Ok(())
        }
    }

    /// The store's fenced step write (`INSERT ... SELECT ... WHERE EXISTS (...) ON CONFLICT
    /// DO UPDATE`), run in `tx` (which holds SQLite's write lock from its start): the step row
    /// commits with the transaction's other writes.
    async fn put_step_in(
        &self,
        tx: &mut SqliteTx,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if self.put_step_on(&mut tx.0, key, token, step, ttl).await? > 0 {
            Ok(())
        } else {
            Err(StoreError::Fenced)
        }
    }

    async fn commit(&self, tx: SqliteTx) -> Result<(), StoreError> {
        tx.0.commit()
            .await
            .map_err(|e| StoreError::backend("sqlite: commit", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_requoted() {
        assert_eq!(quoted("idem_records", '"'), "\"idem_records\"");
        assert_eq!(quoted("app.idem", '"'), "\"app\".\"idem\"");
        assert_eq!(quoted("`app`.`idem`", '`'), "`app`.`idem`");
        assert_eq!(quoted("\"x\"", '`'), "`x`");
    }

    #[test]
    fn durations_are_clamped() {
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        assert_eq!(millis(Duration::MAX), MAX_MILLIS);
    }
}
