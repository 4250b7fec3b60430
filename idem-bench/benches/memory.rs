//! Memory: heap bytes per stored record, counted by a global allocator.
//!
//! Stores of the same results:
//!
//! - `MemoryStore`, filled through `Call` (what a user's calls leave behind), with results of
//!   a `u64` (1,000,000 records), a 64-byte string (1,000,000) and a 4 KiB string (100,000);
//! - raw moka (`moka::future::Cache<Key, Arc<[u8]>>`) holding the same record bytes: the
//!   physical limit of a moka-based store;
//! - `cached`'s `#[cached]` (its unbounded `HashMap` of `u64 → u64`): the peer.
//!
//! Each figure is (live heap bytes after filling − before) / records, measured after moka's
//! pending maintenance has run. It is requested bytes (what the program asked the allocator
//! for), not the allocator's own overhead; the process's resident-set growth is reported too.
//! Each store is filled in a child process of its own (so that the RSS figure starts from a
//! clean heap). Results go to `$CARGO_TARGET_DIR/idem-bench/memory.json`.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::codec::Codec;
use idem_core::{Call, Error, Key};
use idem_stores::MemoryStore;
use serde::Serialize;

#[global_allocator]
static ALLOCATOR: idem_bench::CountingAlloc = idem_bench::CountingAlloc;

const RECORDS: u64 = 1_000_000;
/// Fewer records of 4 KiB values (400 MiB of payload is enough to measure).
const RECORDS_4K: u64 = 100_000;

fn live() -> isize {
    idem_bench::live_heap_bytes()
}

/// Resident set size in bytes, from /proc (0 where there is none).
fn rss() -> i64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<i64>().ok())
        .map_or(0, |pages| pages * 4096)
}

#[derive(Serialize)]
struct Figure {
    records: u64,
    /// The result's own size (the `u64`, or the string's bytes).
    payload_bytes: usize,
    bytes_per_record: f64,
    rss_bytes_per_record: f64,
    /// The stored value's size (the encoded record, or the `u64` for the peer).
    value_bytes: usize,
    fill_seconds: f64,
}

#[cached::macros::cached]
async fn work_cached(n: u64) -> Result<u64, Error> {
    Ok(n.wrapping_mul(2))
}

fn raw_key(n: u64) -> Key {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&n.to_le_bytes());
    Key(k)
}

/// Measures the heap growth of `fill`, which returns what it built (kept alive until measured)
/// and the size of one value.
async fn measure<T, F, Fut>(name: &str, records: u64, payload_bytes: usize, fill: F) -> (Figure, T)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = (T, usize)>,
{
    let (heap0, rss0) = (live(), rss());
    let start = Instant::now();
    let (kept, value_bytes) = fill().await;
    let fill_seconds = start.elapsed().as_secs_f64();
    let (heap1, rss1) = (live(), rss());
    let f = Figure {
        records,
        payload_bytes,
        bytes_per_record: (heap1 - heap0) as f64 / records as f64,
        rss_bytes_per_record: (rss1 - rss0) as f64 / records as f64,
        value_bytes,
        fill_seconds,
    };
    println!(
        "{name}: {:.1} B/record heap, {:.1} B/record RSS ({} records, values of {} B, {:.1} s)",
        f.bytes_per_record, f.rss_bytes_per_record, f.records, f.value_bytes, f.fill_seconds
    );
    (f, kept)
}

/// A string result of `len` bytes, distinct per `n`.
fn text(n: u64, len: usize) -> String {
    let mut s = format!("{n:016}");
    s.push_str(&"v".repeat(len - 16));
    s
}

