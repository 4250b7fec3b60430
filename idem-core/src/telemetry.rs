//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`): idem
//! records into whatever recorder the application installed (Prometheus, StatsD, ...), and
//! costs nothing without one.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `idem_calls_total` | counter | `namespace`, `outcome` |
//! | `idem_claim_duration_seconds` | histogram | `namespace` — claim round trips until held or answered, waits excluded |
//! | `idem_wait_duration_seconds` | histogram | `namespace` — time a duplicate spent waiting |
//! | `idem_body_duration_seconds` | histogram | `namespace` |
//! | `idem_record_bytes` | histogram | `namespace` — the stored envelope's size |
//! | `idem_store_operation_duration_seconds` | histogram | `operation` (`claim`, `renew`, `complete`, `release`; `get` when a failed completion looks at the record; `begin` for transactional mode's transaction), `store` |
//! | `idem_store_evictions_total` | counter | `store`, `cause` (`size`: the store's byte bound, `expired`: its own expiry) — completed records a store dropped; recorded by stores that evict (the memory store, with `idem-stores`' feature `metrics`) |
//!
//! Labels never carry a key: cardinality is bounded by the number of namespaces (annotated
//! functions) and outcomes. `docs/operations.md` has dashboard queries.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use metrics_exporter_prometheus::PrometheusBuilder;
//! let recorder = PrometheusBuilder::new().build_recorder();
//! let handle = recorder.handle();
//! metrics::with_local_recorder(&recorder, || {
//!     // In a service: `PrometheusBuilder::new().install_recorder()` once at start-up,
//!     // and serve `handle.render()` on /metrics.
//! });
//! # let _ = handle.render();
//! # }
//! ```

use std::time::Duration;

use crate::Outcome;

pub(crate) fn call(namespace: &'static str, outcome: Outcome) {
    metrics::counter!("idem_calls_total", "namespace" => namespace, "outcome" => outcome.as_str())
        .increment(1);
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
