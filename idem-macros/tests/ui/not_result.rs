use idem_core::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Receipt;

#[idempotent(key = id)]
async fn charge(id: u64) -> Option<Receipt> {
    let _ = id;
    Some(Receipt)
}

fn main() {}
