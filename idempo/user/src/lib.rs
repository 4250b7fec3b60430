//! An application that depends on `idempo` alone (no idem-core, idem-stores or idem-macros in
//! its `Cargo.toml`): the attribute's expansion resolves through `::idempo`, the stores and the
//! runtime are reachable under `idempo::`, and `crate = ..` still names a re-exporting path.
//! If the expansion named `::idem_core`, this crate would not compile.
#![cfg(test)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};

use idempo::{idempotent, Error, MemoryStore};

static RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = id, store = store)]
async fn charge(store: &MemoryStore, id: &str, amount: u64) -> Result<u64, Error> {
    RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(amount * 2)
}

/// A framework that re-exports idempo under its own path.
mod framework {
    pub use ::idempo as idem;
}

#[framework::idem::idempotent(crate = crate::framework::idem, key = id, store = store)]
async fn refund(store: &MemoryStore, id: u32) -> Result<u32, Error> {
    Ok(id + 1)
}

struct Payments {
    store: MemoryStore,
}

impl Payments {
    #[idempotent(key = id.to_owned(), ttl = "1h", store = self.store)]
    async fn capture(&self, id: &str) -> Result<String, Error> {
        Ok(format!("captured {id}"))
    }
}

#[tokio::test]
async fn the_attribute_runs_through_the_facade() {
    let store = MemoryStore::new();
    assert_eq!(charge(&store, "a", 21).await.unwrap(), 42);
    assert_eq!(charge(&store, "a", 21).await.unwrap(), 42);
    assert_eq!(RUNS.load(Ordering::SeqCst), 1, "the repeat was replayed");
    assert!(matches!(
        charge(&store, "a", 22).await,
        Err(Error::KeyReused)
    ));
    assert_eq!(refund(&store, 1).await.unwrap(), 2);
    let p = Payments { store };
    assert_eq!(p.capture("x").await.unwrap(), "captured x");
}

#[tokio::test]
async fn a_call_built_by_hand_through_the_facade() {
    let store = MemoryStore::new();
    let v = idempo::Call::new("facade::by_hand")
        .key("k")
        .run(&store, async { Ok::<_, Error>(7u8) })
        .await
        .unwrap();
    assert_eq!(v, 7);
}
