//! The durable-steps conformance cases on `MemoryStore` and on a `TieredStore` in front of one,
//! and the memory store's own step bound.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use idem_core::{Claim, FencingToken, StepId, StepRecord, StepStatus, Store, StoreError};
use idem_stores::{MemoryStore, StepCapacityError, TieredStore};

mod memory {
    use std::sync::Arc;
    idem_testkit::step_conformance_tests!(async {
        Some(Arc::new(
            idem_stores::MemoryStore::builder()
                .max_value_size(256 << 10)
                .build(),
        ) as Arc<dyn idem_core::Store>)
    });
}

mod tiered {
    use std::sync::Arc;
    idem_testkit::step_conformance_tests!(async {
        let shared = idem_stores::MemoryStore::builder()
            .max_value_size(256 << 10)
            .build();
        Some(Arc::new(idem_stores::TieredStore::new(shared)) as Arc<dyn idem_core::Store>)
    });
}

/// Steps are bounded by `max_bytes` apart from the records, never evicted: past the bound a
/// write is refused with a `StepCapacityError`, and expired steps free their bytes.
async fn steps_are_bounded_not_evicted() {
    let store = MemoryStore::builder().max_bytes(64 << 10).build();
    let key = idem_testkit::fresh_key();
    let token = FencingToken::random();
    let req = idem_core::ClaimRequest {
        key,
        fingerprint: None,
        token,
        lease: Duration::from_secs(30),
    };
    assert_eq!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
    let value = vec![0u8; 8 << 10];
    let mut written = 0;
    let err = loop {
        let r = StepRecord::new(StepId::new("s", written), StepStatus::Done, value.clone());
        match store
            .put_step(&key, token, &r, Duration::from_millis(300))
            .await
        {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 100, "the bound was never reached");
    };
    assert!(store.step_bytes() <= 64 << 10);
    let StoreError::Backend { source, .. } = &err else {
        panic!("expected a capacity error, got {err:?}");
    };
    assert!(source.downcast_ref::<StepCapacityError>().is_some());
    // Every step written is still there (none was evicted).
    assert_eq!(
        store.load_steps(&key).await.unwrap().len(),
        written as usize
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = StepRecord::new(StepId::new("after", 0), StepStatus::Done, value.clone());
    store
        .put_step(&key, token, &r, Duration::from_secs(30))
        .await
        .expect("room after expiry");
    assert_eq!(store.load_steps(&key).await.unwrap().len(), 1);
}

/// Steps follow tokio's paused clock, like the records.
async fn steps_expire_on_tokios_clock() {
    tokio::time::pause();
    let store = MemoryStore::new();
    let key = idem_testkit::fresh_key();
    let token = FencingToken::random();
    let req = idem_core::ClaimRequest {
        key,
        fingerprint: None,
        token,
        lease: Duration::from_secs(3600 * 48),
    };
    store.claim(&req).await.unwrap();
    let r = StepRecord::new(StepId::new("s", 0), StepStatus::Done, b"v".to_vec());
    store
        .put_step(&key, token, &r, Duration::from_secs(3600))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(3599)).await;
    assert_eq!(store.load_steps(&key).await.unwrap().len(), 1);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(store.load_steps(&key).await.unwrap().is_empty());
    assert_eq!(
        store.step_bytes(),
        0,
        "an expired step's bytes are freed when it is met"
    );
}

/// A tiered store's steps are its shared store's.
async fn tiered_steps_live_in_the_shared_store() {
    let shared = Arc::new(MemoryStore::new());
    let tiered = TieredStore::new(shared.clone());
    let key = idem_testkit::fresh_key();
    let token = FencingToken::random();
    let req = idem_core::ClaimRequest {
        key,
        fingerprint: None,
        token,
        lease: Duration::from_secs(30),
    };
    tiered.claim(&req).await.unwrap();
    let r = StepRecord::new(StepId::new("s", 0), StepStatus::Done, b"v".to_vec());
    tiered
        .put_step(&key, token, &r, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(shared.load_steps(&key).await.unwrap(), vec![r]);
    assert!(tiered.supports_steps());
}

fn main() -> std::process::ExitCode {
    idem_testkit::harness::run([
        memory::cases(&[]),
        tiered::cases(&[]),
        idem_testkit::test_cases!([], current_thread;
            steps_are_bounded_not_evicted, steps_expire_on_tokios_clock,
            tiered_steps_live_in_the_shared_store),
    ])
}
