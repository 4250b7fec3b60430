//! `#[idempotent]` without `store`: the process default store, and the error that names both
//! fixes when there is none. One test, since the default is set once per process.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;

use idem_core::{idempotent, Error};
use idem_stores::MemoryStore;
use serde::{Deserialize, Serialize};

static RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = id)]
async fn on_default(id: u64) -> Result<u32, Error> {
    let _ = id;
    Ok(RUNS.fetch_add(1, SeqCst) + 1)
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Declined(String);

impl From<Error> for Declined {
    fn from(e: Error) -> Self {
        Declined(e.to_string())
    }
}

#[idempotent(key = id, errors = store)]
async fn stored_error_on_default(id: u64) -> Result<u32, Declined> {
    Err(Declined(format!(
        "no {id} #{}",
        RUNS.fetch_add(1, SeqCst) + 1
    )))
}

#[tokio::test]
async fn without_store_uses_the_default_or_fails_naming_both_fixes() {
    let err = on_default(1).await.unwrap_err();
    assert!(matches!(err, Error::NoStore), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("store"), "{msg}");
    assert!(
        msg.contains("set_default_store"),
        "the message names the fix: {msg}"
    );
    assert_eq!(RUNS.load(SeqCst), 0, "the body never ran unprotected");

    idem_core::set_default_store(Arc::new(MemoryStore::new())).unwrap();
    assert_eq!(on_default(1).await.unwrap(), 1);
    assert_eq!(on_default(1).await.unwrap(), 1);
    assert_eq!(
        stored_error_on_default(2).await,
        Err(Declined("no 2 #2".into()))
    );
    assert_eq!(
        stored_error_on_default(2).await,
        Err(Declined("no 2 #2".into())),
        "errors = store on the default store replays the error"
    );
}
