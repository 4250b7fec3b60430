//! The tower `Layer`: the configuration of the `Idempotency-Key` protocol.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use ::http::header::{HeaderName, HeaderValue};
use ::http::request::Parts;
use ::http::Method;
use bytes::Bytes;
use tower::Layer;

use super::fingerprint::{BodyFingerprint, FingerprintMode};
use super::key_header::{KeyFormat, DEFAULT_MAX_KEY_LEN};
use super::policy::StorePolicy;
use super::problem::ProblemConfig;
use super::replay::ReplayHeaders;
use super::service::IdempotencyService;
use idem_core::{OnConflict, Store};

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The default namespace of the layer's records.
pub const DEFAULT_NAMESPACE: &str = "idem::http";

/// The default `Retry-After` of a 409: 1 s.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The default limit on a request body, and on a stored response body: 1 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

type ScopeFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;
type KeyFn = dyn Fn(&Parts, &Bytes) -> Result<Option<String>, String> + Send + Sync;
type ValidateFn = dyn Fn(&str) -> Result<(), String> + Send + Sync;

/// The type-state of a layer whose tenant scope is not chosen yet: it is not a tower
/// [`Layer`] until [`scope`](IdempotencyLayer::scope) or
/// [`unscoped`](IdempotencyLayer::unscoped) is called.
#[derive(Debug, Clone, Copy)]
pub struct ScopeUnset;

/// The type-state of a layer whose tenant scope is chosen (the default type parameter).
#[derive(Debug, Clone, Copy)]
pub struct ScopeSet;

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::ScopeSet {}
}

/// Implemented by the type-state of a layer that may be used: its scope is chosen.
#[diagnostic::on_unimplemented(
    message = "the IdempotencyLayer's tenant scope is not chosen",
    label = "call `.scope(|parts| ...)` or `.unscoped()` on the layer first",
    note = "records are kept per tenant: `.scope(f)` names the request's client (its authenticated principal); `.unscoped()` shares one record space between all clients"
)]
pub trait ScopeChosen: sealed::Sealed {}
impl ScopeChosen for ScopeSet {}

/// A tower [`Layer`] that makes the requests it wraps idempotent by their `Idempotency-Key`
/// header. See the [module docs](crate) for the protocol.
///
/// Building one takes a choice of tenant scope: [`scope`](Self::scope) (records kept per
/// client, the draft's advice) or [`unscoped`](Self::unscoped) (one record space). Without
/// it the layer does not compile:
///
/// ```compile_fail
/// # use std::sync::Arc;
/// use tower::ServiceBuilder;
/// let layer = idem_http::IdempotencyLayer::new(Arc::new(idem_stores::MemoryStore::new()));
/// let svc = ServiceBuilder::new().layer(layer).service_fn(|_req: http::Request<String>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
/// });
/// ```
///
/// With the choice made, it does:
///
/// ```
/// # use std::sync::Arc;
/// use tower::ServiceBuilder;
/// let layer = idem_http::IdempotencyLayer::new(Arc::new(idem_stores::MemoryStore::new()))
///     .unscoped();
/// let svc = ServiceBuilder::new().layer(layer).service_fn(|_req: http::Request<String>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
/// });
/// ```
///
/// Defaults: namespace `"idem::http"`; `POST` and `PATCH` protected, other methods passed
/// through; key required (400 without one), lenient key format; a concurrent duplicate gets
/// 409 ([`OnConflict::Reject`]); records kept 24 h; a 30 s lease renewed while the handler
/// runs; [`StorePolicy::default`]; 1 MiB request and stored-response bodies; streamed
/// responses passed through; keys up to 255 characters; `Retry-After: 1` on a 409.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use idem_http::IdempotencyLayer;
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
pub struct IdempotencyLayer<State = ScopeSet> {
    /// Shared with every service the layer makes (axum may apply a layer once per request).
    config: Arc<Config>,
    state: PhantomData<fn() -> State>,
}

impl<State> Clone for IdempotencyLayer<State> {
    fn clone(&self) -> Self {
        IdempotencyLayer {
            config: self.config.clone(),
            state: PhantomData,
        }
    }
}

/// Where the tenant scope of a request comes from.
#[derive(Clone)]
pub(super) enum ScopeRule {
    /// One record space for every request.
    Unscoped,
    /// The function's value; `None` is refused (401) unless `allow_none`.
    By { f: Arc<ScopeFn>, allow_none: bool },
}

/// Where the key comes from.
#[derive(Clone)]
pub(super) enum KeySource {
    /// A header holding an sf-string (or, leniently, a token).
    Header(HeaderName),
    /// A function of the request head and body.
    Custom(Arc<KeyFn>),
}

