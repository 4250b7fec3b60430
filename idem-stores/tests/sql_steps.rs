//! Durable steps on the three SQL stores, at the store level (`load_steps`, `put_step`,
//! `clear_step`, `TransactionalStore::put_step_in`): round trips, replacement, fencing, what
//! release, completion, removal and the sweep do to steps, expiry, the value limit, many
//! writers racing a takeover, transactional steps, and the upgrade of a database made before
//! durable steps. The same cases run on PostgreSQL, MariaDB/MySQL and SQLite (a file of its
//! own per case, no server). Each case makes its own tables and drops them.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, dead_code)]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/sql_common.rs"]
mod sql_common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_core::{
    async_trait, Claim, FencingToken, Key, RecordState, StepId, StepRecord, StepStatus, Store,
    StoreError,
};
use idem_testkit::{claim_request, fresh_key};

const LONG: Duration = Duration::from_secs(60);

/// One SQL store under test, on tables of its own (dropped with it).
#[async_trait]
trait Db: Send + Sync + 'static {
    fn store(&self) -> Arc<dyn Store>;
    /// The steps table's name.
    fn steps_table(&self) -> String;
    /// Rows of the steps table for `key`, expired ones included.
    async fn step_rows(&self, key: &Key) -> i64;
    /// The store's `purge_expired`.
    async fn purge(&self, batch: u32) -> u64;
    /// The store's `migrate`.
    async fn migrate(&self) -> Result<(), StoreError>;
    /// Drops the steps table: the database as an earlier version left it.
    async fn drop_steps_table(&self);
    /// A store on the same tables, with this value limit.
    async fn limited(&self, max_value_size: usize) -> Arc<dyn Store>;
    /// In one transaction: a business row for `key`, then `put_step_in`; then, after
    /// `hold`, a commit (or a rollback). A failed `put_step_in` rolls back and is returned.
    async fn in_tx(
        &self,
        key: Key,
        token: FencingToken,
        step: StepRecord,
        commit: bool,
        hold: Duration,
    ) -> Result<(), StoreError>;
    /// Business rows for `key`.
    async fn business_rows(&self, key: &Key) -> i64;
}

fn step(name: &str, occurrence: u32, status: StepStatus, value: &[u8]) -> StepRecord {
    StepRecord::new(StepId::new(name, occurrence), status, value.to_vec())
}

/// The call's steps, sorted.
async fn loaded(store: &dyn Store, key: &Key) -> Vec<StepRecord> {
    let mut steps = store.load_steps(key).await.expect("load steps");
    steps.sort_by(|a, b| a.id.cmp(&b.id));
    steps
}

fn ids(steps: &[StepRecord]) -> BTreeSet<StepId> {
    steps.iter().map(|s| s.id.clone()).collect()
}

/// A key claimed under a fresh token with `lease`.
async fn claimed(store: &dyn Store, lease: Duration) -> (Key, FencingToken) {
    let key = fresh_key();
    let (req, token) = claim_request(key, lease);
    assert_eq!(
        store.claim(&req).await.expect("claim"),
        Claim::Acquired { taken_over: false }
    );
    (key, token)
}

/// Claims `key` under a fresh token until it is taken over (its lease has passed).
async fn take_over(store: &dyn Store, key: Key) -> FencingToken {
    for _ in 0..200 {
        let (req, token) = claim_request(key, LONG);
        match store.claim(&req).await.expect("claim") {
            Claim::Acquired { taken_over: true } => return token,
            Claim::InProgress { .. } => tokio::time::sleep(Duration::from_millis(10)).await,
            other => panic!("takeover: {other:?}"),
        }
    }
    panic!("the lease never passed");
}

// ---------------------------------------------------------------------------------------
// The cases, on any of the three stores.

