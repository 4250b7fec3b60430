//! A loopback TCP proxy for fault injection: it listens on `127.0.0.1:0`, forwards every
//! connection to one upstream server, and lets the test break the wire while calls run.
//!
//! Faults, all switchable at run time:
//!
//! - [`Proxy::set_latency`]: every chunk is delivered `latency` after it was read, each way
//!   (pipelined traffic keeps flowing; it is delayed, not serialised).
//! - [`Proxy::lose_reply_to`]: the next client request that contains one of the given byte
//!   strings is delivered to the server; the server's answer to it (and anything else that
//!   connection would have carried) is swallowed and the connection is cut, so the operation
//!   applied and its reply was lost. [`Proxy::lose_next_reply`] does that for any request.
//! - [`Proxy::cut_on_next_reply`]: every connection open now is cut the next time the server
//!   sends it anything (works the same for a pool of connections and for one pipelined one).
//! - [`Proxy::cut_all`]: every open connection is closed now; new ones are accepted.
//! - [`Proxy::black_hole`]: nothing passes either way for a while (new connections are
//!   accepted and wait too); when it heals, what was sent meanwhile is delivered, as TCP
//!   retransmission would.
//! - [`Proxy::set_down`]: the store is down: open connections are cut and new ones are closed
//!   at once; `set_down(false)` brings it back.
//! - [`Proxy::stall_request_to`]: the next request that contains one of the given byte
//!   strings (a `COMMIT`, say) is held for a while before it reaches the server, and so is
//!   everything its connection sends after it; other connections flow.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// One proxy in front of one server. Dropping it stops it and closes its connections.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

struct Shared {
    upstream: SocketAddr,
    state: Mutex<State>,
    /// Bumped by `cut_all`: connections born under an older value close.
    generation: watch::Sender<u64>,
    next_conn: AtomicU64,
    connections: AtomicU64,
    lost_replies: AtomicU64,
    cut_connections: AtomicU64,
}

#[derive(Default)]
struct State {
    latency: Duration,
    /// Nothing is delivered before this instant.
    paused_until: Option<Instant>,
    down: bool,
    /// Armed by `lose_reply_to`: byte strings (empty: any request), and how many more
    /// replies to lose.
    lose: Option<(Vec<Vec<u8>>, u32)>,
    /// Connections with an id below this are cut on their next server bytes.
    cut_below: u64,
    /// Armed by `stall_request_to`: byte strings, how long to hold the request, and how many
    /// more requests to hold.
    stall: Option<(Vec<Vec<u8>>, Duration, u32)>,
}

/// One proxied connection.
struct Conn {
    id: u64,
    /// Set once the request whose reply is to be lost reached the server.
    doomed: AtomicBool,
    /// Fired by a fault: the whole connection is dropped.
    cut: tokio::sync::Notify,
}

impl Proxy {
    /// Starts a proxy to `upstream` on a free loopback port.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (generation, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            upstream,
            state: Mutex::new(State::default()),
            generation,
            next_conn: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            lost_replies: AtomicU64::new(0),
            cut_connections: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Proxy {
            addr,
            shared,
            accept,
        }
    }

    /// Starts a proxy to the `host:port` of a server URL (`redis://`, `postgres://`, ...).
    pub async fn for_url(url: &str) -> Proxy {
        let (_, hostport, _) = split_url(url);
        let upstream = tokio::net::lookup_host(hostport)
            .await
            .expect("resolve the server")
            .find(|a| a.ip().is_loopback())
            .expect("the test server is on loopback");
        Proxy::start(upstream).await
    }

    /// The proxy's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` with its `host:port` replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        let (head, _, tail) = split_url(url);
        format!("{head}{}{tail}", self.addr)
    }

    /// Delays every chunk by `latency`, each way (zero: none).
    pub fn set_latency(&self, latency: Duration) {
        self.state().latency = latency;
    }

    /// Arms a lost reply: the next request containing any of `patterns` reaches the server,
    /// then its connection is cut when the server answers, and the answer is swallowed.
    pub fn lose_reply_to(&self, patterns: Vec<Vec<u8>>) {
        self.lose_replies_to(patterns, 1);
    }

    /// [`lose_reply_to`](Self::lose_reply_to) for the next `n` such requests.
    pub fn lose_replies_to(&self, patterns: Vec<Vec<u8>>, n: u32) {
        self.state().lose = (n > 0).then_some((patterns, n));
    }

    /// [`lose_reply_to`](Self::lose_reply_to) for whatever request comes next.
    pub fn lose_next_reply(&self) {
        self.lose_reply_to(Vec::new());
    }

    /// Arms a stall: the next request containing any of `patterns` reaches the server `d`
    /// late (on top of any latency), and so does what its connection sends after it.
    pub fn stall_request_to(&self, patterns: Vec<Vec<u8>>, d: Duration) {
        self.state().stall = Some((patterns, d, 1));
    }

    /// Whether an armed stall is still waiting for its request.
    pub fn stall_armed(&self) -> bool {
        self.state().stall.is_some()
    }

    /// Whether an armed lost reply is still waiting for its request (or for more of them).
    pub fn loss_armed(&self) -> bool {
        self.state().lose.is_some()
    }

    /// Every connection open now is cut the next time the server sends it anything.
    pub fn cut_on_next_reply(&self) {
        let below = self.shared.next_conn.load(Ordering::SeqCst);
        self.state().cut_below = below;
    }

    /// Closes every open connection now.
    pub fn cut_all(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Lets nothing through, either way, for `d` (from now).
    pub fn black_hole(&self, d: Duration) {
        self.state().paused_until = Some(Instant::now() + d);
    }

    /// Down: cuts every connection and closes new ones at once. `false`: back up.
    pub fn set_down(&self, down: bool) {
        self.state().down = down;
        if down {
            self.cut_all();
        }
    }

    /// Removes every fault (latency, pause, armed losses, down).
    pub fn heal(&self) {
        *self.state() = State::default();
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Replies swallowed by [`lose_reply_to`](Self::lose_reply_to) so far.
    pub fn lost_replies(&self) -> u64 {
        self.shared.lost_replies.load(Ordering::SeqCst)
    }

    /// Connections cut by a fault so far.
    pub fn cut_connections(&self) -> u64 {
        self.shared.cut_connections.load(Ordering::SeqCst)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.set_down(true);
    }
}

/// `scheme://[user@]` , `host:port`, `/rest`.
fn split_url(url: &str) -> (&str, &str, &str) {
    let start = url.find("://").map_or(0, |i| i + 3);
    let start = url[start..]
        .find('@')
        .map_or(start, |i| start + i + 1)
        .min(url.len());
    let end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| start + i);
    (&url[..start], &url[start..end], &url[end..])
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if shared.state.lock().unwrap().down {
            drop(client);
            continue;
        }
        shared.connections.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(serve(client, Arc::clone(&shared)));
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    Up,
    Down,
}

