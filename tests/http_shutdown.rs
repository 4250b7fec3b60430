//! The HTTP layer while the process drains (`idem_core::shutdown`): a new request with an
//! `Idempotency-Key` is answered 503 with a problem document and `Retry-After`, and is not
//! processed; a retry of a request this instance already answered is still replayed.
//!
//! Its own test binary: the drain is process-wide.
//!
//! ```text
//! cargo test --features http --test http_shutdown
//! ```

#![cfg(feature = "http")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod http_support;

use std::time::Duration;

use idem_core::OnConflict;
use serde_json::json;

use http_support::{fresh_key, is_replayed, options, problem, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_instance_answers_503_and_still_replays() {
    let store = http_support::memory_store().unwrap();
    let server = Server::start(store, options(OnConflict::Reject)).await;
    let body = json!({"amount": 1999, "currency": "EUR"});
    let done = fresh_key("done");
    let first = server
        .pay("acme", Some(&done), body.clone())
        .send()
        .await
        .unwrap();
    assert!(first.status().is_success(), "{}", first.status());
    let first_body = first.bytes().await.unwrap();

    idem_core::shutdown(Duration::from_secs(5))
        .await
        .expect("nothing is held");

    let refused = server
        .pay("acme", Some(&fresh_key("new")), body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let doc = problem(refused).await;
    assert_eq!(doc["type"], "urn:idem:problem:shutting-down");

    let again = server.pay("acme", Some(&done), body).send().await.unwrap();
    assert!(again.status().is_success(), "{}", again.status());
    assert!(is_replayed(&again));
    assert_eq!(again.bytes().await.unwrap(), first_body);
    assert_eq!(
        server.stats().await.executions,
        1,
        "the refused request was not processed"
    );
    idem_core::shutdown::resume();
}
