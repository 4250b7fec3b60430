// A generic return type without bounds: the message names the serde bounds to add.
use idem_core::{idempotent, Error};

#[idempotent(key = id)]
async fn fetch<T: Default>(id: u64) -> Result<T, Error> {
    let _ = id;
    Ok(T::default())
}

fn main() {}
