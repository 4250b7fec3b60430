//! `idem-bench-http`: what the `Idempotency-Key` layer costs, as throughput of one route with
//! the layer over the same route without it, in one run.
//!
//! ```text
//! idem-bench-http [--rounds N] [--secs S] [--conns C] [--only CASE] [--out FILE]
//! ```
//!
//! Two axum servers on 127.0.0.1 share one process and runtime: `bare` serves `POST /orders`
//! (a `Json` extractor and a ~120-byte JSON answer), `idem` serves the same handler behind
//! `IdempotencyLayer` on a `MemoryStore`, a fresh one each round (scoped by a tenant header,
//! `content-type` fingerprinted, `required(false)`). A client of our own — raw HTTP/1.1 over keep-alive
//! connections, so that the client costs little next to the server — sends as many requests
//! as it can for `S` seconds over `C` connections, alternating `bare` and `idem` rounds (`N`
//! of each per case), so that both see the same machine state. Cases:
//!
//! - `no_key`: no `Idempotency-Key` (passed through unprotected);
//! - `replay`: one key per connection, stored in a warm-up request, so every request replays;
//! - `unique`: a new key per request, so every request claims, runs and stores.
//!
//! The ratio of a case is the median over rounds of `idem / bare` throughput of neighbouring
//! rounds. Beside it, without sockets: the same requests sent in process to each router
//! (`tower::ServiceExt::oneshot`, one thread), as nanoseconds per request — the layer's own
//! CPU cost is the difference. Results go to `FILE` (default
//! `$CARGO_TARGET_DIR/idem-bench/http.json`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use idem_core::Store;
use idem_http::IdempotencyLayer;
use idem_stores::MemoryStore;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::ServiceExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Deserialize)]
struct Order {
    amount: u64,
    currency: String,
}

async fn create_order(Json(order): Json<Order>) -> impl IntoResponse {
    (
        StatusCode::CREATED,
        Json(serde_json::json!({
            "id": "ord_1234567890",
            "amount": order.amount,
            "currency": order.currency,
            "status": "captured",
            "reference": "cap_0000000000000000",
        })),
    )
}

fn bare() -> Router {
    Router::new().route("/orders", post(create_order))
}

fn with_layer(store: Arc<dyn Store>) -> Router {
    let layer = IdempotencyLayer::new(store)
        .scope(|parts| {
            parts
                .headers
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .fingerprint_header(header::CONTENT_TYPE)
        .required(false);
    Router::new().route("/orders", post(create_order).route_layer(layer))
}

async fn serve(router: Router) -> Result<SocketAddr, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok(addr)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Case {
    NoKey,
    Replay,
    Unique,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::NoKey => "no_key",
            Case::Replay => "replay",
            Case::Unique => "unique",
        }
    }
}

const BODY: &str = r#"{"amount":1999,"currency":"EUR"}"#;

fn request(key: Option<&str>) -> Vec<u8> {
    let mut r = format!(
        "POST /orders HTTP/1.1\r\nhost: bench\r\nx-tenant: acme\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        BODY.len()
    );
    if let Some(key) = key {
        r.push_str(&format!("idempotency-key: \"{key}\"\r\n"));
    }
    r.push_str("\r\n");
    r.push_str(BODY);
    r.into_bytes()
}

