//! Key derivation: (namespace, scope, key material) → a fixed-length [`Key`].
//!
//! The key is `BLAKE3-derive_key("idem key v1", len(namespace) ‖ namespace ‖ scope-digest ‖
//! key-digest)`, where the scope and key digests come from [`crate::fingerprint::digest`], so a
//! key or scope may be any `Serialize` value of any length or content (empty, megabytes, NUL
//! bytes, quotes): what reaches a store, a log or SQL is always 64 hex characters.

use serde::Serialize;

use crate::error::Error;
use crate::fingerprint::digest;
use crate::store::{Fingerprint, Key};

// Domain separation contexts. Never change them: every stored key depends on them.
const KEY_CONTEXT: &str = "idem 2026-11 key v1";
pub(crate) const MATERIAL_CONTEXT: &str = "idem 2026-11 key material v1";
pub(crate) const SCOPE_CONTEXT: &str = "idem 2026-11 scope v1";
pub(crate) const FINGERPRINT_CONTEXT: &str = "idem 2026-11 fingerprint v1";

/// The pinned identity of one call: its record key and (with an explicit key) the fingerprint
/// of its arguments. Computed once, before the body runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The record key.
    pub key: Key,
    /// The arguments' fingerprint, if the key was given explicitly.
    pub fingerprint: Option<Fingerprint>,
}

impl Identity {
    /// Derives an identity.
    ///
    /// - `key`: the key material; a top-level `None` gives `Ok(None)` (a missing key).
    /// - `scope`: a tenant or principal; a top-level `None` scope is the unscoped bucket.
    /// - `fingerprint`: the arguments to fingerprint (`None`: the key covers them all).
    ///
    /// ```
    /// use idem_core::key::Identity;
    /// let a = Identity::derive("pay", Some(&"tenant-a"), &"k1", Some(&(100u32,))).unwrap().unwrap();
    /// let b = Identity::derive("pay", Some(&"tenant-b"), &"k1", Some(&(100u32,))).unwrap().unwrap();
    /// assert_ne!(a.key, b.key);
    /// assert!(Identity::derive("pay", None::<&()>, &None::<String>, None::<&()>).unwrap().is_none());
    /// ```
    pub fn derive<S, K, F>(
        namespace: &str,
        scope: Option<&S>,
        key: &K,
        fingerprint: Option<&F>,
    ) -> Result<Option<Identity>, Error>
    where
        S: Serialize + ?Sized,
        K: Serialize + ?Sized,
        F: Serialize + ?Sized,
    {
        let Some(material) = digest(MATERIAL_CONTEXT, key).map_err(Error::Codec)? else {
            return Ok(None);
        };
        let scope = match scope {
            Some(s) => digest(SCOPE_CONTEXT, s).map_err(Error::Codec)?,
            None => None,
        };
        let fingerprint = match fingerprint {
            Some(f) => Some(Fingerprint(
                digest(FINGERPRINT_CONTEXT, &Some(f))
                    .map_err(Error::Codec)?
                    .unwrap_or([0; 32]),
            )),
            None => None,
        };
        Ok(Some(Identity {
            key: combine(namespace, scope.as_ref(), &material),
            fingerprint,
        }))
    }
}

pub(crate) fn combine(namespace: &str, scope: Option<&[u8; 32]>, material: &[u8; 32]) -> Key {
    // The context key is derived once; the input is gathered in a stack buffer and hashed in
    // one piece (the same digest as `new_derive_key(KEY_CONTEXT)` fed piece by piece).
    static CONTEXT_KEY: std::sync::LazyLock<blake3::hazmat::ContextKey> =
        std::sync::LazyLock::new(|| blake3::hazmat::hash_derive_key_context(KEY_CONTEXT));
    let mut h = crate::fingerprint::Sink::derive(&CONTEXT_KEY);
    h.update(&(namespace.len() as u64).to_le_bytes());
    h.update(namespace.as_bytes());
    match scope {
        Some(s) => {
            h.update(&[1]);
            h.update(s);
        }
        None => h.update(&[0]),
    }
    h.update(material);
    Key(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, scope: Option<&str>, k: &str) -> Key {
        Identity::derive(ns, scope, k, None::<&()>)
            .unwrap()
            .unwrap()
            .key
    }

    #[test]
    fn every_part_counts() {
        let base = key("ns", Some("s"), "k");
        assert_ne!(base, key("ns2", Some("s"), "k"));
        assert_ne!(base, key("ns", Some("s2"), "k"));
        assert_ne!(base, key("ns", None, "k"));
        assert_ne!(base, key("ns", Some("s"), "k2"));
        assert_eq!(base, key("ns", Some("s"), "k"));
        // No ambiguity between namespace and key boundaries.
        assert_ne!(key("a", None, "bc"), key("ab", None, "c"));
    }

    #[test]
    fn hostile_keys_are_fixed_length() {
        let big = "x".repeat(1 << 20);
        for k in [
            "",
            "\0\0",
            "'; DROP TABLE idem; --",
            "\"]]--redis.call('flushall')",
            &big,
        ] {
            assert_eq!(key("ns", None, k).to_hex().len(), 64);
        }
    }
}

#[cfg(test)]
mod pinned {
    use super::*;

    /// Pinned: every stored key depends on this derivation. A change here orphans every
    /// record in every store; bump the contexts instead, deliberately.
    #[test]
    fn a_derived_identity_never_changes() {
        let id = Identity::derive(
            "shop::charge",
            Some("tenant-1"),
            "order-42",
            Some(&(1999u64,)),
        )
        .unwrap()
        .unwrap();
        let fp = id.fingerprint.unwrap();
        let via_call = crate::Call::new("shop::charge")
            .key("order-42")
            .scope("tenant-1")
            .fingerprint((1999u64,))
            .identity()
            .unwrap();
        assert_eq!(
            via_call,
            Some(id),
            "the runtime and Identity::derive must agree"
        );
        assert_eq!(id.key.to_hex(), PINNED_KEY);
        assert_eq!(fp.to_hex(), PINNED_FINGERPRINT);
    }

    const PINNED_KEY: &str = "94728a0030e1cac219522d1570cfc3b76dbfec2b57902c4d8ff55f11b68e7229";
    const PINNED_FINGERPRINT: &str =
        "d59524e2e44d8cd104440940f74a1099ab54055244ce1523adcd0ae8ab5d5285";
}
