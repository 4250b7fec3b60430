//! In-process group: a bare async call, raw moka `get`/`insert`, idem on `MemoryStore`
//! (through `Call` and through `#[idempotent]`), and two peers: the `cached` crate's
//! `#[cached]` (memoisation), and the `idempotent` crate's in-memory store (0.3) driven through
//! the same claim → run → complete → replay cycle with the same MessagePack encoding.
//!
//! `IDEM_INPROC_PROFILE=<case>:<iterations>` runs one case that many times and exits, for
//! callgrind (`bench/report` runs each case at two iteration counts and takes the difference,
//! so that start-up cancels out): `moka_get`, `moka_insert_get`, `idem_macro_replay`,
//! `idem_macro_fresh`, `idempotent_replay`, `idempotent_fresh`, `cached_hit`,
//! `idem_claim_replay` (a replay that goes through the store's claim, as on Redis and SQL: a
//! `MemoryStore` behind a wrapper without the synchronous replay path), and
//! `moka_sync_get`, `moka_sync_insert_get` (moka's synchronous cache, the one `MemoryStore`
//! keeps its records in, with moka's defaults), `moka_store_get`, `moka_store_insert_get`
//! (that cache configured as `MemoryStore` configures it: a weigher, a per-entry expiry, the
//! LRU policy and an eviction listener; see [`store_like_cache`]), and for durable steps
//! `idem_10_steps_fresh`, `idem_no_steps_fresh` (one step = their difference / 10) and
//! `moka_sync_insert` (a raw insert of the step's value).
//!
//! All on one current-thread tokio runtime. "Fresh" benches use a key never seen before on
//! every iteration and a new store (or cache) per criterion sample, built and dropped outside
//! the timed region, so that memory stays bounded.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cached::Cached;
use criterion::{criterion_group, Criterion};
use idem_core::{Call, ClaimRequest, Error, FencingToken, Key, Store};
use idem_stores::MemoryStore;
use moka::future::Cache;

const TTL: Duration = Duration::from_secs(3600);
const LEASE: Duration = Duration::from_secs(30);
const REPLAY_N: u64 = 42;

/// A fresh key for every iteration of every bench in this process.
static NEXT: AtomicU64 = AtomicU64::new(1_000_000);

fn next() -> u64 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The function under test: no work of its own, so that only the wrapper is measured.
async fn work(n: u64) -> Result<u64, Error> {
    Ok(n.wrapping_mul(2))
}

/// `work` through the runtime's entry point by hand.
async fn work_call(store: &MemoryStore, n: u64) -> Result<u64, Error> {
    Call::new("idem_bench::work_call")
        .key(n)
        .fingerprint((&n,))
        .ttl(TTL)
        .run(store, work(n))
        .await
}

/// How many steps a call of [`work_steps`] makes.
const STEPS: u64 = 10;

/// A fresh call whose body is [`STEPS`] durable steps, each returning the same 32-byte value
/// as the raw moka baselines insert (a 32-character string: 33 bytes of MessagePack). One
/// step costs (this − `idem_macro_fresh`) / `STEPS`: the step's bookkeeping, its envelope, its
/// fenced write, and a tenth of the one read of recorded steps at the first step.
async fn work_steps(store: &MemoryStore, n: u64) -> Result<u64, Error> {
    Call::new("idem_bench::work_steps")
        .key(n)
        .fingerprint((&n,))
        .ttl(TTL)
        .run(store, async {
            for _ in 0..STEPS {
                black_box(
                    idem_core::step("s", async { Ok::<_, Error>(STEP_VALUE.to_string()) }).await?,
                );
            }
            Ok(n.wrapping_mul(2))
        })
        .await
}

/// The value every step returns.
const STEP_VALUE: &str = "0123456789abcdef0123456789abcdef";

/// The same call without steps, for the difference.
async fn work_no_steps(store: &MemoryStore, n: u64) -> Result<u64, Error> {
    Call::new("idem_bench::work_steps")
        .key(n)
        .fingerprint((&n,))
        .ttl(TTL)
        .run(store, async { Ok(n.wrapping_mul(2)) })
        .await
}

