//! Every outcome reaches the `metrics` facade (`idem_calls_total{namespace, outcome}`) and the
//! caller's `observe` scope, and the histograms are recorded; no raw key in any label.
#![cfg(feature = "metrics")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use idem_core::{observe, Call, ClaimRequest, Error, FencingToken, OnConflict, Outcome, Store};
use idem_stores::MemoryStore;
use idem_testkit::{Fault, FaultyStore, Op};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;

const NS: &str = "tests::metrics";

fn call() -> Call {
    Call::new(NS).key("k").fingerprint(1u8)
}

/// Drives one call per outcome, each in its own `observe` scope, and returns what each scope
/// saw.
async fn every_outcome() -> Vec<(Outcome, Option<Outcome>)> {
    let mut seen = Vec::new();
    macro_rules! expect {
        ($want:expr, $fut:expr) => {{
            let (_, observed) = observe($fut).await;
            seen.push(($want, observed.last()));
        }};
    }
    let store = Arc::new(MemoryStore::new());
    let s = &*store;
    expect!(
        Outcome::Executed,
        call().run(s, async { Ok::<_, Error>(1u8) })
    );
    expect!(
        Outcome::Replayed,
        call().run(s, async { Ok::<_, Error>(2u8) })
    );
    expect!(
        Outcome::KeyReused,
        Call::new(NS)
            .key("k")
            .fingerprint(9u8)
            .run(s, async { Ok::<_, Error>(1u8) })
    );
    expect!(
        Outcome::IncompatibleRecord,
        call().version(7).run(s, async { Ok::<_, Error>(1u8) })
    );
    expect!(
        Outcome::Failed,
        Call::new(NS)
            .key("err")
            .run(s, async { Err::<u8, _>(Error::MissingKey) })
    );
    expect!(
        Outcome::MissingKey,
        Call::new(NS)
            .key(None::<&str>)
            .run(s, async { Ok::<_, Error>(1u8) })
    );
    expect!(
        Outcome::Unprotected,
        Call::new(NS)
            .key(None::<&str>)
            .missing_key(idem_core::MissingKey::Run)
            .run(s, async { Ok::<_, Error>(1u8) })
    );
    expect!(
        Outcome::TooLarge,
        Call::new(NS)
            .key("big")
            .max_value_size(4)
            .run(s, async { Ok::<_, Error>(vec![0u8; 64]) })
    );
    expect!(
        Outcome::InvalidOption,
        Call::new(NS)
            .key("k")
            .lease(Duration::ZERO)
            .run(s, async { Ok::<_, Error>(1u8) })
    );

    // A record that is not an idem envelope.
    let garbage = Call::new(NS)
        .key("garbage")
        .identity_for(s)
        .unwrap()
        .unwrap()
        .key;
    let token = FencingToken::random();
    let req = ClaimRequest {
        key: garbage,
        fingerprint: None,
        token,
        lease: Duration::from_secs(5),
    };
    s.claim(&req).await.unwrap();
    s.complete(&garbage, token, b"not an envelope", Duration::from_secs(60))
        .await
        .unwrap();
    expect!(
        Outcome::CodecError,
        Call::new(NS)
            .key("garbage")
            .run(s, async { Ok::<_, Error>(1u8) })
    );

    // A claim held by someone else.
    let busy = Call::new(NS)
        .key("busy")
        .identity_for(s)
        .unwrap()
        .unwrap()
        .key;
    let req = ClaimRequest {
        key: busy,
        fingerprint: None,
        token: FencingToken::random(),
        lease: Duration::from_millis(300),
    };
    s.claim(&req).await.unwrap();
    expect!(
        Outcome::InProgress,
        Call::new(NS)
            .key("busy")
            .on_conflict(OnConflict::Reject)
            .run(s, async { Ok::<_, Error>(1u8) })
    );
    expect!(
        Outcome::WaitTimeout,
        Call::new(NS)
            .key("busy")
            .wait_timeout(Duration::from_millis(20))
            .run(s, async { Ok::<_, Error>(1u8) })
    );
    // Its lease passes: the next call takes it over.
    expect!(
        Outcome::TakenOver,
        Call::new(NS)
            .key("busy")
            .run(s, async { Ok::<_, Error>(1u8) })
    );

    // A duplicate that waits for a running call.
    let holder = tokio::spawn({
        let store = store.clone();
        async move {
            Call::new(NS)
                .key("slow")
                .run(&*store, async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, Error>(1u8)
                })
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    expect!(
        Outcome::ReplayedAfterWait,
        Call::new(NS)
            .key("slow")
            .run(s, async { Ok::<_, Error>(2u8) })
    );
    holder.await.unwrap().unwrap();

    // The lease is lost while the body runs: someone removes the claim and claims again.
    let lost = Call::new(NS)
        .key("lost")
        .identity_for(s)
        .unwrap()
        .unwrap()
        .key;
    let thief = {
        let store = store.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            store.remove(&lost).await.unwrap();
            let req = ClaimRequest {
                key: lost,
                fingerprint: None,
                token: FencingToken::random(),
                lease: Duration::from_secs(30),
            };
            store.claim(&req).await.unwrap();
        }
    };
    let (_, ()) = tokio::join!(
        async {
            expect!(
                Outcome::LeaseLost,
                Call::new(NS).key("lost").run(s, async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, Error>(1u8)
                })
            )
        },
        thief
    );

    // The store fails: every claim attempt times out.
    let faulty = FaultyStore::new(store.clone());
    for _ in 0..3 {
        faulty.plan(Fault::FailBefore(Op::Claim));
    }
    expect!(
        Outcome::StoreError,
        Call::new(NS)
            .key("down")
            .run(&faulty, async { Ok::<_, Error>(1u8) })
    );

    // The caller goes away while its claim is in flight.
    faulty.plan(Fault::Delay(Op::Claim, Duration::from_millis(200)));
    let (_, observed) = observe(async {
        let _ = tokio::time::timeout(
            Duration::from_millis(20),
            Call::new(NS)
                .key("gone")
                .run(&faulty, async { Ok::<_, Error>(1u8) }),
        )
        .await;
    })
    .await;
    seen.push((Outcome::Cancelled, observed.last()));
    seen
}