/// What a layer was configured with; shared by its services.
#[derive(Clone)]
pub(super) struct Config {
    pub(super) store: Arc<dyn Store>,
    pub(super) namespace: &'static str,
    pub(super) required: bool,
    pub(super) methods: Vec<Method>,
    pub(super) scope: ScopeRule,
    pub(super) key_source: KeySource,
    pub(super) key_format: KeyFormat,
    pub(super) validate_key: Option<Arc<ValidateFn>>,
    pub(super) fingerprint: FingerprintMode,
    pub(super) fingerprint_body: BodyFingerprint,
    pub(super) fingerprint_headers: Vec<HeaderName>,
    pub(super) on_conflict: OnConflict,
    pub(super) wait_timeout: Duration,
    pub(super) ttl: Duration,
    pub(super) lease: Duration,
    pub(super) policy: StorePolicy,
    pub(super) max_request_body: usize,
    pub(super) max_response_body: usize,
    pub(super) buffer_streams: bool,
    pub(super) max_key_len: usize,
    pub(super) retry_after: Duration,
    pub(super) problems: ProblemConfig,
    pub(super) replay_headers: ReplayHeaders,
}

impl IdempotencyLayer<ScopeUnset> {
    /// A layer keeping its records in `store`, with the defaults above. Choose its scope
    /// next: [`scope`](Self::scope) or [`unscoped`](Self::unscoped).
    pub fn new(store: Arc<dyn Store>) -> Self {
        let defaults = idem_core::Options::default();
        IdempotencyLayer {
            config: Arc::new(Config {
                store,
                namespace: DEFAULT_NAMESPACE,
                required: true,
                methods: vec![Method::POST, Method::PATCH],
                scope: ScopeRule::Unscoped,
                key_source: KeySource::Header(HeaderName::from_static(IDEMPOTENCY_KEY)),
                key_format: KeyFormat::Lenient,
                validate_key: None,
                fingerprint: FingerprintMode::Request,
                fingerprint_body: BodyFingerprint::Exact,
                fingerprint_headers: Vec::new(),
                on_conflict: OnConflict::Reject,
                wait_timeout: defaults.wait_timeout,
                ttl: defaults.ttl,
                lease: defaults.lease,
                policy: StorePolicy::default(),
                max_request_body: DEFAULT_BODY_LIMIT,
                max_response_body: DEFAULT_BODY_LIMIT,
                buffer_streams: false,
                max_key_len: DEFAULT_MAX_KEY_LEN,
                retry_after: DEFAULT_RETRY_AFTER,
                problems: ProblemConfig::default(),
                replay_headers: ReplayHeaders::default(),
            }),
            state: PhantomData,
        }
    }

    /// Scopes records by `f`, typically the authenticated principal: the same key under two
    /// scopes never shares a record, so a client can never receive another's stored response
    /// (the IETF draft's security advice). `f` runs on the request's head as this layer sees
    /// it: put the authentication middleware *outside* the layer so its extensions are there,
    /// or derive the scope from the credential itself (the `Authorization` header).
    ///
    /// A request for which `f` returns `None` is refused with **401** problem `missing-scope`
    /// before anything is claimed — unless [`allow_unscoped_requests`](IdempotencyLayer::allow_unscoped_requests)
    /// lets it use the shared, unscoped record space.
    pub fn scope(
        self,
        f: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    ) -> IdempotencyLayer<ScopeSet> {
        self.into_state(ScopeRule::By {
            f: Arc::new(f),
            allow_none: false,
        })
    }

    /// One record space shared by every request: keys must then be unguessable and unique
    /// across clients (random UUIDs), as the draft assumes. Choose this only for a service
    /// with a single client, or one whose keys embed the client.
    pub fn unscoped(self) -> IdempotencyLayer<ScopeSet> {
        self.into_state(ScopeRule::Unscoped)
    }

    fn into_state(mut self, scope: ScopeRule) -> IdempotencyLayer<ScopeSet> {
        self.config_mut().scope = scope;
        IdempotencyLayer {
            config: self.config,
            state: PhantomData,
        }
    }
}

impl IdempotencyLayer<ScopeSet> {
    /// With [`scope`](IdempotencyLayer::scope): a request whose scope function returns `None`
    /// uses the unscoped record space instead of being refused with 401.
    pub fn allow_unscoped_requests(mut self) -> Self {
        if let ScopeRule::By { allow_none, .. } = &mut self.config_mut().scope {
            *allow_none = true;
        }
        self
    }
}

