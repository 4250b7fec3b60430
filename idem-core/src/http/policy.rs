//! Which responses are stored and replayed, and which release the key for a retry.

use std::fmt;
use std::sync::Arc;

use ::http::StatusCode;

/// Decides, by status, whether a response is stored (and replayed to every retry with the
/// same key) or releases the key (the next retry runs the handler again).
///
/// The default, [`StorePolicy::default`], follows what clients of payment APIs expect:
///
/// - **stored**: every 2xx, 3xx and 4xx status — the request was processed, or refused for a
///   reason a retry of the same request will not change;
/// - **released**: `408 Request Timeout`, `409 Conflict` and `429 Too Many Requests` (a retry
///   may well succeed), every 5xx (the server failed; the client should retry), and 1xx.
///
/// ```
/// use http::StatusCode;
/// use idem_core::http::StorePolicy;
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
}

impl StorePolicy {
    /// A policy from a predicate: `true` stores the response, `false` releases the key.
    pub fn from_fn(f: impl Fn(StatusCode) -> bool + Send + Sync + 'static) -> Self {
        StorePolicy {
            decide: Arc::new(f),
        }
    }

    /// Whether a response with `status` is stored.
    pub fn stores(&self, status: StatusCode) -> bool {
        (self.decide)(status)
    }
}

impl Default for StorePolicy {
    fn default() -> Self {
        StorePolicy::from_fn(default_stores)
    }
}

impl fmt::Debug for StorePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorePolicy").finish_non_exhaustive()
    }
}

fn default_stores(status: StatusCode) -> bool {
    let code = status.as_u16();
    (200..500).contains(&code) && !matches!(code, 408 | 409 | 429)
}

#[cfg(test)]
mod tests {
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
        }
    }
}
