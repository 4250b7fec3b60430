//! Browsers see `Idempotent-Replayed` only when CORS exposes it: the layer behind tower-http's
//! `CorsLayer` with `expose_headers`, as docs/http.md shows, answers a cross-origin replay
//! with the header exposed; and the preflight lets the `Idempotency-Key` request header
//! through.
//!
//! ```text
//! cargo test --features http --test http_cors
//! ```

#![cfg(feature = "http")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use axum::routing::post;
use axum::Router;
use idem_http::{IdempotencyLayer, IDEMPOTENT_REPLAYED};
use idem_stores::MemoryStore;
use tower::ServiceExt;
use tower_http::cors::CorsLayer;

const ORIGIN: &str = "https://app.example.com";

fn app() -> Router {
    let idem = IdempotencyLayer::new(Arc::new(MemoryStore::new())).unscoped();
    let cors = CorsLayer::new()
        .allow_origin(HeaderValue::from_static(ORIGIN))
        .allow_methods([Method::POST])
        .allow_headers([
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("content-type"),
        ])
        .expose_headers([HeaderName::from_static(IDEMPOTENT_REPLAYED)]);
    Router::new()
        .route(
            "/payments",
            post(|| async { (StatusCode::CREATED, "{\"id\":1}") }),
        )
        .route_layer(idem)
        .layer(cors)
}

fn payment(key: &str) -> Request<Body> {
    Request::post("/payments")
        .header("origin", ORIGIN)
        .header("content-type", "application/json")
        .header("idempotency-key", format!("\"{key}\""))
        .body(Body::from("{}"))
        .unwrap()
}

fn exposed(resp: &axum::response::Response) -> Vec<String> {
    resp.headers()
        .get_all("access-control-expose-headers")
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect()
}

#[tokio::test]
async fn a_cross_origin_replay_exposes_idempotent_replayed() {
    let app = app();
    let first = app.clone().oneshot(payment("c-1")).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get(IDEMPOTENT_REPLAYED).is_none());

    let replay = app.clone().oneshot(payment("c-1")).await.unwrap();
    assert_eq!(replay.status(), StatusCode::CREATED);
    assert_eq!(replay.headers()[IDEMPOTENT_REPLAYED], "true");
    assert_eq!(replay.headers()["access-control-allow-origin"], ORIGIN);
    assert!(
        exposed(&replay).contains(&IDEMPOTENT_REPLAYED.to_string()),
        "{:?}",
        replay.headers()
    );
}

#[tokio::test]
async fn the_preflight_allows_the_idempotency_key_header() {
    let app = app();
    let preflight = Request::builder()
        .method(Method::OPTIONS)
        .uri("/payments")
        .header("origin", ORIGIN)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "idempotency-key,content-type",
        )
        .body(Body::empty())
        .unwrap();
    let resp = app.oneshot(preflight).await.unwrap();
    assert!(resp.status().is_success(), "{resp:?}");
    let allowed = resp.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(allowed.contains("idempotency-key"), "{allowed}");
}
