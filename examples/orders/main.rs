//! Orders: exactly-once order placement on PostgreSQL, in one transaction.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/app cargo run --example orders --features postgres
//! ```
//!
//! (`IDEM_TEST_POSTGRES_URL` is read too; with neither set the example says so and exits.)
//!
//! `place_order` inserts an order row and an outbox row (the event a relay will publish) in
//! the transaction idem opens for the call; idem writes the idempotency record into the same
//! transaction and commits the three together. A client that retries after a timeout, or
//! sends duplicates at the same moment, gets the first order back; a crash anywhere before the
//! commit leaves no order, no event and no record, and the retry runs on a clean slate. A
//! failing order (out of stock) rolls back and leaves the key free for a retry.
//!
//! The second half shows `run_within`: the caller opens the transaction (here to also
//! debit a customer's credit) and commits it; the order and its record commit with it.
//!
//! The example creates its tables (`idem_example_*`) and drops them at the end.

use std::sync::Arc;

use idempo::sqlx::{self, AssertSqlSafe};
use idempo::Call;
use idempo::{PgTx, PostgresStore};
use serde::{Deserialize, Serialize};

const RECORDS: &str = "idem_example_records";
const ORDERS: &str = "idem_example_orders";
const OUTBOX: &str = "idem_example_outbox";
const CREDIT: &str = "idem_example_credit";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct PlaceOrder {
    customer: String,
    sku: String,
    quantity: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Receipt {
    order_id: i64,
    event_id: i64,
}

#[derive(Debug)]
enum OrderError {
    OutOfStock(String),
    Db(sqlx::Error),
    Idempotency(idempo::Error),
}

impl From<idempo::Error> for OrderError {
    fn from(e: idempo::Error) -> Self {
        OrderError::Idempotency(e)
    }
}

impl From<sqlx::Error> for OrderError {
    fn from(e: sqlx::Error) -> Self {
        OrderError::Db(e)
    }
}

impl std::fmt::Display for OrderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OrderError::OutOfStock(sku) => write!(f, "{sku} is out of stock"),
            OrderError::Db(e) => write!(f, "database: {e}"),
            OrderError::Idempotency(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for OrderError {}

struct Orders {
    store: PostgresStore,
}

impl Orders {
    /// The order row and its outbox event, written in one transaction with the idempotency
    /// record. The request's content is fingerprinted: the same key with another order is
    /// `KeyReused`, never someone else's receipt.
    async fn place_order(&self, key: &str, req: &PlaceOrder) -> Result<Receipt, OrderError> {
        Call::new("orders::place_order")
            .key(key)
            .fingerprint(req)
            .run_in_transaction(&self.store, async |tx: &mut PgTx| {
                insert_order(tx, req).await
            })
            .await
    }

    /// The same, inside a transaction the caller owns: idem claims the key, runs the body
    /// and writes the record into `tx`; the caller commits (or rolls back) everything.
    async fn place_order_within(
        &self,
        tx: &mut PgTx,
        key: &str,
        req: &PlaceOrder,
    ) -> Result<Receipt, OrderError> {
        Call::new("orders::place_order")
            .key(key)
            .fingerprint(req)
            .run_within(&self.store, tx, async |tx: &mut PgTx| {
                insert_order(tx, req).await
            })
            .await
    }
}

/// The body: plain sqlx statements on the transaction.
async fn insert_order(tx: &mut PgTx, req: &PlaceOrder) -> Result<Receipt, OrderError> {
    if req.sku == "sold-out" {
        return Err(OrderError::OutOfStock(req.sku.clone()));
    }
    let order_id: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "INSERT INTO {ORDERS} (customer, sku, quantity) VALUES ($1, $2, $3) RETURNING id"
    )))
    .bind(&req.customer)
    .bind(&req.sku)
    .bind(req.quantity)
    .fetch_one(&mut **tx)
    .await?;
    let payload = format!(
        r#"{{"order_id":{order_id},"customer":{:?},"sku":{:?},"quantity":{}}}"#,
        req.customer, req.sku, req.quantity
    );
    let event_id: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "INSERT INTO {OUTBOX} (topic, payload) VALUES ('order.placed', $1) RETURNING id"
    )))
    .bind(payload)
    .fetch_one(&mut **tx)
    .await?;
    Ok(Receipt { order_id, event_id })
}

async fn count(store: &PostgresStore, table: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(store.pool())
        .await
}

