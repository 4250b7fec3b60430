use idem_core::{idempotent, Error};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Receipt;

#[idempotent(key = id, ttl = "1h", ttl = "2h")]
async fn charge(id: u64) -> Result<Receipt, Error> {
    let _ = id;
    Ok(Receipt)
}

fn main() {}
