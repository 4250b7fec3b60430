use idem_core::{idempotent, Error};

#[idempotent(key = order_idd)]
async fn charge(order_id: u64, amount: u64) -> Result<u64, Error> {
    Ok(order_id + amount)
}

fn main() {}
