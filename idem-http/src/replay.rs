//! The stored form of a response, and its replay.
//!
//! A response is stored as its status, its end-to-end headers in order (every value of a
//! repeated header such as `set-cookie`, in the order the handler wrote them) and its body.
//! Not stored: hop-by-hop headers (`connection`, `keep-alive`, `proxy-connection`,
//! `proxy-authenticate`, `proxy-authorization`, `te`, `trailer`, `transfer-encoding`,
//! `upgrade`, and any header the `connection` header names), `date` (a replay is sent now)
//! and `content-length` (the server computes it again). Trailers are not stored. Nor, by
//! default, the headers that belong to one response and must not reach another client or a
//! later request ([`ReplayHeaders`]): `set-cookie`, rate-limit headers and request ids.

use std::fmt;

use ::http::header::{HeaderName, HeaderValue, CONNECTION};
use ::http::{HeaderMap, Response, StatusCode};
use bytes::Bytes;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::body::{full, ResponseBody};

/// The header a replayed response carries: `Idempotent-Replayed: true`.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

const NOT_STORED: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "date",
    "content-length",
];

/// Which of a response's end-to-end headers are stored and replayed. By default every header
/// except those of one response only:
///
/// - `set-cookie` (a session or CSRF cookie must not be handed to a retry, or be replayed
///   after the session changed);
/// - rate-limit headers: `ratelimit`, `ratelimit-policy`, `ratelimit-limit`,
///   `ratelimit-remaining`, `ratelimit-reset`, and every `x-ratelimit-*` and
///   `x-rate-limit-*`;
/// - request ids and trace context: `x-request-id`, `request-id`, `x-correlation-id`,
///   `x-amzn-requestid`, `x-amz-request-id`, `traceparent`, `tracestate`.
///
/// [`allow`](Self::allow) keeps a header the defaults leave out; [`deny`](Self::deny) and
/// [`deny_prefix`](Self::deny_prefix) leave out more. Hop-by-hop headers, `date` and
/// `content-length` are never stored. Names are case-insensitive.
///
/// ```
/// use idem_http::{IdempotencyLayer, ReplayHeaders};
///
/// let headers = ReplayHeaders::default()
///     .allow("set-cookie") // this API's cookies are part of the result
///     .deny("x-served-by")
///     .deny_prefix("x-debug-");
/// assert!(headers.keeps("Set-Cookie") && headers.keeps("location"));
/// assert!(!headers.keeps("X-Served-By") && !headers.keeps("x-debug-sql"));
/// assert!(!headers.keeps("x-ratelimit-remaining"));
/// # let store: std::sync::Arc<dyn idem_core::Store> = std::sync::Arc::new(idem_stores::MemoryStore::new());
/// let layer = IdempotencyLayer::new(store).unscoped().replay_headers(headers);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayHeaders {
    deny: Vec<String>,
    deny_prefixes: Vec<String>,
    allow: Vec<String>,
}

/// Left out of a stored response by default: one response's own headers.
const DEFAULT_DENY: [&str; 14] = [
    "set-cookie",
    "set-cookie2",
    "ratelimit",
    "ratelimit-policy",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "x-request-id",
    "request-id",
    "x-correlation-id",
    "x-amzn-requestid",
    "x-amz-request-id",
    "traceparent",
    "tracestate",
];

const DEFAULT_DENY_PREFIXES: [&str; 2] = ["x-ratelimit-", "x-rate-limit-"];

impl Default for ReplayHeaders {
    fn default() -> Self {
        ReplayHeaders {
            deny: DEFAULT_DENY.iter().map(|s| s.to_string()).collect(),
            deny_prefixes: DEFAULT_DENY_PREFIXES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            allow: Vec::new(),
        }
    }
}

impl ReplayHeaders {
    /// Every end-to-end header stored, none left out (the defaults cleared).
    pub fn all() -> Self {
        ReplayHeaders {
            deny: Vec::new(),
            deny_prefixes: Vec::new(),
            allow: Vec::new(),
        }
    }

    /// Stores and replays `name` even though a default or a prefix leaves it out.
    pub fn allow(mut self, name: &str) -> Self {
        let name = name.to_ascii_lowercase();
        self.deny.retain(|d| *d != name);
        self.allow.push(name);
        self
    }

    /// Leaves `name` out of stored responses.
    pub fn deny(mut self, name: &str) -> Self {
        let name = name.to_ascii_lowercase();
        self.allow.retain(|a| *a != name);
        self.deny.push(name);
        self
    }

    /// Leaves out every header whose name starts with `prefix` (unless
    /// [`allow`](Self::allow)ed).
    pub fn deny_prefix(mut self, prefix: &str) -> Self {
        self.deny_prefixes.push(prefix.to_ascii_lowercase());
        self
    }

