//! The layer's edges, on small axum routers served on a loopback port: response size limit,
//! store policy, store outage, handler panic, wait timeout, lease renewal, fingerprint parts,
//! optional keys and unprotected methods.
//!
//! ```text
//! cargo test --features http --test http_layer
//! ```

#![cfg(feature = "http")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use idem_core::{
    async_trait, Claim, ClaimRequest, FencingToken, Key, OnConflict, RecordState, Store, StoreError,
};
use idem_http::{IdempotencyLayer, StorePolicy};
use idem_stores::MemoryStore;

type Runs = Arc<AtomicU64>;

struct Harness {
    base: String,
    client: reqwest::Client,
    runs: Runs,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Harness {
    async fn start(layer: IdempotencyLayer) -> Harness {
        let runs: Runs = Arc::default();
        let router = Router::new()
            .route("/big", post(big))
            .route("/sized/{n}", post(sized))
            .route("/status/{code}", post(status).get(status))
            .route("/panic", post(panics))
            .route("/slow", post(slow))
            .route("/echo", post(echo))
            .route_layer(layer)
            .with_state(runs.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Harness {
            base,
            client: reqwest::Client::new(),
            runs,
            task,
        }
    }

    async fn post(&self, path: &str, key: Option<&str>, body: &str) -> reqwest::Response {
        let mut req = self
            .client
            .post(format!("{}{path}", self.base))
            .body(body.to_owned());
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        req.send().await.unwrap()
    }

    fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }
}

async fn big(State(runs): State<Runs>) -> String {
    runs.fetch_add(1, Ordering::SeqCst);
    "x".repeat(5000)
}

async fn sized(State(runs): State<Runs>, Path(n): Path<usize>) -> String {
    runs.fetch_add(1, Ordering::SeqCst);
    "y".repeat(n)
}

async fn status(State(runs): State<Runs>, Path(code): Path<u16>) -> impl IntoResponse {
    // Executed, whatever the status: a plain-text 400 or 422 here is not an extractor's.
    idem_http::mark_started();
    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::from_u16(code).unwrap(), format!("run {n}"))
}

async fn panics(State(runs): State<Runs>) -> String {
    runs.fetch_add(1, Ordering::SeqCst);
    panic!("handler bug");
}

async fn slow(State(runs): State<Runs>) -> String {
    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    format!("slow run {n}")
}

async fn echo(State(runs): State<Runs>, body: String) -> String {
    runs.fetch_add(1, Ordering::SeqCst);
    body
}

fn memory() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

fn key() -> String {
    format!("\"layer-{:x}\"", FencingToken::random().0)
}

