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

/// A completed record, as the cache holds it: one shared buffer, its head the record's
/// deadline, the token it was completed under and its fingerprint, then the stored value.
/// One allocation and two words in moka's entry, so that a record costs little more than its
/// value. moka clones a value on insert and on every read: here a reference count, never the
/// bytes. A replay gets a `Bytes` that owns a reference to the buffer (`Bytes::from_owner`,
/// one small allocation per replay). Holding a `Bytes` instead would spare that allocation
/// (about 300 instructions a replay) but costs every record its shared header and a wider
/// handle in moka's entry: measured, 392 rather than 369 bytes a record at 1,000,000
/// records, past the bound of 1.3× raw moka (297), and more resident memory.
///
/// Layout: deadline (`i64` LE, nanoseconds from the store's [`Clock`] base) · token (`u64` LE)
/// · the fingerprint's form · its bytes · the value. The form is 0 for none, 1 for a
/// 32-byte fingerprint, 2 for a process-local one (its second half zero: only the first 16
/// bytes are kept).
#[derive(Clone, Debug)]
pub(super) struct Record(Arc<[u8]>);

const HEAD: usize = 17;

impl Record {
    /// Builds a record (outside any lock: this is where the value is copied).
    pub(super) fn new(
        clock: &Clock,
        expires_at: Instant,
        token: FencingToken,
        fingerprint: Option<Fingerprint>,
        value: &[u8],
    ) -> Self {
        let (form, fp): (u8, &[u8]) = match &fingerprint {
            None => (0, &[]),
            Some(fp) if fp.0[16..] == [0u8; 16] => (2, &fp.0[..16]),
            Some(fp) => (1, &fp.0[..]),
        };
        // One allocation, the record's own: a zeroed buffer of the exact length (an exact-size
        // iterator is collected into an `Arc<[u8]>` in place), then filled.
        let len = HEAD + fp.len() + value.len();
        let mut record: Arc<[u8]> = std::iter::repeat_n(0u8, len).collect();
        let Some(buf) = Arc::get_mut(&mut record) else {
            unreachable!("a new Arc has no other handle")
        };
        let (head, rest) = buf.split_at_mut(HEAD);
        head[..8].copy_from_slice(&clock.ticks(expires_at).to_le_bytes());
        head[8..16].copy_from_slice(&token.0.to_le_bytes());
        head[16] = form;
        let (fp_part, value_part) = rest.split_at_mut(fp.len());
        fp_part.copy_from_slice(fp);
        value_part.copy_from_slice(value);
        Record(record)
    }

    fn word(&self, at: usize) -> [u8; 8] {
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.0[at..at + 8]);
        w
    }

    fn deadline(&self) -> i64 {
        i64::from_le_bytes(self.word(0))
    }

    /// The token it was completed under, so that a retried completion is recognised.
    pub(super) fn token(&self) -> FencingToken {
        FencingToken(u64::from_le_bytes(self.word(8)))
    }

    fn fp_len(&self) -> usize {
        match self.0[16] {
            1 => 32,
            2 => 16,
            _ => 0,
        }
    }

    fn fingerprint(&self) -> Option<Fingerprint> {
        let n = self.fp_len();
        (n > 0).then(|| {
            let mut fp = [0u8; 32];
            fp[..n].copy_from_slice(&self.0[HEAD..HEAD + n]);
            Fingerprint(fp)
        })
    }

    /// The bytes the record takes: head, fingerprint and value.
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the record is still live at `now` (tokio's clock).
    pub(super) fn live(&self, clock: &Clock, now: Instant) -> bool {
        self.live_at(clock.ticks(now))
    }

    /// [`live`](Self::live) at `now` in [`Clock::ticks`].
    pub(super) fn live_at(&self, now: i64) -> bool {
        self.deadline() > now
    }

    /// How long the record still lives at `now` (in [`Clock::ticks`]).
    fn remaining_at(&self, now: i64) -> Duration {
        let left = self.deadline().saturating_sub(now);
        Duration::from_nanos(u64::try_from(left).unwrap_or(0))
    }

    /// The record as the store answers it: a `Bytes` handle on the stored value.
    pub(super) fn answer(self, clock: &Clock, now: Instant) -> CompletedRecord {
        self.answer_at(clock.ticks(now))
    }

    /// [`answer`](Self::answer) at `now` in [`Clock::ticks`].
    /// The record lent as a replay's answer at `now` (ticks).
    pub(super) fn lend_at(&self, now: i64) -> idem_core::CompletedRef<'_> {
        idem_core::CompletedRef {
            fingerprint: self.fingerprint(),
            expires_in: Some(self.remaining_at(now)),
            value: &self.0[HEAD + self.fp_len()..],
        }
    }

    pub(super) fn answer_at(self, now: i64) -> CompletedRecord {
        let at = HEAD + self.fp_len();
        CompletedRecord {
            fingerprint: self.fingerprint(),
            expires_in: Some(self.remaining_at(now)),
            value: Bytes::from_owner(Tail(self.0, at)),
        }
    }
}

