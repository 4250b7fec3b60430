//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`): idem
//! records into whatever recorder the application installed (Prometheus, StatsD, ...), and
//! costs nothing without one.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `idem_calls_total` | counter | `namespace`, `store`, `outcome` |
//! | `idem_claim_duration_seconds` | histogram | `namespace` — claim round trips until held or answered, waits excluded |
//! | `idem_wait_duration_seconds` | histogram | `namespace` — time a duplicate spent waiting |
//! | `idem_body_duration_seconds` | histogram | `namespace` |
//! | `idem_record_bytes` | histogram | `namespace` — the stored envelope's size |
//! | `idem_store_operation_duration_seconds` | histogram | `operation` (`claim`, `renew`, `complete`, `release`; `get` when a failed completion looks at the record; `begin` for transactional mode's transaction), `store` |
//! | `idem_steps_total` | counter | `store`, `outcome` (`ran`, `replayed`, `failed`: the step returned `Err`, `in_doubt`, `reconciled`, `lease_lost`, `too_large`, `store_error`) — durable steps by how they ended |
//! | `idem_store_evictions_total` | counter | `store`, `cause` (`size`: the store's byte bound, `expired`: its own expiry) — completed records a store dropped; recorded by stores that evict (the memory store, with `idem-stores`' feature `metrics`) |
//!
//! Labels never carry a key: cardinality is bounded by the number of namespaces (annotated
//! functions), stores and outcomes. A body that returned `Err` ends as `outcome="failed"`,
//! apart from `released` (a panic or a dropped caller). `docs/operations.md` has dashboard
//! queries and alerts.
//!
//! Every metric has a description ([`describe`], so Prometheus output carries `# HELP`
//! lines). Histograms need buckets fit for their unit: seconds for `*_seconds`
//! ([`SECONDS_BUCKETS`]) and bytes for `idem_record_bytes` ([`BYTES_BUCKETS`]); one bucket
//! list for all would put every byte count in `+Inf`. The Prometheus set-up:
//!
//! ```
//! use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
//! use idem_core::telemetry::{BYTES_BUCKETS, SECONDS_BUCKETS};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let recorder = PrometheusBuilder::new()
//!     .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
//!     .set_buckets_for_metric(Matcher::Full("idem_record_bytes".into()), BYTES_BUCKETS)?
//!     .build_recorder();
//! let handle = recorder.handle();
//! // In a service: `.install_recorder()?` instead of `.build_recorder()`, once at start-up,
//! // then `idem_core::telemetry::describe()`, and serve `handle.render()` on /metrics.
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! metrics::with_local_recorder(&recorder, || {
//!     idem_core::telemetry::describe();
//!     let store = idem_stores::MemoryStore::new();
//!     let call = idem_core::Call::new("docs::telemetry").key("k");
//!     rt.block_on(call.run(&store, async { Ok::<_, idem_core::Error>(1) }))
//! })?;
//! let text = handle.render();
//! assert!(text.contains("# HELP idem_calls_total"));
//! assert!(text.contains("idem_record_bytes_bucket{namespace=\"docs::telemetry\",le=\"64\"}"));
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use crate::Outcome;

/// Bucket bounds for idem's `*_seconds` histograms: 100 µs to 30 s, covering an in-process
/// replay, a store round trip, a wait and a slow body.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Bucket bounds for `idem_record_bytes`: 64 B to 4 MiB, by powers of four (every store's
/// default value limit is 1 MiB).
pub const BYTES_BUCKETS: &[f64] = &[
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
];

/// Registers the unit and a description of every idem metric with the installed recorder
/// (the `# HELP` lines of Prometheus output). Call it once after installing the recorder;
/// calling it again is harmless. idem also calls it at its first recorded metric, which
/// covers a recorder installed before the first call.
///
/// ```
/// // After `PrometheusBuilder::new()...install_recorder()?`:
/// idem_core::telemetry::describe();
/// ```
pub fn describe() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(
        "idem_calls_total",
        Unit::Count,
        "Idempotent calls by how they ended (outcome): executed, replayed, failed (the body returned Err), released, store_error, ..."
    );
    describe_histogram!(
        "idem_claim_duration_seconds",
        Unit::Seconds,
        "Time to claim a key: store round trips until the key is held or answered, waits excluded."
    );
    describe_histogram!(
        "idem_wait_duration_seconds",
        Unit::Seconds,
        "Time a duplicate call spent waiting for the call in progress."
    );
    describe_histogram!(
        "idem_body_duration_seconds",
        Unit::Seconds,
        "Run time of the idempotent function's body."
    );
    describe_histogram!(
        "idem_record_bytes",
        Unit::Bytes,
        "Size of the stored result envelope."
    );
    describe_counter!(
        "idem_steps_total",
        Unit::Count,
        "Durable steps by how they ended (outcome): ran, replayed, failed, in_doubt, reconciled, lease_lost, too_large, store_error."
    );
    describe_histogram!(
        "idem_store_operation_duration_seconds",
        Unit::Seconds,
        "Time of one store round trip, by operation and store."
    );
}

/// Describes the metrics once per process, at the first one recorded.
fn described() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(describe);
}

pub(crate) fn call(namespace: &'static str, store: &'static str, outcome: Outcome) {
    described();
    metrics::counter!(
        "idem_calls_total",
        "namespace" => namespace,
        "store" => store,
        "outcome" => outcome.as_str()
    )
    .increment(1);
}

pub(crate) fn step(store: &'static str, outcome: &'static str) {
    described();
    metrics::counter!("idem_steps_total", "store" => store, "outcome" => outcome).increment(1);
}

pub(crate) fn claim(namespace: &'static str, took: Duration) {
    metrics::histogram!("idem_claim_duration_seconds", "namespace" => namespace).record(took);
}

pub(crate) fn wait(namespace: &'static str, took: Duration) {
    metrics::histogram!("idem_wait_duration_seconds", "namespace" => namespace).record(took);
}

pub(crate) fn body(namespace: &'static str, took: Duration) {
    metrics::histogram!("idem_body_duration_seconds", "namespace" => namespace).record(took);
}

pub(crate) fn record_size(namespace: &'static str, bytes: usize) {
    metrics::histogram!("idem_record_bytes", "namespace" => namespace).record(bytes as f64);
}

pub(crate) fn store_op(operation: &'static str, store: &'static str, took: Duration) {
    described();
    metrics::histogram!(
        "idem_store_operation_duration_seconds",
        "operation" => operation,
        "store" => store
    )
    .record(took);
}

/// Counts one completed record that a store evicted (`cause`: `"size"` for its byte bound,
/// `"expired"` for its own expiry) as `idem_store_evictions_total`. Called by stores that
/// evict, such as the memory store's eviction listener.
///
/// ```
/// idem_core::telemetry::store_eviction("memory", "size");
/// ```
pub fn store_eviction(store: &'static str, cause: &'static str) {
    metrics::counter!("idem_store_evictions_total", "store" => store, "cause" => cause)
        .increment(1);
}
