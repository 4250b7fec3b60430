//! `key = (req.a, req.b)` borrows the fields rather than moving them out of `req`, which the
//! body and the fingerprint still use.

use std::sync::Arc;

use idem_core::{idempotent, Error};
use idem_stores::MemoryStore;
use serde::Serialize;

#[derive(Serialize)]
pub struct Req {
    pub tenant: String,
    pub order: String,
    pub amount: u64,
}

#[idempotent(key = (req.tenant, req.order), store = store)]
pub async fn charge(store: Arc<MemoryStore>, req: Req) -> Result<String, Error> {
    tokio::task::yield_now().await;
    Ok(format!("{}/{}: {}", req.tenant, req.order, req.amount))
}

pub fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Arc::new(MemoryStore::new());
        let req = || Req {
            tenant: "acme".into(),
            order: "o-1".into(),
            amount: 5,
        };
        let first = tokio::spawn(charge(store.clone(), req()));
        assert_eq!(first.await.unwrap().unwrap(), "acme/o-1: 5");
        let again = tokio::spawn(charge(store, req()));
        assert_eq!(again.await.unwrap().unwrap(), "acme/o-1: 5");
    });
}
