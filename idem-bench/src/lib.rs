//! Shared pieces of the idem benchmarks: runtimes, server addresses, unique key prefixes,
//! percentiles and the JSON files the report script reads.
//!
//! The suite itself is in `benches/` (criterion: in-process, Redis, SQL) and `src/bin/`
//! (`idem-bench-wait`: waiter wake-up delay; `idem-bench-memory`: bytes per record). Run it
//! all through `bench/report`, which writes `BENCHMARKS.md`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The Redis server the benches use: `IDEM_TEST_REDIS_URL`, else the local default.
pub fn redis_url() -> String {
    std::env::var("IDEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The PostgreSQL server: `IDEM_TEST_POSTGRES_URL`, else the local default.
pub fn postgres_url() -> String {
    std::env::var("IDEM_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The MySQL/MariaDB server: `IDEM_TEST_MYSQL_URL`, else the local default.
pub fn mysql_url() -> String {
    std::env::var("IDEM_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

/// A prefix unique to this process, so that keys of two runs (or of the tests running on the
/// same server) never meet.
pub fn run_prefix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("idem-bench:{}:{:x}", std::process::id(), nanos)
}

/// A current-thread runtime with all drivers: the least noisy place for latency benches of
/// in-process work.
pub fn current_thread() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("cannot build a tokio runtime: {e}"),
    }
}

/// A multi-thread runtime (one worker per core), as a server would run.
pub fn multi_thread() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("cannot build a tokio runtime: {e}"),
    }
}

/// Where the non-criterion results go: `$IDEM_BENCH_OUT`, else
/// `$CARGO_TARGET_DIR/idem-bench`, else `target/idem-bench`.
pub fn out_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IDEM_BENCH_OUT") {
        return PathBuf::from(dir);
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| "target".into(), PathBuf::from);
    target.join("idem-bench")
}

/// Latency percentiles of a set of samples.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Percentiles {
    /// How many samples.
    pub samples: usize,
    /// Median, in microseconds.
    pub p50_us: f64,
    /// 90th percentile, in microseconds.
    pub p90_us: f64,
    /// 99th percentile, in microseconds.
    pub p99_us: f64,
    /// Largest sample, in microseconds.
    pub max_us: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples` (unsorted).
    ///
    /// ```
    /// use std::time::Duration;
    /// let p = idem_bench::Percentiles::of((1..=100).map(Duration::from_micros).collect());
    /// assert_eq!((p.p50_us, p.p99_us, p.max_us), (50.0, 99.0, 100.0));
    /// ```
    pub fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let rank = |q: f64| -> f64 {
            if samples.is_empty() {
                return f64::NAN;
            }
            // Nearest rank: the smallest sample with at least q of all samples at or below it.
            let n = samples.len() as f64;
            let i = ((q * n).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i].as_secs_f64() * 1e6
        };
        Percentiles {
            samples: samples.len(),
            p50_us: rank(0.50),
            p90_us: rank(0.90),
            p99_us: rank(0.99),
            max_us: rank(1.0),
        }
    }
}

/// Microseconds since the Unix epoch on the system clock: comparable between two processes on
/// one machine (the waiting bench's cross-process timestamps).
pub fn wall_us() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

/// A global allocator that forwards to `System` and counts live heap bytes (requested
/// sizes), for the memory bench and `tests/memory_bound.rs`: install it with
/// `#[global_allocator] static A: idem_bench::CountingAlloc = idem_bench::CountingAlloc;`
/// and read [`live_heap_bytes`].
pub struct CountingAlloc;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// The one unsafe block of the workspace: a global allocator that forwards to `System` and
// counts. It adds nothing to the contracts of `GlobalAlloc` beyond those of `System`.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (hence from `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; the caller upholds `realloc`'s contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

/// Live heap bytes counted by [`CountingAlloc`] (0 unless it is the global allocator).
pub fn live_heap_bytes() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Parses Redis's `INFO commandstats` into command → (calls, µs of server CPU).
///
/// ```
/// let info = "# Commandstats\r\ncmdstat_get:calls=3,usec=12,usec_per_call=4.00\r\n";
/// let stats = idem_bench::parse_commandstats(info);
/// assert_eq!(stats["get"], (3, 12));
/// ```
pub fn parse_commandstats(info: &str) -> std::collections::BTreeMap<String, (u64, u64)> {
    let mut out = std::collections::BTreeMap::new();
    for line in info.lines() {
        let Some((name, fields)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let field = |f: &str| -> u64 {
            fields
                .split(',')
                .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        out.insert(name.to_owned(), (field("calls"), field("usec")));
    }
    out
}

/// A private `redis-server` (or `valkey-server`) on a spare loopback port, for the benches
/// that measure one server's CPU (`idem-bench-redis`, `idem-bench-steps-redis`): started with
/// no persistence, killed and its directory removed on drop.
pub struct PrivateServer {
    child: std::process::Child,
    port: u16,
    dir: PathBuf,
    /// The binary's `--version` line.
    pub version: String,
}

impl PrivateServer {
    /// Starts `binary`; `tag` names its temporary directory. Panics if it does not answer
    /// within 10 s (a bench has nothing to measure then).
    #[allow(clippy::expect_used)]
    pub fn start(binary: &str, tag: &str) -> PrivateServer {
        use std::process::{Command, Stdio};
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a spare port");
        let dir = std::env::temp_dir().join(format!("{tag}-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("server dir");
        let version = Command::new(binary)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let child = Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the server binary runs");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the server did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        PrivateServer {
            child,
            port,
            dir,
            version,
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server process's CPU time (user + system), from `/proc`.
    pub fn cpu(&self) -> Duration {
        proc_cpu(&format!("/proc/{}/stat", self.child.id()))
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// utime + stime of a `/proc/<pid>/stat` file (`/proc/self/stat`: this process).
pub fn proc_cpu(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // CLK_TCK is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// The value after `name` on a command line.
pub fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}
