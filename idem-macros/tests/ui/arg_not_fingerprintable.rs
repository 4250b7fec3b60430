use idem_core::{idempotent, Error};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Receipt;

struct Conn;

#[idempotent(key = id)]
async fn charge(id: u64, conn: &Conn) -> Result<Receipt, Error> {
    let _ = (id, conn);
    Ok(Receipt)
}

fn main() {}
