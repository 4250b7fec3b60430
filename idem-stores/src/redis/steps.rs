//! Durable steps on Redis: one hash per call, beside the call's record.
//!
//! # Layout
//!
//! - **Key**: the record's name followed by `:steps`, `{prefix}{<key hex>}:steps`. Redis hashes
//!   a key by its first `{…}` (the prefix has no braces), so a call's steps live in the same
//!   Cluster slot as its record, and one script can read the record and write the steps. The
//!   name does not end with `}`, so the store's `SCAN` of its records (`{prefix}{*}`, see
//!   `admin.rs`) never counts it.
//! - **Field**: the step's name, `#`, its occurrence in decimal (`charge#0`, `line#12`). A name
//!   may contain `#` (or anything else): the occurrence is what follows the *last* `#`, and
//!   it has no `#` of its own, so every field decodes to one step.
//! - **Value**: the status code (one byte, [`StepStatus::code`]: 1 started, 2 done, 3 failed),
//!   then the runtime's envelope, as it gave it.
//! - **Expiry**: the hash's own (`PEXPIRE`), the longest of its steps' ttls: a write that
//!   would shorten it leaves it as it is, so a step lives at least its ttl (every step of a
//!   call is written with the call's ttl, so a step outlives its own ttl by at most the time
//!   between it and the call's last step).
//!
//! # The calls
//!
//! - **put_step**: [`PUT_STEP`], one script over both keys: the record must be in progress
//!   under the caller's token (the comparison the completion script makes, a waiter's mark
//!   included), then `HSET` and `PEXPIRE … GT` (`NX` for a new hash). Otherwise
//!   nothing is written and the answer is fenced. A replace, so a retry is harmless.
//! - **clear_step**: [`CLEAR_STEP`], the same comparison, then `HDEL`.
//! - **load_steps**: one `HGETALL`, whatever the record's state.
//! - **remove**: the record and its steps in one `DEL` (the removal script).
//!
//! There is no native (`IFEQ`) path: a step write reads one key and writes another.

use std::sync::LazyLock;
use std::time::Duration;

use ::redis::{Cmd, RedisWrite, Script, ToRedisArgs, Value};
use idem_core::{Bytes, FencingToken, Key, StepId, StepRecord, StepStatus, StoreError};

use super::scripts::Lua;
use super::{millis, reply, server_error, RedisStore};

/// What the steps key's name adds to the record's.
const SUFFIX: &[u8] = b":steps";

/// `put_step(KEYS[1] record, KEYS[2] steps; held, field, value, ttl_ms)` → 1 written, 0
/// fenced (the record is absent, completed, foreign, or held under another token), -1 the
/// steps key holds something other than a hash. `held` is `i2p` and the token, as for the
/// completion script, which this comparison copies: the record's first 11 bytes are `held`,
/// or `held` with its third byte `w` (a waiter marked the claim; it is still the caller's).
/// The hash's expiry is only ever extended: `PEXPIRE … GT` (one command in the common case,
/// a later write of the call's same ttl), then `PEXPIRE … NX` when that changed nothing (a
/// hash this write created has no expiry yet, which `GT` counts as infinite; one with a longer
/// expiry keeps it). `GT`/`NX` need Redis ≥ 7.0 (Valkey ≥ 7.2), as the claim does.
pub(crate) const PUT_STEP: &str = r#"
local v = redis.pcall('GET', KEYS[1])
if type(v) ~= 'string' or #v < 20 then return 0 end
local h = string.sub(v, 1, 11)
if h ~= ARGV[1] and h ~= 'i2w' .. string.sub(ARGV[1], 4) then return 0 end
local s = KEYS[2]
local r = redis.pcall('HSET', s, ARGV[2], ARGV[3])
if type(r) == 'table' then return -1 end
if redis.call('PEXPIRE', s, ARGV[4], 'GT') == 0 then redis.call('PEXPIRE', s, ARGV[4], 'NX') end
return 1
"#;

