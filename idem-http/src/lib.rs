//! # idem-http — the IETF `Idempotency-Key` header for tower and axum
//!
//! [`IdempotencyLayer`] wraps a service (an axum `Router`'s routes, any tower service over
//! `http::Request`) so that a client may retry `POST /payments` with the same
//! `Idempotency-Key` header as often as the network forces it to: the handler runs once, and
//! every retry gets the first response back. It uses the same stores, records and semantics as
//! `#[idempotent]`: each protected request is one [`Call`](idem_core::Call) whose key is the
//! header value, whose scope is the value of the layer's [`scope`](IdempotencyLayer::scope)
//! function (the authenticated principal), and whose fingerprint is the request.
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//!
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use idem_http::IdempotencyLayer;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = Arc::new(idem_stores::MemoryStore::new());
//! let runs = Arc::new(AtomicU32::new(0));
//! let payments = ServiceBuilder::new()
//!     .layer(IdempotencyLayer::new(store).unscoped())
//!     .service_fn(move |_req: Request<Full<Bytes>>| {
//!         let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
//!         async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("payment {n}"))))) }
//!     });
//! let pay = |key: &'static str, body: &'static str| {
//!     Request::post("/payments")
//!         .header("idempotency-key", key)
//!         .body(Full::new(Bytes::from(body)))
//!         .unwrap()
//! };
//!
//! let first = payments.clone().oneshot(pay("\"order-42\"", "{\"amount\":1}")).await.unwrap();
//! assert_eq!(first.into_body().collect().await.unwrap().to_bytes(), "payment 1");
//!
//! let retry = payments.clone().oneshot(pay("\"order-42\"", "{\"amount\":1}")).await.unwrap();
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! assert_eq!(retry.into_body().collect().await.unwrap().to_bytes(), "payment 1");
//!
//! let reused = payments.clone().oneshot(pay("\"order-42\"", "{\"amount\":2}")).await.unwrap();
//! assert_eq!(reused.status(), 422);
//! # }
//! ```
//!
//! With axum 0.8: `Router::new().route("/payments", post(create)).route_layer(layer)`.
//!
//! # The protocol
//!
//! | request | response |
//! |---|---|
//! | no `Idempotency-Key` on a protected method (`POST`, `PATCH` by default) | 400 problem (or passed through, with [`required(false)`](IdempotencyLayer::required)) |
//! | a malformed key (empty, longer than 255 characters, not an sf-string or bare token, sent twice) | 400 problem |
//! | a body over the limit (1 MiB by default) | 413 problem |
//! | a new key | the handler runs; its response is sent, and stored if the [`StorePolicy`] says so |
//! | a key whose response is stored, same request | the stored status, headers and body, with `Idempotent-Replayed: true`; the handler does not run |
//! | a key whose first request is still running | 409 problem with `Retry-After` (or, with [`OnConflict::Wait`](idem_core::OnConflict::Wait), the first response once it is there) |
//! | a key used before with another method, path, query, body or fingerprinted header | 422 problem |
//! | the store is unreachable | 503 problem; the handler does not run |
//!
//! **The key.** The header is a structured-field string, `Idempotency-Key: "abc-123"`; a bare
//! value of token characters, `Idempotency-Key: abc-123`, is accepted too and is the same key
//! (see [`parse_key`]). Keys are hashed before they reach the store or the log.
//!
//! **The fingerprint** covers the method, the path, the query string, the body (its BLAKE3
//! digest) and the headers named with
//! [`fingerprint_header`](IdempotencyLayer::fingerprint_header), in order.
//!
//! **The scope.** Records are scoped by the layer's scope function, so two tenants that pick
//! the same key have two records, and one can never receive the other's stored response.
//!
//! **Replay** returns the stored status, end-to-end headers (repeated headers such as
//! `set-cookie` in their order; hop-by-hop headers, `date` and `content-length` are not
//! stored) and body, plus `Idempotent-Replayed: true`.
//!
//! **What is stored** is decided by a [`StorePolicy`]; by default 2xx–4xx responses are stored
//! except 408, 409 and 429, and those and every 5xx release the key so that a retry runs the
//! handler again.
//!
//! **Size limits.** A request body over
//! [`max_request_body`](IdempotencyLayer::max_request_body) is refused with 413 before the
//! key is claimed. A response larger than
//! [`max_response_body`](IdempotencyLayer::max_response_body) (or the store's own limit) is
//! sent to the client as it is, but not stored: the key is released and a warning is logged.
//!
//! **Disconnects.** The claimed request runs in a task of its own, so a client that hangs up
//! does not cancel the handler halfway (which would release the key with the side effect
//! half done): the handler completes, its response is stored, and the retry gets it. This is
//! why the inner service must be `Clone + Send + 'static`.
//!
//! Every response the layer makes itself is an `application/problem+json` document
//! ([`Problem`]).

#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod fingerprint;
mod key_header;
mod layer;
#[cfg(feature = "openapi")]
#[cfg_attr(docsrs, doc(cfg(feature = "openapi")))]
pub mod openapi;
mod policy;
mod problem;
mod replay;
mod service;

pub use body::ResponseBody;
pub use fingerprint::{normalize_media_type, BodyFingerprint};
pub use key_header::{
    parse_key, parse_key_value, parse_key_value_with, parse_key_with, uuid_key, KeyError,
    KeyFormat, DEFAULT_MAX_KEY_LEN,
};
pub use layer::{
    IdempotencyLayer, ScopeChosen, ScopeSet, ScopeUnset, DEFAULT_BODY_LIMIT, DEFAULT_NAMESPACE,
    DEFAULT_RETRY_AFTER, IDEMPOTENCY_KEY,
};
pub use policy::{mark_started, Execution, StorePolicy};
pub use problem::{Problem, DEFAULT_PROBLEM_BASE, PROBLEM_JSON};
pub use replay::{ReplayHeaders, IDEMPOTENT_REPLAYED};
pub use service::IdempotencyService;
