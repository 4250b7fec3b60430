//! Annotated functions compile under `#![deny(warnings)]` and clippy's pedantic group with
//! no lint from generated code (`cargo clippy -p idem-core --tests -- -D warnings` runs this
//! file under clippy); `dead_code` still fires on an unused annotated function (the
//! `dead_code` UI case).

#![deny(warnings, clippy::pedantic)]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use idem_core::{idempotent, Error};
use idem_stores::MemoryStore;
use serde::{Deserialize, Serialize};

/// A receipt.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The amount charged.
    pub amount: u64,
}

/// A request.
#[derive(Serialize)]
pub struct ChargeRequest {
    /// The client's key.
    pub idempotency_key: String,
    /// The amount.
    pub amount: u64,
}

/// A service.
pub struct Payments {
    store: Arc<MemoryStore>,
}

impl Payments {
    /// Every argument, on a method.
    ///
    /// # Errors
    ///
    /// Whatever idem reports.
    #[idempotent(
        key = req.idempotency_key.clone(),
        ttl = "24h",
        store = self.store,
        scope = tenant,
        namespace = "lint::charge",
        lease = "30s",
        on_conflict = wait,
        wait_timeout = "10s",
        errors = release,
        version = 1,
        missing_key = error,
        fail_open,
    )]
    pub async fn charge(&self, tenant: &str, req: ChargeRequest) -> Result<Receipt, Error> {
        Ok(Receipt { amount: req.amount })
    }

    /// A derived key, `Arc<Self>`, errors stored.
    ///
    /// # Errors
    ///
    /// Whatever idem reports.
    #[idempotent(store = self.store.clone(), errors = store, on_conflict = reject)]
    pub async fn refund(self: Arc<Self>, order: u64) -> Result<u64, Declined> {
        Ok(order)
    }
}

/// An error that can be stored.
#[derive(Debug, Serialize, Deserialize)]
pub enum Declined {
    /// From idem.
    Idem(String),
}

impl From<Error> for Declined {
    fn from(e: Error) -> Self {
        Declined::Idem(e.to_string())
    }
}

/// A free function on the default store, `impl Trait` skipped.
///
/// # Errors
///
/// Whatever idem reports.
#[idempotent(skip(log))]
pub async fn free(id: u64, log: impl std::fmt::Write + Send) -> Result<u64, Error> {
    drop(log);
    Ok(id)
}

#[tokio::test]
async fn lint_clean_functions_run() {
    let p = Arc::new(Payments {
        store: Arc::new(MemoryStore::new()),
    });
    let req = ChargeRequest {
        idempotency_key: "k".into(),
        amount: 3,
    };
    assert_eq!(p.charge("t", req).await.unwrap(), Receipt { amount: 3 });
    assert_eq!(p.refund(4).await.unwrap(), 4);
    assert!(
        free(1, String::new()).await.is_err(),
        "no default store here"
    );
}
