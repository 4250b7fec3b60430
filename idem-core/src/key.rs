//! Key derivation: (namespace, scope, key material) → a fixed-length [`Key`].
//!
//! The key is `BLAKE3-derive_key("idem key v1", len(namespace) ‖ namespace ‖ scope-digest ‖
//! key-digest)`, where the scope and key digests come from [`crate::fingerprint::digest`], so a
//! key or scope may be any `Serialize` value of any length or content (empty, megabytes, NUL
//! bytes, quotes): what reaches a store, a log or SQL is always 64 hex characters.
//!
//! # Process-local keys
//!
//! A store whose records never leave this process ([`Store::process_local`], e.g. the memory
//! store) gets keys from a **process-local keyed hash** instead: SipHash-1-3 with a 128-bit
//! output under a key drawn at random when the process first needs one, over the same
//! canonical encodings. Such a key means nothing in another process (nor in this one after a
//! restart), which is exactly as long as the records it names live; it costs a fraction of
//! the portable digest. Its first 16 bytes are the hash and the last 16 are zero. Colliding
//! two keys needs about 2⁶⁴ records even for someone who chooses the keys, since the hash key
//! is secret. SipHash-1-3 is the variant Rust's `HashMap` relies on against chosen-key
//! flooding; the 128-bit output is what makes a collision (a replay of another key's result)
//! out of reach rather than merely rare. The portable BLAKE3 derivation above never changes (the pinned tests hold it).
//! A [`Call`](crate::Call) records its arguments' encodings and hashes them once it is run,
//! when the store, and so the kind of key, is known.

use serde::Serialize;

use crate::error::Error;
use crate::fingerprint::Out;
use crate::store::{Fingerprint, Key, Store};

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
        // The same recording and digests as a `Call` run on a shared store.
        let mut e = Encodings::new();
        e.key = e.record(key).map_err(Error::Codec)?;
        if let Some(s) = scope {
            e.scope = e.record(s).map_err(Error::Codec)?;
        }
        if let Some(f) = fingerprint {
            e.fingerprint = e.record(&Some(f)).map_err(Error::Codec)?;
        }
        Ok(e.portable(namespace))
    }
}

/// A run of bytes in [`Encodings`] (`u32`: a `Call` is moved by value through the builder
/// and the run, so it is kept small).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Span {
    start: u32,
    end: u32,
}

/// The canonical encodings of a call's key material, scope and fingerprint (what the digests
/// hash), recorded by the builder methods and hashed once the store is known: portably
/// (BLAKE3, [`Identity::derive`]'s digests) for a shared store, with the process-local keyed
/// hash for a [`Store::process_local`] one. Kept inline for the usual short keys.
pub(crate) struct Encodings {
    buf: Buf,
    /// Where the process-local key's input starts when the call has no scope: the namespace
    /// header recorded just before the key material, so that the input is one run of bytes.
    key_input: u32,
    pub(crate) key: Option<Span>,
    pub(crate) scope: Option<Span>,
    pub(crate) fingerprint: Option<Span>,
}

const INLINE: usize = 128;

struct Buf {
    len: usize,
    spilled: bool,
    inline: [u8; INLINE],
    heap: Vec<u8>,
}

impl crate::fingerprint::Out for Buf {
    #[inline]
    fn fixed<const N: usize>(&mut self, bytes: [u8; N]) {
        if !self.spilled && N <= INLINE - self.len {
            self.inline[self.len..self.len + N].copy_from_slice(&bytes);
            self.len += N;
        } else {
            self.update(&bytes)
        }
    }

    #[inline]
    fn update(&mut self, bytes: &[u8]) {
        if !self.spilled {
            if bytes.len() <= INLINE - self.len {
                self.inline[self.len..self.len + bytes.len()].copy_from_slice(bytes);
                self.len += bytes.len();
                return;
            }
            self.spill();
        }
        self.heap.extend_from_slice(bytes);
    }
}

impl Buf {
    fn new() -> Self {
        Buf {
            len: 0,
            spilled: false,
            inline: [0; INLINE],
            heap: Vec::new(),
        }
    }

    fn all(&self) -> &[u8] {
        if self.spilled {
            &self.heap
        } else {
            &self.inline[..self.len]
        }
    }

    #[cold]
    fn spill(&mut self) {
        self.heap.reserve(4 * INLINE);
        self.heap.extend_from_slice(&self.inline[..self.len]);
        self.spilled = true;
    }

    fn len(&self) -> usize {
        if self.spilled {
            self.heap.len()
        } else {
            self.len
        }
    }

    fn truncate(&mut self, len: usize) {
        if self.spilled {
            self.heap.truncate(len);
        } else {
            self.len = self.len.min(len);
        }
    }

    fn get(&self, span: Span) -> &[u8] {
        self.all()
            .get(span.start as usize..span.end as usize)
            .unwrap_or_default()
    }
}

impl Encodings {
    pub(crate) fn new() -> Self {
        Encodings {
            buf: Buf::new(),
            key_input: 0,
            key: None,
            scope: None,
            fingerprint: None,
        }
    }

