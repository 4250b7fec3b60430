use idem_core::{idempotent, Error};

#[idempotent(key = id, transaction = tx)]
async fn place(id: u64) -> Result<u64, Error> {
    let _ = tx;
    Ok(id)
}

fn main() {}