/// `work` through the attribute: what a user writes.
#[idem_core::idempotent(key = n, store = store, skip(store), ttl = "1h")]
async fn work_idem(store: &MemoryStore, n: u64) -> Result<u64, Error> {
    Ok(n.wrapping_mul(2))
}

/// The peer: `cached`'s memoisation of the same function (caches `Ok` values only).
#[cached::macros::cached]
async fn work_cached(n: u64) -> Result<u64, Error> {
    Ok(n.wrapping_mul(2))
}

/// The peer's cycle, as a user of `idempotent` 0.3 writes it around `work`: key and
/// fingerprint, `try_insert` (claim), run, `complete`, or decode the stored response.
async fn work_peer(store: &PeerStore, n: u64) -> Result<u64, Error> {
    use idem_core::codec::{Codec, MsgPack};
    use idempotent::entry::ExistingEntry;
    use idempotent::fingerprint::{DefaultFingerprintStrategy, FingerprintStrategy};
    use idempotent::store::{IdempotencyStore, InsertResult};
    use idempotent::{CachedResponse, IdempotencyEntry, IdempotencyKey};

    let key = IdempotencyKey::new(n.to_string()).expect("a valid key");
    let args = MsgPack.encode(&(n,)).map_err(Error::Codec)?;
    let fingerprint = DefaultFingerprintStrategy.compute("idem_bench::work_peer", &args);
    let entry = IdempotencyEntry::new(fingerprint, TTL);
    let Ok(found) = store.try_insert(&key, entry.clone()).await;
    match found {
        InsertResult::Claimed { fencing_token } => {
            let v = work(n).await?;
            let body = MsgPack.encode(&v).map_err(Error::Codec)?;
            let done = entry.complete(CachedResponse {
                status_code: 200,
                metadata: Default::default(),
                body: body.into(),
            });
            let Ok(()) = store.complete(&key, done, fencing_token).await;
            Ok(v)
        }
        InsertResult::Exists(ExistingEntry::Completed(done)) => {
            if !done.fingerprint_matches(fingerprint) {
                return Err(Error::KeyReused);
            }
            MsgPack.decode(&done.response().body).map_err(Error::Codec)
        }
        InsertResult::Exists(ExistingEntry::Processing(_)) => {
            Err(Error::InProgress { retry_after: None })
        }
    }
}

type PeerStore = idempotent::store::memory::MemoryStore;

fn peer_store() -> PeerStore {
    PeerStore::new(1024, Duration::from_secs(3600))
}

fn raw_key(n: u64) -> Key {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&n.to_le_bytes());
    Key(k)
}

/// A `MemoryStore` without its synchronous replay path ([`Store::completed_now`]): its
/// replays go through [`Store::claim`], as every replay does on Redis and SQL.
#[derive(Debug)]
struct ThroughClaim(MemoryStore);

#[idem_core::async_trait]
impl Store for ThroughClaim {
    async fn claim(&self, req: &ClaimRequest) -> Result<idem_core::Claim, idem_core::StoreError> {
        self.0.claim(req).await
    }
    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), idem_core::StoreError> {
        self.0.complete(key, token, value, ttl).await
    }
    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), idem_core::StoreError> {
        self.0.release(key, token).await
    }
    async fn renew(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), idem_core::StoreError> {
        self.0.renew(key, token, lease).await
    }
    async fn get(
        &self,
        key: &Key,
    ) -> Result<Option<idem_core::RecordState>, idem_core::StoreError> {
        self.0.get(key).await
    }
    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), idem_core::StoreError> {
        self.0.wait(key, timeout).await
    }
    async fn remove(&self, key: &Key) -> Result<(), idem_core::StoreError> {
        self.0.remove(key).await
    }
    fn release_detached(&self, key: Key, token: FencingToken) {
        self.0.release_detached(key, token)
    }
    fn process_local(&self) -> bool {
        self.0.process_local()
    }
}

/// `work` through `Call` on a store whose replays go through its claim.
async fn work_through_claim(store: &ThroughClaim, n: u64) -> Result<u64, Error> {
    Call::new("idem_bench::work_through_claim")
        .key(n)
        .fingerprint((&n,))
        .ttl(TTL)
        .run(store, work(n))
        .await
}

