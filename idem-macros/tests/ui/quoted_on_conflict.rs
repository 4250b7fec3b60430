use idem_core::{idempotent, Error};

#[idempotent(key = id, on_conflict = "reject")]
async fn charge(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
