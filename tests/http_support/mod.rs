//! Shared by the `http_*` tests: the payments example on a loopback port, a real HTTP client,
//! and the stores to run against.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use idem_core::Store;

#[path = "../../examples/payments/app.rs"]
pub mod app;

// What the backend tests need (`idem_testkit::harness`): the probes of the stores'
// servers, shared with idem-stores' tests.
#[path = "../../idem-stores/tests/support/backends.rs"]
mod backends;

// The run's keys on the shared Redis: a prefix of the test process (its children get it
// through the environment), deleted by the test's `main` when its cases are done.
#[cfg(feature = "redis")]
#[path = "../../idem-stores/tests/support/redis_keys.rs"]
pub mod redis_keys;

// Likewise the run's PostgreSQL table.
#[cfg(feature = "postgres")]
#[path = "../../idem-stores/tests/support/pg_run_table.rs"]
pub mod pg_run_table;

/// The environment a child process needs to use the run's Redis keys and PostgreSQL table.
pub fn child_env() -> Vec<(&'static str, String)> {
    [
        #[cfg(feature = "redis")]
        (redis_keys::PREFIX_VAR, redis_keys::run_prefix("http")),
        #[cfg(feature = "postgres")]
        (pg_run_table::TABLE_VAR, pg_run_table::run_table("http")),
    ]
    .into_iter()
    .collect()
}

/// Deletes the run's Redis keys and drops its PostgreSQL table, in the process that owns them
/// (not in a child).
pub fn forget_run_data() {
    #[cfg(feature = "redis")]
    if redis_keys::owns_prefix() {
        redis_keys::delete_prefix_blocking(
            std::env::var("IDEM_TEST_REDIS_URL").ok(),
            &redis_keys::run_prefix("http"),
        );
    }
    #[cfg(feature = "postgres")]
    pg_run_table::drop_run_table_blocking("http");
}

#[cfg(feature = "postgres")]
#[allow(unused_imports)]
pub use backends::POSTGRES;
#[cfg(feature = "redis")]
#[allow(unused_imports)]
pub use backends::REDIS;

/// Without the `redis` feature, the Redis variants are reported as ignored.
#[cfg(not(feature = "redis"))]
pub const REDIS: idem_testkit::harness::Need =
    idem_testkit::harness::Need::disabled("Redis", "this build lacks `--features http,redis`");

/// Without the `postgres` feature, the PostgreSQL variants are reported as ignored.
#[cfg(not(feature = "postgres"))]
pub const POSTGRES: idem_testkit::harness::Need = idem_testkit::harness::Need::disabled(
    "PostgreSQL",
    "this build lacks `--features http,postgres`",
);

pub use app::{AppOptions, Stats};

/// The example service, running on 127.0.0.1 on a port of its own.
pub struct Server {
    pub base: String,
    pub client: reqwest::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub async fn start(store: Arc<dyn Store>, options: AppOptions) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = app::router(store, options);
        let task = tokio::spawn(async move {
            let _ = app::serve(listener, router).await;
        });
        Server {
            base: format!("http://{addr}"),
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(32)
                .build()
                .unwrap(),
            task,
        }
    }

    /// `POST /payments` as `tenant`, with `key` as the raw `Idempotency-Key` header value.
    pub fn pay(
        &self,
        tenant: &str,
        key: Option<&str>,
        body: serde_json::Value,
    ) -> reqwest::RequestBuilder {
        let mut req = self
            .client
            .post(format!("{}/payments", self.base))
            .header("authorization", format!("Bearer {tenant}"))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        req
    }

    pub async fn stats(&self) -> Stats {
        let resp = self
            .client
            .get(format!("{}/stats", self.base))
            .header("authorization", "Bearer admin")
            .send()
            .await
            .unwrap();
        serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
    }
}

/// A quoted key no other test, run or process uses (the remote stores are shared).
pub fn fresh_key(tag: &str) -> String {
    format!("\"{tag}-{:x}\"", idem_core::FencingToken::random().0)
}

