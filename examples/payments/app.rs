//! The payments service: routes, handlers, state and the choice of store.
//!
//! Kept apart from `main.rs` so that the end-to-end tests (`tests/http_*.rs`) start exactly
//! this service on a loopback port.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use idempo::http::{mark_started, IdempotencyLayer, Problem};
use idempo::{idempotent, OnConflict, Store};
use serde::{Deserialize, Serialize};

/// How the idempotency layer treats a duplicate that arrives while the first request runs,
/// and how long a claim is leased.
#[derive(Debug, Clone)]
pub struct AppOptions {
    /// `Reject`: 409 with `Retry-After`; `Wait`: wait for the first response and replay it.
    pub on_conflict: OnConflict,
    /// How long a duplicate waits in `Wait` mode.
    pub wait_timeout: Duration,
    /// The lease of a request in flight (renewed while the handler runs).
    pub lease: Duration,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            on_conflict: OnConflict::Reject,
            wait_timeout: Duration::from_secs(10),
            lease: Duration::from_secs(10),
        }
    }
}

/// The authenticated caller: the tenant named by `Authorization: Bearer <tenant>`.
///
/// A stand-in for real authentication; what matters is that it runs *outside* the
/// idempotency layer and leaves the principal in the request's extensions, where the layer's
/// scope function reads it.
#[derive(Debug, Clone)]
pub struct Principal(pub String);

/// `POST /payments` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewPayment {
    /// Amount in minor units.
    pub amount: u64,
    /// ISO currency code.
    pub currency: String,
    /// Makes the handler take this long (to let a client time out while it works).
    #[serde(default)]
    pub delay_ms: u64,
    /// Makes the handler fail with this status instead of paying (e.g. 503).
    #[serde(default)]
    pub fail_with: Option<u16>,
}

/// A payment, as the service answers it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Payment {
    /// `pay_<n>`.
    pub id: String,
    /// The tenant that made it.
    pub tenant: String,
    /// Amount in minor units.
    pub amount: u64,
    /// ISO currency code.
    pub currency: String,
    /// The provider's capture reference.
    pub capture: String,
}

/// What `GET /stats` reports.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Times the `POST /payments` handler ran.
    pub executions: u64,
    /// Times the payment provider actually captured money.
    pub captures: u64,
}

struct AppState {
    store: Arc<dyn Store>,
    executions: AtomicU64,
    captures: AtomicU64,
    next_id: AtomicU64,
    payments: Mutex<HashMap<(String, String), Payment>>,
}

type Shared = Arc<AppState>;

/// The service: `POST /payments` behind the `Idempotency-Key` layer, `GET /payments/{id}`
/// and `GET /stats` without it, all behind the (stand-in) authentication.
pub fn router(store: Arc<dyn Store>, options: AppOptions) -> Router {
    let state = Arc::new(AppState {
        store: store.clone(),
        executions: AtomicU64::new(0),
        captures: AtomicU64::new(0),
        next_id: AtomicU64::new(1),
        payments: Mutex::new(HashMap::new()),
    });
    // Keys are kept per tenant: the principal that `authenticate` (outside) put in the
    // extensions. A request without one would get 401 `missing-scope`.
    let idempotency = IdempotencyLayer::new(store)
        .namespace("payments::http")
        .scope(|req| req.extensions.get::<Principal>().map(|p| p.0.clone()))
        .fingerprint_header(header::CONTENT_TYPE)
        .on_conflict(options.on_conflict)
        .wait_timeout(options.wait_timeout)
        .lease(options.lease)
        .ttl(Duration::from_secs(24 * 3600));
    // `route_layer`: the layer wraps the POST handler only, so that a PATCH gets axum's 405
    // and an unknown path its 404, untouched (never a 400 for a missing key).
    Router::new()
        .route("/payments", post(create_payment).route_layer(idempotency))
        .route("/payments/{id}", get(get_payment))
        .route("/stats", get(stats))
        .layer(middleware::from_fn(authenticate))
        .with_state(state)
}

/// Serves `router` on `listener` until the process ends.
#[allow(dead_code)] // the tests' server (tests/http_support); `main` serves until a signal
pub async fn serve(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router).await
}

/// Serves `router` on `listener` until `signal` resolves, then stops accepting connections and
/// returns once the requests in flight have been answered (axum's graceful shutdown).
#[allow(dead_code)] // `main`'s server; the tests use `serve`
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    router: Router,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(signal)
        .await
}

/// The store named by `kind` (`memory`, `redis`, `postgres`), connected to `url` for the
/// remote ones.
pub async fn open_store(kind: &str, url: Option<&str>) -> Result<Arc<dyn Store>, String> {
    match kind {
        "memory" => Ok(Arc::new(idempo::MemoryStore::new())),
        "redis" => open_redis(url.ok_or("IDEM_REDIS_URL is not set")?).await,
        "postgres" => open_postgres(url.ok_or("IDEM_POSTGRES_URL is not set")?).await,
        other => Err(format!(
            "unknown store `{other}`: choose memory, redis or postgres"
        )),
    }
}

