#[path = "support/db.rs"]
mod db;

use db::{Db, DbTx};
use idem_core::{idempotent, Error};

#[idempotent(key = id, store = store, transaction = own, in_transaction = tx)]
async fn debit(store: &Db, tx: &mut DbTx, id: u64) -> Result<u64, Error> {
    let _ = tx;
    Ok(id)
}

fn main() {}
