//! Codecs and the record envelope.
//!
//! A stored value is an *envelope*: `b"idem"`, a format byte, the type tag (codec, `version`
//! and the Rust type name, length-prefixed) and the codec's payload. Replay checks the tag
//! before decoding, so a record written for another return type, codec or version is
//! [`crate::Error::IncompatibleRecord`], and bytes that are not an
//! envelope at all are [`crate::Error::Codec`] — never a garbled value.
//!
//! The default codec is MessagePack ([`MsgPack`], `rmp-serde`): maintained, compact, and
//! self-describing enough for every serde feature (`untagged`, `flatten`,
//! `skip_serializing_if`), so any `T: Serialize + DeserializeOwned` that round-trips through
//! serde round-trips through idem. Structs are written as maps (field names included), which
//! costs a few bytes and keeps records readable after fields are added or reordered.
//! `bincode` is not offered: its last release is a tombstone and postcard-style formats fail
//! at *replay* time on self-describing serde features.

use serde::{de::DeserializeOwned, Serialize};

use crate::error::{CodecError, Error};

/// Turns values into bytes and back. Implement it to plug in another format.
///
/// ```
/// use idem_core::codec::{Codec, MsgPack};
/// let bytes = MsgPack.encode(&(1u8, "two")).unwrap();
/// let back: (u8, String) = MsgPack.decode(&bytes).unwrap();
/// assert_eq!(back, (1, "two".to_string()));
/// ```
pub trait Codec: Send + Sync + 'static {
    /// A short stable name, part of every record's type tag.
    const NAME: &'static str;
    /// Encodes a value.
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, CodecError>;
    /// Decodes a value.
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError>;
}

/// MessagePack through `rmp-serde`, structs as maps. The default codec.
#[derive(Clone, Copy, Debug, Default)]
pub struct MsgPack;

impl Codec for MsgPack {
    const NAME: &'static str = "msgpack";

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::new();
        value
            .serialize(&mut rmp_serde::Serializer::new(&mut out).with_struct_map())
            .map_err(|e| CodecError::Encode {
                codec: Self::NAME,
                source: Box::new(e),
            })?;
        Ok(out)
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        rmp_serde::from_slice(bytes).map_err(|e| CodecError::Decode {
            codec: Self::NAME,
            source: Box::new(e),
        })
    }
}

/// JSON through `serde_json` (feature `json`): larger, but readable in the store.
#[cfg(feature = "json")]
#[derive(Clone, Copy, Debug, Default)]
pub struct Json;

#[cfg(feature = "json")]
impl Codec for Json {
    const NAME: &'static str = "json";

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        serde_json::to_vec(value).map_err(|e| CodecError::Encode {
            codec: Self::NAME,
            source: Box::new(e),
        })
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        serde_json::from_slice(bytes).map_err(|e| CodecError::Decode {
            codec: Self::NAME,
            source: Box::new(e),
        })
    }
}

const MAGIC: &[u8; 4] = b"idem";
const FORMAT: u8 = 1;

/// The type tag of a record: codec, version and type name.
///
/// ```
/// let tag = idem_core::codec::type_tag::<Vec<u8>>("msgpack", 2);
/// assert!(tag.starts_with("msgpack;v2;"));
/// ```
pub fn type_tag<T: ?Sized>(codec: &str, version: u32) -> String {
    format!("{codec};v{version};{}", std::any::type_name::<T>())
}

/// Wraps an encoded payload in an envelope with its tag.
pub fn seal(tag: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 3 + tag.len() + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(FORMAT);
    // Tags are type names: far below 64 KiB. Longer ones are cut (they still compare equal
    // for equal types, since the cut is deterministic).
    let tag = &tag.as_bytes()[..tag.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(tag.len() as u16).to_le_bytes());
    out.extend_from_slice(tag);
    out.extend_from_slice(payload);
    out
}

/// Opens an envelope: checks the magic and the tag, returns the payload.
pub fn open<'a>(expected_tag: &str, envelope: &'a [u8]) -> Result<&'a [u8], Error> {
    let corrupt = |why: &str| Error::Codec(CodecError::Corrupt(why.to_string()));
    let rest = envelope
        .strip_prefix(MAGIC.as_slice())
        .ok_or_else(|| corrupt("not an idem record (bad magic)"))?;
    let (&format, rest) = rest
        .split_first()
        .ok_or_else(|| corrupt("truncated record"))?;
    if format != FORMAT {
        return Err(corrupt("unknown record format"));
    }
    if rest.len() < 2 {
        return Err(corrupt("truncated record"));
    }
    let (len, rest) = rest.split_at(2);
    let len = u16::from_le_bytes([len[0], len[1]]) as usize;
    if rest.len() < len {
        return Err(corrupt("truncated record"));
    }
    let (tag, payload) = rest.split_at(len);
    let expected = &expected_tag.as_bytes()[..expected_tag.len().min(u16::MAX as usize)];
    if tag != expected {
        return Err(Error::IncompatibleRecord {
            expected: expected_tag.to_string(),
            found: String::from_utf8_lossy(tag).into_owned(),
        });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip_and_mismatch() {
        let tag = type_tag::<u32>(MsgPack::NAME, 0);
        let env = seal(&tag, &MsgPack.encode(&7u32).unwrap());
        let payload = open(&tag, &env).unwrap();
        assert_eq!(MsgPack.decode::<u32>(payload).unwrap(), 7);
        let other = type_tag::<String>(MsgPack::NAME, 0);
        assert!(matches!(
            open(&other, &env),
            Err(Error::IncompatibleRecord { .. })
        ));
        let v1 = type_tag::<u32>(MsgPack::NAME, 1);
        assert!(matches!(
            open(&v1, &env),
            Err(Error::IncompatibleRecord { .. })
        ));
    }

    #[test]
    fn garbage_is_a_codec_error() {
        let tag = type_tag::<u32>(MsgPack::NAME, 0);
        for bad in [
            &b""[..],
            b"idem",
            b"idem\x01\xff\xff",
            b"garbage!",
            b"idem\x09\x00\x00",
        ] {
            assert!(matches!(open(&tag, bad), Err(Error::Codec(_))), "{bad:?}");
        }
    }
}
