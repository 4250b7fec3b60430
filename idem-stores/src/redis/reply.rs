//! Encoding v2 records and decoding records and script replies. Anything unexpected is
//! [`StoreError::Corrupt`], never a panic. Values are handed out as slices of the reply's own
//! buffer ([`Bytes`]), never copied.

use std::time::Duration;

use ::redis::Value;
use idem_core::{
    Bytes, Claim, ClaimTimes, CompletedRecord, FencingToken, Fingerprint, RecordState, StoreError,
};

/// The header of an in-progress record.
pub(crate) const IN_PROGRESS: &[u8; 3] = b"i2p";
/// The header of an in-progress record that a waiter has looked at.
pub(crate) const WAITED_ON: &[u8; 3] = b"i2w";
/// The header of a completed record.
pub(crate) const COMPLETED: &[u8; 3] = b"i2c";
/// Bytes before the fingerprint: header, token, grace or expiry, fingerprint length.
const FIXED: usize = 20;
/// Bytes after an in-progress record's fingerprint: the claim's start (f64 ms, the server's
/// clock as the claiming client estimated it, never late) and the renewals (u32). A record
/// written before they were kept ends with its fingerprint.
pub(crate) const TAIL: usize = 12;

/// What an in-progress record says of its claim beyond the token and the fingerprint.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Life {
    /// When the claim was made, in ms of the server's clock (0: the client had no reading).
    pub(crate) started_ms: f64,
    /// How many times its holder renewed it.
    pub(crate) renewals: u32,
}

/// An in-progress record, as the claim writes it (and a renewal rewrites it).
pub(crate) fn in_progress(
    token: FencingToken,
    grace_ms: u64,
    fp: Option<&Fingerprint>,
    life: Life,
) -> Vec<u8> {
    let mut r = Vec::with_capacity(FIXED + 32 + TAIL);
    r.extend_from_slice(IN_PROGRESS);
    r.extend_from_slice(&token.0.to_be_bytes());
    r.extend_from_slice(&(grace_ms as f64).to_be_bytes());
    match fp {
        Some(fp) => {
            r.push(32);
            r.extend_from_slice(&fp.0);
        }
        None => r.push(0),
    }
    r.extend_from_slice(&life.started_ms.to_be_bytes());
    r.extend_from_slice(&life.renewals.to_be_bytes());
    r
}

/// The part of an in-progress record that a completion keeps: the fingerprint's length and
/// the fingerprint (what follows the first 19 bytes, without the claim's start and renewals).
pub(crate) fn kept_on_completion(claimed: &[u8]) -> &[u8] {
    let end = claimed.get(FIXED - 1).map_or(claimed.len(), |&n| {
        (FIXED + usize::from(n)).min(claimed.len())
    });
    &claimed[(FIXED - 1).min(end)..end]
}

/// The first 11 bytes of the in-progress record a claim under `token` wrote (`i2p`, token):
/// what complete, release and renew compare the record with.
pub(crate) fn held(token: FencingToken) -> [u8; 11] {
    let mut h = [0u8; 11];
    h[..3].copy_from_slice(IN_PROGRESS);
    h[3..].copy_from_slice(&token.0.to_be_bytes());
    h
}

/// The first 19 bytes of a record completed under `token` (`i2c`, token, expiry); the
/// completion script appends the fingerprint and the value.
pub(crate) fn completed_head(token: FencingToken, expiry_ms: f64) -> [u8; 19] {
    let mut h = [0u8; 19];
    h[..3].copy_from_slice(COMPLETED);
    h[3..11].copy_from_slice(&token.0.to_be_bytes());
    h[11..].copy_from_slice(&expiry_ms.to_be_bytes());
    h
}