/// moka's synchronous cache configured as `MemoryStore` configures its records' cache
/// (`idem-stores/src/memory/records.rs`): a weigher, a per-entry expiry read from the value,
/// the LRU policy (every new entry admitted) and an eviction listener that counts — the fair
/// raw baseline of the store, beside moka's defaults.
fn store_like_cache() -> moka::sync::Cache<Key, Arc<[u8]>> {
    use moka::policy::EvictionPolicy;
    struct PerEntry;
    impl moka::Expiry<Key, Arc<[u8]>> for PerEntry {
        fn expire_after_create(
            &self,
            _: &Key,
            value: &Arc<[u8]>,
            _: std::time::Instant,
        ) -> Option<Duration> {
            // Like the store, the TTL comes from the value (here: its first byte, in hours).
            Some(TTL * u32::from(value.first().copied().unwrap_or(1)).max(1))
        }
    }
    static EVICTED: AtomicU64 = AtomicU64::new(0);
    moka::sync::Cache::builder()
        .max_capacity(8 << 30)
        .weigher(|_: &Key, v: &Arc<[u8]>| u32::try_from(v.len() + 400).unwrap_or(u32::MAX))
        .eviction_policy(EvictionPolicy::lru())
        .expire_after(PerEntry)
        .eviction_listener(|_, _, _| {
            EVICTED.fetch_add(1, Ordering::Relaxed);
        })
        .build()
}

/// A store big enough that no sample evicts.
fn big_store() -> MemoryStore {
    MemoryStore::builder().max_bytes(8 << 30).build()
}

