//! Codecs and the record envelope.
//!
//! A stored value is an *envelope*: `b"idem"`, a format byte, the compatibility tag
//! (length-prefixed) and the codec's payload. The tag says what decides whether a record is
//! readable by a build: the codec, the user's `version`, and optionally a schema name the user
//! pins ([`TypeTag::with_schema`]). It never holds a Rust path or anything else the compiler
//! makes up, so moving or renaming the return type, or upgrading the toolchain, keeps every
//! live record readable (see `docs/records.md` for the deploy rules). Replay checks the tag
//! before decoding: a record written under another codec, `version` or schema is
//! [`crate::Error::IncompatibleRecord`]; bytes that are not an envelope at all are
//! [`crate::Error::Codec`] — never a garbled value.
//!
//! Formats: `1` (until 2026-11) put `std::any::type_name` in the tag, `"{codec};v{version};{type}"`;
//! it is still read, its type part ignored. `2` (written now) is `"{codec};v{version}"`, or
//! `"{codec};v{version};schema={name}"` with a pinned schema.
//!
//! The default codec is MessagePack ([`MsgPack`], `rmp-serde`): maintained, compact, and
//! self-describing enough for every serde feature (`untagged`, `flatten`,
//! `skip_serializing_if`), so any `T: Serialize + DeserializeOwned` that round-trips through
//! serde round-trips through idem. Structs are written as maps (field names included), which
//! costs a few bytes and keeps records readable after fields are added or reordered.
//!
//! [`Bincode`] (feature `bincode`, opt-in, never the default) is bincode 2.x: more compact, for
//! plain data types that never change shape without a `version` bump. bincode's last release
//! (3.0) is a tombstone, and like every format without field names it cannot read back
//! `#[serde(flatten)]`, `#[serde(untagged)]` or `skip_serializing_if`: this codec refuses
//! such types with a [`CodecError`] (never a wrong value). See its page for when to choose it.

use serde::{de::DeserializeOwned, Serialize};

use crate::error::{CodecError, Error};

#[cfg(feature = "bincode")]
mod bincode;
#[cfg(feature = "bincode")]
#[cfg_attr(docsrs, doc(cfg(feature = "bincode")))]
pub use self::bincode::{Bincode, Unsupported};

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
    /// Encodes a value at the end of `out`: the runtime writes a record's envelope and its
    /// value into one buffer this way. On an error, what was appended is unspecified (the
    /// caller discards `out`). The default appends [`encode`](Self::encode)'s bytes; a codec
    /// that can write into a `Vec` directly saves an allocation and a copy per stored call.
    ///
    /// ```
    /// use idem_core::codec::{Codec, MsgPack};
    /// let mut out = b"head".to_vec();
    /// MsgPack.encode_into(&7u8, &mut out).unwrap();
    /// assert_eq!(out, b"head\x07");
    /// ```
    fn encode_into<T: Serialize + ?Sized>(
        &self,
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        out.extend_from_slice(&self.encode(value)?);
        Ok(())
    }
}

/// MessagePack through `rmp-serde`, structs as maps. The default codec.
#[derive(Clone, Copy, Debug, Default)]
pub struct MsgPack;