/// `n` in decimal, without allocating: the digits are the tail of `buf`.
pub(crate) fn decimal(n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut n = n;
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// A v2 record, parsed.
#[derive(Debug, PartialEq)]
pub(crate) enum Record {
    InProgress {
        token: FencingToken,
        fingerprint: Option<Fingerprint>,
        /// `None` for a record written before claims kept their start and renewals.
        life: Option<Life>,
    },
    Completed {
        fingerprint: Option<Fingerprint>,
        /// Expiry in ms of the server's clock.
        expiry_ms: f64,
        value: Bytes,
    },
}

fn corrupt(why: impl Into<String>) -> StoreError {
    StoreError::Corrupt(why.into())
}

/// Parses a v2 record (the reply of `SET … GET`, or a script's).
pub(crate) fn record(b: Bytes) -> Result<Record, StoreError> {
    if b.len() < FIXED {
        return Err(corrupt(
            "redis record: the key holds a string that is not an idem record",
        ));
    }
    let header = &b[..3];
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[at..at + 8]);
        w
    };
    let token = FencingToken(u64::from_be_bytes(word(3)));
    let time = f64::from_be_bytes(word(11));
    let fp_len = usize::from(b[19]);
    let fingerprint = match fp_len {
        0 => None,
        32 if b.len() >= FIXED + 32 => Fingerprint::from_slice(&b[FIXED..FIXED + 32]),
        n => {
            return Err(corrupt(format!(
                "redis record: the fingerprint is {n} bytes, not 32"
            )))
        }
    };
    if !time.is_finite() {
        return Err(corrupt("redis record: its time field is not a number"));
    }
    match header {
        h if h == IN_PROGRESS || h == WAITED_ON => {
            let at = FIXED + fp_len;
            let life = match b.len() - at {
                0 => None,
                TAIL => {
                    let started_ms = f64::from_be_bytes(word(at));
                    if !started_ms.is_finite() {
                        return Err(corrupt("redis record: its start is not a number"));
                    }
                    let mut n = [0u8; 4];
                    n.copy_from_slice(&b[at + 8..at + TAIL]);
                    Some(Life {
                        started_ms,
                        renewals: u32::from_be_bytes(n),
                    })
                }
                _ => {
                    return Err(corrupt(
                        "redis record: an in-progress record has trailing bytes",
                    ))
                }
            };
            Ok(Record::InProgress {
                token,
                fingerprint,
                life,
            })
        }
        h if h == COMPLETED => Ok(Record::Completed {
            fingerprint,
            expiry_ms: time,
            value: b.slice(FIXED + fp_len..),
        }),
        _ => Err(corrupt(
            "redis record: the key holds a string that is not an idem record",
        )),
    }
}

/// The bytes of a string reply, shared (not copied).
pub(crate) fn bulk(v: Value) -> Result<Bytes, StoreError> {
    match v {
        Value::BulkString(b) => Ok(Bytes::from(b)),
        Value::SimpleString(s) => Ok(Bytes::from(s.into_bytes())),
        other => Err(corrupt(format!(
            "expected a string in the reply, got {other:?}"
        ))),
    }
}

fn int(v: Option<&Value>) -> Result<i64, StoreError> {
    match v {
        Some(Value::Int(i)) => Ok(*i),
        other => Err(corrupt(format!(
            "expected an integer in the reply, got {other:?}"
        ))),
    }
}

fn ms(v: Option<&Value>) -> Result<Duration, StoreError> {
    Ok(Duration::from_millis(u64::try_from(int(v)?).unwrap_or(0)))
}

fn take(items: &mut [Value], at: usize) -> Result<Bytes, StoreError> {
    match items.get_mut(at) {
        Some(v) => bulk(std::mem::take(v)),
        None => Err(corrupt("a short script reply")),
    }
}

fn fingerprint(b: &[u8]) -> Result<Option<Fingerprint>, StoreError> {
    if b.is_empty() {
        return Ok(None);
    }
    Fingerprint::from_slice(b).map(Some).ok_or_else(|| {
        corrupt(format!(
            "redis record: the fingerprint is {} bytes, not 32",
            b.len()
        ))
    })
}

fn token_decimal(b: &[u8]) -> Result<FencingToken, StoreError> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(FencingToken)
        .ok_or_else(|| corrupt("redis record: the v1 token is not a decimal integer"))
}

/// What the claim and look scripts saw.
#[derive(Debug, PartialEq)]
pub(crate) enum Looked {
    /// Absent or lapsed.
    None,
    /// Acquired by the claim script.
    Acquired { taken_over: bool },
    /// In progress under a live lease.
    InProgress {
        /// `None` for a v1 record read by the claim script (which does not return it).
        token: Option<FencingToken>,
        fingerprint: Option<Fingerprint>,
        remaining: Duration,
        /// The claim's start and renewals, when its record keeps them.
        life: Option<Life>,
    },
    /// Completed and unexpired.
    Completed(CompletedRecord),
}

impl Looked {
    /// The record's state; `now_ms`, the server's clock as this client estimates it (never
    /// behind), gives a claim its age.
    pub(crate) fn into_state(self, now_ms: Option<f64>) -> Result<Option<RecordState>, StoreError> {
        Ok(match self {
            Looked::None => None,
            Looked::InProgress {
                token: Some(token),
                fingerprint,
                remaining,
                life,
            } => {
                let age = match (life, now_ms) {
                    (Some(l), Some(now)) if l.started_ms > 0.0 => {
                        Some(Duration::from_millis((now - l.started_ms).max(0.0) as u64))
                    }
                    _ => None,
                };
                Some(RecordState::InProgress {
                    token,
                    fingerprint,
                    times: ClaimTimes::new(
                        age,
                        Some(remaining),
                        life.map(|l| u64::from(l.renewals)),
                    ),
                })
            }
            Looked::Completed(rec) => Some(RecordState::Completed(rec)),
            other => return Err(corrupt(format!("unexpected look {other:?}"))),
        })
    }

