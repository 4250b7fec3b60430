//! Redis group: raw `SET NX PX` and `GET` round trips on the same `redis::Client` as the store,
//! idem fresh call and replay through `RedisStore`, and throughput with 64 concurrent tasks on
//! distinct keys (idem fresh calls against raw `SET NX PX`); and a replay through
//! `TieredStore<RedisStore>`, which answers from a local tier without a round trip.
//!
//! Server: `IDEM_TEST_REDIS_URL`, else `redis://127.0.0.1:6379`. Unreachable: one "skipped"
//! line, no results. Every key lives under a prefix unique to the run and expires within a
//! minute; nothing else on the server is touched.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use idem_core::{Call, Error};
use idem_stores::{RedisStore, TieredStore};
use redis::aio::ConnectionManager;
use serde::Serialize;
use tokio::runtime::Runtime;

const TTL: Duration = Duration::from_secs(60);
const REPLAY_N: u64 = 42;
const CONCURRENCY: u64 = 64;

static NEXT: AtomicU64 = AtomicU64::new(1_000_000);
/// Operations issued (raw commands or idem calls), for the server cost per operation.
static OPS: AtomicU64 = AtomicU64::new(0);

fn next() -> u64 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

async fn work(n: u64) -> Result<u64, Error> {
    Ok(n.wrapping_mul(2))
}

async fn idem_call(store: &RedisStore, n: u64) -> Result<u64, Error> {
    idem_call_on(store, n).await
}

async fn idem_call_on(store: &dyn idem_core::Store, n: u64) -> Result<u64, Error> {
    OPS.fetch_add(1, Ordering::Relaxed);
    Call::new("idem_bench::redis")
        .key(n)
        .fingerprint((&n,))
        .ttl(TTL)
        .run(store, work(n))
        .await
}

/// A value the size of idem's record of a `u64` (envelope, tag, payload).
const VALUE: &[u8] = b"idem\x01\x0e\x00msgpack;v0;u64\xcf\x00\x00\x00\x00\x00\x00\x00\x54";

async fn set_nx_px(mut conn: ConnectionManager, key: String) -> Option<String> {
    OPS.fetch_add(1, Ordering::Relaxed);
    redis::cmd("SET")
        .arg(key)
        .arg(VALUE)
        .arg("NX")
        .arg("PX")
        .arg(TTL.as_millis() as u64)
        .query_async(&mut conn)
        .await
        .unwrap()
}

