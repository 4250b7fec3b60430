//! `idem-bench-redis`: raw Redis commands, idem's `RedisStore` and the `idempotent` crate's
//! Valkey/Redis store (0.3, the peer), measured **in one run, round by round, alternating**, on a
//! private `redis-server` this program starts on a spare loopback port (and stops). With several
//! `--server BIN` (e.g. `redis-server` and a Valkey 8.1 `valkey-server`), every server gets its
//! own private instance and the rounds alternate between servers too, so the figures of both
//! servers come from one run; idem uses the path it detects on each (scripts on Redis 7.0,
//! native `SET … IFEQ` on Valkey 8.1).
//!
//! Per workload it reports: throughput with 64 tasks on distinct keys; the server's CPU per call
//! (its process CPU from `/proc/<pid>/stat`, and `INFO commandstats`); this process's CPU per
//! call; and, with one task, latency per call in round trips (divided by one raw `GET`'s
//! latency, measured in the same round). The single-task workloads run on a current-thread
//! runtime of their own, with their own connections and stores: on the multi-thread runtime a
//! reply wakes the task on another worker, which costs a command that suspends its task more
//! than a round trip (a raw `SET NX PX` came out at 2 "round trips"); on one thread every round
//! trip costs the same, so a raw `SET NX PX` reads ≈ 1.0.
//!
//! ```text
//! cargo run --release -p idem-bench --features redis --bin idem-bench-redis -- \
//!     [--rounds 9] [--calls 1000] [--single 3000] [--out target/idem-bench/redis-compare.json] \
//!     [--server redis-server] [--server /var/cache/idem-ci/valkey-8.1.1/valkey-server]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::{Call, Error};
use idem_stores::RedisStore;
use idempotent::entry::ExistingEntry;
use idempotent::fingerprint::{DefaultFingerprintStrategy, FingerprintStrategy};
use idempotent::store::valkey::ValkeyStore;
use idempotent::store::{IdempotencyStore, InsertResult};
use idempotent::{CachedResponse, IdempotencyEntry, IdempotencyKey, Metadata};
use redis::aio::ConnectionManager;
use serde::Serialize;

const TTL: Duration = Duration::from_secs(300);
const TASKS: u64 = 64;
/// A value the size of idem's record of a `u64`.
const VALUE: &[u8] = b"idem\x01\x0e\x00msgpack;v0;u64\xcf\x00\x00\x00\x00\x00\x00\x00\x54";

static NEXT: AtomicU64 = AtomicU64::new(1);

fn next() -> u64 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

use idem_bench::{arg, PrivateServer as Server};

fn self_cpu() -> Duration {
    idem_bench::proc_cpu("/proc/self/stat")
}

/// `INFO commandstats`: command → (calls, µs).
async fn commandstats(conn: &mut ConnectionManager) -> BTreeMap<String, (u64, u64)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    idem_bench::parse_commandstats(&info)
}

/// Totals of one workload over all rounds.
#[derive(Default, Serialize, Clone)]
struct Totals {
    calls: u64,
    wall_s: f64,
    /// Calls/s of each round.
    rounds: Vec<f64>,
    server_cpu_s: f64,
    client_cpu_s: f64,
    /// Command → (calls, µs) over all rounds.
    commands: BTreeMap<String, (u64, u64)>,
}

#[derive(Serialize)]
struct Figures {
    calls: u64,
    /// Median over rounds.
    calls_per_s: f64,
    calls_per_s_min: f64,
    calls_per_s_max: f64,
    /// Calls/s of each round, in round order: the report pairs workloads round by round
    /// (idem's round r over raw's round r), which cancels the machine's drift between rounds.
    calls_per_s_rounds: Vec<f64>,
    /// Mean latency per call (single-task workloads), µs.
    latency_us: f64,
    server_process_us_per_call: f64,
    client_process_us_per_call: f64,
    /// µs per call of the commands a client sends (`set`, `get`, `evalsha`, `eval`; a
    /// script's time includes what it runs; the `set` and `get` that idem's completion script
    /// runs inside are counted again on their own, which only overstates idem).
    commandstats_us_per_call: f64,
    /// Command → (calls per call, µs per call), every command (inside scripts too).
    by_command: BTreeMap<String, (f64, f64)>,
}