/// A record's value: its buffer from an offset on (a `Bytes` owner, so that the handle is
/// built in one step rather than sliced).
struct Tail(Arc<[u8]>, usize);

impl AsRef<[u8]> for Tail {
    fn as_ref(&self) -> &[u8] {
        &self.0[self.1..]
    }
}

/// Instants on tokio's clock as signed nanoseconds from a base, so that a record's deadline
/// takes one word.
#[derive(Clone, Copy, Debug)]
pub(super) struct Clock {
    base: Instant,
}

impl Clock {
    pub(super) fn new() -> Self {
        Clock {
            base: Instant::now(),
        }
    }

    pub(super) fn ticks(&self, t: Instant) -> i64 {
        let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        if t >= self.base {
            nanos(t - self.base)
        } else {
            -nanos(self.base - t)
        }
    }
}

/// What a completed record costs beyond its value's bytes, measured with the counting
/// allocator of `idem-bench/benches/memory.rs` at 1,000,000 records (docs/stores/memory.md):
/// moka's entry (its hash-table bucket, the shared key, the entry and its metadata, its nodes
/// in the LRU order and in the timer wheel of per-entry expiry) with the record's `Bytes`
/// handle in it, the shared header a `Bytes` gets when a replay first clones it, and the
/// allocator's own headers.
pub(super) const RECORD_OVERHEAD: usize = 400;

/// The bytes a completed record of `len` bytes (head, fingerprint and value) is charged: its
/// buffer rounded up as the allocator rounds it, plus [`RECORD_OVERHEAD`].
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
/// when tokio's clock is the real clock (any running program) moka gets the record's TTL
/// plus [`RECLAIM_AFTER`]; when it is not — paused (two reads in a row give the same instant)
/// or advanced (it reads apart from the real clock), in a test — moka gets none, so that it
/// never removes a record that tokio's clock still calls live. Such records are dropped when a read finds them
/// expired, by `purge_expired`, or by the byte bound.
pub(super) struct RecordExpiry {
    clock: Clock,
}

impl RecordExpiry {
    /// The TTL moka gets for `record`, created at `created_at` on moka's clock (the real
    /// clock, read by moka just before: no third clock read here).
    fn ttl(&self, record: &Record, created_at: std::time::Instant) -> Option<Duration> {
        let now = Instant::now();
        let again = Instant::now();
        let tokio_clock = now.into_std();
        let skew = if tokio_clock > created_at {
            tokio_clock - created_at
        } else {
            created_at - tokio_clock
        };
        let real_clock = again > now && skew < CLOCK_AGREEMENT;
        real_clock.then(|| {
            record
                .remaining_at(self.clock.ticks(now))
                .saturating_add(RECLAIM_AFTER)
        })
    }
}

/// How long after its deadline moka reclaims a record. The deadline on tokio's clock decides
/// (no read answers a record past it); moka's expiry trails it, so that it never drops a
/// record first (its clock is read at another instant), and so that `stats` and
/// `purge_expired` still see a record that has just expired. About two ticks of moka's timer
/// wheel, which is that coarse anyway.
const RECLAIM_AFTER: Duration = Duration::from_secs(2);

/// How far apart tokio's clock and the real clock may read (two reads, one after the other)
/// for them to count as the same clock.
const CLOCK_AGREEMENT: Duration = Duration::from_millis(5);

impl Expiry<MapKey, Record> for RecordExpiry {
    fn expire_after_create(
        &self,
        _: &MapKey,
        record: &Record,
        created_at: std::time::Instant,
    ) -> Option<Duration> {
        self.ttl(record, created_at)
    }

    fn expire_after_update(
        &self,
        _: &MapKey,
        record: &Record,
        updated_at: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.ttl(record, updated_at)
    }
}

pub(super) type Records = moka::sync::Cache<MapKey, Record, KeyHashing>;

/// The cache of completed records, bounded at `max_bytes` of weight.
pub(super) fn cache(
    max_bytes: u64,
    hashing: KeyHashing,
    clock: Clock,
    counts: Arc<EvictionCounts>,
) -> Records {
    moka::sync::Cache::builder()
        .max_capacity(max_bytes)
        .weigher(|_: &MapKey, r: &Record| u32::try_from(weight(r.len())).unwrap_or(u32::MAX))
        // Least recently used goes first, and every new record is admitted: TinyLFU (moka's
        // default) may refuse a new record in favour of popular ones, and a refused record
        // is a second execution of its call on the retry that usually follows.
        .eviction_policy(EvictionPolicy::lru())
        .expire_after(RecordExpiry { clock })
        .eviction_listener(move |_, _, cause| counts.count(cause))
        .build_with_hasher(hashing)
}
