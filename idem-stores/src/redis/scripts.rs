//! The Lua scripts: every store operation is one script on one key, run atomically by Redis.
//!
//! A record is a hash at `{prefix}{<key hex>}`:
//!
//! | field | meaning |
//! |---|---|
//! | `s` | state: `p` (in progress) or `c` (completed) |
//! | `t` | the holder's fencing token, decimal (in progress only) |
//! | `f` | the fingerprint, 32 raw bytes, or empty for none |
//! | `d` | deadline in ms of the server's clock: lease end (`p`) or expiry (`c`) |
//! | `v` | the encoded value (completed only) |
//!
//! Times come from `redis.call('TIME')`, so processes with skewed clocks agree. Redis's own
//! `PEXPIRE` removes records (an in-progress record lives `lease + grace`, so that a takeover
//! can be told from a fresh claim); the scripts also compare `d` with the server's time, so a
//! record that Redis has not expired yet is never replayed or honoured late.
//!
//! Tokens are compared as strings: Lua numbers are doubles and would round a 63-bit token.
//! Scripts that free or complete a record publish its key hex on the store's channel, which
//! wakes waiters in every process (see `notify.rs`).

use ::redis::Script;

/// Shared prologue: `now` in ms of the server's clock, and `look()`, which reads the record
/// and returns its state or an error reply for data that is not a record.
const PRELUDE: &str = r#"
local k = KEYS[1]
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local function look()
  local ty = redis.call('TYPE', k)['ok']
  if ty == 'none' then return 'none' end
  if ty ~= 'hash' then return nil, 'the key holds a ' .. tostring(ty) .. ', not a record hash' end
  local r = redis.call('HMGET', k, 's', 't', 'f', 'd', 'v')
  local d = tonumber(r[4])
  if d == nil then return nil, 'the record has no valid deadline field' end
  if r[1] == 'p' then
    if not r[2] then return nil, 'an in-progress record has no token' end
  elseif r[1] == 'c' then
    if not r[5] then return nil, 'a completed record has no value' end
    if not r[2] then return nil, 'a completed record has no token' end
  else
    return nil, 'the record has no valid state field'
  end
  return r[1], r, d
end
"#;

/// `claim(KEYS[1]; token, fingerprint, lease_ms, grace_ms)` →
/// `{'acquired', taken_over 0/1}` | `{'completed', fp, value}` |
/// `{'in_progress', fp, remaining_ms}` | `{'corrupt', why}`.
const CLAIM: &str = r#"
local s, r, d = look()
if s == nil then return {'corrupt', r} end
local taken = 0
if s ~= 'none' then
  if now < d then
    if s == 'c' then return {'completed', r[3] or '', r[5], d - now} end
    if r[2] ~= ARGV[1] then return {'in_progress', r[3] or '', d - now} end
  elseif s == 'p' then
    taken = 1
  end
  if s == 'p' and r[2] == ARGV[1] then taken = 0 end
  redis.call('DEL', k)
end
local lease = tonumber(ARGV[3])
redis.call('HSET', k, 's', 'p', 't', ARGV[1], 'f', ARGV[2], 'd', string.format('%d', now + lease))
redis.call('PEXPIRE', k, string.format('%d', lease + tonumber(ARGV[4])))
return {'acquired', taken}
"#;

/// `complete(KEYS[1]; token, value, ttl_ms, channel, key_hex)` → 1, or 0 when fenced.
const COMPLETE: &str = r#"
local s, r = look()
if s == 'c' and r[2] == ARGV[1] then return 1 end
if s ~= 'p' or r[2] ~= ARGV[1] then return 0 end
local ttl = tonumber(ARGV[3])
redis.call('HSET', k, 's', 'c', 'v', ARGV[2], 'd', string.format('%d', now + ttl))
if ttl > 0 then
  redis.call('PEXPIRE', k, string.format('%d', ttl))
else
  redis.call('DEL', k)
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"#;

/// `release(KEYS[1]; token, channel, key_hex)` → 1 (also when the record is not ours).
const RELEASE: &str = r#"
local s, r = look()
if s ~= 'p' or r[2] ~= ARGV[1] then return 1 end
redis.call('DEL', k)
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"#;

/// `renew(KEYS[1]; token, lease_ms, grace_ms)` → 1, or 0 when fenced.
const RENEW: &str = r#"
local s, r = look()
if s ~= 'p' or r[2] ~= ARGV[1] then return 0 end
local lease = tonumber(ARGV[2])
redis.call('HSET', k, 'd', string.format('%d', now + lease))
redis.call('PEXPIRE', k, string.format('%d', lease + tonumber(ARGV[3])))
return 1
"#;

/// `get(KEYS[1])` → `{'none'}` | `{'in_progress', fp, remaining_ms, token}` |
/// `{'completed', fp, value}` | `{'corrupt', why}`. A lapsed record reads as `none`.
const GET: &str = r#"
local s, r, d = look()
if s == nil then return {'corrupt', r} end
if s == 'none' or now >= d then return {'none'} end
if s == 'c' then return {'completed', r[3] or '', r[5], d - now} end
return {'in_progress', r[3] or '', d - now, r[2]}
"#;

/// `remove(KEYS[1]; channel, key_hex)` → 1.
const REMOVE: &str = r#"
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"#;

/// The compiled scripts (each knows its SHA1; `EVALSHA` first, `SCRIPT LOAD` on `NOSCRIPT`).
pub(crate) struct Scripts {
    pub(crate) claim: Script,
    pub(crate) complete: Script,
    pub(crate) release: Script,
    pub(crate) renew: Script,
    pub(crate) get: Script,
    pub(crate) remove: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        let with_prelude = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            claim: with_prelude(CLAIM),
            complete: with_prelude(COMPLETE),
            release: with_prelude(RELEASE),
            renew: with_prelude(RENEW),
            get: with_prelude(GET),
            remove: Script::new(REMOVE),
        }
    }
}
