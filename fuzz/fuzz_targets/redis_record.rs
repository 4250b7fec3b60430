//! The Redis store's record parser: any bytes a key may hold (another program's string,
//! corruption, a truncated record) are an error or a record, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = idem_stores::__fuzz_record(data);
});
