use idem_core::{idempotent, Error};

#[idempotent(key = id, shared)]
async fn charge(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