fn figures(t: &Totals) -> Figures {
    let n = t.calls.max(1) as f64;
    let mut r = t.rounds.clone();
    r.sort_by(f64::total_cmp);
    let median = r.get(r.len() / 2).copied().unwrap_or(0.0);
    let top = ["set", "get", "evalsha", "eval"];
    let cs: u64 = t
        .commands
        .iter()
        .filter(|(k, _)| top.contains(&k.as_str()))
        .map(|(_, (_, us))| us)
        .sum();
    Figures {
        calls: t.calls,
        calls_per_s: median,
        calls_per_s_min: r.first().copied().unwrap_or(0.0),
        calls_per_s_max: r.last().copied().unwrap_or(0.0),
        calls_per_s_rounds: t.rounds.clone(),
        latency_us: t.wall_s * 1e6 / n,
        server_process_us_per_call: t.server_cpu_s * 1e6 / n,
        client_process_us_per_call: t.client_cpu_s * 1e6 / n,
        commandstats_us_per_call: cs as f64 / n,
        by_command: t
            .commands
            .iter()
            .map(|(k, (c, us))| (k.clone(), (*c as f64 / n, *us as f64 / n)))
            .collect(),
    }
}

/// Everything a workload needs.
#[derive(Clone)]
struct Env {
    conn: ConnectionManager,
    idem: RedisStore,
    peer: Arc<ValkeyStore>,
    prefix: Arc<str>,
}

async fn set_nx(conn: &mut ConnectionManager, key: String) {
    let _: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(VALUE)
        .arg("NX")
        .arg("PX")
        .arg(TTL.as_millis() as u64)
        .query_async(conn)
        .await
        .unwrap();
}

async fn work(n: u64) -> Result<u64, Error> {
    Ok(n.wrapping_mul(2))
}

async fn idem_call(store: &RedisStore, n: u64) -> u64 {
    Call::new("idem_bench::redis_compare")
        .key(n)
        .fingerprint((&n,))
        .ttl(TTL)
        .run(store, work(n))
        .await
        .unwrap()
}

/// Calls that failed (a timeout on a loaded machine) and were sent again.
static RETRIED: AtomicU64 = AtomicU64::new(0);

/// The peer's documented cycle, sent again if it fails (the peer's connection keeps the
/// redis crate's default response timeout, which a loaded machine can exceed).
/// A failed fresh call is sent again on a new key (its claim may have been applied).
async fn peer_call(store: &ValkeyStore, prefix: &str, mut n: u64, fresh: bool) -> u64 {
    loop {
        match peer_once(store, prefix, n).await {
            Ok(v) => return v,
            Err(e) => {
                RETRIED.fetch_add(1, Ordering::Relaxed);
                eprintln!("peer call failed, sent again: {e}");
                if fresh {
                    n = next();
                }
            }
        }
    }
}

