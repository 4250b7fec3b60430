//! The layer in an OpenAPI document (feature `openapi`, on [utoipa]).
//!
//! [`document`] adds to one operation what the layer does to it: the `Idempotency-Key` request
//! header with the keys' expiry policy (which the IETF draft requires a server to publish),
//! the `Idempotent-Replayed` header on its 2xx responses, and the problem responses (`400`,
//! `401`, `409`, `413`, `422`, `500`, `503`, `application/problem+json`).
//!
//! ```
//! use utoipa::openapi::path::OperationBuilder;
//! use utoipa::openapi::ResponseBuilder;
//!
//! let mut op = OperationBuilder::new()
//!     .response("201", ResponseBuilder::new().description("The payment"))
//!     .build();
//! idem_http::openapi::document(&mut op);
//! let json = serde_json::to_value(&op).unwrap();
//! assert_eq!(json["parameters"][0]["name"], "Idempotency-Key");
//! assert_eq!(json["parameters"][0]["in"], "header");
//! assert!(json["responses"]["201"]["headers"]["Idempotent-Replayed"].is_object());
//! for status in ["400", "401", "409", "413", "422", "500", "503"] {
//!     assert!(json["responses"][status]["content"]["application/problem+json"].is_object(), "{status}");
//! }
//! assert!(json["responses"]["409"]["headers"]["Retry-After"].is_object());
//! assert_eq!(json["parameters"][0]["x-idempotency-key-ttl-seconds"], 86400);
//! ```
//!
//! For a layer configured otherwise, describe it with [`OpenApiOptions`] and
//! [`document_with`]:
//!
//! ```
//! use std::time::Duration;
//! use idem_http::openapi::{document_with, OpenApiOptions};
//! use utoipa::openapi::path::OperationBuilder;
//!
//! let mut op = OperationBuilder::new().build();
//! // A layer with `.required(false).ttl(Duration::from_secs(3600))` and no scope function.
//! let options = OpenApiOptions::default()
//!     .required(false)
//!     .ttl(Duration::from_secs(3600))
//!     .scoped(false);
//! document_with(&mut op, &options);
//! let json = serde_json::to_value(&op).unwrap();
//! assert_eq!(json["parameters"][0]["required"], false);
//! assert!(json["parameters"][0]["description"].as_str().unwrap().contains("1 hour"));
//! assert!(json["responses"]["401"].is_null());
//! ```

use std::time::Duration;

use utoipa::openapi::content::Content;
use utoipa::openapi::extensions::ExtensionsBuilder;
use utoipa::openapi::header::Header;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{Object, ObjectBuilder, Type};
use utoipa::openapi::{RefOr, Required, ResponseBuilder};

use super::key_header::DEFAULT_MAX_KEY_LEN;
use super::problem::PROBLEM_JSON;

/// What [`document_with`] says about the layer on an operation: the layer's settings that
/// show in the document. Built from [`Default`] (the layer's defaults) with one method per
/// setting, so that it keeps compiling as settings are added.
///
/// ```
/// use std::time::Duration;
/// let options = idem_http::openapi::OpenApiOptions::default()
///     .required(false)
///     .max_key_len(64)
///     .ttl(Duration::from_secs(7 * 24 * 3600))
///     .max_request_body(64 * 1024)
///     .scoped(true);
/// assert!(!options.required);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OpenApiOptions {
    /// Whether a request without the key is refused (the layer's `required`). Default `true`.
    pub required: bool,
    /// The longest key accepted (the layer's `max_key_len`). Default 255.
    pub max_key_len: usize,
    /// How long a key's stored response is replayed (the layer's `ttl`), published as the
    /// keys' expiry policy. Default 24 hours.
    pub ttl: Duration,
    /// The largest request body (the layer's `max_request_body`), for the 413 response.
    /// Default 1 MiB.
    pub max_request_body: usize,
    /// Whether the layer has a scope function that refuses a request without an identity
    /// (401 `missing-scope`). Default `true`; `false` for an `.unscoped()` layer or one with
    /// `.allow_unscoped_requests()`.
    pub scoped: bool,
}

impl Default for OpenApiOptions {
    fn default() -> Self {
        let defaults = idem_core::Options::default();
        OpenApiOptions {
            required: true,
            max_key_len: DEFAULT_MAX_KEY_LEN,
            ttl: defaults.ttl,
            max_request_body: super::layer::DEFAULT_BODY_LIMIT,
            scoped: true,
        }
    }
}

impl OpenApiOptions {
    /// The layer's `required`.
    pub fn required(mut self, required: bool) -> Self {
        self.required = required;
        self
    }

    /// The layer's `max_key_len`.
    pub fn max_key_len(mut self, limit: usize) -> Self {
        self.max_key_len = limit;
        self
    }

    /// The layer's `ttl`: the published expiry of a key.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The layer's `max_request_body`.
    pub fn max_request_body(mut self, limit: usize) -> Self {
        self.max_request_body = limit;
        self
    }

    /// Whether requests without an identity are refused with 401.
    pub fn scoped(mut self, scoped: bool) -> Self {
        self.scoped = scoped;
        self
    }
}

