use idem_core::{idempotent, Error};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Receipt;

#[idempotent(key = id, ttl = "1 day", colour = blue, skip(nope))]
async fn charge(id: u64) -> Result<Receipt, Error> {
    let _ = id;
    Ok(Receipt)
}

fn main() {
    // The function is still emitted after the errors: no "cannot find function" here.
    let _ = charge(1);
}
