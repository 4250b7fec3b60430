//! The tower `Service`: one protected request is one `Call`, run in a task of its own.

use std::fmt;
use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::http::request::Parts;
use ::http::{Request, Response};
use bytes::Bytes;
use http_body::Body;
use tower::Service;

use super::body::{boxed, full, read_limited, Buffered, Prefixed, ResponseBody};
use super::fingerprint::RequestFingerprint;
use super::key_header::{parse_key_with, KeyError};
use super::layer::{Config, KeySource, ScopeRule};
use super::policy::{handler_started, tracking_start, Execution};
use super::problem::Problem;
use super::replay::StoredResponse;
use idem_core::__private::emit_for;
use idem_core::{BoxError, Call, Error, Outcome, Store};

/// The service [`IdempotencyLayer`](super::IdempotencyLayer) wraps around a handler.
///
/// A protected request is handled in a task of its own (`tokio::spawn`): if the client goes
/// away, the handler still runs to completion and its response is stored, so that the retry
/// gets it instead of running the side effect a second time.
pub struct IdempotencyService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> IdempotencyService<S> {
    pub(super) fn new(inner: S, config: Arc<Config>) -> Self {
        IdempotencyService { inner, config }
    }
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

    /// Ready when the inner service is.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let config = &self.config;
        // Decided here, without a clone of the inner service: an unprotected method, or no
        // key where none is required, goes straight to the (ready) inner service.
        let header_key = if config.methods.contains(req.method()) {
            match &config.key_source {
                KeySource::Header(name) => Some(parse_key_with(
                    req.headers().get_all(name),
                    config.key_format,
                    config.max_key_len,
                )),
                KeySource::Custom(_) => None,
            }
        } else {
            return passthrough(self.inner.call(req));
        };
        if let Some(Err(KeyError::Missing)) = &header_key {
            if !config.required {
                emit_for(
                    config.store.name(),
                    Outcome::Unprotected,
                    config.namespace,
                    None,
                );
                return passthrough(self.inner.call(req));
            }
        }
        // The ready instance goes with the request; this service keeps a fresh clone.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(handle(self.config.clone(), inner, req, header_key))
    }
}

fn passthrough<F, ResB, E>(
    fut: F,
) -> Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, E>> + Send>>
where
    F: Future<Output = Result<Response<ResB>, E>> + Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    Box::pin(async move { Ok(fut.await?.map(boxed)) })
}

async fn call_inner<S, Req, ResB>(mut inner: S, req: Req) -> Result<Response<ResB>, S::Error>
where
    S: Service<Req, Response = Response<ResB>>,
{
    poll_fn(|cx| inner.poll_ready(cx)).await?;
    inner.call(req).await
}

