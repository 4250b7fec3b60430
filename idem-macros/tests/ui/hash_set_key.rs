// A key that is a `HashSet` argument: skipping it from the fingerprint does not help.
use std::collections::HashSet;

use idem_core::{idempotent, Error};

#[idempotent(key = tags.clone(), skip(tags))]
async fn tag(tags: HashSet<String>) -> Result<usize, Error> {
    Ok(tags.len())
}

fn main() {}
