use idem_core::{idempotent, Error};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Receipt;

#[idempotent(skip(dbb))]
async fn charge(id: u64, db: String) -> Result<Receipt, Error> {
    let _ = (id, db);
    Ok(Receipt)
}

fn main() {}
