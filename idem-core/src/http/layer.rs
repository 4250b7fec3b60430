//! The tower `Layer` and `Service`.

use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ::http::header::HeaderName;
use ::http::request::Parts;
use ::http::{Method, Request, Response};
use bytes::Bytes;
use http_body::Body;
use serde::Serialize;
use tower::{Layer, Service};

use super::body::{boxed, full, read_limited, Buffered, Prefixed, ResponseBody};
use super::key_header::{parse_key, KeyError, DEFAULT_MAX_KEY_LEN};
use super::policy::StorePolicy;
use super::problem::Problem;
use super::replay::{Blob, StoredResponse};
use crate::{BoxError, Call, Error, OnConflict, Store};

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The default namespace of the layer's records.
pub const DEFAULT_NAMESPACE: &str = "idem::http";

/// The default `Retry-After` of a 409: 1 s.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The default limit on a request body, and on a stored response body: 1 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

type ScopeFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

/// A tower [`Layer`] that makes the requests it wraps idempotent by their `Idempotency-Key`
/// header. See the [module docs](crate::http) for the protocol.
///
/// Defaults: namespace `"idem::http"`; `POST` and `PATCH` protected, other methods passed
/// through; key required (400 without one); no scope; a concurrent duplicate gets 409
/// ([`OnConflict::Reject`]); records kept 24 h; a 30 s lease renewed while the handler runs;
/// [`StorePolicy::default`]; 1 MiB request and stored-response bodies; keys up to 255
/// characters; `Retry-After: 1` on a 409.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use idem_core::http::IdempotencyLayer;
/// use idem_core::{OnConflict, Store};
///
/// fn layer(store: Arc<dyn Store>) -> IdempotencyLayer {
///     IdempotencyLayer::new(store)
///         .namespace("payments-api")
///         // The authenticated principal, put there by an auth middleware.
///         .scope(|req| req.headers.get("x-tenant")?.to_str().ok().map(str::to_owned))
///         .fingerprint_header("content-type")
///         .on_conflict(OnConflict::Wait)
///         .wait_timeout(Duration::from_secs(5))
///         .ttl(Duration::from_secs(24 * 3600))
/// }
/// ```
#[derive(Clone)]
pub struct IdempotencyLayer {
    config: Config,
}

#[derive(Clone)]
struct Config {
    store: Arc<dyn Store>,
    namespace: &'static str,
    required: bool,
    methods: Vec<Method>,
    scope: Option<Arc<ScopeFn>>,
    fingerprint_headers: Vec<HeaderName>,
    on_conflict: OnConflict,
    wait_timeout: Duration,
    ttl: Duration,
    lease: Duration,
    policy: StorePolicy,
    max_request_body: usize,
    max_response_body: usize,
    max_key_len: usize,
    retry_after: Duration,
}

impl IdempotencyLayer {
    /// A layer keeping its records in `store`, with the defaults above.
    pub fn new(store: Arc<dyn Store>) -> Self {
        let defaults = crate::Options::default();
        IdempotencyLayer {
            config: Config {
                store,
                namespace: DEFAULT_NAMESPACE,
                required: true,
                methods: vec![Method::POST, Method::PATCH],
                scope: None,
                fingerprint_headers: Vec::new(),
                on_conflict: OnConflict::Reject,
                wait_timeout: defaults.wait_timeout,
                ttl: defaults.ttl,
                lease: defaults.lease,
                policy: StorePolicy::default(),
                max_request_body: DEFAULT_BODY_LIMIT,
                max_response_body: DEFAULT_BODY_LIMIT,
                max_key_len: DEFAULT_MAX_KEY_LEN,
                retry_after: DEFAULT_RETRY_AFTER,
            },
        }
    }

    /// The records' namespace: two layers with different namespaces never share a record.
    pub fn namespace(mut self, namespace: &'static str) -> Self {
        self.config.namespace = namespace;
        self
    }

    /// Whether a protected request without the header is refused with 400 (`true`, the
    /// default) or passed to the handler unprotected (`false`).
    pub fn required(mut self, required: bool) -> Self {
        self.config.required = required;
        self
    }