async fn get(mut conn: ConnectionManager, key: &str) -> Option<Vec<u8>> {
    OPS.fetch_add(1, Ordering::Relaxed);
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Runs `op` on `CONCURRENCY` tasks, `iters` times each, and returns the wall time.
async fn concurrently<F, Fut>(iters: u64, op: F) -> Duration
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let op = op.clone();
        tasks.spawn(async move {
            for _ in 0..iters {
                op(next()).await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    start.elapsed()
}

/// The commands the benches send; all others run inside scripts.
const TOP_LEVEL: [&str; 6] = ["set", "get", "evalsha", "eval", "script|load", "ping"];

/// `INFO commandstats`: command → (calls, µs of server CPU).
async fn commandstats(mut conn: ConnectionManager) -> BTreeMap<String, (u64, u64)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    idem_bench::parse_commandstats(&info)
}

/// The server's CPU time and commands per operation of one bench, from `INFO commandstats`
/// before and after it (other clients of the server during the bench would count too).
#[derive(Serialize)]
struct ServerCost {
    ops: u64,
    /// Server CPU per operation: the commands clients send (scripts with what they run).
    server_us_per_op: f64,
    /// Commands sent per operation (round trips, unpipelined).
    commands_per_op: f64,
    /// Commands run inside scripts per operation.
    script_commands_per_op: f64,
    /// Command → (calls per op, µs per op).
    by_command: BTreeMap<String, (f64, f64)>,
}

struct CostMeter {
    conn: ConnectionManager,
    costs: BTreeMap<&'static str, ServerCost>,
}

impl CostMeter {
    fn measure(&mut self, rt: &Runtime, name: &'static str, bench: impl FnOnce()) {
        let before = rt.block_on(commandstats(self.conn.clone()));
        let ops0 = OPS.load(Ordering::Relaxed);
        bench();
        let ops = OPS.load(Ordering::Relaxed) - ops0;
        let after = rt.block_on(commandstats(self.conn.clone()));
        if ops == 0 {
            return;
        }
        let mut cost = ServerCost {
            ops,
            server_us_per_op: 0.0,
            commands_per_op: 0.0,
            script_commands_per_op: 0.0,
            by_command: BTreeMap::new(),
        };
        for (cmd, (calls, usec)) in after {
            if cmd == "info" {
                continue;
            }
            let (calls0, usec0) = before.get(&cmd).copied().unwrap_or((0, 0));
            let (dc, du) = (calls.saturating_sub(calls0), usec.saturating_sub(usec0));
            if dc == 0 {
                continue;
            }
            let (c, u) = (dc as f64 / ops as f64, du as f64 / ops as f64);
            // A script's time includes the commands it runs, which are also counted on
            // their own: only the commands a client sends add up.
            if TOP_LEVEL.contains(&cmd.as_str()) {
                cost.commands_per_op += c;
                cost.server_us_per_op += u;
            } else {
                cost.script_commands_per_op += c;
            }
            cost.by_command.insert(cmd, (c, u));
        }
        self.costs.insert(name, cost);
    }

    fn write(&self) {
        let dir = idem_bench::out_dir();
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("redis-server.json");
        std::fs::write(&path, serde_json::to_string_pretty(&self.costs).unwrap()).unwrap();
    }
}

async fn connect(
    url: &str,
    prefix: &str,
) -> Result<(ConnectionManager, RedisStore), Box<dyn std::error::Error>> {
    let client = redis::Client::open(url)?;
    let conn =
        tokio::time::timeout(Duration::from_secs(3), client.get_connection_manager()).await??;
    let store = RedisStore::builder_from_client(client)
        .prefix(format!("{prefix}:idem:"))
        .build()
        .await?;
    Ok((conn, store))
}

fn redis_group(c: &mut Criterion) {
    let rt = idem_bench::multi_thread();
    let url = idem_bench::redis_url();
    let prefix = idem_bench::run_prefix();
    let (conn, store) = match rt.block_on(connect(&url, &prefix)) {
        Ok(x) => x,
        Err(e) => {
            println!("skipped: redis at {url} is not reachable: {e}");
            return;
        }
    };
    let mut g = c.benchmark_group("redis");
    let mut meter = CostMeter {
        conn: conn.clone(),
        costs: BTreeMap::new(),
    };

    // Raw round trips on the store's client.
    let raw_prefix = format!("{prefix}:raw:");
    meter.measure(&rt, "raw_set_nx_px", || {
        g.bench_function("raw_set_nx_px", |b| {
            b.to_async(&rt)
                .iter(|| set_nx_px(conn.clone(), format!("{raw_prefix}{}", next())))
        });
    });
    let hit = format!("{raw_prefix}hit");
    rt.block_on(set_nx_px(conn.clone(), hit.clone()));
    meter.measure(&rt, "raw_get", || {
        g.bench_function("raw_get", |b| {
            b.to_async(&rt).iter(|| get(conn.clone(), &hit))
        });
    });

    // idem.
    meter.measure(&rt, "idem_fresh", || {
        g.bench_function("idem_fresh", |b| {
            b.to_async(&rt)
                .iter(|| async { idem_call(&store, next()).await.unwrap() })
        });
    });
    rt.block_on(idem_call(&store, REPLAY_N)).unwrap();
    meter.measure(&rt, "idem_replay", || {
        g.bench_function("idem_replay", |b| {
            b.to_async(&rt)
                .iter(|| async { idem_call(&store, black_box(REPLAY_N)).await.unwrap() })
        });
    });

    // The same replay through a local tier of completed records (`TieredStore`).
    let tiered = TieredStore::new(store.clone());
    rt.block_on(idem_call_on(&tiered, REPLAY_N)).unwrap();
    meter.measure(&rt, "idem_replay_tiered", || {
        g.bench_function("idem_replay_tiered", |b| {
            b.to_async(&rt)
                .iter(|| async { idem_call_on(&tiered, black_box(REPLAY_N)).await.unwrap() })
        });
    });

    // Throughput: one iteration is CONCURRENCY operations in flight at once.
    g.throughput(Throughput::Elements(CONCURRENCY));
    meter.measure(&rt, "concurrent64_raw_set_nx_px", || {
        g.bench_function("concurrent64_raw_set_nx_px", |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let conn = conn.clone();
                let raw_prefix = raw_prefix.clone();
                concurrently(iters, move |n| {
                    let fut = set_nx_px(conn.clone(), format!("{raw_prefix}{n}"));
                    async move {
                        black_box(fut.await);
                    }
                })
            })
        });
    });
    meter.measure(&rt, "concurrent64_idem_fresh", || {
        g.bench_function("concurrent64_idem_fresh", |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let store = store.clone();
                concurrently(iters, move |n| {
                    let store = store.clone();
                    async move {
                        black_box(idem_call(&store, n).await.unwrap());
                    }
                })
            })
        });
    });
    g.finish();
    meter.write();
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = redis_group
}
criterion_main!(benches);
