#![allow(missing_docs)]
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use idem_core::{idempotent, Error};
use idem_stores::MemoryStore;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Receipt {
    n: u32,
}

#[derive(Debug)]
enum PayError {
    Idem(Error),
}
impl From<Error> for PayError {
    fn from(e: Error) -> Self {
        PayError::Idem(e)
    }
}

#[derive(Serialize)]
struct Req {
    id: String,
    amount: u64,
}

struct Svc {
    store: Arc<MemoryStore>,
    runs: AtomicU32,
}

impl Svc {
    #[idempotent(key = req.id.clone(), ttl = "24h", store = self.store)]
    async fn charge(&self, req: Req) -> Result<Receipt, PayError> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        drop(req);
        Ok(Receipt { n })
    }
}

#[tokio::test]
async fn smoke() {
    let svc = Svc {
        store: Arc::new(MemoryStore::new()),
        runs: AtomicU32::new(0),
    };
    let a = svc
        .charge(Req {
            id: "k".into(),
            amount: 1,
        })
        .await
        .unwrap();
    let b = svc
        .charge(Req {
            id: "k".into(),
            amount: 1,
        })
        .await
        .unwrap();
    assert_eq!(a, b);
    assert!(matches!(
        svc.charge(Req {
            id: "k".into(),
            amount: 2
        })
        .await,
        Err(PayError::Idem(Error::KeyReused))
    ));
}
