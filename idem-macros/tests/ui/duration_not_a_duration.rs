use idem_core::{idempotent, Error};

#[idempotent(key = id, ttl = 30, store = idem_stores::MemoryStore::new())]
async fn charge(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
