use idem_core::{idempotent, Error};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Receipt;

#[idempotent(key = id)]
async fn charge(id: u64, log: impl std::fmt::Write) -> Result<Receipt, Error> {
    let _ = (id, log);
    Ok(Receipt)
}

fn main() {}
