use idem_core::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Receipt;

#[derive(Debug)]
struct PayError;

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<Receipt, PayError> {
    let _ = id;
    Ok(Receipt)
}

fn main() {}
