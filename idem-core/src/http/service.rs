//! The tower `Service`: one protected request is one `Call`, run in a task of its own.

use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::http::header::HeaderName;
use ::http::request::Parts;
use ::http::{Request, Response};
use bytes::Bytes;
use http_body::Body;
use serde::Serialize;
use tower::Service;

use super::body::{boxed, full, read_limited, Buffered, Prefixed, ResponseBody};
use super::key_header::{parse_key, KeyError};
use super::layer::{Config, IDEMPOTENCY_KEY};
use super::problem::Problem;
use super::replay::{Blob, StoredResponse};
use crate::observe::emit;
use crate::{BoxError, Call, Error, Outcome, Store};

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
    // Counted like the runtime's own outcomes: `missing_key` for an absent or unusable key,
    // `unprotected` for one let through without a key.
    let ns = config.namespace;
    let key = match parse_key(req.headers().get_all(IDEMPOTENCY_KEY), config.max_key_len) {
        Ok(key) => key,
        Err(KeyError::Missing) if !config.required => {
            emit(Outcome::Unprotected, ns, None);
            return passthrough(inner, req).await;
        }
        Err(KeyError::Missing) => {
            emit(Outcome::MissingKey, ns, None);
            return Ok(Problem::missing_key().into_response());
        }
        Err(e) => {
            emit(Outcome::MissingKey, ns, None);
            return Ok(Problem::malformed_key(&e).into_response());
        }
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
    // The body of the call: run the handler, read its response, decide whether to store it.
    let handler = async move {
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
        .run(store, handler)
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
