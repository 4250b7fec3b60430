// A database handle in the fingerprint: the error says to skip it.
use idem_core::{idempotent, Error};

struct Db;

#[idempotent(key = order_id)]
async fn charge(db: &Db, order_id: u64) -> Result<u64, Error> {
    let _ = db;
    Ok(order_id)
}

fn main() {}