impl Codec for MsgPack {
    const NAME: &'static str = "msgpack";

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::new();
        self.encode_into(value, &mut out)?;
        Ok(out)
    }

    fn encode_into<T: Serialize + ?Sized>(
        &self,
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        value
            .serialize(&mut rmp_serde::Serializer::new(out).with_struct_map())
            .map_err(|e| CodecError::Encode {
                codec: Self::NAME,
                source: Box::new(e),
            })
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

    fn encode_into<T: Serialize + ?Sized>(
        &self,
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        serde_json::to_writer(out, value).map_err(|e| CodecError::Encode {
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
/// The envelope format written now: the tag is codec, version and an optional schema name.
const FORMAT: u8 = 2;
/// The first format: the tag also held `std::any::type_name` of the record's type, which is
/// ignored on read (it changes when a type moves, and between compiler releases).
const FORMAT_TYPE_NAME: u8 = 1;

/// The compatibility tag of a record: codec, `version`, and an optional pinned schema name.
///
/// Two builds read each other's records when their tags are equal, whatever the Rust path of
/// the return type: `TypeTag::of::<T>` does not look at `T` (its parameter only keeps call
/// sites that name the type compiling). Built and compared piece by piece, without
/// allocating, since every call builds one.
///
/// ```
/// use idem_core::codec::TypeTag;
/// let tag = TypeTag::of::<Vec<u8>>("msgpack", 2);
/// assert_eq!(tag.to_string(), "msgpack;v2");
/// assert_eq!(tag, TypeTag::new("msgpack", 2));
/// assert_eq!(tag.with_schema("shop.Price").to_string(), "msgpack;v2;schema=shop.Price");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeTag {
    codec: &'static str,
    version: u32,
    schema: Option<&'static str>,
}

impl TypeTag {
    /// The tag of records written with `codec` under `version`.
    pub const fn new(codec: &'static str, version: u32) -> Self {
        TypeTag {
            codec,
            version,
            schema: None,
        }
    }

    /// The tag of records of type `T`: the same as [`TypeTag::new`] — the type's Rust path is
    /// deliberately not part of it.
    pub const fn of<T: ?Sized>(codec: &'static str, version: u32) -> Self {
        Self::new(codec, version)
    }

    /// Pins a schema name: records then read only under the same name (a stable name the
    /// user owns, such as `"billing.Receipt"`, never a Rust path). Pinning, changing or
    /// dropping it separates records like a `version` bump does.
    pub const fn with_schema(mut self, schema: &'static str) -> Self {
        self.schema = Some(schema);
        self
    }

    /// The codec name.
    pub const fn codec(&self) -> &'static str {
        self.codec
    }

    /// The record version.
    pub const fn version(&self) -> u32 {
        self.version
    }

    /// The pinned schema name, if any.
    pub const fn schema(&self) -> Option<&'static str> {
        self.schema
    }

    /// The tag's bytes as sealed, in pieces: `codec`, `;v`, the version's digits, and
    /// `;schema=` and the name when one is pinned. Cut at 64 KiB in all (tags are far
    /// shorter; the cut is deterministic, so equal tags still compare equal).
    fn for_each_piece(&self, mut f: impl FnMut(&[u8])) {
        let mut buf = [0u8; 10];
        let n = version_digits(self.version, &mut buf);
        let (sep, schema): (&[u8], &[u8]) = match self.schema {
            Some(s) => (b";schema=", s.as_bytes()),
            None => (b"", b""),
        };
        let pieces: [&[u8]; 5] = [self.codec.as_bytes(), b";v", &buf[10 - n..], sep, schema];
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

    /// A format-2 tag: equal, piece by piece.
    fn matches(&self, mut stored: &[u8]) -> bool {
        let mut equal = true;
        self.for_each_piece(|p| match strip(stored, p) {
            Some(rest) if equal => stored = rest,
            _ => equal = false,
        });
        equal && stored.is_empty()
    }

    /// A format-1 tag, `"{codec};v{version};{type name}"`: the codec and the version decide,
    /// the type name is ignored. Such records carry no schema name.
    fn matches_format1(&self, stored: &[u8]) -> bool {
        if self.schema.is_some() {
            return false;
        }
        let mut buf = [0u8; 10];
        let n = version_digits(self.version, &mut buf);
        strip(stored, self.codec.as_bytes())
            .and_then(|rest| strip(rest, b";v"))
            .and_then(|rest| strip(rest, &buf[10 - n..]))
            .is_some_and(|rest| rest.first() == Some(&b';'))
    }
}

/// `s` without `prefix`, if it starts with it. The pieces compared on every replay are a few
/// bytes long: a byte loop without early exit (which the compiler does not turn back into a
/// call) costs less than a library `memcmp` call per piece.
#[inline]
fn strip<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    if s.len() < prefix.len() {
        return None;
    }
    let (head, rest) = s.split_at(prefix.len());
    let diff = head
        .iter()
        .zip(prefix)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    (diff == 0).then_some(rest)
}

fn version_digits(version: u32, buf: &mut [u8; 10]) -> usize {
    let mut v = version;
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

impl std::fmt::Display for TypeTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{};v{}", self.codec, self.version)?;
        match self.schema {
            Some(s) => write!(f, ";schema={s}"),
            None => Ok(()),
        }
    }
}

/// The compatibility tag of records of type `T`, as a string (`T` does not change it).
///
/// ```
/// let tag = idem_core::codec::type_tag::<Vec<u8>>("msgpack", 2);
/// assert_eq!(tag, "msgpack;v2");
/// ```
pub fn type_tag<T: ?Sized>(codec: &'static str, version: u32) -> String {
    TypeTag::of::<T>(codec, version).to_string()
}

/// Wraps an encoded payload in a (format 2) envelope with its tag.
///
/// ```
/// use idem_core::codec::{open, seal, TypeTag};
/// let tag = TypeTag::new("msgpack", 0);
/// let envelope = seal(&tag, b"\x07");
/// assert_eq!(open(&tag, &envelope).unwrap(), b"\x07");
/// ```
pub fn seal(tag: &TypeTag, payload: &[u8]) -> Vec<u8> {
    let mut out = seal_head(tag, payload.len());
    out.extend_from_slice(payload);
    out
}

