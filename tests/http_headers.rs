//! HTTP details from Stripe and the IETF draft, on axum routers driven in process:
//! `Link: rel="describedby"` on every problem response; the headers that belong to one
//! response (`Set-Cookie`, rate-limit headers, request ids) left out of replays by default,
//! with an allow and a deny list; and the two store policies, `stripe()` (Stripe API v1:
//! a started handler's 500 is stored and replayed) and the default `retry_failures()` (a
//! 500 releases the key, and the retry runs the handler again).
//!
//! ```text
//! cargo test --features http --test http_headers
//! ```

#![cfg(feature = "http")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use idem_core::Store;
use idem_http::{IdempotencyLayer, ReplayHeaders, StorePolicy};
use idem_stores::MemoryStore;
use idem_testkit::{Fault, FaultyStore, Op};
use tower::ServiceExt;

type Runs = Arc<AtomicU64>;

const DOCS: &str = "https://api.example.com/docs/idempotency";

async fn with_headers(State(runs): State<Runs>) -> Response {
    runs.fetch_add(1, Ordering::SeqCst);
    let mut h = HeaderMap::new();
    for (name, value) in [
        ("set-cookie", "session=abc; HttpOnly"),
        ("set-cookie", "csrf=xyz"),
        ("x-request-id", "req-1"),
        ("request-id", "req-1"),
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("ratelimit", "limit=100, remaining=99, reset=50"),
        ("ratelimit-remaining", "99"),
        ("x-ratelimit-limit", "100"),
        ("x-rate-limit-remaining", "99"),
        ("location", "/payments/1"),
        ("x-custom", "kept"),
        ("content-type", "application/json"),
    ] {
        h.append(name, value.parse().unwrap());
    }
    (StatusCode::CREATED, h, "{\"id\":1}").into_response()
}

async fn fail(State(runs): State<Runs>, Path(code): Path<u16>) -> Response {
    runs.fetch_add(1, Ordering::SeqCst);
    let status = StatusCode::from_u16(code).unwrap();
    (
        status,
        [("content-type", "application/json")],
        format!("{{\"run\":{}}}", runs.load(Ordering::SeqCst)),
    )
        .into_response()
}

async fn slow(State(runs): State<Runs>) -> &'static str {
    runs.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    "done"
}

async fn panics() -> &'static str {
    panic!("the handler panics")
}

fn router(layer: IdempotencyLayer, runs: &Runs) -> Router {
    Router::new()
        .route("/headers", post(with_headers))
        .route("/fail/{code}", post(fail))
        .route("/slow", post(slow))
        .route("/panic", post(panics))
        .route_layer(layer)
        .with_state(runs.clone())
}

fn post_req(path: &str, key: Option<&str>, body: &str) -> Request<Body> {
    let mut b = Request::post(path)
        .header("content-type", "application/json")
        .header("authorization", "tenant-1");
    if let Some(key) = key {
        b = b.header("idempotency-key", format!("\"{key}\""));
    }
    b.body(Body::from(body.to_string())).unwrap()
}

async fn send(app: &Router, req: Request<Body>) -> Response {
    app.clone().oneshot(req).await.unwrap()
}

fn scoped(store: Arc<dyn Store>) -> IdempotencyLayer {
    IdempotencyLayer::new(store).scope(|parts| {
        parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    })
}

fn assert_linked(resp: &Response, what: &str) {
    assert!(
        resp.headers()
            .get("content-type")
            .is_some_and(|v| v == "application/problem+json"),
        "{what}: not a problem response: {resp:?}"
    );
    let link = resp
        .headers()
        .get("link")
        .unwrap_or_else(|| panic!("{what}: no Link header: {resp:?}"));
    assert_eq!(link, &format!("<{DOCS}>; rel=\"describedby\""), "{what}");
}

