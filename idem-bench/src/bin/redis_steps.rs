//! `idem-bench-steps-redis`: what one durable step write costs on Redis, against a raw write of the
//! same size, **in one run, round by round, alternating**, on private servers this program
//! starts on spare loopback ports (one per `--server BIN`, e.g. `redis-server` and a Valkey
//! 8.1 `valkey-server`; the rounds alternate between servers too).
//!
//! Workloads, each with a value of `--size` bytes (default 100):
//!
//! - `raw_set`: `SET <new key> <value> PX <ttl>`;
//! - `raw_hset`: `HSET <task's hash> <new field> <value>`;
//! - `step_put`: `RedisStore::put_step` of a new step (a new field) of a call the task holds:
//!   the fenced step script (`GET` of the record, `HSET`, `PEXPIRE … GT`);
//! - two floors for a script, with the same keys and arguments as `step_put`, to show what any
//!   script costs: `script_empty` (`EVALSHA` of `return 1`) and `script_fenced_hset` (the
//!   record's `GET` and comparison, then `HSET`: no expiry).
//!
//! Per workload: throughput with 64 tasks (multi-thread runtime) and with one task (a
//! current-thread runtime of its own, so one round trip costs the same for every workload),
//! the server process's CPU per write (`/proc/<pid>/stat`), and `INFO commandstats` µs per
//! write of the command the client sends (`set`, `hset`, `evalsha`: a script's time includes
//! the commands it runs). Ratios are taken round by round (a step round over the raw round
//! next to it), then the median.
//!
//! ```text
//! cargo run --release -p idem-bench --features redis --bin idem-bench-steps-redis -- \
//!     [--rounds 9] [--calls 1000] [--single 3000] [--size 100] \
//!     [--out target/idem-bench/redis-steps.json] \
//!     [--server redis-server] [--server /var/cache/idem-ci/valkey-8.1.1/valkey-server]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::{Claim, ClaimRequest, FencingToken, Key, StepId, StepRecord, StepStatus, Store};
use idem_stores::RedisStore;
use redis::aio::ConnectionManager;
use serde::Serialize;

const TTL: Duration = Duration::from_secs(120);
const TASKS: u64 = 64;

static NEXT: AtomicU64 = AtomicU64::new(1);

fn next() -> u64 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

use idem_bench::{arg, PrivateServer as Server};

async fn commandstats(conn: &mut ConnectionManager) -> BTreeMap<String, (u64, u64)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    idem_bench::parse_commandstats(&info)
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Op {
    RawSet,
    RawHset,
    StepPut,
    ScriptEmpty,
    ScriptFencedHset,
}

impl Op {
    const ALL: [Op; 5] = [
        Op::RawSet,
        Op::RawHset,
        Op::StepPut,
        Op::ScriptEmpty,
        Op::ScriptFencedHset,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::RawSet => "raw_set",
            Op::RawHset => "raw_hset",
            Op::StepPut => "step_put",
            Op::ScriptEmpty => "script_empty",
            Op::ScriptFencedHset => "script_fenced_hset",
        }
    }

    /// The command the client sends, in `INFO commandstats`.
    fn command(self) -> &'static str {
        match self {
            Op::RawSet => "set",
            Op::RawHset => "hset",
            Op::StepPut | Op::ScriptEmpty | Op::ScriptFencedHset => "evalsha",
        }
    }
}

#[derive(Clone)]
struct Env {
    conn: ConnectionManager,
    store: RedisStore,
    value: Arc<[u8]>,
    /// SHA1s of [`EMPTY`] and [`FENCED_HSET`].
    empty: Arc<str>,
    fenced_hset: Arc<str>,
}

