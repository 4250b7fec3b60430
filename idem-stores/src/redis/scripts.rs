//! Record format v2 and the few Lua scripts that need a comparison.
//!
//! # The record
//!
//! One binary-safe **string** per key, at `{prefix}{<key hex>}` (the same name as a v1 record,
//! see *Upgrading* below). All integers are big-endian.
//!
//! | bytes | in progress (`i2p`) | completed (`i2c`) |
//! |---|---|---|
//! | 0..3 | `i2p`, or `i2w` once a waiter looked | `i2c` |
//! | 3..11 | the holder's fencing token (u64) | the token it was completed under |
//! | 11..19 | the grace (f64 ms) the record outlives its lease by | the expiry (f64 ms, server clock, as the completing client estimated it, never late) |
//! | 19 | fingerprint length: 0 or 32 | same |
//! | 20.. | the fingerprint | the fingerprint, then the encoded value |
//!
//! **Leases are Redis's own expiry.** An in-progress record is written with
//! `PX lease + grace`, so the holder's lease has `PTTL - grace` left, on the server's clock and
//! with no `TIME` call. A completed record is written with `PX ttl`: Redis never returns it past
//! its expiry. The expiry stored in it lets a replay that came back from the claim's `SET … GET`
//! report its remaining ttl without a second command; both ends estimate the server's clock
//! from periodic `TIME` readings, the writer never late and the reader never early, so the
//! reported ttl can be short by a round trip, never long.
//!
//! # The calls
//!
//! - **claim**: `SET k <in-progress record> NX PX <lease+grace> GET`, no script. Nil → acquired;
//!   a completed record → replay (one round trip); an in-progress record, or a `WRONGTYPE` error
//!   (a v1 hash, or foreign data) → [`CLAIM`], which decides conflict / own-token retry /
//!   takeover atomically.
//! - **complete**, **release**, **renew**: one short script each, with no shared prologue (a
//!   script's cost grows with what it defines). The client sends the header it holds (`i2p`
//!   and its token), which the script compares with the record's first 11 bytes, and, to
//!   complete, the completed record's head (`i2c`, token, expiry): the script only appends the
//!   fingerprint and the value. The channel is derived from the key's name, and only a
//!   marked (`i2w`) record's completion or release uses it.
//! - **get** (and waiters): [`LOOK`]. A waiter's look marks the in-progress record (`i2p` →
//!   `i2w`, `SETRANGE`, which keeps the expiry), and only a marked record's completion or
//!   release is published: with nobody waiting, a call publishes nothing. A waiter registers
//!   locally before its look, so the publish that follows a mark cannot be missed.
//!
//! # Upgrading from v1
//!
//! v1 kept a *hash* under the same key name. v2 reads v1 hashes (replays their values, respects
//! their live leases, takes over lapsed ones) in [`CLAIM`] and [`LOOK`]; v1's scripts see a v2
//! string as foreign data and fail closed. So while v1 and v2 instances share one Redis, no key
//! is executed twice: the worst a v1 instance does is answer an error for a key that a v2
//! instance wrote. Scripts publish the key hex on `{prefix}notify`, as v1 did.

use ::redis::Script;

/// Reads the record at `k` as a v2 string (`'v2', value`), a v1 hash (`'v1'`), nothing
/// (`'none'`), or something else (`nil, why`).
const PRELUDE: &str = r#"
local k = KEYS[1]
local function read()
  local v = redis.pcall('GET', k)
  if v == false then return 'none' end
  if type(v) == 'string' then
    local h = string.sub(v, 1, 3)
    if (h == 'i2p' or h == 'i2w' or h == 'i2c') and string.len(v) >= 20 then return 'v2', v end
    return nil, 'the key holds a string that is not an idem record'
  end
  local ty = redis.call('TYPE', k)['ok']
  if ty == 'hash' then return 'v1' end
  return nil, 'the key holds a ' .. tostring(ty) .. ', not an idem record'
end
local function now_ms()
  local tm = redis.call('TIME')
  return tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
end
local function v2_lease_left(v)
  return redis.call('PTTL', k) - struct.unpack('>d', v, 12)
