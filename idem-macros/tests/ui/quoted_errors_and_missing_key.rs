use idem_core::{idempotent, Error};

#[idempotent(key = Some(id), errors = "release", missing_key = "run")]
async fn charge(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