    /// The methods the layer protects (default `POST`, `PATCH`); others pass through.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.methods = methods.into_iter().collect();
        self
    }

    /// The scope of a request's record, typically the authenticated principal: the same key
    /// under two scopes never shares a record, so a tenant can never receive another's stored
    /// response. `None` means the unscoped record space (shared by every request that has no
    /// scope). Runs on the request's head, after any middleware outside this layer (put the
    /// authentication layer outside, so that its extensions are visible here).
    pub fn scope(mut self, f: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static) -> Self {
        self.config.scope = Some(Arc::new(f));
        self
    }

    /// Adds a request header to the fingerprint (method, path, query and body always are):
    /// a repeat whose value of this header differs is a 422.
    pub fn fingerprint_header(mut self, name: &'static str) -> Self {
        self.config
            .fingerprint_headers
            .push(HeaderName::from_static(name));
        self
    }

    /// What a request does while another with the same key is being processed: 409 with
    /// `Retry-After` at once ([`OnConflict::Reject`], the default) or wait for the first
    /// response and replay it ([`OnConflict::Wait`], up to [`wait_timeout`](Self::wait_timeout),
    /// then 409).
    pub fn on_conflict(mut self, on_conflict: OnConflict) -> Self {
        self.config.on_conflict = on_conflict;
        self
    }

    /// The `Retry-After` of a 409: how soon a client should try again while the first request
    /// runs. Default 1 s (never more than the first request's remaining lease; sent in whole
    /// seconds, at least 1). A handler that usually takes longer may say so here.
    pub fn retry_after(mut self, retry_after: Duration) -> Self {
        self.config.retry_after = retry_after;
        self
    }

    /// How long a duplicate waits in [`OnConflict::Wait`] mode. Default 10 s.
    pub fn wait_timeout(mut self, wait_timeout: Duration) -> Self {
        self.config.wait_timeout = wait_timeout;
        self
    }

    /// How long a stored response is replayed. Default 24 h.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// The lease of an in-flight request, renewed while the handler runs. Default 30 s.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease;
        self
    }

    /// Which responses are stored and which release the key.
    pub fn policy(mut self, policy: StorePolicy) -> Self {
        self.config.policy = policy;
        self
    }

    /// The largest request body accepted on a protected request (413 past it). Default 1 MiB.
    pub fn max_request_body(mut self, limit: usize) -> Self {
        self.config.max_request_body = limit;
        self
    }

    /// The largest response body stored (also bounded by the store's own limit). A larger
    /// response is sent to the client as it is, not stored, and the key is released (with a
    /// warning in the log). Default 1 MiB.
    pub fn max_response_body(mut self, limit: usize) -> Self {
        self.config.max_response_body = limit;
        self
    }

    /// The longest key accepted, in characters (400 past it). Default 255.
    pub fn max_key_len(mut self, limit: usize) -> Self {
        self.config.max_key_len = limit;
        self
    }
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("store", &self.config.store)
            .field("namespace", &self.config.namespace)
            .field("required", &self.config.required)
            .field("methods", &self.config.methods)
            .field("on_conflict", &self.config.on_conflict)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            config: Arc::new(self.config.clone()),
        }
    }
}

/// The service [`IdempotencyLayer`] wraps around a handler.
///
/// A protected request is handled in a task of its own (`tokio::spawn`): if the client goes
/// away, the handler still runs to completion and its response is stored, so that the retry
/// gets it instead of running the side effect a second time.
pub struct IdempotencyService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: Clone> Clone for IdempotencyService<S> {
    fn clone(&self) -> Self {
        IdempotencyService {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S> fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("namespace", &self.config.namespace)
            .finish_non_exhaustive()
    }
}

impl<S, B, ResB> Service<Request<B>> for IdempotencyService<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    /// Always ready: the inner service is driven to readiness in the request's own task, on a
    /// clone (a replayed request never reaches it).
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        Box::pin(handle(self.config.clone(), self.inner.clone(), req))
    }
}

async fn call_inner<S, Req, ResB>(mut inner: S, req: Req) -> Result<Response<ResB>, S::Error>
where
    S: Service<Req, Response = Response<ResB>>,
{
    poll_fn(|cx| inner.poll_ready(cx)).await?;
    inner.call(req).await
}

async fn passthrough<S, B, ResB>(
    inner: S,
    req: Request<B>,
) -> Result<Response<ResponseBody>, S::Error>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    Ok(call_inner(inner, req).await?.map(boxed))
}

async fn handle<S, B, ResB>(
    config: Arc<Config>,
    inner: S,
    req: Request<B>,
) -> Result<Response<ResponseBody>, S::Error>
where
    S: Service<Request<B>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    if !config.methods.contains(req.method()) {
        return passthrough(inner, req).await;
    }
    let key = match parse_key(req.headers().get_all(IDEMPOTENCY_KEY), config.max_key_len) {
        Ok(key) => key,
        Err(KeyError::Missing) if !config.required => return passthrough(inner, req).await,
        Err(KeyError::Missing) => return Ok(Problem::missing_key().into_response()),
        Err(e) => return Ok(Problem::malformed_key(&e).into_response()),
    };
    let (parts, body) = req.into_parts();
    let bytes = match read_limited(Box::pin(body), config.max_request_body).await {
        Ok(Buffered::Complete(bytes)) => bytes,
        Ok(Buffered::Over { .. }) => {
            return Ok(Problem::request_too_large(config.max_request_body).into_response())
        }
        Err(e) => {
            let e: BoxError = e.into();
            tracing::debug!(target: "idem", error = %e, "request body could not be read");
            return Ok(Problem::unreadable_body().into_response());
        }
    };
    let scope = config.scope.as_ref().and_then(|f| f(&parts));
    let fingerprint = RequestFingerprint::of(&parts, &bytes, &config.fingerprint_headers);
    let req = Request::from_parts(parts, B::from(bytes));
    // The claimed work runs in its own task: dropping this future (the client went away)
    // detaches it instead of cancelling the handler halfway and releasing the key.
    match tokio::spawn(execute(config, inner, req, key, scope, fingerprint)).await {
        Ok(result) => result,
        Err(e) => {
            tracing::error!(target: "idem", error = %e, "idempotent request task failed");
            Ok(
                Problem::internal("The request handler failed (it panicked or was cancelled).")
                    .into_response(),
            )
        }
    }
}

