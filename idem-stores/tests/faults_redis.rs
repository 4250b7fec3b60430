//! The fault scenarios of issue 10 on Redis (`IDEM_TEST_REDIS_URL`), through a loopback proxy:
//! see `support/fault_scenarios.rs` for what each one does and asserts.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/fault_scenarios.rs"]
mod fault_scenarios;
#[path = "support/proxy.rs"]
mod proxy;

use std::sync::Arc;

use fault_scenarios::Rig;
use idem_core::Store;
use idem_stores::RedisStore;
use proxy::Proxy;

/// The one place that builds the store (its builder may change).
async fn store(url: &str, prefix: &str) -> Arc<dyn Store> {
    Arc::new(
        RedisStore::builder(url)
            .prefix(prefix)
            .build()
            .await
            .expect("connect to Redis"),
    )
}

async fn rig() -> Option<Rig> {
    let url = idem_testkit::env_url("IDEM_TEST_REDIS_URL")?;
    let prefix = format!(
        "idem-faults:{}-{}:",
        std::process::id(),
        idem_core::FencingToken::random().0 % 1_000_000
    );
    let proxy = Proxy::for_url(&url).await;
    let holder = store(&proxy.url(&url), &prefix).await;
    let rival = store(&url, &prefix).await;
    let teardown = async move {
        // Delete this rig's records (they would expire anyway).
        let Ok(client) = redis::Client::open(url.as_str()) else {
            return;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
        }
    };
    Some(Rig::new("redis", proxy, holder, rival, teardown))
}

fault_scenarios!(rig);

fn main() -> std::process::ExitCode {
    idem_testkit::harness::run([cases(&[backends::REDIS])])
}
