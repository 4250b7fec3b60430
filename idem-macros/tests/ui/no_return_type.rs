use idem_core::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Receipt;

#[idempotent(key = id)]
async fn charge(id: u64) {
    let _ = id;
}

fn main() {}
