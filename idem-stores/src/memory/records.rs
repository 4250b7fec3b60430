//! The completed records of `MemoryStore`: a `moka::sync::Cache` set up for idempotency.
//!
//! What moka does here: the concurrent hash table, the byte bound (through the weigher), the
//! choice of what goes when the bound is reached (LRU), per-record expiry, and the eviction
//! listener. What idem adds: the weight of a record (what it really costs), the LRU policy
//! instead of moka's default TinyLFU admission (a brand-new record is never refused: a retry
//! usually comes soon after the first call), and the deadline on tokio's clock that every
//! read checks (moka's clock is not tokio's; see [`RecordExpiry`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_core::{Bytes, CompletedRecord, FencingToken, Fingerprint};
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use moka::Expiry;
use tokio::time::Instant;

use crate::key_map::{KeyHashing, MapKey};

/// A completed record, as the cache holds it. Cloned by every read (a `Bytes` reference count
/// and a few words), never its value's bytes.
#[derive(Clone, Debug)]
pub(super) struct Record {
    /// The token it was completed under, so that a retried completion is recognised.
    pub(super) token: FencingToken,
    pub(super) fingerprint: Option<Fingerprint>,
    pub(super) value: Bytes,
    /// The deadline on tokio's clock: the one every read checks.
    pub(super) expires_at: Instant,
}

impl Record {
    /// Whether the record is still live at `now` (tokio's clock).
    pub(super) fn live(&self, now: Instant) -> bool {
        self.expires_at > now
    }

    /// The record as the store answers it: a `Bytes` handle on the stored value.
    pub(super) fn answer(self, now: Instant) -> CompletedRecord {
        CompletedRecord {
            fingerprint: self.fingerprint,
            expires_in: Some(self.expires_at.saturating_duration_since(now)),
            value: self.value,
        }
    }
}

/// What a completed record costs beyond its value's bytes, measured with the counting
/// allocator of `idem-bench/benches/memory.rs` at 1,000,000 records (docs/stores/memory.md):
/// moka's entry (its hash-table bucket, the shared key, the entry and its metadata, its nodes
/// in the LRU order and in the timer wheel of per-entry expiry), the record held in it, the
/// shared header of its `Bytes`, and the allocator's own headers.
pub(super) const RECORD_OVERHEAD: usize = 400;

/// The bytes a completed record of `len` value bytes is charged: its value rounded up as the
/// allocator rounds it, plus [`RECORD_OVERHEAD`].
pub(super) fn weight(len: usize) -> usize {
    (len.saturating_add(8 + 15) & !15).saturating_add(RECORD_OVERHEAD)
}

/// Completed records evicted so far, by cause.
///
/// ```
/// let store = idem_stores::MemoryStore::new();
/// let evicted = store.evictions();
/// assert_eq!((evicted.size, evicted.expired), (0, 0));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Evictions {
    /// Evicted to keep the records within `max_bytes` (least recently used first). Such a
    /// record's call runs again on its next repeat, as after its TTL.
    pub size: u64,
    /// Removed by moka's own expiry after their TTL.
    pub expired: u64,
}

#[derive(Debug, Default)]
pub(super) struct EvictionCounts {
    size: AtomicU64,
    expired: AtomicU64,
}

impl EvictionCounts {
    pub(super) fn snapshot(&self) -> Evictions {
        Evictions {
            size: self.size.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
        }
    }

    fn count(&self, cause: RemovalCause) {
        let (counter, label) = match cause {
            RemovalCause::Size => (&self.size, "size"),
            RemovalCause::Expired => (&self.expired, "expired"),
            // Removed by idem itself (a replaced or forgotten record): not an eviction.
            RemovalCause::Explicit | RemovalCause::Replaced => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        idem_core::telemetry::store_eviction("memory", label);
        #[cfg(not(feature = "metrics"))]
        let _ = label;
    }
}

/// moka's per-entry expiry, read from the record's own deadline.
///
/// moka keeps time on its own clock (the real monotonic clock), tokio on tokio's, which a test
/// may pause and advance. The deadline every read checks is on tokio's clock, so a record is
/// never served past its TTL whatever moka's clock says. moka's expiry only frees memory:
/// when tokio's clock is the real clock (any running program) moka gets the record's TTL;
/// when it is not — paused (two reads in a row give the same instant) or advanced (it reads
/// apart from the real clock), in a test — moka gets none, so that it never removes a record
/// that tokio's clock still calls live. Such records are dropped when a read finds them
/// expired, by `purge_expired`, or by the byte bound.
pub(super) struct RecordExpiry;

impl RecordExpiry {
    fn ttl(record: &Record) -> Option<Duration> {
        let now = Instant::now();
        let real = std::time::Instant::now();
        let again = Instant::now();
        let tokio_clock = now.into_std();
        let skew = if tokio_clock > real {
            tokio_clock - real
        } else {
            real - tokio_clock
        };
        let real_clock = again > now && skew < CLOCK_AGREEMENT;
        real_clock.then(|| record.expires_at.saturating_duration_since(now))
    }
}

/// How far apart tokio's clock and the real clock may read (two reads, one after the other)
/// for them to count as the same clock.
const CLOCK_AGREEMENT: Duration = Duration::from_millis(5);

impl Expiry<MapKey, Record> for RecordExpiry {
    fn expire_after_create(
        &self,
        _: &MapKey,
        record: &Record,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Self::ttl(record)
    }

    fn expire_after_update(
        &self,
        _: &MapKey,
        record: &Record,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Self::ttl(record)
    }
}

pub(super) type Records = moka::sync::Cache<MapKey, Record, KeyHashing>;

/// The cache of completed records, bounded at `max_bytes` of weight.
pub(super) fn cache(max_bytes: u64, hashing: KeyHashing, counts: Arc<EvictionCounts>) -> Records {
    moka::sync::Cache::builder()
        .max_capacity(max_bytes)
        .weigher(|_: &MapKey, r: &Record| u32::try_from(weight(r.value.len())).unwrap_or(u32::MAX))
        // Least recently used goes first, and every new record is admitted: TinyLFU (moka's
        // default) may refuse a new record in favour of popular ones, and a refused record
        // is a second execution of its call on the retry that usually follows.
        .eviction_policy(EvictionPolicy::lru())
        .expire_after(RecordExpiry)
        .eviction_listener(move |_, _, cause| counts.count(cause))
        .build_with_hasher(hashing)
}