/// `clear_step(KEYS[1] record, KEYS[2] steps; held, field)` → 1 removed (or absent), 0
/// fenced, -1 the steps key holds something other than a hash. The comparison is
/// [`PUT_STEP`]'s.
pub(crate) const CLEAR_STEP: &str = r#"
local v = redis.pcall('GET', KEYS[1])
if type(v) ~= 'string' or #v < 20 then return 0 end
local h = string.sub(v, 1, 11)
if h ~= ARGV[1] and h ~= 'i2w' .. string.sub(ARGV[1], 4) then return 0 end
local r = redis.pcall('HDEL', KEYS[2], ARGV[2])
if type(r) == 'table' then return -1 end
return 1
"#;

fn lua(source: &str) -> Lua {
    Lua {
        source: source.to_owned(),
        sha: Script::new(source).get_hash().to_owned(),
    }
}

/// The step scripts, with their hashes computed once per process.
static PUT: LazyLock<Lua> = LazyLock::new(|| lua(PUT_STEP));
static CLEAR: LazyLock<Lua> = LazyLock::new(|| lua(CLEAR_STEP));

/// The name of the hash holding the steps of the call whose record is named `record`.
pub(crate) fn steps_name(record: &[u8]) -> Vec<u8> {
    let mut name = Vec::with_capacity(record.len() + SUFFIX.len());
    name.extend_from_slice(record);
    name.extend_from_slice(SUFFIX);
    name
}

/// A step's field: its name, `#`, its occurrence in decimal.
pub(crate) fn field(id: &StepId) -> Vec<u8> {
    let mut buf = [0u8; 20];
    let occ = reply::decimal(u64::from(id.occurrence), &mut buf);
    let mut f = Vec::with_capacity(id.name.len() + 1 + occ.len());
    f.extend_from_slice(id.name.as_bytes());
    f.push(b'#');
    f.extend_from_slice(occ);
    f
}

fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::Corrupt(what.into())
}

/// The step a field names (the inverse of [`field`]).
pub(crate) fn parse_field(f: &[u8]) -> Result<StepId, StoreError> {
    let bad = || {
        corrupt(format!(
            "redis steps: the field {:?} is not a step's name#occurrence",
            String::from_utf8_lossy(f)
        ))
    };
    let at = f.iter().rposition(|&b| b == b'#').ok_or_else(bad)?;
    let (name, occ) = (&f[..at], &f[at + 1..]);
    // Canonical decimal only (no sign, no leading zero but "0"), so one step has one field.
    if occ.is_empty() || !occ.iter().all(u8::is_ascii_digit) || (occ.len() > 1 && occ[0] == b'0') {
        return Err(bad());
    }
    let occurrence = std::str::from_utf8(occ)
        .ok()
        .and_then(|o| o.parse::<u32>().ok())
        .ok_or_else(bad)?;
    let name = std::str::from_utf8(name).map_err(|_| bad())?;
    Ok(StepId::new(name, occurrence))
}

/// A step's stored value, written straight into the command: the status code, then the
/// envelope (one copy, into the command's buffer).
struct Stored<'a> {
    code: u8,
    value: &'a [u8],
}

impl ToRedisArgs for Stored<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        use std::io::Write;
        let mut w = out.writer_for_next_arg();
        // Writing into the command's own buffer cannot fail.
        let _ = w.write_all(&[self.code]);
        let _ = w.write_all(self.value);
    }
}

/// A stored value's step record (its bytes are a slice of the reply's buffer, not a copy).
fn record(id: StepId, stored: Vec<u8>) -> Result<StepRecord, StoreError> {
    let Some(&code) = stored.first() else {
        return Err(corrupt(format!(
            "redis steps: the step {id} has an empty value"
        )));
    };
    let status = StepStatus::from_code(code).ok_or_else(|| {
        corrupt(format!(
            "redis steps: the step {id} has an unknown status code {code}"
        ))
    })?;
    Ok(StepRecord::new(id, status, Bytes::from(stored).slice(1..)))
}

