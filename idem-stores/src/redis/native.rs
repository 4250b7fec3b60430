//! The native compare-and-set path: `SET … IFEQ` (Valkey ≥ 8.1, Redis ≥ 8.4) for completions
//! and renewals, `DELIFEQ` (Valkey ≥ 9.0) or `DELEX … IFEQ` (Redis ≥ 8.4) for releases.
//!
//! - **Detection.** The server's name and version come from `INFO server`, at connect and
//!   then every 5 s with the clock reading (a reconnect may have reached an upgraded or
//!   downgraded server). On a cluster, every node is asked and the path is the one all of
//!   them support. A server that answers a native command with an error reply (a downgrade
//!   not detected yet) gets the script instead, and is detected again. Detecting inline,
//!   before the first settle after each connection error, was tried: under repeated
//!   connection cuts the extra round trip on the settle path made waiters' claims fail.
//! - **What is compared.** `IFEQ` compares the whole value, so the store keeps the in-progress
//!   record each of its own claims wrote ([`Held`]): key → token, fingerprint, the claim's
//!   start and its renewals (a native renewal writes the record with one more renewal, and
//!   the entry follows it; a renewal whose reply was lost leaves the entry behind the record,
//!   so the next comparison fails and the script takes over, as for a marked record). A claim not
//!   found there (claimed before an upgrade, or by another instance of the store) completes
//!   with the script. A value that differs (a waiter marked the claim `i2w`, so the
//!   completion must publish; a repeat after a lost reply; a fenced token) also goes to the
//!   script, which decides exactly as it does on older servers.
//! - **The record format and the fencing rules do not change**, so instances on the scripts
//!   and instances on the native commands can share a server.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::redis::Value;
use idem_core::{FencingToken, Fingerprint, Key};

use super::reply::Life;
use crate::key_map::{KeyHashing, MapKey};

/// Which commands a [`RedisStore`](crate::RedisStore) completes, renews and releases with.
///
/// Claims (`SET … NX PX … GET`) and replays (`GET`) are native commands on every server; only
/// the operations that compare the record with the holder's claim depend on this.
///
/// ```no_run
/// use idem_stores::redis::NativeCas;
/// use idem_stores::RedisStore;
///
/// # async fn demo() -> Result<(), idem_core::StoreError> {
/// // Keep the Lua scripts even on a server that has `SET … IFEQ`.
/// let store = RedisStore::builder("redis://127.0.0.1:6379/")
///     .native_cas(NativeCas::Never)
///     .build()
///     .await?;
/// assert!(!store.native_cas_active());
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NativeCas {
    /// Detect the server at connect and after every reconnect: Valkey ≥ 8.1 or Redis ≥ 8.4
    /// use `SET … IFEQ`, older servers the scripts. The default.
    #[default]
    Auto,
    /// Always the Lua scripts (the path for Redis 7.0 – 8.2 and Valkey 7.2 – 8.0).
    Never,
    /// Always `SET … IFEQ`, without asking the server; a server that does not know it
    /// answers every completion and renewal with an error. Releases still use `DELIFEQ` /
    /// `DELEX` only where detection found them.
    Always,
}

/// The conditional delete a server has, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Release {
    /// None: releases run the script.
    Script,
    /// `DELIFEQ key value` (Valkey ≥ 9.0).
    DelIfEq,
    /// `DELEX key IFEQ value` (Redis ≥ 8.4).
    DelEx,
}

/// What one server (or every node of a cluster) supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Caps {
    pub(crate) set_ifeq: bool,
    pub(crate) del: Release,
}

impl Caps {
    pub(crate) const SCRIPTS: Caps = Caps {
        set_ifeq: false,
        del: Release::Script,
    };

    fn bits(self) -> u8 {
        u8::from(self.set_ifeq)
            | match self.del {
                Release::Script => 0,
                Release::DelIfEq => 2,
                Release::DelEx => 4,
            }
    }

    fn from_bits(b: u8) -> Caps {
        Caps {
            set_ifeq: b & 1 != 0,
            del: if b & 2 != 0 {
                Release::DelIfEq
            } else if b & 4 != 0 {
                Release::DelEx
            } else {
                Release::Script
            },
        }
    }

    /// The common subset of two nodes' capabilities.
    fn meet(self, other: Caps) -> Caps {
        Caps {
            set_ifeq: self.set_ifeq && other.set_ifeq,
            del: if self.del == other.del {
                self.del
            } else {
                Release::Script
            },
        }
    }
}

/// A server's product and version, from `INFO server`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServerVersion {
    pub(crate) valkey: bool,
    pub(crate) version: (u32, u32, u32),
}

