use idem_core::{idempotent, Error};
use idem_stores::MemoryStore;

#[idempotent(key = id, store = store, in_transaction = tx)]
async fn debit(store: &MemoryStore, tx: &mut String, id: u64) -> Result<u64, Error> {
    let _ = tx;
    Ok(id)
}

fn main() {}