end
-- A v1 hash: its state, token, fingerprint, ms left (lease or ttl) and value, or nil, why.
local function v1()
  local r = redis.call('HMGET', k, 's', 't', 'f', 'd', 'v')
  local d = tonumber(r[4])
  if d == nil then return nil, 'the v1 record has no valid deadline field' end
  if r[1] == 'p' then
    if not r[2] then return nil, 'an in-progress v1 record has no token' end
  elseif r[1] == 'c' then
    if not r[5] then return nil, 'a completed v1 record has no value' end
  else
    return nil, 'the v1 record has no valid state field'
  end
  return r[1], r[2], r[3] or '', d - now_ms(), r[5]
end
"#;

/// `claim(KEYS[1]; record, token, lease_ms, grace_ms)`, after the native `SET NX GET` found
/// something → `{'acquired', taken_over 0/1}` | `{'v2', record, ms_left}` (completed: ttl
/// left; in progress: lease left) | `{'v1c', fp, value, ms_left}` | `{'v1p', fp, ms_left}` |
/// `{'corrupt', why}`.
pub(crate) const CLAIM: &str = r#"
local kind, v = read()
if kind == nil then return {'corrupt', v} end
local px = tonumber(ARGV[3]) + tonumber(ARGV[4])
local taken = 0
local rec = ARGV[1]
if kind == 'v2' then
  local st = string.sub(v, 3, 3)
  if st == 'c' then return {'v2', v, redis.call('PTTL', k)} end
  if string.sub(v, 4, 11) ~= ARGV[2] then
    local left = v2_lease_left(v)
    if left > 0 then return {'v2', v, left} end
    taken = 1
  end
  -- Waiters of the replaced claim keep being woken by the new holder's completion.
  if st == 'w' then rec = 'i2w' .. string.sub(rec, 4) end
elseif kind == 'v1' then
  local s, t, f, left, val = v1()
  if s == nil then return {'corrupt', t} end
  if left > 0 then
    if s == 'c' then return {'v1c', f, val, left} end
    return {'v1p', f, left}
  end
  if s == 'p' then taken = 1 end
  redis.call('DEL', k)
end
redis.call('SET', k, rec, 'PX', string.format('%d', px))
return {'acquired', taken}
"#;

/// `complete(KEYS[1]; held, head, value, ttl_ms)` → 1 (applied, or already completed under
/// this token), 0 when fenced, or 2 when the key is absent (fenced too, unless the client
/// knows it completed this key under this token and the record has expired since). `held` is `i2p` and the token (the first 11 bytes of the
/// record the claim wrote); `head` is the completed record's first 19 bytes, built by the
/// client: `i2c`, the token, and the expiry (f64 ms), the client's estimate of the server's
/// clock plus the ttl, never late (see `ServerClock`), so the script calls no `TIME`, which
/// costs more inside a script than the rest of it. The script appends the fingerprint (the
/// rest of the in-progress record) and the value.
///
/// The common case costs one comparison: Lua interns its strings, and the record's first 11
/// bytes are the same string as `held`. The other headers (`i2w`: a waiter marked it, so the
/// completion is published on `{prefix}notify`, the channel's name being the key's minus its
/// `{<hex>}`; `i2c`: a repeat after a lost reply) are built only when that comparison fails.
pub(crate) const COMPLETE: &str = r#"
local k = KEYS[1]
local v = redis.pcall('GET', k)
if v == false then return 2 end
if type(v) ~= 'string' or #v < 20 then return 0 end
local h = string.sub(v, 1, 11)
if h == ARGV[1] then
  redis.call('SET', k, ARGV[2] .. string.sub(v, 20) .. ARGV[3], 'PX', ARGV[4])
  return 1
end
local t = string.sub(ARGV[1], 4)
if h == 'i2c' .. t then return 1 end
if h ~= 'i2w' .. t then return 0 end
redis.call('SET', k, ARGV[2] .. string.sub(v, 20) .. ARGV[3], 'PX', ARGV[4])
redis.call('PUBLISH', string.sub(k, 1, -67) .. 'notify', string.sub(k, -65, -2))
return 1
"#;