/// The peer's documented cycle: try_insert → (run, complete) or the stored response.
async fn peer_once(
    store: &ValkeyStore,
    prefix: &str,
    n: u64,
) -> Result<u64, Box<dyn std::error::Error>> {
    let key = IdempotencyKey::new(format!("{prefix}:{n}")).unwrap();
    let fp = DefaultFingerprintStrategy.compute("idem_bench::redis_compare", &n.to_le_bytes());
    let entry = IdempotencyEntry::new(fp, TTL);
    Ok(match store.try_insert(&key, entry.clone()).await? {
        InsertResult::Claimed { fencing_token } => {
            let v = work(n).await?;
            let response = CachedResponse {
                status_code: 200,
                metadata: Metadata::default(),
                body: v.to_le_bytes().to_vec().into(),
            };
            store
                .complete(&key, entry.complete(response), fencing_token)
                .await?;
            v
        }
        InsertResult::Exists(ExistingEntry::Completed(done)) => {
            assert!(done.fingerprint_matches(fp));
            let body = &done.response().body;
            u64::from_le_bytes(body[..8].try_into()?)
        }
        InsertResult::Exists(ExistingEntry::Processing(_)) => return Err("in progress".into()),
    })
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Op {
    RawSetNx,
    RawTwoSetNx,
    RawGet,
    IdemFresh,
    IdemReplay,
    PeerFresh,
    PeerReplay,
}

impl Op {
    const ALL: [Op; 7] = [
        Op::RawSetNx,
        Op::RawTwoSetNx,
        Op::RawGet,
        Op::IdemFresh,
        Op::IdemReplay,
        Op::PeerFresh,
        Op::PeerReplay,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::RawSetNx => "raw_set_nx_px",
            Op::RawTwoSetNx => "raw_two_set_nx_px",
            Op::RawGet => "raw_get",
            Op::IdemFresh => "idem_fresh",
            Op::IdemReplay => "idem_replay",
            Op::PeerFresh => "peer_fresh",
            Op::PeerReplay => "peer_replay",
        }
    }

    /// One call. `task` picks the task's own replay key.
    async fn call(self, env: &mut Env, task: u64) {
        let p = &env.prefix;
        match self {
            Op::RawSetNx => set_nx(&mut env.conn, format!("{p}:raw:{}", next())).await,
            Op::RawTwoSetNx => {
                set_nx(&mut env.conn, format!("{p}:raw:{}", next())).await;
                set_nx(&mut env.conn, format!("{p}:raw:{}", next())).await;
            }
            Op::RawGet => {
                let _: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(format!("{p}:hit:{task}"))
                    .query_async(&mut env.conn)
                    .await
                    .unwrap();
            }
            Op::IdemFresh => {
                idem_call(&env.idem, next()).await;
            }
            Op::IdemReplay => {
                idem_call(&env.idem, task).await;
            }
            Op::PeerFresh => {
                peer_call(&env.peer, &format!("{p}:peer"), next(), true).await;
            }
            Op::PeerReplay => {
                peer_call(&env.peer, &format!("{p}:peer"), task, false).await;
            }
        }
    }
}

