use idem_core::{idempotent, Error};
use idem_stores::MemoryStore;

#[idempotent(key = id, store = store, transaction = tx)]
async fn place(store: &MemoryStore, id: u64) -> Result<u64, Error> {
    let _ = tx;
    Ok(id)
}

fn main() {}