impl ServerVersion {
    /// Parses an `INFO server` reply: Valkey reports `valkey_version` (and `server_name:valkey`)
    /// besides a `redis_version` kept for compatibility; Redis only `redis_version`.
    pub(crate) fn parse(info: &str) -> Option<ServerVersion> {
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.trim_end().strip_prefix(name)?.strip_prefix(':'))
        };
        let (valkey, v) = match field("valkey_version") {
            Some(v) => (true, v),
            None => (
                field("server_name").is_some_and(|n| n.eq_ignore_ascii_case("valkey")),
                field("redis_version")?,
            ),
        };
        let mut parts = v.split('.').map(|p| {
            p.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse::<u32>()
                .ok()
        });
        let major = parts.next()??;
        let minor = parts.next().flatten().unwrap_or(0);
        let patch = parts.next().flatten().unwrap_or(0);
        Some(ServerVersion {
            valkey,
            version: (major, minor, patch),
        })
    }

    pub(crate) fn caps(&self) -> Caps {
        let v = self.version;
        if self.valkey {
            Caps {
                set_ifeq: v >= (8, 1, 0),
                del: if v >= (9, 0, 0) {
                    Release::DelIfEq
                } else {
                    Release::Script
                },
            }
        } else {
            let new = v >= (8, 4, 0);
            Caps {
                set_ifeq: new,
                del: if new { Release::DelEx } else { Release::Script },
            }
        }
    }

    pub(crate) fn describe(&self) -> String {
        let (a, b, c) = self.version;
        format!(
            "{} {a}.{b}.{c}",
            if self.valkey { "Valkey" } else { "Redis" }
        )
    }
}

/// Reads the versions out of an `INFO server` reply: one string from a single server, or one
/// per node (a map or an array) from a cluster.
pub(crate) fn versions(v: &Value) -> Vec<ServerVersion> {
    let mut out = Vec::new();
    collect(v, &mut out);
    out
}

fn collect(v: &Value, out: &mut Vec<ServerVersion>) {
    match v {
        Value::BulkString(b) => {
            if let Some(s) = std::str::from_utf8(b).ok().and_then(ServerVersion::parse) {
                out.push(s);
            }
        }
        Value::VerbatimString { text, .. } | Value::SimpleString(text) => {
            if let Some(s) = ServerVersion::parse(text) {
                out.push(s);
            }
        }
        Value::Array(items) | Value::Set(items) => items.iter().for_each(|i| collect(i, out)),
        Value::Map(pairs) => pairs.iter().for_each(|(_, i)| collect(i, out)),
        _ => {}
    }
}

/// The capabilities all `versions` share (scripts when there are none).
pub(crate) fn common(versions: &[ServerVersion]) -> Caps {
    let mut it = versions.iter().map(ServerVersion::caps);
    match it.next() {
        Some(first) => it.fold(first, Caps::meet),
        None => Caps::SCRIPTS,
    }
}

/// The path in use, readable without a lock: `STALE` until detection ran (and after a
/// connection error), then the detected capabilities.
pub(crate) struct Detected(AtomicU8);

const STALE: u8 = 0x80;

impl Detected {
    pub(crate) fn stale() -> Self {
        Detected(AtomicU8::new(STALE))
    }

    /// The capabilities now, and whether they must be detected again first.
    pub(crate) fn get(&self) -> (Caps, bool) {
        let b = self.0.load(Ordering::Acquire);
        (Caps::from_bits(b & !STALE), b & STALE != 0)
    }

    /// Marks the detection stale (keeping the last capabilities until it runs again: they
    /// are only used after a fresh detection).
    pub(crate) fn invalidate(&self) {
        self.0.fetch_or(STALE, Ordering::AcqRel);
    }

    /// Stores a detection's result; returns the previous capabilities if they differ (for
    /// the log), or `None` on the first detection and when nothing changed.
    pub(crate) fn set(&self, caps: Caps) -> Option<Caps> {
        let old = self.0.swap(caps.bits(), Ordering::AcqRel);
        let prev = Caps::from_bits(old & !STALE);
        (prev != caps).then_some(prev)
    }
}

const SHARDS: usize = 16;

/// One claim this store holds: the token and fingerprint its in-progress record was written
/// with, and until when the entry is worth keeping (the lease plus the record's grace).
#[derive(Clone, Copy)]
struct Entry {
    token: FencingToken,
    fingerprint: Option<Fingerprint>,
    /// The start and renewals its record holds now.
    life: Life,
    until: Instant,
    /// A native comparison failed (a waiter marked the record): the script from now on,
    /// without trying the native command first.
    marked: bool,
}

/// The claims this store holds, so that a native completion, renewal or release can send the
/// whole in-progress record to compare. Entries leave on completion and release; a shard
/// over its bound drops the entries whose record has expired anyway.
pub(crate) struct Held {
    shards: Box<[Mutex<HashMap<MapKey, Entry, KeyHashing>>]>,
}

