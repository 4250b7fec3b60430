#[path = "support/db.rs"]
mod db;

use db::Db;
use idem_core::{idempotent, Error};

#[idempotent(key = id, store = store, transaction = tx, errors = store)]
async fn place(store: &Db, id: u64) -> Result<u64, Error> {
    let _ = tx;
    Ok(id)
}

fn main() {}
