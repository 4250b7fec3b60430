//! The OpenAPI description from outside the crate, as docs/http.md shows it: options built
//! with their methods, the 401, 413 and 500 responses, the keys' expiry policy, and a
//! handler's own 422 merged with the layer's into one readable description.
//!
//! ```text
//! cargo test --features openapi --test http_openapi
//! ```

#![cfg(feature = "openapi")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use idem_http::openapi::{document, document_with, OpenApiOptions};
use utoipa::openapi::path::OperationBuilder;
use utoipa::openapi::ResponseBuilder;

fn operation() -> utoipa::openapi::path::Operation {
    OperationBuilder::new()
        .response("201", ResponseBuilder::new().description("The payment"))
        .response(
            "422",
            ResponseBuilder::new().description("The payment request is invalid"),
        )
        .build()
}

#[test]
fn the_layers_responses_and_expiry_are_described() {
    let mut op = operation();
    document(&mut op);
    let json = serde_json::to_value(&op).unwrap();
    for status in ["400", "401", "409", "413", "422", "500", "503"] {
        let r = &json["responses"][status];
        assert!(
            r["content"]["application/problem+json"].is_object(),
            "{status}: {r}"
        );
        assert!(!r["description"].as_str().unwrap().is_empty(), "{status}");
    }
    assert!(json["responses"]["401"]["description"]
        .as_str()
        .unwrap()
        .contains("missing-scope"));
    assert!(json["responses"]["413"]["description"]
        .as_str()
        .unwrap()
        .contains("1048576 bytes"));
    // The expiry policy: in words and as a number.
    let key = &json["parameters"][0];
    assert_eq!(key["name"], "Idempotency-Key");
    assert!(
        key["description"].as_str().unwrap().contains("24 hours"),
        "{key}"
    );
    assert_eq!(key["x-idempotency-key-ttl-seconds"], 86400);
    // The handler's own 422 keeps its words, then the layer's, as one sentence each.
    let text = json["responses"]["422"]["description"].as_str().unwrap();
    assert_eq!(
        text,
        "The payment request is invalid. Also, from the idempotency layer \
         (`application/problem+json`): the Idempotency-Key was used before with a different \
         request; use a new key for a new request (problem `key-reused`)."
    );
}

#[test]
fn options_built_outside_the_crate_describe_the_layer() {
    let mut op = operation();
    let options = OpenApiOptions::default()
        .required(false)
        .max_key_len(64)
        .ttl(Duration::from_secs(7 * 24 * 3600))
        .max_request_body(4096)
        .scoped(false);
    document_with(&mut op, &options);
    let json = serde_json::to_value(&op).unwrap();
    let key = &json["parameters"][0];
    assert_eq!(key["required"], false);
    assert_eq!(key["schema"]["maxLength"], 66);
    assert!(
        key["description"].as_str().unwrap().contains("7 days"),
        "{key}"
    );
    assert_eq!(key["x-idempotency-key-ttl-seconds"], 7 * 24 * 3600);
    assert!(
        json["responses"]["401"].is_null(),
        "an unscoped layer never answers 401"
    );
    assert!(json["responses"]["413"]["description"]
        .as_str()
        .unwrap()
        .contains("4096 bytes"));
}