/// The cheapest script: what `EVALSHA` itself costs.
const EMPTY: &str = "return 1";
/// The step script without its expiry: the fenced write alone.
const FENCED_HSET: &str = r#"
local v = redis.pcall('GET', KEYS[1])
if type(v) ~= 'string' or #v < 20 then return 0 end
local h = string.sub(v, 1, 11)
if h ~= ARGV[1] and h ~= 'i2w' .. string.sub(ARGV[1], 4) then return 0 end
redis.pcall('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"#;

/// The claim's header as the store's scripts compare it: `i2p` and the token.
fn held(token: FencingToken) -> Vec<u8> {
    let mut h = b"i2p".to_vec();
    h.extend_from_slice(&token.0.to_be_bytes());
    h
}

/// One task's state: the call it holds (a fresh claim per round) and its hash.
struct Task {
    env: Env,
    id: u64,
    key: Key,
    token: FencingToken,
}

impl Task {
    async fn new(env: Env, id: u64) -> Task {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&next().to_le_bytes());
        key[8..16].copy_from_slice(&std::process::id().to_le_bytes().repeat(2));
        let key = Key(key);
        let token = FencingToken::random();
        let claim = env
            .store
            .claim(&ClaimRequest {
                key,
                fingerprint: None,
                token,
                lease: TTL,
            })
            .await
            .unwrap();
        assert_eq!(claim, Claim::Acquired { taken_over: false });
        Task {
            env,
            id,
            key,
            token,
        }
    }

    async fn call(&mut self, op: Op, i: u64) {
        let value = &self.env.value[..];
        match op {
            Op::RawSet => {
                let _: () = redis::cmd("SET")
                    .arg(format!("bench:raw:{}", next()))
                    .arg(value)
                    .arg("PX")
                    .arg(TTL.as_millis() as u64)
                    .query_async(&mut self.env.conn)
                    .await
                    .unwrap();
            }
            Op::RawHset => {
                let _: i64 = redis::cmd("HSET")
                    .arg(format!("bench:hash:{}", self.id))
                    .arg(format!("step#{}", next()))
                    .arg(value)
                    .query_async(&mut self.env.conn)
                    .await
                    .unwrap();
            }
            Op::ScriptEmpty | Op::ScriptFencedHset => {
                let sha = if op == Op::ScriptEmpty {
                    &self.env.empty
                } else {
                    &self.env.fenced_hset
                };
                let record = self.env.store.redis_key(&self.key);
                let r: i64 = redis::cmd("EVALSHA")
                    .arg(&**sha)
                    .arg(2)
                    .arg(&record)
                    .arg(format!("{record}:ref"))
                    .arg(held(self.token))
                    .arg(format!("step#{i}"))
                    .arg(value)
                    .arg(TTL.as_millis() as u64)
                    .query_async(&mut self.env.conn)
                    .await
                    .unwrap();
                assert_eq!(r, 1);
            }
            Op::StepPut => {
                let step = StepRecord::new(
                    StepId::new("step", i as u32),
                    StepStatus::Done,
                    value.to_vec(),
                );
                self.env
                    .store
                    .put_step(&self.key, self.token, &step, TTL)
                    .await
                    .unwrap();
            }
        }
    }
}

/// One claimed call per task (not measured).
async fn prepare(env: &Env, tasks: u64) -> Vec<Task> {
    let mut held = Vec::new();
    for id in 0..tasks {
        held.push(Task::new(env.clone(), id).await);
    }
    held
}

/// `calls` writes on each task; the wall time.
async fn run(held: Vec<Task>, op: Op, calls: u64) -> (Duration, Vec<Task>) {
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for mut task in held {
        set.spawn(async move {
            for i in 0..calls {
                task.call(op, i).await;
            }
            task
        });
    }
    let mut done = Vec::new();
    while let Some(r) = set.join_next().await {
        done.push(r.unwrap());
    }
    (start.elapsed(), done)
}

/// Removes the calls and their steps (not measured).
async fn cleanup(held: Vec<Task>) {
    for mut t in held {
        let record = t.env.store.redis_key(&t.key);
        let _: i64 = redis::cmd("DEL")
            .arg(format!("{record}:ref"))
            .query_async(&mut t.env.conn)
            .await
            .unwrap();
        t.env.store.remove(&t.key).await.unwrap();
    }
}

