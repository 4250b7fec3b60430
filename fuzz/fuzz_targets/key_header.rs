//! The `Idempotency-Key` header parser: any header value parses to a key no longer than the
//! limit, or to a typed error, never a panic.
#![no_main]

use idem_http::{parse_key_value, DEFAULT_MAX_KEY_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for max in [DEFAULT_MAX_KEY_LEN, 8, 0] {
        if let Ok(key) = parse_key_value(data, max) {
            assert!(key.len() <= data.len(), "{key:?} longer than its header");
        }
    }
});
