//! The opt-in bincode 2.x codec (feature `bincode`).
//!
//! bincode writes values without field names or type markers, so it is compact but cannot
//! skip, reorder or guess: a type whose `Serialize` leaves a field out (`skip_serializing_if`),
//! writes a map of unknown length (`#[serde(flatten)]`) or whose `Deserialize` asks the format
//! what comes next (`#[serde(untagged)]`, internally tagged enums, `serde_json::Value`) does not
//! round-trip. This codec turns each of those into a [`CodecError`] — at encode time where the
//! shape shows it (a skipped field, a map of unknown length), at decode time otherwise — and
//! refuses bytes left over after a decoded value, so that it never answers a wrong value.

use serde::de::DeserializeOwned;
use serde::ser::{self, Serialize};

use super::Codec;
use crate::error::CodecError;

/// bincode 2.x through its serde support (feature `bincode`, never the default): the
/// standard configuration (variable-length integers, little endian), at most 256 MiB decoded.
///
/// Choose it for compact records of plain data types — structs, tuples, enums with the default
/// (externally tagged) representation, `Option`, collections — when every byte counts and the
/// type never changes shape without a `version` bump: bincode has no field names, so adding,
/// removing or reordering a field makes old records unreadable (an
/// [`IncompatibleRecord`](crate::Error::IncompatibleRecord) only if `version` changed, a
/// decode error otherwise). Types with `#[serde(flatten)]`, `#[serde(untagged)]`, internally
/// tagged enums or `skip_serializing_if` are refused with [`CodecError`]; keep MessagePack
/// (the default) for them.
///
/// ```
/// use idem_core::codec::{Bincode, Codec};
///
/// #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
/// struct Receipt { id: u64, amount_cents: i64, note: Option<String> }
///
/// let r = Receipt { id: 7, amount_cents: -250, note: None };
/// let bytes = Bincode.encode(&r).unwrap();
/// assert_eq!(Bincode.decode::<Receipt>(&bytes).unwrap(), r);
///
/// #[derive(serde::Serialize)]
/// struct Sparse {
///     #[serde(skip_serializing_if = "Option::is_none")]
///     note: Option<String>,
/// }
/// assert!(Bincode.encode(&Sparse { note: None }).is_err());
/// ```
///
/// With a call: `Call::new(..).codec(Bincode)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bincode;

/// The largest value a decode may claim (bincode's allocation guard).
const LIMIT: usize = 256 << 20;

fn config() -> impl ::bincode::config::Config {
    ::bincode::config::standard().with_limit::<LIMIT>()
}

impl Codec for Bincode {
    const NAME: &'static str = "bincode2";

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        let encode_error = |source: crate::BoxError| CodecError::Encode {
            codec: Self::NAME,
            source,
        };
        value
            .serialize(Probe)
            .map_err(|e| encode_error(Box::new(e)))?;
        ::bincode::serde::encode_to_vec(value, config()).map_err(|e| encode_error(Box::new(e)))
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        let decode_error = |source: crate::BoxError| CodecError::Decode {
            codec: Self::NAME,
            source,
        };
        let (value, read) = ::bincode::serde::decode_from_slice::<T, _>(bytes, config())
            .map_err(|e| decode_error(Box::new(e)))?;
        if read != bytes.len() {
            return Err(decode_error(Box::new(Unsupported::TrailingBytes {
                left: bytes.len() - read,
            })));
        }
        Ok(value)
    }
}

/// What the bincode codec refuses, as the source of its [`CodecError`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Unsupported {
    /// A field left out by `#[serde(skip_serializing_if = ...)]`: bincode has no field names,
    /// so the decoder would read the next field in its place.
    #[error(
        "field `{field}` is skipped by `skip_serializing_if`, which bincode cannot read back; \
         remove the attribute or use the MessagePack codec"
    )]
    SkippedField {
        /// The skipped field.
        field: &'static str,
    },
    /// A map whose length is not known up front: `#[serde(flatten)]`, or a hand-written
    /// `Serialize` that streams a map.
    #[error(
        "a map of unknown length (`#[serde(flatten)]`?), which bincode cannot write; \
         remove the attribute or use the MessagePack codec"
    )]
    MapOfUnknownLength,
    /// A sequence whose length is not known up front.
    #[error("a sequence of unknown length, which bincode cannot write")]
    SeqOfUnknownLength,
    /// Bytes left after the decoded value: the record was written for another type.
    #[error("{left} bytes left after the decoded value: the record holds another type")]
    TrailingBytes {
        /// How many.
        left: usize,
    },
    /// A `Serialize` impl failed with its own message.
    #[error("{0}")]
    Custom(String),
}

impl ser::Error for Unsupported {
    fn custom<M: std::fmt::Display>(msg: M) -> Self {
        Unsupported::Custom(msg.to_string())
    }
}

/// A serializer that writes nothing and fails on what bincode cannot read back: walked over a
/// value before it is encoded.
struct Probe;

type R = Result<(), Unsupported>;

macro_rules! leaves {
    ($($f:ident($t:ty)),* $(,)?) => {$(
        fn $f(self, _: $t) -> R { Ok(()) }
    )*};
}

impl ser::Serializer for Probe {
    type Ok = ();
    type Error = Unsupported;
    type SerializeSeq = Probe;
    type SerializeTuple = Probe;
    type SerializeTupleStruct = Probe;
    type SerializeTupleVariant = Probe;
    type SerializeMap = Probe;
    type SerializeStruct = Probe;
    type SerializeStructVariant = Probe;

    leaves!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_i128(i128),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_u128(u128),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
        serialize_unit_struct(&'static str),
    );

    fn serialize_none(self) -> R {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> R {
        v.serialize(Probe)
    }
    fn serialize_unit(self) -> R {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> R {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, v: &T) -> R {
        v.serialize(Probe)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        v: &T,
    ) -> R {
        v.serialize(Probe)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Probe, Unsupported> {
        len.map(|_| Probe).ok_or(Unsupported::SeqOfUnknownLength)
    }
    fn serialize_tuple(self, _: usize) -> Result<Probe, Unsupported> {
        Ok(Probe)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Probe, Unsupported> {
        Ok(Probe)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Probe, Unsupported> {
        Ok(Probe)
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Probe, Unsupported> {
        len.map(|_| Probe).ok_or(Unsupported::MapOfUnknownLength)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Probe, Unsupported> {
        Ok(Probe)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Probe, Unsupported> {
        Ok(Probe)
    }
    fn is_human_readable(&self) -> bool {
        // As bincode answers, so that types serialize here as they will there.
        false
    }
}

macro_rules! elements {
    ($($tr:ident :: $f:ident),*) => {$(
        impl ser::$tr for Probe {
            type Ok = ();
            type Error = Unsupported;
            fn $f<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
                v.serialize(Probe)
            }
            fn end(self) -> R {
                Ok(())
            }
        }
    )*};
}

elements!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl ser::SerializeMap for Probe {
    type Ok = ();
    type Error = Unsupported;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> R {
        k.serialize(Probe)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
        v.serialize(Probe)
    }
    fn end(self) -> R {
        Ok(())
    }
}

macro_rules! fields {
    ($($tr:ident),*) => {$(
        impl ser::$tr for Probe {
            type Ok = ();
            type Error = Unsupported;
            fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, v: &T) -> R {
                v.serialize(Probe)
            }
            fn skip_field(&mut self, field: &'static str) -> R {
                Err(Unsupported::SkippedField { field })
            }
            fn end(self) -> R {
                Ok(())
            }
        }
    )*};
}

fields!(SerializeStruct, SerializeStructVariant);