async fn handle<S, B, ResB>(
    config: Arc<Config>,
    inner: S,
    req: Request<B>,
    header_key: Option<Result<String, KeyError>>,
) -> Result<Response<ResponseBody>, S::Error>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    // Counted like the runtime's own outcomes: `missing_key` for an absent or unusable key,
    // `unprotected` for one let through without a key.
    let ns = config.namespace;
    let problems = &config.problems;
    // A header key was parsed before the body is read; a custom key needs the body.
    if let Some(Err(e)) = &header_key {
        return Ok(refuse_key(&config, e));
    }
    let (parts, body) = req.into_parts();
    let scope = match &config.scope {
        ScopeRule::Unscoped => None,
        ScopeRule::By { f, allow_none } => match f(&parts) {
            Some(scope) => Some(scope),
            None if *allow_none => None,
            None => {
                tracing::debug!(target: "idem", namespace = ns, "no scope for the request: 401");
                return Ok(problems.respond(Problem::missing_scope()));
            }
        },
    };
    let bytes = match read_limited(Box::pin(body), config.max_request_body).await {
        Ok(Buffered::Complete(bytes)) => bytes,
        Ok(Buffered::Over { .. }) => {
            return Ok(problems.respond(Problem::request_too_large(config.max_request_body)))
        }
        Err(e) => {
            let e: BoxError = e.into();
            tracing::debug!(target: "idem", error = %e, "request body could not be read");
            return Ok(problems.respond(Problem::unreadable_body()));
        }
    };
    let key = match header_key {
        Some(Ok(key)) => key,
        _ => match custom_key(&config, &parts, &bytes) {
            Ok(key) => key,
            Err(KeyError::Missing) if !config.required => {
                emit_for(config.store.name(), Outcome::Unprotected, ns, None);
                let req = Request::from_parts(parts, B::from(bytes));
                return Ok(call_inner(inner, req).await?.map(boxed));
            }
            Err(e) => return Ok(refuse_key(&config, &e)),
        },
    };
    if let Some(validate) = &config.validate_key {
        if let Err(why) = validate(&key) {
            return Ok(refuse_key(&config, &KeyError::Invalid(why)));
        }
    }
    let call = new_call(&config, &key, &scope, &parts, &bytes);
    // The claimed work runs in its own task: dropping this future (the client went away)
    // detaches it instead of cancelling the handler halfway and releasing the key. It is
    // polled once here first: a replay held in this process, or a handler that answers in
    // that poll (no I/O to wait for), needs no task, and a task costs a wake-up of another
    // worker thread (tens of microseconds).
    // Between that poll and the spawn nothing awaits, so the request cannot be cancelled in
    // between; the task's first poll hands every pending operation the task's own waker.
    let mut work = Box::pin(execute(config.clone(), inner, parts, bytes, call));
    let first = poll_fn(|cx| {
        Poll::Ready(std::panic::catch_unwind(AssertUnwindSafe(|| {
            work.as_mut().poll(cx)
        })))
    })
    .await;
    let failed = match first {
        Ok(Poll::Ready(result)) => return result,
        Ok(Poll::Pending) => match tokio::spawn(work).await {
            Ok(result) => return result,
            Err(e) => e.to_string(),
        },
        // The work is dropped: its claim is released, as when a task panics.
        Err(_) => "the handler panicked".to_string(),
    };
    tracing::error!(target: "idem", error = %failed, "idempotent request task failed");
    Ok(config.problems.respond(Problem::internal(
        "The request handler failed (it panicked or was cancelled).",
    )))
}

/// The key of a custom key source.
fn custom_key(config: &Config, parts: &Parts, body: &Bytes) -> Result<String, KeyError> {
    let KeySource::Custom(f) = &config.key_source else {
        return Err(KeyError::Missing);
    };
    match f(parts, body) {
        Ok(Some(key)) if key.is_empty() => Err(KeyError::Empty),
        Ok(Some(key)) if key.chars().count() > config.max_key_len => Err(KeyError::TooLong {
            len: key.chars().count(),
            limit: config.max_key_len,
        }),
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(KeyError::Missing),
        Err(why) => Err(KeyError::Invalid(why)),
    }
}

/// 400 for a missing or unusable key.
fn refuse_key(config: &Config, e: &KeyError) -> Response<ResponseBody> {
    emit_for(
        config.store.name(),
        Outcome::MissingKey,
        config.namespace,
        None,
    );
    let problem = match e {
        KeyError::Missing => Problem::missing_key(),
        e => Problem::malformed_key(e),
    };
    config.problems.respond(problem)
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
    parts: Parts,
    bytes: Bytes,
    call: Call,
) -> Result<Response<ResponseBody>, S::Error>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    B: From<Bytes>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let store: &dyn Store = &*config.store;
    // The response as the handler sent it, when the handler ran in this call.
    let mut live: Option<Response<ResponseBody>> = None;
    // A claim that fails on a broken connection is retried by the runtime (on a fresh
    // connection, after 40 ms, then 160 ms) before the store error becomes a 503.
    // Boxed: the runtime's future would otherwise hold the handler's inline, and every move of
    // it would copy both.
    let handler = Box::pin(run_handler(&config, inner, parts, bytes, &mut live));
    let result = call.run(store, handler).await;
    let problems = &config.problems;
    match (result, live) {
        // The handler ran here: its own response, headers untouched.
        (Ok(_), Some(resp)) | (Err(Flow::Release), Some(resp)) => Ok(resp),
        (Ok(stored), None) => Ok(replay(&config, stored)),
        (Err(Flow::Inner(e)), _) => Err(e),
        (Err(Flow::Idem(e)), Some(resp)) => {
            // The side effect happened: the client gets its response even though the record
            // could not be written (too large for the store, or the lease was lost).
            tracing::error!(target: "idem", error = %e, "response sent but not recorded");
            Ok(resp)
        }
        (Err(Flow::Idem(e)), None) => Ok(refuse(&config, e)),
        (Err(Flow::Release), None) => Ok(problems.respond(Problem::internal(
            "The handler's response body failed before it was complete.",
        ))),
    }
}