#[cfg(feature = "redis")]
async fn open_redis(url: &str) -> Result<Arc<dyn Store>, String> {
    let store = idempo::RedisStore::connect(url)
        .await
        .map_err(|e| format!("redis at {url}: {e}"))?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "redis"))]
async fn open_redis(_url: &str) -> Result<Arc<dyn Store>, String> {
    Err("this build has no Redis store: build with --features http,redis".to_string())
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str) -> Result<Arc<dyn Store>, String> {
    let store = idempo::sql::postgres::PostgresStore::connect(url)
        .await
        .map_err(|e| format!("postgres at {url}: {e}"))?;
    store
        .migrate()
        .await
        .map_err(|e| format!("postgres migration: {e}"))?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(_url: &str) -> Result<Arc<dyn Store>, String> {
    Err("this build has no PostgreSQL store: build with --features http,postgres".to_string())
}

/// `Authorization: Bearer <tenant>` → a [`Principal`] in the request's extensions; 401
/// without one.
async fn authenticate(mut req: Request, next: Next) -> Response {
    let tenant = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    match tenant {
        Some(tenant) => {
            req.extensions_mut().insert(Principal(tenant));
            next.run(req).await
        }
        None => Problem::new(
            401,
            "urn:payments:problem:unauthenticated",
            "Authentication required",
            "Send Authorization: Bearer <tenant>.".to_string(),
        )
        .into_response()
        .into_response(),
    }
}

/// `POST /payments`: counts the execution, optionally sleeps or fails, captures the money
/// through the provider, and answers 201 with the payment, a `Location` and two cookies.
///
/// A body the `Json` extractor refuses (400/415/422) never gets here: its key is released,
/// and the client may fix the body and retry with the same key.
async fn create_payment(
    State(state): State<Shared>,
    Extension(Principal(tenant)): Extension<Principal>,
    Json(new): Json<NewPayment>,
) -> Response {
    // From here on the request is executed: every response is stored by the policy's status
    // rule, even a plain-text 400 that looks like an extractor's rejection.
    mark_started();
    let execution = state.executions.fetch_add(1, Ordering::SeqCst) + 1;
    if new.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(new.delay_ms)).await;
    }
    if let Some(code) = new.fail_with {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, format!("payment failed with {status}")).into_response();
    }
    // The HTTP layer's hashed key: the downstream capture is keyed by it, so that even a
    // re-run of this handler (say its response could not be recorded) captures once.
    let reference = idempo::current_key()
        .map(|k| k.to_hex())
        .unwrap_or_else(|| format!("unkeyed-{execution}"));
    let capture = match state.capture(&reference, new.amount, &new.currency).await {
        Ok(capture) => capture,
        Err(e) => {
            return Problem::from_error(&e).into_response().into_response();
        }
    };
    let id = format!("pay_{}", state.next_id.fetch_add(1, Ordering::SeqCst));
    let payment = Payment {
        id: id.clone(),
        tenant: tenant.clone(),
        amount: new.amount,
        currency: new.currency,
        capture,
    };
    if let Ok(mut payments) = state.payments.lock() {
        payments.insert((tenant.clone(), id.clone()), payment.clone());
    }
    let mut resp = (StatusCode::CREATED, Json(payment)).into_response();
    let headers = resp.headers_mut();
    for (name, value) in [
        (header::LOCATION, format!("/payments/{id}")),
        (header::SET_COOKIE, format!("last_payment={id}; Path=/")),
        (header::SET_COOKIE, format!("tenant={tenant}; Path=/")),
        (
            header::HeaderName::from_static("x-execution"),
            execution.to_string(),
        ),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.append(name, value);
        }
    }
    resp
}

impl AppState {
    /// The payment provider's capture, idempotent by `reference` on the same store as the
    /// HTTP layer (a remote provider would take `reference` as its own idempotency key).
    #[idempotent(key = reference.to_owned(), store = self.store, namespace = "payments::capture", ttl = "24h")]
    async fn capture(
        &self,
        reference: &str,
        amount: u64,
        currency: &str,
    ) -> Result<String, idempo::Error> {
        let n = self.captures.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(format!("cap_{n}"))
    }
}

/// `GET /payments/{id}`: the caller's own payment, 404 for anyone else's.
async fn get_payment(
    State(state): State<Shared>,
    Extension(Principal(tenant)): Extension<Principal>,
    Path(id): Path<String>,
) -> Response {
    let found = state
        .payments
        .lock()
        .ok()
        .and_then(|p| p.get(&(tenant, id)).cloned());
    match found {
        Some(payment) => Json(payment).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `GET /stats`: how often the handler ran and the provider captured.
async fn stats(State(state): State<Shared>) -> Json<Stats> {
    Json(Stats {
        executions: state.executions.load(Ordering::SeqCst),
        captures: state.captures.load(Ordering::SeqCst),
    })
}