/// Steps written are read back, exactly (names compared byte for byte, statuses, values,
/// occurrences); another call has none.
async fn round_trip(db: Arc<dyn Db>) {
    let store = db.store();
    assert!(store.supports_steps());
    let (key, token) = claimed(&*store, LONG).await;
    assert!(loaded(&*store, &key).await.is_empty());
    let mut written = vec![
        step("order.insert", 0, StepStatus::Done, b"{\"id\":7}"),
        step("line", 0, StepStatus::Done, &[0, 1, 2, 255]),
        step("line", 1, StepStatus::Failed, b"declined"),
        step("line", u32::MAX, StepStatus::Done, b""),
        step("email", 0, StepStatus::Started, b"s"),
        step("Charge", 0, StepStatus::Done, b"upper"),
        step("charge", 0, StepStatus::Done, b"lower"),
        step("", 0, StepStatus::Done, b"empty name"),
        step("😀'\"`", 0, StepStatus::Done, b"u"),
        step("'; DROP TABLE idem_records; --", 0, StepStatus::Done, b"x"),
        step(&"n".repeat(512), 0, StepStatus::Done, b"longest name"),
        step("big", 0, StepStatus::Done, &vec![7u8; 200_000]),
    ];
    for s in &written {
        store
            .put_step(&key, token, s, LONG)
            .await
            .expect("put step");
    }
    written.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(loaded(&*store, &key).await, written);
    assert_eq!(db.step_rows(&key).await, written.len() as i64);
    let other = fresh_key();
    assert!(loaded(&*store, &other).await.is_empty());
    // A name over the limit is refused before any round trip.
    let long = step(&"n".repeat(513), 0, StepStatus::Done, b"v");
    assert!(matches!(
        store.put_step(&key, token, &long, LONG).await,
        Err(StoreError::Backend { .. })
    ));
}

/// A step written again replaces its record (Started → Done); the same record written twice
/// is one row, and every write answers Ok (also those within one millisecond, which leave
/// the row exactly as it was).
async fn replace_and_repeat(db: Arc<dyn Db>) {
    let store = db.store();
    let (key, token) = claimed(&*store, LONG).await;
    let started = step("charge", 0, StepStatus::Started, b"");
    let done = step("charge", 0, StepStatus::Done, b"ch_1");
    store.put_step(&key, token, &started, LONG).await.unwrap();
    assert_eq!(loaded(&*store, &key).await, vec![started]);
    store.put_step(&key, token, &done, LONG).await.unwrap();
    assert_eq!(loaded(&*store, &key).await, vec![done.clone()]);
    for _ in 0..50 {
        store
            .put_step(&key, token, &done, LONG)
            .await
            .expect("a repeated step write is Ok");
    }
    assert_eq!(loaded(&*store, &key).await, vec![done]);
    assert_eq!(db.step_rows(&key).await, 1);
}

/// Only the holder writes or clears steps: not another token, not after a takeover, not
/// after the completion or the release, not without a record. A fenced write writes nothing.
async fn fencing(db: Arc<dyn Db>) {
    let store = db.store();
    let s = step("charge", 0, StepStatus::Done, b"v");
    let id = s.id.clone();
    // No record at all.
    let nobody = fresh_key();
    assert!(matches!(
        store
            .put_step(&nobody, FencingToken::random(), &s, LONG)
            .await,
        Err(StoreError::Fenced)
    ));
    assert!(matches!(
        store.clear_step(&nobody, FencingToken::random(), &id).await,
        Err(StoreError::Fenced)
    ));
    assert_eq!(db.step_rows(&nobody).await, 0);

    // Another token.
    let (key, token) = claimed(&*store, LONG).await;
    let wrong = FencingToken::random();
    assert!(matches!(
        store.put_step(&key, wrong, &s, LONG).await,
        Err(StoreError::Fenced)
    ));
    assert_eq!(db.step_rows(&key).await, 0);
    store.put_step(&key, token, &s, LONG).await.unwrap();
    assert!(matches!(
        store.clear_step(&key, wrong, &id).await,
        Err(StoreError::Fenced)
    ));
    assert_eq!(loaded(&*store, &key).await, vec![s.clone()]);

    // After a takeover: the old holder is fenced, the new one sees its steps and writes.
    let (key, old) = claimed(&*store, Duration::from_millis(150)).await;
    store.put_step(&key, old, &s, LONG).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let new = take_over(&*store, key).await;
    let late = step("email", 0, StepStatus::Done, b"late");
    assert!(matches!(
        store.put_step(&key, old, &late, LONG).await,
        Err(StoreError::Fenced)
    ));
    assert!(matches!(
        store.clear_step(&key, old, &id).await,
        Err(StoreError::Fenced)
    ));
    assert_eq!(
        loaded(&*store, &key).await,
        vec![s.clone()],
        "resumes after it"
    );
    store.put_step(&key, new, &late, LONG).await.unwrap();
    assert_eq!(db.step_rows(&key).await, 2);

    // After the completion.
    store.complete(&key, new, b"done", LONG).await.unwrap();
    let after = step("after", 0, StepStatus::Done, b"");
    assert!(matches!(
        store.put_step(&key, new, &after, LONG).await,
        Err(StoreError::Fenced)
    ));
    assert!(matches!(
        store.clear_step(&key, new, &id).await,
        Err(StoreError::Fenced)
    ));
    assert_eq!(db.step_rows(&key).await, 2);

    // After the release.
    let (key, token) = claimed(&*store, LONG).await;
    store.release(&key, token).await.unwrap();
    assert!(matches!(
        store.put_step(&key, token, &s, LONG).await,
        Err(StoreError::Fenced)
    ));
    assert_eq!(db.step_rows(&key).await, 0);
}

