//! [`StoreAdmin`] for [`SqliteStore`]: counts by state in one statement, and the store's own
//! purge.

use idem_core::{async_trait, StoreAdmin, StoreError, StoreStats};
use sqlx::{AssertSqlSafe, Row};

use super::super::from_millis;
use super::{now_ms, SqliteStore};

#[async_trait]
impl StoreAdmin for SqliteStore {
    /// Counts the table's rows by state at the store's clock (SQLite is local: the clock of
    /// the machine that holds the file): live claims, live completed records, and rows past
    /// `expires_at` that the sweep has not deleted yet; the age of the oldest live claim, and
    /// the claims whose lease passed with nobody taking them over. A claim written before the
    /// table had `claimed_at` has no age.
    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let sql = format!(
            "SELECT COUNT(CASE WHEN state = 'in_progress' AND lease_until > ?1 THEN 1 END),
                    COUNT(CASE WHEN state = 'completed' AND expires_at > ?1 THEN 1 END),
                    COUNT(CASE WHEN expires_at <= ?1 THEN 1 END),
                    MIN(CASE WHEN state = 'in_progress' AND lease_until > ?1 THEN claimed_at END),
                    COUNT(CASE WHEN state = 'in_progress' AND lease_until <= ?1 THEN 1 END)
               FROM \"{}\"",
            self.inner.core.table
        );
        let now = now_ms();
        let row = self
            .inner
            .core
            .timed(
                "sqlite: stats",
                sqlx::query(AssertSqlSafe(sql))
                    .bind(now)
                    .fetch_one(&self.inner.pool),
            )
            .await?;
        let count = |i: usize| -> Result<u64, StoreError> {
            let n: i64 = row
                .try_get(i)
                .map_err(|e| StoreError::Corrupt(format!("sqlite: stats: {e}")))?;
            Ok(u64::try_from(n).unwrap_or(0))
        };
        let oldest: Option<i64> = row
            .try_get(3)
            .map_err(|e| StoreError::Corrupt(format!("sqlite: stats: {e}")))?;
        let oldest = oldest.map(|at| from_millis(now.saturating_sub(at)));
        Ok(
            StoreStats::new(count(0)?, count(1)?, Some(count(2)?), oldest)
                .with_expired_unclaimed(Some(count(4)?)),
        )
    }

    /// [`SqliteStore::purge_expired`].
    async fn purge_expired(&self, batch: u32) -> Result<u64, StoreError> {
        SqliteStore::purge_expired(self, batch).await
    }
}