impl<State> IdempotencyLayer<State> {
    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// The records' namespace: two layers with different namespaces never share a record.
    pub fn namespace(mut self, namespace: &'static str) -> Self {
        self.config_mut().namespace = namespace;
        self
    }

    /// Whether a protected request without a key is refused with 400 (`true`, the default)
    /// or passed to the handler unprotected (`false`).
    pub fn required(mut self, required: bool) -> Self {
        self.config_mut().required = required;
        self
    }

    /// The methods the layer protects (default `POST`, `PATCH`); others pass through.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config_mut().methods = methods.into_iter().collect();
        self
    }

    /// Which header values are keys: [`KeyFormat::Lenient`] (the default: an RFC 8941 String
    /// or a bare token) or [`KeyFormat::Strict`] (a String only).
    pub fn key_format(mut self, format: KeyFormat) -> Self {
        self.config_mut().key_format = format;
        self
    }

    /// Takes the key from another header than `Idempotency-Key` (same formats), for clients
    /// that already send one (`X-Request-Id`, say).
    pub fn key_header(mut self, name: HeaderName) -> Self {
        self.config_mut().key_source = KeySource::Header(name);
        self
    }

    /// Takes the key from the request by a function of its head and (buffered) body:
    /// `Ok(Some(key))`, `Ok(None)` for no key (400 `missing-key`, or unprotected with
    /// [`required(false)`](Self::required)), `Err(why)` for an unusable one (400
    /// `malformed-key`). The key is still checked against [`max_key_len`](Self::max_key_len)
    /// and the [validator](Self::validate_key).
    pub fn key_from(
        mut self,
        f: impl Fn(&Parts, &Bytes) -> Result<Option<String>, String> + Send + Sync + 'static,
    ) -> Self {
        self.config_mut().key_source = KeySource::Custom(Arc::new(f));
        self
    }

    /// Takes the key from a member of a JSON body, named by JSON Pointer (`/request_id`): a
    /// string, or a number taken as its decimal text. A body that is not JSON, or lacks the
    /// member, has no key.
    pub fn key_from_json(self, pointer: &'static str) -> Self {
        self.key_from(move |_, body| {
            let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
                return Ok(None);
            };
            match doc.pointer(pointer) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
                Some(_) => Err(format!("`{pointer}` must be a string")),
            }
        })
    }

    /// Checks every key: `Err(why)` refuses it with 400 `malformed-key` and `why` as the
    /// detail. [`uuid_key`](super::uuid_key) accepts UUIDs only.
    pub fn validate_key(
        mut self,
        f: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.config_mut().validate_key = Some(Arc::new(f));
        self
    }

    /// Adds a request header to the fingerprint (method, path, query and body are by
    /// default): a repeat whose value of this header differs is a 422. `Content-Type` is
    /// compared as a normalised media type (`application/json; charset=utf-8` is
    /// `application/json`; see [`normalize_media_type`](super::normalize_media_type)).
    pub fn fingerprint_header(mut self, name: HeaderName) -> Self {
        self.config_mut().fingerprint_headers.push(name);
        self
    }

    /// How the body takes part in the fingerprint: byte for byte (the default), as canonical
    /// JSON, by chosen JSON members, or not at all.
    pub fn fingerprint_body(mut self, body: BodyFingerprint) -> Self {
        self.config_mut().fingerprint_body = body;
        self
    }

    /// Compares the body as canonical JSON: member order and whitespace do not matter.
    pub fn fingerprint_json(self) -> Self {
        self.fingerprint_body(BodyFingerprint::CanonicalJson)
    }

    /// Compares only these JSON members of the body (JSON Pointers: `/amount`).
    pub fn fingerprint_json_fields<I, S>(self, pointers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.fingerprint_body(BodyFingerprint::JsonFields(
            pointers.into_iter().map(Into::into).collect(),
        ))
    }

    /// Replaces the whole fingerprint by `f`'s bytes: two requests with the same key are the
    /// same request when `f` gives the same bytes.
    pub fn fingerprint_fn(
        mut self,
        f: impl Fn(&Parts, &Bytes) -> Vec<u8> + Send + Sync + 'static,
    ) -> Self {
        self.config_mut().fingerprint = FingerprintMode::Custom(Arc::new(f));
        self
    }

    /// No fingerprint: the key alone identifies the request, and a repeat with the same key
    /// gets the stored response whatever it carries (never a 422).
    pub fn no_fingerprint(mut self) -> Self {
        self.config_mut().fingerprint = FingerprintMode::None;
        self
    }

    /// What a request does while another with the same key is being processed: 409 with
    /// `Retry-After` at once ([`OnConflict::Reject`], the default) or wait for the first
    /// response and replay it ([`OnConflict::Wait`], up to [`wait_timeout`](Self::wait_timeout),
    /// then 409).
    pub fn on_conflict(mut self, on_conflict: OnConflict) -> Self {
        self.config_mut().on_conflict = on_conflict;
        self
    }

    /// The `Retry-After` of a 409: how soon a client should try again while the first request
    /// runs. Default 1 s (never more than the first request's remaining lease; sent in whole
    /// seconds, at least 1). A handler that usually takes longer may say so here.
    pub fn retry_after(mut self, retry_after: Duration) -> Self {
        self.config_mut().retry_after = retry_after;
        self
    }

    /// How long a duplicate waits in [`OnConflict::Wait`] mode. Default 10 s.
    pub fn wait_timeout(mut self, wait_timeout: Duration) -> Self {
        self.config_mut().wait_timeout = wait_timeout;
        self
    }

    /// How long a stored response is replayed. Default 24 h.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config_mut().ttl = ttl;
        self
    }

    /// The lease of an in-flight request, renewed while the handler runs. Default 30 s.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config_mut().lease = lease;
        self
    }

    /// Which responses are stored and which release the key:
    /// [`StorePolicy::retry_failures`] (the default: failed work runs again on a retry),
    /// [`StorePolicy::stripe`] (Stripe's API v1: every response once the handler started,
    /// 500s included), [`StorePolicy::by_status`] or your own. For
    /// another policy on one route, install a clone of the layer with another policy on
    /// that route.
    pub fn policy(mut self, policy: StorePolicy) -> Self {
        self.config_mut().policy = policy;
        self
    }

    /// The largest request body accepted on a protected request (413 past it). Default 1 MiB.
    pub fn max_request_body(mut self, limit: usize) -> Self {
        self.config_mut().max_request_body = limit;
        self
    }

    /// The largest response body stored (also bounded by the store's own limit). A larger
    /// response is sent to the client as it is, not stored, and the key is released (with a
    /// warning in the log). Default 1 MiB.
    pub fn max_response_body(mut self, limit: usize) -> Self {
        self.config_mut().max_response_body = limit;
        self
    }

    /// Whether a streamed response (a body of unknown length) is buffered, up to the
    /// response limit, to be stored (`true`), or passed through unbuffered, not stored, with
    /// the key released (`false`, the default).
    pub fn buffer_streams(mut self, buffer: bool) -> Self {
        self.config_mut().buffer_streams = buffer;
        self
    }

    /// The longest key accepted, in characters (400 past it). Default 255.
    pub fn max_key_len(mut self, limit: usize) -> Self {
        self.config_mut().max_key_len = limit;
        self
    }

    /// The prefix of the `type` of the layer's problem documents, instead of
    /// `urn:idem:problem:` — typically your documentation, `https://api.example.com/problems/`,
    /// giving `https://api.example.com/problems/key-reused`.
    pub fn problem_type_base(mut self, base: impl Into<Cow<'static, str>>) -> Self {
        self.config_mut().problems.base = Some(base.into());
        self
    }

    /// A page documenting the `Idempotency-Key` header: every problem response of the layer
    /// (400, 401, 409, 413, 422, 500, 503) links to it with `Link: <url>; rel="describedby"`.
    /// A URL that is not a valid header value is ignored.
    pub fn problem_docs(mut self, url: &str) -> Self {
        self.config_mut().problems.docs =
            HeaderValue::from_str(&format!("<{url}>; rel=\"describedby\"")).ok();
        self
    }

    /// Which response headers are stored and replayed: by default all but `set-cookie`,
    /// rate-limit headers and request ids, which belong to one response
    /// ([`ReplayHeaders`] lists them, and takes an allow and a deny list).
    pub fn replay_headers(mut self, headers: ReplayHeaders) -> Self {
        self.config_mut().replay_headers = headers;
        self
    }
}

impl<State> fmt::Debug for IdempotencyLayer<State> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("store", &self.config.store)
            .field("namespace", &self.config.namespace)
            .field("required", &self.config.required)
            .field("methods", &self.config.methods)
            .field("on_conflict", &self.config.on_conflict)
            .field("policy", &self.config.policy)
            .finish_non_exhaustive()
    }
}

impl<S, State: ScopeChosen> Layer<S> for IdempotencyLayer<State> {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService::new(inner, self.config.clone())
    }
}
