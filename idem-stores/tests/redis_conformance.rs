//! The store conformance suite on `RedisStore`: against the server named by
//! `IDEM_TEST_REDIS_URL`, and against a three-master Redis Cluster started for this test.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/redis_keys.rs"]
mod redis_keys;
#[path = "support/redis_server.rs"]
mod redis_server;

/// This run's keys on the shared server: its own prefix, deleted when the cases are done.
static PREFIX: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| redis_keys::process_prefix("conformance"));

/// The suite against one server (`IDEM_TEST_REDIS_URL`, e.g. `redis://127.0.0.1:6379/`).
mod single {
    use std::sync::Arc;

    use idem_core::Store;
    use idem_stores::RedisStore;

    idem_testkit::conformance_tests!(async {
        let url = idem_testkit::env_url("IDEM_TEST_REDIS_URL")?;
        let store = RedisStore::builder(url)
            .prefix(crate::PREFIX.as_str())
            .build()
            .await
            .expect("connect to IDEM_TEST_REDIS_URL");
        Some(Arc::new(store) as Arc<dyn Store>)
    });
}

/// The suite against a real three-master Redis Cluster, started once for this test binary
/// and killed when it exits.
mod cluster {
    use std::sync::{Arc, OnceLock};

    use idem_core::Store;
    use idem_stores::RedisStore;

    use crate::redis_server::{available, RedisCluster};

    pub(super) static CLUSTER: OnceLock<Option<RedisCluster>> = OnceLock::new();

    idem_testkit::conformance_tests!(async {
        let cluster = CLUSTER
            .get_or_init(|| available().then(RedisCluster::start))
            .as_ref()?;
        let store = RedisStore::cluster_builder(cluster.urls())
            .build()
            .await
            .expect("connect to the test cluster");
        assert!(
            store.notifications_live(),
            "the subscriber connects to the cluster"
        );
        Some(Arc::new(store) as Arc<dyn Store>)
    });
}

/// The durable-steps cases against the same server.
mod single_steps {
    use std::sync::Arc;

    use idem_core::Store;
    use idem_stores::RedisStore;

    idem_testkit::step_conformance_tests!(async {
        let url = idem_testkit::env_url("IDEM_TEST_REDIS_URL")?;
        let store = RedisStore::builder(url)
            .prefix(crate::PREFIX.as_str())
            .build()
            .await
            .expect("connect to IDEM_TEST_REDIS_URL");
        Some(Arc::new(store) as Arc<dyn Store>)
    });
}

/// The durable-steps cases against the three-master cluster: a call's steps live in its
/// record's slot.
mod cluster_steps {
    use std::sync::Arc;

    use idem_core::Store;
    use idem_stores::RedisStore;

    use crate::redis_server::{available, RedisCluster};

    idem_testkit::step_conformance_tests!(async {
        let cluster = super::cluster::CLUSTER
            .get_or_init(|| available().then(RedisCluster::start))
            .as_ref()?;
        let store = RedisStore::cluster_builder(cluster.urls())
            .build()
            .await
            .expect("connect to the test cluster");
        Some(Arc::new(store) as Arc<dyn Store>)
    });
}

fn main() -> std::process::ExitCode {
    use backends::{REDIS, REDIS_SERVER};
    let code = idem_testkit::harness::run([
        single::cases(&[REDIS]),
        cluster::cases(&[REDIS_SERVER]),
        single_steps::cases(&[REDIS]),
        cluster_steps::cases(&[REDIS_SERVER]),
    ]);
    redis_keys::delete_prefix_blocking(std::env::var("IDEM_TEST_REDIS_URL").ok(), &PREFIX);
    code
}
