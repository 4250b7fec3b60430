//! Transactional mode on `MySqlStore` (MySQL, MariaDB; issue 13): the transactional
//! conformance suite (`idem_testkit::transactional`) with a business table on the same
//! database. Runs when `IDEM_TEST_MYSQL_URL` is set.
#![cfg(feature = "mysql")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/sql_common.rs"]
mod sql_common;
#[path = "support/tx_common.rs"]
mod tx_common;

use tx_common::my::MyHarness;

async fn harness() -> Option<MyHarness> {
    let url = idem_testkit::env_url("IDEM_TEST_MYSQL_URL")?;
    Some(MyHarness::new(&url, "tx", 16).await)
}

idem_testkit::transactional_conformance_tests!(harness());

fn main() -> std::process::ExitCode {
    idem_testkit::harness::run([cases(&[backends::MYSQL])])
}