/// What the request is compared by: a repeat with the same key and another fingerprint is 422.
#[derive(Serialize)]
struct RequestFingerprint {
    method: String,
    path: String,
    query: Option<String>,
    headers: Vec<(String, Vec<Blob>)>,
    body: [u8; 32],
}

impl RequestFingerprint {
    fn of(parts: &Parts, body: &Bytes, names: &[HeaderName]) -> Self {
        RequestFingerprint {
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers: names
                .iter()
                .map(|name| {
                    let values = parts
                        .headers
                        .get_all(name)
                        .iter()
                        .map(|v| Blob(v.as_bytes().to_vec()))
                        .collect();
                    (name.as_str().to_owned(), values)
                })
                .collect(),
            body: *blake3::hash(body).as_bytes(),
        }
    }
}

/// How the handler's part of the call ended, when it is not a response to store.
enum Flow<E> {
    /// A refusal or failure of the runtime.
    Idem(Error),
    /// The inner service failed.
    Inner(E),
    /// A response that is not stored (policy, size, body error): the key is released.
    Release,
}

impl<E> From<Error> for Flow<E> {
    fn from(e: Error) -> Self {
        Flow::Idem(e)
    }
}

async fn execute<S, B, ResB>(
    config: Arc<Config>,
    inner: S,
    req: Request<B>,
    key: String,
    scope: Option<String>,
    fingerprint: RequestFingerprint,
) -> Result<Response<ResponseBody>, S::Error>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let store: &dyn Store = &*config.store;
    let store_limit = store.max_value_size();
    let limit = config.max_response_body.min(store_limit);
    // The response as the handler sent it, when the handler ran in this call.
    let mut live: Option<Response<ResponseBody>> = None;
    let live_slot = &mut live;
    let policy = &config.policy;
    let body = async move {
        let resp = call_inner(inner, req).await.map_err(Flow::Inner)?;
        let (parts, body) = resp.into_parts();
        match read_limited(Box::pin(body), limit).await {
            Ok(Buffered::Complete(bytes)) => {
                let stored = StoredResponse::capture(parts.status, &parts.headers, &bytes);
                let status = parts.status;
                *live_slot = Some(Response::from_parts(parts, full(bytes)));
                if !policy.stores(status) {
                    tracing::debug!(target: "idem", %status, "response not stored (policy): key released");
                    return Err(Flow::Release);
                }
                if stored.approximate_size() > store_limit {
                    tracing::warn!(target: "idem", %status, store_limit, "response too large for the store: sent, not stored; key released");
                    return Err(Flow::Release);
                }
                Ok(stored)
            }
            Ok(Buffered::Over { prefix, rest }) => {
                tracing::warn!(target: "idem", status = %parts.status, limit, "response body over the limit: sent, not stored; key released");
                *live_slot = Some(Response::from_parts(
                    parts,
                    boxed(Prefixed::new(prefix, rest)),
                ));
                Err(Flow::Release)
            }
            Err(e) => {
                let e: BoxError = e.into();
                tracing::warn!(target: "idem", error = %e, "response body failed: key released");
                Err(Flow::Release)
            }
        }
    };
    let result = Call::new(config.namespace)
        .key(&key)
        .scope(&scope)
        .fingerprint(&fingerprint)
        .ttl(config.ttl)
        .lease(config.lease)
        .on_conflict(config.on_conflict)
        .wait_timeout(config.wait_timeout)
        .run(store, body)
        .await;
    match (result, live) {
        // The handler ran here: its own response, headers untouched.
        (Ok(_), Some(resp)) | (Err(Flow::Release), Some(resp)) => Ok(resp),
        (Ok(stored), None) => Ok(stored.replay().unwrap_or_else(|why| {
            tracing::error!(target: "idem", %why, "stored response cannot be replayed");
            Problem::internal("The stored response cannot be replayed.").into_response()
        })),
        (Err(Flow::Inner(e)), _) => Err(e),
        (Err(Flow::Idem(e)), Some(resp)) => {
            // The side effect happened: the client gets its response even though the record
            // could not be written (too large for the store, or the lease was lost).
            tracing::error!(target: "idem", error = %e, "response sent but not recorded");
            Ok(resp)
        }
        (Err(Flow::Idem(Error::InProgress { retry_after })), None) => {
            // The remaining lease (30 s by default) is an upper bound, not a good hint.
            let hint = retry_after.map_or(config.retry_after, |l| l.min(config.retry_after));
            Ok(Problem::from_error(&Error::InProgress {
                retry_after: Some(hint),
            })
            .into_response())
        }
        (Err(Flow::Idem(e)), None) => Ok(Problem::from_error(&e).into_response()),
        (Err(Flow::Release), None) => Ok(Problem::internal(
            "The handler's response body failed before it was complete.",
        )
        .into_response()),
    }
}
