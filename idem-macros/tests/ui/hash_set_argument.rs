// serde writes a set in iteration order, so two equal `HashSet`s can hash differently and a
// retry would get `KeyReused`: the error suggests a `BTreeSet`, or `skip` with a `key`.
use std::collections::HashSet;

use idem_core::{idempotent, Error};

#[idempotent(key = order_id)]
async fn tag(order_id: u64, tags: &HashSet<String>) -> Result<usize, Error> {
    Ok(tags.len() + usize::try_from(order_id).unwrap_or_default())
}

fn main() {}
