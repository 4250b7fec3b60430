//! Issue 15, end to end over real HTTP (reqwest against axum on 127.0.0.1:0): tenant
//! isolation by default, routing responses never stored, the Stripe store policy and its
//! presets, problem documents, key formats, fingerprint options, the retry of a broken store
//! connection, and streamed responses.
//!
//! ```text
//! cargo test --features http --test http_semantics
//! IDEM_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test --features http,redis --test http_semantics
//! ```

#![cfg(feature = "http")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod http_support;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use idem_core::{
    async_trait, Claim, ClaimRequest, FencingToken, Key, RecordState, Store, StoreError,
};
use idem_http::{mark_started, uuid_key, Execution, IdempotencyLayer, KeyFormat, StorePolicy};
use idem_stores::MemoryStore;
use serde_json::json;

use http_support::{fresh_key, is_replayed, options, problem, Server};

// ---- a small app --------------------------------------------------------------------------

type Runs = Arc<AtomicU64>;

#[derive(Clone)]
struct Tenant(String);

struct App {
    base: String,
    client: reqwest::Client,
    runs: Runs,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    async fn serve(router: Router, runs: Runs) -> App {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        App {
            base,
            client: reqwest::Client::new(),
            runs,
            task,
        }
    }

    /// Routes of every kind behind `layer`, installed with `Router::layer` (it sees routing's
    /// own 404s and 405s).
    async fn start(layer: IdempotencyLayer) -> App {
        let runs: Runs = Arc::default();
        let router = routes(runs.clone()).layer(layer);
        App::serve(router, runs).await
    }

    fn req(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        req
    }

    fn post(&self, path: &str, key: Option<&str>) -> reqwest::RequestBuilder {
        self.req(reqwest::Method::POST, path, key)
    }

    fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }
}

#[derive(serde::Deserialize, serde::Serialize)]
struct Order {
    amount: u64,
    #[serde(default)]
    note: String,
}

fn routes(runs: Runs) -> Router {
    Router::new()
        .route("/orders", post(create_order))
        .route("/plain", post(plain))
        .route("/validated", post(validated))
        .route("/fail/{code}", post(fail))
        .route("/only-get", get(plain))
        .route("/stream", post(stream))
        .route("/whoami", post(whoami))
        .with_state(runs)
}

/// A JSON handler whose extractor refuses malformed bodies (400/415/422, plain text).
async fn create_order(State(runs): State<Runs>, Json(order): Json<Order>) -> Response {
    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        Json(json!({"run": n, "amount": order.amount, "note": order.note})),
    )
        .into_response()
}

async fn plain(State(runs): State<Runs>, body: String) -> String {
    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
    format!("run {n}: {body}")
}

/// Validates by itself, and marks a refusal so that the key is released.
async fn validated(State(runs): State<Runs>, body: String) -> Response {
    if body.is_empty() {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Extension(Execution::Rejected),
            Json(json!({"error": "empty body"})),
        )
            .into_response();
    }
    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, format!("run {n}")).into_response()
}

async fn fail(
    State(runs): State<Runs>,
    axum::extract::Path(code): axum::extract::Path<u16>,
) -> Response {
    mark_started();
    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::from_u16(code).unwrap(), format!("run {n}")).into_response()
}

async fn whoami(State(runs): State<Runs>, tenant: Option<Extension<Tenant>>) -> String {
    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
    let who = tenant.map_or("nobody".to_string(), |Extension(Tenant(t))| t);
    format!("run {n} paid by {who}")
}

/// Two chunks; the second waits until the client has read the first.
async fn stream(State(runs): State<Runs>, Extension(gate): Extension<Gate>) -> Response {
    runs.fetch_add(1, Ordering::SeqCst);
    Response::new(Body::new(TwoChunks {
        first: Some(Bytes::from_static(b"first;")),
        gate: Some(Box::pin(gate.0.clone().acquire_owned())),
    }))
}

#[derive(Clone)]
struct Gate(Arc<tokio::sync::Semaphore>);

