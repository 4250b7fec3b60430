//! The attribute form of transactional mode (issue 13): `#[idempotent(.., transaction = tx)]`
//! (idem opens and commits the transaction, the body sees it as `tx`) and
//! `#[idempotent(.., in_transaction = tx)]` (the caller's transaction, an argument
//! `tx: &mut SqliteTx`). On SQLite (a database file per test: `run_within` needs a second
//! connection for the claim), and on PostgreSQL when `IDEM_TEST_POSTGRES_URL` is set.
#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use idem_core::{idempotent, Error, TransactionalStore};
use idem_stores::sqlx::{self, AssertSqlSafe};
use idem_stores::{SqliteStore, SqliteTx};

#[derive(Debug)]
enum AppError {
    Idem(Error),
    Db(#[allow(dead_code)] String),
    Refused,
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idem(e)
    }
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        AppError::Db(e.to_string())
    }
}

/// A database file of its own, deleted on drop.
struct Db {
    path: std::path::PathBuf,
    store: Arc<SqliteStore>,
}

impl Drop for Db {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
        }
    }
}

async fn db(tag: &str) -> Db {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "idem-tx-attribute-{}-{tag}-{}.db",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    let store = SqliteStore::builder()
        .url(format!("sqlite://{}?mode=rwc", path.display()))
        .durable(false)
        .connect()
        .await
        .expect("open the database file");
    store.migrate().await.expect("migrate");
    sqlx::query("CREATE TABLE orders (id INTEGER PRIMARY KEY AUTOINCREMENT, k TEXT NOT NULL)")
        .execute(store.pool())
        .await
        .expect("create the business table");
    Db {
        path,
        store: Arc::new(store),
    }
}

async fn rows(store: &SqliteStore, k: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(AssertSqlSafe("SELECT COUNT(*) FROM orders WHERE k = ?"))
        .bind(k)
        .fetch_one(store.pool())
        .await
        .expect("count")
}

/// The service: its store in an `Arc` (the attribute sees through it), a body counter.
struct Orders {
    db: Arc<SqliteStore>,
    runs: AtomicUsize,
}

impl Orders {
    #[idempotent(key = order, store = self.db, transaction = tx)]
    async fn place(&self, order: String, fail: bool) -> Result<i64, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let done = sqlx::query("INSERT INTO orders (k) VALUES (?)")
            .bind(&order)
            .execute(&mut **tx)
            .await?;
        if fail {
            return Err(AppError::Refused);
        }
        Ok(done.last_insert_rowid())
    }
}

/// The caller's transaction: `tx` is skipped from the fingerprint on its own.
#[idempotent(key = order, store = store, in_transaction = tx, skip(runs), lease = "1s", on_conflict = reject)]
async fn debit(
    store: &SqliteStore,
    tx: &mut SqliteTx,
    order: String,
    runs: &AtomicUsize,
) -> Result<i64, AppError> {
    runs.fetch_add(1, Ordering::SeqCst);
    let done = sqlx::query("INSERT INTO orders (k) VALUES (?)")
        .bind(&order)
        .execute(&mut **tx)
        .await?;
    Ok(done.last_insert_rowid())
}

/// The caller's transaction on SQLite: a plain (deferred) `BEGIN`, not `store.begin()`'s
/// `BEGIN IMMEDIATE`, whose write lock the claim (a statement on another connection) would
/// wait for (docs/transactions.md, "Per database").
async fn begin(store: &SqliteStore) -> SqliteTx {
    SqliteTx::from(store.pool().begin().await.expect("begin"))
}

fn orders(db: &Db) -> Arc<Orders> {
    Arc::new(Orders {
        db: db.store.clone(),
        runs: AtomicUsize::new(0),
    })
}

async fn transaction_commits_the_row_and_the_record_together_and_replays() {
    let db = db("own").await;
    let svc = orders(&db);
    let first = svc.place("o-1".into(), false).await.unwrap();
    let again = svc.place("o-1".into(), false).await.unwrap();
    assert_eq!(first, again, "the replay returns the committed value");
    assert_eq!(
        svc.runs.load(Ordering::SeqCst),
        1,
        "the replay skips the body"
    );
    assert_eq!(rows(&db.store, "o-1").await, 1);
}

