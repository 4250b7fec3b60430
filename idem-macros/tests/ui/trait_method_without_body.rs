use idem_core::{idempotent, Error};

trait Billing {
    #[idempotent(key = id)]
    async fn charge(&self, id: u64) -> Result<u64, Error>;
}

fn main() {}
