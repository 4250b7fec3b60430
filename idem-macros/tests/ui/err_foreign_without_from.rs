// An error type of another crate cannot get `From<idem_core::Error>` here (the orphan
// rule): the message suggests a wrapper enum instead.
use idem_core::idempotent;

#[idempotent(key = id)]
async fn read(id: u64) -> Result<u64, std::io::Error> {
    Ok(id)
}

fn main() {}