async fn the_future_is_send_and_spawnable() {
    let db = db("send").await;
    let svc = orders(&db);
    let fut = {
        let svc = svc.clone();
        async move { svc.place("o-send".into(), false).await }
    };
    let id = tokio::spawn(fut).await.unwrap().unwrap();
    assert!(id > 0);
    assert_eq!(rows(&db.store, "o-send").await, 1);
}

async fn err_rolls_the_row_back_and_releases_the_key() {
    let db = db("err").await;
    let svc = orders(&db);
    let err = svc.place("o-2".into(), true).await.unwrap_err();
    assert!(matches!(err, AppError::Refused), "{err:?}");
    assert_eq!(
        rows(&db.store, "o-2").await,
        0,
        "the body's row is rolled back"
    );
    // Released: the retry (same key; `fail` is fingerprinted, so a new attempt with
    // `fail = false` would be KeyReused) runs again rather than replaying or waiting.
    let err = svc.place("o-2".into(), true).await.unwrap_err();
    assert!(matches!(err, AppError::Refused), "{err:?}");
    assert_eq!(
        svc.runs.load(Ordering::SeqCst),
        2,
        "the released key runs again"
    );
    assert_eq!(rows(&db.store, "o-2").await, 0);
}

async fn in_transaction_completes_with_the_callers_commit() {
    let db = db("within").await;
    let store = &*db.store;
    let runs = AtomicUsize::new(0);
    let mut tx = begin(store).await;
    let id = debit(store, &mut tx, "o-3".into(), &runs).await.unwrap();
    // The caller's own statement in the same transaction.
    sqlx::query("INSERT INTO orders (k) VALUES ('o-3-caller')")
        .execute(&mut *tx)
        .await
        .unwrap();
    store.commit(tx).await.unwrap();
    assert_eq!(rows(store, "o-3").await, 1);
    assert_eq!(rows(store, "o-3-caller").await, 1);

    // A retry in a new transaction replays without running the body.
    let mut tx = begin(store).await;
    let again = debit(store, &mut tx, "o-3".into(), &runs).await.unwrap();
    store.commit(tx).await.unwrap();
    assert_eq!(again, id);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(rows(store, "o-3").await, 1);
}

async fn the_callers_rollback_leaves_no_row_and_no_completed_record() {
    let db = db("rollback").await;
    let store = &*db.store;
    let runs = AtomicUsize::new(0);
    let mut tx = begin(store).await;
    debit(store, &mut tx, "o-4".into(), &runs).await.unwrap();
    drop(tx); // the caller rolls back: its writes and idem's completion go
    assert_eq!(rows(store, "o-4").await, 0);

    // The claim stays in progress under its token until its lease (1 s) passes: a duplicate
    // meanwhile is refused (`on_conflict = reject`), never handed the rolled-back value.
    let mut tx = begin(store).await;
    let err = debit(store, &mut tx, "o-4".into(), &runs)
        .await
        .unwrap_err();
    drop(tx);
    assert!(
        matches!(err, AppError::Idem(Error::InProgress { .. })),
        "{err:?}"
    );

    // After the lease, the takeover runs the body again on a clean slate.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let mut tx = begin(store).await;
    debit(store, &mut tx, "o-4".into(), &runs).await.unwrap();
    store.commit(tx).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(rows(store, "o-4").await, 1);
}

/// `#[async_trait]` methods, and a body that moves an argument.
#[idem_core::async_trait]
trait Place {
    async fn place_moved(&self, order: String) -> Result<String, AppError>;
}

#[idem_core::async_trait]
impl Place for Orders {
    #[idempotent(key = order.clone(), store = self.db, transaction = tx)]
    async fn place_moved(&self, order: String) -> Result<String, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        sqlx::query("INSERT INTO orders (k) VALUES (?)")
            .bind(&order)
            .execute(&mut **tx)
            .await?;
        let moved: String = order; // the argument moves into the body
        Ok(moved)
    }
}

async fn async_trait_methods_and_moved_arguments() {
    let db = db("trait").await;
    let svc = orders(&db);
    let place: Arc<dyn Place + Send + Sync> = svc.clone();
    let fut = {
        let place = place.clone();
        async move { place.place_moved("o-5".into()).await }
    };
    assert_eq!(tokio::spawn(fut).await.unwrap().unwrap(), "o-5");
    assert_eq!(place.place_moved("o-5".into()).await.unwrap(), "o-5");
    assert_eq!(svc.runs.load(Ordering::SeqCst), 1);
    assert_eq!(rows(&db.store, "o-5").await, 1);
}

