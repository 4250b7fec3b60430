//! The opt-in bincode codec (feature `bincode`): what it round-trips, and the clear error (never
//! a wrong value) for what it cannot — `#[serde(flatten)]`, `#[serde(untagged)]`,
//! `skip_serializing_if` — both on its own and through a call on the memory store.
#![cfg(feature = "bincode")]
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::atomic::{AtomicU32, Ordering};

use idem_core::codec::{Bincode, Codec, MsgPack, Unsupported};
use idem_core::{Call, CodecError, Error};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: T) {
    let bytes = Bincode.encode(&value).unwrap();
    assert_eq!(Bincode.decode::<T>(&bytes).unwrap(), value);
}

/// The `Unsupported` source of a codec error.
fn unsupported(e: &CodecError) -> &Unsupported {
    let source = std::error::Error::source(e).expect("a source");
    source
        .downcast_ref::<Unsupported>()
        .unwrap_or_else(|| panic!("not an Unsupported: {source:?}"))
}

#[derive(Serialize, Deserialize, PartialEq, Debug, Clone)]
struct Receipt {
    id: u64,
    amount_cents: i64,
    currency: String,
    note: Option<String>,
    lines: Vec<(String, u32)>,
    status: Status,
    #[serde(skip)]
    cached: Option<u8>,
}

#[derive(Serialize, Deserialize, PartialEq, Debug, Clone)]
enum Status {
    Paid,
    Refunded(u64),
    Partial { paid: u64, due: u64 },
    Pair(u8, i8),
}

#[test]
fn plain_data_types_round_trip() {
    round_trip(Receipt {
        id: u64::MAX,
        amount_cents: -250,
        currency: "EUR".into(),
        note: Some("é ✓".into()),
        lines: vec![("a".into(), 1), ("b".into(), 0)],
        status: Status::Partial { paid: 1, due: 2 },
        cached: None,
    });
    for s in [
        Status::Paid,
        Status::Refunded(9),
        Status::Pair(255, -128),
        Status::Partial { paid: 0, due: 0 },
    ] {
        round_trip(s);
    }
    round_trip(());
    round_trip(0u8);
    round_trip(false);
    round_trip(None::<u32>);
    round_trip(Vec::<u64>::new());
    round_trip(u128::MAX);
    round_trip(-1.5f64);
    round_trip('x');
    round_trip((1u8, "two".to_string(), [3u16; 4]));
    round_trip(BTreeMap::from([
        (1u32, "one".to_string()),
        (2, "two".into()),
    ]));
    round_trip(HashMap::from([("k".to_string(), vec![1u8, 2])]));
    round_trip(Ok::<u32, String>(5));
    round_trip(Err::<u32, String>("no".into()));
}

