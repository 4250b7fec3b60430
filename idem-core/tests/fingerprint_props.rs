//! Property tests of the fingerprint's promises (`idem_core::fingerprint`): map entries
//! combine order-independently, integers of every width hash alike, `Some(x)` at the top hashes
//! like `x`, distinct values get distinct digests, and the digests of a fixed corpus of
//! generated values never change (a change breaks every stored key: bump the context instead).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};

use idem_core::fingerprint::digest;
use proptest::prelude::*;

fn d<T: serde::Serialize + ?Sized>(v: &T) -> [u8; 32] {
    digest("props", v).unwrap().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn map_order_independence(entries in prop::collection::vec((".{0,8}", any::<i64>()), 0..24)) {
        let forward: HashMap<String, i64> = entries.iter().cloned().collect();
        let mut backward: HashMap<String, i64> = HashMap::with_capacity(1);
        for (k, v) in forward.iter().collect::<Vec<_>>().into_iter().rev() {
            backward.insert(k.clone(), *v);
        }
        let sorted: BTreeMap<String, i64> = forward.iter().map(|(k, v)| (k.clone(), *v)).collect();
        prop_assert_eq!(d(&forward), d(&backward));
        prop_assert_eq!(d(&forward), d(&sorted));
        // Nested under a struct-like tuple too.
        prop_assert_eq!(d(&("outer", &forward, 1u8)), d(&("outer", &sorted, 1u8)));
    }

    #[test]
    fn integer_width_unification_unsigned(x in any::<u8>()) {
        let all = [d(&x), d(&(x as u16)), d(&(x as u32)), d(&(x as u64)), d(&(x as u128)),
            d(&(x as i16)), d(&(x as i32)), d(&(x as i64)), d(&(x as i128))];
        prop_assert!(all.iter().all(|h| *h == all[0]));
    }

    #[test]
    fn integer_width_unification_signed(x in any::<i8>()) {
        let all = [d(&x), d(&(x as i16)), d(&(x as i32)), d(&(x as i64)), d(&(x as i128))];
        prop_assert!(all.iter().all(|h| *h == all[0]));
    }

    #[test]
    fn integer_width_unification_wide(x in any::<u64>(), y in any::<i64>()) {
        prop_assert_eq!(d(&x), d(&(x as u128)));
        prop_assert_eq!(d(&y), d(&(y as i128)));
        if y >= 0 {
            prop_assert_eq!(d(&y), d(&(y as u64)));
        }
    }

    #[test]
    fn top_level_some_hashes_like_its_value(v in prop::collection::vec(any::<u32>(), 0..8)) {
        prop_assert_eq!(d(&Some(v.clone())), d(&v));
        prop_assert_eq!(digest("props", &None::<Vec<u32>>).unwrap(), None);
    }

    #[test]
    fn distinct_values_distinct_digests(
        a in prop::collection::vec(any::<u8>(), 0..16),
        b in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        prop_assume!(a != b);
        prop_assert_ne!(d(&a), d(&b));
        let (sa, sb) = (String::from_utf8_lossy(&a).into_owned(), String::from_utf8_lossy(&b).into_owned());
        if sa != sb {
            prop_assert_ne!(d(&sa), d(&sb));
        }
    }
}

/// A deterministic generator (splitmix64), independent of proptest's, for the pinned corpus.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn value(&mut self, depth: u32) -> serde_json::Value {
        use serde_json::Value;
        let kind = self.next() % if depth == 0 { 6 } else { 8 };
        match kind {
            0 => Value::Null,
            1 => Value::Bool(self.next() & 1 == 1),
            2 => Value::from(self.next()),
            3 => Value::from(self.next() as i64),
            4 => Value::from((self.next() % 1_000_000) as f64 / 7.0),
            5 => Value::String(format!("s{:x}", self.next() % 4096)),
            6 => Value::Array(
                (0..self.next() % 5)
                    .map(|_| self.value(depth - 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..self.next() % 5)
                    .map(|_| (format!("k{}", self.next() % 64), self.value(depth - 1)))
                    .collect(),
            ),
        }
    }
}

/// The digests of 256 generated JSON values (every kind, nested maps and arrays), folded into
/// one: pinned, so that any change of the canonical encoding is caught.
#[test]
fn pinned_digests_are_stable() {
    let mut rng = Rng(17);
    let mut all = blake3::Hasher::new();
    for _ in 0..256 {
        let v = rng.value(3);
        all.update(&d(&v));
    }
    let hex = all.finalize().to_hex().to_string();
    assert_eq!(hex, PINNED_CORPUS);
}

const PINNED_CORPUS: &str = "48780cc90d882bdc374a3e4b270820bc171ee6059d14ff0ce02bd9c6841efc19";
