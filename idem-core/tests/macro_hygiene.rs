//! The expansion's names do not clash with the user's: variables named like the macro's
//! internals, shadowed `core`/`std`/`Result`/`Duration`, a crate re-exporting idem under
//! another path (`crate = ..`).

#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::used_underscore_binding,
    dead_code
)]

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

use idem_core::idempotent;
use idem_stores::MemoryStore;

// Shadows of what generated code might name.
mod core {}
mod std_shadow {}
struct Duration;
struct Call;
type Result<T> = ::std::result::Result<T, idem_core::Error>;
#[allow(non_snake_case)]
fn module_path() -> &'static str {
    "shadowed"
}

/// A crate that re-exports idem under its own path.
mod my_framework {
    pub(crate) use ::idem_core as idem;
}

#[idempotent(key = (__idem_call, __idem_run), store = store, skip(store, runs))]
async fn internal_names(
    store: &MemoryStore,
    runs: &AtomicU32,
    __idem_call: u32,
    __idem_run: u32,
) -> Result<u32> {
    let __idem_store = __idem_call + __idem_run;
    runs.fetch_add(1, SeqCst);
    Ok(__idem_store)
}

#[idempotent(crate = crate::my_framework::idem, key = id, ttl = "1h", store = store, skip(store))]
async fn reexported(store: &MemoryStore, id: u32) -> Result<u32> {
    let _ = (Duration, Call, module_path());
    Ok(id)
}

#[tokio::test]
async fn user_names_and_shadows_do_not_break_the_expansion() {
    let (store, runs) = (MemoryStore::new(), AtomicU32::new(0));
    assert_eq!(internal_names(&store, &runs, 1, 2).await.unwrap(), 3);
    assert_eq!(internal_names(&store, &runs, 1, 2).await.unwrap(), 3);
    assert_eq!(internal_names(&store, &runs, 2, 1).await.unwrap(), 3);
    assert_eq!(runs.load(SeqCst), 2, "(1, 2) and (2, 1) are two keys");
    assert_eq!(reexported(&store, 7).await.unwrap(), 7);
}

mod shadowed_idem_core {
    // A local item named like the runtime crate: the expansion's `::idem_core` is absolute.
    #[allow(unused_imports)]
    use std as idem_core;

    #[super::idempotent(key = id, store = store, skip(store))]
    pub async fn f(store: &idem_stores::MemoryStore, id: u32) -> Result<u32, ::idem_core::Error> {
        Ok(id)
    }
}

#[tokio::test]
async fn a_local_idem_core_does_not_shadow_the_runtime() {
    let store = MemoryStore::new();
    assert_eq!(shadowed_idem_core::f(&store, 1).await.unwrap(), 1);
}