    /// Whether a header named `name` is stored and replayed (hop-by-hop headers, `date` and
    /// `content-length` never are, whatever this says).
    pub fn keeps(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        if self.allow.contains(&name) {
            return true;
        }
        !self.deny.contains(&name) && !self.deny_prefixes.iter().any(|p| name.starts_with(p))
    }
}

/// A response as it is kept in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredResponse {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, Blob)>,
    pub(crate) body: Blob,
}

impl StoredResponse {
    /// The stored form of a response's status, the headers `keep` keeps, and its complete
    /// body.
    pub(crate) fn capture(
        status: StatusCode,
        headers: &HeaderMap,
        body: &Bytes,
        keep: &ReplayHeaders,
    ) -> Self {
        let named_by_connection: Vec<String> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect();
        let headers = headers
            .iter()
            .filter(|(name, _)| {
                let name = name.as_str();
                !NOT_STORED.contains(&name)
                    && !named_by_connection.iter().any(|n| n == name)
                    && keep.keeps(name)
            })
            .map(|(name, value)| (name.as_str().to_string(), Blob(value.as_bytes().to_vec())))
            .collect();
        StoredResponse {
            status: status.as_u16(),
            headers,
            body: Blob(body.to_vec()),
        }
    }

    /// Bytes this response takes in the store, roughly (the limit check uses it).
    pub(crate) fn approximate_size(&self) -> usize {
        self.body.0.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.0.len() + 4)
                .sum::<usize>()
            + 64
    }

    /// The replayed response, marked `Idempotent-Replayed: true`. A header that cannot be
    /// rebuilt (a record not written by this layer) is skipped.
    pub(crate) fn replay(self) -> Result<Response<ResponseBody>, String> {
        let status = StatusCode::from_u16(self.status)
            .map_err(|_| format!("stored status {} is not a valid status", self.status))?;
        let mut resp = Response::new(full(Bytes::from(self.body.0)));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        for (name, value) in self.headers {
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(&value.0),
            ) else {
                return Err(format!("stored header `{name}` is not a valid header"));
            };
            headers.append(name, value);
        }
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        Ok(resp)
    }
}

/// Bytes stored as a MessagePack `bin` (one byte each), not as an array of integers.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Blob(pub(crate) Vec<u8>);

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct BlobVisitor;
        impl<'de> Visitor<'de> for BlobVisitor {
            type Value = Blob;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Blob, E> {
                Ok(Blob(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
                Ok(Blob(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Blob, E> {
                Ok(Blob(v.as_bytes().to_vec()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Blob, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(Blob(out))
            }
        }
        d.deserialize_byte_buf(BlobVisitor)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use idem_core::codec::{Codec, MsgPack};

    #[test]
    fn capture_keeps_order_and_drops_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.append("set-cookie", HeaderValue::from_static("a=1"));
        h.append("content-type", HeaderValue::from_static("application/json"));
        h.append("set-cookie", HeaderValue::from_static("b=2"));
        h.append(
            "date",
            HeaderValue::from_static("Mon, 01 Jan 2024 00:00:00 GMT"),
        );
        h.append(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.append("keep-alive", HeaderValue::from_static("timeout=5"));
        h.append("x-secret", HeaderValue::from_static("hop"));
        h.append("transfer-encoding", HeaderValue::from_static("chunked"));
        h.append("content-length", HeaderValue::from_static("2"));
        let s = StoredResponse::capture(
            StatusCode::CREATED,
            &h,
            &Bytes::from_static(b"{}"),
            &ReplayHeaders::all(),
        );
        let names: Vec<&str> = s.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["set-cookie", "set-cookie", "content-type"]);

        let bytes = MsgPack.encode(&s).unwrap();
        let back: StoredResponse = MsgPack.decode(&bytes).unwrap();
        assert_eq!(back, s);

        // Bodies are stored as one `bin`, a byte a byte (not an array of integers, where
        // bytes over 127 take two).
        let high = StoredResponse::capture(
            StatusCode::OK,
            &HeaderMap::new(),
            &Bytes::from(vec![0xff; 1000]),
            &ReplayHeaders::default(),
        );
        let encoded = MsgPack.encode(&high).unwrap();
        assert!(encoded.len() < 1050, "{} bytes", encoded.len());
        assert_eq!(MsgPack.decode::<StoredResponse>(&encoded).unwrap(), high);

        let r = back.replay().unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let cookies: Vec<_> = r.headers().get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(r.headers()[IDEMPOTENT_REPLAYED], "true");
        assert!(r.headers().get("date").is_none());
    }
}
