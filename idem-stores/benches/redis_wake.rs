//! How soon a waiter in another process is woken after a completion (`IDEM_TEST_REDIS_URL`).
//!
//! The bench re-executes itself as a child process (`IDEM_WAKE_CHILD` set) that waits on the
//! keys the parent sends it over stdin. Per iteration the parent claims a fresh key, hands it
//! to the child, gives the child 5 ms to be inside `wait`, then takes a wall-clock timestamp
//! and completes the key; the child stamps the moment its `wait` returns. Both stamps come
//! from the same host clock. The latency covers the complete script, the PUBLISH, delivery to
//! the child's subscriber connection and the local wake-up of its `wait`.
//!
//! ```text
//! IDEM_TEST_REDIS_URL=redis://127.0.0.1:6379/ cargo bench -p idem-stores --features redis --bench redis_wake
//! ```
//!
//! Besides criterion's estimate it prints p50 / p90 / p99 / max over every iteration run.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::Criterion;
use idem_core::testkit::fresh_key;
use idem_core::{Claim, ClaimRequest, FencingToken, Key, Store};
use idem_stores::RedisStore;

const PREFIX: &str = "idem-bench:";

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn parse_key(hex: &str) -> Key {
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    Key(k)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The waiting process: one `wait` per key read from stdin.
fn child(url: &str) {
    let rt = runtime();
    let store = rt
        .block_on(RedisStore::builder(url).prefix(PREFIX).build())
        .unwrap();
    assert!(store.notifications_live());
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let key = parse_key(line.unwrap().trim());
        writeln!(out, "W").unwrap();
        out.flush().unwrap();
        rt.block_on(store.wait(&key, Duration::from_secs(10)))
            .unwrap();
        let woke = now_ns();
        writeln!(out, "{woke}").unwrap();
        out.flush().unwrap();
    }
}

struct Waiter {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Waiter {
    fn spawn(url: &str) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("IDEM_WAKE_CHILD", "1")
            .env("IDEM_TEST_REDIS_URL", url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Waiter {
            child,
            stdin,
            stdout,
        }
    }

    fn line(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_line(&mut s).unwrap();
        s.trim().to_string()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One wake-up: claim, hand the key to the child, complete, read the child's stamp.
fn one(rt: &tokio::runtime::Runtime, store: &RedisStore, waiter: &mut Waiter) -> Duration {
    let key = fresh_key();
    let token = FencingToken::random();
    let req = ClaimRequest {
        key,
        fingerprint: None,
        token,
        lease: Duration::from_secs(30),
    };
    assert_eq!(
        rt.block_on(store.claim(&req)).unwrap(),
        Claim::Acquired { taken_over: false }
    );
    writeln!(waiter.stdin, "{}", key.to_hex()).unwrap();
    waiter.stdin.flush().unwrap();
    assert_eq!(waiter.line(), "W");
    std::thread::sleep(Duration::from_millis(5));
    let completed = now_ns();
    rt.block_on(store.complete(&key, token, b"v", Duration::from_secs(60)))
        .unwrap();
    let woke: u128 = waiter.line().parse().unwrap();
    Duration::from_nanos(u64::try_from(woke.saturating_sub(completed)).unwrap_or(u64::MAX))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let Ok(url) = std::env::var("IDEM_TEST_REDIS_URL") else {
        println!("skipped: IDEM_TEST_REDIS_URL is not set");
        return;
    };
    if std::env::var_os("IDEM_WAKE_CHILD").is_some() {
        return child(&url);
    }
    let rt = runtime();
    let store = rt
        .block_on(RedisStore::builder(url.as_str()).prefix(PREFIX).build())
        .unwrap();
    let mut waiter = Waiter::spawn(&url);
    let all = Arc::new(Mutex::new(Vec::new()));

    let mut c = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6))
        .configure_from_args();
    c.bench_function("redis_wake/waiter_in_other_process", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let d = one(&rt, &store, &mut waiter);
                all.lock().unwrap().push(d);
                total += d;
            }
            total
        })
    });
    c.final_summary();

    let mut all = all.lock().unwrap().clone();
    all.sort();
    if !all.is_empty() {
        println!(
            "wake-up latency of a waiter in another process over {} wake-ups: \
             p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
            all.len(),
            percentile(&all, 0.50),
            percentile(&all, 0.90),
            percentile(&all, 0.99),
            all[all.len() - 1],
        );
    }
}
