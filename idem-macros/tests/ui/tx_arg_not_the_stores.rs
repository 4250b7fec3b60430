#[path = "support/db.rs"]
mod db;

use db::Db;
use idem_core::{idempotent, Error};

// A `&mut` of a type that is not the store's transaction (`Db`'s is `DbTx`).
#[idempotent(key = id, store = store, in_transaction = tx)]
async fn debit(store: &Db, tx: &mut String, id: u64) -> Result<u64, Error> {
    let _ = tx;
    Ok(id)
}

fn main() {}
