//! `RedisStore`: records in Redis (or Valkey), a single server or a Redis Cluster.
//!
//! - **One string per record** (format v2, see `scripts.rs`), at `{prefix}{<key hex>}`. The
//!   hex sits in a hash tag, so a record and its v1 predecessor share one Cluster slot.
//! - **The claim is a native command**, `SET k <record> NX PX <lease + grace> GET`: nil means
//!   acquired, a completed record is the replay (one round trip). Only an in-progress or
//!   foreign record goes on to a short Lua script (conflict, own-token retry, takeover).
//!   Complete, release and renew are one short script each, comparing the fencing token —
//!   or, on Valkey ≥ 8.1 and Redis ≥ 8.4, native `SET … IFEQ` (and `DELIFEQ` / `DELEX … IFEQ`
//!   where the server has them), detected at connect and after reconnects (`native.rs`).
//! - **Replay hints**: a key this store saw completed is claimed with a native `GET` first
//!   (`seen.rs`); anything but a live completed record drops the hint and claims as above.
//! - **Expiry is Redis's own** (`PX`): a completed record lives for its ttl; an in-progress one
//!   for its lease plus a grace period, so the holder's lease has `PTTL - grace` left, on the
//!   server's clock.
//! - **Waiting**: completing, releasing or removing a record publishes its key hex on one
//!   store-wide channel; one subscriber connection per store wakes the local waiters
//!   (`notify.rs`). While that connection is down, waiters poll with a bounded backoff, and a
//!   waiter whose look fails on a connection error looks again until its wait is over.
//! - **Durable steps**: one hash per call at `{prefix}{<key hex>}:steps` (the record's slot),
//!   written by one fenced script, read by one `HGETALL`, removed with the record
//!   (`steps.rs`).
//! - **Connections**: a `ConnectionManager` (single server) or an async cluster connection,
//!   both reconnecting on their own: the store survives a server restart without being
//!   rebuilt. Every command is bounded by the command timeout ([`StoreError::Timeout`]).
//!
//! What Redis must promise for the guarantees to hold (version ≥ 7.0 for `SET NX GET`,
//! persistence, `noeviction`, failover) and how v1 and v2 instances share a server during an
//! upgrade is in `docs/stores/redis.md`.

mod admin;
mod builder;
mod native;
mod notify;
mod reply;
mod scripts;
mod seen;
mod steps;

/// Parses `bytes` as a record string read from Redis (the parser every claim, replay and
/// look goes through) — the entry point of the `redis_record` fuzz target in `fuzz/`. Not an
/// API: it may change in any release.
#[doc(hidden)]
pub fn __fuzz_record(bytes: &[u8]) -> bool {
    reply::record(idem_core::Bytes::copy_from_slice(bytes)).is_ok()
}

pub use self::builder::RedisStoreBuilder;
pub use self::native::NativeCas;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionLike, ConnectionManager};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Client, Cmd, RedisError, ServerError, Value};
use idem_core::{
    async_trait, Claim, ClaimRequest, CompletedRecord, FencingToken, Fingerprint, Key, RecordState,
    StepId, StepRecord, Store, StoreError,
};

use self::builder::Target;
use self::native::{Caps, Detected, Held, Recent, Release};
use self::notify::Waiters;
use self::reply::{Life, Looked, Record};
use self::scripts::{Lua, Scripts};

/// The longest ttl or lease honoured (100 years); longer ones are clamped.
const MAX_DURATION_MS: u64 = 100 * 365 * 86_400 * 1000;
/// Polling backoff while notifications are unavailable.
const POLL_MIN: Duration = Duration::from_millis(5);
const POLL_MAX: Duration = Duration::from_millis(250);