fn inproc(c: &mut Criterion) {
    let rt = idem_bench::current_thread();
    let mut g = c.benchmark_group("inproc");

    g.bench_function("bare_call", |b| {
        b.to_async(&rt).iter(|| work(black_box(REPLAY_N)))
    });

    // Raw moka: the physical limit of an in-process store.
    let value: Arc<[u8]> = Arc::from(&[0xa5u8; 32][..]);
    let cache: Cache<Key, Arc<[u8]>> = Cache::new(1 << 20);
    rt.block_on(cache.insert(raw_key(REPLAY_N), value.clone()));
    let hit = raw_key(REPLAY_N);
    g.bench_function("moka_get", |b| {
        b.to_async(&rt).iter(|| cache.get(black_box(&hit)))
    });
    g.bench_function("moka_insert", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let value = value.clone();
            async move {
                let cache: Cache<Key, Arc<[u8]>> = Cache::new(u64::MAX);
                let start = Instant::now();
                for _ in 0..iters {
                    cache
                        .insert(black_box(raw_key(next())), value.clone())
                        .await;
                }
                let elapsed = start.elapsed();
                drop(cache);
                elapsed
            }
        })
    });

    // Raw moka's synchronous cache, which `MemoryStore` is built on.
    let sync_cache: moka::sync::Cache<Key, Arc<[u8]>> = moka::sync::Cache::new(1 << 20);
    sync_cache.insert(raw_key(REPLAY_N), value.clone());
    g.bench_function("moka_sync_get", |b| {
        b.iter(|| sync_cache.get(black_box(&hit)))
    });
    // The same cache configured as `MemoryStore` configures it.
    let store_cache = store_like_cache();
    store_cache.insert(raw_key(REPLAY_N), value.clone());
    g.bench_function("moka_store_get", |b| {
        b.iter(|| store_cache.get(black_box(&hit)))
    });

    g.bench_function("moka_insert_get", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let value = value.clone();
            async move {
                let cache: Cache<Key, Arc<[u8]>> = Cache::new(u64::MAX);
                let start = Instant::now();
                for _ in 0..iters {
                    let k = raw_key(next());
                    cache.insert(black_box(k), value.clone()).await;
                    black_box(cache.get(&k).await);
                }
                let elapsed = start.elapsed();
                drop(cache);
                elapsed
            }
        })
    });

    // idem through `Call`.
    let store = big_store();
    rt.block_on(work_call(&store, REPLAY_N)).unwrap();
    g.bench_function("idem_call_fresh", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let store = big_store();
            let start = Instant::now();
            for _ in 0..iters {
                black_box(work_call(&store, next()).await.unwrap());
            }
            let elapsed = start.elapsed();
            drop(store);
            elapsed
        })
    });
    g.bench_function("idem_call_replay", |b| {
        b.to_async(&rt)
            .iter(|| async { work_call(&store, black_box(REPLAY_N)).await.unwrap() })
    });

    // Durable steps: a fresh call of ten steps beside the same call without steps, and the
    // raw baseline of one step, a moka `insert` of the same value.
    g.bench_function("moka_sync_insert", |b| {
        b.iter_custom(|iters| {
            let cache: moka::sync::Cache<Key, Arc<[u8]>> = moka::sync::Cache::new(u64::MAX);
            let v: Arc<[u8]> = Arc::from(STEP_VALUE.as_bytes());
            let start = Instant::now();
            for _ in 0..iters {
                cache.insert(black_box(raw_key(next())), v.clone());
            }
            start.elapsed()
        })
    });
    for (name, steps) in [
        ("idem_call_no_steps_fresh", false),
        ("idem_call_10_steps_fresh", true),
    ] {
        g.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let store = big_store();
                let start = Instant::now();
                for _ in 0..iters {
                    let n = next();
                    let r = if steps {
                        work_steps(&store, n).await
                    } else {
                        work_no_steps(&store, n).await
                    };
                    black_box(r.unwrap());
                }
                let elapsed = start.elapsed();
                drop(store);
                elapsed
            })
        });
    }

    // idem through `#[idempotent]`.
    rt.block_on(work_idem(&store, REPLAY_N)).unwrap();
    g.bench_function("idem_macro_fresh", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let store = big_store();
            let start = Instant::now();
            for _ in 0..iters {
                black_box(work_idem(&store, next()).await.unwrap());
            }
            let elapsed = start.elapsed();
            drop(store);
            elapsed
        })
    });
    g.bench_function("idem_macro_replay", |b| {
        b.to_async(&rt)
            .iter(|| async { work_idem(&store, black_box(REPLAY_N)).await.unwrap() })
    });

    // Where a replay's time goes: identity derivation (hashing) and the store's claim. On the
    // memory store the identity is process-local (SipHash); a shared store gets the portable
    // BLAKE3 digests, measured alongside for comparison.
    g.bench_function("part_identity", |b| {
        b.iter(|| {
            let n = black_box(REPLAY_N);
            Call::new("idem_bench::work_call")
                .key(n)
                .fingerprint((&n,))
                .identity_for(&store)
                .unwrap()
        })
    });
    g.bench_function("part_identity_portable", |b| {
        b.iter(|| {
            let n = black_box(REPLAY_N);
            Call::new("idem_bench::work_call")
                .key(n)
                .fingerprint((&n,))
                .identity()
                .unwrap()
        })
    });
    let ident = Call::new("idem_bench::work_call")
        .key(REPLAY_N)
        .fingerprint((&REPLAY_N,))
        .identity_for(&store)
        .unwrap()
        .unwrap();
    g.bench_function("part_store_claim_completed", |b| {
        b.to_async(&rt).iter(|| async {
            let req = ClaimRequest {
                key: ident.key,
                fingerprint: ident.fingerprint,
                token: FencingToken(7),
                lease: LEASE,
            };
            store.claim(black_box(&req)).await.unwrap()
        })
    });
    g.bench_function("part_store_get_completed", |b| {
        b.to_async(&rt)
            .iter(|| async { store.get(black_box(&ident.key)).await.unwrap() })
    });

    // The peer with the same cycle: `idempotent`'s in-memory store (an actor task).
    let peer = rt.block_on(async { peer_store() });
    rt.block_on(work_peer(&peer, REPLAY_N)).unwrap();
    g.bench_function("idempotent_replay", |b| {
        b.to_async(&rt)
            .iter(|| async { work_peer(&peer, black_box(REPLAY_N)).await.unwrap() })
    });
    g.bench_function("idempotent_fresh", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let peer = peer_store();
            let start = Instant::now();
            for _ in 0..iters {
                black_box(work_peer(&peer, next()).await.unwrap());
            }
            let elapsed = start.elapsed();
            drop(peer);
            elapsed
        })
    });

    // The memoising peer.
    rt.block_on(work_cached(REPLAY_N)).unwrap();
    g.bench_function("cached_hit", |b| {
        b.to_async(&rt)
            .iter(|| async { work_cached(black_box(REPLAY_N)).await.unwrap() })
    });
    g.bench_function("cached_miss", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let start = Instant::now();
            for _ in 0..iters {
                black_box(work_cached(next()).await.unwrap());
            }
            let elapsed = start.elapsed();
            let mut cache = WORK_CACHED.write().await;
            cache.cache_clear();
            cache.cache_set(REPLAY_N, REPLAY_N * 2);
            elapsed
        })
    });

    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = inproc
}

