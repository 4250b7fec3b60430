#![deny(dead_code)]
use idem_core::{idempotent, Error};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Receipt;

#[idempotent(key = id, store = idem_stores::MemoryStore::new())]
async fn never_called(id: u64) -> Result<Receipt, Error> {
    let _ = id;
    Ok(Receipt)
}

fn main() {
    let _ = Receipt;
}