/// Entries per shard before expired ones are dropped.
const HELD_SWEEP: usize = 4_096;

impl Held {
    pub(crate) fn new() -> Self {
        Held {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(KeyHashing::random())))
                .collect(),
        }
    }

    fn shard(&self, key: &Key) -> &Mutex<HashMap<MapKey, Entry, KeyHashing>> {
        &self.shards[usize::from(key.0[9]) % SHARDS]
    }

    pub(crate) fn insert(
        &self,
        key: &Key,
        token: FencingToken,
        fingerprint: Option<Fingerprint>,
        life: Life,
        lives: Duration,
    ) {
        let now = Instant::now();
        let mut map = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= HELD_SWEEP {
            map.retain(|_, e| e.until > now);
        }
        map.insert(
            MapKey(*key),
            Entry {
                token,
                fingerprint,
                life,
                until: now + lives,
                marked: false,
            },
        );
    }

    /// The fingerprint `key` was claimed with under `token`, and the start and renewals its
    /// record holds, if this store holds that claim.
    pub(crate) fn get(
        &self,
        key: &Key,
        token: FencingToken,
    ) -> Option<(Option<Fingerprint>, Life)> {
        let map = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        map.get(&MapKey(*key))
            .filter(|e| e.token == token && !e.marked)
            .map(|e| (e.fingerprint, e.life))
    }

    /// A native comparison of this claim failed: its record was marked by a waiter (or is no
    /// longer ours); its next operations go to the script directly.
    pub(crate) fn mark(&self, key: &Key, token: FencingToken) {
        let mut map = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get_mut(&MapKey(*key)).filter(|e| e.token == token) {
            e.marked = true;
        }
    }

    /// After a native renewal wrote `life` into the record: the entry holds it, and lives
    /// `lives` from now.
    pub(crate) fn renewed(&self, key: &Key, token: FencingToken, life: Life, lives: Duration) {
        let mut map = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get_mut(&MapKey(*key)).filter(|e| e.token == token) {
            e.life = life;
            e.until = Instant::now() + lives;
        }
    }

    pub(crate) fn remove(&self, key: &Key, token: FencingToken) {
        let mut map = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&MapKey(*key)).is_some_and(|e| e.token == token) {
            map.remove(&MapKey(*key));
        }
    }
}

/// Completions this store wrote recently with a short ttl: a repeat whose first reply was
/// lost, arriving after the record already expired, finds nothing in Redis; this tells it
/// that the completion was stored (and answers `Ok`), where an absent record is otherwise
/// fenced. Bounded by count and age.
pub(crate) struct Recent {
    list: Mutex<VecDeque<(Key, FencingToken, Instant)>>,
}

/// Completions with a ttl at least this long are not remembered: their record outlives any
/// retry of the completion (the runtime retries within the lease).
pub(crate) const RECENT_TTL: Duration = Duration::from_secs(60);
/// How many are remembered, and for how long.
const RECENT_CAP: usize = 4_096;
const RECENT_AGE: Duration = Duration::from_secs(120);

impl Recent {
    pub(crate) fn new() -> Self {
        Recent {
            list: Mutex::new(VecDeque::new()),
        }
    }

    pub(crate) fn completed(&self, key: &Key, token: FencingToken) {
        let now = Instant::now();
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        while list
            .front()
            .is_some_and(|(_, _, at)| now.saturating_duration_since(*at) > RECENT_AGE)
            || list.len() >= RECENT_CAP
        {
            list.pop_front();
        }
        list.push_back((*key, token, now));
    }

    pub(crate) fn contains(&self, key: &Key, token: FencingToken) -> bool {
        let list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        list.iter().rev().any(|(k, t, _)| k == key && *t == token)
    }