type Acquire = Pin<
    Box<
        dyn Future<Output = Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError>>
            + Send,
    >,
>;

struct TwoChunks {
    first: Option<Bytes>,
    gate: Option<Acquire>,
}

impl http_body::Body for TwoChunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(first))));
        }
        let Some(gate) = self.gate.as_mut() else {
            return Poll::Ready(None);
        };
        match gate.as_mut().poll(cx) {
            Poll::Ready(permit) => {
                permit.unwrap().forget();
                self.gate = None;
                Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                    b"second",
                )))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn memory() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

fn key() -> String {
    format!("\"sem-{:x}\"", FencingToken::random().0)
}

// ---- 8. tenant isolation by default ---------------------------------------------------------

/// `Authorization: Bearer <tenant>` → a `Tenant` in the extensions.
async fn auth(mut req: Request, next: Next) -> Response {
    let tenant = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    match tenant {
        Some(t) => {
            req.extensions_mut().insert(Tenant(t));
            next.run(req).await
        }
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

async fn layer_outside_the_auth_layer_never_replays_across_tenants() {
    // The mistake of issue 15: the idempotency layer outside authentication, so the principal
    // is not in the extensions yet when the scope function runs.
    let layer = IdempotencyLayer::new(memory())
        .scope(|parts| parts.extensions.get::<Tenant>().map(|t| t.0.clone()));
    let runs: Runs = Arc::default();
    let router = routes(runs.clone())
        .layer(middleware::from_fn(auth))
        .layer(layer);
    let app = App::serve(router, runs).await;
    let k = key();
    for tenant in ["alice", "mallory"] {
        let resp = app
            .post("/whoami", Some(&k))
            .header("authorization", format!("Bearer {tenant}"))
            .body("pay 10")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "no identity to scope by: refused");
        let doc = problem(resp).await;
        assert_eq!(doc["type"], "urn:idem:problem:missing-scope");
    }
    assert_eq!(app.runs(), 0, "nothing ran in a shared record space");

    // The fix that works outside authentication: scope by the credential itself.
    let layer = IdempotencyLayer::new(memory()).scope(|parts| {
        parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    let runs: Runs = Arc::default();
    let router = routes(runs.clone())
        .layer(middleware::from_fn(auth))
        .layer(layer);
    let app = App::serve(router, runs).await;
    let mut bodies = Vec::new();
    for tenant in ["alice", "mallory", "alice"] {
        let resp = app
            .post("/whoami", Some(&k))
            .header("authorization", format!("Bearer {tenant}"))
            .body("pay 10")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        bodies.push((is_replayed(&resp), resp.text().await.unwrap()));
    }
    assert_eq!(
        bodies,
        [
            (false, "run 1 paid by alice".to_string()),
            (false, "run 2 paid by mallory".to_string()),
            (true, "run 1 paid by alice".to_string()),
        ],
        "mallory never receives alice's stored response"
    );
}

async fn unscoped_requests_share_a_space_only_when_allowed() {
    let layer = IdempotencyLayer::new(memory())
        .scope(|parts| parts.extensions.get::<Tenant>().map(|t| t.0.clone()))
        .allow_unscoped_requests();
    let app = App::start(layer).await;
    let k = key();
    let first = app
        .post("/whoami", Some(&k))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(first.text().await.unwrap(), "run 1 paid by nobody");
    let again = app
        .post("/whoami", Some(&k))
        .body("x")
        .send()
        .await
        .unwrap();
    assert!(
        is_replayed(&again),
        "the unscoped space, explicitly allowed"
    );
}

// ---- 1. routing responses pass through -------------------------------------------------------

async fn the_example_answers_405_to_a_patch_key_or_not() {
    let server = Server::start(memory(), options(idem_core::OnConflict::Reject)).await;
    let k = fresh_key("patch");
    for key in [None, Some(k.as_str()), Some(k.as_str())] {
        let mut req = server
            .client
            .patch(format!("{}/payments", server.base))
            .header("authorization", "Bearer acme")
            .header("content-type", "application/json")
            .body(r#"{"amount": 1, "currency": "EUR"}"#);
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 405, "key {key:?}");
        assert!(!is_replayed(&resp));
        assert!(resp.headers().contains_key("allow"));
    }
    assert_eq!(server.stats().await.executions, 0);
}

async fn routing_404_and_405_pass_through_untouched_whatever_the_placement() {
    // `Router::layer`: the layer sees the router's own 404 and 405.
    let app = App::start(IdempotencyLayer::new(memory()).unscoped()).await;
    let k = key();
    for _ in 0..2 {
        let nf = app.post("/nowhere", Some(&k)).send().await.unwrap();
        assert_eq!(nf.status(), 404);
        assert!(!is_replayed(&nf));
        assert!(
            nf.bytes().await.unwrap().is_empty(),
            "axum's own 404, untouched"
        );
    }
    let k = key();
    for _ in 0..2 {
        let na = app.post("/only-get", Some(&k)).send().await.unwrap();
        assert_eq!(na.status(), 405);
        assert!(!is_replayed(&na), "a routing 405 is never stored");
        assert_eq!(na.headers()["allow"], "GET,HEAD");
    }
    // The key was released each time: the route it was meant for still takes it.
    let ok = app.post("/plain", Some(&k)).body("a").send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(app.runs(), 1);
}

// ---- 2. validation failures release the key ---------------------------------------------------

async fn extractor_rejections_release_the_key_so_the_fixed_request_runs() {
    // Against the example: a 422 from `Json` (a wrong type), then the corrected body.
    let server = Server::start(memory(), options(idem_core::OnConflict::Reject)).await;
    let k = fresh_key("fixme");
    let bad = server
        .pay(
            "acme",
            Some(&k),
            json!({"amount": "ten", "currency": "EUR"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    assert!(bad.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let fixed = server
        .pay("acme", Some(&k), json!({"amount": 10, "currency": "EUR"}))
        .send()
        .await
        .unwrap();
    assert_eq!(fixed.status(), 201, "the same key, a fixed body: executed");
    assert_eq!(server.stats().await.executions, 1);

    // 415 (no content type) and 400 (broken JSON) alike.
    let app = App::start(IdempotencyLayer::new(memory()).unscoped()).await;
    let k = key();
    let no_type = app
        .post("/orders", Some(&k))
        .body(r#"{"amount":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(no_type.status(), 415);
    let broken = app
        .post("/orders", Some(&k))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(broken.status(), 400);
    let good = app
        .post("/orders", Some(&k))
        .header("content-type", "application/json")
        .body(r#"{"amount":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(good.status(), 201);
    assert_eq!(app.runs(), 1);

    // A handler's own validation failure, marked `Execution::Rejected`.
    let k = key();
    let empty = app.post("/validated", Some(&k)).send().await.unwrap();
    assert_eq!(empty.status(), 422);
    let full = app
        .post("/validated", Some(&k))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(full.status(), 201);
    assert_eq!(app.runs(), 2);
}

async fn presets_per_layer_and_per_route() {
    let runs: Runs = Arc::default();
    let store = memory();
    let base = IdempotencyLayer::new(store).unscoped();
    // One layer per route, each with its policy.
    let router = Router::new()
        .route(
            "/stripe/{code}",
            post(fail).route_layer(base.clone().namespace("stripe")),
        )
        .route(
            "/everything/{code}",
            post(fail).route_layer(
                base.clone()
                    .namespace("all")
                    .policy(StorePolicy::everything()),
            ),
        )
        .route(
            "/legacy",
            post(create_order).route_layer(
                base.clone()
                    .namespace("legacy")
                    .policy(StorePolicy::by_status()),
            ),
        )
        .with_state(runs.clone());
    let app = App::serve(router, runs).await;

    let twice = |path: &'static str| {
        let k = key();
        let app = &app;
        async move {
            let a = app.post(path, Some(&k)).body("{").send().await.unwrap();
            let status = a.status();
            let b = app.post(path, Some(&k)).body("{").send().await.unwrap();
            assert_eq!(b.status(), status);
            is_replayed(&b)
        }
    };
    assert!(
        !twice("/stripe/500").await,
        "the default (retry_failures): a 500 releases the key"
    );
    assert!(
        twice("/everything/500").await,
        "everything: a 500 is stored"
    );
    assert!(
        twice("/everything/429").await,
        "everything: a 429 is stored"
    );
    assert!(
        twice("/legacy").await,
        "by_status: an extractor's 415 is stored"
    );
    assert!(
        twice("/stripe/404").await,
        "a started handler's 404 is stored"
    );
}

// ---- 3 and 4. problem documents -------------------------------------------------------------

async fn problem_types_are_configurable_and_400s_link_to_the_docs() {
    let layer = IdempotencyLayer::new(memory())
        .unscoped()
        .problem_type_base("https://api.example.com/problems/")
        .problem_docs("https://api.example.com/docs/idempotency");
    let app = App::start(layer).await;
    let missing = app.post("/plain", None).send().await.unwrap();
    assert_eq!(missing.status(), 400);
    assert_eq!(
        missing.headers()["link"],
        "<https://api.example.com/docs/idempotency>; rel=\"describedby\""
    );
    assert_eq!(
        problem(missing).await["type"],
        "https://api.example.com/problems/missing-key"
    );
    let malformed = app
        .post("/plain", Some("\"a\", \"b\""))
        .send()
        .await
        .unwrap();
    assert!(malformed.headers().contains_key("link"));
    assert_eq!(
        problem(malformed).await["type"],
        "https://api.example.com/problems/malformed-key"
    );

    let k = key();
    app.post("/plain", Some(&k)).body("a").send().await.unwrap();
    let reused = app.post("/plain", Some(&k)).body("b").send().await.unwrap();
    assert_eq!(reused.status(), 422);
    // Every problem response links to the docs, not only the 400s.
    assert_eq!(
        reused.headers()["link"],
        "<https://api.example.com/docs/idempotency>; rel=\"describedby\""
    );
    assert_eq!(
        problem(reused).await["type"],
        "https://api.example.com/problems/key-reused"
    );
}

async fn a_key_reused_422_is_told_apart_from_a_handlers_422() {
    let app = App::start(IdempotencyLayer::new(memory()).unscoped()).await;
    let k = key();
    let handler_422 = app
        .post("/fail/422", Some(&k))
        .body("a")
        .send()
        .await
        .unwrap();
    assert_eq!(handler_422.status(), 422);
    assert_eq!(
        handler_422.headers()["content-type"],
        "text/plain; charset=utf-8"
    );
    let reused = app
        .post("/fail/422", Some(&k))
        .body("b")
        .send()
        .await
        .unwrap();
    assert_eq!(reused.status(), 422);
    let doc = problem(reused).await;
    assert_eq!(doc["type"], "urn:idem:problem:key-reused");
    assert_eq!(doc["title"], "Idempotency-Key is already used");
    // The handler's 422 is stored (its handler started) and replayed as it was.
    let replay = app
        .post("/fail/422", Some(&k))
        .body("a")
        .send()
        .await
        .unwrap();
    assert!(is_replayed(&replay));
    assert_eq!(replay.text().await.unwrap(), "run 1");
}

// ---- 5. key handling ---------------------------------------------------------------------------

async fn detail(resp: reqwest::Response) -> String {
    assert_eq!(resp.status(), 400);
    problem(resp).await["detail"].as_str().unwrap().to_owned()
}

async fn lists_parameters_and_strict_mode_get_precise_messages() {
    let lenient = App::start(IdempotencyLayer::new(memory()).unscoped()).await;
    let list = detail(
        lenient
            .post("/plain", Some("\"a\", \"b\""))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(
        list.contains("a list is not allowed; send one key"),
        "{list}"
    );
    let params = detail(
        lenient
            .post("/plain", Some("\"a\";v=1"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(params.contains("parameters"), "{params}");
    // Lenient: bare integers and byte sequences are keys like any token.
    for bare in ["12345", ":YWJj:"] {
        let resp = lenient.post("/plain", Some(bare)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{bare}");
    }

    let strict = App::start(
        IdempotencyLayer::new(memory())
            .unscoped()
            .key_format(KeyFormat::Strict),
    )
    .await;
    for (bare, kind) in [
        ("12345", "Integer"),
        (":YWJj:", "Byte Sequence"),
        ("abc-1", "Token"),
    ] {
        let why = detail(strict.post("/plain", Some(bare)).send().await.unwrap()).await;
        assert!(
            why.contains(&format!("an RFC 8941 {kind}, not a String")),
            "{why}"
        );
    }
    assert_eq!(
        strict
            .post("/plain", Some("\"12345\""))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(strict.runs(), 1);
}

async fn a_validation_hook_and_custom_key_sources() {
    let uuids = App::start(
        IdempotencyLayer::new(memory())
            .unscoped()
            .validate_key(uuid_key),
    )
    .await;
    let why = detail(
        uuids
            .post("/plain", Some("\"order-42\""))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(why.contains("must be a UUID"), "{why}");
    let ok = uuids
        .post("/plain", Some("\"8e03978e-40d5-43e8-bc93-6894a57f9324\""))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);

    // Another header.
    let by_header = App::start(
        IdempotencyLayer::new(memory())
            .unscoped()
            .key_header(HeaderName::from_static("x-request-id")),
    )
    .await;
    for _ in 0..2 {
        by_header
            .post("/plain", None)
            .header("x-request-id", "r-1")
            .body("a")
            .send()
            .await
            .unwrap();
    }
    assert_eq!(by_header.runs(), 1, "x-request-id is the key");
    let missing = by_header
        .post("/plain", Some("\"k\""))
        .send()
        .await
        .unwrap();
    assert_eq!(
        missing.status(),
        400,
        "Idempotency-Key is not read any more"
    );

    // A body field.
    let by_field = App::start(
        IdempotencyLayer::new(memory())
            .unscoped()
            .key_from_json("/request_id"),
    )
    .await;
    let body = r#"{"request_id": "r-7", "amount": 1}"#;
    let first = by_field
        .post("/plain", None)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let again = by_field
        .post("/plain", None)
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(is_replayed(&again));
    let none = by_field
        .post("/plain", None)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(problem(none).await["type"], "urn:idem:problem:missing-key");
    assert_eq!(by_field.runs(), 1);
}

// ---- 6. fingerprint options ----------------------------------------------------------------------

/// Posts `a` then `b` with one key to `/plain` with their content types; whether `b` is a
/// replay (`true`) or a 422 (`false`).
async fn same_request(app: &App, a: (&str, &str), b: (&str, &str)) -> bool {
    let k = key();
    let first = app
        .post("/plain", Some(&k))
        .header("content-type", a.0)
        .body(a.1.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let second = app
        .post("/plain", Some(&k))
        .header("content-type", b.0)
        .body(b.1.to_owned())
        .send()
        .await
        .unwrap();
    match second.status().as_u16() {
        200 => {
            assert!(is_replayed(&second));
            true
        }
        422 => false,
        other => panic!("status {other}"),
    }
}

async fn fingerprint_options() {
    const J: &str = "application/json";
    let exact = App::start(
        IdempotencyLayer::new(memory())
            .unscoped()
            .fingerprint_header(header::CONTENT_TYPE),
    )
    .await;
    assert!(!same_request(&exact, (J, r#"{"a":1,"b":2}"#), (J, r#"{"b":2, "a":1}"#)).await);
    // Media types are compared normalised, always.
    assert!(
        same_request(
            &exact,
            (J, r#"{"a":1}"#),
            ("Application/JSON; charset=UTF-8", r#"{"a":1}"#)
        )
        .await
    );
    assert!(!same_request(&exact, (J, "x"), ("text/plain", "x")).await);

    let canonical = App::start(
        IdempotencyLayer::new(memory())
            .unscoped()
            .fingerprint_json(),
    )
    .await;
    assert!(
        same_request(
            &canonical,
            (J, r#"{"a":1,"b":{"c":[1,2]}}"#),
            (J, "{ \"b\": {\"c\": [1, 2]},\n  \"a\": 1 }")
        )
        .await
    );
    assert!(!same_request(&canonical, (J, r#"{"a":1}"#), (J, r#"{"a":2}"#)).await);

    let fields = App::start(
        IdempotencyLayer::new(memory())
            .unscoped()
            .fingerprint_json_fields(["/amount", "/currency"]),
    )
    .await;
    assert!(
        same_request(
            &fields,
            (J, r#"{"amount":1,"currency":"EUR","trace":"a"}"#),
            (J, r#"{"trace":"b","currency":"EUR","amount":1}"#)
        )
        .await
    );
    assert!(
        !same_request(
            &fields,
            (J, r#"{"amount":1,"currency":"EUR"}"#),
            (J, r#"{"amount":2,"currency":"EUR"}"#)
        )
        .await
    );

    let custom = App::start(
        IdempotencyLayer::new(memory())
            .unscoped()
            .fingerprint_fn(|_, body| body.to_ascii_lowercase()),
    )
    .await;
    assert!(same_request(&custom, (J, "ABC"), (J, "abc")).await);
    assert!(!same_request(&custom, (J, "abc"), (J, "abd")).await);

    let none = App::start(IdempotencyLayer::new(memory()).unscoped().no_fingerprint()).await;
    assert!(same_request(&none, (J, "one"), ("text/plain", "two")).await);
}

// ---- 7. a retry on a broken store connection ----------------------------------------

/// A memory store whose first `failures` claims fail as a broken connection would.
#[derive(Debug)]
struct Flaky {
    inner: MemoryStore,
    failures: AtomicU64,
    claims: AtomicU64,
}

#[async_trait]
impl Store for Flaky {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        let left = self.failures.load(Ordering::SeqCst);
        if left > 0 {
            self.failures.store(left - 1, Ordering::SeqCst);
            let broken = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "broken pipe");
            return Err(StoreError::backend("claim", broken));
        }
        self.inner.claim(req).await
    }
    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.complete(key, token, value, ttl).await
    }
    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
    async fn renew(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.inner.renew(key, token, lease).await
    }
    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError> {
        self.inner.get(key).await
    }
    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        self.inner.wait(key, timeout).await
    }
    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        self.inner.remove(key).await
    }
    fn release_detached(&self, key: Key, token: FencingToken) {
        self.inner.release_detached(key, token)
    }
}

async fn a_broken_connection_is_retried_once_before_503() {
    let flaky = Arc::new(Flaky {
        inner: MemoryStore::new(),
        failures: AtomicU64::new(1),
        claims: AtomicU64::new(0),
    });
    let app = App::start(IdempotencyLayer::new(flaky.clone()).unscoped()).await;
    let resp = app
        .post("/plain", Some(&key()))
        .body("a")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "the retry on a fresh connection succeeds"
    );
    assert_eq!(
        flaky.claims.load(Ordering::SeqCst),
        2,
        "one retry was enough"
    );
    assert_eq!(app.runs(), 1);

    // Down for good: a few retries (the runtime's), then 503, the handler not run.
    flaky.failures.store(u64::MAX, Ordering::SeqCst);
    flaky.claims.store(0, Ordering::SeqCst);
    let resp = app
        .post("/plain", Some(&key()))
        .body("a")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(
        problem(resp).await["type"],
        "urn:idem:problem:store-unavailable"
    );
    assert!(
        flaky.claims.load(Ordering::SeqCst) >= 2,
        "retried before the 503"
    );
    assert_eq!(app.runs(), 1);
}

/// The first request after Redis dropped every connection (a restart, as the store sees it):
/// a TCP proxy in front of Redis is cut, and the next request still succeeds.
#[cfg(feature = "redis")]
async fn first_request_after_a_redis_restart_succeeds() {
    let Ok(url) = std::env::var("IDEM_TEST_REDIS_URL") else {
        println!("skipped: IDEM_TEST_REDIS_URL is not set");
        return;
    };
    let upstream = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let proxy = Proxy::start(upstream).await;
    let store = idem_stores::RedisStore::builder(format!("redis://{}", proxy.addr))
        .prefix(http_support::redis_keys::run_prefix("http"))
        .build()
        .await
        .unwrap();
    let app = App::start(IdempotencyLayer::new(Arc::new(store)).unscoped()).await;
    let resp = app
        .post("/plain", Some(&key()))
        .body("a")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let resp = app
        .post("/plain", Some(&key()))
        .body("b")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "not a 503: retried on a new connection");
    assert_eq!(app.runs(), 2);
}

#[cfg(feature = "redis")]
struct Proxy {
    addr: std::net::SocketAddr,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

#[cfg(feature = "redis")]
impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let list = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                list.lock().unwrap().push(conn.abort_handle());
            }
        });
        Proxy { addr, conns, task }
    }

    /// Drops every open connection (the listener keeps accepting new ones).
    fn cut(&self) {
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }
}

#[cfg(feature = "redis")]
impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

// ---- 8. streamed and large responses ---------------------------------------------------------------

async fn a_streamed_response_passes_through_unbuffered_and_releases_the_key() {
    let gate = Gate(Arc::new(tokio::sync::Semaphore::new(0)));
    let runs: Runs = Arc::default();
    let router = routes(runs.clone())
        .layer(IdempotencyLayer::new(memory()).unscoped())
        .layer(Extension(gate.clone()));
    let app = App::serve(router, runs).await;
    let k = key();
    for run in 1..=2 {
        let mut resp = app.post("/stream", Some(&k)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        // The first chunk arrives while the handler's body is still waiting for the second:
        // nothing is buffered.
        let first = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
            .await
            .expect("the first chunk is not held back")
            .unwrap()
            .unwrap();
        assert_eq!(&first[..], b"first;");
        gate.0.add_permits(1);
        assert_eq!(resp.text().await.unwrap(), "second");
        assert_eq!(app.runs(), run, "not stored: the key was released");
    }

    // Opted in: a stream is buffered (up to the limit) and stored.
    let runs: Runs = Arc::default();
    let router = routes(runs.clone())
        .layer(
            IdempotencyLayer::new(memory())
                .unscoped()
                .buffer_streams(true),
        )
        .layer(Extension(gate.clone()));
    let app = App::serve(router, runs).await;
    gate.0.add_permits(1);
    let first = app.post("/stream", Some(&k)).send().await.unwrap();
    assert_eq!(first.text().await.unwrap(), "first;second");
    let again = app.post("/stream", Some(&k)).send().await.unwrap();
    assert!(is_replayed(&again));
    assert_eq!(again.text().await.unwrap(), "first;second");
    assert_eq!(app.runs(), 1);
}

fn main() -> std::process::ExitCode {
    #[allow(unused_mut)]
    let mut cases = vec![idem_testkit::test_cases!([], multi_thread(2);
            layer_outside_the_auth_layer_never_replays_across_tenants,
            unscoped_requests_share_a_space_only_when_allowed,
            the_example_answers_405_to_a_patch_key_or_not,
            routing_404_and_405_pass_through_untouched_whatever_the_placement,
            extractor_rejections_release_the_key_so_the_fixed_request_runs,
            presets_per_layer_and_per_route,
            problem_types_are_configurable_and_400s_link_to_the_docs,
            a_key_reused_422_is_told_apart_from_a_handlers_422,
            lists_parameters_and_strict_mode_get_precise_messages,
            a_validation_hook_and_custom_key_sources,
            fingerprint_options,
            a_broken_connection_is_retried_once_before_503,
            a_streamed_response_passes_through_unbuffered_and_releases_the_key)];
    #[cfg(feature = "redis")]
    cases.push(
        idem_testkit::test_cases!([http_support::REDIS], multi_thread(2);
        first_request_after_a_redis_restart_succeeds),
    );
    let code = idem_testkit::harness::run(cases);
    http_support::forget_run_data();
    code
}
