//! `MemoryStore`'s `max_bytes` bounds real memory: filled far past its bound with results the
//! size of HTTP responses (4–6 KiB), the heap it holds stays within the bound ± 20%.
//!
//! A test of its own binary, because it counts every allocation with a global allocator (the
//! one place besides `benches/memory.rs` where idem needs `unsafe`).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use idem_core::{Call, Error};
use idem_stores::MemoryStore;

#[global_allocator]
static ALLOCATOR: idem_bench::CountingAlloc = idem_bench::CountingAlloc;

/// A response body of 4 to 6 KiB.
fn response(n: u64) -> String {
    let len = 4096 + (n as usize * 7919) % 2048;
    let mut body = format!("{n:016}");
    body.push_str(&"r".repeat(len - 16));
    body
}

#[test]
fn memory_with_http_sized_values_stays_within_the_bound() {
    const BOUND: u64 = 32 << 20;
    let rt = idem_bench::current_thread();
    let store = MemoryStore::builder().max_bytes(BOUND).build();
    // Warm up everything that allocates once (runtime, statics, tracing) before measuring.
    rt.block_on(async {
        Call::new("tests::memory_bound::warm")
            .key(0u64)
            .run(&store, async { Ok::<_, Error>(response(0)) })
            .await
            .unwrap();
    });
    let before = idem_bench::live_heap_bytes();
    let mut records = 0u64;
    rt.block_on(async {
        // Three times the bound in records, so that eviction runs for most of the fill.
        for n in 0..(3 * BOUND / 5_000) {
            let v = Call::new("tests::memory_bound")
                .key(n)
                .ttl(Duration::from_secs(3600))
                .run(&store, async move { Ok::<_, Error>(response(n)) })
                .await
                .unwrap();
            assert!(v.len() >= 4096);
            records += 1;
        }
    });
    let held = (idem_bench::live_heap_bytes() - before) as f64;
    let bound = BOUND as f64;
    println!(
        "{records} calls, {} records kept, heap held {:.1} MiB for a bound of {:.1} MiB ({:+.1}%), charged {:.1} MiB",
        store.entry_count(),
        held / (1 << 20) as f64,
        bound / (1 << 20) as f64,
        (held / bound - 1.0) * 100.0,
        store.weighted_size() as f64 / (1 << 20) as f64,
    );
    assert!(
        (0.8 * bound..=1.2 * bound).contains(&held),
        "heap held {held} B for a bound of {bound} B"
    );
    drop(store);
    let after = (idem_bench::live_heap_bytes() - before) as f64;
    assert!(after < 0.01 * bound, "{after} B not freed with the store");
}
