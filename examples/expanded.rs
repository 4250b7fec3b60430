//! What `#[idempotent]` writes, line by line.
//!
//! `Payments::charge` below is annotated; `Payments::charge_by_hand` is its expansion as
//! `cargo expand` prints it (the crate's snapshot test `idem-macros/tests/expand/readme.rs`
//! keeps that text current), with comments. Both run against the same store, and `main`
//! shows they behave alike.
//!
//! ```text
//! cargo run --example expanded
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use idem_core::{idempotent, Error};
use idem_stores::MemoryStore;
use serde::{Deserialize, Serialize};

/// The request: its idempotency key, and what the fingerprint protects.
#[derive(Serialize)]
struct ChargeRequest {
    idempotency_key: String,
    amount: u64,
}

/// The stored, replayed answer.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Receipt {
    charge_number: u32,
    amount: u64,
}

/// The service, holding its store.
struct Payments {
    store: Arc<MemoryStore>,
    charges: AtomicU32,
}

impl Payments {
    /// The annotated function.
    #[idempotent(key = req.idempotency_key.clone(), ttl = "24h", store = self.store)]
    async fn charge(&self, req: ChargeRequest) -> Result<Receipt, Error> {
        let charge_number = self.charges.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Receipt {
            charge_number,
            amount: req.amount,
        })
    }

    /// Its expansion. The signature, attributes and body are the user's; only the body's
    /// surroundings are new.
    // The macro writes `&(key)` so that `key = req.id` borrows instead of moving out of
    // `req`; clippy does not lint generated code, but it does this hand copy.
    #[allow(clippy::needless_borrows_for_generic_args)]
    async fn charge_by_hand(&self, req: ChargeRequest) -> Result<Receipt, Error> {
        // 1. The call's identity, computed before the body exists: the namespace (`site!()`
        //    is a `static` of this function whose marker type names its path, here
        //    `expanded::Payments::charge_by_hand`, or the `namespace = ".."` given; the first
        //    call checks once that no other function of the process has it), the key (the
        //    `key` expression, hashed),
        //    and the fingerprint (the arguments the key does not name, `self` and skipped ones
        //    excluded; a duplicate key with another fingerprint is `Error::KeyReused`). Then
        //    each option that was given (`ttl = "24h"` was checked at compile time and is a
        //    number here). `__idem_call` is a mixed-site name: a user variable of the same
        //    name is another variable.
        let __idem_call = ::idem_core::__private::call(::idem_core::__private::site!())
            .key(&(req.idempotency_key.clone()))
            .fingerprint((&req,))
            .ttl(::idem_core::__private::Duration::from_secs(86400));
        // 2. The check of the return type's `T`, whose value carries the runtime entry points
        //    for the chosen store and error policy (`run`, `run_storing_errors`,
        //    `run_on_default`, `run_storing_errors_on_default`): a missing `Serialize` is
        //    reported once, under `T` in the signature, and a failing `T` meets no second
        //    bound.
        let __idem_ok = ::idem_core::__private::ok_type::<Receipt>().storable();
        // 3. The body becomes the future the runtime drives: claim, then replay, wait, reject
        //    or run it; complete or release. It is a plain (not `move`) async block, so it
        //    borrows or moves each variable as the body needs, like a closure; `return` and
        //    `?` inside it behave as in the original function. `from_error::<E>` turns the
        //    runtime's errors into `E`; a missing `From<idem_core::Error>` is reported under
        //    `E`.
        __idem_ok
            .run::<Error, _>(
                __idem_call,
                &(self.store),
                ::idem_core::__private::from_error::<Error>,
                async {
                    let charge_number = self.charges.fetch_add(1, Ordering::SeqCst) + 1;
                    Ok(Receipt {
                        charge_number,
                        amount: req.amount,
                    })
                },
            )
            .await
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let payments = Payments {
        store: Arc::new(MemoryStore::new()),
        charges: AtomicU32::new(0),
    };
    let req = |key: &str, amount| ChargeRequest {
        idempotency_key: key.into(),
        amount,
    };

    let first = payments.charge(req("order-1", 100)).await?;
    let again = payments.charge(req("order-1", 100)).await?;
    assert_eq!(first, again, "replayed");
    println!("charge:         {first:?}, retried: {again:?}");

    let first = payments.charge_by_hand(req("order-2", 250)).await?;
    let again = payments.charge_by_hand(req("order-2", 250)).await?;
    assert_eq!(first, again, "replayed");
    println!("charge_by_hand: {first:?}, retried: {again:?}");

    let reused = payments.charge_by_hand(req("order-2", 999)).await;
    assert!(matches!(reused, Err(Error::KeyReused)));
    println!("order-2 with another amount: {:?}", reused.map(|_| ()));
    assert_eq!(
        payments.charges.load(Ordering::SeqCst),
        2,
        "two charges, not five"
    );
    Ok(())
}