/// A store on Redis or Valkey: one server, or a Redis Cluster. Cheap to clone (clones share
/// the connection and the subscriber).
///
/// ```no_run
/// use std::sync::Arc;
/// use idem_stores::RedisStore;
///
/// # async fn demo() -> Result<(), idem_core::StoreError> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379/").await?;
/// let store: Arc<dyn idem_core::Store> = Arc::new(store);
/// # let _ = store;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    scripts: Scripts,
    prefix: String,
    channel: String,
    command_timeout: Duration,
    max_value_size: usize,
    lease_grace: Duration,
    clock: ServerClock,
    waiters: Arc<Waiters>,
    /// Keys seen completed: their next claim starts with a `GET` (see `seen.rs`).
    seen: seen::Seen,
    /// Whether completions, renewals and releases use native commands (`native.rs`).
    native: NativeCas,
    detected: Detected,
    /// True while one task detects the server (the others use the scripts meanwhile).
    detecting: AtomicBool,
    /// Whether the detected path was logged yet.
    logged: AtomicBool,
    /// The claims this store holds (what a native `IFEQ` compares with).
    held: Held,
    /// Short-ttl completions this store wrote, for a repeat that finds them expired.
    recent: Recent,
    subscriber: tokio::task::JoinHandle<()>,
    /// Reads the server's clock every [`CLOCK_REFRESH`] (holds a weak handle to the store).
    clock_reader: std::sync::OnceLock<tokio::task::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.subscriber.abort();
        if let Some(reader) = self.clock_reader.get() {
            reader.abort();
        }
    }
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Estimates of the server's clock (ms since the epoch) from `TIME` readings, refreshed every
/// [`CLOCK_REFRESH`]: `late` pairs a reading with the moment its command was *sent*, so it
/// never runs behind the server; `early` pairs it with the moment the reply *arrived*, so it
/// never runs ahead. A completion stamps its record's expiry with `early + ttl` (never after
/// the real expiry), and a replay reports `stamp - late` as its remaining ttl (a little short,
/// never long), which is all a cache in front of the store needs.
struct ServerClock {
    base: Instant,
    /// Server ms minus ms since `base`, paired with the send (`late`) or the reply (`early`).
    late: AtomicI64,
    early: AtomicI64,
}

/// How often the store reads the server's clock.
const CLOCK_REFRESH: Duration = Duration::from_secs(5);
/// Allowed drift between the server's clock and ours over one refresh period, plus TIME's
/// truncation to ms.
const CLOCK_MARGIN_MS: i64 = 5;

impl ServerClock {
    fn new() -> Self {
        ServerClock {
            base: Instant::now(),
            late: AtomicI64::new(i64::MIN),
            early: AtomicI64::new(i64::MIN),
        }
    }

    fn since_base(&self, t: Instant) -> i64 {
        i64::try_from(t.saturating_duration_since(self.base).as_millis()).unwrap_or(i64::MAX)
    }

    /// Records that the server's clock read `server_ms` for a command sent at `sent` whose
    /// reply arrived at `arrived`.
    fn observe(&self, sent: Instant, arrived: Instant, server_ms: i64) {
        self.late.store(
            server_ms + 1 + CLOCK_MARGIN_MS - self.since_base(sent),
            Ordering::Relaxed,
        );
        self.early.store(
            server_ms - CLOCK_MARGIN_MS - self.since_base(arrived),
            Ordering::Relaxed,
        );
    }

    /// The expiry to stamp on a record completed now with `ttl`, never after the real one
    /// (0 before the first reading: replays then report no ttl left).
    fn stamp(&self, ttl_ms: u64) -> f64 {
        let early = self.early.load(Ordering::Relaxed);
        if early == i64::MIN {
            return 0.0;
        }
        (early.saturating_add(self.since_base(Instant::now())) as f64) + ttl_ms as f64
    }

    /// The server's clock now, never ahead of it: a claim's start (0 before the first
    /// reading: the claim then shows no age).
    fn start_stamp(&self) -> f64 {
        let early = self.early.load(Ordering::Relaxed);
        if early == i64::MIN {
            return 0.0;
        }
        early.saturating_add(self.since_base(Instant::now())) as f64
    }

    /// The server's clock now, never behind it (`None` before the first reading): a claim's
    /// age is never understated.
    fn now_late(&self) -> Option<f64> {
        let late = self.late.load(Ordering::Relaxed);
        (late != i64::MIN).then(|| late.saturating_add(self.since_base(Instant::now())) as f64)
    }

