//! The message of `Error::IncompatibleRecord`: a payload that does not decode under a matching
//! tag says so and names the tag once; a tag mismatch names both tags. Neither runs the body.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::error::Error as _;
use std::sync::atomic::{AtomicUsize, Ordering};

use idem_core::{Call, Error};
use idem_stores::MemoryStore;

const NS: &str = "tests::incompatible_record";

#[tokio::test]
async fn a_payload_of_another_shape_says_it_does_not_decode() {
    let store = MemoryStore::new();
    let runs = AtomicUsize::new(0);
    let first = Call::new(NS)
        .key("shape")
        .run(&store, async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(7u64)
        })
        .await
        .unwrap();
    assert_eq!(first, 7);

    // Same namespace, key and version; the return type is now a struct the `u64` is not.
    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    struct Price {
        cents: u64,
        currency: String,
    }
    let err = Call::new(NS)
        .key("shape")
        .run(&store, async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(Price {
                cents: 1,
                currency: "EUR".into(),
            })
        })
        .await
        .unwrap_err();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "never a second execution");
    let Error::IncompatibleRecord {
        expected,
        found,
        source,
    } = &err
    else {
        panic!("expected IncompatibleRecord, got {err:?}");
    };
    assert_eq!(expected, "msgpack;v0");
    assert_eq!(found, "msgpack;v0", "the stored tag, not a description");
    assert!(source.is_some(), "the decode error is the source");
    assert!(err.source().is_some());
    assert_eq!(
        err.to_string(),
        "stored record does not decode as this call's return type (tag `msgpack;v0`): \
         the type changed without a `version` bump"
    );
    assert!(!err.to_string().contains("another shape"), "{err}");
}

#[tokio::test]
async fn a_version_bump_names_both_tags() {
    let store = MemoryStore::new();
    let call = |version: u32| {
        Call::new(NS)
            .key("version")
            .version(version)
            .run(&store, async { Ok::<_, Error>(1u8) })
    };
    call(0).await.unwrap();
    let err = call(1).await.unwrap_err();
    assert!(
        matches!(&err, Error::IncompatibleRecord { source: None, .. }),
        "{err:?}"
    );
    assert!(err.source().is_none());
    assert_eq!(
        err.to_string(),
        "stored record is incompatible: expected `msgpack;v1`, found `msgpack;v0`"
    );
}
