//! `#[idempotent]` on every function shape of SPEC §2: free functions, `&self`,
//! `&mut self`, `self: Arc<Self>`, generics, `impl Trait` arguments, lifetimes and borrowed
//! arguments, destructuring patterns, `#[async_trait]` impls; visibility, doc comments and
//! other attributes kept; the returned future is `Send` when the body is.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::borrow::Cow;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;

use idem_core::{idempotent, Error, Store};
use idem_stores::MemoryStore;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

fn assert_send<T: Send>(_: &T) {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    order: String,
    run: u32,
}

// ---- methods ---------------------------------------------------------------------------

struct Payments {
    store: Arc<MemoryStore>,
    runs: AtomicU32,
    audit: Vec<String>,
}

impl Payments {
    fn new() -> Self {
        Payments {
            store: Arc::new(MemoryStore::new()),
            runs: AtomicU32::new(0),
            audit: Vec::new(),
        }
    }

    /// Doc comments stay on the function.
    #[idempotent(key = order.clone(), store = self.store)]
    pub(crate) async fn by_ref(&self, order: String) -> Result<Receipt, Error> {
        let run = self.runs.fetch_add(1, SeqCst) + 1;
        Ok(Receipt { order, run })
    }

    /// `&mut self`: the store is cloned out of `self` (a borrow would conflict with the
    /// body's `&mut self`, see the `mut_self_borrowed_store` UI case).
    #[idempotent(key = order.clone(), store = self.store.clone())]
    async fn by_mut(&mut self, order: String) -> Result<Receipt, Error> {
        self.audit.push(order.clone());
        self.record();
        let run = self.runs.fetch_add(1, SeqCst) + 1;
        Ok(Receipt { order, run })
    }

    fn record(&mut self) {
        self.audit.push("recorded".into());
    }

    #[idempotent(key = order.clone(), store = self.store)]
    async fn by_arc(self: Arc<Self>, order: String) -> Result<Receipt, Error> {
        let run = self.runs.fetch_add(1, SeqCst) + 1;
        Ok(Receipt { order, run })
    }

    /// A body that moves `self` needs a store that does not borrow it.
    #[idempotent(key = order.clone(), store = self.store.clone())]
    async fn consuming_arc(self: Arc<Self>, order: String) -> Result<Receipt, Error> {
        let this = self; // moved into the body
        let run = this.runs.fetch_add(1, SeqCst) + 1;
        Ok(Receipt { order, run })
    }

    #[idempotent(key = order.clone(), store = self.store.clone())]
    async fn by_value(self, order: String) -> Result<Receipt, Error> {
        let run = self.runs.fetch_add(1, SeqCst) + 1;
        Ok(Receipt { order, run })
    }
}

#[tokio::test]
async fn methods_by_ref_mut_arc_and_value() {
    let p = Payments::new();
    let a = p.by_ref("o1".into()).await.unwrap();
    assert_eq!(p.by_ref("o1".into()).await.unwrap(), a);
    assert_send(&p.by_ref("o2".into()));

    let mut p = Payments::new();
    let a = p.by_mut("o1".into()).await.unwrap();
    assert_eq!(p.by_mut("o1".into()).await.unwrap(), a);
    assert_eq!(p.audit, ["o1", "recorded"], "the body ran once");
    assert_send(&p.by_mut("o2".into()));

    let p = Arc::new(Payments::new());
    let a = p.clone().by_arc("o1".into()).await.unwrap();
    assert_eq!(p.clone().by_arc("o1".into()).await.unwrap(), a);
    assert_eq!(p.clone().consuming_arc("o9".into()).await.unwrap().run, 2);
    assert_eq!(p.clone().consuming_arc("o9".into()).await.unwrap().run, 2);
    assert_send(&p.clone().by_arc("o2".into()));

    let p = Payments::new();
    let store = p.store.clone();
    let a = p.by_value("o1".into()).await.unwrap();
    let p = Payments {
        store,
        runs: AtomicU32::new(0),
        audit: Vec::new(),
    };
    assert_eq!(
        p.by_value("o1".into()).await.unwrap(),
        a,
        "same store, replayed"
    );
}

// ---- generics, impl Trait, lifetimes, patterns ---------------------------------------

#[idempotent(store = store, skip(store, runs))]
async fn generic<S, T>(store: &S, runs: &AtomicU32, item: T) -> Result<(T, u32), Error>
where
    S: Store,
    T: Serialize + DeserializeOwned + Send,
{
    Ok((item, runs.fetch_add(1, SeqCst) + 1))
}

#[tokio::test]
async fn generic_functions() {
    let (store, runs) = (MemoryStore::new(), AtomicU32::new(0));
    assert_eq!(generic(&store, &runs, 5u8).await.unwrap(), (5, 1));
    assert_eq!(generic(&store, &runs, 5u8).await.unwrap(), (5, 1));
    assert_eq!(generic(&store, &runs, "x".to_owned()).await.unwrap().1, 2);
    assert_send(&generic(&store, &runs, 1u64));
}