/// `IDEM_INPROC_PROFILE=<case>:<iterations>`: runs one case and exits (for callgrind).
fn profile(spec: &str) {
    let (case, iters) = spec
        .split_once(':')
        .expect("IDEM_INPROC_PROFILE=<case>:<iterations>");
    let iters: u64 = iters.parse().expect("a number of iterations");
    let rt = idem_bench::current_thread();
    rt.block_on(async {
        let store = big_store();
        let value: Arc<[u8]> = Arc::from(&[0xa5u8; 32][..]);
        let cache: Cache<Key, Arc<[u8]>> = Cache::new(u64::MAX);
        let sync_cache: moka::sync::Cache<Key, Arc<[u8]>> = moka::sync::Cache::new(u64::MAX);
        let step_value: Arc<[u8]> = Arc::from(STEP_VALUE.as_bytes());
        let store_cache = store_like_cache();
        let peer = peer_store();
        // Every case's replay key exists before the loop.
        cache.insert(raw_key(REPLAY_N), value.clone()).await;
        sync_cache.insert(raw_key(REPLAY_N), value.clone());
        store_cache.insert(raw_key(REPLAY_N), value.clone());
        work_idem(&store, REPLAY_N).await.unwrap();
        work_peer(&peer, REPLAY_N).await.unwrap();
        work_cached(REPLAY_N).await.unwrap();
        let through_claim = ThroughClaim(big_store());
        work_through_claim(&through_claim, REPLAY_N).await.unwrap();
        for _ in 0..iters {
            match case {
                "moka_get" => {
                    black_box(cache.get(black_box(&raw_key(REPLAY_N))).await);
                }
                "moka_insert_get" => {
                    let k = raw_key(next());
                    cache.insert(k, value.clone()).await;
                    black_box(cache.get(&k).await);
                }
                "moka_sync_get" => {
                    black_box(sync_cache.get(black_box(&raw_key(REPLAY_N))));
                }
                "moka_sync_insert" => {
                    sync_cache.insert(raw_key(next()), step_value.clone());
                }
                "idem_no_steps_fresh" => {
                    black_box(work_no_steps(&store, next()).await.unwrap());
                }
                "idem_10_steps_fresh" => {
                    black_box(work_steps(&store, next()).await.unwrap());
                }
                "moka_sync_insert_get" => {
                    let k = raw_key(next());
                    sync_cache.insert(k, value.clone());
                    black_box(sync_cache.get(&k));
                }
                "moka_store_get" => {
                    black_box(store_cache.get(black_box(&raw_key(REPLAY_N))));
                }
                "moka_store_insert_get" => {
                    let k = raw_key(next());
                    store_cache.insert(k, value.clone());
                    black_box(store_cache.get(&k));
                }
                "idem_macro_replay" => {
                    black_box(work_idem(&store, black_box(REPLAY_N)).await.unwrap());
                }
                "idem_macro_fresh" => {
                    black_box(work_idem(&store, next()).await.unwrap());
                }
                "idempotent_replay" => {
                    black_box(work_peer(&peer, black_box(REPLAY_N)).await.unwrap());
                }
                "idempotent_fresh" => {
                    black_box(work_peer(&peer, next()).await.unwrap());
                }
                "cached_hit" => {
                    black_box(work_cached(black_box(REPLAY_N)).await.unwrap());
                }
                "idem_claim_replay" => {
                    black_box(
                        work_through_claim(&through_claim, black_box(REPLAY_N))
                            .await
                            .unwrap(),
                    );
                }
                other => panic!("unknown case {other}"),
            }
        }
    });
}

fn main() {
    if let Ok(spec) = std::env::var("IDEM_INPROC_PROFILE") {
        profile(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