/// A completed or released call keeps its steps (a retry after a release resumes after
/// them); `load_steps` reads them whatever the record's state.
async fn settling_keeps_steps(db: Arc<dyn Db>) {
    let store = db.store();
    let s = step("order.insert", 0, StepStatus::Done, b"7");
    let (key, token) = claimed(&*store, LONG).await;
    store.put_step(&key, token, &s, LONG).await.unwrap();
    store.release(&key, token).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), None);
    assert_eq!(loaded(&*store, &key).await, vec![s.clone()]);
    // The retry claims again and finds them.
    let (req, retry) = claim_request(key, LONG);
    assert_eq!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
    assert_eq!(loaded(&*store, &key).await, vec![s.clone()]);
    let next = step("charge", 0, StepStatus::Done, b"c");
    store.put_step(&key, retry, &next, LONG).await.unwrap();
    store.complete(&key, retry, b"r", LONG).await.unwrap();
    assert_eq!(loaded(&*store, &key).await, vec![next, s]);
}

/// `remove` deletes the call's steps with its record, also when the record is gone already
/// (a released call), and touches no other call's steps.
async fn remove_deletes_steps(db: Arc<dyn Db>) {
    let store = db.store();
    let s = step("a", 0, StepStatus::Done, b"1");
    let (key, token) = claimed(&*store, LONG).await;
    let (other, other_token) = claimed(&*store, LONG).await;
    store.put_step(&key, token, &s, LONG).await.unwrap();
    store
        .put_step(&key, token, &step("b", 0, StepStatus::Done, b"2"), LONG)
        .await
        .unwrap();
    store.put_step(&other, other_token, &s, LONG).await.unwrap();
    store.remove(&key).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), None);
    assert!(loaded(&*store, &key).await.is_empty());
    assert_eq!(db.step_rows(&key).await, 0);
    assert_eq!(loaded(&*store, &other).await, vec![s.clone()]);
    // Released: no record, steps kept; remove forgets them.
    store.release(&other, other_token).await.unwrap();
    assert_eq!(db.step_rows(&other).await, 1);
    store.remove(&other).await.unwrap();
    assert_eq!(db.step_rows(&other).await, 0);
    // Nothing at all: Ok.
    store.remove(&fresh_key()).await.unwrap();
}

/// `clear_step` removes one step of the holder's call; a step that is not there is Ok.
async fn clear(db: Arc<dyn Db>) {
    let store = db.store();
    let (key, token) = claimed(&*store, LONG).await;
    let started = step("email", 0, StepStatus::Started, b"");
    let kept = step("email", 1, StepStatus::Done, b"");
    store.put_step(&key, token, &started, LONG).await.unwrap();
    store.put_step(&key, token, &kept, LONG).await.unwrap();
    store.clear_step(&key, token, &started.id).await.unwrap();
    assert_eq!(loaded(&*store, &key).await, vec![kept]);
    store
        .clear_step(&key, token, &started.id)
        .await
        .expect("clearing a step that is not there is Ok");
    store
        .clear_step(&key, token, &StepId::new("never", 0))
        .await
        .unwrap();
}