#[idempotent(key = id, store = store, skip(store, log))]
async fn impl_trait_skipped(
    store: &MemoryStore,
    log: &mut impl std::fmt::Write,
    id: u32,
) -> Result<u32, Error> {
    writeln!(log, "ran {id}").unwrap();
    Ok(id)
}

#[idempotent(key = name.to_string(), store = store, skip(store))]
async fn impl_trait_in_key(
    store: &MemoryStore,
    name: impl std::fmt::Display,
) -> Result<String, Error> {
    Ok(format!("hello {name}"))
}

#[idempotent(store = store, skip(store))]
async fn impl_serialize(store: &MemoryStore, value: impl Serialize + Send) -> Result<u8, Error> {
    let _ = serde_json::to_string(&value).unwrap();
    Ok(1)
}

#[tokio::test]
async fn impl_trait_arguments_skipped_or_covered_by_the_key() {
    let store = MemoryStore::new();
    let mut log = String::new();
    assert_eq!(impl_trait_skipped(&store, &mut log, 3).await.unwrap(), 3);
    assert_eq!(impl_trait_skipped(&store, &mut log, 3).await.unwrap(), 3);
    assert_eq!(log, "ran 3\n", "the second call replayed");
    assert_eq!(impl_trait_in_key(&store, "ann").await.unwrap(), "hello ann");
    assert_eq!(impl_trait_in_key(&store, 42).await.unwrap(), "hello 42");
    assert_eq!(impl_serialize(&store, [1, 2]).await.unwrap(), 1);
}

#[idempotent(key = (a, b), store = store, skip(store, runs))]
#[allow(clippy::needless_lifetimes)] // explicit on purpose: named lifetimes are a shape
async fn borrowed<'a, 'b>(
    store: &MemoryStore,
    runs: &AtomicU32,
    a: &'a str,
    b: &'b [u8],
) -> Result<Cow<'static, str>, Error> {
    runs.fetch_add(1, SeqCst);
    Ok(Cow::Owned(format!("{a}{}", b.len())))
}

#[derive(Serialize, Deserialize)]
struct Path<T>(T);

#[derive(Serialize, Deserialize)]
struct Body {
    amount: u64,
}

/// Destructured arguments, as axum extractors are written: the bindings are the arguments.
#[idempotent(key = id.clone(), store = store, skip(store))]
async fn destructured(
    store: &MemoryStore,
    Path(id): Path<String>,
    Body { amount }: Body,
) -> Result<String, Error> {
    Ok(format!("{id}:{amount}"))
}

#[tokio::test]
async fn lifetimes_borrowed_arguments_and_patterns() {
    let (store, runs) = (MemoryStore::new(), AtomicU32::new(0));
    let owned = String::from("ab");
    assert_eq!(
        borrowed(&store, &runs, &owned, b"xyz").await.unwrap(),
        "ab3"
    );
    let bytes = vec![b'x', b'y', b'z'];
    assert_eq!(borrowed(&store, &runs, "ab", &bytes).await.unwrap(), "ab3");
    assert_eq!(runs.load(SeqCst), 1);

    let call = |amount| destructured(&store, Path("o-1".to_owned()), Body { amount });
    assert_eq!(call(5).await.unwrap(), "o-1:5");
    assert_eq!(call(5).await.unwrap(), "o-1:5");
    // `amount` is a binding of the second pattern, fingerprinted.
    assert!(matches!(call(6).await, Err(Error::KeyReused)));
}

// ---- #[async_trait] --------------------------------------------------------------------

#[idem_core::async_trait]
trait Billing {
    async fn charge(&self, order: String, amount: u64) -> Result<Receipt, Error>;
    async fn refund(&mut self, order: String) -> Result<Receipt, Error>;
}

struct Biller {
    store: Arc<MemoryStore>,
    runs: AtomicU32,
}

#[idem_core::async_trait]
impl Billing for Biller {
    #[idempotent(key = order.clone(), store = self.store)]
    async fn charge(&self, order: String, amount: u64) -> Result<Receipt, Error> {
        let run = self.runs.fetch_add(1, SeqCst) + 1;
        Ok(Receipt {
            order: format!("{order}/{amount}"),
            run,
        })
    }

    #[idempotent(key = order.clone(), store = self.store.clone())]
    async fn refund(&mut self, order: String) -> Result<Receipt, Error> {
        let run = self.runs.fetch_add(1, SeqCst) + 1;
        Ok(Receipt { order, run })
    }
}

/// `#[async_trait]` on the trait or impl always expands before the `#[idempotent]` on a
/// method inside it, so the attribute meets the rewritten method
/// (`fn .. -> Pin<Box<dyn Future>>` with a `Box::pin(async move { .. })` body) and wraps the
/// inner future; a default method of a trait works the same way.
#[idem_core::async_trait]
trait Defaulted {
    fn store(&self) -> &MemoryStore;

    #[idempotent(key = id, store = self.store())]
    async fn fetch(&self, id: u64) -> Result<u64, Error> {
        Ok(id * 2)
    }
}

