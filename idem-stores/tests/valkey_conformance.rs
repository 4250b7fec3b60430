//! The store conformance suite on `RedisStore` against Valkey: 8.0 (`IDEM_TEST_VALKEY80_URL`,
//! no `SET … IFEQ`: the Lua scripts), 8.1 (`IDEM_TEST_VALKEY81_URL`: the native path, detected),
//! and 8.1 with the scripts forced (`NativeCas::Never`). `.ci/valkey` installs and starts both
//! servers; the rest of the Redis suite runs on them in `.ci/run`.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;

use std::sync::Arc;

use idem_core::Store;
use idem_stores::redis::NativeCas;
use idem_stores::RedisStore;

async fn store(var: &str, native: NativeCas, expect_native: bool) -> Option<Arc<dyn Store>> {
    let url = idem_testkit::env_url(var)?;
    let store = RedisStore::builder(url)
        .prefix("idem-test-valkey:")
        .native_cas(native)
        .build()
        .await
        .unwrap_or_else(|e| panic!("connect to {var}: {e}"));
    assert_eq!(
        store.native_cas_active(),
        expect_native,
        "the path detected on {var} with {native:?}"
    );
    Some(Arc::new(store) as Arc<dyn Store>)
}

/// Valkey 8.0: no `SET … IFEQ`, so the scripts.
mod valkey80 {
    use super::*;
    idem_testkit::conformance_tests!(store("IDEM_TEST_VALKEY80_URL", NativeCas::Auto, false));
}

/// Valkey 8.1: the native path, detected.
mod valkey81_native {
    use super::*;
    idem_testkit::conformance_tests!(store("IDEM_TEST_VALKEY81_URL", NativeCas::Auto, true));
}

/// Valkey 8.1 with the scripts forced.
mod valkey81_scripts {
    use super::*;
    idem_testkit::conformance_tests!(store("IDEM_TEST_VALKEY81_URL", NativeCas::Never, false));
}

fn main() -> std::process::ExitCode {
    use backends::{VALKEY80, VALKEY81};
    idem_testkit::harness::run([
        valkey80::cases(&[VALKEY80]),
        valkey81_native::cases(&[VALKEY81]),
        valkey81_scripts::cases(&[VALKEY81]),
    ])
}