#[tokio::test]
async fn every_problem_response_links_to_the_docs() {
    let runs = Runs::default();
    let memory = Arc::new(MemoryStore::new());
    let faulty = Arc::new(FaultyStore::new(memory.clone()));
    let layer = scoped(faulty.clone())
        .problem_docs(DOCS)
        .max_request_body(64);
    let app = router(layer, &runs);

    // 400: no key.
    let resp = send(&app, post_req("/headers", None, "{}")).await;
    assert_eq!(resp.status(), 400);
    assert_linked(&resp, "400 missing-key");

    // 401: no identity to scope by.
    let req = Request::post("/headers")
        .header("idempotency-key", "\"k-401\"")
        .body(Body::from("{}"))
        .unwrap();
    let resp = send(&app, req).await;
    assert_eq!(resp.status(), 401);
    assert_linked(&resp, "401 missing-scope");

    // 413: body over the limit.
    let resp = send(&app, post_req("/headers", Some("k-413"), &"x".repeat(200))).await;
    assert_eq!(resp.status(), 413);
    assert_linked(&resp, "413 request-too-large");

    // 422: the key again with another body.
    let resp = send(&app, post_req("/headers", Some("k-422"), "{\"a\":1}")).await;
    assert_eq!(resp.status(), 201);
    let resp = send(&app, post_req("/headers", Some("k-422"), "{\"a\":2}")).await;
    assert_eq!(resp.status(), 422);
    assert_linked(&resp, "422 key-reused");

    // 409: the key while its first request runs.
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_req("/slow", Some("k-409"), "{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(80)).await;
    let resp = send(&app, post_req("/slow", Some("k-409"), "{}")).await;
    assert_eq!(resp.status(), 409);
    assert_linked(&resp, "409 in-progress");
    assert_eq!(first.await.unwrap().status(), 200);

    // 500: the handler panics.
    let resp = send(&app, post_req("/panic", Some("k-500"), "{}")).await;
    assert_eq!(resp.status(), 500);
    assert_linked(&resp, "500 internal");

    // 503: the store fails every claim.
    for _ in 0..10 {
        faulty.plan(Fault::FailBefore(Op::Claim));
    }
    let resp = send(&app, post_req("/headers", Some("k-503"), "{}")).await;
    assert_eq!(resp.status(), 503);
    assert_linked(&resp, "503 store-unavailable");
}

#[tokio::test]
async fn without_docs_no_link() {
    let runs = Runs::default();
    let app = router(scoped(Arc::new(MemoryStore::new())), &runs);
    let resp = send(&app, post_req("/headers", None, "{}")).await;
    assert_eq!(resp.status(), 400);
    assert!(resp.headers().get("link").is_none());
}

fn names(resp: &Response) -> Vec<String> {
    resp.headers()
        .keys()
        .map(|k| k.as_str().to_string())
        .collect()
}

#[tokio::test]
async fn one_responses_own_headers_are_not_replayed_by_default() {
    let runs = Runs::default();
    let app = router(scoped(Arc::new(MemoryStore::new())), &runs);
    let first = send(&app, post_req("/headers", Some("h-1"), "{}")).await;
    assert_eq!(first.status(), 201);
    // The first response is the handler's own, every header untouched.
    for name in [
        "set-cookie",
        "x-request-id",
        "ratelimit-remaining",
        "traceparent",
    ] {
        assert!(
            first.headers().contains_key(name),
            "{name}: {:?}",
            names(&first)
        );
    }
    let replay = send(&app, post_req("/headers", Some("h-1"), "{}")).await;
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    for name in [
        "set-cookie",
        "x-request-id",
        "request-id",
        "traceparent",
        "ratelimit",
        "ratelimit-remaining",
        "x-ratelimit-limit",
        "x-rate-limit-remaining",
    ] {
        assert!(
            !replay.headers().contains_key(name),
            "{name} was replayed: {:?}",
            names(&replay)
        );
    }
    assert_eq!(replay.headers()["location"], "/payments/1");
    assert_eq!(replay.headers()["x-custom"], "kept");
    assert_eq!(replay.headers()["content-type"], "application/json");
}

#[tokio::test]
async fn the_allow_and_deny_lists_choose_the_replayed_headers() {
    let runs = Runs::default();
    let headers = ReplayHeaders::default()
        .allow("Set-Cookie")
        .allow("x-request-id")
        .deny("X-Custom")
        .deny_prefix("loc");
    let app = router(
        scoped(Arc::new(MemoryStore::new())).replay_headers(headers),
        &runs,
    );
    send(&app, post_req("/headers", Some("h-2"), "{}")).await;
    let replay = send(&app, post_req("/headers", Some("h-2"), "{}")).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let cookies: Vec<_> = replay.headers().get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["session=abc; HttpOnly", "csrf=xyz"]);
    assert_eq!(replay.headers()["x-request-id"], "req-1");
    assert!(!replay.headers().contains_key("x-custom"));
    assert!(!replay.headers().contains_key("location"));
    assert!(!replay.headers().contains_key("ratelimit-remaining"));

    // ReplayHeaders::all() keeps everything end to end.
    let app = router(
        scoped(Arc::new(MemoryStore::new())).replay_headers(ReplayHeaders::all()),
        &runs,
    );
    send(&app, post_req("/headers", Some("h-3"), "{}")).await;
    let replay = send(&app, post_req("/headers", Some("h-3"), "{}")).await;
    for name in [
        "set-cookie",
        "x-request-id",
        "x-ratelimit-limit",
        "x-custom",
    ] {
        assert!(replay.headers().contains_key(name), "{name}");
    }
}

