//! What a request is compared by: a repeat with the same key and another fingerprint is 422.
//!
//! By default the fingerprint is the method, the path, the query string, the body byte for
//! byte and the headers named with
//! [`fingerprint_header`](super::IdempotencyLayer::fingerprint_header). The body can instead
//! be compared as canonical JSON (member order and whitespace ignored) or by a chosen set of
//! its JSON members ([`BodyFingerprint`]); the whole fingerprint can be a function of the
//! request, or nothing at all (the key alone).

use std::fmt;
use std::sync::Arc;

use ::http::header::{HeaderName, CONTENT_TYPE};
use ::http::request::Parts;
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

/// How the body takes part in the fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BodyFingerprint {
    /// Byte for byte (its BLAKE3 digest). The default.
    #[default]
    Exact,
    /// As canonical JSON: members sorted by name, no insignificant whitespace, strings
    /// unescaped. `{"b":1, "a":2}` and `{"a":2,"b":1}` are the same request. A body that is
    /// not JSON is compared byte for byte.
    CanonicalJson,
    /// Only these members, named by JSON Pointer (RFC 6901: `/amount`, `/card/last4`), each
    /// compared as canonical JSON; an absent member is `null`. A body that is not JSON is
    /// compared byte for byte.
    JsonFields(Vec<String>),
    /// Not at all.
    Ignored,
}

/// A custom fingerprint: bytes computed from the request head and body.
pub(crate) type FingerprintFn = dyn Fn(&Parts, &Bytes) -> Vec<u8> + Send + Sync;

/// The fingerprint options of a layer.
#[derive(Clone, Default)]
pub(crate) enum FingerprintMode {
    /// Method, path, query, body (as chosen), named headers.
    #[default]
    Request,
    /// The function's bytes.
    Custom(Arc<FingerprintFn>),
    /// No fingerprint: the key alone identifies the request.
    None,
}

impl fmt::Debug for FingerprintMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FingerprintMode::Request => "Request",
            FingerprintMode::Custom(_) => "Custom",
            FingerprintMode::None => "None",
        })
    }
}

/// The fingerprint of one request: one BLAKE3 digest of its parts, each length-prefixed (so
/// that no two requests share an encoding), handed to the runtime as 32 bytes.
pub(crate) struct RequestFingerprint([u8; 32]);

impl Serialize for RequestFingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl RequestFingerprint {
    /// The fingerprint of a request, `None` when the layer fingerprints nothing.
    pub(crate) fn of(
        mode: &FingerprintMode,
        body_mode: &BodyFingerprint,
        names: &[HeaderName],
        parts: &Parts,
        body: &Bytes,
    ) -> Option<Self> {
        // The small parts go through one buffer and the body straight into the hasher: two
        // hasher updates in all (each update has a fixed cost worth avoiding per field).
        let mut buf = Vec::with_capacity(128);
        let put = |buf: &mut Vec<u8>, tag: u8, bytes: &[u8]| {
            buf.push(tag);
            buf.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            buf.extend_from_slice(bytes);
        };
        let mut h = blake3::Hasher::new();
        match mode {
            FingerprintMode::None => return None,
            FingerprintMode::Custom(f) => put(&mut buf, b'c', &f(parts, body)),
            FingerprintMode::Request => {
                put(&mut buf, b'm', parts.method.as_str().as_bytes());
                put(&mut buf, b'p', parts.uri.path().as_bytes());
                if let Some(query) = parts.uri.query() {
                    put(&mut buf, b'q', query.as_bytes());
                }
                for name in names {
                    put(&mut buf, b'h', name.as_str().as_bytes());
                    for v in parts.headers.get_all(name) {
                        if *name == CONTENT_TYPE {
                            put(&mut buf, b'v', &normalize_media_type(v.as_bytes()));
                        } else {
                            put(&mut buf, b'v', v.as_bytes());
                        }
                    }
                }
                match body_canonical(body_mode, body) {
                    Some(canonical) => put(&mut buf, b'j', &canonical),
                    None => {
                        // The body itself, after its length.
                        buf.push(b'b');
                        buf.extend_from_slice(&(body.len() as u64).to_le_bytes());
                        h.update(&buf);
                        h.update(body);
                        return Some(RequestFingerprint(*h.finalize().as_bytes()));
                    }
                }
            }
        }
        h.update(&buf);
        Some(RequestFingerprint(*h.finalize().as_bytes()))
    }
}

