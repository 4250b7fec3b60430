//! Inspecting and forgetting one record, and what a store can tell about all of them — for the
//! people who operate a service (`docs/operations.md`, and the `idem` command-line tool of
//! `idem-stores`, feature `cli`).
//!
//! A record is found the way a call finds it: by the same [`Call`] builder (namespace, scope,
//! key), so nothing about key derivation has to be repeated by hand.
//!
//! ```
//! use idem_core::{Call, Error, RecordStatus};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Error> {
//! let store = idem_stores::MemoryStore::new();
//! let charge = || Call::new("shop::charge").key("order-7").scope("tenant-1");
//! charge().run(&store, async { Ok::<_, Error>(1999u32) }).await?;
//!
//! let info = charge().inspect(&store).await?.expect("the record exists");
//! assert!(matches!(info.status, RecordStatus::Completed { .. }));
//! assert_eq!(info.tag.as_deref(), Some("msgpack;v0"));
//!
//! charge().forget(&store).await?; // the next call runs the body again
//! assert!(charge().inspect(&store).await?.is_none());
//! # Ok(()) }
//! ```

use std::time::Duration;

use crate::codec::Codec;
use crate::error::{Error, StoreError};
use crate::store::{
    ClaimTimes, FencingToken, Fingerprint, Key, RecordState, StepId, StepRecord, StepStatus, Store,
};
use crate::Call;

/// What [`Call::inspect`] reports of one record.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordInfo {
    /// The hashed key the record is stored under (what the store and the logs show).
    pub key: Key,
    /// In progress or completed.
    pub status: RecordStatus,
    /// The fingerprint of the arguments it was claimed with.
    pub fingerprint: Option<Fingerprint>,
    /// For a completed record: its compatibility tag (`"{codec};v{version}"`, and the pinned
    /// schema name if any); `None` for an in-progress one, or bytes that are not an idem
    /// envelope.
    pub tag: Option<String>,
    /// For a completed record: the size of the stored envelope in bytes.
    pub size: Option<usize>,
    /// The call's recorded durable steps ([`step`](crate::step())), by name and occurrence;
    /// empty when it has none or the store keeps no steps.
    pub steps: Vec<StepInfo>,
}

/// One recorded durable step of a call, as [`Call::inspect`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StepInfo {
    /// The step's name and occurrence.
    pub id: StepId,
    /// Started (an at-most-once step in flight, or in doubt), done or failed.
    pub status: StepStatus,
    /// The size of its stored envelope in bytes.
    pub size: usize,
}

impl StepInfo {
    /// What a step record reports.
    pub fn from_record(record: &StepRecord) -> Self {
        StepInfo {
            id: record.id.clone(),
            status: record.status,
            size: record.value.len(),
        }
    }
}

/// The state part of a [`RecordInfo`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordStatus {
    /// Claimed under a live lease.
    InProgress {
        /// The holder's fencing token.
        token: FencingToken,
        /// The claim's age, the lease left and the holder's renewals, as far as the store
        /// knows them: a live holder renews (its renewals grow and its lease keeps moving), a
        /// dead one does not.
        times: ClaimTimes,
    },
    /// Completed and unexpired.
    Completed {
        /// How long it will still be replayed (its remaining TTL), if the store tells.
        expires_in: Option<Duration>,
    },
}

impl RecordInfo {
    /// What a record in `state`, stored under `key`, reports — for tools that find a record
    /// by its hashed key (from a log line) rather than through its [`Call`].
    pub fn from_state(key: Key, state: RecordState) -> Self {
        match state {
            RecordState::InProgress {
                token,
                fingerprint,
                times,
            } => RecordInfo {
                key,
                status: RecordStatus::InProgress { token, times },
                fingerprint,
                tag: None,
                size: None,
                steps: Vec::new(),
            },
            RecordState::Completed(record) => RecordInfo {
                key,
                status: RecordStatus::Completed {
                    expires_in: record.expires_in,
                },
                fingerprint: record.fingerprint,
                tag: crate::codec::peek_tag(&record.value),
                size: Some(record.value.len()),
                steps: Vec::new(),
            },
        }
    }
}

