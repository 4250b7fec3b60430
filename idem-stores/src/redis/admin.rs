//! [`StoreAdmin`] for [`RedisStore`]: `SCAN` over the store's prefix, reading each record's
//! first 64 bytes (`GETRANGE 0 63`: a whole in-progress record, a completed one's header) and
//! `PTTL` in one pipeline per batch. Redis expires records itself (`PX`), so there is nothing
//! to purge; a claim whose lease passed stays for the lease grace, and is counted as
//! expired-unclaimed meanwhile.

use ::redis::aio::ConnectionLike;
use ::redis::{Pipeline, Value};
use std::time::Duration;

use idem_core::{async_trait, StoreAdmin, StoreError, StoreStats};

use super::reply::{self, Record, COMPLETED, IN_PROGRESS, WAITED_ON};
use super::{backend, Conn, RedisStore};

/// Keys asked of each `SCAN` step.
const SCAN_COUNT: usize = 500;

/// `prefix` with Redis glob characters escaped, then `{*}`: every record name of this store.
fn pattern(prefix: &str) -> String {
    let mut p = String::with_capacity(prefix.len() + 4);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push_str("{*}");
    p
}

/// What one record's header and `PTTL` say.
enum Seen {
    /// Live, with its start (ms, server clock) when its record keeps it.
    InProgress(Option<f64>),
    Completed,
    /// An in-progress record past its lease, inside its grace period.
    Lapsed,
    Other,
}

fn classify(header: &Value, pttl: &Value) -> Seen {
    let (Value::BulkString(h), Value::Int(pttl)) = (header, pttl) else {
        return Seen::Other;
    };
    if h.len() < 19 {
        return Seen::Other;
    }
    let kind = &h[..3];
    if kind == COMPLETED {
        return Seen::Completed;
    }
    if kind == IN_PROGRESS || kind == WAITED_ON {
        let mut grace = [0u8; 8];
        grace.copy_from_slice(&h[11..19]);
        let grace_ms = f64::from_be_bytes(grace);
        // A record without an expiry (PTTL -1) was not written by idem: count it as live.
        return if *pttl < 0 || (*pttl as f64) > grace_ms {
            let started = match reply::record(idem_core::Bytes::copy_from_slice(h)) {
                Ok(Record::InProgress {
                    life: Some(life), ..
                }) if life.started_ms > 0.0 => Some(life.started_ms),
                _ => None,
            };
            Seen::InProgress(started)
        } else {
            Seen::Lapsed
        };
    }
    Seen::Other
}

impl RedisStore {
    async fn scan_step(&self, cursor: u64, pattern: &str) -> Result<(u64, Vec<Value>), StoreError> {
        let mut cmd = ::redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let reply = self.send("redis scan", &cmd).await?;
        let bad = || StoreError::Corrupt("unexpected SCAN reply".into());
        let Value::Array(mut parts) = reply else {
            return Err(bad());
        };
        if parts.len() != 2 {
            return Err(bad());
        }
        let keys = match parts.pop() {
            Some(Value::Array(keys)) => keys,
            _ => return Err(bad()),
        };
        let next = match parts.pop() {
            Some(Value::BulkString(c)) => std::str::from_utf8(&c)
                .ok()
                .and_then(|c| c.parse().ok())
                .ok_or_else(bad)?,
            _ => return Err(bad()),
        };
        Ok((next, keys))
    }

    async fn headers(&self, keys: &[Value]) -> Result<Vec<Value>, StoreError> {
        let mut pipe = Pipeline::new();
        for k in keys {
            let Value::BulkString(name) = k else { continue };
            pipe.cmd("GETRANGE").arg(name.as_slice()).arg(0).arg(63);
            pipe.cmd("PTTL").arg(name.as_slice());
        }
        let n = pipe.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let timeout = self.inner.command_timeout;
        let run = async {
            match &self.inner.conn {
                Conn::Single(c) => c.clone().req_packed_commands(&pipe, 0, n).await,
                Conn::Cluster(c) => c.clone().req_packed_commands(&pipe, 0, n).await,
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(backend("redis stats", e, timeout)),
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }
}

#[async_trait]
impl StoreAdmin for RedisStore {
    /// Counts this store's records (its prefix) by state with `SCAN`, with the age of the
    /// oldest live claim (on the server's clock as this client estimates it; claims written
    /// before records kept their start have none) and the claims whose lease passed that
    /// nobody took over (kept by Redis for the lease grace, then deleted). Redis keeps no
    /// expired record: `expired` is `None`. On a Redis Cluster, a `SCAN` reaches one node
    /// only: the counts are that node's.
    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let pattern = pattern(&self.inner.prefix);
        let (mut in_progress, mut completed, mut lapsed) = (0u64, 0u64, 0u64);
        let mut oldest: Option<f64> = None;
        let mut cursor = 0u64;
        loop {
            let (next, keys) = self.scan_step(cursor, &pattern).await?;
            let replies = self.headers(&keys).await?;
            for pair in replies.chunks(2) {
                if let [header, pttl] = pair {
                    match classify(header, pttl) {
                        Seen::InProgress(started) => {
                            in_progress += 1;
                            if let Some(at) = started {
                                oldest = Some(oldest.map_or(at, |o| o.min(at)));
                            }
                        }
                        Seen::Completed => completed += 1,
                        Seen::Lapsed => lapsed += 1,
                        Seen::Other => {}
                    }
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let oldest = match (oldest, self.inner.clock.now_late()) {
            (Some(at), Some(now)) => Some(Duration::from_millis((now - at).max(0.0) as u64)),
            _ => None,
        };
        Ok(StoreStats::new(in_progress, completed, None, oldest)
            .with_expired_unclaimed(Some(lapsed)))
    }

    /// Redis expires records itself (`PX`): always `Ok(0)`.
    async fn purge_expired(&self, _batch: u32) -> Result<u64, StoreError> {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_escapes_globs() {
        assert_eq!(pattern("idem:"), "idem:{*}");
        assert_eq!(pattern("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\{*}");
    }
}