    /// Records the encoding of `value`: `Ok(None)` for a top-level `None`.
    pub(crate) fn record<V: Serialize + ?Sized>(
        &mut self,
        value: &V,
    ) -> Result<Option<Span>, crate::error::CodecError> {
        let start = self.buf.len();
        match crate::fingerprint::encode(value, &mut self.buf) {
            Ok(true) => match (u32::try_from(start), u32::try_from(self.buf.len())) {
                (Ok(start), Ok(end)) => Ok(Some(Span { start, end })),
                _ => {
                    self.buf.truncate(start);
                    Err(crate::error::CodecError::Fingerprint(
                        "the arguments' encoding is over 4 GiB".into(),
                    ))
                }
            },
            Ok(false) => {
                self.buf.truncate(start);
                Ok(None)
            }
            Err(e) => {
                self.buf.truncate(start);
                Err(e)
            }
        }
    }

    /// Records the key material, preceded by the process-local key's header for a call
    /// without a scope (length-prefixed namespace, then `0`: no scope), so that the local key
    /// hashes one run of bytes with no copy. `Ok(None)` for a top-level `None`.
    pub(crate) fn record_key<V: Serialize + ?Sized>(
        &mut self,
        namespace: &str,
        value: &V,
    ) -> Result<Option<Span>, crate::error::CodecError> {
        let header = self.buf.len();
        local_header(&mut self.buf, namespace, None);
        let span = self.record(value);
        match (&span, u32::try_from(header)) {
            (Ok(Some(_)), Ok(header)) => self.key_input = header,
            _ => self.buf.truncate(header),
        }
        span
    }

    fn bytes(&self, span: Span) -> &[u8] {
        self.buf.get(span)
    }

    /// The identity for `store`: process-local keys for a [`Store::process_local`] store,
    /// portable ones otherwise. `None`: no key material (a missing key).
    pub(crate) fn identity_for(&self, namespace: &str, store: &dyn Store) -> Option<Identity> {
        if store.process_local() {
            self.local(namespace)
        } else {
            self.portable(namespace)
        }
    }

    /// The portable identity: the same digests as [`Identity::derive`].
    pub(crate) fn portable(&self, namespace: &str) -> Option<Identity> {
        use crate::fingerprint::digest_encoding;
        let material = digest_encoding(MATERIAL_CONTEXT, self.bytes(self.key?));
        let scope = self
            .scope
            .map(|s| digest_encoding(SCOPE_CONTEXT, self.bytes(s)));
        let fingerprint = self
            .fingerprint
            .map(|f| Fingerprint(digest_encoding(FINGERPRINT_CONTEXT, self.bytes(f))));
        Some(Identity {
            key: combine(namespace, scope.as_ref(), &material),
            fingerprint,
        })
    }

    /// The process-local identity (see the module's *Process-local keys*).
    pub(crate) fn local(&self, namespace: &str) -> Option<Identity> {
        let key = self.key?;
        let keys = &*LOCAL_KEYS;
        // The key's input in one piece (one-shot hashing is the cheap way): length-prefixed
        // namespace and scope, then the key material. Without a scope it was recorded so
        // (see `record_key`).
        let key = match self.scope {
            None => keys.key.hash(self.bytes(Span {
                start: self.key_input,
                end: key.end,
            })),
            Some(scope) => {
                let mut input = Buf::new();
                local_header(&mut input, namespace, Some(self.bytes(scope)));
                input.update(self.bytes(key));
                keys.key.hash(input.all())
            }
        };
        // Fingerprints hash under a hash key of their own (domain separation without a copy).
        let fingerprint = self
            .fingerprint
            .map(|f| Fingerprint(widen(keys.fingerprint.hash(self.bytes(f)).as_bytes())));
        Some(Identity {
            key: Key(widen(key.as_bytes())),
            fingerprint,
        })
    }
}

/// The process-local key's input before the key material: the length-prefixed namespace,
/// then `1` and the length-prefixed scope, or `0` for none.
fn local_header(out: &mut impl Out, namespace: &str, scope: Option<&[u8]>) {
    out.fixed((namespace.len() as u64).to_le_bytes());
    out.update(namespace.as_bytes());
    match scope {
        Some(scope) => {
            out.fixed([1]);
            out.fixed((scope.len() as u64).to_le_bytes());
            out.update(scope);
        }
        None => out.fixed([0]),
    }
}

/// A 16-byte process-local hash as a 32-byte key or fingerprint (the rest zero).
fn widen(half: [u8; 16]) -> [u8; 32] {
    let mut out = [0; 32];
    out[..16].copy_from_slice(&half);
    out
}

/// The process-local hash keys, one for record keys and one for fingerprints.
struct LocalKeys {
    key: siphasher::sip128::SipHasher13,
    fingerprint: siphasher::sip128::SipHasher13,
}

