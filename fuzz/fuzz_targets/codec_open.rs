//! The record envelope decoder: any bytes open to a payload or a typed error, never a panic;
//! an envelope sealed with a tag opens with it to the same payload.
#![no_main]

use idem_core::codec::{open, seal, TypeTag};
use libfuzzer_sys::fuzz_target;

const TAGS: [TypeTag; 3] = [
    TypeTag::new("msgpack", 0),
    TypeTag::new("json", 7),
    TypeTag::new("msgpack", u32::MAX),
];

fuzz_target!(|data: &[u8]| {
    for tag in &TAGS {
        if let Ok(payload) = open(tag, data) {
            assert!(payload.len() <= data.len());
        }
        let sealed = seal(tag, data);
        assert_eq!(open(tag, &sealed).ok(), Some(data));
    }
});