/// A step expires its TTL after its write: `load_steps` no longer reads it, and the sweep
/// deletes it (and no live step).
async fn expiry(db: Arc<dyn Db>) {
    let store = db.store();
    let (key, token) = claimed(&*store, LONG).await;
    let short = step("short", 0, StepStatus::Done, b"s");
    let long = step("long", 0, StepStatus::Done, b"l");
    store
        .put_step(&key, token, &short, Duration::from_millis(200))
        .await
        .unwrap();
    store.put_step(&key, token, &long, LONG).await.unwrap();
    assert_eq!(loaded(&*store, &key).await.len(), 2);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(loaded(&*store, &key).await, vec![long.clone()]);
    assert_eq!(db.step_rows(&key).await, 2, "expired, not yet swept");
    assert!(db.purge(1000).await >= 1);
    assert_eq!(db.step_rows(&key).await, 1);
    assert_eq!(loaded(&*store, &key).await, vec![long.clone()]);
    // Written again, an expired step lives again.
    store
        .put_step(&key, token, &short, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(loaded(&*store, &key).await.len(), 2);
}

/// A step value over the store's limit is TooLarge and written nowhere; at the limit it is
/// written (in a transaction too).
async fn too_large(db: Arc<dyn Db>) {
    let store = db.limited(1024).await;
    assert_eq!(store.max_value_size(), 1024);
    let (key, token) = claimed(&*store, LONG).await;
    let over = step("big", 0, StepStatus::Done, &[1u8; 1025]);
    match store.put_step(&key, token, &over, LONG).await {
        Err(StoreError::TooLarge { size, limit }) => assert_eq!((size, limit), (1025, 1024)),
        other => panic!("{other:?}"),
    }
    assert_eq!(db.step_rows(&key).await, 0);
    let at = step("big", 0, StepStatus::Done, &[1u8; 1024]);
    store.put_step(&key, token, &at, LONG).await.unwrap();
    assert_eq!(loaded(&*store, &key).await, vec![at]);
}

/// Many tasks write steps of one call under the holder's token while another takes the call
/// over: every write answered Ok is stored, every write answered Fenced is not, a writer
/// once fenced stays fenced, and nothing the old token wrote appears after the takeover.
async fn writers_race_a_takeover(db: Arc<dyn Db>) {
    const WRITERS: u32 = 6;
    let store = db.store();
    let (key, token) = claimed(&*store, Duration::from_millis(400)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = Arc::clone(&store);
        let stop = Arc::clone(&stop);
        writers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let mut fenced = 0;
            for i in 0.. {
                let s = step(&format!("w{w}"), i, StepStatus::Done, &i.to_le_bytes());
                match store.put_step(&key, token, &s, LONG).await {
                    Ok(()) => {
                        assert_eq!(fenced, 0, "writer {w}: written after being fenced");
                        outcomes.push((s.id, true));
                    }
                    Err(StoreError::Fenced) => {
                        fenced += 1;
                        outcomes.push((s.id, false));
                    }
                    Err(e) => panic!("writer {w}: {e}"),
                }
                if fenced >= 3 || stop.load(Ordering::SeqCst) {
                    break;
                }
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_millis(450)).await;
    let _new = take_over(&*store, key).await;
    let at_takeover = ids(&loaded(&*store, &key).await);
    // Let the writers meet the new token, then stop them.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::SeqCst);
    let mut ok = BTreeSet::new();
    let mut refused = BTreeSet::new();
    for w in writers {
        for (id, written) in w.await.expect("writer") {
            if written {
                ok.insert(id);
            } else {
                refused.insert(id);
            }
        }
    }
    let after = ids(&loaded(&*store, &key).await);
    assert_eq!(
        after, at_takeover,
        "steps of the old token appeared after the takeover"
    );
    assert_eq!(after, ok, "every Ok write is stored, and only those");
    assert!(refused.is_disjoint(&after));
    assert!(!ok.is_empty(), "no write went through before the takeover");
    assert!(!refused.is_empty(), "no write met the takeover");
}

/// A transactional step: its business row and its step row commit together; a rollback
/// leaves neither; a fenced write inside the transaction is Fenced, and its transaction
/// rolls back.
async fn transactional(db: Arc<dyn Db>) {
    let store = db.store();
    let (key, token) = claimed(&*store, LONG).await;
    let s = step("ledger", 0, StepStatus::Done, b"row 1");
    db.in_tx(key, token, s.clone(), false, Duration::ZERO)
        .await
        .expect("rolled back");
    assert_eq!(db.business_rows(&key).await, 0);
    assert!(loaded(&*store, &key).await.is_empty());
    db.in_tx(key, token, s.clone(), true, Duration::ZERO)
        .await
        .expect("committed");
    assert_eq!(db.business_rows(&key).await, 1);
    assert_eq!(loaded(&*store, &key).await, vec![s.clone()]);
    // Fenced inside the transaction: nothing commits.
    let (other, _) = claimed(&*store, LONG).await;
    let r = db
        .in_tx(
            other,
            FencingToken::random(),
            s.clone(),
            true,
            Duration::ZERO,
        )
        .await;
    assert!(matches!(r, Err(StoreError::Fenced)), "{r:?}");
    assert_eq!(db.business_rows(&other).await, 0);
    assert!(loaded(&*store, &other).await.is_empty());
    // The value limit holds in a transaction too.
    let over = store.max_value_size() + 1;
    let r = db
        .in_tx(
            other,
            FencingToken::random(),
            step("big", 0, StepStatus::Done, &vec![0; over]),
            true,
            Duration::ZERO,
        )
        .await;
    assert!(matches!(r, Err(StoreError::TooLarge { .. })), "{r:?}");
}

/// A takeover while a transactional step's transaction is open waits for its commit and
/// then sees the step: the retry does not run it again.
async fn takeover_waits_for_a_transactional_step(db: Arc<dyn Db>) {
    let store = db.store();
    let (key, token) = claimed(&*store, Duration::from_millis(300)).await;
    let s = step("ledger", 0, StepStatus::Done, b"row 1");
    let holder = {
        let db = Arc::clone(&db);
        let s = s.clone();
        tokio::spawn(async move {
            db.in_tx(key, token, s, true, Duration::from_millis(900))
                .await
        })
    };
    // The lease passes while the transaction is open.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let _new = take_over(&*store, key).await;
    assert_eq!(
        loaded(&*store, &key).await,
        vec![s],
        "the takeover did not wait for the transactional step"
    );
    assert_eq!(db.business_rows(&key).await, 1);
    holder
        .await
        .expect("holder")
        .expect("the transaction committed");
}

/// A database of an earlier version (the records table, no steps table): steps fail with
/// an error that says to migrate; remove and the sweep go on working; `migrate()` adds the
/// steps table and keeps the records; running it again changes nothing.
async fn upgrade_by_migrate(db: Arc<dyn Db>) {
    let store = db.store();
    db.drop_steps_table().await;
    let (key, token) = claimed(&*store, LONG).await;
    let s = step("a", 0, StepStatus::Done, b"1");
    for (op, r) in [
        ("put", store.put_step(&key, token, &s, LONG).await),
        ("load", store.load_steps(&key).await.map(drop)),
        ("clear", store.clear_step(&key, token, &s.id).await),
    ] {
        match r {
            Err(e @ StoreError::Backend { .. }) => {
                let message = e.to_string();
                assert!(
                    message.contains("migrate()") && message.contains(&db.steps_table()),
                    "{op}: {message}"
                );
            }
            other => panic!("{op} without a steps table: {other:?}"),
        }
    }
    let (gone, _) = claimed(&*store, LONG).await;
    store
        .remove(&gone)
        .await
        .expect("remove without a steps table");
    assert_eq!(store.get(&gone).await.unwrap(), None);
    db.purge(100).await;
    db.migrate().await.expect("migrate adds the steps table");
    db.migrate().await.expect("migrate again");
    assert_eq!(
        store.get(&key).await.unwrap(),
        Some(RecordState::InProgress {
            token,
            fingerprint: None
        }),
        "the record survived the migration"
    );
    store.put_step(&key, token, &s, LONG).await.unwrap();
    assert_eq!(loaded(&*store, &key).await, vec![s]);
}

// ---------------------------------------------------------------------------------------
// The databases.

/// Drops tables from a thread with its own runtime: also while a failed test unwinds.
fn drop_tables_later<F>(drop: F)
where
    F: FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> + Send + 'static,
{
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(drop());
        }
    })
    .join();
}

