//! Quickstart: a payment function made idempotent on the in-memory store.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! A client retries a charge (a timeout, a dropped connection), sends ten concurrent
//! duplicates, and then reuses the key for another amount. The card is charged once.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idempo::idempotent;
use idempo::MemoryStore;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Receipt {
    charge_id: u32,
    amount_cents: u64,
}

#[derive(Debug)]
enum PaymentError {
    Idempotency(idempo::Error),
}

impl From<idempo::Error> for PaymentError {
    fn from(e: idempo::Error) -> Self {
        PaymentError::Idempotency(e)
    }
}

impl std::fmt::Display for PaymentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PaymentError::Idempotency(e) => write!(f, "{e}"),
        }
    }
}

struct Payments {
    store: Arc<MemoryStore>,
    charges_made: AtomicU32,
}

impl Payments {
    /// Charges a card once per idempotency key, whatever the client retries. The key is the
    /// client's; the amount is fingerprinted, so the same key with another amount is refused.
    #[idempotent(key = idempotency_key, ttl = "24h", store = self.store)]
    async fn charge(
        &self,
        idempotency_key: &str,
        amount_cents: u64,
    ) -> Result<Receipt, PaymentError> {
        // The side effect: slow, and it must happen once.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let charge_id = self.charges_made.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Receipt {
            charge_id,
            amount_cents,
        })
    }
}

#[tokio::main]
async fn main() {
    let payments = Arc::new(Payments {
        store: Arc::new(MemoryStore::new()),
        charges_made: AtomicU32::new(0),
    });

    let first = payments.charge("order-1001", 4_999).await;
    println!("first call:            {first:?}");
    let retry = payments.charge("order-1001", 4_999).await;
    println!("retry (replayed):      {retry:?}");

    let calls: Vec<_> = (0..10)
        .map(|_| {
            let p = payments.clone();
            tokio::spawn(async move { p.charge("order-1002", 1_250).await })
        })
        .collect();
    let mut receipts = Vec::new();
    for c in calls {
        match c.await {
            Ok(Ok(r)) => receipts.push(r),
            Ok(Err(e)) => println!("duplicate failed:      {e}"),
            Err(e) => println!("task failed:           {e}"),
        }
    }
    let all_equal = receipts.windows(2).all(|w| w[0] == w[1]);
    println!(
        "10 concurrent calls:   {} receipts, all equal: {all_equal}, first {:?}",
        receipts.len(),
        receipts.first()
    );

    match payments.charge("order-1001", 9_999).await {
        Err(e) => println!("same key, new amount:  rejected: {e}"),
        Ok(r) => println!("same key, new amount:  UNEXPECTED {r:?}"),
    }

    println!(
        "cards charged:         {} (2 orders, 13 calls)",
        payments.charges_made.load(Ordering::SeqCst)
    );
    for (outcome, n) in idempo::counters() {
        if n > 0 {
            println!("  outcome {:<20} {n}", outcome.as_str());
        }
    }
}
