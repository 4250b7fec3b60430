use idem_core::{idempotent, Error};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Receipt;

#[derive(Debug)]
struct PayError;

impl From<Error> for PayError {
    fn from(_: Error) -> Self {
        PayError
    }
}

#[idempotent(key = id, errors = store)]
async fn charge(id: u64) -> Result<Receipt, PayError> {
    let _ = id;
    Ok(Receipt)
}

fn main() {}
