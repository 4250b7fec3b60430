//! # idem-core — make an async function idempotent
//!
//! A caller may retry a call as often as the network forces it to; the side effect happens
//! once, and every repeat gets the first call's result back — including duplicates that arrive
//! while the first call still runs, in this process or another. One attribute does it:
//!
//! ```
//! use idem_core::{idempotent, Error};
//! use idem_stores::MemoryStore;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct Receipt { amount: u64 }
//!
//! // `store` names an argument, so that argument is left out of the key by itself.
//! #[idempotent(key = order_id, ttl = "24h", store = store)]
//! async fn charge(store: &MemoryStore, order_id: &str, amount: u64) -> Result<Receipt, Error> {
//!     Ok(Receipt { amount }) // the side effect goes here
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Error> {
//! let store = MemoryStore::new();
//! let first = charge(&store, "order-7", 100).await?;
//! assert_eq!(charge(&store, "order-7", 100).await?, first); // replayed, not charged twice
//! assert!(matches!(charge(&store, "order-7", 200).await, Err(Error::KeyReused)));
//! # Ok(()) }
//! ```
//!
//! [`idempotent`] documents every argument (`key`, `ttl`, `store`, `skip`, `scope`,
//! `on_conflict`, `errors`, ...) with an example, and what each mistake gets at compile time.
//!
//! The attribute expands to one [`Call`], which can also be built by hand — for a closure, or
//! a key that is not an argument:
//!
//! ```
//! use idem_core::{Call, Error};
//! use idem_stores::MemoryStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Error> {
//! let store = MemoryStore::new();
//! let charge = |amount: u64| {
//!     Call::new("docs::charge")
//!         .key("order-7")
//!         .fingerprint(&(amount,))
//!         .run(&store, async move { Ok::<_, Error>(format!("charged {amount}")) })
//! };
//! assert_eq!(charge(100).await?, "charged 100");
//! assert_eq!(charge(100).await?, "charged 100"); // replayed, not run again
//! assert!(matches!(charge(200).await, Err(Error::KeyReused)));
//! # Ok(()) }
//! ```
//!
//! The pieces, one module each:
//!
//! - [`idempotent`] (feature `macros`, default) — the attribute;
//! - [`Call`] — the runtime: claim, replay, wait, execute, complete, release;
//! - [`step()`] — durable steps: a retried call resumes at its first unfinished step;
//! - [`Store`] — the trait every backend implements (memory, Redis, SQL in `idem-stores`);
//! - [`key`] and [`fingerprint`] — hashed identities and argument fingerprints;
//! - [`codec`] — the `Codec` trait, the MessagePack default and the record envelope;
//! - [`Error`] — one error enum with an HTTP status per variant;
//! - [`Outcome`] and [`counters`] — one outcome per call, logged and counted;
//! - [`shutdown()`] — the drain: stop new claims and settle what is held before exiting;
//!
//! Beside it: `idem-stores` (the backends), `idem-http` (the tower/axum `Idempotency-Key`
//! layer), `idem-testkit` (the conformance suite every store passes), and `idempo`, the one
//! crate an application depends on, which re-exports all of them behind features.
//!
//! The runtime needs a tokio runtime with the time driver enabled.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
mod namespace;
mod observe;
mod private;
mod runtime;
pub mod step;
mod store;
mod transaction;

pub mod inspect;
pub mod shutdown;

#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod telemetry;

pub mod codec;
pub mod fingerprint;
pub mod key;
pub mod options;

pub use async_trait::async_trait;
pub use bytes::Bytes;
pub use error::{BoxError, CodecError, Error, StoreError, MAX_RETRY_HINT};
pub use inspect::{RecordInfo, RecordStatus, StepInfo, StoreAdmin, StoreStats};
pub use observe::{count, counters, observe, CallOutcome, Observed, Outcome};
pub use options::{MissingKey, OnConflict, Options, DEFAULT_MAX_STEPS};
pub use runtime::{current_key, default_store, set_default_store, with_default_store, Call};
pub use shutdown::{shutdown, ShutdownError};
pub use step::{step, step_in, step_key, Step};
pub use store::{
    Claim, ClaimRequest, ClaimTimes, CompletedRecord, CompletedRef, FencingToken, Fingerprint, Key,
    RecordState, StepId, StepRecord, StepStatus, Store, TransactionalStore, DEFAULT_MAX_VALUE_SIZE,
};

#[cfg(feature = "macros")]
#[cfg_attr(docsrs, doc(cfg(feature = "macros")))]
#[doc = include_str!("idempotent.md")]
pub use idem_macros::idempotent;

/// What `#[idempotent]` expands to reaches the runtime only through here.
///
/// Not a stable API: anything in this module may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::__idem_site as site;
    pub use crate::namespace::Site;
    /// The one outcome event of a call, for the sibling crates (`idem-http`) that end a call
    /// without running it through [`Call`].
    pub use crate::observe::{emit, emit_for};
    pub use crate::options::{MissingKey, OnConflict};
    pub use crate::private::*;
    pub use crate::runtime::Call;
    pub use crate::store::Store;
    pub use crate::Error;
    pub use core::concat;
    pub use core::module_path;
    pub use core::option::Option;
    pub use core::result::Result;
    pub use core::time::Duration;

    // The ways the expansion runs a body. Free functions rather than `Call` methods:
    // the macro passes `T` and `E` in the turbofish as the user's own tokens, and rustc
    // reports a missing `Serialize` or `From<idem_core::Error>` under that type argument
    // (for a method call it would point at the attribute).

    /// [`Call::run`] for `#[idempotent(store = ..)]`. `E: From<Error>` is asked of the
    /// `from_error` argument (see [`from_error`]) rather than here, so that a missing impl
    /// is reported once, under `E`.
    pub async fn run<T, E, Fut>(
        call: Call,
        store: &dyn Store,
        from_error: fn(crate::Error) -> E,
        body: Fut,
    ) -> Result<T, E>
    where
        T: serde::Serialize + serde::de::DeserializeOwned,
        Fut: core::future::Future<Output = Result<T, E>>,
    {
        use crate::runtime::{Prepared, ReleaseErrors};
        // A replay is answered here, before the body's wrapper and the runtime's futures are
        // built (each would move the `Call` once more).
        let ident = match call.prepare_in::<ReleaseErrors, T, Either<E>>(store) {
            Prepared::Claim(ident) => ident,
            Prepared::Done(result) => return result.map_err(|e| e.into(from_error)),
            Prepared::Unprotected => return body.await,
        };
        let body = async { body.await.map_err(Either::Body) };
        call.drive::<ReleaseErrors, T, Either<E>, _>(store, ident, body)
            .await
            .map_err(|e| e.into(from_error))
    }

    /// `E::from`, as a function pointer.
    pub fn from_error<E: FromIdemError>(e: crate::Error) -> E {
        E::from(e)
    }

    /// An error of the runtime or of the body: `From<Error>` for any `E`.
    enum Either<E> {
        Idem(crate::Error),
        Body(E),
    }

    impl<E> From<crate::Error> for Either<E> {
        fn from(e: crate::Error) -> Self {
            Either::Idem(e)
        }
    }

    impl<E> Either<E> {
        fn into(self, from_error: fn(crate::Error) -> E) -> E {
            match self {
                Either::Idem(e) => from_error(e),
                Either::Body(e) => e,
            }
        }
    }

    /// [`Call::run_storing_errors`] for `#[idempotent(store = .., errors = store)]`.
    pub async fn run_storing_errors<T, E, Fut>(
        call: Call,
        store: &dyn Store,
        body: Fut,
    ) -> Result<T, E>
    where
        T: serde::Serialize + serde::de::DeserializeOwned,
        E: From<crate::Error> + serde::Serialize + serde::de::DeserializeOwned,
        Fut: core::future::Future<Output = Result<T, E>>,
    {
        call.run_storing_errors(store, body).await
    }

    /// [`Call::run_on_default`] for `#[idempotent]` without `store`.
    pub async fn run_on_default<T, E, Fut>(
        call: Call,
        from_error: fn(crate::Error) -> E,
        body: Fut,
    ) -> Result<T, E>
    where
        T: serde::Serialize + serde::de::DeserializeOwned,
        Fut: core::future::Future<Output = Result<T, E>>,
    {
        let body = async { body.await.map_err(Either::Body) };
        call.run_on_default(body)
            .await
            .map_err(|e| e.into(from_error))
    }

    /// [`Call::run_in_transaction`] for `#[idempotent(store = .., transaction = tx)]`: the
    /// store is `tx_store(&(store)).checked()` (see [`tx_store`]).
    pub async fn run_in_transaction<T, E, S, F>(
        call: Call,
        store: &S,
        from_error: fn(crate::Error) -> E,
        body: F,
    ) -> Result<T, E>
    where
        S: crate::TransactionalStore,
        T: serde::Serialize + serde::de::DeserializeOwned,
        F: AsyncFnOnce(&mut S::Tx) -> Result<T, E>,
    {
        call.run_in_transaction(store, async |tx: &mut S::Tx| {
            body(tx).await.map_err(Either::Body)
        })
        .await
        .map_err(|e| e.into(from_error))
    }

    /// [`Call::run_within`] for `#[idempotent(store = .., in_transaction = tx)]`: the
    /// caller's transaction is `tx_arg(store, tx)` (see [`tx_arg`]).
    pub async fn run_within<T, E, S, F>(
        call: Call,
        store: &S,
        from_error: fn(crate::Error) -> E,
        tx: &mut S::Tx,
        body: F,
    ) -> Result<T, E>
    where
        S: crate::TransactionalStore,
        T: serde::Serialize + serde::de::DeserializeOwned,
        F: AsyncFnOnce(&mut S::Tx) -> Result<T, E>,
    {
        call.run_within(store, tx, async |tx: &mut S::Tx| {
            body(tx).await.map_err(Either::Body)
        })
        .await
        .map_err(|e| e.into(from_error))
    }

    /// [`Call::run_storing_errors_on_default`] for `errors = store` without `store`.
    pub async fn run_storing_errors_on_default<T, E, Fut>(call: Call, body: Fut) -> Result<T, E>
    where
        T: serde::Serialize + serde::de::DeserializeOwned,
        E: From<crate::Error> + serde::Serialize + serde::de::DeserializeOwned,
        Fut: core::future::Future<Output = Result<T, E>>,
    {
        call.run_storing_errors_on_default(body).await
    }
}
