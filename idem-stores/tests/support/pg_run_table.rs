//! A PostgreSQL table of the test run (instead of the shared default `idem_records`): named
//! after the process that owns it (`idem_t<pid>_0_<what>`, so that `pg_drop_stale_tables`
//! recognises it if the run is killed), handed to child processes through the environment, and
//! dropped by the owner when its cases are done.
#![allow(dead_code)]

/// The variable through which a test hands its table to the child processes it starts.
pub const TABLE_VAR: &str = "IDEM_TEST_PG_TABLE";

/// The run's table: the parent's, in a child process; else this process's own.
pub fn run_table(what: &str) -> String {
    std::env::var(TABLE_VAR).unwrap_or_else(|_| format!("idem_t{}_0_{what}", std::process::id()))
}

/// Drops the run's table (and its steps table) from the process that owns it, on a runtime of
/// its own; nothing in a child, or without `IDEM_TEST_POSTGRES_URL`. Best effort.
pub fn drop_run_table_blocking(what: &str) {
    if std::env::var_os(TABLE_VAR).is_some() {
        return;
    }
    let Ok(url) = std::env::var("IDEM_TEST_POSTGRES_URL") else {
        return;
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let table = run_table(what);
    rt.block_on(async {
        let Ok(pool) = idem_stores::sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
        else {
            return;
        };
        let sql = format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_steps\"");
        let _ = idem_stores::sqlx::query(idem_stores::sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await;
        pool.close().await;
    });
}
