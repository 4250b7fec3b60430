//! `application/problem+json` (RFC 9457) answers of the layer.
//!
//! Every response the layer makes by itself (rather than the handler) is a problem document
//! with `type`, `title`, `status` and `detail`. The `type` URIs are stable identifiers, one per
//! kind of refusal: `urn:idem:problem:<slug>` by default, or `<base><slug>` with
//! [`problem_type_base`](super::IdempotencyLayer::problem_type_base) (a documentation site
//! of your own, say `https://api.example.com/problems/`). With
//! [`problem_docs`](super::IdempotencyLayer::problem_docs) every problem response (400, 401,
//! 409, 413, 422, 500, 503) also carries `Link: <url>; rel="describedby"`, as the IETF draft
//! recommends.
//!
//! | status | slug | when |
//! |---|---|---|
//! | 400 | `missing-key` | the route requires an `Idempotency-Key` and there is none |
//! | 400 | `malformed-key` | the key is empty, too long, repeated, a list, has parameters, is not an sf-string/token, or the key validator refused it |
//! | 401 | `missing-scope` | the scope function found no identity (tenant) for the request and unscoped requests are not allowed |
//! | 400 | `unreadable-body` | the request body could not be read |
//! | 409 | `in-progress` | a request with this key is still being processed (with `Retry-After`) |
//! | 413 | `request-too-large` | the request body is over the layer's limit |
//! | 422 | `key-reused` | the key was used before with another request — never a handler's own 422, which is the handler's response, untouched |
//! | 500 | `internal` | the stored record cannot be read, or the handler panicked |
//! | 503 | `store-unavailable` | the idempotency store failed (after one immediate retry); the handler did not run |

use std::borrow::Cow;
use std::time::Duration;

use ::http::header::{HeaderValue, CONTENT_TYPE, LINK, RETRY_AFTER};
use ::http::{Response, StatusCode};
use bytes::Bytes;

use super::body::{full, ResponseBody};
use idem_core::Error;

/// The media type of problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The default prefix of the layer's problem types.
pub const DEFAULT_PROBLEM_BASE: &str = "urn:idem:problem:";

/// How the layer writes its problem documents: the `type` prefix and the docs link.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProblemConfig {
    pub(crate) base: Option<Cow<'static, str>>,
    pub(crate) docs: Option<HeaderValue>,
}

impl ProblemConfig {
    /// The layer's response for `problem`: its `type` moved under the configured base, and
    /// `Link: <docs>; rel="describedby"` on a 400 when a docs URL is configured.
    pub(crate) fn respond(&self, mut problem: Problem) -> Response<ResponseBody> {
        if let Some(base) = &self.base {
            if let Some(slug) = problem.kind.strip_prefix(DEFAULT_PROBLEM_BASE) {
                problem.kind = Cow::Owned(format!("{base}{slug}"));
            }
        }
        let mut resp = problem.into_response();
        if let Some(docs) = &self.docs {
            resp.headers_mut().insert(LINK, docs.clone());
        }
        resp
    }
}

/// One problem document.
///
/// ```
/// use idem_http::Problem;
/// let p = Problem::from_error(&idem_core::Error::KeyReused);
/// assert_eq!(p.status, 422);
/// assert_eq!(p.slug(), Some("key-reused"));
/// assert_eq!(p.kind, "urn:idem:problem:key-reused");
/// let resp = p.into_response();
/// assert_eq!(resp.headers()["content-type"], "application/problem+json");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The HTTP status.
    pub status: u16,
    /// The `type` member: a URI naming the kind of problem.
    pub kind: Cow<'static, str>,
    /// The `title` member: a short summary, the same for every occurrence of the kind.
    pub title: &'static str,
    /// The `detail` member: what happened this time.
    pub detail: String,
    /// Sent as `Retry-After` (whole seconds, rounded up), for 409 and 503.
    pub retry_after: Option<Duration>,
}

impl Problem {
    /// A problem of the given kind.
    pub fn new(
        status: u16,
        kind: impl Into<Cow<'static, str>>,
        title: &'static str,
        detail: String,
    ) -> Self {
        Problem {
            status,
            kind: kind.into(),
            title,
            detail,
            retry_after: None,
        }
    }

    /// 400: no key on a route that requires one.
    pub fn missing_key() -> Self {
        Problem::new(
            400,
            "urn:idem:problem:missing-key",
            "Idempotency-Key is missing",
            "This operation is idempotent and requires an Idempotency-Key header, \
             e.g. Idempotency-Key: \"8e03978e-40d5-43e8-bc93-6894a57f9324\"."
                .to_string(),
        )
    }

    /// The slug of one of the layer's own problem types (`key-reused`, ...), `None` for
    /// another type.
    pub fn slug(&self) -> Option<&str> {
        self.kind.strip_prefix(DEFAULT_PROBLEM_BASE)
    }

