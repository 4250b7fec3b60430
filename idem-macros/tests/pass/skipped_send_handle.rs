//! A skipped `Box<dyn Gateway + Send>` handle (not `Sync`), used by the body across an
//! await: the annotated call spawns on a multi-thread runtime.

use std::sync::Arc;

use idem_core::{idempotent, Error};
use idem_stores::MemoryStore;

pub trait Gateway {
    fn charge(&mut self, amount: u64) -> u64;
}

pub struct Card(u64);

impl Gateway for Card {
    fn charge(&mut self, amount: u64) -> u64 {
        self.0 += amount;
        self.0
    }
}

#[idempotent(key = order_id.clone(), store = store, skip(gateway))]
pub async fn pay(
    store: Arc<MemoryStore>,
    mut gateway: Box<dyn Gateway + Send>,
    order_id: String,
    amount: u64,
) -> Result<u64, Error> {
    tokio::task::yield_now().await;
    let total = gateway.charge(amount);
    tokio::task::yield_now().await;
    Ok(total + gateway.charge(0))
}

pub fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Arc::new(MemoryStore::new());
        let first = tokio::spawn(pay(store.clone(), Box::new(Card(0)), "o-1".into(), 5));
        assert_eq!(first.await.unwrap().unwrap(), 10);
        let again = tokio::spawn(pay(store, Box::new(Card(100)), "o-1".into(), 5));
        assert_eq!(again.await.unwrap().unwrap(), 10);
    });
}
