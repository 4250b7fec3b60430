//! Which responses are stored and replayed, and which release the key for a retry.
//!
//! Two questions decide it: did the handler start executing the request (rather than an
//! extractor or the router refusing it), and does the status say a retry would get the same
//! answer. [`StorePolicy`] holds the answer to both; [`Execution`] and [`mark_started`] let a
//! handler say which side of the first question its response is on.

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;

use ::http::header::CONTENT_TYPE;
use ::http::{HeaderMap, StatusCode};

/// What a handler says about its own response, put in the response's extensions (with axum:
/// `(StatusCode::UNPROCESSABLE_ENTITY, Extension(Execution::Rejected), msg)`). It overrides
/// the layer's own detection of extractor rejections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Execution {
    /// The request was executed: the response is its result, stored if the status rule of the
    /// [`StorePolicy`] says so.
    Started,
    /// The request failed validation before anything happened: the response is sent and the
    /// key released, so that the client may fix the request and retry with the same key.
    Rejected,
}

tokio::task_local! {
    static STARTED: Cell<bool>;
}

/// Marks the request being handled as started: its response is the result of executing it,
/// whatever it looks like. Call it at the top of a handler whose error responses resemble an
/// extractor's rejection (`text/plain` 400/413/415/422, an empty 404/405). Outside a request
/// protected by the layer it does nothing.
pub fn mark_started() {
    let _ = STARTED.try_with(|s| s.set(true));
}

/// Runs `fut` (the inner service) with a fresh [`mark_started`] flag; returns its output and
/// whether the flag was set.
pub(crate) async fn tracking_start<F: std::future::Future>(fut: F) -> (F::Output, bool) {
    STARTED
        .scope(Cell::new(false), async move {
            let out = fut.await;
            (out, STARTED.with(Cell::get))
        })
        .await
}

/// Whether a response came from a handler that started executing the request.
///
/// An explicit [`Execution`] in the response's extensions decides; then a call of
/// [`mark_started`]; otherwise the response is taken as a rejection that never reached the
/// handler when it has the shape of one from axum's router or extractors: a `404` or `405`
/// with an empty body and no `Content-Type` (routing), or a `400`, `411`, `413`, `415` or `422`
/// with a `text/plain` body (extractor rejections are plain text).
pub(crate) fn handler_started(
    status: StatusCode,
    headers: &HeaderMap,
    explicit: Option<Execution>,
    marked: bool,
    empty_body: bool,
) -> bool {
    match explicit {
        Some(Execution::Started) => return true,
        Some(Execution::Rejected) => return false,
        None if marked => return true,
        None => {}
    }
    let plain_text = headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"));
    let rejection = match status.as_u16() {
        404 | 405 => empty_body && !headers.contains_key(CONTENT_TYPE),
        400 | 411 | 413 | 415 | 422 => plain_text,
        _ => false,
    };
    !rejection
}

/// Decides whether a response is stored (and replayed to every retry with the same key) or
/// releases the key (the next retry runs the handler again).
///
/// Every preset stores a response only once the handler started executing the request, as
/// Stripe does: a request refused by routing (404, 405) or by an extractor (a malformed
/// body's 400/415/422) is not saved, and the client may retry it with the same key. They
/// differ in what they do with a started handler's failures:
///
/// - [`retry_failures`](Self::retry_failures), the default ("retry failed work", as Stripe's
///   API v2 does): 2xx, 3xx and 4xx are stored except 408, 409 and 429; those three, every
///   5xx and 1xx release the key, so that a retry with the same key runs the handler again.
/// - [`stripe`](Self::stripe) (Stripe's API v1): once execution started, the response is
///   stored whatever it is, 500s included; a retry gets the same 500 and never runs the
///   handler twice.
///
/// | preset | rejections (handler not started) | 2xx–4xx | 408, 409, 429 | 5xx |
/// |---|---|---|---|---|
/// | [`retry_failures`](Self::retry_failures) (default) | released | stored | released | released |
/// | [`stripe`](Self::stripe), [`everything`](Self::everything) | released | stored | stored | stored |
/// | [`by_status`](Self::by_status) (before 0.2) | stored | stored | released | released |
///
/// ```
/// use http::StatusCode;
/// use idem_http::StorePolicy;
///
/// let p = StorePolicy::default();
/// assert!(p.stores(StatusCode::CREATED));
/// assert!(p.stores(StatusCode::NOT_FOUND));
/// assert!(!p.stores(StatusCode::TOO_MANY_REQUESTS));
/// assert!(!p.stores(StatusCode::SERVICE_UNAVAILABLE));
///
/// let only_success = StorePolicy::from_fn(|s| s.is_success());
/// assert!(!only_success.stores(StatusCode::BAD_REQUEST));
/// ```
#[derive(Clone)]
pub struct StorePolicy {
    decide: Arc<dyn Fn(StatusCode) -> bool + Send + Sync>,
    /// Whether a response of a handler that never started is stored too.
    store_rejections: bool,
    name: &'static str,
}

