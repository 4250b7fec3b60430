//! Helpers shared by the SQL store tests: per-run table names, server URLs, cleanup.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

/// The prefix of every table a test creates; `<prefix><pid>_<n>`.
pub const TABLE_PREFIX: &str = "idem_t";

/// A table name unique to this process and call: `idem_t<pid>_<n>_<tag>`.
pub fn unique_table(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{TABLE_PREFIX}{}_{}_{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The pid a test table was named after, if it is one of ours.
pub fn table_pid(table: &str) -> Option<u32> {
    let rest = table.strip_prefix(TABLE_PREFIX)?;
    rest.split('_').next()?.parse().ok()
}

/// Whether a process is alive (Linux: `/proc/<pid>` exists).
pub fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Keys and scopes that would break string-built SQL.
pub fn hostile_strings() -> Vec<String> {
    vec![
        "'".into(),
        "''; DROP TABLE idem_records; --".into(),
        "\"; DELETE FROM idem_records; --".into(),
        "a\0b".into(),
        "\0".into(),
        "; ; ;".into(),
        "\\x00\\'".into(),
        "%_*".into(),
        "😀'\"`".into(),
        String::new(),
        "x".repeat(10_000),
    ]
}

/// Drops the test tables left by processes that are gone (a run cannot drop a table its
/// parallel cases still use, so each run cleans up after the previous ones).
#[cfg(feature = "postgres")]
pub async fn pg_drop_stale_tables(url: &str) {
    use sqlx::Row;
    static ONCE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if ONCE.swap(true, Ordering::SeqCst) {
        return;
    }
    let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
    else {
        return;
    };
    let rows = sqlx::query(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE 'idem\\_t%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_default();
    for row in rows {
        let Ok(name) = row.try_get::<String, _>(0) else {
            continue;
        };
        let Some(pid) = table_pid(&name) else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            let sql = format!("DROP TABLE IF EXISTS \"{name}\", \"{name}_steps\"");
            let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
        }
    }
    pool.close().await;
}

/// Drops a test's PostgreSQL table and its `_steps` table (best effort).
#[cfg(feature = "postgres")]
pub async fn pg_drop_tables(pool: &sqlx::PgPool, table: &str) {
    let sql = format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_steps\"");
    let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await;
}

/// Drops a test's MySQL / MariaDB table and its `_steps` table (best effort).
#[cfg(feature = "mysql")]
pub async fn mysql_drop_tables(pool: &sqlx::MySqlPool, table: &str) {
    let sql = format!("DROP TABLE IF EXISTS `{table}`, `{table}_steps`");
    let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await;
}

/// A SQLite database file for this test process (`<tmp>/idem-sqlite/<pid>-<tag>.db`); files
/// of processes that are gone are deleted first.
pub fn sqlite_file(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join("idem-sqlite");
    let _ = std::fs::create_dir_all(&dir);
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if pid != std::process::id() && !process_alive(pid) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    });
    dir.join(format!("{}-{tag}.db", std::process::id()))
}

/// Contract v2 checks that the conformance suite does not make at the row level, shared by the
/// three SQL stores' tests.
pub mod contract {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use idem_core::{Call, Claim, Error, OnConflict, RecordState, Store};
    use idem_testkit::{claim_request, fresh_key, Fault, FaultyStore, Op};