pub fn is_replayed(resp: &reqwest::Response) -> bool {
    resp.headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

/// A problem document's members, checking the media type.
pub async fn problem(resp: reqwest::Response) -> serde_json::Value {
    assert_eq!(
        resp.headers()["content-type"],
        "application/problem+json",
        "a problem document"
    );
    let doc: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    for member in ["type", "title", "detail"] {
        assert!(doc[member].is_string(), "problem without `{member}`: {doc}");
    }
    doc
}

pub fn options(on_conflict: idem_core::OnConflict) -> AppOptions {
    AppOptions {
        on_conflict,
        wait_timeout: Duration::from_secs(10),
        lease: Duration::from_millis(500),
    }
}

// ---- stores -------------------------------------------------------------------------------

pub fn memory_store() -> Option<Arc<dyn Store>> {
    Some(Arc::new(idem_stores::MemoryStore::new()))
}

fn url_from_env(var: &str, feature_on: bool, feature: &str) -> Option<String> {
    let Ok(url) = std::env::var(var) else {
        println!("skipped: {var} is not set");
        return None;
    };
    if !feature_on {
        println!("skipped: {var} is set but this build lacks `--features http,{feature}`");
        return None;
    }
    Some(url)
}

#[cfg(feature = "redis")]
pub async fn redis_store() -> Option<Arc<dyn Store>> {
    let url = url_from_env("IDEM_TEST_REDIS_URL", true, "redis")?;
    // Reachability failures fail the test (in CI and out): the variable says a server is there.
    let store = idem_stores::RedisStore::builder(url.as_str())
        .prefix(redis_keys::run_prefix("http"))
        .build()
        .await
        .unwrap_or_else(|e| panic!("IDEM_TEST_REDIS_URL={url} is set but Redis fails: {e}"));
    Some(Arc::new(store))
}

#[cfg(not(feature = "redis"))]
pub async fn redis_store() -> Option<Arc<dyn Store>> {
    url_from_env("IDEM_TEST_REDIS_URL", false, "redis").and(None)
}

#[cfg(feature = "postgres")]
pub async fn postgres_store() -> Option<Arc<dyn Store>> {
    let url = url_from_env("IDEM_TEST_POSTGRES_URL", true, "postgres")?;
    // A small pool: every test has a store of its own, and they run side by side.
    let store = idem_stores::sql::postgres::PostgresStore::builder()
        .url(url.as_str())
        .table(pg_run_table::run_table("http"))
        .max_connections(4)
        .connect()
        .await
        .unwrap_or_else(|e| {
            panic!("IDEM_TEST_POSTGRES_URL={url} is set but PostgreSQL fails: {e}")
        });
    store.migrate().await.unwrap();
    Some(Arc::new(store))
}

#[cfg(not(feature = "postgres"))]
pub async fn postgres_store() -> Option<Arc<dyn Store>> {
    url_from_env("IDEM_TEST_POSTGRES_URL", false, "postgres").and(None)
}

/// One test per case and store, for `idem_testkit::harness::run`: `mod memory`,
/// `mod redis`, `mod postgres`, each with `cases()`. A case is
/// `async fn case(store: Arc<dyn Store>)` in the calling module.
#[allow(unused_macros)]
macro_rules! per_store {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                async fn $case() {
                    let Some(store) = super::http_support::memory_store() else {
                        panic!("no memory store");
                    };
                    super::$case(store).await;
                }
            )*

            pub fn cases() -> Vec<idem_testkit::harness::Case> {
                idem_testkit::test_cases!([], multi_thread(2); $($case),*)
            }
        }
        mod redis {
            $(
                async fn $case() {
                    let Some(store) = super::http_support::redis_store().await else {
                        panic!("no Redis store");
                    };
                    super::$case(store).await;
                }
            )*

            pub fn cases() -> Vec<idem_testkit::harness::Case> {
                idem_testkit::test_cases!([super::http_support::REDIS], multi_thread(2); $($case),*)
            }
        }
        mod postgres {
            $(
                async fn $case() {
                    let Some(store) = super::http_support::postgres_store().await else {
                        panic!("no PostgreSQL store");
                    };
                    super::$case(store).await;
                }
            )*

            pub fn cases() -> Vec<idem_testkit::harness::Case> {
                idem_testkit::test_cases!(
                    [super::http_support::POSTGRES], multi_thread(2); $($case),*
                )
            }
        }
    };
}
