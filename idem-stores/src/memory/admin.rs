//! [`StoreAdmin`] for [`MemoryStore`]: counts by state over every shard, and the removal of
//! expired records and lapsed claims (which the store otherwise drops lazily, when it needs
//! the room).

use idem_core::{async_trait, StoreAdmin, StoreError, StoreStats};
use tokio::time::Instant;

use super::shard::{MapKey, Slot};
use super::{lock, MemoryStore};

#[async_trait]
impl StoreAdmin for MemoryStore {
    /// Counts records by state, one shard lock at a time (so the counts are not one
    /// snapshot). The store does not keep claim times: `oldest_in_progress` is `None`.
    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let now = Instant::now();
        let (mut in_progress, mut completed, mut expired) = (0u64, 0u64, 0u64);
        for lane in self.inner.lanes.iter() {
            let shard = lock(&lane.records);
            for slot in shard.map.values() {
                match slot {
                    Slot::InProgress { lease_until, .. } if *lease_until > now => in_progress += 1,
                    Slot::Completed { expires_at, .. } if *expires_at > now => completed += 1,
                    _ => expired += 1,
                }
            }
        }
        Ok(StoreStats::new(in_progress, completed, Some(expired), None))
    }

    /// Removes up to `batch` expired records and lapsed claims; returns how many.
    async fn purge_expired(&self, batch: u32) -> Result<u64, StoreError> {
        let now = Instant::now();
        let mut left = batch as usize;
        let mut removed = 0u64;
        for lane in self.inner.lanes.iter() {
            if left == 0 {
                break;
            }
            let mut shard = lock(&lane.records);
            let dead: Vec<MapKey> = shard
                .map
                .iter()
                .filter(|(_, slot)| match slot {
                    Slot::InProgress { lease_until, .. } => *lease_until <= now,
                    Slot::Completed { expires_at, .. } => *expires_at <= now,
                })
                .map(|(k, _)| *k)
                .take(left)
                .collect();
            let before = shard.claims;
            for k in &dead {
                shard.remove(&k.0);
            }
            let freed = before - shard.claims;
            drop(shard);
            if freed > 0 {
                self.inner
                    .claims
                    .fetch_sub(freed, std::sync::atomic::Ordering::Relaxed);
            }
            left -= dead.len();
            removed += dead.len() as u64;
        }
        Ok(removed)
    }
}
