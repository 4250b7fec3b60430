//! Annotated functions of every shape (free, `&self`, `&mut self`, `self: Arc<Self>`,
//! generic, lifetimes, `impl Trait`, patterns, `#[async_trait]`) compile under
//! `#![deny(warnings)]` and clippy's pedantic group with no lint from generated code (`cargo clippy -p idem-core --tests -- -D warnings` runs this
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

/// Every other shape: `&mut self`, a generic function, lifetimes, a destructuring pattern,
/// `store = <argument>` (skipped by itself), and an `#[async_trait]` impl whose argument is
/// used only by the key.
pub struct Ledger {
    store: Arc<MemoryStore>,
    entries: Vec<u64>,
}

impl Ledger {
    /// `&mut self`; the store is cloned out of `self`.
    ///
    /// # Errors
    ///
    /// Whatever idem reports.
    #[idempotent(key = entry, store = self.store.clone())]
    pub async fn append(&mut self, entry: u64) -> Result<usize, Error> {
        self.entries.push(entry);
        Ok(self.entries.len())
    }
}

/// A generic function with a borrowed argument and a lifetime.
///
/// # Errors
///
/// Whatever idem reports.
#[idempotent(key = (name, &id), store = store)]
pub async fn generic<'a, T: Serialize + Send + Sync>(
    store: &'a MemoryStore,
    name: &'a str,
    id: T,
) -> Result<String, Error> {
    Ok(name.to_owned())
}

/// A destructured argument (each binding is fingerprinted).
///
/// # Errors
///
/// Whatever idem reports.
#[idempotent(store = store)]
pub async fn pair(store: Arc<MemoryStore>, (a, b): (u64, u64)) -> Result<u64, Error> {
    Ok(a + b)
}

/// An owned argument used only by the key.
///
/// # Errors
///
/// Whatever idem reports.
#[idempotent(key = order, store = store)]
pub async fn by_key(store: &MemoryStore, order: String, amount: u64) -> Result<u64, Error> {
    Ok(amount)
}

/// A trait implemented with `#[async_trait]`.
#[idem_core::async_trait]
pub trait Billing {
    /// Charges `order` once.
    async fn bill(&self, order: String, amount: u64) -> Result<u64, Error>;
}

#[idem_core::async_trait]
impl Billing for Payments {
    #[idempotent(key = order, store = self.store)]
    async fn bill(&self, order: String, amount: u64) -> Result<u64, Error> {
        Ok(amount)
    }
}

#[tokio::test]
async fn every_shape_runs() {
    let store = Arc::new(MemoryStore::new());
    let mut ledger = Ledger {
        store: store.clone(),
        entries: Vec::new(),
    };
    assert_eq!(ledger.append(7).await.unwrap(), 1);
    assert_eq!(ledger.append(7).await.unwrap(), 1, "replayed");
    assert_eq!(generic(&store, "n", 1_u8).await.unwrap(), "n");
    assert_eq!(pair(store.clone(), (1, 2)).await.unwrap(), 3);
    assert_eq!(by_key(&store, "o-9".into(), 4).await.unwrap(), 4);
    let p = Payments { store };
    assert_eq!(p.bill("o-1".into(), 5).await.unwrap(), 5);
    assert_eq!(p.bill("o-1".into(), 5).await.unwrap(), 5);
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
