//! [`StoreAdmin`] for [`MemoryStore`]: counts by state over the claim shards and the record
//! cache, and the removal of expired records and lapsed claims (which the store otherwise
//! drops when it meets them, and moka when its own expiry or the byte bound comes).

use idem_core::{async_trait, StoreAdmin, StoreError, StoreStats};
use tokio::time::Instant;

use super::MemoryStore;
use crate::key_map::MapKey;

#[async_trait]
impl StoreAdmin for MemoryStore {
    /// Counts records by state, one claim shard at a time and then the record cache (so the
    /// counts are not one snapshot). Claims whose lease passed (nobody took them over yet)
    /// count as `expired_unclaimed` and as `expired`.
    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let now = Instant::now();
        let (mut in_progress, mut completed, mut expired) = (0u64, 0u64, 0u64);
        let (mut unclaimed, mut oldest) = (0u64, None::<Instant>);
        for lane in self.inner.lanes.iter() {
            for held in lane.lock().values() {
                if held.lease_until > now {
                    in_progress += 1;
                    oldest = Some(oldest.map_or(held.since, |o| o.min(held.since)));
                } else {
                    expired += 1;
                    unclaimed += 1;
                }
            }
        }
        for (_, record) in self.inner.records.iter() {
            if record.live(&self.inner.clock, now) {
                completed += 1;
            } else {
                expired += 1;
            }
        }
        let oldest = oldest.map(|since| now.saturating_duration_since(since));
        Ok(
            StoreStats::new(in_progress, completed, Some(expired), oldest)
                .with_expired_unclaimed(Some(unclaimed)),
        )
    }

    /// Removes up to `batch` expired records, lapsed claims and expired durable steps;
    /// returns how many.
    async fn purge_expired(&self, batch: u32) -> Result<u64, StoreError> {
        let now = Instant::now();
        let mut left = batch as usize;
        let mut removed = 0u64;
        for lane in self.inner.lanes.iter() {
            if left == 0 {
                return Ok(removed);
            }
            let mut claims = lane.lock();
            let dead: Vec<MapKey> = claims
                .iter()
                .filter(|(_, held)| held.lease_until <= now)
                .map(|(k, _)| *k)
                .take(left)
                .collect();
            for k in &dead {
                self.unclaim(&mut claims, k);
            }
            left -= dead.len();
            removed += dead.len() as u64;
        }
        let dead: Vec<MapKey> = self
            .inner
            .records
            .iter()
            .filter(|(_, record)| !record.live(&self.inner.clock, now))
            .map(|(k, _)| *k)
            .take(left)
            .collect();
        for k in &dead {
            // Under the key's lane lock, and only if still expired: never a fresh record
            // completed since the scan.
            let _claims = self.lane(&k.0).lock();
            if self
                .inner
                .records
                .get(k)
                .is_some_and(|record| !record.live(&self.inner.clock, now))
            {
                self.inner.records.invalidate(k);
                removed += 1;
            }
        }
        // Expired durable steps (of calls completed, released or gone).
        let left = (batch as usize).saturating_sub(removed as usize);
        removed += self.inner.steps.purge(left, now) as u64;
        Ok(removed)
    }
}
