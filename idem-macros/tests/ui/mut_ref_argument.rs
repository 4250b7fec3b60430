// A replay skips the body, so a `&mut` out-parameter would silently stay unchanged.
use idem_core::{idempotent, Error};

#[idempotent(key = order_id)]
async fn collect(order_id: u64, out: &mut Vec<u64>) -> Result<(), Error> {
    out.push(order_id);
    Ok(())
}

fn main() {}