#[cfg(feature = "postgres")]
mod pg {
    use super::*;
    use idem_core::TransactionalStore;
    use idem_stores::PostgresStore;
    use sqlx::postgres::{PgPool, PgPoolOptions};
    use sqlx::AssertSqlSafe;

    pub struct Pg {
        url: String,
        pool: PgPool,
        store: PostgresStore,
        table: String,
    }

    impl Pg {
        fn biz(&self) -> String {
            format!("{}_biz", self.table)
        }
    }

    pub async fn open() -> Arc<dyn Db> {
        let url = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL").expect("url");
        sql_common::pg_drop_stale_tables(&url).await;
        let table = sql_common::unique_table("st");
        let pool = PgPoolOptions::new()
            .max_connections(12)
            .connect(&url)
            .await
            .expect("connect");
        let store = PostgresStore::builder()
            .pool(pool.clone())
            .table(&table)
            .build()
            .expect("store");
        store.migrate().await.expect("migrate");
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE \"{table}_biz\" (k TEXT NOT NULL, mark TEXT NOT NULL)"
        )))
        .execute(&pool)
        .await
        .expect("business table");
        Arc::new(Pg {
            url,
            pool,
            store,
            table,
        })
    }

    impl Drop for Pg {
        fn drop(&mut self) {
            let (url, t) = (self.url.clone(), self.table.clone());
            drop_tables_later(move || {
                Box::pin(async move {
                    if let Ok(pool) = PgPoolOptions::new().max_connections(1).connect(&url).await {
                        let sql =
                            format!("DROP TABLE IF EXISTS \"{t}\", \"{t}_steps\", \"{t}_biz\"");
                        let _ = sqlx::query(AssertSqlSafe(sql)).execute(&pool).await;
                    }
                })
            });
        }
    }

    #[async_trait]
    impl Db for Pg {
        fn store(&self) -> Arc<dyn Store> {
            Arc::new(self.store.clone())
        }
        fn steps_table(&self) -> String {
            format!("{}_steps", self.table)
        }
        async fn step_rows(&self, key: &Key) -> i64 {
            let sql = format!(
                "SELECT count(*) FROM \"{}_steps\" WHERE key = $1",
                self.table
            );
            sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(&key.0[..])
                .fetch_one(&self.pool)
                .await
                .expect("count")
        }
        async fn purge(&self, batch: u32) -> u64 {
            self.store.purge_expired(batch).await.expect("purge")
        }
        async fn migrate(&self) -> Result<(), StoreError> {
            self.store.migrate().await
        }
        async fn drop_steps_table(&self) {
            let sql = format!("DROP TABLE \"{}_steps\"", self.table);
            sqlx::query(AssertSqlSafe(sql))
                .execute(&self.pool)
                .await
                .expect("drop");
        }
        async fn limited(&self, max: usize) -> Arc<dyn Store> {
            Arc::new(
                PostgresStore::builder()
                    .pool(self.pool.clone())
                    .table(&self.table)
                    .max_value_size(max)
                    .build()
                    .expect("store"),
            )
        }
        async fn in_tx(
            &self,
            key: Key,
            token: FencingToken,
            step: StepRecord,
            commit: bool,
            hold: Duration,
        ) -> Result<(), StoreError> {
            let mut tx = self.store.begin().await?;
            let sql = format!("INSERT INTO \"{}\" (k, mark) VALUES ($1, 'x')", self.biz());
            sqlx::query(AssertSqlSafe(sql))
                .bind(key.to_hex())
                .execute(&mut *tx)
                .await
                .expect("business row");
            self.store
                .put_step_in(&mut tx, &key, token, &step, LONG)
                .await?;
            tokio::time::sleep(hold).await;
            if commit {
                self.store.commit(tx).await
            } else {
                tx.rollback().await.expect("rollback");
                Ok(())
            }
        }
        async fn business_rows(&self, key: &Key) -> i64 {
            let sql = format!("SELECT count(*) FROM \"{}\" WHERE k = $1", self.biz());
            sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(key.to_hex())
                .fetch_one(&self.pool)
                .await
                .expect("count")
        }
    }
}

