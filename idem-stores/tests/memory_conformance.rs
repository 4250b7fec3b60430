//! The store conformance suite on `MemoryStore`.

use std::sync::Arc;

idem_core::conformance_tests!(async {
    Some(Arc::new(
        idem_stores::MemoryStore::builder()
            .max_value_size(256 << 10)
            .build(),
    ) as Arc<dyn idem_core::Store>)
});

fn main() -> std::process::ExitCode {
    idem_core::testkit::harness::run([cases(&[])])
}