/// One chunk on its way: when to deliver it, and whether it is the request whose reply is lost.
struct Chunk {
    at: Instant,
    bytes: Vec<u8>,
    dooms: bool,
}

async fn serve(client: TcpStream, shared: Arc<Shared>) {
    let mut generation = shared.generation.subscribe();
    let born = *generation.borrow_and_update();
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let conn = Conn {
        id: shared.next_conn.fetch_add(1, Ordering::SeqCst),
        doomed: AtomicBool::new(false),
        cut: tokio::sync::Notify::new(),
    };
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, Dir::Up, &shared, &conn);
    let down = pump(sr, cw, Dir::Down, &shared, &conn);
    let cut_all = async {
        while *generation.borrow_and_update() == born {
            if generation.changed().await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        // Both directions ended normally (each side closed).
        _ = async { tokio::join!(up, down) } => return,
        _ = cut_all => {}
        _ = conn.cut.notified() => {}
    }
    // Dropping the halves closes both sockets.
    shared.cut_connections.fetch_add(1, Ordering::SeqCst);
}

/// Moves one direction: a reader that stamps chunks (and spots faults) and a writer that
/// delivers them when their time has come. Returns when the reader saw EOF and everything
/// read was delivered; a fault fires `conn.cut` instead, and `serve` drops the connection.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    dir: Dir,
    shared: &Shared,
    conn: &Conn,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Chunk>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut tail: Vec<u8> = Vec::new();
        // Once a request of this connection is stalled, what follows it waits behind it.
        let mut held_until: Option<Instant> = None;
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let bytes = buf[..n].to_vec();
            let mut dooms = false;
            let mut s = shared.state.lock().unwrap();
            match dir {
                Dir::Up => {
                    let latency = s.latency;
                    if let Some((patterns, d, left)) = &mut s.stall {
                        if patterns.iter().any(|p| contains(&bytes, p)) {
                            held_until = Some(Instant::now() + latency + *d);
                            *left -= 1;
                            if *left == 0 {
                                s.stall = None;
                            }
                        }
                    }
                    if let Some((patterns, left)) = &mut s.lose {
                        let mut hay = std::mem::take(&mut tail);
                        hay.extend_from_slice(&bytes);
                        let keep = patterns.iter().map(Vec::len).max().unwrap_or(0);
                        if patterns.is_empty() || patterns.iter().any(|p| contains(&hay, p)) {
                            dooms = true;
                            *left -= 1;
                            if *left == 0 {
                                s.lose = None;
                            }
                        } else {
                            tail = hay[hay.len().saturating_sub(keep)..].to_vec();
                        }
                    }
                }
                Dir::Down => {
                    if conn.doomed.load(Ordering::SeqCst) {
                        shared.lost_replies.fetch_add(1, Ordering::SeqCst);
                        conn.cut.notify_one();
                        return;
                    }
                    if conn.id < s.cut_below {
                        conn.cut.notify_one();
                        return;
                    }
                }
            }
            let mut at = Instant::now() + s.latency;
            if let Some(held) = held_until {
                at = at.max(held);
            }
            drop(s);
            if tx.send(Chunk { at, bytes, dooms }).is_err() {
                return;
            }
        }
    };
    let writer = async {
        while let Some(chunk) = rx.recv().await {
            tokio::time::sleep_until(chunk.at).await;
            loop {
                let until = shared.state.lock().unwrap().paused_until;
                match until {
                    Some(t) if t > Instant::now() => tokio::time::sleep_until(t).await,
                    _ => break,
                }
            }
            if to.write_all(&chunk.bytes).await.is_err() {
                return;
            }
            if chunk.dooms {
                conn.doomed.store(true, Ordering::SeqCst);
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}