    /// A claim retried under its own token restarts the lease: after the first lease would
    /// have passed, another token still conflicts.
    pub async fn own_claim_restarts_the_lease(store: &dyn Store) {
        let key = fresh_key();
        let (mut r, token) = claim_request(key, Duration::from_millis(600));
        assert_eq!(
            store.claim(&r).await.expect("claim"),
            Claim::Acquired { taken_over: false }
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        r.lease = Duration::from_secs(30);
        assert_eq!(
            store.claim(&r).await.expect("claim again"),
            Claim::Acquired { taken_over: false },
            "a retried claim is acquired"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        match store
            .claim(&claim_request(key, Duration::from_secs(30)).0)
            .await
            .expect("claim by another token")
        {
            Claim::InProgress {
                lease_remaining: Some(left),
                ..
            } => assert!(
                left > Duration::from_secs(20),
                "lease not restarted: {left:?}"
            ),
            other => panic!("the retried claim did not restart the lease: {other:?}"),
        }
        store
            .complete(&key, token, b"v", Duration::from_secs(30))
            .await
            .expect("the claim's token still completes");
    }

    /// A completion retried under its own token answers Ok and leaves the stored value and
    /// TTL as the first attempt wrote them.
    pub async fn completion_retry_keeps_the_first_value(store: &dyn Store) {
        let key = fresh_key();
        let (r, token) = claim_request(key, Duration::from_secs(30));
        store.claim(&r).await.expect("claim");
        store
            .complete(&key, token, b"first", Duration::from_secs(30))
            .await
            .expect("complete");
        store
            .complete(&key, token, b"second", Duration::from_secs(60))
            .await
            .expect("a retried completion under its own token is Ok");
        match store.get(&key).await.expect("get") {
            Some(RecordState::Completed(rec)) => {
                assert_eq!(&rec.value[..], b"first", "the retry changed the value");
                let left = rec.expires_in.expect("expires_in");
                assert!(
                    left <= Duration::from_secs(30),
                    "the retry changed the TTL: {left:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Another token is still fenced.
        assert!(matches!(
            store
                .complete(
                    &key,
                    idem_core::FencingToken::random(),
                    b"x",
                    Duration::from_secs(30)
                )
                .await,
            Err(idem_core::StoreError::Fenced)
        ));
    }

    /// A release under a foreign token, or of a completed record, answers Ok and changes
    /// nothing.
    pub async fn foreign_releases_change_nothing(store: &dyn Store) {
        let key = fresh_key();
        let (r, token) = claim_request(key, Duration::from_secs(30));
        store.claim(&r).await.expect("claim");
        store
            .release(&key, idem_core::FencingToken::random())
            .await
            .expect("a foreign release is Ok");
        assert!(matches!(
            store.get(&key).await.expect("get"),
            Some(RecordState::InProgress { token: t, .. }) if t == token
        ));
        store
            .complete(&key, token, b"v", Duration::from_secs(30))
            .await
            .expect("complete");
        store
            .release(&key, token)
            .await
            .expect("releasing a completed record is Ok");
        assert!(matches!(
            store.get(&key).await.expect("get"),
            Some(RecordState::Completed(_))
        ));
    }

    /// `testkit::renewal_failures_keep_the_lease`, with the duplicates starting only once
    /// the holder's body runs (the testkit case starts them at once, and on a store with a
    /// round trip a duplicate can claim before the holder does).
    pub async fn renewal_failures_keep_the_lease(store: Arc<dyn Store>) {
        let faulty = FaultyStore::new(store.clone());
        let ns: &'static str =
            Box::leak(format!("sql_common::renewal::{}", fresh_key()).into_boxed_str());
        let lease = Duration::from_millis(600);
        let runs = Arc::new(AtomicUsize::new(0));
        faulty.plan(Fault::FailBefore(Op::Renew));
        faulty.plan(Fault::FailBefore(Op::Renew));
        let holder = {
            let faulty = faulty.clone();
            let runs = runs.clone();
            tokio::spawn(async move {
                Call::new(ns)
                    .key("k")
                    .lease(lease)
                    .run(&faulty, async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(lease * 3).await;
                        Ok::<_, Error>(1u32)
                    })
                    .await
            })
        };
        let t = Instant::now();
        while runs.load(Ordering::SeqCst) == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the holder never ran"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let until = Instant::now() + lease * 3;
        while Instant::now() < until {
            let r: Result<u32, Error> = Call::new(ns)
                .key("k")
                .lease(lease)
                .on_conflict(OnConflict::Reject)
                .run(&*store, async { Ok(2) })
                .await;
            match r {
                Err(Error::InProgress { .. }) => {}
                Ok(1) => break,
                other => panic!("a duplicate got in while the holder lived: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(holder.await.expect("task").expect("holder"), 1);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(faulty.pending(), 0, "the planned renewal failures happened");
    }

    /// Every operation on a table that was never migrated fails with a `StoreError` whose
    /// message says to call `migrate()`, and the message names the table.
    pub async fn missing_table_says_to_migrate(store: &dyn Store, table: &str) {
        let key = fresh_key();
        let token = idem_core::FencingToken::random();
        let long = Duration::from_secs(30);
        let results: Vec<(&str, Result<(), idem_core::StoreError>)> = vec![
            (
                "claim",
                store.claim(&claim_request(key, long).0).await.map(drop),
            ),
            ("complete", store.complete(&key, token, b"v", long).await),
            ("release", store.release(&key, token).await),
            ("renew", store.renew(&key, token, long).await),
            ("get", store.get(&key).await.map(drop)),
            ("wait", store.wait(&key, long).await),
            ("remove", store.remove(&key).await),
        ];
        for (op, r) in results {
            match r {
                Err(e @ idem_core::StoreError::Backend { .. }) => {
                    let message = e.to_string();
                    assert!(
                        message.contains("migrate()") && message.contains(table),
                        "{op}: the error does not say to call migrate(): {message}"
                    );
                    assert!(std::error::Error::source(&e).is_some(), "{op}: no source");
                }
                other => panic!("{op} on a missing table: {other:?}"),
            }
        }
        // Through the runtime: Error::Store, and the body does not run.
        let ran = Arc::new(AtomicUsize::new(0));
        let body_ran = ran.clone();
        let r: Result<u32, Error> = Call::new("sql_common::missing_table")
            .key("k")
            .run(store, async move {
                body_ran.fetch_add(1, Ordering::SeqCst);
                Ok(1)
            })
            .await;
        assert_eq!(
            ran.load(Ordering::SeqCst),
            0,
            "the body ran without a table"
        );
        match r {
            Err(Error::Store(e)) => assert!(e.to_string().contains("migrate()"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    /// Runs every check above.
    pub async fn all(store: Arc<dyn Store>) {
        own_claim_restarts_the_lease(&*store).await;
        completion_retry_keeps_the_first_value(&*store).await;
        foreign_releases_change_nothing(&*store).await;
        renewal_failures_keep_the_lease(store).await;
    }
}