/// An envelope without its payload yet, with room for `payload` more bytes: the payload is
/// encoded at its end ([`Codec::encode_into`]), so that a record is one buffer.
pub(crate) fn seal_head(tag: &TypeTag, payload: usize) -> Vec<u8> {
    let len = tag.sealed_len();
    let mut out = Vec::with_capacity(MAGIC.len() + 3 + len + payload);
    out.extend_from_slice(MAGIC);
    out.push(FORMAT);
    out.extend_from_slice(&(len as u16).to_le_bytes());
    tag.for_each_piece(|p| out.extend_from_slice(p));
    out
}

/// The compatibility tag of an envelope, as text, without checking it against anything
/// (for inspection: `Call::inspect`, the `idem` tool). `None` for bytes that are not an
/// envelope.
///
/// ```
/// use idem_core::codec::{peek_tag, seal, TypeTag};
/// assert_eq!(peek_tag(&seal(&TypeTag::new("msgpack", 3), b"")).as_deref(), Some("msgpack;v3"));
/// assert_eq!(peek_tag(b"garbage"), None);
/// ```
pub fn peek_tag(envelope: &[u8]) -> Option<String> {
    let rest = strip(envelope, MAGIC.as_slice())?.get(1..)?;
    let len = u16::from_le_bytes([*rest.first()?, *rest.get(1)?]) as usize;
    let tag = rest.get(2..2 + len)?;
    Some(String::from_utf8_lossy(tag).into_owned())
}