/// Runs `calls` calls on each of `tasks` tasks and returns the wall time.
async fn run(env: &Env, op: Op, tasks: u64, calls: u64) -> Duration {
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for task in 0..tasks {
        let mut env = env.clone();
        set.spawn(async move {
            for _ in 0..calls {
                op.call(&mut env, task).await;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    start.elapsed()
}

/// Connections and stores on the current runtime (each runtime gets its own).
async fn connect(server: &Server) -> Env {
    let client = redis::Client::open(server.url()).unwrap();
    // Generous timeouts: on a loaded machine a reply can take longer than the default.
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(Duration::from_secs(10)));
    let conn = ConnectionManager::new_with_config(client, config)
        .await
        .unwrap();
    let idem = RedisStore::builder(server.url())
        .prefix("bench:idem:")
        .build()
        .await
        .unwrap();
    let peer = ValkeyStore::with_prefix(redis::Client::open(server.url()).unwrap(), None)
        .await
        .unwrap();
    Env {
        conn,
        idem,
        peer: Arc::new(peer),
        prefix: "bench".into(),
    }
}

/// `IDEM_REDIS_PROFILE=<workload>:<calls>`: runs one workload (`raw_get`, `idem_replay`, ...)
/// that many times on one task and exits, for counting this process's instructions per call
/// under callgrind (run it at two counts and take the difference; the server is another
/// process and is not counted).
fn profile(spec: &str, binary: &str) {
    let (name, calls) = spec
        .split_once(':')
        .expect("IDEM_REDIS_PROFILE=<workload>:<calls>");
    let calls: u64 = calls.parse().expect("a number of calls");
    let op = Op::ALL
        .into_iter()
        .find(|o| o.name() == name)
        .expect("a workload name");
    let server = Server::start(binary, "idem-bench-redis");
    let rt = idem_bench::current_thread();
    rt.block_on(async {
        let env = connect(&server).await;
        let mut e = env.clone();
        idem_call(&e.idem, 0).await;
        peer_call(&e.peer, "bench:peer", 0, false).await;
        set_nx(&mut e.conn, "bench:hit:0".into()).await;
        for op in Op::ALL {
            run(&env, op, 1, 20).await;
        }
        run(&env, op, 1, calls).await;
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: u64 = arg(&args, "--rounds").map_or(9, |s| s.parse().unwrap());
    let calls: u64 = arg(&args, "--calls").map_or(1000, |s| s.parse().unwrap());
    let single: u64 = arg(&args, "--single").map_or(3000, |s| s.parse().unwrap());
    let out = arg(&args, "--out").map_or_else(
        || idem_bench::out_dir().join("redis-compare.json"),
        std::path::PathBuf::from,
    );
    let mut binaries: Vec<String> = args
        .windows(2)
        .filter(|w| w[0] == "--server")
        .map(|w| w[1].clone())
        .collect();
    if binaries.is_empty() {
        binaries.push("redis-server".into());
    }
    for bin in &binaries {
        if Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            println!("skipped: {bin} is not installed");
            return;
        }
    }
    if let Ok(spec) = std::env::var("IDEM_REDIS_PROFILE") {
        profile(&spec, &binaries[0]);
        return;
    }
    // 64 tasks on the multi-thread runtime, as a server would run them; one task on a
    // current-thread runtime with its own connections (see the module's documentation).
    let rt = idem_bench::multi_thread();
    let rt1 = idem_bench::current_thread();
    struct Bench {
        server: Server,
        env: Env,
        env1: Env,
        native: bool,
        many: BTreeMap<Op, Totals>,
        one: BTreeMap<Op, Totals>,
    }
    let mut benches: Vec<Bench> = binaries
        .iter()
        .map(|bin| {
            let server = Server::start(bin, "idem-bench-redis");
            let env = rt.block_on(connect(&server));
            let env1 = rt1.block_on(connect(&server));
            let native = env.idem.native_cas_active();
            Bench {
                server,
                env,
                env1,
                native,
                many: BTreeMap::new(),
                one: BTreeMap::new(),
            }
        })
        .collect();
    for b in &benches {
        let (env, env1) = (&b.env, &b.env1);
        // Replay keys: one per task, completed before the first round; raw GET hits.
        rt.block_on(async {
            let mut env = env.clone();
            for task in 0..TASKS {
                idem_call(&env.idem, task).await;
                peer_call(&env.peer, "bench:peer", task, false).await;
                set_nx(&mut env.conn, format!("bench:hit:{task}")).await;
            }
            // Warm-up: every path once at full concurrency (scripts loaded, connections up).
            for op in Op::ALL {
                run(&env, op, TASKS, 20).await;
            }
        });
        rt1.block_on(async {
            for op in Op::ALL {
                run(env1, op, 1, 100).await;
            }
        });
    }

    for round in 0..rounds {
        // Rotate the order each round, so that drift of the machine is spread evenly.
        let mut order = Op::ALL.to_vec();
        let len = order.len();
        order.rotate_left((round as usize) % len);
        let servers = benches.len();
        for i in 0..servers {
            let b = &mut benches[(i + round as usize) % servers];
            for (tasks, per_task, single) in [(TASKS, calls, false), (1, single, true)] {
                let (rt, env) = if single {
                    (&rt1, &b.env1)
                } else {
                    (&rt, &b.env)
                };
                let totals = if single { &mut b.one } else { &mut b.many };
                for &op in &order {
                    let mut conn = env.conn.clone();
                    let before = rt.block_on(commandstats(&mut conn));
                    let (s0, c0) = (b.server.cpu(), self_cpu());
                    let wall = rt.block_on(run(env, op, tasks, per_task));
                    let (s1, c1) = (b.server.cpu(), self_cpu());
                    let after = rt.block_on(commandstats(&mut conn));
                    let t = totals.entry(op).or_default();
                    let n = tasks * per_task;
                    t.calls += n;
                    t.wall_s += wall.as_secs_f64();
                    t.rounds.push(n as f64 / wall.as_secs_f64());
                    t.server_cpu_s += (s1.saturating_sub(s0)).as_secs_f64();
                    t.client_cpu_s += (c1.saturating_sub(c0)).as_secs_f64();
                    for (cmd, (c, us)) in after {
                        if cmd == "info" {
                            continue;
                        }
                        let (c_0, us_0) = before.get(&cmd).copied().unwrap_or((0, 0));
                        if c > c_0 {
                            let e = t.commands.entry(cmd).or_default();
                            e.0 += c - c_0;
                            e.1 += us.saturating_sub(us_0);
                        }
                    }
                }
            }
        }
        println!("round {} of {rounds} done", round + 1);
    }

    let fig = |m: &BTreeMap<Op, Totals>| -> BTreeMap<&'static str, Figures> {
        m.iter().map(|(op, t)| (op.name(), figures(t))).collect()
    };
    #[derive(Serialize)]
    struct ServerReport {
        /// The server binary's `--version` line.
        version: String,
        /// Whether idem used native `SET … IFEQ` on it (else the scripts).
        idem_native_cas: bool,
        concurrent: BTreeMap<&'static str, Figures>,
        single_task: BTreeMap<&'static str, Figures>,
        /// Single-task latency per call divided by one raw `GET`'s.
        round_trips: BTreeMap<&'static str, f64>,
    }
    let reports: Vec<ServerReport> = benches
        .iter()
        .map(|b| {
            let (many, one) = (fig(&b.many), fig(&b.one));
            let get_latency = one.get("raw_get").map_or(f64::NAN, |f| f.latency_us);
            let round_trips: BTreeMap<&str, f64> = one
                .iter()
                .map(|(k, f)| (*k, f.latency_us / get_latency))
                .collect();
            ServerReport {
                version: b.server.version.clone(),
                idem_native_cas: b.native,
                concurrent: many,
                single_task: one,
                round_trips,
            }
        })
        .collect();
    for r in &reports {
        println!("{} (idem native CAS: {})", r.version, r.idem_native_cas);
        println!(
            "{:<20} {:>12} {:>12} {:>12} {:>12} {:>10}",
            "64 tasks", "calls/s", "server µs", "cmdstat µs", "client µs", "1-task RT"
        );
        for (k, f) in &r.concurrent {
            println!(
                "{k:<20} {:>12.0} {:>12.2} {:>12.2} {:>12.2} {:>10.2}",
                f.calls_per_s,
                f.server_process_us_per_call,
                f.commandstats_us_per_call,
                f.client_process_us_per_call,
                r.round_trips.get(k).copied().unwrap_or(f64::NAN)
            );
        }
    }
    #[derive(Serialize)]
    struct Report<'a> {
        rounds: u64,
        tasks: u64,
        calls_per_task: u64,
        single_task_calls: u64,
        /// Peer calls that failed (timeouts) and were sent again.
        peer_calls_retried: u64,
        /// The first server's figures (`redis_version`, `concurrent`, `single_task`,
        /// `round_trips`), as before several servers were measured.
        redis_version: String,
        concurrent: &'a BTreeMap<&'static str, Figures>,
        single_task: &'a BTreeMap<&'static str, Figures>,
        round_trips: &'a BTreeMap<&'static str, f64>,
        /// Every server's figures, in `--server` order.
        servers: &'a [ServerReport],
        /// The runtime the single-task workloads ran on.
        single_task_runtime: &'static str,
    }
    let first = &reports[0];
    let report = Report {
        rounds,
        tasks: TASKS,
        calls_per_task: calls,
        single_task_calls: single,
        peer_calls_retried: RETRIED.load(Ordering::Relaxed),
        redis_version: first.version.clone(),
        concurrent: &first.concurrent,
        single_task: &first.single_task,
        round_trips: &first.round_trips,
        servers: &reports,
        single_task_runtime: "tokio current-thread, own connections",
    };
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("wrote {}", out.display());
    drop(benches);
    drop(rt1);
    drop(rt);
}
