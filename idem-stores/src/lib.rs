//! # idem-stores — where idempotency records live
//!
//! One cargo feature per backend:
//!
//! | feature | store | claim | waiting | expiry |
//! |---|---|---|---|---|
//! | `memory` (default) | [`MemoryStore`]: completed records in moka (LRU, bounded in bytes), claims in a sharded map that never evicts | one critical section on the key's claim shard | in-process notification | per record: moka's expiry, checked on tokio's clock on every read |
//! | `redis` | `RedisStore` on the `redis` crate (server or Cluster) | a native `SET … NX PX … GET` (a short script only for a conflict or takeover) | one shared pub/sub subscriber per store, polling while it is down | native `PX` |
//! | `postgres` | `PostgresStore` on sqlx | one `INSERT ... ON CONFLICT DO UPDATE ... RETURNING` (CTE) | `LISTEN/NOTIFY`, polling while the listener is down | `purge_expired` / background sweep |
//! | `mysql` | `MySqlStore` on sqlx (MySQL, MariaDB) | one `INSERT ... ON DUPLICATE KEY UPDATE`, outcome in `LAST_INSERT_ID(expr)` | bounded polling with backoff | `purge_expired` / background sweep |
//! | `sqlite` | `SqliteStore` on sqlx (file or memory) | one `INSERT ... ON CONFLICT DO UPDATE ... RETURNING` | bounded polling with backoff | `purge_expired` / background sweep |
//!
//! Every store implements [`idem_core::Store`] and passes `idem_testkit`.

#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(any(feature = "memory", feature = "redis"))]
mod key_map;
#[cfg(feature = "memory")]
mod memory;
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use memory::{
    CapacityError, Evictions, MemoryStore, MemoryStoreBuilder, StepCapacityError, STEP_OVERHEAD,
};
#[cfg(feature = "memory")]
mod tiered;
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use tiered::TieredStore;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
#[cfg(feature = "redis")]
#[doc(hidden)]
pub use crate::redis::__fuzz_record;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use crate::redis::RedisStore;

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite")))
)]
pub mod sql;
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub use crate::sql::mysql::{MySqlStore, MySqlStoreBuilder};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use crate::sql::postgres::{PostgresStore, PostgresStoreBuilder};
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use crate::sql::sqlite::{SqliteStore, SqliteStoreBuilder};
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub use crate::sql::transactional::MySqlTx;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use crate::sql::transactional::PgTx;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use crate::sql::transactional::SqliteTx;
/// The sqlx the SQL stores are built on (0.9), re-exported so that transactional bodies run
/// their statements with the same version (`idem_stores::sqlx::query(..)`).
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite")))
)]
pub use sqlx;
