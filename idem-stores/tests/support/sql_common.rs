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
            let sql = format!("DROP TABLE IF EXISTS \"{name}\"");
            let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
        }
    }
    pool.close().await;
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