impl StorePolicy {
    /// The default, "retry failed work" (Stripe's API v2): a started handler's 2xx–4xx
    /// responses are stored except 408, 409 and 429; those, 5xx and 1xx release the key, so
    /// that a retry with the same key runs the handler again.
    ///
    /// ```
    /// use http::StatusCode;
    /// use idem_http::StorePolicy;
    ///
    /// let p = StorePolicy::retry_failures();
    /// assert!(p.stores(StatusCode::CREATED) && p.stores(StatusCode::BAD_REQUEST));
    /// assert!(!p.stores(StatusCode::INTERNAL_SERVER_ERROR));
    /// assert!(!p.stores(StatusCode::TOO_MANY_REQUESTS));
    /// ```
    pub fn retry_failures() -> Self {
        StorePolicy {
            decide: Arc::new(default_stores),
            store_rejections: false,
            name: "retry_failures",
        }
    }

    /// As Stripe's API v1 documents it: once the handler started executing the request, its
    /// response is stored whatever its status, 500s included, and every retry with the key
    /// gets it back; the handler never runs twice. A request refused before it started
    /// (routing, an extractor's rejection) releases the key. The same rule as
    /// [`everything`](Self::everything).
    ///
    /// ```
    /// use http::StatusCode;
    /// use idem_http::StorePolicy;
    ///
    /// let p = StorePolicy::stripe();
    /// assert!(p.stores(StatusCode::INTERNAL_SERVER_ERROR));
    /// assert!(p.stores(StatusCode::CREATED));
    /// ```
    pub fn stripe() -> Self {
        StorePolicy {
            decide: Arc::new(|_| true),
            store_rejections: false,
            name: "stripe",
        }
    }

    /// Every response of a started handler, 5xx included: a retry never runs the handler
    /// twice, even after it failed (what [`stripe`](Self::stripe) does). Rejections still
    /// release the key.
    pub fn everything() -> Self {
        StorePolicy {
            decide: Arc::new(|_| true),
            store_rejections: false,
            name: "everything",
        }
    }

    /// By status alone, whether or not the handler started: 2xx–4xx except 408, 409, 429.
    /// This was the only policy before the handler-started rule; an extractor's 422 is stored.
    pub fn by_status() -> Self {
        StorePolicy {
            decide: Arc::new(default_stores),
            store_rejections: true,
            name: "by_status",
        }
    }

    /// A policy from a predicate on the status of a started handler's response: `true` stores
    /// it, `false` releases the key. Rejections release the key (see
    /// [`store_rejections`](Self::store_rejections)).
    pub fn from_fn(f: impl Fn(StatusCode) -> bool + Send + Sync + 'static) -> Self {
        StorePolicy {
            decide: Arc::new(f),
            store_rejections: false,
            name: "custom",
        }
    }

    /// Applies the status rule to rejections too (responses of a handler that never
    /// started), instead of releasing their key.
    pub fn store_rejections(mut self, store: bool) -> Self {
        self.store_rejections = store;
        self
    }

    /// Whether a response with `status` from a started handler is stored.
    pub fn stores(&self, status: StatusCode) -> bool {
        (self.decide)(status)
    }

    /// Whether a response is stored, given whether its handler started.
    pub(crate) fn decide(&self, status: StatusCode, started: bool) -> bool {
        (started || self.store_rejections) && self.stores(status)
    }

    /// Whether the layer needs to know if the handler started.
    pub(crate) fn needs_start(&self) -> bool {
        !self.store_rejections
    }
}

impl Default for StorePolicy {
    fn default() -> Self {
        StorePolicy::retry_failures()
    }
}

impl fmt::Debug for StorePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorePolicy")
            .field("name", &self.name)
            .field("store_rejections", &self.store_rejections)
            .finish_non_exhaustive()
    }
}

fn default_stores(status: StatusCode) -> bool {
    let code = status.as_u16();
    (200..500).contains(&code) && !matches!(code, 408 | 409 | 429)
}

#[cfg(test)]
mod tests {
    use ::http::HeaderValue;

    use super::*;

    #[test]
    fn default_policy_table() {
        let p = StorePolicy::default();
        for (code, stored) in [
            (100, false),
            (200, true),
            (201, true),
            (204, true),
            (302, true),
            (400, true),
            (404, true),
            (408, false),
            (409, false),
            (422, true),
            (429, false),
            (500, false),
            (502, false),
            (503, false),
        ] {
            let s = StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT);
            assert_eq!(p.stores(s), stored, "status {code}");
            assert!(!p.decide(s, false), "status {code} of a rejection");
            assert_eq!(StorePolicy::by_status().decide(s, false), stored);
            assert!(StorePolicy::everything().decide(s, true));
        }
    }

    #[test]
    fn rejections_are_recognised_by_shape() {
        let plain = {
            let mut h = HeaderMap::new();
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            h
        };
        let json = {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h
        };
        let none = HeaderMap::new();
        let s = |c: u16| StatusCode::from_u16(c).unwrap_or(StatusCode::IM_A_TEAPOT);
        for code in [400, 413, 415, 422] {
            assert!(!handler_started(s(code), &plain, None, false, false));
            assert!(handler_started(s(code), &json, None, false, false));
            assert!(handler_started(s(code), &plain, None, true, false));
        }
        assert!(!handler_started(s(405), &none, None, false, true));
        assert!(!handler_started(s(404), &none, None, false, true));
        assert!(handler_started(s(404), &json, None, false, false));
        assert!(handler_started(s(201), &plain, None, false, false));
        assert!(!handler_started(
            s(201),
            &json,
            Some(Execution::Rejected),
            true,
            false
        ));
        assert!(handler_started(
            s(422),
            &plain,
            Some(Execution::Started),
            false,
            false
        ));
    }
}
