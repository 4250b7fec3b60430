//! The layer in an OpenAPI document (feature `openapi`, on [utoipa]).
//!
//! [`document`] adds to one operation what the layer does to it: the `Idempotency-Key` request
//! header, the `Idempotent-Replayed` header on its 2xx responses, and the problem responses
//! (`400`, `409`, `422`, `503`, `application/problem+json`).
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
//! for status in ["400", "409", "422", "503"] {
//!     assert!(json["responses"][status]["content"]["application/problem+json"].is_object(), "{status}");
//! }
//! assert!(json["responses"]["409"]["headers"]["Retry-After"].is_object());
//! ```
//!
//! For a layer with [`required(false)`](super::IdempotencyLayer::required), use
//! [`document_with`] and `required: false`.

use utoipa::openapi::content::Content;
use utoipa::openapi::header::Header;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{Object, ObjectBuilder, Type};
use utoipa::openapi::{RefOr, Required, ResponseBuilder};

use super::key_header::DEFAULT_MAX_KEY_LEN;
use super::problem::PROBLEM_JSON;

/// What [`document_with`] says about the layer on an operation.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OpenApiOptions {
    /// Whether a request without the key is refused (the layer's `required`). Default `true`.
    pub required: bool,
    /// The longest key accepted (the layer's `max_key_len`). Default 255.
    pub max_key_len: usize,
}

impl Default for OpenApiOptions {
    fn default() -> Self {
        OpenApiOptions {
            required: true,
            max_key_len: DEFAULT_MAX_KEY_LEN,
        }
    }
}

/// Documents the layer's defaults on `op`; see the [module docs](self).
pub fn document(op: &mut Operation) {
    document_with(op, &OpenApiOptions::default());
}

/// Documents the layer on `op`: the `Idempotency-Key` header parameter, `Idempotent-Replayed`
/// on every 2xx response, and the 400, 409, 422 and 503 problem responses. A status the
/// operation documents already keeps its own description, with idem's problem added to it.
pub fn document_with(op: &mut Operation, options: &OpenApiOptions) {
    let key = ParameterBuilder::new()
        .name("Idempotency-Key")
        .parameter_in(ParameterIn::Header)
        .required(if options.required {
            Required::True
        } else {
            Required::False
        })
        .description(Some(
            "A key unique to this operation's request, as an RFC 8941 String \
             (`\"8e03978e-40d5-43e8-bc93-6894a57f9324\"`). A retry with the same key and the \
             same request gets the first response, with `Idempotent-Replayed: true`.",
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

    for (status, what, retry_after) in [
        (
            "400",
            "`missing-key` or `malformed-key`: the Idempotency-Key header is missing or unusable.",
            false,
        ),
        (
            "409",
            "`in-progress`: a request with this key is still being processed; retry after \
             `Retry-After` seconds.",
            true,
        ),
        (
            "422",
            "`key-reused`: this key was used before with another request.",
            false,
        ),
        (
            "503",
            "`store-unavailable`: the idempotency store failed; the request was not processed.",
            true,
        ),
    ] {
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
            existing.description = format!("{} Or, from idem: {what}", existing.description);
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
