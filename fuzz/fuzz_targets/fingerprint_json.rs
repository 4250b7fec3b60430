//! The fingerprint serializer against serde values: any JSON document that parses digests
//! without a panic, deterministically, and to the same digest after a round trip through text.
#![no_main]

use idem_core::fingerprint::digest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let a = digest("fuzz", &value);
    let b = digest("fuzz", &value);
    assert_eq!(a.is_ok(), b.is_ok());
    if let (Ok(a), Ok(b)) = (&a, &b) {
        assert_eq!(a, b);
    }
    if let Ok(text) = serde_json::to_string(&value) {
        if let Ok(again) = serde_json::from_str::<serde_json::Value>(&text) {
            if again == value {
                assert_eq!(digest("fuzz", &again).ok(), a.ok());
            }
        }
    }
});