/// The call of one protected request: its key, scope and fingerprint, and the layer's options.
fn new_call(
    config: &Config,
    key: &str,
    scope: &Option<String>,
    parts: &Parts,
    bytes: &Bytes,
) -> Call {
    let call = Call::new(config.namespace)
        .key(key)
        .scope(scope)
        .ttl(config.ttl)
        .lease(config.lease)
        .on_conflict(config.on_conflict)
        .wait_timeout(config.wait_timeout);
    match RequestFingerprint::of(
        &config.fingerprint,
        &config.fingerprint_body,
        &config.fingerprint_headers,
        parts,
        bytes,
    ) {
        Some(fingerprint) => call.fingerprint(&fingerprint),
        None => call,
    }
}

/// A stored response, replayed.
fn replay(config: &Config, stored: StoredResponse) -> Response<ResponseBody> {
    stored.replay().unwrap_or_else(|why| {
        tracing::error!(target: "idem", %why, "stored response cannot be replayed");
        config
            .problems
            .respond(Problem::internal("The stored response cannot be replayed."))
    })
}

/// The problem for a refusal of the runtime (409, 422, 503, 500).
fn refuse(config: &Config, e: Error) -> Response<ResponseBody> {
    match e {
        Error::InProgress { retry_after } => {
            // The runtime's hint is the holder's remaining lease when that is short, else
            // capped (`MAX_RETRY_HINT`): a capped one says nothing, the layer's setting rules.
            let hint = match retry_after {
                Some(r) if r < idem_core::MAX_RETRY_HINT => r.min(config.retry_after),
                _ => config.retry_after,
            };
            config
                .problems
                .respond(Problem::from_error(&Error::InProgress {
                    retry_after: Some(hint),
                }))
        }
        e => config.problems.respond(Problem::from_error(&e)),
    }
}

/// The body of the call: run the handler, then decide whether its response is stored.
async fn run_handler<S, B, ResB>(
    config: &Config,
    inner: S,
    parts: Parts,
    bytes: Bytes,
    live: &mut Option<Response<ResponseBody>>,
) -> Result<StoredResponse, Flow<S::Error>>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    B: From<Bytes>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let req = Request::from_parts(parts, B::from(bytes));
    let policy = &config.policy;
    let (resp, marked) = if policy.needs_start() {
        tracking_start(call_inner(inner, req)).await
    } else {
        (call_inner(inner, req).await, true)
    };
    let resp = resp.map_err(Flow::Inner)?;
    let (parts, body) = resp.into_parts();
    let hint = body.size_hint();
    let started = handler_started(
        parts.status,
        &parts.headers,
        parts.extensions.get::<Execution>().copied(),
        marked,
        hint.exact() == Some(0),
    );
    if !policy.decide(parts.status, started) {
        tracing::debug!(target: "idem", status = %parts.status, started, "response not stored (policy): key released");
        *live = Some(Response::from_parts(parts, boxed(body)));
        return Err(Flow::Release);
    }
    let store_limit = config.store.max_value_size();
    let limit = config.max_response_body.min(store_limit);
    let streamed = hint.exact().is_none();
    if hint.lower() > limit as u64 || (streamed && !config.buffer_streams) {
        // Too large to store, or a stream: passed through as it comes, never buffered.
        if streamed {
            tracing::debug!(target: "idem", status = %parts.status, "streamed response: passed through, not stored; key released");
        } else {
            tracing::warn!(target: "idem", status = %parts.status, limit, "response body over the limit: sent, not stored; key released");
        }
        *live = Some(Response::from_parts(parts, boxed(body)));
        return Err(Flow::Release);
    }
    match read_limited(Box::pin(body), limit).await {
        Ok(Buffered::Complete(bytes)) => {
            let stored = StoredResponse::capture(
                parts.status,
                &parts.headers,
                &bytes,
                &config.replay_headers,
            );
            let status = parts.status;
            *live = Some(Response::from_parts(parts, full(bytes)));
            if stored.approximate_size() > store_limit {
                tracing::warn!(target: "idem", %status, store_limit, "response too large for the store: sent, not stored; key released");
                return Err(Flow::Release);
            }
            Ok(stored)
        }
        Ok(Buffered::Over { prefix, rest }) => {
            tracing::warn!(target: "idem", status = %parts.status, limit, "response body over the limit: sent, not stored; key released");
            *live = Some(Response::from_parts(
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
}