    /// How long a record stamped with `expiry_ms` still lives, never more than it does.
    fn left(&self, expiry_ms: f64) -> Duration {
        let late = self.late.load(Ordering::Relaxed);
        if late == i64::MIN {
            return Duration::ZERO;
        }
        let now = late.saturating_add(self.since_base(Instant::now())) as f64;
        Duration::from_millis((expiry_ms - now).max(0.0) as u64)
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("RedisStore")
            .field(
                "mode",
                &match i.conn {
                    Conn::Single(_) => "single",
                    Conn::Cluster(_) => "cluster",
                },
            )
            .field("prefix", &i.prefix)
            .field("command_timeout", &i.command_timeout)
            .field("max_value_size", &i.max_value_size)
            .field("notifications_live", &i.waiters.live())
            .finish()
    }
}

fn backend(what: &str, e: RedisError, timeout: Duration) -> StoreError {
    if e.is_timeout() {
        StoreError::Timeout(timeout)
    } else {
        StoreError::backend(what.to_string(), e)
    }
}

fn server_error(what: &str, e: ServerError) -> StoreError {
    StoreError::backend(what.to_string(), RedisError::from(e))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .min(MAX_DURATION_MS)
}

/// A key's name, `{prefix}{<key hex>}`, built without a `String` per hex digit.
fn key_name(prefix: &str, key: &Key) -> Vec<u8> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    // The braces and digits are written into a fixed array, then copied once: a `push` per
    // digit checks the capacity every time (about 1,000 instructions per name).
    let mut tag = [0u8; 66];
    tag[0] = b'{';
    for (i, b) in key.0.iter().enumerate() {
        tag[1 + 2 * i] = DIGITS[usize::from(b >> 4)];
        tag[2 + 2 * i] = DIGITS[usize::from(b & 15)];
    }
    tag[65] = b'}';
    let mut name = Vec::with_capacity(prefix.len() + tag.len());
    name.extend_from_slice(prefix.as_bytes());
    name.extend_from_slice(&tag);
    name
}

