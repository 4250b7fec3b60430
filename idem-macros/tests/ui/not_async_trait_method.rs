// A trait method that is not `async`: the fix is in the trait (or `#[async_trait]`), which
// the message says.
use idem_core::{idempotent, Error};

trait Gateway {
    fn pay(&self, id: u64) -> Result<u64, Error>;
}

struct Stripe;

impl Gateway for Stripe {
    #[idempotent(key = id)]
    fn pay(&self, id: u64) -> Result<u64, Error> {
        Ok(id)
    }
}

fn main() {}