    pub(crate) fn into_claim(self) -> Result<Claim, StoreError> {
        Ok(match self {
            Looked::Acquired { taken_over } => Claim::Acquired { taken_over },
            Looked::InProgress {
                fingerprint,
                remaining,
                ..
            } => Claim::InProgress {
                fingerprint,
                lease_remaining: Some(remaining),
            },
            Looked::Completed(rec) => Claim::Completed(rec),
            Looked::None => return Err(corrupt("the claim script answered none")),
        })
    }
}

/// Decodes the claim or look script's reply.
pub(crate) fn looked(v: Value) -> Result<Looked, StoreError> {
    let mut items = match v {
        Value::Array(items) => items,
        other => return Err(corrupt(format!("unexpected script reply {other:?}"))),
    };
    let tag = take(&mut items, 0)?;
    match &tag[..] {
        b"none" => Ok(Looked::None),
        b"acquired" => Ok(Looked::Acquired {
            taken_over: int(items.get(1))? != 0,
        }),
        b"v2" => {
            let left = ms(items.get(2))?;
            match record(take(&mut items, 1)?)? {
                Record::InProgress {
                    token,
                    fingerprint,
                    life,
                } => Ok(Looked::InProgress {
                    token: Some(token),
                    fingerprint,
                    remaining: left,
                    life,
                }),
                Record::Completed {
                    fingerprint, value, ..
                } => Ok(Looked::Completed(CompletedRecord::new(
                    fingerprint,
                    value,
                    Some(left),
                ))),
            }
        }
        b"v1c" => Ok(Looked::Completed(CompletedRecord::new(
            fingerprint(&take(&mut items, 1)?)?,
            take(&mut items, 2)?,
            Some(ms(items.get(3))?),
        ))),
        b"v1p" => {
            let token = match items.get(3) {
                Some(_) => Some(token_decimal(&take(&mut items, 3)?)?),
                None => None,
            };
            Ok(Looked::InProgress {
                token,
                fingerprint: fingerprint(&take(&mut items, 1)?)?,
                remaining: ms(items.get(2))?,
                life: None,
            })
        }
        b"corrupt" => {
            let why = take(&mut items, 1)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|_| "unreadable record".into());
            Err(corrupt(format!("redis record: {why}")))
        }
        other => Err(corrupt(format!(
            "unknown script reply {:?}",
            String::from_utf8_lossy(other)
        ))),
    }
}

