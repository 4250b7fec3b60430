//! Transactional mode on `SqliteStore` (issue 13): the transactional conformance suite
//! (`idem_testkit::transactional`), each case on a database file of its own (cases hold
//! SQLite's one write lock for seconds on purpose), with a business table in the same file.
//! Needs no server.
#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/sql_common.rs"]
mod sql_common;
#[path = "support/tx_common.rs"]
mod tx_common;

use tx_common::lite::LiteHarness;

async fn harness() -> Option<LiteHarness> {
    let file = sql_common::sqlite_file(&sql_common::unique_table("tx"));
    Some(LiteHarness::new(&file, "tx").await)
}

idem_testkit::transactional_conformance_tests!(harness());

fn main() -> std::process::ExitCode {
    idem_testkit::harness::run([cases(&[])])
}
