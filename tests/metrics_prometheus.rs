//! The Prometheus exporter set-up that docs/operations.md documents, end to end: calls of
//! every outcome, then a scrape of the text, checked for names, labels, `# HELP` lines and
//! observations in finite buckets (seconds for `*_seconds`, bytes for `idem_record_bytes`).
//! On the remote stores (when their test URL is set) the `store` label names the backend.
#![cfg(feature = "metrics")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "backends/mod.rs"]
mod backends;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use idem_core::telemetry::{BYTES_BUCKETS, SECONDS_BUCKETS};
use idem_core::{observe, Call, ClaimRequest, Error, FencingToken, OnConflict, Outcome, Store};
use idem_stores::MemoryStore;
use idem_testkit::{Fault, FaultyStore, Op};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

const NS: &str = "tests::metrics_prometheus";

/// The documented set-up, installed once for this test binary.
fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .unwrap()
            .set_buckets_for_metric(Matcher::Full("idem_record_bytes".into()), BYTES_BUCKETS)
            .unwrap()
            .install_recorder()
            .unwrap();
        idem_core::telemetry::describe();
        handle
    })
}

/// One sample line of the text format: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (head, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match head.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (head, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap();
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            Sample {
                name: name.to_string(),
                labels,
                value: value.parse().unwrap(),
            }
        })
        .collect()
}

fn count(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

fn call() -> Call {
    Call::new(NS).key("k").fingerprint(1u8)
}

/// Ends one call in each outcome, on the memory store (directly or through a faulty wrapper).
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
    let one = || async { Ok::<_, Error>(1u8) };
    expect!(Outcome::Executed, call().run(s, one()));
    expect!(Outcome::Replayed, call().run(s, one()));
    expect!(
        Outcome::KeyReused,
        Call::new(NS).key("k").fingerprint(9u8).run(s, one())
    );
    expect!(Outcome::IncompatibleRecord, call().version(7).run(s, one()));
    expect!(
        Outcome::Failed,
        Call::new(NS)
            .key("err")
            .run(s, async { Err::<u8, _>(Error::MissingKey) })
    );
    expect!(
        Outcome::MissingKey,
        Call::new(NS).key(None::<&str>).run(s, one())
    );
    expect!(
        Outcome::Unprotected,
        Call::new(NS)
            .key(None::<&str>)
            .missing_key(idem_core::MissingKey::Run)
            .run(s, one())
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
        Call::new(NS).key("k").lease(Duration::ZERO).run(s, one())
    );

    // A panicking body: released, not failed.
    let panicked = tokio::spawn({
        let store = store.clone();
        async move {
            observe(Call::new(NS).key("panics").run(&*store, async {
                if true {
                    panic!("the body panics");
                }
                Ok::<_, Error>(1u8)
            }))
            .await
        }
    })
    .await;
    assert!(panicked.is_err());
    assert!(
        idem_core::count(Outcome::Released) >= 1,
        "a panicking body is counted as released"
    );
    seen.push((Outcome::Released, Some(Outcome::Released)));

    // A record that is not an idem envelope.
    let garbage = Call::new(NS)
        .key("garbage")
        .identity_for(s)
        .unwrap()
        .unwrap()
        .key;
    let token = FencingToken::random();
    let claim = |key, token, lease| ClaimRequest {
        key,
        fingerprint: None,
        token,
        lease,
    };
    s.claim(&claim(garbage, token, Duration::from_secs(5)))
        .await
        .unwrap();
    s.complete(&garbage, token, b"not an envelope", Duration::from_secs(60))
        .await
        .unwrap();
    expect!(
        Outcome::CodecError,
        Call::new(NS).key("garbage").run(s, one())
    );

    // A claim held by someone else: rejected, waited out, then taken over.
    let busy = Call::new(NS)
        .key("busy")
        .identity_for(s)
        .unwrap()
        .unwrap()
        .key;
    s.claim(&claim(
        busy,
        FencingToken::random(),
        Duration::from_millis(300),
    ))
    .await
    .unwrap();
    expect!(
        Outcome::InProgress,
        Call::new(NS)
            .key("busy")
            .on_conflict(OnConflict::Reject)
            .run(s, one())
    );
    expect!(
        Outcome::WaitTimeout,
        Call::new(NS)
            .key("busy")
            .wait_timeout(Duration::from_millis(20))
            .run(s, one())
    );
    expect!(Outcome::TakenOver, Call::new(NS).key("busy").run(s, one()));

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
        Call::new(NS).key("slow").run(s, one())
    );
    holder.await.unwrap().unwrap();

    // The lease is lost while the body runs.
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
            store
                .claim(&claim(
                    lost,
                    FencingToken::random(),
                    Duration::from_secs(30),
                ))
                .await
                .unwrap();
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
        Call::new(NS).key("down").run(&faulty, one())
    );

    // The caller goes away while its claim is in flight.
    faulty.plan(Fault::Delay(Op::Claim, Duration::from_millis(200)));
    let (_, observed) = observe(async {
        let _ = tokio::time::timeout(
            Duration::from_millis(20),
            Call::new(NS).key("gone").run(&faulty, one()),
        )
        .await;
    })
    .await;
    seen.push((Outcome::Cancelled, observed.last()));

    // The process drains: a new call is refused. (Every test of this binary holds `SERIAL`,
    // so no other test's call meets the drain.)
    idem_core::shutdown(Duration::ZERO)
        .await
        .expect("nothing is held");
    expect!(
        Outcome::ShuttingDown,
        Call::new(NS).key("late").run(s, one())
    );
    idem_core::shutdown::resume();
    seen
}

