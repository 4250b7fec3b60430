//! A `Send`-but-not-`Sync` argument (`Cell`), fingerprinted and read by the body across an
//! await: the annotated call spawns on a multi-thread runtime, as the plain function would.

use std::cell::Cell;
use std::sync::Arc;

use idem_core::{idempotent, Error};
use idem_stores::MemoryStore;

#[idempotent(key = order_id.clone(), store = store)]
pub async fn charge(
    store: Arc<MemoryStore>,
    order_id: String,
    amount: Cell<u64>,
) -> Result<u64, Error> {
    tokio::task::yield_now().await;
    amount.set(amount.get() + 1);
    tokio::task::yield_now().await;
    Ok(amount.get())
}

pub fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Arc::new(MemoryStore::new());
        let first = tokio::spawn(charge(store.clone(), "o-1".into(), Cell::new(41)));
        assert_eq!(first.await.unwrap().unwrap(), 42);
        let again = tokio::spawn(charge(store, "o-1".into(), Cell::new(41)));
        assert_eq!(again.await.unwrap().unwrap(), 42);
    });
}
