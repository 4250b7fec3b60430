//! The store conformance suite on `MemoryStore`.

use std::sync::Arc;

idem_testkit::conformance_tests!(async {
    Some(Arc::new(
        idem_stores::MemoryStore::builder()
            .max_value_size(256 << 10)
            .build(),
    ) as Arc<dyn idem_core::Store>)
});

fn main() -> std::process::ExitCode {
    idem_testkit::harness::run([cases(&[])])
}