#[cfg(feature = "mysql")]
mod my {
    use super::*;
    use idem_core::TransactionalStore;
    use idem_stores::MySqlStore;
    use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
    use sqlx::AssertSqlSafe;

    pub struct My {
        url: String,
        pool: MySqlPool,
        store: MySqlStore,
        table: String,
    }

    impl My {
        fn biz(&self) -> String {
            format!("{}_biz", self.table)
        }
    }

    /// The server's isolation level (InnoDB's default: REPEATABLE READ).
    pub async fn open() -> Arc<dyn Db> {
        open_with(None).await
    }

    /// Every session in READ COMMITTED, where an `INSERT ... SELECT` reads its source rows
    /// without locks unless it asks for them.
    pub async fn open_read_committed() -> Arc<dyn Db> {
        open_with(Some("READ COMMITTED")).await
    }

    async fn open_with(isolation: Option<&'static str>) -> Arc<dyn Db> {
        let url = idem_testkit::env_url("IDEM_TEST_MYSQL_URL").expect("url");
        let table = sql_common::unique_table("st");
        let pool = MySqlPoolOptions::new()
            .max_connections(12)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if let Some(level) = isolation {
                        let sql = format!("SET SESSION TRANSACTION ISOLATION LEVEL {level}");
                        sqlx::query(AssertSqlSafe(sql)).execute(conn).await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .expect("connect");
        let store = MySqlStore::builder()
            .pool(pool.clone())
            .table(&table)
            .build()
            .expect("store");
        store.migrate().await.expect("migrate");
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE `{table}_biz` (k VARCHAR(64) NOT NULL, mark TEXT NOT NULL) \
             ENGINE=InnoDB"
        )))
        .execute(&pool)
        .await
        .expect("business table");
        Arc::new(My {
            url,
            pool,
            store,
            table,
        })
    }

    impl Drop for My {
        fn drop(&mut self) {
            let (url, t) = (self.url.clone(), self.table.clone());
            drop_tables_later(move || {
                Box::pin(async move {
                    if let Ok(pool) = MySqlPoolOptions::new()
                        .max_connections(1)
                        .connect(&url)
                        .await
                    {
                        let sql = format!("DROP TABLE IF EXISTS `{t}`, `{t}_steps`, `{t}_biz`");
                        let _ = sqlx::query(AssertSqlSafe(sql)).execute(&pool).await;
                    }
                })
            });
        }
    }

    #[async_trait]
    impl Db for My {
        fn store(&self) -> Arc<dyn Store> {
            Arc::new(self.store.clone())
        }
        fn steps_table(&self) -> String {
            format!("{}_steps", self.table)
        }
        async fn step_rows(&self, key: &Key) -> i64 {
            let sql = format!("SELECT COUNT(*) FROM `{}_steps` WHERE k = ?", self.table);
            sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(&key.0[..])
                .fetch_one(&self.pool)
                .await
                .expect("count")
        }
        async fn purge(&self, batch: u32) -> u64 {
            self.store.purge_expired(batch).await.expect("purge")
        }
        async fn migrate(&self) -> Result<(), StoreError> {
            self.store.migrate().await
        }
        async fn drop_steps_table(&self) {
            let sql = format!("DROP TABLE `{}_steps`", self.table);
            sqlx::query(AssertSqlSafe(sql))
                .execute(&self.pool)
                .await
                .expect("drop");
        }
        async fn limited(&self, max: usize) -> Arc<dyn Store> {
            Arc::new(
                MySqlStore::builder()
                    .pool(self.pool.clone())
                    .table(&self.table)
                    .max_value_size(max)
                    .build()
                    .expect("store"),
            )
        }
        async fn in_tx(
            &self,
            key: Key,
            token: FencingToken,
            step: StepRecord,
            commit: bool,
            hold: Duration,
        ) -> Result<(), StoreError> {
            let mut tx = self.store.begin().await?;
            let sql = format!("INSERT INTO `{}` (k, mark) VALUES (?, 'x')", self.biz());
            sqlx::query(AssertSqlSafe(sql))
                .bind(key.to_hex())
                .execute(&mut *tx)
                .await
                .expect("business row");
            self.store
                .put_step_in(&mut tx, &key, token, &step, LONG)
                .await?;
            tokio::time::sleep(hold).await;
            if commit {
                self.store.commit(tx).await
            } else {
                tx.rollback().await.expect("rollback");
                Ok(())
            }
        }
        async fn business_rows(&self, key: &Key) -> i64 {
            let sql = format!("SELECT COUNT(*) FROM `{}` WHERE k = ?", self.biz());
            sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(key.to_hex())
                .fetch_one(&self.pool)
                .await
                .expect("count")
        }
    }
}