/// The same attribute forms on PostgreSQL.
#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use idem_stores::{PgTx, PostgresStore};

    struct Pg {
        store: PostgresStore,
        biz: String,
    }

    async fn pg() -> Option<Pg> {
        let Ok(url) = std::env::var("IDEM_TEST_POSTGRES_URL") else {
            println!("skipped: IDEM_TEST_POSTGRES_URL is not set");
            return None;
        };
        let n = format!("{}_{}", std::process::id(), rand_suffix());
        let store = PostgresStore::builder()
            .url(url)
            .table(format!("idem_tx_attr_{n}"))
            .connect()
            .await
            .expect("connect");
        store.migrate().await.expect("migrate");
        let biz = format!("idem_tx_attr_biz_{n}");
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {biz} (id BIGSERIAL PRIMARY KEY, k TEXT NOT NULL)"
        )))
        .execute(store.pool())
        .await
        .expect("create the business table");
        Some(Pg { store, biz })
    }

    fn rand_suffix() -> u64 {
        use std::hash::{BuildHasher, RandomState};
        RandomState::new().hash_one(0u8) % 1_000_000
    }

    async fn count(pg: &Pg, k: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {} WHERE k = $1",
            pg.biz
        )))
        .bind(k)
        .fetch_one(pg.store.pool())
        .await
        .expect("count")
    }

    async fn drop_tables(pg: &Pg) {
        let steps = format!("{}_steps", pg.store.table());
        for t in [pg.biz.clone(), pg.store.table().to_owned(), steps] {
            let _ = sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {t}")))
                .execute(pg.store.pool())
                .await;
        }
    }

    #[idempotent(key = order, store = pg.store, transaction = tx, skip(pg, runs))]
    async fn place(pg: &Pg, order: String, runs: &AtomicUsize) -> Result<i64, AppError> {
        runs.fetch_add(1, Ordering::SeqCst);
        let id: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "INSERT INTO {} (k) VALUES ($1) RETURNING id",
            pg.biz
        )))
        .bind(&order)
        .fetch_one(&mut **tx)
        .await?;
        Ok(id)
    }

    #[idempotent(key = order, store = pg.store, in_transaction = tx, skip(pg))]
    async fn debit(pg: &Pg, tx: &mut PgTx, order: String) -> Result<i64, AppError> {
        let id: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "INSERT INTO {} (k) VALUES ($1) RETURNING id",
            pg.biz
        )))
        .bind(&order)
        .fetch_one(&mut **tx)
        .await?;
        Ok(id)
    }

    pub(super) async fn both_forms_commit_and_replay() {
        let Some(pg) = pg().await else { return };
        let runs = AtomicUsize::new(0);
        let a = place(&pg, "p-1".into(), &runs).await.unwrap();
        let b = place(&pg, "p-1".into(), &runs).await.unwrap();
        assert_eq!((a, runs.load(Ordering::SeqCst)), (b, 1));
        assert_eq!(count(&pg, "p-1").await, 1);

        let mut tx = pg.store.begin().await.unwrap();
        let c = debit(&pg, &mut tx, "p-2".into()).await.unwrap();
        pg.store.commit(tx).await.unwrap();
        let mut tx = pg.store.begin().await.unwrap();
        let d = debit(&pg, &mut tx, "p-2".into()).await.unwrap();
        drop(tx);
        assert_eq!(c, d);
        assert_eq!(count(&pg, "p-2").await, 1);
        drop_tables(&pg).await;
    }
}

fn main() -> std::process::ExitCode {
    #[allow(unused_mut)]
    let mut cases = vec![idem_testkit::test_cases!([], current_thread;
        transaction_commits_the_row_and_the_record_together_and_replays,
        the_future_is_send_and_spawnable,
        err_rolls_the_row_back_and_releases_the_key,
        in_transaction_completes_with_the_callers_commit,
        the_callers_rollback_leaves_no_row_and_no_completed_record,
        async_trait_methods_and_moved_arguments)];
    #[cfg(feature = "postgres")]
    cases.push(
        idem_testkit::test_cases!([backends::POSTGRES], current_thread;
        postgres::both_forms_commit_and_replay),
    );
    idem_testkit::harness::run(cases)
}
