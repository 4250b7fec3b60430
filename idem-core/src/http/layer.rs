//! The tower `Layer`: the configuration of the `Idempotency-Key` protocol.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::http::header::HeaderName;
use ::http::request::Parts;
use ::http::Method;
use tower::Layer;

use super::key_header::DEFAULT_MAX_KEY_LEN;
use super::policy::StorePolicy;
use super::service::IdempotencyService;
use crate::{OnConflict, Store};

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
///         .fingerprint_header(http::header::CONTENT_TYPE)
///         .on_conflict(OnConflict::Wait)
///         .wait_timeout(Duration::from_secs(5))
///         .ttl(Duration::from_secs(24 * 3600))
/// }
/// ```
#[derive(Clone)]
pub struct IdempotencyLayer {
    config: Config,
}

/// What a layer was configured with; shared by its services.
#[derive(Clone)]
pub(super) struct Config {
    pub(super) store: Arc<dyn Store>,
    pub(super) namespace: &'static str,
    pub(super) required: bool,
    pub(super) methods: Vec<Method>,
    pub(super) scope: Option<Arc<ScopeFn>>,
    pub(super) fingerprint_headers: Vec<HeaderName>,
    pub(super) on_conflict: OnConflict,
    pub(super) wait_timeout: Duration,
    pub(super) ttl: Duration,
    pub(super) lease: Duration,
    pub(super) policy: StorePolicy,
    pub(super) max_request_body: usize,
    pub(super) max_response_body: usize,
    pub(super) max_key_len: usize,
    pub(super) retry_after: Duration,
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
    /// a repeat whose value of this header differs is a 422. Name a custom header with
    /// `HeaderName::from_static("x-region")` (lowercase).
    pub fn fingerprint_header(mut self, name: HeaderName) -> Self {
        self.config.fingerprint_headers.push(name);
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
        IdempotencyService::new(inner, Arc::new(self.config.clone()))
    }
}