/// Opens an envelope (format 2, or format 1 from earlier releases): checks the magic and the
/// tag, returns the payload. A tag that does not match is
/// [`Error::IncompatibleRecord`]; bytes that are not an envelope are [`Error::Codec`].
pub fn open<'a>(expected: &TypeTag, envelope: &'a [u8]) -> Result<&'a [u8], Error> {
    let corrupt = |why: &str| Error::Codec(CodecError::Corrupt(why.to_string()));
    let rest = strip(envelope, MAGIC.as_slice())
        .ok_or_else(|| corrupt("not an idem record (bad magic)"))?;
    let (&format, rest) = rest
        .split_first()
        .ok_or_else(|| corrupt("truncated record"))?;
    if format != FORMAT && format != FORMAT_TYPE_NAME {
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
    let readable = if format == FORMAT {
        expected.matches(tag)
    } else {
        expected.matches_format1(tag)
    };
    if !readable {
        return Err(Error::IncompatibleRecord {
            expected: expected.to_string(),
            found: String::from_utf8_lossy(tag).into_owned(),
            source: None,
        });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    /// The same record type before and after a refactor that moved and renamed it.
    mod service {
        pub mod v1 {
            #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
            pub struct Price {
                pub cents: u64,
                pub currency: String,
            }
        }
        pub mod v2 {
            /// Moved, renamed, and grown by a field with a serde default.
            #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
            pub struct Amount {
                pub cents: u64,
                pub currency: String,
                #[serde(default)]
                pub rounded: bool,
            }
        }
    }

    fn sealed<T: Serialize>(tag: TypeTag, value: &T) -> Vec<u8> {
        seal(&tag, &MsgPack.encode(value).unwrap())
    }

    fn read<T: serde::de::DeserializeOwned>(tag: TypeTag, envelope: &[u8]) -> Result<T, Error> {
        let payload = open(&tag, envelope)?;
        MsgPack.decode(payload).map_err(Error::Codec)
    }

    /// `encode_into` appends exactly what `encode` returns, after whatever the buffer holds
    /// (the runtime's envelope head), for each built-in codec and for a codec that keeps the
    /// provided method; and an envelope built that way opens to the payload.
    #[test]
    fn encode_into_appends_what_encode_returns() {
        #[derive(Serialize)]
        struct Row<'a> {
            id: u64,
            name: &'a str,
            tags: Vec<&'a str>,
        }
        /// A codec that only implements `encode` and `decode`.
        struct Plain;
        impl Codec for Plain {
            const NAME: &'static str = "plain";
            fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, CodecError> {
                MsgPack.encode(value)
            }
            fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
                MsgPack.decode(bytes)
            }
        }
        fn check<C: Codec>(codec: &C) {
            let value = Row {
                id: 7,
                name: "a\0b",
                tags: vec!["x"; 40],
            };
            let tag = TypeTag::new(C::NAME, 2);
            let mut sealed = seal_head(&tag, 0);
            let head = sealed.clone();
            codec.encode_into(&value, &mut sealed).unwrap();
            let payload = codec.encode(&value).unwrap();
            assert_eq!(&sealed[..head.len()], &head[..], "{}", C::NAME);
            assert_eq!(&sealed[head.len()..], &payload[..], "{}", C::NAME);
            assert_eq!(sealed, seal(&tag, &payload), "{}", C::NAME);
            assert_eq!(open(&tag, &sealed).unwrap(), &payload[..], "{}", C::NAME);
        }
        check(&MsgPack);
        #[cfg(feature = "json")]
        check(&Json);
        check(&Plain);
    }

    #[test]
    fn envelope_round_trip_and_mismatch() {
        let tag = TypeTag::of::<u32>(MsgPack::NAME, 0);
        let env = sealed(tag, &7u32);
        assert_eq!(read::<u32>(tag, &env).unwrap(), 7);
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
        assert_eq!(&env10[4], &2, "format byte");
        assert_eq!(&env10[7..], b"msgpack;v10");
        assert!(matches!(
            open(&v1, &env),
            Err(Error::IncompatibleRecord { .. })
        ));
        let json = TypeTag::new("json", 0);
        assert!(matches!(
            open(&json, &env),
            Err(Error::IncompatibleRecord { .. })
        ));
    }

    #[test]
    fn a_moved_and_renamed_type_still_reads() {
        let old = service::v1::Price {
            cents: 1999,
            currency: "EUR".into(),
        };
        let env = sealed(TypeTag::of::<service::v1::Price>(MsgPack::NAME, 0), &old);
        assert_ne!(
            std::any::type_name::<service::v1::Price>(),
            std::any::type_name::<service::v2::Amount>()
        );
        let new: service::v2::Amount =
            read(TypeTag::of::<service::v2::Amount>(MsgPack::NAME, 0), &env).unwrap();
        assert_eq!(
            new,
            service::v2::Amount {
                cents: 1999,
                currency: "EUR".into(),
                rounded: false
            }
        );
    }

    #[test]
    fn a_payload_of_another_shape_is_an_error_never_a_value() {
        let env = sealed(TypeTag::new(MsgPack::NAME, 0), &"not a price");
        let err = read::<service::v2::Amount>(TypeTag::new(MsgPack::NAME, 0), &env).unwrap_err();
        // The decode error is the source (see `CodecError::Decode`).
        assert!(
            matches!(err, Error::Codec(CodecError::Decode { .. })),
            "{err:?}"
        );
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn schema_names_separate_and_match() {
        let plain = TypeTag::new(MsgPack::NAME, 0);
        let price = plain.with_schema("shop.Price");
        let env = sealed(price, &1u8);
        assert_eq!(read::<u8>(price, &env).unwrap(), 1);
        for other in [
            plain,
            plain.with_schema("shop.Prices"),
            plain.with_schema("shop"),
        ] {
            assert!(
                matches!(open(&other, &env), Err(Error::IncompatibleRecord { .. })),
                "{other}"
            );
        }
        let env = sealed(plain, &1u8);
        assert!(matches!(
            open(&price, &env),
            Err(Error::IncompatibleRecord { .. })
        ));
    }

    /// Written by the format-1 code (idem 0.1 until 2026-11) for `service::v1::Price` at
    /// `version = 3`: its tag holds a type path that no longer exists.
    const FORMAT1_PRICE_V3: &[u8] = include_bytes!("../tests/fixtures/format1-price-v3.bin");

    #[test]
    fn format1_records_still_read() {
        assert_eq!(FORMAT1_PRICE_V3[4], 1, "the fixture is a format-1 record");
        let found = open(&TypeTag::new(MsgPack::NAME, 0), FORMAT1_PRICE_V3).unwrap_err();
        assert!(
            matches!(&found, Error::IncompatibleRecord { found, .. } if found.ends_with("service::v1::Price")),
            "{found:?}"
        );
        let v3 = TypeTag::of::<service::v2::Amount>(MsgPack::NAME, 3);
        let amount: service::v2::Amount = read(v3, FORMAT1_PRICE_V3).unwrap();
        assert_eq!(amount.cents, 1999);
        assert_eq!(amount.currency, "EUR");
        // Another version, codec, or a pinned schema do not read it.
        for other in [
            TypeTag::new(MsgPack::NAME, 33),
            TypeTag::new("json", 3),
            TypeTag::new("msgpac", 3),
            v3.with_schema("shop.Price"),
        ] {
            assert!(
                matches!(
                    open(&other, FORMAT1_PRICE_V3),
                    Err(Error::IncompatibleRecord { .. })
                ),
                "{other}"
            );
        }
    }

    #[derive(Serialize, Deserialize)]
    struct Unit;

    #[test]
    fn garbage_is_a_codec_error() {
        let tag = TypeTag::of::<Unit>(MsgPack::NAME, 0);
        for bad in [
            &b""[..],
            b"idem",
            b"idem\x01\xff\xff",
            b"idem\x02\xff\xff",
            b"garbage!",
            b"idem\x09\x00\x00",
            b"idem\x03\x00\x00",
        ] {
            assert!(matches!(open(&tag, bad), Err(Error::Codec(_))), "{bad:?}");
        }
    }
}