    /// 401: the scope function found no identity for the request.
    pub fn missing_scope() -> Self {
        Problem::new(
            401,
            "urn:idem:problem:missing-scope",
            "No identity to scope the Idempotency-Key by",
            "Idempotency keys are kept per client, and this request carries no client identity \
             the server can scope the key by. Authenticate the request."
                .to_string(),
        )
    }

    /// 400: the key is not usable.
    pub fn malformed_key(why: &super::KeyError) -> Self {
        Problem::new(
            400,
            "urn:idem:problem:malformed-key",
            "Idempotency-Key is malformed",
            format!("{why}."),
        )
    }

    /// 413: the request body is over the limit.
    pub fn request_too_large(limit: usize) -> Self {
        Problem::new(
            413,
            "urn:idem:problem:request-too-large",
            "Request body too large",
            format!("The request body is over the limit of {limit} bytes for idempotent requests."),
        )
    }

    /// 400: the request body could not be read.
    pub fn unreadable_body() -> Self {
        Problem::new(
            400,
            "urn:idem:problem:unreadable-body",
            "Request body could not be read",
            "The request body ended with an error before it was complete.".to_string(),
        )
    }

    /// 500: the handler panicked or its task was cancelled.
    pub fn internal(detail: &str) -> Self {
        Problem::new(
            500,
            "urn:idem:problem:internal",
            "Internal error",
            detail.to_string(),
        )
    }

    /// The problem for an error of the runtime. A durable step in doubt
    /// ([`Error::StepInDoubt`]) is a 409, like a request still in progress.
    ///
    /// ```
    /// use idem_core::{Error, StepId};
    /// let p = idem_http::Problem::from_error(&Error::StepInDoubt { step: StepId::new("email", 0) });
    /// let v: serde_json::Value = serde_json::from_slice(&p.to_json()).unwrap();
    /// assert_eq!(v["status"], 409);
    /// assert_eq!(v["type"], "urn:idem:problem:step-in-doubt");
    /// ```
    pub fn from_error(e: &Error) -> Self {
        match e {
            Error::InProgress { retry_after } => Problem {
                retry_after: Some(retry_after.unwrap_or(Duration::from_secs(1))),
                ..Problem::new(
                    409,
                    "urn:idem:problem:in-progress",
                    "A request with this Idempotency-Key is being processed",
                    "The first request with this key has not finished yet; retry after the \
                     time in Retry-After to get its response."
                        .to_string(),
                )
            },
            Error::KeyReused => Problem::new(
                422,
                "urn:idem:problem:key-reused",
                "Idempotency-Key is already used",
                "This key was used before with a different request (method, path, query, body \
                 or fingerprinted headers); use a new key for a new request."
                    .to_string(),
            ),
            Error::MissingKey => Problem::missing_key(),
            // A handler that returns its step's error through this gets 409, like a
            // conflict with the first request: the work is neither done nor safely redoable.
            Error::StepInDoubt { step } => Problem::new(
                409,
                "urn:idem:problem:step-in-doubt",
                "A step of this request is in doubt",
                format!(
                    "An earlier attempt of this request started step `{step}` and did not \
                     finish it; whether it took effect is unknown, so it is not run again. \
                     The service must reconcile it before this request can complete."
                ),
            ),
            Error::Store(_) => Problem {
                retry_after: Some(Duration::from_secs(1)),
                ..Problem::new(
                    503,
                    "urn:idem:problem:store-unavailable",
                    "Idempotency store unavailable",
                    "The idempotency store could not be reached; the request was not processed."
                        .to_string(),
                )
            },
            Error::ShuttingDown => Problem {
                retry_after: Some(Duration::from_secs(1)),
                ..Problem::new(
                    503,
                    "urn:idem:problem:shutting-down",
                    "Shutting down",
                    "This instance is shutting down and takes no new request with an \
                     Idempotency-Key; the request was not processed. Retry it."
                        .to_string(),
                )
            },
            other => Problem::new(
                500,
                "urn:idem:problem:internal",
                "Internal error",
                other.to_string(),
            ),
        }
    }

    /// The JSON document.
    ///
    /// ```
    /// let p = idem_http::Problem::missing_key();
    /// let v: serde_json::Value = serde_json::from_slice(&p.to_json()).unwrap();
    /// assert_eq!(v["status"], 400);
    /// assert_eq!(v["title"], "Idempotency-Key is missing");
    /// ```
    pub fn to_json(&self) -> Vec<u8> {
        let doc = serde_json::json!({
            "type": self.kind,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        });
        // Serializing a `Value` of strings and numbers cannot fail.
        serde_json::to_vec(&doc).unwrap_or_default()
    }

    /// The response: the status, `Content-Type: application/problem+json`, `Retry-After` when
    /// set, and the JSON document.
    pub fn into_response(self) -> Response<ResponseBody> {
        let mut resp = Response::new(full(Bytes::from(self.to_json())));
        *resp.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}