#[cfg(feature = "sqlite")]
mod lite {
    use super::*;
    use idem_core::TransactionalStore;
    use idem_stores::SqliteStore;
    use sqlx::sqlite::SqlitePool;
    use sqlx::AssertSqlSafe;

    pub struct Lite {
        file: std::path::PathBuf,
        pool: SqlitePool,
        store: SqliteStore,
        table: String,
    }

    pub async fn open() -> Arc<dyn Db> {
        let table = sql_common::unique_table("st");
        let file = sql_common::sqlite_file(&table);
        let store = SqliteStore::builder()
            .url(format!("sqlite://{}", file.display()))
            .table(&table)
            .connect()
            .await
            .expect("store");
        store.migrate().await.expect("migrate");
        let pool = store.pool().clone();
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE \"{table}_biz\" (k TEXT NOT NULL, mark TEXT NOT NULL)"
        )))
        .execute(&pool)
        .await
        .expect("business table");
        Arc::new(Lite {
            file,
            pool,
            store,
            table,
        })
    }

    impl Drop for Lite {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm"] {
                let mut name = self.file.clone().into_os_string();
                name.push(suffix);
                let _ = std::fs::remove_file(name);
            }
        }
    }

    #[async_trait]
    impl Db for Lite {
        fn store(&self) -> Arc<dyn Store> {
            Arc::new(self.store.clone())
        }
        fn steps_table(&self) -> String {
            format!("{}_steps", self.table)
        }
        async fn step_rows(&self, key: &Key) -> i64 {
            let sql = format!(
                "SELECT count(*) FROM \"{}_steps\" WHERE key = ?1",
                self.table
            );
            sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(&key.0[..])
                .fetch_one(&self.pool)
                .await
                .expect("count")
        }
        async fn purge(&self, batch: u32) -> u64 {
            self.store.purge_expired(batch).await.expect("purge")
        }
        async fn migrate(&self) -> Result<(), StoreError> {
            self.store.migrate().await
        }
        async fn drop_steps_table(&self) {
            let sql = format!("DROP TABLE \"{}_steps\"", self.table);
            sqlx::query(AssertSqlSafe(sql))
                .execute(&self.pool)
                .await
                .expect("drop");
        }
        async fn limited(&self, max: usize) -> Arc<dyn Store> {
            Arc::new(
                SqliteStore::builder()
                    .pool(self.pool.clone())
                    .table(&self.table)
                    .max_value_size(max)
                    .build()
                    .expect("store"),
            )
        }
        async fn in_tx(
            &self,
            key: Key,
            token: FencingToken,
            step: StepRecord,
            commit: bool,
            hold: Duration,
        ) -> Result<(), StoreError> {
            let mut tx = self.store.begin().await?;
            let sql = format!(
                "INSERT INTO \"{}_biz\" (k, mark) VALUES (?1, 'x')",
                self.table
            );
            sqlx::query(AssertSqlSafe(sql))
                .bind(key.to_hex())
                .execute(&mut *tx)
                .await
                .expect("business row");
            self.store
                .put_step_in(&mut tx, &key, token, &step, LONG)
                .await?;
            tokio::time::sleep(hold).await;
            if commit {
                self.store.commit(tx).await
            } else {
                tx.rollback().await.expect("rollback");
                Ok(())
            }
        }
        async fn business_rows(&self, key: &Key) -> i64 {
            let sql = format!("SELECT count(*) FROM \"{}_biz\" WHERE k = ?1", self.table);
            sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(key.to_hex())
                .fetch_one(&self.pool)
                .await
                .expect("count")
        }
    }
}