#[test]
fn bincode_is_more_compact_than_the_default() {
    let r = Receipt {
        id: 42,
        amount_cents: 1999,
        currency: "USD".into(),
        note: None,
        lines: vec![("widget".into(), 3)],
        status: Status::Paid,
        cached: None,
    };
    let compact = Bincode.encode(&r).unwrap().len();
    let default = MsgPack.encode(&r).unwrap().len();
    assert!(
        compact < default,
        "bincode {compact} B, msgpack {default} B"
    );
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Inner {
    a: u32,
    b: String,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Flattened {
    id: u32,
    #[serde(flatten)]
    inner: Inner,
}

#[test]
fn flatten_is_an_encode_error() {
    let v = Flattened {
        id: 1,
        inner: Inner {
            a: 2,
            b: "c".into(),
        },
    };
    let e = Bincode.encode(&v).unwrap_err();
    assert!(
        matches!(
            e,
            CodecError::Encode {
                codec: "bincode2",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        matches!(unsupported(&e), Unsupported::MapOfUnknownLength),
        "{e:?}"
    );
    assert!(std::error::Error::source(&e)
        .unwrap()
        .to_string()
        .contains("flatten"));
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Sparse {
    id: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    note: Option<u32>,
    tail: u32,
}

#[test]
fn skip_serializing_if_is_an_encode_error_when_it_skips() {
    let e = Bincode
        .encode(&Sparse {
            id: 1,
            note: None,
            tail: 1,
        })
        .unwrap_err();
    assert!(
        matches!(unsupported(&e), Unsupported::SkippedField { field: "note" }),
        "{e:?}"
    );
    // Nested anywhere in the value, too.
    let nested = vec![Some(Sparse {
        id: 1,
        note: None,
        tail: 2,
    })];
    assert!(Bincode.encode(&nested).is_err());
    // When the condition is false nothing is skipped, and the value round-trips.
    round_trip(Sparse {
        id: 1,
        note: Some(5),
        tail: 1,
    });
}

#[derive(Serialize, Deserialize, PartialEq, Debug, Clone)]
#[serde(untagged)]
enum Loose {
    Number(u64),
    Text(String),
}

#[derive(Serialize, Deserialize, PartialEq, Debug, Clone)]
#[serde(tag = "type")]
enum Tagged {
    A { x: u32 },
    B { y: String },
}

#[test]
fn untagged_and_internally_tagged_enums_are_a_decode_error_never_a_wrong_value() {
    for v in [Loose::Number(7), Loose::Text("7".into())] {
        let bytes = Bincode.encode(&v).unwrap();
        let e = Bincode.decode::<Loose>(&bytes).unwrap_err();
        assert!(
            matches!(
                e,
                CodecError::Decode {
                    codec: "bincode2",
                    ..
                }
            ),
            "{e:?}"
        );
    }
    let bytes = Bincode.encode(&Tagged::A { x: 1 }).unwrap();
    assert!(Bincode.decode::<Tagged>(&bytes).is_err());
}

#[test]
fn a_record_of_another_type_is_an_error_not_a_prefix_of_it() {
    let bytes = Bincode.encode(&(1u32, 2u32)).unwrap();
    let e = Bincode.decode::<u32>(&bytes).unwrap_err();
    assert!(
        matches!(unsupported(&e), Unsupported::TrailingBytes { left: 1 }),
        "{e:?}"
    );
    // Too few bytes, or garbage, are errors too; nothing panics.
    assert!(Bincode.decode::<(u64, u64)>(&bytes[..1]).is_err());
    assert!(Bincode.decode::<Vec<String>>(&[0xff; 9]).is_err());
    assert!(Bincode.decode::<Receipt>(&[]).is_err());
}

#[tokio::test]
async fn calls_replay_through_bincode_and_fail_clearly_on_what_it_cannot_read() {
    let store = idem_stores::MemoryStore::new();
    let runs = AtomicU32::new(0);

    // A plain type: executed once, replayed equal.
    let receipt = || {
        runs.fetch_add(1, Ordering::SeqCst);
        Receipt {
            id: 1,
            amount_cents: 5,
            currency: "EUR".into(),
            note: None,
            lines: vec![],
            status: Status::Refunded(3),
            cached: None,
        }
    };
    let call = || {
        Call::new("tests::bincode::plain")
            .key("k")
            .codec(Bincode)
            .run(&store, async { Ok::<_, Error>(receipt()) })
    };
    let first = call().await.unwrap();
    assert_eq!(call().await.unwrap(), first);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // An untagged enum: stored, and every replay is `IncompatibleRecord` whose source is the
    // codec's decode error; the body never runs again.
    let loose_runs = AtomicU32::new(0);
    let loose = || {
        Call::new("tests::bincode::untagged")
            .key("k")
            .codec(Bincode)
            .run(&store, async {
                loose_runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(Loose::Number(7))
            })
    };
    assert_eq!(loose().await.unwrap(), Loose::Number(7));
    for _ in 0..2 {
        let e = loose().await.unwrap_err();
        assert!(
            matches!(
                e,
                Error::IncompatibleRecord {
                    source: Some(CodecError::Decode { .. }),
                    ..
                }
            ),
            "{e:?}"
        );
    }
    assert_eq!(loose_runs.load(Ordering::SeqCst), 1);

    // A skipped field: the result cannot be stored, so the call fails with Error::Codec (its
    // claim is released, as for any value that cannot be encoded).
    let e = Call::new("tests::bincode::skip")
        .key("k")
        .codec(Bincode)
        .run(&store, async {
            Ok::<_, Error>(Sparse {
                id: 1,
                note: None,
                tail: 2,
            })
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Codec(CodecError::Encode { .. })),
        "{e:?}"
    );

    // A record written with bincode is another codec's record for MessagePack, and back.
    let e = Call::new("tests::bincode::plain")
        .key("k")
        .run(&store, async { Ok::<_, Error>(receipt()) })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::IncompatibleRecord { .. }), "{e:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