fn replayed(resp: &reqwest::Response) -> bool {
    resp.headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

async fn problem_type(resp: reqwest::Response) -> String {
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let doc: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    doc["type"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_response_is_sent_whole_but_not_stored() {
    let h = Harness::start(
        IdempotencyLayer::new(memory())
            .unscoped()
            .max_response_body(1000),
    )
    .await;
    let k = key();
    for run in 1..=2 {
        let resp = h.post("/big", Some(&k), "").await;
        assert_eq!(resp.status(), 200);
        assert!(!replayed(&resp));
        assert_eq!(resp.bytes().await.unwrap().len(), 5000, "sent whole");
        assert_eq!(h.runs(), run, "the key was released: the retry runs again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_within_the_limit_is_stored() {
    let h = Harness::start(
        IdempotencyLayer::new(memory())
            .unscoped()
            .max_response_body(5000),
    )
    .await;
    let k = key();
    h.post("/big", Some(&k), "").await;
    let resp = h.post("/big", Some(&k), "").await;
    assert!(replayed(&resp));
    assert_eq!(resp.bytes().await.unwrap().len(), 5000);
    assert_eq!(h.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_the_stores_limit_is_sent_but_not_stored() {
    // The store takes values up to 3000 bytes; the layer's own limit is 1 MiB. Around the
    // edge the layer's estimate or the runtime's exact check refuses the record; either way
    // the client gets the whole response and the key is released.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::builder().max_value_size(3000).build());
    let h = Harness::start(IdempotencyLayer::new(store).unscoped()).await;
    for (n, stored) in [(2000, true), (2960, false), (2990, false), (3500, false)] {
        let k = key();
        let before = h.runs();
        for _ in 0..2 {
            let resp = h.post(&format!("/sized/{n}"), Some(&k), "").await;
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.bytes().await.unwrap().len(), n, "{n} bytes sent whole");
        }
        let runs = h.runs() - before;
        assert_eq!(runs, if stored { 1 } else { 2 }, "{n} bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_policy_stores_2xx_to_4xx_and_releases_the_retryable_ones() {
    let h = Harness::start(IdempotencyLayer::new(memory()).unscoped()).await;
    for (code, stored) in [
        (200, true),
        (201, true),
        (302, true),
        (400, true),
        (404, true),
        (422, true),
        (408, false),
        (409, false),
        (429, false),
        (500, false),
        (503, false),
    ] {
        let k = key();
        let before = h.runs();
        let first = h.post(&format!("/status/{code}"), Some(&k), "").await;
        assert_eq!(first.status(), code);
        let second = h.post(&format!("/status/{code}"), Some(&k), "").await;
        assert_eq!(second.status(), code);
        assert_eq!(replayed(&second), stored, "status {code}");
        let body = second.text().await.unwrap();
        if stored {
            assert_eq!(h.runs() - before, 1, "status {code} is stored");
            assert_eq!(
                body,
                format!("run {}", before + 1),
                "the first body, replayed"
            );
        } else {
            assert_eq!(h.runs() - before, 2, "status {code} releases the key");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_policy_decides_what_is_stored() {
    let layer = IdempotencyLayer::new(memory())
        .unscoped()
        .policy(StorePolicy::from_fn(|s| s.is_success()));
    let h = Harness::start(layer).await;
    let k = key();
    h.post("/status/404", Some(&k), "").await;
    h.post("/status/404", Some(&k), "").await;
    assert_eq!(h.runs(), 2, "404 released under this policy");
}

/// A store that cannot be reached.
#[derive(Debug)]
struct Down;

#[async_trait]
impl Store for Down {
    async fn claim(&self, _: &ClaimRequest) -> Result<Claim, StoreError> {
        Err(StoreError::Timeout(Duration::from_millis(10)))
    }
    async fn complete(
        &self,
        _: &Key,
        _: FencingToken,
        _: &[u8],
        _: Duration,
    ) -> Result<(), StoreError> {
        Err(StoreError::Timeout(Duration::from_millis(10)))
    }
    async fn release(&self, _: &Key, _: FencingToken) -> Result<(), StoreError> {
        Err(StoreError::Timeout(Duration::from_millis(10)))
    }
    async fn renew(&self, _: &Key, _: FencingToken, _: Duration) -> Result<(), StoreError> {
        Err(StoreError::Timeout(Duration::from_millis(10)))
    }
    async fn get(&self, _: &Key) -> Result<Option<RecordState>, StoreError> {
        Err(StoreError::Timeout(Duration::from_millis(10)))
    }
    async fn wait(&self, _: &Key, _: Duration) -> Result<(), StoreError> {
        Err(StoreError::Timeout(Duration::from_millis(10)))
    }
    async fn remove(&self, _: &Key) -> Result<(), StoreError> {
        Err(StoreError::Timeout(Duration::from_millis(10)))
    }
    fn release_detached(&self, _: Key, _: FencingToken) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_is_503_and_the_handler_does_not_run() {
    let h = Harness::start(IdempotencyLayer::new(Arc::new(Down)).unscoped()).await;
    let resp = h.post("/status/201", Some(&key()), "").await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(
        problem_type(resp).await,
        "urn:idem:problem:store-unavailable"
    );
    assert_eq!(h.runs(), 0, "fail closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_500_and_releases_the_key() {
    let h = Harness::start(IdempotencyLayer::new(memory()).unscoped()).await;
    let k = key();
    for run in 1..=2 {
        let resp = h.post("/panic", Some(&k), "").await;
        assert_eq!(resp.status(), 500);
        assert_eq!(problem_type(resp).await, "urn:idem:problem:internal");
        assert_eq!(h.runs(), run, "released at once, no wait for the lease");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_duplicate_gets_409_when_its_wait_runs_out() {
    let layer = IdempotencyLayer::new(memory())
        .unscoped()
        .on_conflict(OnConflict::Wait)
        .wait_timeout(Duration::from_millis(200));
    let h = Arc::new(Harness::start(layer).await);
    let k = key();
    let first = {
        let (h, k) = (h.clone(), k.clone());
        tokio::spawn(async move { h.post("/slow", Some(&k), "").await.text().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    let dup = h.post("/slow", Some(&k), "").await;
    let waited = t.elapsed();
    assert_eq!(dup.status(), 409);
    assert!(dup.headers().contains_key("retry-after"));
    assert!(waited >= Duration::from_millis(180), "waited {waited:?}");
    assert_eq!(first.await.unwrap(), "slow run 1");
    let replay = h.post("/slow", Some(&k), "").await;
    assert!(replayed(&replay));
    assert_eq!(replay.text().await.unwrap(), "slow run 1");
    assert_eq!(h.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_longer_than_its_lease_keeps_the_key() {
    // Lease 300 ms, handler 1 s: the lease is renewed, so a duplicate at 600 ms (two leases
    // later) is a 409 and not a takeover that would run the handler twice.
    let layer = IdempotencyLayer::new(memory())
        .unscoped()
        .lease(Duration::from_millis(300));
    let h = Arc::new(Harness::start(layer).await);
    let k = key();
    let first = {
        let (h, k) = (h.clone(), k.clone());
        tokio::spawn(async move { h.post("/slow", Some(&k), "").await.status() })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(h.post("/slow", Some(&k), "").await.status(), 409);
    assert_eq!(first.await.unwrap(), 200);
    assert!(replayed(&h.post("/slow", Some(&k), "").await));
    assert_eq!(h.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_a_short_configurable_hint_not_the_lease() {
    for (layer, expected) in [
        (IdempotencyLayer::new(memory()).unscoped(), "1"),
        (
            IdempotencyLayer::new(memory())
                .unscoped()
                .retry_after(Duration::from_millis(2500)),
            "3",
        ),
    ] {
        let h = Arc::new(Harness::start(layer).await);
        let k = key();
        let first = {
            let (h, k) = (h.clone(), k.clone());
            tokio::spawn(async move { h.post("/slow", Some(&k), "").await.status() })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let dup = h.post("/slow", Some(&k), "").await;
        assert_eq!(dup.status(), 409);
        assert_eq!(dup.headers()["retry-after"], expected);
        assert_eq!(first.await.unwrap(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_query_and_body_are_fingerprinted() {
    let h = Harness::start(IdempotencyLayer::new(memory()).unscoped()).await;
    let k = key();
    assert_eq!(h.post("/echo?a=1", Some(&k), "body").await.status(), 200);
    for (path, body) in [
        ("/echo?a=2", "body"),
        ("/echo", "body"),
        ("/echo?a=1", "other"),
        ("/status/200?a=1", "body"),
    ] {
        let resp = h.post(path, Some(&k), body).await;
        assert_eq!(resp.status(), 422, "{path} {body}");
        assert_eq!(problem_type(resp).await, "urn:idem:problem:key-reused");
    }
    let same = h.post("/echo?a=1", Some(&k), "body").await;
    assert!(replayed(&same));
    assert_eq!(same.text().await.unwrap(), "body");
    assert_eq!(h.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_keys_and_unprotected_methods_pass_through() {
    let h = Harness::start(IdempotencyLayer::new(memory()).unscoped().required(false)).await;
    assert_eq!(h.post("/status/201", None, "").await.status(), 201);
    assert_eq!(h.post("/status/201", None, "").await.status(), 201);
    assert_eq!(h.runs(), 2, "no key, no protection");

    // GET is not a protected method: a key on it changes nothing.
    let k = key();
    for _ in 0..2 {
        let resp = h
            .client
            .get(format!("{}/status/200", h.base))
            .header("idempotency-key", &k)
            .send()
            .await
            .unwrap();
        assert!(!replayed(&resp));
    }
    assert_eq!(h.runs(), 4);

    // A malformed key is still refused when the key is optional.
    assert_eq!(h.post("/status/201", Some("\"bad"), "").await.status(), 400);
    assert_eq!(h.runs(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_record_under_the_key_is_500_never_a_garbled_replay() {
    // Another program wrote a `u32` (without a fingerprint) under the record this request maps
    // to: same namespace, same key, no scope.
    let store = memory();
    let raw_key = format!("foreign-{:x}", FencingToken::random().0);
    let written: Result<u32, idem_core::Error> = idem_core::Call::new("idem::http")
        .key(&raw_key)
        .run(&*store, async { Ok(42) })
        .await;
    assert_eq!(written.unwrap(), 42);

    let h = Harness::start(IdempotencyLayer::new(store).unscoped()).await;
    let resp = h.post("/status/201", Some(&raw_key), "").await;
    assert_eq!(resp.status(), 500);
    assert_eq!(problem_type(resp).await, "urn:idem:problem:internal");
    assert_eq!(h.runs(), 0, "not run again, not replayed as something else");
}