/// 2 × 128 random bits drawn when first needed, from std's `RandomState` (whose keys come from
/// the OS's random source).
static LOCAL_KEYS: std::sync::LazyLock<LocalKeys> = std::sync::LazyLock::new(|| {
    use std::hash::BuildHasher;
    let word = |i: u64| std::hash::RandomState::new().hash_one(i);
    LocalKeys {
        key: siphasher::sip128::SipHasher13::new_with_keys(word(1), word(2)),
        fingerprint: siphasher::sip128::SipHasher13::new_with_keys(word(3), word(4)),
    }
});

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
mod encodings {
    use super::*;

    fn call(ns: &'static str, scope: Option<&str>, k: &str, fp: u64) -> crate::Call {
        let c = crate::Call::new(ns).key(k).fingerprint((fp,));
        match scope {
            Some(s) => c.scope(s),
            None => c,
        }
    }

    fn local(c: &crate::Call) -> Identity {
        c.encodings.local(c.namespace).unwrap()
    }

    /// Recorded encodings hash to the digests of the streaming hasher (`fingerprint::digest`)
    /// whatever their length, inline or spilled to the heap: the pinned derivation.
    #[test]
    fn portable_identities_match_the_streaming_digests_for_every_length() {
        use crate::fingerprint::digest;
        for len in [0usize, 1, 100, 127, 128, 129, 170, 193, 400, 5000] {
            let k = "k".repeat(len);
            let fp = ("x".repeat(len), 7u8);
            let c = crate::Call::new("ns")
                .scope("tenant")
                .key(&k)
                .fingerprint(&fp);
            let material = digest(MATERIAL_CONTEXT, &k).unwrap().unwrap();
            let scope = digest(SCOPE_CONTEXT, "tenant").unwrap().unwrap();
            let streamed = Identity {
                key: combine("ns", Some(&scope), &material),
                fingerprint: Some(Fingerprint(
                    digest(FINGERPRINT_CONTEXT, &Some(&fp)).unwrap().unwrap(),
                )),
            };
            assert_eq!(c.identity().unwrap().unwrap(), streamed, "{len}");
        }
    }

    #[test]
    fn local_identities_are_stable_in_the_process_and_every_part_counts() {
        let base = local(&call("ns", Some("s"), "k", 1));
        assert_eq!(base, local(&call("ns", Some("s"), "k", 1)));
        assert_eq!(base.key.0[16..], [0; 16]);
        assert_ne!(base.key, local(&call("ns2", Some("s"), "k", 1)).key);
        assert_ne!(base.key, local(&call("ns", Some("s2"), "k", 1)).key);
        assert_ne!(base.key, local(&call("ns", None, "k", 1)).key);
        assert_ne!(base.key, local(&call("ns", Some("s"), "k2", 1)).key);
        assert_eq!(base.key, local(&call("ns", Some("s"), "k", 2)).key);
        assert_ne!(
            base.fingerprint,
            local(&call("ns", Some("s"), "k", 2)).fingerprint
        );
        // No ambiguity between the parts' boundaries.
        assert_ne!(
            local(&call("a", Some("b"), "c", 1)).key,
            local(&call("ab", None, "c", 1)).key
        );
        assert_ne!(
            local(&call("a", None, "bc", 1)).key,
            local(&call("ab", None, "c", 1)).key
        );
        // Local keys are not the portable ones.
        let portable = call("ns", Some("s"), "k", 1).identity().unwrap().unwrap();
        assert_ne!(base.key, portable.key);
        assert_ne!(base.fingerprint, portable.fingerprint);
    }

    /// The unscoped key hashes the header recorded before the key material: the bytes
    /// `local_header` gives, whatever the order of the builder calls.
    #[test]
    fn the_recorded_local_input_is_the_header_and_the_key() {
        let mut expected = Buf::new();
        local_header(&mut expected, "ns", None);
        crate::fingerprint::encode("k", &mut expected).unwrap();
        let expected = LOCAL_KEYS.key.hash(expected.all());
        for c in [
            crate::Call::new("ns").key("k").fingerprint((1u8,)),
            crate::Call::new("ns").fingerprint((1u8,)).key("k"),
            crate::Call::new("ns")
                .key("other")
                .key("k")
                .fingerprint((1u8,)),
        ] {
            assert_eq!(local(&c).key.0[..16], expected.as_bytes());
        }
    }

    #[test]
    fn a_missing_key_and_a_failing_argument_are_told_apart() {
        let missing = crate::Call::new("ns").key(None::<String>);
        assert!(missing.encodings.local("ns").is_none());
        assert!(missing.identity().unwrap().is_none());
        struct Bad;
        impl Serialize for Bad {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("cannot"))
            }
        }
        // A failing argument leaves nothing behind: the next recording starts clean.
        let c = crate::Call::new("ns").key("k").fingerprint(Bad);
        assert!(c.identity().is_err());
        let ok = crate::Call::new("ns").key("k");
        assert_eq!(
            c.encodings.portable("ns").unwrap().key,
            ok.identity().unwrap().unwrap().key
        );
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