/// Fills a `MemoryStore` through `Call` with `records` results of `value(n)`.
async fn memory_store<V, F>(name: &str, records: u64, payload: usize, value: F) -> Figure
where
    V: Serialize + serde::de::DeserializeOwned,
    F: Fn(u64) -> V,
{
    let (f, store) = measure(name, records, payload, || async {
        // The bound is far above what is stored: nothing is evicted.
        let store = MemoryStore::builder().max_bytes(16 << 30).build();
        let mut record_len = 0;
        for n in 0..records {
            let v = value(n);
            if n == 0 {
                record_len = record(&v).len();
            }
            Call::new("idem_bench::memory")
                .key(n)
                .fingerprint((&n,))
                .ttl(Duration::from_secs(3600))
                .run(&store, async move { Ok::<_, Error>(v) })
                .await
                .unwrap();
        }
        assert_eq!(store.entry_count(), records, "records were evicted");
        (store, record_len)
    })
    .await;
    drop(store);
    f
}

/// Fills raw moka with `records` copies of `record`'s bytes under distinct keys.
async fn moka_raw(name: &str, records: u64, payload: usize, value: Vec<u8>) -> Figure {
    let (f, cache) = measure(name, records, payload, || async {
        let cache: moka::future::Cache<Key, Arc<[u8]>> = moka::future::Cache::new(u64::MAX);
        for n in 0..records {
            cache.insert(raw_key(n), Arc::from(value.as_slice())).await;
        }
        cache.run_pending_tasks().await;
        assert_eq!(cache.entry_count(), records);
        (cache, value.len())
    })
    .await;
    drop(cache);
    f
}

/// Fills one store and measures it (in a process of its own, so that RSS starts clean).
async fn one(name: &str) -> Figure {
    match name {
        "memory_store" => memory_store(name, RECORDS, 8, |n| n.wrapping_mul(2)).await,
        "memory_store_64" => memory_store(name, RECORDS, 64, |n| text(n, 64)).await,
        "memory_store_4k" => memory_store(name, RECORDS_4K, 4096, |n| text(n, 4096)).await,
        "moka_raw" => moka_raw(name, RECORDS, 8, record(&(RECORDS * 2))).await,
        "moka_raw_64" => moka_raw(name, RECORDS, 64, record(&text(0, 64))).await,
        "moka_raw_4k" => moka_raw(name, RECORDS_4K, 4096, record(&text(0, 4096))).await,
        _ => {
            let (f, ()) = measure(name, RECORDS, 8, || async {
                for n in 0..RECORDS {
                    work_cached(n).await.unwrap();
                }
                ((), std::mem::size_of::<u64>())
            })
            .await;
            f
        }
    }
}

/// The record `Call` stores for a result: envelope, compatibility tag, MessagePack payload.
fn record<V: Serialize>(value: &V) -> Vec<u8> {
    let tag = idem_core::codec::TypeTag::new("msgpack", 0);
    let payload = idem_core::codec::MsgPack.encode(value).unwrap();
    idem_core::codec::seal(&tag, &payload)
}

const STORES: [&str; 7] = [
    "memory_store",
    "moka_raw",
    "cached",
    "memory_store_64",
    "moka_raw_64",
    "memory_store_4k",
    "moka_raw_4k",
];
const CHILD_ENV: &str = "IDEM_BENCH_MEMORY_ONE";

fn main() {
    if let Ok(name) = std::env::var(CHILD_ENV) {
        let figure = idem_bench::current_thread().block_on(one(&name));
        println!("json {}", serde_json::to_string(&figure).unwrap());
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut figures = serde_json::Map::new();
    for name in STORES {
        let out = std::process::Command::new(&exe)
            .env(CHILD_ENV, name)
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            match line.strip_prefix("json ") {
                Some(json) => {
                    figures.insert(name.into(), serde_json::from_str(json).unwrap());
                }
                None => println!("{line}"),
            }
        }
        assert!(out.status.success(), "{name}: {}", out.status);
    }
    let dir = idem_bench::out_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("memory.json");
    std::fs::write(&path, serde_json::to_string_pretty(&figures).unwrap()).unwrap();
    println!("wrote {}", path.display());
}
