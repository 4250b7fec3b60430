//! Hash maps keyed by record [`Key`]s: the memory store's shards and the Redis store's replay
//! hints. A key is already a uniform hash, so it needs no SipHash, only a per-process seed.

use std::hash::{BuildHasher, Hash, Hasher};

use idem_core::Key;

/// A key of a map. Keys are already uniform hashes (a BLAKE3 digest, or a process-local
/// SipHash whose second half is zero), so hashing one is a multiply of its first and third
/// words with a per-process seed: an attacker who can pick keys still cannot pick their
/// buckets without the seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MapKey(pub(crate) Key);

impl Hash for MapKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let k = &self.0 .0;
        let a = u64::from_le_bytes([k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]]);
        let b = u64::from_le_bytes([k[16], k[17], k[18], k[19], k[20], k[21], k[22], k[23]]);
        state.write_u64(a);
        state.write_u64(b);
    }
}

/// The seeded hash of [`MapKey`]s.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyHashing {
    seed: [u64; 2],
}

impl BuildHasher for KeyHashing {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher {
            seed: self.seed,
            state: 0,
            n: 0,
        }
    }
}

/// Folds two words with the seed by a 64×64→128 multiply (as foldhash does).
#[derive(Debug)]
pub(crate) struct KeyHasher {
    seed: [u64; 2],
    state: u64,
    n: u8,
}

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not used by `MapKey`; a plain fallback for completeness.
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        let s = self.seed[(self.n & 1) as usize];
        self.n = self.n.wrapping_add(1);
        let p = u128::from(self.state ^ v ^ s) * u128::from(s | 1);
        self.state = (p as u64) ^ ((p >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.state
    }
}

impl KeyHashing {
    /// A hashing with a seed drawn from the OS's random source.
    pub(crate) fn random() -> Self {
        KeyHashing {
            seed: random_words(),
        }
    }
}

/// `N` random words, from std's `RandomState` (whose keys come from the OS's random source).
pub(crate) fn random_words<const N: usize>() -> [u64; N] {
    let state = std::collections::hash_map::RandomState::new();
    std::array::from_fn(|i| state.hash_one(i as u64))
}
