//! [`StoreAdmin`] for [`TieredStore`]: the shared store is the source of truth, so its stats
//! and its purge are the tiered store's.

use idem_core::{async_trait, StoreAdmin, StoreError, StoreStats};

use super::TieredStore;

#[async_trait]
impl<S: StoreAdmin> StoreAdmin for TieredStore<S> {
    /// The shared store's counts (the local tier only holds copies of its completed records).
    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.shared.stats().await
    }

    /// The shared store's purge.
    async fn purge_expired(&self, batch: u32) -> Result<u64, StoreError> {
        self.shared.purge_expired(batch).await
    }
}