/// Held by each test: the drain in [`every_outcome`] is process-wide.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn the_documented_exporter_shows_every_outcome_with_help_lines_and_finite_buckets() {
    let _serial = SERIAL.lock().await;
    let handle = handle();
    let seen = every_outcome().await;
    for (want, got) in &seen {
        assert_eq!(Some(*want), *got, "the observe scope saw the wrong outcome");
    }
    let covered: Vec<Outcome> = seen.iter().map(|(o, _)| *o).collect();
    for outcome in Outcome::ALL {
        assert!(covered.contains(&outcome), "no call ended in {outcome:?}");
    }

    let text = handle.render();
    let all = samples(&text);

    // Every metric is described and typed.
    for (name, kind) in [
        ("idem_calls_total", "counter"),
        ("idem_claim_duration_seconds", "histogram"),
        ("idem_wait_duration_seconds", "histogram"),
        ("idem_body_duration_seconds", "histogram"),
        ("idem_record_bytes", "histogram"),
        ("idem_store_operation_duration_seconds", "histogram"),
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# HELP {name} ")) && l.len() > name.len() + 12),
            "no # HELP line for {name}:\n{text}"
        );
        assert!(
            text.contains(&format!("# TYPE {name} {kind}")),
            "{name} is not a {kind}:\n{text}"
        );
    }

    // One count per outcome, labelled with the namespace and the store; the memory store's
    // calls say `store="memory"`.
    for outcome in Outcome::ALL {
        let n = count(
            &all,
            "idem_calls_total",
            &[("namespace", NS), ("outcome", outcome.as_str())],
        );
        assert!(
            n >= 1.0,
            "no idem_calls_total{{outcome=\"{}\"}}:\n{text}",
            outcome.as_str()
        );
    }
    // Every call ends in exactly one outcome: the calls above, plus the slow holder.
    let total = count(&all, "idem_calls_total", &[("namespace", NS)]);
    assert_eq!(
        total,
        (seen.len() + 1) as f64,
        "calls counted twice or not at all:\n{text}"
    );
    for outcome in ["replayed", "failed", "released", "key_reused", "too_large"] {
        let n = count(
            &all,
            "idem_calls_total",
            &[("namespace", NS), ("store", "memory"), ("outcome", outcome)],
        );
        assert_eq!(
            n, 1.0,
            "idem_calls_total{{store=\"memory\",outcome=\"{outcome}\"}}:\n{text}"
        );
    }
    assert!(
        all.iter()
            .filter(|s| s.name == "idem_calls_total")
            .all(|s| s.labels.contains_key("store") && s.labels.contains_key("namespace")),
        "idem_calls_total without a store or namespace label:\n{text}"
    );
    // No raw key in any label.
    for s in &all {
        for v in s.labels.values() {
            assert!(
                !["garbage", "busy", "slow", "lost", "panics"].contains(&v.as_str()),
                "a raw key in a label: {v}"
            );
        }
    }

    // Observations land in finite buckets: the largest finite bucket holds all of them.
    let finite = |name: &str, top: f64| {
        let total = count(&all, &format!("{name}_count"), &[]);
        assert!(total > 0.0, "{name} recorded nothing:\n{text}");
        let le = format!("{top}");
        let in_top = count(&all, &format!("{name}_bucket"), &[("le", le.as_str())]);
        assert_eq!(
            in_top, total,
            "{name}: observations past the last finite bucket (le={le}):\n{text}"
        );
        let inf = count(&all, &format!("{name}_bucket"), &[("le", "+Inf")]);
        assert_eq!(inf, total, "{name}: +Inf bucket");
    };
    let seconds_top = *SECONDS_BUCKETS.last().unwrap();
    for name in [
        "idem_claim_duration_seconds",
        "idem_wait_duration_seconds",
        "idem_body_duration_seconds",
        "idem_store_operation_duration_seconds",
    ] {
        finite(name, seconds_top);
    }
    finite("idem_record_bytes", *BYTES_BUCKETS.last().unwrap());
    // A one-byte result's envelope is small: it sits in the byte buckets' lowest ones, not
    // in a seconds-sized bucket list.
    let small = count(&all, "idem_record_bytes_bucket", &[("le", "256")]);
    assert!(small >= 1.0, "no small record in le=256:\n{text}");
}

