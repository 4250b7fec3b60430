//! # idempo — make an async function idempotent
//!
//! A caller may retry a call as often as the network forces it to; the side effect happens
//! once, and every repeat gets the first call's result back — including duplicates that arrive
//! while the first call still runs, in this process or another. One attribute does it:
//!
//! ```
//! use idempo::{idempotent, Error, MemoryStore};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct Receipt { amount: u64 }
//!
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
//! This crate is the one dependency an application adds. Each feature turns on one part:
//!
//! | feature | what it adds |
//! |---|---|
//! | `macros` (default) | the [`idempotent`] attribute |
//! | `memory` (default) | [`MemoryStore`] (one process) and [`TieredStore`] |
//! | `redis` | `RedisStore` (a server or a Cluster) |
//! | `postgres`, `mysql`, `sqlite` | `PostgresStore`, `MySqlStore`, `SqliteStore` on sqlx, with transactional mode |
//! | `http` (`openapi`) | [`http`]: the tower/axum `Idempotency-Key` layer (and its utoipa description) |
//! | `metrics` | `telemetry`: counters and histograms through the `metrics` facade |
//! | `json` | a JSON codec besides the default MessagePack |
//! | `bincode` | bincode 2.x as an opt-in compact codec (with its limits: see `codec`) |
//! | `testkit` | `testkit`: the conformance suite a third-party store passes |
//! | `cli` | the stores the `idem` command-line tool needs |
//!
//! ```toml
//! [dependencies]
//! idempo = { version = "0.1", features = ["postgres", "http"] }
//! ```
//!
//! Everything here is re-exported from the crates behind it: the runtime (`idem-core`: [`Call`],
//! [`Store`], [`Error`], keys, codecs, options), the stores (`idem-stores`) and the attribute
//! (`idem-macros`). Their paths under `idempo::` are the stable ones; the attribute expands to
//! `::idempo::__private` calls, so an application needs no other idem crate in its
//! `Cargo.toml`. A crate that re-exports `idempo` under another path names it with
//! `#[idempotent(crate = my_framework::idempo, ..)]`.
//!
//! The name: `idem` on crates.io is an unrelated crate, so the facade is `idempo` — short, and
//! the first letters of what it does.

#![cfg_attr(docsrs, feature(doc_cfg))]

#[doc(inline)]
pub use idem_core::*;

#[doc(inline)]
pub use idem_stores::*;

/// Makes an async function idempotent: the attribute of `idem_core`, whose generated code
/// reaches the runtime through `::idempo` (see the [crate docs](crate) for an example, and
/// `idem_core::idempotent` for every argument).
#[cfg(feature = "macros")]
#[cfg_attr(docsrs, doc(cfg(feature = "macros")))]
pub use idem_macros::__idempotent_in_facade as idempotent;

/// The tower/axum `Idempotency-Key` layer: the `idem-http` crate.
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use idem_http as http;

/// The store conformance suite, the fault-injecting wrapper, the reference model and the
/// backend-test harness: the `idem-testkit` crate.
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub use idem_testkit as testkit;