/// `release(KEYS[1]; held)` → 1 (also when the record is gone or not ours). `held` as for
/// [`COMPLETE`].
pub(crate) const RELEASE: &str = r#"
local k = KEYS[1]
local v = redis.pcall('GET', k)
if type(v) ~= 'string' or #v < 20 then return 1 end
local h = string.sub(v, 1, 11)
if h == ARGV[1] then
  redis.call('DEL', k)
elseif h == 'i2w' .. string.sub(ARGV[1], 4) then
  redis.call('DEL', k)
  redis.call('PUBLISH', string.sub(k, 1, -67) .. 'notify', string.sub(k, -65, -2))
end
return 1
"#;

/// `renew(KEYS[1]; held, lease_ms)` → 1, or 0 when fenced. `held` as for [`COMPLETE`]; the
/// grace comes from the record.
pub(crate) const RENEW: &str = r#"
local k = KEYS[1]
local v = redis.pcall('GET', k)
if type(v) ~= 'string' or #v < 20 then return 0 end
local h = string.sub(v, 1, 11)
if h ~= ARGV[1] and h ~= 'i2w' .. string.sub(ARGV[1], 4) then return 0 end
redis.call('PEXPIRE', k, string.format('%d', tonumber(ARGV[2]) + struct.unpack('>d', v, 12)))
return 1
"#;

/// `look(KEYS[1]; mark)`: with `mark` = `1` (a waiter), a live in-progress record is marked
/// as waited on. → `{'none'}` | `{'v2', record, ms_left}` | `{'v1c', fp, value, ms_left}` |
/// `{'v1p', fp, ms_left, token}` | `{'corrupt', why}`. A lapsed lease reads as `none`.
pub(crate) const LOOK: &str = r#"
local kind, v = read()
if kind == nil then return {'corrupt', v} end
if kind == 'none' then return {'none'} end
if kind == 'v2' then
  if string.sub(v, 3, 3) == 'c' then return {'v2', v, redis.call('PTTL', k)} end
  local left = v2_lease_left(v)
  if left <= 0 then return {'none'} end
  if ARGV[1] == '1' and string.sub(v, 3, 3) == 'p' then redis.call('SETRANGE', k, 2, 'w') end
  return {'v2', v, left}
end
local s, t, f, left, val = v1()
if s == nil then return {'corrupt', t} end
if left <= 0 then return {'none'} end
if s == 'c' then return {'v1c', f, val, left} end
return {'v1p', f, left, t}
"#;

/// `remove(KEYS[1] record, KEYS[2] its steps; channel)` → 1: one `DEL` of both. Always
/// publishes (an administrator's removal is rare).
pub(crate) const REMOVE: &str = r#"
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', ARGV[1], string.sub(KEYS[1], -65, -2))
return 1
"#;

/// One script: its source (sent with `EVAL` when the server answers `NOSCRIPT`) and its SHA1
/// (sent with `EVALSHA`).
pub(crate) struct Lua {
    pub(crate) source: String,
    pub(crate) sha: String,
}

impl Lua {
    fn new(source: String) -> Self {
        let sha = Script::new(&source).get_hash().to_owned();
        Lua { source, sha }
    }

    fn with_prelude(body: &str) -> Self {
        Lua::new(format!("{PRELUDE}{body}"))
    }
}

/// The scripts, with their hashes computed once per store.
pub(crate) struct Scripts {
    pub(crate) claim: Lua,
    pub(crate) complete: Lua,
    pub(crate) release: Lua,
    pub(crate) renew: Lua,
    pub(crate) look: Lua,
    pub(crate) remove: Lua,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Scripts {
            claim: Lua::with_prelude(CLAIM),
            complete: Lua::new(COMPLETE.to_owned()),
            release: Lua::new(RELEASE.to_owned()),
            renew: Lua::new(RENEW.to_owned()),
            look: Lua::with_prelude(LOOK),
            remove: Lua::new(REMOVE.to_owned()),
        }
    }
}