/// The cases of one database, as `mod $m { pub(super) async fn case() }`.
macro_rules! cases_on {
    ($m:ident, $feature:literal, $open:path) => {
        #[cfg(feature = $feature)]
        mod $m {
            cases_on!(@each $open; round_trip, replace_and_repeat, fencing, settling_keeps_steps,
                remove_deletes_steps, clear, expiry, too_large, writers_race_a_takeover,
                transactional, takeover_waits_for_a_transactional_step, upgrade_by_migrate);
        }
    };
    (@each $open:path; $($case:ident),*) => {
        $(
            pub(super) async fn $case() {
                super::$case($open().await).await;
            }
        )*
    };
}

cases_on!(postgres, "postgres", super::pg::open);
cases_on!(mysql, "mysql", super::my::open);
cases_on!(
    mysql_read_committed,
    "mysql",
    super::my::open_read_committed
);
cases_on!(sqlite, "sqlite", super::lite::open);

/// The case list of one database module.
macro_rules! listed {
    ($needs:expr, $m:ident) => {
        idem_testkit::test_cases!($needs, multi_thread(4);
            $m::round_trip, $m::replace_and_repeat, $m::fencing, $m::settling_keeps_steps,
            $m::remove_deletes_steps, $m::clear, $m::expiry, $m::too_large,
            $m::writers_race_a_takeover, $m::transactional,
            $m::takeover_waits_for_a_transactional_step, $m::upgrade_by_migrate)
    };
}

fn main() -> std::process::ExitCode {
    #[allow(unused_mut)]
    let mut cases: Vec<Vec<idem_testkit::harness::Case>> = Vec::new();
    #[cfg(feature = "postgres")]
    cases.push(listed!([backends::POSTGRES], postgres));
    #[cfg(feature = "mysql")]
    cases.push(listed!([backends::MYSQL], mysql));
    #[cfg(feature = "mysql")]
    cases.push(listed!([backends::MYSQL], mysql_read_committed));
    #[cfg(feature = "sqlite")]
    cases.push(listed!([], sqlite));
    idem_testkit::harness::run(cases)
}