async fn body_text(resp: Response) -> String {
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn stripe_stores_a_started_handlers_500_and_replays_it() {
    let runs = Runs::default();
    let app = router(
        scoped(Arc::new(MemoryStore::new())).policy(StorePolicy::stripe()),
        &runs,
    );
    let first = send(&app, post_req("/fail/500", Some("s-1"), "{}")).await;
    assert_eq!(first.status(), 500);
    assert_eq!(body_text(first).await, "{\"run\":1}");
    let again = send(&app, post_req("/fail/500", Some("s-1"), "{}")).await;
    assert_eq!(again.status(), 500);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(body_text(again).await, "{\"run\":1}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran twice");
    // 429 and 409 of a started handler are stored too.
    for code in [429, 409, 503] {
        let key = format!("s-{code}");
        send(&app, post_req(&format!("/fail/{code}"), Some(&key), "{}")).await;
        let again = send(&app, post_req(&format!("/fail/{code}"), Some(&key), "{}")).await;
        assert_eq!(again.status(), code);
        assert_eq!(again.headers()["idempotent-replayed"], "true", "{code}");
    }
}

#[tokio::test]
async fn the_default_retries_failed_work() {
    for layer in [
        scoped(Arc::new(MemoryStore::new())),
        scoped(Arc::new(MemoryStore::new())).policy(StorePolicy::retry_failures()),
    ] {
        let runs = Runs::default();
        let app = router(layer, &runs);
        let first = send(&app, post_req("/fail/500", Some("r-1"), "{}")).await;
        assert_eq!(first.status(), 500);
        let again = send(&app, post_req("/fail/500", Some("r-1"), "{}")).await;
        assert_eq!(again.status(), 500);
        assert!(again.headers().get("idempotent-replayed").is_none());
        assert_eq!(body_text(again).await, "{\"run\":2}");
        assert_eq!(
            runs.load(Ordering::SeqCst),
            2,
            "the failed work did not run again"
        );
        // A 201 is stored.
        send(&app, post_req("/headers", Some("r-2"), "{}")).await;
        let again = send(&app, post_req("/headers", Some("r-2"), "{}")).await;
        assert_eq!(again.headers()["idempotent-replayed"], "true");
    }
}