/// `24 hours`, `90 minutes`, `45 seconds`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (n, unit) = match s {
        0 => return format!("{} ms", d.as_millis()),
        s if s % 86_400 == 0 && s >= 2 * 86_400 => (s / 86_400, "day"),
        s if s % 3600 == 0 => (s / 3600, "hour"),
        s if s % 60 == 0 => (s / 60, "minute"),
        s => (s, "second"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// Documents the layer's defaults on `op`; see the [module docs](self).
pub fn document(op: &mut Operation) {
    document_with(op, &OpenApiOptions::default());
}

/// Documents the layer on `op`: the `Idempotency-Key` header parameter with the keys' expiry
/// (in its description and as `x-idempotency-key-ttl-seconds`), `Idempotent-Replayed` on
/// every 2xx response, and the 400, 401 (when [`scoped`](OpenApiOptions::scoped)), 409, 413,
/// 422, 500 and 503 problem responses. A status the operation documents already keeps its
/// own description, followed by what the layer answers with it.
pub fn document_with(op: &mut Operation, options: &OpenApiOptions) {
    let key = ParameterBuilder::new()
        .name("Idempotency-Key")
        .parameter_in(ParameterIn::Header)
        .required(if options.required {
            Required::True
        } else {
            Required::False
        })
        .description(Some(format!(
            "A key unique to this operation's request, as an RFC 8941 String \
             (`\"8e03978e-40d5-43e8-bc93-6894a57f9324\"`). A retry with the same key and the \
             same request gets the first response, with `Idempotent-Replayed: true`. \
             Expiry: a key is kept for {} after its first response; after that, a request \
             with it is processed as a new one.",
            human(options.ttl)
        )))
        .extensions(Some(
            ExtensionsBuilder::new()
                .add("x-idempotency-key-ttl-seconds", options.ttl.as_secs())
                .build(),
        ))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(options.max_key_len + 2)),
        ))
        .build();
    let params = op.parameters.get_or_insert_with(Vec::new);
    params.retain(|p| !p.name.eq_ignore_ascii_case("idempotency-key"));
    params.push(key);

    for (status, response) in op.responses.responses.iter_mut() {
        if let (true, RefOr::T(response)) = (status.starts_with('2'), response) {
            response.headers.insert(
                "Idempotent-Replayed".to_string(),
                described(
                    Header::new(Object::with_type(Type::String)),
                    "`true` on a replay of the stored response; absent on the first one.",
                ),
            );
        }
    }

    let too_large = format!(
        "The request body is over the limit of {} bytes for idempotent requests \
         (problem `request-too-large`).",
        options.max_request_body
    );
    let problems = [
        (
            "400",
            "The Idempotency-Key header is missing or unusable (problem `missing-key` or \
             `malformed-key`).",
            false,
        ),
        (
            "401",
            "The request carries no identity to scope its Idempotency-Key by; authenticate \
             it (problem `missing-scope`).",
            false,
        ),
        (
            "409",
            "A request with this Idempotency-Key is still being processed; retry after \
             `Retry-After` seconds to get its response (problem `in-progress`).",
            true,
        ),
        ("413", too_large.as_str(), false),
        (
            "422",
            "The Idempotency-Key was used before with a different request; use a new key \
             for a new request (problem `key-reused`).",
            false,
        ),
        (
            "500",
            "The stored response for this Idempotency-Key cannot be read, or processing \
             failed (problem `internal`).",
            false,
        ),
        (
            "503",
            "The idempotency store could not be reached; the request was not processed \
             (problem `store-unavailable`).",
            true,
        ),
    ];
    for (status, what, retry_after) in problems {
        if status == "401" && !options.scoped {
            continue;
        }
        add_problem(op, status, what, retry_after);
    }
}

fn described(mut header: Header, description: &str) -> Header {
    header.description = Some(description.to_string());
    header
}

/// The RFC 9457 problem document.
fn problem_schema() -> Object {
    let string = || Object::with_type(Type::String);
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("type", string())
        .property("title", string())
        .property("status", Object::with_type(Type::Integer))
        .property("detail", string())
        .required("type")
        .required("title")
        .required("status")
        .build()
}

fn add_problem(op: &mut Operation, status: &str, what: &str, retry_after: bool) {
    let content = Content::new(Some(problem_schema()));
    let retry = || {
        described(
            Header::new(Object::with_type(Type::Integer)),
            "Seconds to wait before retrying.",
        )
    };
    match op.responses.responses.get_mut(status) {
        Some(RefOr::T(existing)) => {
            let own = existing.description.trim_end();
            let stop = if own.is_empty() || own.ends_with(['.', '!', '?']) {
                ""
            } else {
                "."
            };
            let mut chars = what.chars();
            let what: String = chars
                .next()
                .map(|c| c.to_lowercase().chain(chars).collect())
                .unwrap_or_default();
            existing.description = format!(
                "{own}{stop} Also, from the idempotency layer (`application/problem+json`): {what}"
            )
            .trim_start()
            .to_string();
            existing
                .content
                .entry(PROBLEM_JSON.to_string())
                .or_insert(content);
            if retry_after {
                existing
                    .headers
                    .entry("Retry-After".to_string())
                    .or_insert_with(retry);
            }
        }
        // A reference to a shared response: left as it is.
        Some(RefOr::Ref(_)) => {}
        None => {
            let mut response = ResponseBuilder::new()
                .description(what)
                .content(PROBLEM_JSON, content);
            if retry_after {
                response = response.header("Retry-After", retry());
            }
            op.responses
                .responses
                .insert(status.to_string(), RefOr::T(response.build()));
        }
    }
}