#[test]
fn every_outcome_is_counted_with_its_namespace_and_observed() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let seen = rt.block_on(every_outcome());
    for (want, got) in &seen {
        assert_eq!(Some(*want), *got, "the observe scope saw the wrong outcome");
    }

    let mut calls: BTreeMap<String, u64> = BTreeMap::new();
    let mut histograms: BTreeMap<String, usize> = BTreeMap::new();
    for (key, _unit, _desc, value) in snapshotter.snapshot().into_vec() {
        let labels: Vec<(String, String)> = key
            .key()
            .labels()
            .map(|l| (l.key().to_string(), l.value().to_string()))
            .collect();
        for (_, v) in &labels {
            assert!(
                !v.contains("garbage") && !v.contains("busy"),
                "a raw key in a label: {v}"
            );
        }
        match (key.kind(), value) {
            (MetricKind::Counter, DebugValue::Counter(n))
                if key.key().name() == "idem_calls_total" =>
            {
                let label = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                if label("namespace").as_deref() == Some(NS) {
                    *calls.entry(label("outcome").unwrap()).or_default() += n;
                }
            }
            (MetricKind::Histogram, DebugValue::Histogram(v)) => {
                *histograms.entry(key.key().name().to_string()).or_default() += v.len();
            }
            _ => {}
        }
    }
    for (want, _) in &seen {
        assert!(
            calls.get(want.as_str()).copied().unwrap_or(0) >= 1,
            "no idem_calls_total{{outcome=\"{}\"}}: {calls:?}",
            want.as_str()
        );
    }
    for name in [
        "idem_claim_duration_seconds",
        "idem_wait_duration_seconds",
        "idem_body_duration_seconds",
        "idem_record_bytes",
        "idem_store_operation_duration_seconds",
    ] {
        assert!(
            histograms.get(name).copied().unwrap_or(0) > 0,
            "{name} not recorded: {histograms:?}"
        );
    }
}
