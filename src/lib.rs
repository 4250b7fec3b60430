//! Examples and cross-crate integration tests of idem. Not published; see `idem-core`.
//!
//! This crate also makes the documentation's samples tests: every page of README.md and
//! `docs/` is included below as the doc comment of a test-only item, so that `cargo test
//! --doc` compiles and runs each Rust sample in it (a page whose samples need a store is
//! compiled with that store's feature; samples that need a server are `no_run`: compiled,
//! not run). A sample that is only an illustration is marked `rust,ignore`, with the reason
//! in the sample or next to it, or is a `text` block. `tests/doc_pages.rs` checks that no page is left out.

/// The pages whose samples run as doc tests (`cargo test --doc --all-features`).
#[cfg(doctest)]
mod pages {
    #[doc = include_str!("../README.md")]
    struct Readme;

    #[doc = include_str!("../docs/coming-from.md")]
    struct ComingFrom;

    #[doc = include_str!("../docs/records.md")]
    struct Records;

    #[doc = include_str!("../docs/failures.md")]
    struct Failures;

    #[doc = include_str!("../docs/benchmarks.md")]
    struct Benchmarks;

    #[doc = include_str!("../docs/testing-idem.md")]
    struct TestingIdem;

    #[doc = include_str!("../docs/testing.md")]
    struct Testing;

    #[doc = include_str!("../docs/steps.md")]
    struct Steps;

    #[cfg(feature = "metrics")]
    #[doc = include_str!("../docs/operations.md")]
    struct Operations;

    #[cfg(all(feature = "http", feature = "redis"))]
    #[doc = include_str!("../docs/http.md")]
    struct Http;

    #[cfg(all(feature = "postgres", feature = "sqlite"))]
    #[doc = include_str!("../docs/transactions.md")]
    struct Transactions;

    #[doc = include_str!("../docs/stores/memory.md")]
    struct MemoryStorePage;

    #[cfg(feature = "redis")]
    #[doc = include_str!("../docs/stores/redis.md")]
    struct RedisStorePage;

    #[cfg(feature = "postgres")]
    #[doc = include_str!("../docs/stores/postgres.md")]
    struct PostgresStorePage;

    #[cfg(feature = "mysql")]
    #[doc = include_str!("../docs/stores/mysql.md")]
    struct MySqlStorePage;

    #[cfg(feature = "sqlite")]
    #[doc = include_str!("../docs/stores/sqlite.md")]
    struct SqliteStorePage;
}