/// The body as it is compared when not byte for byte: canonical JSON, chosen members, or
/// nothing; `None` for the bytes themselves (the default, and a body that is not JSON).
fn body_canonical(mode: &BodyFingerprint, body: &Bytes) -> Option<Vec<u8>> {
    let json = || serde_json::from_slice::<Value>(body).ok();
    match mode {
        BodyFingerprint::Exact => None,
        BodyFingerprint::Ignored => Some(Vec::new()),
        BodyFingerprint::CanonicalJson => json().map(|v| {
            let mut out = Vec::with_capacity(body.len());
            write_canonical(&v, &mut out);
            out
        }),
        BodyFingerprint::JsonFields(pointers) => json().map(|v| {
            let mut out = Vec::new();
            for p in pointers {
                write_canonical(v.pointer(p).unwrap_or(&Value::Null), &mut out);
                out.push(b'\n');
            }
            out
        }),
    }
}

#[cfg(test)]
fn body_digest(mode: &BodyFingerprint, body: &Bytes) -> Vec<u8> {
    match body_canonical(mode, body) {
        Some(c) => [&[1u8][..], blake3::hash(&c).as_bytes()].concat(),
        None => blake3::hash(body).as_bytes().to_vec(),
    }
}

/// RFC 8785-like canonical JSON: objects with members sorted by name, no whitespace.
fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String(k.clone()), out);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(v: &Value, out: &mut Vec<u8>) {
    // Serializing a scalar `Value` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
}

/// A media type with its case and parameters normalised: `Application/JSON; Charset="UTF-8"`
/// and `application/json` are the same. Type, subtype and parameter names are lowercased,
/// quotes around values dropped, `charset=utf-8` dropped (it is JSON's only encoding, and the
/// default most servers assume), and the other parameters sorted.
///
/// ```
/// use idem_http::normalize_media_type;
/// assert_eq!(normalize_media_type(b"application/json; charset=UTF-8"), b"application/json");
/// assert_eq!(normalize_media_type(b"Text/Plain;format=flowed; charset=\"utf-8\""), b"text/plain;format=flowed");
/// assert_eq!(normalize_media_type(b"text/plain; charset=latin1"), b"text/plain;charset=latin1");
/// ```
pub fn normalize_media_type(raw: &[u8]) -> Vec<u8> {
    let Ok(s) = std::str::from_utf8(raw) else {
        return raw.to_vec();
    };
    let mut pieces = s.split(';');
    let mut out = pieces
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let mut params: Vec<(String, String)> = pieces
        .filter_map(|p| {
            let (name, value) = p.split_once('=')?;
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim().trim_matches('"').to_string();
            let value = if name == "charset" {
                value.to_ascii_lowercase()
            } else {
                value
            };
            Some((name, value))
        })
        .filter(|(n, v)| !(n == "charset" && (v == "utf-8" || v == "utf8")))
        .collect();
    params.sort();
    for (n, v) in params {
        out.push(';');
        out.push_str(&n);
        out.push('=');
        out.push_str(&v);
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(mode: &BodyFingerprint, body: &str) -> Vec<u8> {
        body_digest(mode, &Bytes::from(body.to_owned()))
    }

    #[test]
    fn canonical_json_ignores_order_and_whitespace() {
        let c = BodyFingerprint::CanonicalJson;
        let a = d(
            &c,
            r#"{"amount":1,"currency":"EUR","x":{"b":[1,2],"a":null}}"#,
        );
        let b = d(
            &c,
            "{ \"x\": {\"a\": null, \"b\": [1, 2]},\n \"currency\": \"\\u0045UR\", \"amount\": 1 }",
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            d(
                &c,
                r#"{"amount":2,"currency":"EUR","x":{"b":[1,2],"a":null}}"#
            )
        );
        // Not JSON: byte for byte.
        assert_eq!(d(&c, "a=1"), d(&BodyFingerprint::Exact, "a=1"));
        assert_ne!(
            d(&BodyFingerprint::Exact, "{\"a\":1}"),
            d(&BodyFingerprint::Exact, "{ \"a\":1}")
        );
    }

    #[test]
    fn json_fields_compare_only_those() {
        let f = BodyFingerprint::JsonFields(vec!["/amount".into(), "/currency".into()]);
        assert_eq!(
            d(&f, r#"{"amount":1,"currency":"EUR","note":"a"}"#),
            d(&f, r#"{"note":"b","currency":"EUR","amount":1}"#)
        );
        assert_ne!(
            d(&f, r#"{"amount":1,"currency":"EUR"}"#),
            d(&f, r#"{"amount":1}"#)
        );
    }
}