/// One keep-alive connection: sends requests until `stop`, counts 201 answers.
async fn connection(
    addr: SocketAddr,
    case: Case,
    conn_id: usize,
    round: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Result<(), BoxError> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let replay_key = format!("replay-{round}-{conn_id}");
    let fixed = request(Some(&replay_key));
    let plain = request(None);
    let mut n = 0u64;
    if case == Case::Replay {
        exchange(&mut s, &fixed, &mut buf).await?;
    }
    while !stop.load(Ordering::Relaxed) {
        let status = match case {
            Case::NoKey => exchange(&mut s, &plain, &mut buf).await?,
            Case::Replay => exchange(&mut s, &fixed, &mut buf).await?,
            Case::Unique => {
                n += 1;
                let req = request(Some(&format!("u-{round}-{conn_id}-{n}")));
                exchange(&mut s, &req, &mut buf).await?
            }
        };
        if status != 201 {
            return Err(format!("status {status} in {case:?}").into());
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Writes one request and reads one response (by `content-length`); returns its status.
async fn exchange(s: &mut TcpStream, req: &[u8], buf: &mut Vec<u8>) -> Result<u16, BoxError> {
    s.write_all(req).await?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err("connection closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end])?;
    let status: u16 = head.get(9..12).ok_or("short status line")?.parse()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .ok_or("no content-length")?;
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err("connection closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(status)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Requests per second of one round.
async fn round(
    addr: SocketAddr,
    case: Case,
    conns: usize,
    secs: f64,
    round: usize,
) -> Result<f64, BoxError> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..conns)
        .map(|c| tokio::spawn(connection(addr, case, c, round, stop.clone(), done.clone())))
        .collect();
    // Let the connections (and a replay's warm-up request) settle before counting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start_count = done.load(Ordering::Relaxed);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let count = done.load(Ordering::Relaxed) - start_count;
    let elapsed = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    Ok(count as f64 / elapsed)
}

/// Nanoseconds per request, in process: `n` requests of `case` through `router`, one at a
/// time.
async fn inproc(router: Router, case: Case, n: u64, salt: u64) -> Result<f64, BoxError> {
    let build = |i: u64| {
        let mut req = axum::http::Request::post("/orders")
            .header("x-tenant", "acme")
            .header("content-type", "application/json");
        match case {
            Case::NoKey => {}
            Case::Replay => req = req.header("idempotency-key", format!("\"r-{salt}\"")),
            Case::Unique => req = req.header("idempotency-key", format!("\"u-{salt}-{i}\"")),
        }
        req.body(axum::body::Body::from(BODY))
    };
    // Warm-up (and the stored response of `replay`).
    for i in 0..100 {
        let resp = router.clone().oneshot(build(u64::MAX - i)?).await?;
        axum::body::to_bytes(resp.into_body(), usize::MAX).await?;
    }
    let t = Instant::now();
    for i in 0..n {
        let resp = router.clone().oneshot(build(i)?).await?;
        if resp.status() != StatusCode::CREATED {
            return Err(format!("status {} in process, {case:?}", resp.status()).into());
        }
        axum::body::to_bytes(resp.into_body(), usize::MAX).await?;
    }
    Ok(t.elapsed().as_nanos() as f64 / n as f64)
}

#[derive(Serialize)]
struct CaseResult {
    bare_rps: Vec<f64>,
    idem_rps: Vec<f64>,
    ratios: Vec<f64>,
    median_ratio: f64,
    target: f64,
    inproc_bare_ns: f64,
    inproc_idem_ns: f64,
}

#[derive(Serialize)]
struct Output {
    rounds: usize,
    secs: f64,
    conns: usize,
    store: &'static str,
    /// `/proc/loadavg`'s 1-minute figure at the start and the end (other work on the machine
    /// makes the ratios noisy).
    load_before: Option<f64>,
    load_after: Option<f64>,
    cases: BTreeMap<&'static str, CaseResult>,
}

fn load_avg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = arg(&args, "--rounds", 5);
    let secs: f64 = arg(&args, "--secs", 1.0);
    let conns: usize = arg(&args, "--conns", 16);
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".to_string());
    let out: String = arg(&args, "--out", format!("{target}/idem-bench/http.json"));
    let only: String = arg(&args, "--only", String::new());

    if args.iter().any(|a| a == "--probe") {
        // The runtime alone: a fresh `Call` per iteration on a `MemoryStore`.
        let t = tokio::spawn(async {
            let store = MemoryStore::new();
            let n = 20_000u64;
            let t = Instant::now();
            for i in 0..n {
                let r: Result<u64, idem_core::Error> = idem_core::Call::new("probe")
                    .key(i)
                    .run(&store, async move { Ok(i) })
                    .await;
                r?;
            }
            Ok::<_, BoxError>(t.elapsed().as_nanos() as f64 / n as f64)
        })
        .await??;
        println!("fresh Call on MemoryStore: {t:.0} ns");
        let store = MemoryStore::new();
        let f = idem_core::Call::new("probe")
            .key(1)
            .run(&store, async move { Ok::<u64, idem_core::Error>(1) });
        println!("Call::run future: {} bytes", std::mem::size_of_val(&f));
        return Ok(());
    }
    if let Some(n) = args.iter().position(|a| a == "--inproc-only") {
        // For a profiler: only the in-process requests of one case, through the layer.
        let case = match args.get(n + 1).map(String::as_str) {
            Some("no_key") => Case::NoKey,
            Some("replay") => Case::Replay,
            _ => Case::Unique,
        };
        let router = if args.iter().any(|a| a == "--bare") {
            bare().with_state(())
        } else {
            with_layer(Arc::new(MemoryStore::new())).with_state(())
        };
        let ns = tokio::spawn(inproc(router, case, 2_000, 0)).await??;
        println!("{}: {ns:.0} ns per request with the layer", case.name());
        return Ok(());
    }
    let load_before = load_avg();
    let bare_addr = serve(bare()).await?;

    let mut cases = BTreeMap::new();
    for (case, goal) in [
        (Case::NoKey, 0.95),
        (Case::Replay, 0.9),
        (Case::Unique, 0.7),
    ] {
        if !only.is_empty() && only != case.name() {
            continue;
        }
        let (mut b, mut i, mut r) = (Vec::new(), Vec::new(), Vec::new());
        for n in 0..rounds {
            // A fresh store each round: the layer's cost, not that of a store that grows by
            // every unique key of the earlier rounds.
            let idem_addr = serve(with_layer(Arc::new(MemoryStore::new()))).await?;
            // Alternate which goes first, so that drift does not favour one side.
            let (x, y) = if n % 2 == 0 {
                let x = round(bare_addr, case, conns, secs, n).await?;
                let y = round(idem_addr, case, conns, secs, n).await?;
                (x, y)
            } else {
                let y = round(idem_addr, case, conns, secs, n).await?;
                let x = round(bare_addr, case, conns, secs, n).await?;
                (x, y)
            };
            println!(
                "{:>7} round {n}: bare {x:>9.0} req/s  idem {y:>9.0} req/s  ratio {:.3}",
                case.name(),
                y / x
            );
            b.push(x);
            i.push(y);
            r.push(y / x);
        }
        let m = median(&r);
        let (mut nb, mut ni) = (Vec::new(), Vec::new());
        for n in 0..rounds as u64 {
            // On a worker thread, as a connection's requests are.
            // `with_state` turns the handlers into services once, as `axum::serve` does.
            let bare = bare().with_state(());
            nb.push(tokio::spawn(inproc(bare, case, 20_000, n)).await??);
            let idem = with_layer(Arc::new(MemoryStore::new())).with_state(());
            ni.push(tokio::spawn(inproc(idem, case, 20_000, n)).await??);
        }
        let (nb, ni) = (median(&nb), median(&ni));
        println!(
            "{:>7}: median ratio {m:.3} (goal >= {goal}); in process {nb:.0} ns bare, {ni:.0} ns with the layer (+{:.0} ns)",
            case.name(),
            ni - nb
        );
        cases.insert(
            case.name(),
            CaseResult {
                bare_rps: b,
                idem_rps: i,
                ratios: r,
                median_ratio: m,
                target: goal,
                inproc_bare_ns: nb,
                inproc_idem_ns: ni,
            },
        );
    }
    let output = Output {
        rounds,
        secs,
        conns,
        store: "memory",
        load_before,
        load_after: load_avg(),
        cases,
    };
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_vec_pretty(&output)?)?;
    println!("wrote {out}");
    Ok(())
}
