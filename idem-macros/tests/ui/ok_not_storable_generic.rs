use idem_core::{idempotent, Error};
use serde::Serialize;

#[derive(Debug, Serialize)]
struct Line;

#[idempotent(key = id)]
async fn lines(id: u64) -> Result<Vec<Line>, Error> {
    let _ = id;
    Ok(vec![Line])
}

fn main() {}
