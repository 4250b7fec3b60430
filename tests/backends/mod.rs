//! What the workspace's backend tests need (`idem_testkit::harness`): the probes of the stores'
//! servers, shared with idem-stores' tests, and, in a build without a store's feature, a need
//! that reports that store's tests as ignored with the feature to turn on.

#![allow(dead_code, unused_imports)]

#[path = "../../idem-stores/tests/support/backends.rs"]
mod probes;

#[cfg(feature = "mysql")]
pub use probes::MYSQL;
#[cfg(feature = "postgres")]
pub use probes::POSTGRES;
#[cfg(feature = "redis")]
pub use probes::REDIS;

use idem_testkit::harness::Need;

/// Without the `redis` feature, the Redis variants are reported as ignored.
#[cfg(not(feature = "redis"))]
pub const REDIS: Need = Need::disabled("Redis", "this build lacks `--features redis`");

/// Without the `postgres` feature, the PostgreSQL variants are reported as ignored.
#[cfg(not(feature = "postgres"))]
pub const POSTGRES: Need = Need::disabled("PostgreSQL", "this build lacks `--features postgres`");

/// Without the `mysql` feature, the MySQL variants are reported as ignored.
#[cfg(not(feature = "mysql"))]
pub const MYSQL: Need = Need::disabled("MySQL", "this build lacks `--features mysql`");