    /// Forgets the key's completions: it was removed, so a later completion under an old
    /// token is fenced, not taken for a repeat of one whose record expired.
    pub(crate) fn forget(&self, key: &Key) {
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|(k, _, _)| k != key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> ServerVersion {
        ServerVersion::parse(s).unwrap_or_else(|| panic!("{s:?} does not parse"))
    }

    #[test]
    fn versions_and_paths() {
        let redis70 = parse("# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n");
        assert_eq!(redis70.describe(), "Redis 7.0.15");
        assert_eq!(redis70.caps(), Caps::SCRIPTS);
        let valkey80 = parse(
            "# Server\r\nredis_version:7.2.4\r\nserver_name:valkey\r\nvalkey_version:8.0.1\r\n",
        );
        assert_eq!(valkey80.describe(), "Valkey 8.0.1");
        assert_eq!(valkey80.caps(), Caps::SCRIPTS);
        let valkey81 = parse("redis_version:7.2.4\r\nvalkey_version:8.1.1\r\n");
        assert_eq!(
            valkey81.caps(),
            Caps {
                set_ifeq: true,
                del: Release::Script
            }
        );
        let valkey9 =
            parse("redis_version:7.2.4\r\nserver_name:valkey\r\nvalkey_version:9.0.0\r\n");
        assert_eq!(valkey9.caps().del, Release::DelIfEq);
        let redis84 = parse("redis_version:8.4.0\r\n");
        assert_eq!(
            redis84.caps(),
            Caps {
                set_ifeq: true,
                del: Release::DelEx
            }
        );
        assert_eq!(parse("redis_version:8.2.1\r\n").caps(), Caps::SCRIPTS);
        assert_eq!(parse("redis_version:8.10.0-rc1\r\n").version, (8, 10, 0));
        assert!(ServerVersion::parse("# Server\r\n").is_none());
        assert!(ServerVersion::parse("redis_version:x\r\n").is_none());
    }

    #[test]
    fn a_cluster_uses_what_every_node_has() {
        let v81 = parse("valkey_version:8.1.1\r\n");
        let v9 = parse("valkey_version:9.0.0\r\n");
        let r70 = parse("redis_version:7.0.15\r\n");
        assert!(common(&[v81.clone(), v9.clone()]).set_ifeq);
        assert_eq!(common(&[v81.clone(), v9.clone()]).del, Release::Script);
        assert_eq!(common(&[v81, r70]), Caps::SCRIPTS);
        assert_eq!(common(&[]), Caps::SCRIPTS);
        let reply = Value::Map(vec![
            (
                Value::SimpleString("a".into()),
                Value::BulkString(b"valkey_version:9.0.0\r\n".to_vec()),
            ),
            (
                Value::SimpleString("b".into()),
                Value::VerbatimString {
                    format: ::redis::VerbatimFormat::Text,
                    text: "valkey_version:9.1.2\r\n".into(),
                },
            ),
        ]);
        assert_eq!(versions(&reply).len(), 2);
        assert_eq!(common(&versions(&reply)).del, Release::DelIfEq);
    }

    #[test]
    fn detection_state_round_trips() {
        let d = Detected::stale();
        assert_eq!(d.get(), (Caps::SCRIPTS, true));
        let native = Caps {
            set_ifeq: true,
            del: Release::DelEx,
        };
        assert_eq!(d.set(native), Some(Caps::SCRIPTS));
        assert_eq!(d.get(), (native, false));
        d.invalidate();
        assert_eq!(d.get(), (native, true));
        assert_eq!(d.set(native), None);
    }

    #[test]
    fn held_claims_are_per_token() {
        let held = Held::new();
        let key = Key([3; 32]);
        let fp = Some(Fingerprint([1; 32]));
        let life = Life {
            started_ms: 5.0,
            renewals: 0,
        };
        held.insert(&key, FencingToken(1), fp, life, Duration::from_secs(1));
        assert_eq!(held.get(&key, FencingToken(1)), Some((fp, life)));
        let renewed = Life {
            renewals: 1,
            ..life
        };
        held.renewed(&key, FencingToken(1), renewed, Duration::from_secs(1));
        assert_eq!(held.get(&key, FencingToken(1)), Some((fp, renewed)));
        assert_eq!(held.get(&key, FencingToken(2)), None);
        held.remove(&key, FencingToken(2));
        assert!(held.get(&key, FencingToken(1)).is_some());
        held.mark(&key, FencingToken(1));
        assert_eq!(held.get(&key, FencingToken(1)), None, "marked: the script");
        held.remove(&key, FencingToken(1));
        assert_eq!(held.get(&key, FencingToken(1)), None);
    }

    #[test]
    fn recent_completions_are_bounded() {
        let recent = Recent::new();
        for i in 0..(RECENT_CAP as u64 + 10) {
            recent.completed(&Key([1; 32]), FencingToken(i));
        }
        assert!(!recent.contains(&Key([1; 32]), FencingToken(0)));
        assert!(recent.contains(&Key([1; 32]), FencingToken(RECENT_CAP as u64 + 9)));
        assert!(!recent.contains(&Key([2; 32]), FencingToken(RECENT_CAP as u64 + 9)));
    }

    #[test]
    fn a_removed_key_is_not_a_recent_completion() {
        // Completed, then removed (`forget`): a later completion under the old token finds
        // the record gone and must be fenced, not taken for a lost reply's repeat.
        let recent = Recent::new();
        recent.completed(&Key([1; 32]), FencingToken(7));
        recent.completed(&Key([2; 32]), FencingToken(7));
        recent.forget(&Key([1; 32]));
        assert!(!recent.contains(&Key([1; 32]), FencingToken(7)));
        assert!(recent.contains(&Key([2; 32]), FencingToken(7)));
    }
}
