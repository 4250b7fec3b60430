//! `errors = store` (a stored error, replayed) and a generic `Ok` type: the run goes through
//! the checks' values (`Storing`, `StoringErrors`), and the call still spawns on a
//! multi-thread runtime, with a `Send`-but-not-`Sync` argument.

use std::cell::Cell;
use std::sync::Arc;

use idem_core::{idempotent, Error};
use idem_stores::MemoryStore;
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum PayError {
    Declined(u64),
    Idem(String),
}

impl From<Error> for PayError {
    fn from(e: Error) -> Self {
        PayError::Idem(e.to_string())
    }
}

#[idempotent(key = order_id.clone(), store = store, errors = store)]
pub async fn decline(
    store: Arc<MemoryStore>,
    order_id: String,
    amount: Cell<u64>,
) -> Result<u64, PayError> {
    tokio::task::yield_now().await;
    amount.set(amount.get() + 1);
    Err(PayError::Declined(amount.get()))
}

#[idempotent(key = order_id.clone(), store = store, skip(value))]
pub async fn echo<T>(store: Arc<MemoryStore>, order_id: String, value: T) -> Result<T, Error>
where
    T: Serialize + serde::de::DeserializeOwned + Send,
{
    tokio::task::yield_now().await;
    Ok(value)
}

pub fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Arc::new(MemoryStore::new());
        let first = tokio::spawn(decline(store.clone(), "o-1".into(), Cell::new(41)));
        assert_eq!(first.await.unwrap(), Err(PayError::Declined(42)));
        // The stored error is replayed: the body does not run again.
        let again = tokio::spawn(decline(store.clone(), "o-1".into(), Cell::new(41)));
        assert_eq!(again.await.unwrap(), Err(PayError::Declined(42)));
        let value = tokio::spawn(echo(store.clone(), "o-2".into(), 7u32));
        assert_eq!(value.await.unwrap().unwrap(), 7);
        // `value` is skipped: a retry with another one replays the first.
        let replayed = tokio::spawn(echo(store, "o-2".into(), 8u32));
        assert_eq!(replayed.await.unwrap().unwrap(), 7);
    });
}
