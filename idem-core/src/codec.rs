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

/// The type tag of a record: codec, version and type name, as `"{codec};v{version};{type}"`.
///
/// Built and compared piece by piece, without allocating, since every call builds one.
///
/// ```
/// use idem_core::codec::TypeTag;
/// let tag = TypeTag::of::<Vec<u8>>("msgpack", 2);
/// assert_eq!(tag.to_string(), "msgpack;v2;alloc::vec::Vec<u8>");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeTag {
    codec: &'static str,
    version: u32,
    type_name: &'static str,
}

impl TypeTag {
    /// The tag of records of type `T`.
    pub fn of<T: ?Sized>(codec: &'static str, version: u32) -> Self {
        TypeTag {
            codec,
            version,
            type_name: std::any::type_name::<T>(),
        }
    }

    fn version_digits(&self, buf: &mut [u8; 10]) -> usize {
        let mut v = self.version;
        let mut n = 0;
        loop {
            buf[9 - n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                return n;
            }
        }
    }

    /// The tag's bytes, as sealed: cut at 64 KiB (type names are far shorter; the cut is
    /// deterministic, so equal types still compare equal).
    fn for_each_piece(&self, mut f: impl FnMut(&[u8])) {
        let mut buf = [0u8; 10];
        let n = self.version_digits(&mut buf);
        let pieces: [&[u8]; 5] = [
            self.codec.as_bytes(),
            b";v",
            &buf[10 - n..],
            b";",
            self.type_name.as_bytes(),
        ];
        let mut room = u16::MAX as usize;
        for p in pieces {
            let p = &p[..p.len().min(room)];
            room -= p.len();
            f(p);
        }
    }

    fn sealed_len(&self) -> usize {
        let mut len = 0;
        self.for_each_piece(|p| len += p.len());
        len
    }

    fn matches(&self, mut stored: &[u8]) -> bool {
        let mut equal = true;
        self.for_each_piece(|p| match stored.strip_prefix(p) {
            Some(rest) if equal => stored = rest,
            _ => equal = false,
        });
        equal && stored.is_empty()
    }
}

impl std::fmt::Display for TypeTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{};v{};{}", self.codec, self.version, self.type_name)
    }
}

/// The type tag of records of type `T`, as a string.
///
/// ```
/// let tag = idem_core::codec::type_tag::<Vec<u8>>("msgpack", 2);
/// assert!(tag.starts_with("msgpack;v2;"));
/// ```
pub fn type_tag<T: ?Sized>(codec: &'static str, version: u32) -> String {
    TypeTag::of::<T>(codec, version).to_string()
}

/// Wraps an encoded payload in an envelope with its tag.
pub fn seal(tag: &TypeTag, payload: &[u8]) -> Vec<u8> {
    let len = tag.sealed_len();
    let mut out = Vec::with_capacity(MAGIC.len() + 3 + len + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(FORMAT);
    out.extend_from_slice(&(len as u16).to_le_bytes());
    tag.for_each_piece(|p| out.extend_from_slice(p));
    out.extend_from_slice(payload);
    out
}

/// Opens an envelope: checks the magic and the tag, returns the payload.
pub fn open<'a>(expected: &TypeTag, envelope: &'a [u8]) -> Result<&'a [u8], Error> {
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
    if !expected.matches(tag) {
        return Err(Error::IncompatibleRecord {
            expected: expected.to_string(),
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
        let tag = TypeTag::of::<u32>(MsgPack::NAME, 0);
        let env = seal(&tag, &MsgPack.encode(&7u32).unwrap());
        let payload = open(&tag, &env).unwrap();
        assert_eq!(MsgPack.decode::<u32>(payload).unwrap(), 7);
        let other = TypeTag::of::<String>(MsgPack::NAME, 0);
        assert!(matches!(
            open(&other, &env),
            Err(Error::IncompatibleRecord { .. })
        ));
        let v1 = TypeTag::of::<u32>(MsgPack::NAME, 1);
        let v10 = TypeTag::of::<u32>(MsgPack::NAME, 10);
        assert!(matches!(
            open(&v10, &env),
            Err(Error::IncompatibleRecord { .. })
        ));
        let env10 = seal(&v10, b"");
        assert!(open(&v10, &env10).is_ok());
        assert!(matches!(
            open(&v1, &env10),
            Err(Error::IncompatibleRecord { .. })
        ));
        assert_eq!(
            &env10[7..7 + v10.to_string().len()],
            v10.to_string().as_bytes()
        );
        assert!(matches!(
            open(&v1, &env),
            Err(Error::IncompatibleRecord { .. })
        ));
    }

    #[test]
    fn garbage_is_a_codec_error() {
        let tag = TypeTag::of::<u32>(MsgPack::NAME, 0);
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
