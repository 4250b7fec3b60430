// `errors = store` stores the `Err` value; `idem_core::Error` is not storable.
use idem_core::{idempotent, Error};

#[idempotent(key = id, errors = store)]
async fn charge(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
