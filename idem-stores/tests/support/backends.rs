//! What backend tests need, for `idem_testkit::harness`: each server's probe (connects
//! with the store itself, so a server that does not answer or refuses the login is caught),
//! and the `redis-server` program for tests that start their own. Shared with the workspace's
//! tests/ (by `#[path]`), whose features of the same names turn the stores on.

#![allow(dead_code)]

use idem_testkit::harness::Need;

/// A server at `IDEM_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`).
#[cfg(feature = "redis")]
pub const REDIS: Need = Need::server("Redis", "IDEM_TEST_REDIS_URL", |url| {
    Box::pin(async move {
        idem_stores::RedisStore::connect(&url)
            .await
            .map(drop)
            .map_err(|e| reason(&e))
    })
});

/// A server at `IDEM_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`).
#[cfg(feature = "postgres")]
pub const POSTGRES: Need = Need::server("PostgreSQL", "IDEM_TEST_POSTGRES_URL", |url| {
    Box::pin(async move {
        idem_stores::PostgresStore::connect(&url)
            .await
            .map(drop)
            .map_err(|e| reason(&e))
    })
});

/// A server at `IDEM_TEST_MYSQL_URL` (default `mysql://root@127.0.0.1:3306/test`).
#[cfg(feature = "mysql")]
pub const MYSQL: Need = Need::server("MySQL", "IDEM_TEST_MYSQL_URL", |url| {
    Box::pin(async move {
        // `MySqlStore::connect` is lazy; the builder's `connect` pings.
        idem_stores::MySqlStore::builder()
            .url(url)
            .connect()
            .await
            .map(drop)
            .map_err(|e| reason(&e))
    })
});

/// A Valkey 8.0 server at `IDEM_TEST_VALKEY80_URL` (no default: `.ci/valkey` starts one).
#[cfg(feature = "redis")]
pub const VALKEY80: Need = Need::server("Valkey 8.0", "IDEM_TEST_VALKEY80_URL", |url| {
    Box::pin(async move {
        idem_stores::RedisStore::connect(&url)
            .await
            .map(drop)
            .map_err(|e| reason(&e))
    })
});

/// A Valkey 8.1 server at `IDEM_TEST_VALKEY81_URL` (no default: `.ci/valkey` starts one).
#[cfg(feature = "redis")]
pub const VALKEY81: Need = Need::server("Valkey 8.1", "IDEM_TEST_VALKEY81_URL", |url| {
    Box::pin(async move {
        idem_stores::RedisStore::connect(&url)
            .await
            .map(drop)
            .map_err(|e| reason(&e))
    })
});

/// The `valkey-server` 8.1 program named by `IDEM_TEST_VALKEY81_SERVER`, for tests that start
/// (and kill) Valkey servers of their own.
pub const VALKEY81_SERVER: Need = Need::server(
    "valkey-server 8.1",
    "IDEM_TEST_VALKEY81_SERVER",
    |program| {
        Box::pin(async move {
            match std::process::Command::new(&program)
                .arg("--version")
                .output()
            {
                Ok(out) if out.status.success() => Ok(()),
                Ok(out) => Err(format!("`{program} --version` exited with {}", out.status)),
                Err(e) => Err(format!("`{program}` does not run: {e}")),
            }
        })
    },
);

/// `redis-server` and `redis-cli`, for tests that start (and kill) servers of their own.
pub const REDIS_SERVER: Need = Need::programs("redis-server", &["redis-server", "redis-cli"]);

/// The error and its sources, on one line.
fn reason(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let more = inner.to_string();
        if !s.contains(&more) {
            s.push_str(": ");
            s.push_str(&more);
        }
        source = inner.source();
    }
    s
}
