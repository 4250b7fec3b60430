//! Records survive refactors (issue 11): a result stored by one build replays in a build where
//! the return type was moved and renamed; a `version` bump separates; a payload of another
//! shape is an error, never a value or a second execution.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};

use idem_core::{Call, Error};
use idem_stores::MemoryStore;

mod service {
    pub mod v1 {
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        pub struct Price {
            pub cents: u64,
            pub currency: String,
        }
    }
}

mod billing {
    /// `service::v1::Price` after a refactor: moved, renamed, one field added with a default.
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct Amount {
        pub cents: u64,
        pub currency: String,
        #[serde(default)]
        pub rounded: bool,
    }
}

const NS: &str = "tests::records::quote";

#[tokio::test]
async fn a_moved_and_renamed_return_type_replays() {
    let store = MemoryStore::new();
    let runs = AtomicUsize::new(0);
    let old = Call::new(NS)
        .key("q-1")
        .run(&store, async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(service::v1::Price {
                cents: 1999,
                currency: "EUR".into(),
            })
        })
        .await
        .unwrap();
    assert_eq!(old.cents, 1999);
    // The next build: same namespace and key, the type lives elsewhere under another name.
    let new = Call::new(NS)
        .key("q-1")
        .run(&store, async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(billing::Amount {
                cents: 0,
                currency: "never".into(),
                rounded: true,
            })
        })
        .await
        .unwrap();
    assert_eq!(
        new,
        billing::Amount {
            cents: 1999,
            currency: "EUR".into(),
            rounded: false
        }
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "replayed, not run again");
}

#[tokio::test]
async fn a_version_bump_separates_and_another_shape_is_an_error() {
    let store = MemoryStore::new();
    let runs = AtomicUsize::new(0);
    let price = |version: u32| {
        Call::new(NS)
            .key("q-2")
            .version(version)
            .run(&store, async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(service::v1::Price {
                    cents: 5,
                    currency: "USD".into(),
                })
            })
    };
    price(0).await.unwrap();
    assert!(matches!(
        price(1).await,
        Err(Error::IncompatibleRecord { .. })
    ));
    // Same tag, a payload that is not a `u64`: an error with the decode error as its source.
    let r = Call::new(NS)
        .key("q-2")
        .run(&store, async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(7u64)
        })
        .await;
    let err = r.unwrap_err();
    assert!(
        matches!(err, Error::Codec(_) | Error::IncompatibleRecord { .. }),
        "{err:?}"
    );
    assert!(std::error::Error::source(&err).is_some(), "{err:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "never a second execution");
}