struct WithDefault(MemoryStore);

impl Defaulted for WithDefault {
    fn store(&self) -> &MemoryStore {
        &self.0
    }
}

#[tokio::test]
async fn async_trait_impls_and_default_methods() {
    let mut b = Biller {
        store: Arc::new(MemoryStore::new()),
        runs: AtomicU32::new(0),
    };
    let a = b.charge("o1".into(), 5).await.unwrap();
    assert_eq!(b.charge("o1".into(), 5).await.unwrap(), a);
    assert!(matches!(
        b.charge("o1".into(), 6).await,
        Err(Error::KeyReused)
    ));
    let r = b.refund("r1".into()).await.unwrap();
    assert_eq!(b.refund("r1".into()).await.unwrap(), r);
    assert_eq!(b.runs.load(SeqCst), 2);

    let dyn_billing: Box<dyn Billing + Send + Sync> = Box::new(Biller {
        store: Arc::new(MemoryStore::new()),
        runs: AtomicU32::new(0),
    });
    assert_eq!(dyn_billing.charge("o2".into(), 1).await.unwrap().run, 1);

    let w = WithDefault(MemoryStore::new());
    assert_eq!(w.fetch(4).await.unwrap(), 8);
}

// ---- Send ------------------------------------------------------------------------------

#[idempotent(key = id, store = store, skip(store))]
async fn sendable(store: Arc<dyn Store>, id: u64) -> Result<u64, Error> {
    tokio::task::yield_now().await;
    Ok(id)
}

#[tokio::test]
async fn the_future_is_send_and_spawnable() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let fut = sendable(store.clone(), 1);
    assert_send(&fut);
    // What axum asks of a handler: the future can move to another worker thread.
    assert_eq!(tokio::spawn(fut).await.unwrap().unwrap(), 1);
}

// ---- `?` with conversions, early `return` --------------------------------------------

#[derive(Debug)]
#[allow(dead_code)] // the payloads are for Debug
enum AppError {
    Parse(std::num::ParseIntError),
    Idem(Error),
}

impl From<std::num::ParseIntError> for AppError {
    fn from(e: std::num::ParseIntError) -> Self {
        AppError::Parse(e)
    }
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idem(e)
    }
}

#[idempotent(key = input.clone(), store = store, skip(store))]
async fn parse(store: &MemoryStore, input: String) -> Result<u64, AppError> {
    if input.is_empty() {
        return Ok(0);
    }
    let n: u64 = input.parse()?; // ParseIntError -> AppError inside the body
    Ok(n)
}

#[tokio::test]
async fn question_mark_and_return_behave_as_in_the_original_function() {
    let store = MemoryStore::new();
    assert_eq!(parse(&store, String::new()).await.unwrap(), 0);
    assert_eq!(parse(&store, "42".into()).await.unwrap(), 42);
    assert!(matches!(
        parse(&store, "x".into()).await,
        Err(AppError::Parse(_))
    ));
    // The Err was released, not stored: a second try runs again and fails the same way.
    assert!(matches!(
        parse(&store, "x".into()).await,
        Err(AppError::Parse(_))
    ));
    let _ = AppError::Idem(Error::MissingKey);
}

// ---- native `async fn` in traits -------------------------------------------------------

trait Ledger {
    async fn post(&self, entry: u64) -> Result<u64, Error>;
}

struct Books(MemoryStore, AtomicU32);

impl Ledger for Books {
    #[idempotent(store = self.0)]
    async fn post(&self, entry: u64) -> Result<u64, Error> {
        Ok(entry + u64::from(self.1.fetch_add(1, SeqCst)))
    }
}

#[tokio::test]
async fn native_async_fn_in_trait_impls() {
    let books = Books(MemoryStore::new(), AtomicU32::new(0));
    assert_eq!(books.post(10).await.unwrap(), 10);
    assert_eq!(books.post(10).await.unwrap(), 10);
    assert_eq!(books.post(20).await.unwrap(), 21);
}

// ---- a lifetime of the signature in the return type -------------------------------------

#[idempotent(key = name, store = store, skip(store))]
async fn greet<'a>(store: &MemoryStore, name: &'a str) -> Result<Cow<'a, str>, Error> {
    Ok(Cow::Owned(format!("hi {name}")))
}

#[tokio::test]
async fn return_types_may_name_the_signature_lifetimes() {
    let store = MemoryStore::new();
    let name = String::from("ann");
    assert_eq!(greet(&store, &name).await.unwrap(), "hi ann");
    assert_eq!(greet(&store, &name).await.unwrap(), "hi ann");
}

// ---- `Self` in the return type -----------------------------------------------------------

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Account {
    id: u64,
}

impl Account {
    #[idempotent(key = id, store = store, skip(store))]
    async fn open(store: &MemoryStore, id: u64) -> Result<Self, Error> {
        Ok(Self { id })
    }
}

#[tokio::test]
async fn self_in_the_return_type() {
    let store = MemoryStore::new();
    assert_eq!(Account::open(&store, 3).await.unwrap(), Account { id: 3 });
}
