use std::time::Duration;

use idem_core::{idempotent, Error};

#[idempotent(key = id, ttl = Duration::ZERO, lease = std::time::Duration::from_secs(0))]
async fn charge(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