async fn connect(server: &Server, size: usize) -> Env {
    let client = redis::Client::open(server.url()).unwrap();
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(Duration::from_secs(10)));
    let conn = ConnectionManager::new_with_config(client, config)
        .await
        .unwrap();
    let store = RedisStore::builder(server.url())
        .prefix("bench:idem:")
        .command_timeout(Duration::from_secs(10))
        .build()
        .await
        .unwrap();
    let sha = |src: &'static str| {
        let mut load = conn.clone();
        async move {
            let sha: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(src)
                .query_async(&mut load)
                .await
                .unwrap();
            Arc::<str>::from(sha)
        }
    };
    let empty = sha(EMPTY).await;
    let fenced_hset = sha(FENCED_HSET).await;
    Env {
        conn,
        store,
        value: vec![0x5au8; size].into(),
        empty,
        fenced_hset,
    }
}

#[derive(Default, Serialize, Clone)]
struct Totals {
    calls: u64,
    /// Writes/s of each round, in round order.
    rounds: Vec<f64>,
    server_cpu_s: f64,
    /// (calls, µs) of the command the client sends.
    command: (u64, u64),
    /// Command → (calls, µs), every command (inside scripts too).
    commands: BTreeMap<String, (u64, u64)>,
}

#[derive(Serialize)]
struct Figures {
    writes_per_s_median: f64,
    writes_per_s_rounds: Vec<f64>,
    server_process_us_per_write: f64,
    commandstats_us_per_write: f64,
    /// Command → (calls per write, µs per call).
    by_command: BTreeMap<String, (f64, f64)>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn figures(t: &Totals) -> Figures {
    let n = t.calls.max(1) as f64;
    Figures {
        writes_per_s_median: median(t.rounds.clone()),
        writes_per_s_rounds: t.rounds.clone(),
        server_process_us_per_write: t.server_cpu_s * 1e6 / n,
        commandstats_us_per_write: t.command.1 as f64 / n,
        by_command: t
            .commands
            .iter()
            .map(|(k, (c, us))| (k.clone(), (*c as f64 / n, *us as f64 / (*c).max(1) as f64)))
            .collect(),
    }
}

/// What a step write costs relative to a raw write: the median over rounds of the raw
/// workload's throughput divided by the step workload's in the same round.
fn cost_ratio(step: &Totals, raw: &Totals) -> f64 {
    median(
        step.rounds
            .iter()
            .zip(&raw.rounds)
            .map(|(s, r)| r / s)
            .collect(),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: u64 = arg(&args, "--rounds").map_or(9, |s| s.parse().unwrap());
    let calls: u64 = arg(&args, "--calls").map_or(1000, |s| s.parse().unwrap());
    let single: u64 = arg(&args, "--single").map_or(3000, |s| s.parse().unwrap());
    let size: usize = arg(&args, "--size").map_or(100, |s| s.parse().unwrap());
    let out = arg(&args, "--out").map_or_else(
        || idem_bench::out_dir().join("redis-steps.json"),
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
    let rt = idem_bench::multi_thread();
    let rt1 = idem_bench::current_thread();
    struct Bench {
        server: Server,
        env: Env,
        env1: Env,
        many: BTreeMap<Op, Totals>,
        one: BTreeMap<Op, Totals>,
    }
    let mut benches: Vec<Bench> = binaries
        .iter()
        .map(|bin| {
            let server = Server::start(bin, "idem-bench-steps");
            let env = rt.block_on(connect(&server, size));
            let env1 = rt1.block_on(connect(&server, size));
            Bench {
                server,
                env,
                env1,
                many: BTreeMap::new(),
                one: BTreeMap::new(),
            }
        })
        .collect();
    for b in &benches {
        // Warm-up: every path once (scripts loaded, connections up).
        for (rt, env, tasks, calls) in [(&rt, &b.env, TASKS, 20), (&rt1, &b.env1, 1, 100)] {
            rt.block_on(async {
                for op in Op::ALL {
                    let held = prepare(env, tasks).await;
                    cleanup(run(held, op, calls).await.1).await;
                }
            });
        }
    }
    for round in 0..rounds {
        let mut order = Op::ALL.to_vec();
        order.rotate_left((round as usize) % Op::ALL.len());
        let servers = benches.len();
        for i in 0..servers {
            let b = &mut benches[(i + round as usize) % servers];
            for (tasks, per_task, one) in [(TASKS, calls, false), (1, single, true)] {
                let (rt, env) = if one { (&rt1, &b.env1) } else { (&rt, &b.env) };
                let totals = if one { &mut b.one } else { &mut b.many };
                for &op in &order {
                    let mut conn = env.conn.clone();
                    let held = rt.block_on(prepare(env, tasks));
                    let before = rt.block_on(commandstats(&mut conn));
                    let s0 = b.server.cpu();
                    let (wall, held) = rt.block_on(run(held, op, per_task));
                    let s1 = b.server.cpu();
                    let after = rt.block_on(commandstats(&mut conn));
                    rt.block_on(cleanup(held));
                    let t = totals.entry(op).or_default();
                    let n = tasks * per_task;
                    t.calls += n;
                    t.rounds.push(n as f64 / wall.as_secs_f64());
                    t.server_cpu_s += s1.saturating_sub(s0).as_secs_f64();
                    for (cmd, (c, us)) in after {
                        let (c_0, us_0) = before.get(&cmd).copied().unwrap_or((0, 0));
                        if c <= c_0 || cmd == "info" {
                            continue;
                        }
                        let (dc, dus) = (c - c_0, us.saturating_sub(us_0));
                        if cmd == op.command() {
                            t.command.0 += dc;
                            t.command.1 += dus;
                        }
                        let e = t.commands.entry(cmd).or_default();
                        e.0 += dc;
                        e.1 += dus;
                    }
                }
            }
        }
        println!("round {} of {rounds} done", round + 1);
    }

    #[derive(Serialize)]
    struct ServerReport {
        version: String,
        concurrent: BTreeMap<&'static str, Figures>,
        single_task: BTreeMap<&'static str, Figures>,
        /// Median over rounds of raw throughput / step throughput (1.0 = as cheap).
        step_cost_vs_raw_set: (f64, f64),
        step_cost_vs_raw_hset: (f64, f64),
    }
    let reports: Vec<ServerReport> = benches
        .iter()
        .map(|b| {
            let fig = |m: &BTreeMap<Op, Totals>| -> BTreeMap<&'static str, Figures> {
                m.iter().map(|(op, t)| (op.name(), figures(t))).collect()
            };
            let ratio = |raw: Op| {
                (
                    cost_ratio(&b.many[&Op::StepPut], &b.many[&raw]),
                    cost_ratio(&b.one[&Op::StepPut], &b.one[&raw]),
                )
            };
            ServerReport {
                version: b.server.version.clone(),
                concurrent: fig(&b.many),
                single_task: fig(&b.one),
                step_cost_vs_raw_set: ratio(Op::RawSet),
                step_cost_vs_raw_hset: ratio(Op::RawHset),
            }
        })
        .collect();
    for r in &reports {
        println!("{}", r.version);
        println!(
            "{:<10} {:>12} {:>12} {:>12} {:>12} {:>12}",
            "", "64t w/s", "1t w/s", "server µs", "cmdstat µs", "1t cmdstat"
        );
        for op in Op::ALL {
            let (m, o) = (&r.concurrent[op.name()], &r.single_task[op.name()]);
            println!(
                "{:<10} {:>12.0} {:>12.0} {:>12.2} {:>12.2} {:>12.2}",
                op.name(),
                m.writes_per_s_median,
                o.writes_per_s_median,
                m.server_process_us_per_write,
                m.commandstats_us_per_write,
                o.commandstats_us_per_write
            );
        }
        println!(
            "step cost (raw/step throughput, median of rounds): vs SET {:.2}x (64 tasks), {:.2}x (1 task); vs HSET {:.2}x, {:.2}x",
            r.step_cost_vs_raw_set.0,
            r.step_cost_vs_raw_set.1,
            r.step_cost_vs_raw_hset.0,
            r.step_cost_vs_raw_hset.1
        );
    }
    #[derive(Serialize)]
    struct Report<'a> {
        rounds: u64,
        tasks: u64,
        calls_per_task: u64,
        single_task_calls: u64,
        value_bytes: usize,
        servers: &'a [ServerReport],
    }
    let report = Report {
        rounds,
        tasks: TASKS,
        calls_per_task: calls,
        single_task_calls: single,
        value_bytes: size,
        servers: &reports,
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