async fn setup(store: &PostgresStore) -> Result<(), Box<dyn std::error::Error>> {
    store.migrate().await?;
    for ddl in [
        format!(
            "CREATE TABLE IF NOT EXISTS {ORDERS} (id BIGSERIAL PRIMARY KEY, customer TEXT NOT NULL, \
             sku TEXT NOT NULL, quantity INT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {OUTBOX} (id BIGSERIAL PRIMARY KEY, topic TEXT NOT NULL, \
             payload TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {CREDIT} (customer TEXT PRIMARY KEY, cents BIGINT NOT NULL)"
        ),
    ] {
        sqlx::query(AssertSqlSafe(ddl)).execute(store.pool()).await?;
    }
    Ok(())
}

async fn teardown(store: &PostgresStore) {
    for table in [ORDERS, OUTBOX, CREDIT, RECORDS] {
        let _ = sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
            .execute(store.pool())
            .await;
    }
}

async fn demo(orders: Arc<Orders>) -> Result<(), Box<dyn std::error::Error>> {
    let store = &orders.store;
    let req = PlaceOrder {
        customer: "ada".into(),
        sku: "keyboard".into(),
        quantity: 1,
    };

    // 1. A call, then the client's retry after a timeout: one order.
    let first = orders.place_order("order-key-1", &req).await?;
    let retry = orders.place_order("order-key-1", &req).await?;
    println!("placed {first:?}; the retry got {retry:?}");
    assert_eq!(first, retry);

    // 2. Eight duplicates at the same moment: one order, eight equal receipts.
    let dups: Vec<_> = (0..8)
        .map(|_| {
            let (orders, req) = (Arc::clone(&orders), req.clone());
            tokio::spawn(async move { orders.place_order("order-key-2", &req).await })
        })
        .collect();
    let mut receipts = Vec::new();
    for d in dups {
        receipts.push(d.await??);
    }
    println!("8 concurrent duplicates all got {:?}", receipts[0]);
    assert!(receipts.iter().all(|r| *r == receipts[0]));

    // 3. The same key with another order is refused.
    let other = PlaceOrder {
        quantity: 5,
        ..req.clone()
    };
    match orders.place_order("order-key-1", &other).await {
        Err(OrderError::Idempotency(e @ idempo::Error::KeyReused)) => {
            println!("another order under a used key: {e}")
        }
        other => return Err(format!("expected KeyReused, got {other:?}").into()),
    }

    // 4. A failing order rolls back (no order, no event) and leaves the key free.
    let sold_out = PlaceOrder {
        sku: "sold-out".into(),
        ..req.clone()
    };
    let failed = orders.place_order("order-key-3", &sold_out).await;
    println!(
        "a failing order: {}",
        failed.err().map(|e| e.to_string()).unwrap_or_default()
    );

    // 5. run_within: the caller's transaction debits the customer's credit too.
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {CREDIT} (customer, cents) VALUES ('ada', 10000)"
    )))
    .execute(store.pool())
    .await?;
    let mut tx = PgTx::from(store.pool().begin().await?);
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {CREDIT} SET cents = cents - 2500 WHERE customer = 'ada'"
    )))
    .execute(&mut *tx)
    .await?;
    let within = orders
        .place_order_within(&mut tx, "order-key-4", &req)
        .await?;
    tx.commit().await?; // the debit, the order, its event and its record, together
    println!("placed {within:?} inside the caller's transaction");

    let (o, e) = (count(store, ORDERS).await?, count(store, OUTBOX).await?);
    println!("{o} orders and {e} outbox events for 13 calls on 4 keys");
    assert_eq!((o, e), (3, 3));
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .or_else(|_| std::env::var("IDEM_TEST_POSTGRES_URL"))
        .ok()
        .filter(|u| !u.is_empty());
    let Some(url) = url else {
        println!(
            "orders example: set DATABASE_URL (or IDEM_TEST_POSTGRES_URL) to a PostgreSQL \
             database to run it; nothing to do."
        );
        return Ok(());
    };
    let store = PostgresStore::builder()
        .url(url)
        .table(RECORDS)
        .connect()
        .await?;
    teardown(&store).await; // leftovers of an interrupted run
    setup(&store).await?;
    let orders = Arc::new(Orders {
        store: store.clone(),
    });
    let result = demo(orders).await;
    teardown(&store).await;
    result
}
