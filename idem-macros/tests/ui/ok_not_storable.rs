use idem_core::{idempotent, Error};

#[derive(Debug)]
struct Receipt;

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<Receipt, Error> {
    let _ = id;
    Ok(Receipt)
}

fn main() {}
