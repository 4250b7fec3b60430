// A generic argument with no `Serialize` bound: idem's message, not a suggestion to bound
// `P` on serde's private path.
use idem_core::{idempotent, Error};

#[idempotent]
async fn send<P>(user_id: u64, payload: P) -> Result<u64, Error> {
    drop(payload);
    Ok(user_id)
}

fn main() {}
