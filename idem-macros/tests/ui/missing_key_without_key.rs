use idem_core::{idempotent, Error};

#[idempotent(missing_key = run)]
async fn charge(id: Option<u64>) -> Result<u64, Error> {
    Ok(id.unwrap_or_default())
}

fn main() {}