/// Decodes a fenced script's reply: a positive integer applied, 0 fenced.
pub(crate) fn fenced(v: &Value) -> Result<i64, StoreError> {
    match v {
        Value::Int(0) => Err(StoreError::Fenced),
        Value::Int(n) if *n > 0 => Ok(*n),
        other => Err(corrupt(format!("unexpected fenced reply {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(b: &[u8]) -> Value {
        Value::BulkString(b.to_vec())
    }

    fn completed(fp: Option<&Fingerprint>, value: &[u8]) -> Vec<u8> {
        let mut r = in_progress(FencingToken(7), 0, fp, Life::default());
        r.truncate(r.len() - TAIL);
        r[..3].copy_from_slice(COMPLETED);
        r[11..19].copy_from_slice(&1e12f64.to_be_bytes());
        r.extend_from_slice(value);
        r
    }

    #[test]
    fn heads_and_numbers() {
        let t = FencingToken(0x0102_0304_0506_0708);
        let mut c = completed(None, b"");
        c[3..11].copy_from_slice(&t.0.to_be_bytes());
        assert_eq!(&completed_head(t, 1e12)[..], &c[..19]);
        assert_eq!(
            &held(t)[..],
            &in_progress(t, 5, None, Life::default())[..11]
        );
        let mut buf = [0u8; 20];
        for n in [0, 7, 10, 300_000, u64::MAX] {
            assert_eq!(decimal(n, &mut buf), n.to_string().as_bytes());
        }
    }

    #[test]
    fn records_round_trip() {
        let fp = Fingerprint([9; 32]);
        let life = Life {
            started_ms: 1.7e12,
            renewals: 3,
        };
        let r = in_progress(FencingToken(u64::MAX >> 1), 60_000, Some(&fp), life);
        assert_eq!(kept_on_completion(&r), &r[19..52]);
        assert_eq!(
            record(Bytes::from(r.clone())).ok(),
            Some(Record::InProgress {
                token: FencingToken(u64::MAX >> 1),
                fingerprint: Some(fp),
                life: Some(life),
            })
        );
        // A record written before claims kept their start and renewals: still read, with
        // those unknown.
        let old = Bytes::copy_from_slice(&r[..r.len() - TAIL]);
        assert_eq!(
            record(old).ok(),
            Some(Record::InProgress {
                token: FencingToken(u64::MAX >> 1),
                fingerprint: Some(fp),
                life: None,
            })
        );
        let bare = in_progress(FencingToken(1), 1, None, life);
        assert_eq!(kept_on_completion(&bare), &[0u8][..]);
        let c = completed(None, b"value");
        match record(Bytes::from(c)) {
            Ok(Record::Completed {
                fingerprint: None,
                value,
                expiry_ms,
            }) => {
                assert_eq!(&value[..], b"value");
                assert_eq!(expiry_ms, 1e12);
            }
            other => panic!("{other:?}"),
        }
        // An empty value is a value.
        assert!(matches!(
            record(Bytes::from(completed(Some(&fp), b""))),
            Ok(Record::Completed { value, .. }) if value.is_empty()
        ));
    }

    #[test]
    fn decodes_every_script_answer() {
        let acquired = Value::Array(vec![s(b"acquired"), Value::Int(1)]);
        assert_eq!(
            looked(acquired).and_then(Looked::into_claim).ok(),
            Some(Claim::Acquired { taken_over: true })
        );
        let done = Value::Array(vec![s(b"v2"), s(&completed(None, b"v")), Value::Int(9)]);
        assert_eq!(
            looked(done).and_then(Looked::into_claim).ok(),
            Some(Claim::Completed(CompletedRecord::new(
                None,
                b"v".to_vec(),
                Some(Duration::from_millis(9))
            )))
        );
        let v1 = Value::Array(vec![s(b"v1c"), s(&[7; 32]), s(b"v"), Value::Int(9)]);
        assert_eq!(
            looked(v1).and_then(Looked::into_claim).ok(),
            Some(Claim::Completed(CompletedRecord::new(
                Some(Fingerprint([7; 32])),
                b"v".to_vec(),
                Some(Duration::from_millis(9))
            )))
        );
        let busy = Value::Array(vec![s(b"v1p"), s(b""), Value::Int(250)]);
        assert_eq!(
            looked(busy).and_then(Looked::into_claim).ok(),
            Some(Claim::InProgress {
                fingerprint: None,
                lease_remaining: Some(Duration::from_millis(250))
            })
        );
    }

    #[test]
    fn garbage_is_corrupt_not_a_panic() {
        let mut short_fp = completed(None, b"v");
        short_fp[19] = 3;
        let mut nan = completed(None, b"v");
        nan[11..19].copy_from_slice(&f64::NAN.to_be_bytes());
        let mut trailing = in_progress(FencingToken(1), 1, None, Life::default());
        trailing.push(0);
        let mut cut = in_progress(FencingToken(1), 1, None, Life::default());
        cut.pop();
        let mut nan_start = in_progress(FencingToken(1), 1, None, Life::default());
        nan_start[20..28].copy_from_slice(&f64::NAN.to_be_bytes());
        for b in [
            &b""[..],
            b"i2p",
            b"i2c0123456789abcdef",
            b"xyzxxxxxxxxxxxxxxxxxxxxxxx",
            &short_fp,
            &nan,
            &trailing,
            &cut,
            &nan_start,
        ] {
            assert!(
                matches!(
                    record(Bytes::copy_from_slice(b)),
                    Err(StoreError::Corrupt(_))
                ),
                "{b:?}"
            );
        }
        let cases = [
            Value::Nil,
            Value::Int(3),
            Value::Array(vec![]),
            Value::Array(vec![Value::Nil]),
            Value::Array(vec![s(b"v1c"), s(b"short fp"), s(b"v"), Value::Int(1)]),
            Value::Array(vec![s(b"v1c"), s(b"")]),
            Value::Array(vec![s(b"v1p"), s(b""), s(b"soon")]),
            Value::Array(vec![s(b"v2"), s(b"garbage"), Value::Int(1)]),
            Value::Array(vec![s(b"corrupt"), s(b"the key holds a set")]),
            Value::Array(vec![s(b"what")]),
        ];
        for v in cases {
            let shown = format!("{v:?}");
            assert!(matches!(looked(v), Err(StoreError::Corrupt(_))), "{shown}");
        }
        let bad_token = Value::Array(vec![s(b"v1p"), s(b""), Value::Int(1), s(b"x1")]);
        assert!(matches!(looked(bad_token), Err(StoreError::Corrupt(_))));
        assert!(matches!(fenced(&Value::Nil), Err(StoreError::Corrupt(_))));
        assert!(matches!(fenced(&Value::Int(0)), Err(StoreError::Fenced)));
    }
}