/// The `store` label on the remote stores: an executed and a failed call each.
async fn store_label(store: &dyn Store, name: &str) {
    let handle = handle();
    let ns = "tests::metrics_prometheus::stores";
    let key = format!("metrics-{}", FencingToken::random().0);
    let call = || Call::new(ns).key(key.as_str());
    call()
        .run(store, async { Ok::<_, Error>(1u8) })
        .await
        .unwrap();
    let err_key = format!("{key}-err");
    let failed: Result<u8, Error> = Call::new(ns)
        .key(err_key.as_str())
        .run(store, async { Err(Error::MissingKey) })
        .await;
    assert!(failed.is_err());
    let all = samples(&handle.render());
    for outcome in ["executed", "failed"] {
        assert!(
            count(
                &all,
                "idem_calls_total",
                &[("namespace", ns), ("store", name), ("outcome", outcome)]
            ) >= 1.0,
            "no idem_calls_total{{store=\"{name}\",outcome=\"{outcome}\"}}"
        );
    }
    assert!(
        count(
            &all,
            "idem_store_operation_duration_seconds_count",
            &[("store", name), ("operation", "claim")]
        ) >= 1.0
    );
    for k in [key.as_str(), err_key.as_str()] {
        let ident = Call::new(ns).key(k).identity_for(store).unwrap().unwrap();
        store.remove(&ident.key).await.unwrap();
    }
}

#[cfg(feature = "redis")]
async fn redis_calls_carry_the_store_label() {
    let _serial = SERIAL.lock().await;
    let Some(url) = idem_testkit::env_url("IDEM_TEST_REDIS_URL") else {
        return;
    };
    let store = idem_stores::RedisStore::connect(&url).await.unwrap();
    store_label(&store, "redis").await;
}

#[cfg(feature = "postgres")]
async fn postgres_calls_carry_the_store_label() {
    let _serial = SERIAL.lock().await;
    let Some(url) = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL") else {
        return;
    };
    let store = idem_stores::PostgresStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    store_label(&store, "postgres").await;
}

#[cfg(feature = "mysql")]
async fn mysql_calls_carry_the_store_label() {
    let _serial = SERIAL.lock().await;
    let Some(url) = idem_testkit::env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let store = idem_stores::MySqlStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    store_label(&store, "mysql").await;
}

#[cfg(feature = "sqlite")]
async fn sqlite_calls_carry_the_store_label() {
    let _serial = SERIAL.lock().await;
    let store = idem_stores::SqliteStore::connect("sqlite::memory:")
        .await
        .unwrap();
    store.migrate().await.unwrap();
    store_label(&store, "sqlite").await;
}

fn main() -> std::process::ExitCode {
    let mut cases = vec![idem_testkit::test_cases!([], multi_thread(2);
        the_documented_exporter_shows_every_outcome_with_help_lines_and_finite_buckets)];
    #[cfg(feature = "redis")]
    cases.push(idem_testkit::test_cases!([backends::REDIS], current_thread;
        redis_calls_carry_the_store_label));
    #[cfg(feature = "postgres")]
    cases.push(
        idem_testkit::test_cases!([backends::POSTGRES], current_thread;
        postgres_calls_carry_the_store_label),
    );
    #[cfg(feature = "mysql")]
    cases.push(idem_testkit::test_cases!([backends::MYSQL], current_thread;
        mysql_calls_carry_the_store_label));
    #[cfg(feature = "sqlite")]
    cases.push(idem_testkit::test_cases!([], current_thread; sqlite_calls_carry_the_store_label));
    idem_testkit::harness::run(cases)
}
