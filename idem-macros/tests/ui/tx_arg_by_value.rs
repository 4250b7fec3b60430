#[path = "support/db.rs"]
mod db;

use db::{Db, DbTx};
use idem_core::{idempotent, Error};

// The caller's transaction by value: the body could not hand it back to be committed.
#[idempotent(key = id, store = store, in_transaction = tx)]
async fn debit(store: &Db, tx: DbTx, id: u64) -> Result<u64, Error> {
    let _ = tx;
    Ok(id)
}

fn main() {}
