//! Durable steps: a checkout of three steps, interrupted and resumed.
//!
//! ```text
//! cargo run --example checkout
//! ```
//!
//! `checkout` inserts an order, charges the card and sends a confirmation email, each in a
//! durable step. The first attempt fails at the email (the mail service is down): the order
//! and the charge are recorded, the call fails, and the client retries. The retry resumes at
//! the email: the order is not inserted twice and the card is not charged twice. A second
//! order's process "crashes" inside the email step (its future is dropped): the email step is
//! at most once, so the retry does not send it blindly; its reconcile hook asks the mail
//! service whether it saw the step's key.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idempo::{idempotent, step, step_key, Key, MemoryStore};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Receipt {
    order_id: u32,
    charge_id: String,
    emailed: bool,
}

#[derive(Debug)]
enum ShopError {
    MailDown,
    /// `step_key()` outside a step (a programming error).
    NoStepKey,
    Idempotency(idempo::Error),
}

impl std::fmt::Display for ShopError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShopError::MailDown => f.write_str("the mail service is down"),
            ShopError::NoStepKey => f.write_str("step_key() outside a step"),
            ShopError::Idempotency(e) => write!(f, "{e}"),
        }
    }
}

/// The key of the running step, for the downstream service.
fn key() -> Result<Key, ShopError> {
    step_key().ok_or(ShopError::NoStepKey)
}

impl From<idempo::Error> for ShopError {
    fn from(e: idempo::Error) -> Self {
        ShopError::Idempotency(e)
    }
}

/// A payment gateway that deduplicates charges by the idempotency key it is given.
#[derive(Default)]
struct Gateway {
    seen: Mutex<HashSet<Key>>,
    charged: AtomicU32,
}

impl Gateway {
    async fn charge(&self, amount: u64, key: Key) -> String {
        if self
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key)
        {
            self.charged.fetch_add(1, Ordering::SeqCst);
        }
        format!("ch_{}_{amount}", &key.to_hex()[..8])
    }
}

/// A mail service that is down when told to be, and remembers the keys it sent under.
#[derive(Default)]
struct Mailer {
    down: AtomicBool,
    /// The next send hangs forever (the process dies while it waits).
    hang: AtomicBool,
    sent: Mutex<Vec<Key>>,
}

impl Mailer {
    async fn send(&self, key: Key) -> Result<(), ShopError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(ShopError::MailDown);
        }
        self.sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(key);
        if self.hang.swap(false, Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    fn saw(&self, key: Key) -> bool {
        self.sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&key)
    }
}

struct Shop {
    store: Arc<MemoryStore>,
    orders: Mutex<Vec<u32>>,
    gateway: Gateway,
    mail: Mailer,
}

impl Shop {
    #[idempotent(key = order_id, ttl = "72h", lease = "1s", store = self.store)]
    async fn checkout(&self, order_id: u32, amount: u64) -> Result<Receipt, ShopError> {
        let order_id = step("order.insert", async {
            self.orders
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(order_id);
            Ok::<_, ShopError>(order_id)
        })
        .await?;
        let charge_id = step("charge", async {
            // The gateway deduplicates on this key if the step runs again after a crash.
            let key = key()?;
            Ok::<_, ShopError>(self.gateway.charge(amount, key).await)
        })
        .await?;
        let emailed = step("email", async {
            let key = key()?;
            self.mail.send(key).await.map(|()| true)
        })
        .at_most_once()
        // Started by an execution that died: ask the mail service what happened.
        .on_in_doubt(|| async {
            let key = key()?;
            Ok(self.mail.saw(key))
        })
        .await?;
        Ok(Receipt {
            order_id,
            charge_id,
            emailed,
        })
    }

    fn report(&self, what: &str) {
        let orders = self.orders.lock().unwrap_or_else(|e| e.into_inner()).len();
        let mails = self
            .mail
            .sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        println!(
            "  {what}: {orders} order row(s), {} charge(s), {mails} email(s)",
            self.gateway.charged.load(Ordering::SeqCst)
        );
    }
}

#[tokio::main]
async fn main() {
    let shop = Shop {
        store: Arc::new(MemoryStore::new()),
        orders: Mutex::new(Vec::new()),
        gateway: Gateway::default(),
        mail: Mailer::default(),
    };

    println!("order 1: the mail service is down on the first attempt");
    shop.mail.down.store(true, Ordering::SeqCst);
    match shop.checkout(1, 1999).await {
        Err(ShopError::MailDown) => println!("  attempt 1 failed at the email step"),
        Err(e) => println!("  attempt 1 failed: {e}"),
        Ok(receipt) => println!("  attempt 1: unexpected {receipt:?}"),
    }
    shop.report("after attempt 1");
    shop.mail.down.store(false, Ordering::SeqCst);
    match shop.checkout(1, 1999).await {
        Ok(receipt) => println!("  attempt 2 resumed at the email: {receipt:?}"),
        Err(e) => println!("  attempt 2 failed: {e}"),
    }
    shop.report("after attempt 2");
    let _ = shop.checkout(1, 1999).await; // a replay: no step runs
    shop.report("after a replay");

    println!("order 2: the process dies inside the email step");
    shop.mail.hang.store(true, Ordering::SeqCst);
    let cut = tokio::time::timeout(Duration::from_millis(100), shop.checkout(2, 500)).await;
    if cut.is_err() {
        println!("  attempt 1 was cut short after the mail service accepted the email");
    }
    shop.report("after the crash");
    match shop.checkout(2, 500).await {
        Ok(receipt) => println!("  the retry reconciled the email step: {receipt:?}"),
        Err(e) => println!("  the retry failed: {e}"),
    }
    shop.report("after the retry");

    let orders = shop.orders.lock().unwrap_or_else(|e| e.into_inner()).len();
    let mails = shop
        .mail
        .sent
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .len();
    assert_eq!(orders, 2, "each order inserted once");
    assert_eq!(
        shop.gateway.charged.load(Ordering::SeqCst),
        2,
        "each card charged once"
    );
    assert_eq!(mails, 2, "each email sent once");
}
