//! Durable steps are counted by how they ended: `idem_steps_total{store, outcome}`.
#![cfg(feature = "metrics")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use idem_core::{step, Call, Error};
use idem_stores::MemoryStore;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;

async fn steps(store: &MemoryStore) {
    let call = |fail: bool| {
        Call::new("tests::metrics_steps")
            .key("k")
            .run(store, async move {
                step("a", async { Ok::<_, Error>(1u8) }).await?;
                step("b", async move {
                    if fail {
                        return Err(Error::MissingKey);
                    }
                    Ok::<_, Error>(2u8)
                })
                .await
            })
    };
    assert!(call(true).await.is_err()); // a: ran, b: failed
    assert_eq!(call(false).await.unwrap(), 2); // a: replayed, b: ran
                                               // An at-most-once step interrupted inside, then found in doubt.
    let interrupted = Call::new("tests::metrics_steps::doubt")
        .key("k")
        .run(store, async {
            step("email", async {
                std::future::pending::<()>().await;
                Ok::<_, Error>(())
            })
            .at_most_once()
            .await
        });
    assert!(tokio::time::timeout(Duration::from_millis(50), interrupted)
        .await
        .is_err());
    let retry = Call::new("tests::metrics_steps::doubt")
        .key("k")
        .run(store, async {
            step("email", async { Ok::<_, Error>(()) })
                .at_most_once()
                .await
        })
        .await;
    assert!(matches!(retry, Err(Error::StepInDoubt { .. })));
    // The same step, decided by a reconcile hook: counted as reconciled (not ran).
    let reconciled = Call::new("tests::metrics_steps::doubt")
        .key("k")
        .run(store, async {
            step("email", async { Ok::<_, Error>(()) })
                .at_most_once()
                .on_in_doubt(|| async { Ok(()) })
                .await
        })
        .await;
    assert!(reconciled.is_ok());
}

#[test]
fn step_outcomes_are_counted_by_store() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(steps(&MemoryStore::new()));
    let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (key, _unit, _desc, value) in snapshotter.snapshot().into_vec() {
        if let (MetricKind::Counter, DebugValue::Counter(n)) = (key.kind(), value) {
            if key.key().name() == "idem_steps_total" {
                let label = |k: &str| {
                    key.key()
                        .labels()
                        .find(|l| l.key() == k)
                        .map(|l| l.value().to_string())
                        .unwrap()
                };
                *counts
                    .entry((label("store"), label("outcome")))
                    .or_default() += n;
            }
        }
    }
    let get = |outcome: &str| {
        counts
            .get(&("memory".to_string(), outcome.to_string()))
            .copied()
    };
    assert_eq!(get("ran"), Some(2), "{counts:?}");
    assert_eq!(get("failed"), Some(1), "{counts:?}");
    assert_eq!(get("replayed"), Some(1), "{counts:?}");
    assert_eq!(get("in_doubt"), Some(1), "{counts:?}");
    assert_eq!(get("reconciled"), Some(1), "{counts:?}");
}
