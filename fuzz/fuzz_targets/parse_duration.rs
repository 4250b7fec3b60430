//! The duration parser of the attribute (`ttl = "24h"`): any string parses to a non-zero
//! duration or a typed error, never a panic or an overflow; a parsed duration prints back.
#![no_main]

use idem_core::options::parse_duration;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = parse_duration(s) {
        assert!(!d.is_zero(), "{s:?} parsed to zero");
    }
});
