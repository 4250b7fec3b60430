//! Decoding the scripts' replies. Anything unexpected is [`StoreError::Corrupt`], never a panic.

use std::time::Duration;

use ::redis::Value;
use idem_core::{Claim, CompletedRecord, FencingToken, Fingerprint, RecordState, StoreError};

/// What the `get` script saw.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Looked {
    /// Absent or lapsed.
    None,
    /// In progress under a live lease.
    InProgress {
        token: FencingToken,
        fingerprint: Option<Fingerprint>,
        remaining: Duration,
    },
    /// Completed and unexpired.
    Completed(CompletedRecord),
}

impl Looked {
    pub(crate) fn into_state(self) -> Option<RecordState> {
        match self {
            Looked::None => None,
            Looked::InProgress {
                token, fingerprint, ..
            } => Some(RecordState::InProgress { token, fingerprint }),
            Looked::Completed(rec) => Some(RecordState::Completed(rec)),
        }
    }
}

fn corrupt(why: impl Into<String>) -> StoreError {
    StoreError::Corrupt(why.into())
}

fn items(v: &Value) -> Result<&[Value], StoreError> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(corrupt(format!("unexpected script reply {other:?}"))),
    }
}

fn bytes(v: Option<&Value>) -> Result<&[u8], StoreError> {
    match v {
        Some(Value::BulkString(b)) => Ok(b),
        Some(Value::SimpleString(s)) => Ok(s.as_bytes()),
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

fn tag(items: &[Value]) -> Result<&[u8], StoreError> {
    bytes(items.first())
}

fn fingerprint(v: Option<&Value>) -> Result<Option<Fingerprint>, StoreError> {
    let b = bytes(v)?;
    if b.is_empty() {
        return Ok(None);
    }
    Fingerprint::from_slice(b).map(Some).ok_or_else(|| {
        corrupt(format!(
            "the record's fingerprint is {} bytes, not 32",
            b.len()
        ))
    })
}

fn remaining(v: Option<&Value>) -> Result<Duration, StoreError> {
    Ok(Duration::from_millis(u64::try_from(int(v)?).unwrap_or(0)))
}

fn token(v: Option<&Value>) -> Result<FencingToken, StoreError> {
    std::str::from_utf8(bytes(v)?)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(FencingToken)
        .ok_or_else(|| corrupt("the record's token is not a decimal integer"))
}

fn corrupt_reply(items: &[Value]) -> StoreError {
    let why = bytes(items.get(1))
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_else(|_| "unreadable record".into());
    corrupt(format!("redis record: {why}"))
}

fn completed(items: &[Value]) -> Result<CompletedRecord, StoreError> {
    Ok(CompletedRecord::new(
        fingerprint(items.get(1))?,
        bytes(items.get(2))?.to_vec(),
        Some(remaining(items.get(3))?),
    ))
}

/// Decodes the claim script's reply.
pub(crate) fn claim(v: &Value) -> Result<Claim, StoreError> {
    let items = items(v)?;
    match tag(items)? {
        b"acquired" => Ok(Claim::Acquired {
            taken_over: int(items.get(1))? != 0,
        }),
        b"completed" => Ok(Claim::Completed(completed(items)?)),
        b"in_progress" => Ok(Claim::InProgress {
            fingerprint: fingerprint(items.get(1))?,
            lease_remaining: Some(remaining(items.get(2))?),
        }),
        b"corrupt" => Err(corrupt_reply(items)),
        other => Err(corrupt(format!(
            "unknown claim reply {:?}",
            String::from_utf8_lossy(other)
        ))),
    }
}

/// Decodes the get script's reply.
pub(crate) fn look(v: &Value) -> Result<Looked, StoreError> {
    let items = items(v)?;
    match tag(items)? {
        b"none" => Ok(Looked::None),
        b"completed" => Ok(Looked::Completed(completed(items)?)),
        b"in_progress" => Ok(Looked::InProgress {
            fingerprint: fingerprint(items.get(1))?,
            remaining: remaining(items.get(2))?,
            token: token(items.get(3))?,
        }),
        b"corrupt" => Err(corrupt_reply(items)),
        other => Err(corrupt(format!(
            "unknown get reply {:?}",
            String::from_utf8_lossy(other)
        ))),
    }
}

/// Decodes a fenced script's reply: 1 applied, 0 fenced.
pub(crate) fn fenced(v: &Value) -> Result<(), StoreError> {
    match v {
        Value::Int(1) => Ok(()),
        Value::Int(0) => Err(StoreError::Fenced),
        other => Err(corrupt(format!("unexpected fenced reply {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(b: &[u8]) -> Value {
        Value::BulkString(b.to_vec())
    }

    #[test]
    fn decodes_every_claim_answer() {
        let acquired = Value::Array(vec![s(b"acquired"), Value::Int(1)]);
        assert_eq!(
            claim(&acquired).ok(),
            Some(Claim::Acquired { taken_over: true })
        );
        let done = Value::Array(vec![s(b"completed"), s(&[7; 32]), s(b"v"), Value::Int(9)]);
        assert_eq!(
            claim(&done).ok(),
            Some(Claim::Completed(CompletedRecord::new(
                Some(Fingerprint([7; 32])),
                b"v".to_vec(),
                Some(Duration::from_millis(9))
            )))
        );
        let busy = Value::Array(vec![s(b"in_progress"), s(b""), Value::Int(250)]);
        assert_eq!(
            claim(&busy).ok(),
            Some(Claim::InProgress {
                fingerprint: None,
                lease_remaining: Some(Duration::from_millis(250))
            })
        );
    }

    #[test]
    fn garbage_is_corrupt_not_a_panic() {
        let cases = [
            Value::Nil,
            Value::Int(3),
            Value::Array(vec![]),
            Value::Array(vec![Value::Nil]),
            Value::Array(vec![s(b"completed"), s(b"short fp"), s(b"v")]),
            Value::Array(vec![s(b"completed"), s(b"")]),
            Value::Array(vec![s(b"in_progress"), s(b""), s(b"soon")]),
            Value::Array(vec![s(b"corrupt"), s(b"the key holds a string")]),
            Value::Array(vec![s(b"what")]),
        ];
        for v in &cases {
            assert!(matches!(claim(v), Err(StoreError::Corrupt(_))), "{v:?}");
            assert!(matches!(look(v), Err(StoreError::Corrupt(_))), "{v:?}");
        }
        let bad_token = Value::Array(vec![s(b"in_progress"), s(b""), Value::Int(1), s(b"x1")]);
        assert!(matches!(look(&bad_token), Err(StoreError::Corrupt(_))));
        assert!(matches!(fenced(&Value::Nil), Err(StoreError::Corrupt(_))));
        assert!(matches!(fenced(&Value::Int(0)), Err(StoreError::Fenced)));
    }
}