impl<C: Codec> Call<C> {
    /// Finds this call's record — the same (namespace, scope, key) that [`run`](Call::run)
    /// would use — and reports its state, fingerprint, for a completed record its TTL left,
    /// compatibility tag and size, for a claim in progress its age, lease left and renewals
    /// ([`ClaimTimes`]), and its recorded durable steps (read with one more store operation
    /// when the store keeps steps). `Ok(None)` when there is none (never claimed, expired,
    /// released, or forgotten; a released call's steps are kept for its retry, but not
    /// reported here).
    pub async fn inspect(&self, store: &dyn Store) -> Result<Option<RecordInfo>, Error> {
        let key = self.record_key(store)?;
        let Some(state) = store.get(&key).await? else {
            return Ok(None);
        };
        let mut info = RecordInfo::from_state(key, state);
        if store.supports_steps() {
            let mut steps: Vec<StepInfo> = store
                .load_steps(&key)
                .await?
                .iter()
                .map(StepInfo::from_record)
                .collect();
            steps.sort_by(|a, b| a.id.cmp(&b.id));
            info.steps = steps;
        }
        Ok(Some(info))
    }

    /// Removes this call's record, whatever its state, so that the next call runs the body
    /// again. Removing a claim in progress does not stop its body: its completion is then
    /// refused ([`Error::LeaseLost`]) if someone claimed meanwhile, or lands normally if not.
    pub async fn forget(&self, store: &dyn Store) -> Result<(), Error> {
        let key = self.record_key(store)?;
        store.remove(&key).await?;
        Ok(())
    }

    fn record_key(&self, store: &dyn Store) -> Result<Key, Error> {
        match self.identity_for(store)? {
            Some(ident) => Ok(ident.key),
            None => Err(Error::MissingKey),
        }
    }
}

/// What a store can tell about all its records, cheaply (for `idem stats`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Live in-progress claims.
    pub in_progress: u64,
    /// Live completed records.
    pub completed: u64,
    /// Records past their expiry that the store still holds (waiting for a sweep), if it
    /// can tell.
    pub expired: Option<u64>,
    /// How long the oldest live claim has been held, if the store can tell.
    pub oldest_in_progress: Option<Duration>,
    /// Claims whose lease has passed and that nobody has taken over yet (their holders died
    /// or stopped renewing), if the store can tell. They are not in `in_progress`; a store
    /// that deletes them on its own (Redis, after the lease grace) only counts those it
    /// still holds.
    pub expired_unclaimed: Option<u64>,
}

impl StoreStats {
    /// Stats from their parts.
    pub fn new(
        in_progress: u64,
        completed: u64,
        expired: Option<u64>,
        oldest_in_progress: Option<Duration>,
    ) -> Self {
        StoreStats {
            in_progress,
            completed,
            expired,
            oldest_in_progress,
            expired_unclaimed: None,
        }
    }

    /// The same stats, with the count of claims whose lease has passed unclaimed.
    ///
    /// ```
    /// let s = idem_core::StoreStats::new(1, 2, Some(0), None).with_expired_unclaimed(Some(4));
    /// assert_eq!(s.expired_unclaimed, Some(4));
    /// ```
    pub fn with_expired_unclaimed(mut self, n: Option<u64>) -> Self {
        self.expired_unclaimed = n;
        self
    }
}

/// Administration a backend offers beyond the [`Store`] contract: counts by state and the
/// removal of expired records. Implemented by the stores of `idem-stores`.
#[async_trait::async_trait]
pub trait StoreAdmin: Store {
    /// Counts records by state. May scan: for operators, not for the hot path.
    async fn stats(&self) -> Result<StoreStats, StoreError>;

    /// Removes up to `batch` expired records; returns how many it removed. A store whose
    /// records expire natively (Redis `PX`) returns `Ok(0)`.
    async fn purge_expired(&self, batch: u32) -> Result<u64, StoreError>;
}
