use idem_core::{idempotent, Error};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Receipt;

#[idempotent(key = id, tll = "24h")]
async fn charge(id: u64) -> Result<Receipt, Error> {
    let _ = id;
    Ok(Receipt)
}

fn main() {}