/// The steps in an `HGETALL` reply (an array of fields and values, or a RESP3 map).
pub(crate) fn records(v: Value) -> Result<Vec<StepRecord>, StoreError> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Array(items) => {
            if items.len() % 2 != 0 {
                return Err(corrupt("redis steps: an odd HGETALL reply"));
            }
            let mut it = items.into_iter();
            let mut pairs = Vec::with_capacity(it.len() / 2);
            while let (Some(f), Some(v)) = (it.next(), it.next()) {
                pairs.push((f, v));
            }
            pairs
        }
        Value::Map(pairs) => pairs,
        Value::Nil => Vec::new(),
        Value::ServerError(e) if e.code() == "WRONGTYPE" => {
            return Err(corrupt(
                "redis steps: the steps key holds something other than a hash",
            ))
        }
        Value::ServerError(e) => return Err(server_error("redis load steps", e)),
        other => {
            return Err(corrupt(format!(
                "redis steps: unexpected HGETALL reply {other:?}"
            )))
        }
    };
    pairs
        .into_iter()
        .map(|(f, v)| match (f, v) {
            (Value::BulkString(f), Value::BulkString(v)) => record(parse_field(&f)?, v),
            (f, v) => Err(corrupt(format!(
                "redis steps: unexpected field {f:?} or value {v:?}"
            ))),
        })
        .collect()
}

/// Decodes a step script's reply.
fn written(v: &Value) -> Result<(), StoreError> {
    match v {
        Value::Int(-1) => Err(corrupt(
            "redis steps: the steps key holds something other than a hash",
        )),
        v => reply::fenced(v).map(drop),
    }
}