impl RedisStore {
    /// Connects to one server by URL (`redis://[user:password@]host:port[/db]`), with the
    /// default settings.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder(url).build().await
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://host:port` each).
    pub async fn connect_cluster<I, S>(nodes: I) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::cluster_builder(nodes).build().await
    }

    /// Uses a `redis::Client` the application already has.
    pub async fn from_client(client: Client) -> Result<Self, StoreError> {
        Self::builder_from_client(client).build().await
    }

    /// A builder for one server by URL.
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Target::Url(url.into()))
    }

    /// A builder for one server from an existing `redis::Client`.
    pub fn builder_from_client(client: Client) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Target::Client(Box::new(client)))
    }

    /// A builder for a Redis Cluster, given any of its nodes.
    pub fn cluster_builder<I, S>(nodes: I) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RedisStoreBuilder::new(Target::Cluster(nodes.into_iter().map(Into::into).collect()))
    }

    /// The Redis key of a record: `{prefix}{<key hex>}` (the same name in record formats v1
    /// and v2).
    ///
    /// ```no_run
    /// # async fn demo(store: idem_stores::RedisStore) {
    /// let name = store.redis_key(&idem_core::Key([0xab; 32]));
    /// assert!(name.ends_with("{abababababababababababababababababababababababababababababababab}"));
    /// # }
    /// ```
    pub fn redis_key(&self, key: &Key) -> String {
        String::from_utf8_lossy(&key_name(&self.inner.prefix, key)).into_owned()
    }

    /// The channel on which completions and releases are published.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// True while the store's subscriber connection is subscribed (waiters are woken by
    /// notifications); false while they fall back to polling.
    pub fn notifications_live(&self) -> bool {
        self.inner.waiters.live()
    }

    fn name(&self, key: &Key) -> Vec<u8> {
        key_name(&self.inner.prefix, key)
    }

    /// Sends one command, bounded by the command timeout. A server's error reply comes back
    /// as `Value::ServerError`, for the caller to read.
    async fn send(&self, what: &'static str, cmd: &Cmd) -> Result<Value, StoreError> {
        let timeout = self.inner.command_timeout;
        let run = async {
            match &self.inner.conn {
                Conn::Single(c) => c.clone().req_packed_command(cmd).await,
                Conn::Cluster(c) => c.clone().req_packed_command(cmd).await,
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(backend(what, e, timeout)),
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }

    /// True when completions and renewals use native `SET … IFEQ` (forced, or detected on a
    /// Valkey ≥ 8.1 / Redis ≥ 8.4 server); false while they use the Lua scripts. Detection
    /// runs at connect and then every 5 s, so a reconnect to an upgraded or downgraded server
    /// changes the path within seconds; until then the path in use stays correct (a server
    /// that refuses a native command gets the script instead).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), idem_core::StoreError> {
    /// let store = idem_stores::RedisStore::connect("redis://127.0.0.1:6379/").await?;
    /// println!("native compare-and-set: {}", store.native_cas_active());
    /// # Ok(()) }
    /// ```
    pub fn native_cas_active(&self) -> bool {
        match self.inner.native {
            NativeCas::Never => false,
            NativeCas::Always => true,
            NativeCas::Auto => self.inner.detected.get().0.set_ifeq,
        }
    }

    /// The commands to use now. A detection that is stale (a native command was refused) or
    /// out of date (the server was replaced since) is still safe to use: a native command the
    /// server refuses, or whose comparison fails, falls back to the script; the store's
    /// periodic detection brings it up to date.
    fn caps(&self) -> Caps {
        let caps = self.inner.detected.get().0;
        match self.inner.native {
            NativeCas::Never => Caps::SCRIPTS,
            NativeCas::Always => Caps {
                set_ifeq: true,
                ..caps
            },
            NativeCas::Auto => caps,
        }
    }

    /// Asks the server (every node of a cluster) for its name and version with `INFO
    /// server`, stores the capabilities, and logs them the first time and whenever they
    /// change. `None` when the server could not be asked, or another task is asking.
    pub(crate) async fn detect(&self) -> Option<Caps> {
        if self.inner.native == NativeCas::Never
            || self.inner.detecting.swap(true, Ordering::AcqRel)
        {
            return None;
        }
        let mut info = Cmd::with_capacity(2, 16);
        info.arg("INFO").arg("server");
        let reply = self.send("redis info", &info).await;
        self.inner.detecting.store(false, Ordering::Release);
        let versions = match reply {
            Ok(v) => native::versions(&v),
            Err(e) => {
                tracing::debug!(error = %e, "idem redis: could not read the server's version");
                return None;
            }
        };
        let caps = native::common(&versions);
        let names: Vec<String> = versions.iter().map(|v| v.describe()).collect();
        let first = !self.inner.logged.swap(true, Ordering::AcqRel);
        let changed = self.inner.detected.set(caps);
        if first || changed.is_some() {
            let path = match (self.inner.native, caps.set_ifeq) {
                (NativeCas::Always, _) => "native SET IFEQ (forced)",
                (_, true) => "native SET IFEQ",
                (_, false) => "Lua scripts",
            };
            let release = match caps.del {
                Release::DelIfEq => "DELIFEQ",
                Release::DelEx => "DELEX IFEQ",
                Release::Script => "a Lua script",
            };
            tracing::info!(
                server = %names.join(", "),
                "idem redis: completions and renewals use {path}; releases use {release}"
            );
        }
        Some(caps)
    }

    /// The claimed record to compare with natively (and the start and renewals it holds),
    /// when the native path is in use and this store holds the claim; `None`: use the script.
    fn native_target(&self, key: &Key, token: FencingToken) -> Option<(Caps, Vec<u8>, Life)> {
        let caps = self.caps();
        // A waiter of this store marked the record (so the native comparison would fail and
        // the script would follow): the script at once, one round trip instead of two.
        if !caps.set_ifeq || self.inner.waiters.waiting(key) {
            return None;
        }
        let (fp, life) = self.inner.held.get(key, token)?;
        Some((caps, self.claimed_record(token, fp.as_ref(), life), life))
    }

    /// After a completion was stored: forget the claim, and remember the key as completed.
    fn completed(&self, key: &Key, token: FencingToken, ttl_ms: u64) {
        self.inner.held.remove(key, token);
        let ttl = Duration::from_millis(ttl_ms);
        if ttl < native::RECENT_TTL {
            self.inner.recent.completed(key, token);
        }
        self.inner.seen.completed(key, ttl);
    }

    /// Remembers an acquired claim for the native commands (unless they cannot be used).
    fn hold(&self, req: &ClaimRequest, life: Life, lives_ms: u64) {
        if self.caps().set_ifeq {
            self.inner.held.insert(
                &req.key,
                req.token,
                req.fingerprint,
                life,
                Duration::from_millis(lives_ms),
            );
        }
    }

    /// The in-progress record of a claim under `token` with `fp`, at the start and renewals
    /// of `life`.
    fn claimed_record(&self, token: FencingToken, fp: Option<&Fingerprint>, life: Life) -> Vec<u8> {
        reply::in_progress(token, millis(self.inner.lease_grace).max(1), fp, life)
    }

    /// Sends a native conditional command: `Some(true)` applied, `Some(false)` the value
    /// differed (or the key is absent), `None` the server refused the command (it does not
    /// know it: detect again, and use the script).
    async fn native(&self, what: &'static str, cmd: &Cmd) -> Result<Option<bool>, StoreError> {
        match self.send(what, cmd).await? {
            Value::Okay | Value::Int(1) => Ok(Some(true)),
            Value::SimpleString(s) if s == "OK" => Ok(Some(true)),
            Value::Nil | Value::Int(0) => Ok(Some(false)),
            Value::ServerError(e) => {
                if self.inner.native == NativeCas::Always {
                    return Err(server_error(what, e));
                }
                tracing::debug!(error = %e.details().unwrap_or_default(), "idem redis: native command refused; using the script");
                self.inner.detected.invalidate();
                Ok(None)
            }
            other => Err(StoreError::Corrupt(format!(
                "unexpected reply {other:?} to a conditional command"
            ))),
        }
    }

    /// Runs a script on one key by its hash (`EVALSHA`), or by its source (`EVAL`) when the
    /// server does not know it yet, which also loads it there.
    async fn eval(
        &self,
        what: &'static str,
        lua: &Lua,
        name: &[u8],
        args: &[&[u8]],
    ) -> Result<Value, StoreError> {
        let data: usize = args.iter().map(|a| a.len()).sum::<usize>() + name.len();
        let build = |by_source: bool| {
            let (verb, body) = if by_source {
                ("EVAL", lua.source.as_str())
            } else {
                ("EVALSHA", lua.sha.as_str())
            };
            // Sized once: no regrowth while the arguments are written.
            let mut cmd = Cmd::with_capacity(4 + args.len(), verb.len() + body.len() + data + 1);
            cmd.arg(verb).arg(body).arg(1).arg(name);
            for a in args {
                cmd.arg(*a);
            }
            cmd
        };
        match self.send(what, &build(false)).await? {
            Value::ServerError(e) if e.code() == "NOSCRIPT" => {
                match self.send(what, &build(true)).await? {
                    Value::ServerError(e) => Err(server_error(what, e)),
                    v => Ok(v),
                }
            }
            Value::ServerError(e) => Err(server_error(what, e)),
            v => Ok(v),
        }
    }

    /// Reads the record; `waiter` marks a live claim as waited on, so that its completion or
    /// release is published.
    async fn look(&self, key: &Key, waiter: bool) -> Result<Looked, StoreError> {
        let name = self.name(key);
        let mark: &[u8] = if waiter { b"1" } else { b"0" };
        let v = self
            .eval("redis get", &self.inner.scripts.look, &name, &[mark])
            .await?;
        reply::looked(v)
    }

    /// A completed v2 record found by the claim's `SET … GET`, as a replay.
    fn replay(&self, key: &Key, rec: Record) -> Result<Claim, StoreError> {
        match rec {
            Record::Completed {
                fingerprint,
                expiry_ms,
                value,
            } => {
                let left = self.inner.clock.left(expiry_ms);
                self.inner.seen.completed(key, left);
                Ok(Claim::Completed(CompletedRecord::new(
                    fingerprint,
                    value,
                    Some(left),
                )))
            }
            Record::InProgress { .. } => Err(StoreError::Corrupt(
                "redis record: an in-progress record where a completed one was read".into(),
            )),
        }
    }

    /// Reads the server's clock (at connect, then every [`CLOCK_REFRESH`]), so that
    /// completions can stamp their expiry and replays report their ttl.
    pub(crate) async fn read_clock(&self) -> Result<(), StoreError> {
        let sent = Instant::now();
        let v = self.send("redis time", &::redis::cmd("TIME")).await?;
        let arrived = Instant::now();
        let Value::Array(parts) = v else {
            return Err(StoreError::Corrupt(format!("unexpected TIME reply {v:?}")));
        };
        let num = |v: Option<&Value>| match v {
            Some(Value::BulkString(b)) => std::str::from_utf8(b).ok()?.parse::<i64>().ok(),
            Some(Value::Int(i)) => Some(*i),
            _ => None,
        };
        let (Some(secs), Some(micros)) = (num(parts.first()), num(parts.get(1))) else {
            return Err(StoreError::Corrupt("unexpected TIME reply".into()));
        };
        self.inner
            .clock
            .observe(sent, arrived, secs * 1000 + micros / 1000);
        Ok(())
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let name = self.name(&req.key);
        let grace = millis(self.inner.lease_grace).max(1);
        let lease = millis(req.lease).max(1);
        // A key seen completed is most likely a replay: read it with a native GET. Anything
        // but a live completed record (expired, removed, in progress, a v1 hash, foreign
        // data) drops the hint and the claim goes on as usual; the GET changed nothing.
        if self.inner.seen.likely_completed(&req.key) {
            let mut get = Cmd::with_capacity(2, name.len() + 4);
            get.arg("GET").arg(&name[..]);
            if let Value::BulkString(b) = self.send("redis claim", &get).await? {
                if let Ok(rec @ Record::Completed { .. }) = reply::record(b.into()) {
                    return self.replay(&req.key, rec);
                }
            }
            self.inner.seen.forget(&req.key);
        }
        // The claim's start, on the server's clock as estimated here: written by the claim
        // itself, so keeping it costs no round trip.
        let life = Life {
            started_ms: self.inner.clock.start_stamp(),
            renewals: 0,
        };
        let rec = reply::in_progress(req.token, grace, req.fingerprint.as_ref(), life);
        let mut set = Cmd::with_capacity(7, name.len() + rec.len() + 32);
        set.arg("SET")
            .arg(&name[..])
            .arg(&rec[..])
            .arg("NX")
            .arg("PX")
            .arg(lease + grace)
            .arg("GET");
        match self.send("redis claim", &set).await? {
            Value::Nil => {
                self.hold(req, life, lease + grace);
                return Ok(Claim::Acquired { taken_over: false });
            }
            Value::BulkString(b) => {
                if let rec @ Record::Completed { .. } = reply::record(b.into())? {
                    return self.replay(&req.key, rec);
                }
                // In progress: a conflict, our own retried claim, or a lapsed lease.
            }
            // A v1 hash, or foreign data: the script tells which.
            Value::ServerError(e) if e.code() == "WRONGTYPE" => {}
            Value::ServerError(e) => return Err(server_error("redis claim", e)),
            other => {
                return Err(StoreError::Corrupt(format!(
                    "unexpected SET reply {other:?}"
                )))
            }
        }
        let (mut lease_buf, mut grace_buf) = ([0u8; 20], [0u8; 20]);
        let v = self
            .eval(
                "redis claim",
                &self.inner.scripts.claim,
                &name,
                &[
                    &rec,
                    &req.token.0.to_be_bytes(),
                    reply::decimal(lease, &mut lease_buf),
                    reply::decimal(grace, &mut grace_buf),
                ],
            )
            .await?;
        let claim = reply::looked(v)?.into_claim()?;
        if let Claim::Acquired { .. } = claim {
            self.hold(req, life, lease + grace);
        }
        Ok(claim)
    }

    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if value.len() > self.inner.max_value_size {
            return Err(StoreError::TooLarge {
                size: value.len(),
                limit: self.inner.max_value_size,
            });
        }
        let name = self.name(key);
        let ttl = millis(ttl).max(1);
        let head = reply::completed_head(token, self.inner.clock.stamp(ttl));
        if let Some((_, claimed, _)) = self.native_target(key, token) {
            // One `SET … IFEQ <claimed record>`: the completed record is the head, the
            // fingerprint (from the claimed record) and the value.
            let kept = reply::kept_on_completion(&claimed);
            let mut rec = Vec::with_capacity(head.len() + kept.len() + value.len());
            rec.extend_from_slice(&head);
            rec.extend_from_slice(kept);
            rec.extend_from_slice(value);
            let mut set = Cmd::with_capacity(7, name.len() + rec.len() + claimed.len() + 32);
            set.arg("SET")
                .arg(&name[..])
                .arg(&rec[..])
                .arg("IFEQ")
                .arg(&claimed[..])
                .arg("PX")
                .arg(ttl);
            if self.native("redis complete", &set).await? == Some(true) {
                self.completed(key, token, ttl);
                return Ok(());
            }
            // Marked by a waiter (the script publishes), a repeat, or fenced: the script
            // tells which.
        }
        let mut ttl_buf = [0u8; 20];
        let v = self
            .eval(
                "redis complete",
                &self.inner.scripts.complete,
                &name,
                &[
                    &reply::held(token),
                    &head,
                    value,
                    reply::decimal(ttl, &mut ttl_buf),
                ],
            )
            .await?;
        match reply::fenced(&v) {
            // The record is gone: a completion of ours whose reply was lost and whose record
            // has expired since is recognised; anything else is fenced.
            Ok(2) if self.inner.recent.contains(key, token) => {}
            Ok(2) => {
                self.inner.held.remove(key, token);
                return Err(StoreError::Fenced);
            }
            Ok(_) => self.completed(key, token, ttl),
            Err(e) => {
                if matches!(e, StoreError::Fenced) {
                    self.inner.held.remove(key, token);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError> {
        let name = self.name(key);
        if let Some((caps, claimed, _)) = self.native_target(key, token) {
            let mut del = Cmd::with_capacity(4, name.len() + claimed.len() + 16);
            match caps.del {
                Release::DelIfEq => {
                    del.arg("DELIFEQ").arg(&name[..]).arg(&claimed[..]);
                }
                Release::DelEx => {
                    del.arg("DELEX")
                        .arg(&name[..])
                        .arg("IFEQ")
                        .arg(&claimed[..]);
                }
                Release::Script => {}
            }
            // Deleted; or not (marked by a waiter: the script publishes) and the script
            // decides.
            if caps.del != Release::Script
                && self.native("redis release", &del).await? == Some(true)
            {
                self.inner.held.remove(key, token);
                return Ok(());
            }
        }
        let v = self
            .eval(
                "redis release",
                &self.inner.scripts.release,
                &name,
                &[&reply::held(token)],
            )
            .await?;
        reply::fenced(&v)?;
        self.inner.held.remove(key, token);
        Ok(())
    }

    async fn renew(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let name = self.name(key);
        let lease = millis(lease).max(1);
        if let Some((_, claimed, life)) = self.native_target(key, token) {
            // The claimed record written again over itself with one more renewal, and the new
            // expiry (the lease plus the grace, as the claim wrote it).
            let px = lease.saturating_add(millis(self.inner.lease_grace).max(1));
            let life = Life {
                renewals: life.renewals.saturating_add(1),
                ..life
            };
            let mut renewed = claimed.clone();
            let at = renewed.len() - 4;
            renewed[at..].copy_from_slice(&life.renewals.to_be_bytes());
            let mut set = Cmd::with_capacity(7, name.len() + 2 * claimed.len() + 32);
            set.arg("SET")
                .arg(&name[..])
                .arg(&renewed[..])
                .arg("IFEQ")
                .arg(&claimed[..])
                .arg("PX")
                .arg(px);
            match self.native("redis renew", &set).await? {
                Some(true) => {
                    self.inner
                        .held
                        .renewed(key, token, life, Duration::from_millis(px));
                    return Ok(());
                }
                // Marked by a waiter elsewhere, or fenced: the script decides, now and for
                // this claim's next renewals.
                Some(false) => self.inner.held.mark(key, token),
                None => {}
            }
        }
        let mut lease_buf = [0u8; 20];
        let v = self
            .eval(
                "redis renew",
                &self.inner.scripts.renew,
                &name,
                &[&reply::held(token), reply::decimal(lease, &mut lease_buf)],
            )
            .await?;
        reply::fenced(&v).map(drop)
    }

    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError> {
        self.look(key, false)
            .await?
            .into_state(self.inner.clock.now_late())
    }

    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        let deadline = Instant::now() + timeout;
        // Register before looking: a completion published after the look wakes us.
        let registration = self.inner.waiters.register(key.to_hex());
        let mut backoff = POLL_MIN;
        loop {
            let notified = registration.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let live = self.inner.waiters.live();
            let remaining = match self.look(key, true).await {
                Ok(Looked::InProgress { remaining, .. }) => remaining,
                Ok(_) => return Ok(()),
                // Foreign data is not a blip: say so at once.
                Err(e @ StoreError::Corrupt(_)) => return Err(e),
                // A connection blip or a slow server: look again until the wait is over, and
                // then let the caller claim again (which reports the error if it persists).
                Err(e) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(());
                    }
                    tracing::debug!(error = %e, %key, "idem redis: waiter's look failed; retrying");
                    let nap = backoff.min(deadline - now);
                    backoff = (backoff * 2).min(POLL_MAX);
                    tokio::time::sleep(nap).await;
                    continue;
                }
            };
            let now = Instant::now();
            // The holder's lease ends (by the server's clock) `remaining` from now: a crashed
            // holder publishes nothing, so stop then and let the caller take over.
            let until = deadline.min(now + remaining + Duration::from_millis(1));
            if now >= until {
                return Ok(());
            }
            let sleep = if live {
                until - now
            } else {
                let s = backoff.min(until - now);
                backoff = (backoff * 2).min(POLL_MAX);
                s
            };
            tokio::select! {
                // The record changed (completed, released, removed), or the subscription
                // did: either way the caller claims again, which is the next look.
                _ = notified => return Ok(()),
                _ = tokio::time::sleep(sleep) => {
                    if Instant::now() >= deadline {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        self.inner.seen.forget(key);
        self.inner.recent.forget(key);
        let name = self.name(key);
        // The record and its steps, in one `DEL` (one slot: the steps key shares the tag).
        let steps = steps::steps_name(&name);
        let channel = self.inner.channel.as_bytes();
        self.eval_keys(
            "redis remove",
            &self.inner.scripts.remove,
            &[&name, &steps],
            (1, channel.len()),
            |cmd| {
                cmd.arg(channel);
            },
        )
        .await
        .map(drop)
    }

    fn supports_steps(&self) -> bool {
        true
    }

    async fn load_steps(&self, key: &Key) -> Result<Vec<StepRecord>, StoreError> {
        self.steps_load(key).await
    }

    async fn put_step(
        &self,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.steps_put(key, token, step, ttl).await
    }

    async fn clear_step(
        &self,
        key: &Key,
        token: FencingToken,
        id: &StepId,
    ) -> Result<(), StoreError> {
        self.steps_clear(key, token, id).await
    }

    fn detached(&self) -> Option<Arc<dyn Store>> {
        Some(Arc::new(self.clone()))
    }

    fn name(&self) -> &'static str {
        "redis"
    }

    fn max_value_size(&self) -> usize {
        self.inner.max_value_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_clamped_to_what_redis_accepts() {
        assert_eq!(millis(Duration::from_millis(250)), 250);
        assert_eq!(millis(Duration::MAX), MAX_DURATION_MS);
    }

    #[test]
    fn key_names_are_hex_in_a_hash_tag() {
        let name = key_name("p:", &Key([0xa5; 32]));
        assert_eq!(name.len(), 2 + 66);
        assert_eq!(&name[..3], b"p:{");
        assert_eq!(&name[3..7], b"a5a5");
        assert_eq!(name.last(), Some(&b'}'));
        assert_eq!(
            String::from_utf8(name).ok(),
            Some(format!("p:{{{}}}", Key([0xa5; 32]).to_hex()))
        );
    }

    #[test]
    fn the_clock_estimates_never_overstate_a_ttl() {
        let clock = ServerClock::new();
        assert_eq!(clock.left(1e12), Duration::ZERO);
        assert_eq!(clock.stamp(1000), 0.0);
        let sent = Instant::now();
        clock.observe(sent, sent + Duration::from_millis(3), 1_000_000);
        let stamp = clock.stamp(5_000);
        assert!(stamp <= 1_000_000.0 + 5_000.0, "{stamp}");
        let left = clock.left(stamp);
        assert!(left <= Duration::from_millis(5_000), "{left:?}");
        assert!(left >= Duration::from_millis(4_900), "{left:?}");
        assert_eq!(clock.left(999_000.0), Duration::ZERO);
    }
}