impl RedisStore {
    /// Runs a script on `keys` (one Cluster slot) by its hash, or by its source when the
    /// server does not know it yet; `args` writes the arguments (`nargs` of them, `data`
    /// bytes in all, to size the command).
    pub(crate) async fn eval_keys(
        &self,
        what: &'static str,
        lua: &Lua,
        keys: &[&[u8]],
        (nargs, data): (usize, usize),
        args: impl Fn(&mut Cmd),
    ) -> Result<Value, StoreError> {
        let data = data + keys.iter().map(|k| k.len()).sum::<usize>();
        let build = |by_source: bool| {
            let (verb, body) = if by_source {
                ("EVAL", lua.source.as_str())
            } else {
                ("EVALSHA", lua.sha.as_str())
            };
            // Sized once: no regrowth while the arguments are written.
            let mut cmd =
                Cmd::with_capacity(3 + keys.len() + nargs, verb.len() + body.len() + data + 4);
            cmd.arg(verb).arg(body).arg(keys.len());
            for k in keys {
                cmd.arg(*k);
            }
            args(&mut cmd);
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

    pub(crate) async fn steps_load(&self, key: &Key) -> Result<Vec<StepRecord>, StoreError> {
        let steps = steps_name(&self.name(key));
        let mut cmd = Cmd::with_capacity(2, steps.len() + 8);
        cmd.arg("HGETALL").arg(&steps[..]);
        records(self.send("redis load steps", &cmd).await?)
    }

    pub(crate) async fn steps_put(
        &self,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let limit = self.inner.max_value_size;
        if step.value.len() > limit {
            return Err(StoreError::TooLarge {
                size: step.value.len(),
                limit,
            });
        }
        let record = self.name(key);
        let steps = steps_name(&record);
        let held = reply::held(token);
        let field = field(&step.id);
        let stored = Stored {
            code: step.status.code(),
            value: &step.value,
        };
        let mut ttl_buf = [0u8; 20];
        let ttl = reply::decimal(millis(ttl).max(1), &mut ttl_buf);
        let data = held.len() + field.len() + 1 + step.value.len() + ttl.len();
        let v = self
            .eval_keys(
                "redis put step",
                &PUT,
                &[&record, &steps],
                (4, data),
                |cmd| {
                    cmd.arg(&held[..]).arg(&field[..]).arg(&stored).arg(ttl);
                },
            )
            .await?;
        written(&v)
    }

    pub(crate) async fn steps_clear(
        &self,
        key: &Key,
        token: FencingToken,
        id: &StepId,
    ) -> Result<(), StoreError> {
        let record = self.name(key);
        let steps = steps_name(&record);
        let held = reply::held(token);
        let field = field(id);
        let v = self
            .eval_keys(
                "redis clear step",
                &CLEAR,
                &[&record, &steps],
                (2, held.len() + field.len()),
                |cmd| {
                    cmd.arg(&held[..]).arg(&field[..]);
                },
            )
            .await?;
        written(&v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_whatever_the_name() {
        for (name, occ) in [
            ("charge", 0),
            ("line", 12),
            ("a#1", 0),
            ("#", 7),
            ("", 0),
            ("é#x#", u32::MAX),
            ("ends#", 3),
        ] {
            let id = StepId::new(name, occ);
            let f = field(&id);
            assert_eq!(parse_field(&f).ok(), Some(id.clone()), "{id}");
        }
        assert_eq!(field(&StepId::new("charge", 0)), b"charge#0");
        assert_eq!(field(&StepId::new("a#1", 0)), b"a#1#0");
    }

    #[test]
    fn malformed_fields_are_corrupt() {
        for f in [
            &b"no-occurrence"[..],
            b"x#",
            b"x#01",
            b"x#-1",
            b"x#+1",
            b"x#4294967296",
            b"x#1a",
            b"\xff#1",
        ] {
            assert!(
                matches!(parse_field(f), Err(StoreError::Corrupt(_))),
                "{}",
                String::from_utf8_lossy(f)
            );
        }
    }

    #[test]
    fn an_hgetall_reply_decodes_in_both_protocols() {
        let s = |b: &[u8]| Value::BulkString(b.to_vec());
        let flat = Value::Array(vec![s(b"charge#0"), s(b"\x02ok"), s(b"mail#1"), s(b"\x01")]);
        let mut got = records(flat).unwrap_or_default();
        got.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(
            got,
            vec![
                StepRecord::new(StepId::new("charge", 0), StepStatus::Done, &b"ok"[..]),
                StepRecord::new(StepId::new("mail", 1), StepStatus::Started, &b""[..]),
            ]
        );
        let map = Value::Map(vec![(s(b"x#0"), s(b"\x03e"))]);
        assert_eq!(
            records(map).ok(),
            Some(vec![StepRecord::new(
                StepId::new("x", 0),
                StepStatus::Failed,
                &b"e"[..]
            )])
        );
        assert_eq!(records(Value::Array(vec![])).ok(), Some(vec![]));
        for bad in [
            Value::Array(vec![s(b"x#0")]),
            Value::Array(vec![s(b"x#0"), s(b"")]),
            Value::Array(vec![s(b"x#0"), s(b"\x09v")]),
            Value::Array(vec![Value::Int(1), s(b"\x02v")]),
            Value::Int(3),
        ] {
            assert!(matches!(records(bad), Err(StoreError::Corrupt(_))));
        }
    }

    #[test]
    fn the_steps_key_shares_the_records_hash_tag() {
        let record = super::super::key_name("p:", &Key([0x5a; 32]));
        let steps = steps_name(&record);
        assert!(steps.starts_with(&record));
        assert_eq!(&steps[record.len()..], b":steps");
        assert_ne!(
            steps.last(),
            Some(&b'}'),
            "not matched by the records' SCAN"
        );
    }

    #[test]
    fn a_stored_value_is_the_code_then_the_envelope() {
        let mut cmd = Cmd::new();
        cmd.arg(&Stored {
            code: 2,
            value: b"abc",
        });
        let packed = cmd.get_packed_command();
        assert!(packed.ends_with(b"$4\r\n\x02abc\r\n"), "{packed:?}");
    }
}
