//! [`StoreAdmin`] for [`MySqlStore`]: counts by state in one statement on the server's clock,
//! and the store's own purge.

use idem_core::{async_trait, StoreAdmin, StoreError, StoreStats};
use sqlx::{AssertSqlSafe, Row};

use super::{quote_table, MySqlStore, NOW_MS};

#[async_trait]
impl StoreAdmin for MySqlStore {
    /// Counts the table's rows by state on the server's clock: live claims, live completed
    /// records, and rows past `expires_at` that the sweep has not deleted yet; the age of the
    /// oldest live claim, and the claims whose lease passed with nobody taking them over. One
    /// scan: for operators, not for the hot path. A claim written before the table had
    /// `claimed_at` has no age.
    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let table = quote_table(&self.inner.core.table)?;
        let sql = format!(
            "SELECT COUNT(CASE WHEN state = 'in_progress' AND live_until > {NOW_MS} THEN 1 END),
                    COUNT(CASE WHEN state = 'completed' AND live_until > {NOW_MS} THEN 1 END),
                    COUNT(CASE WHEN expires_at < {NOW_MS} THEN 1 END),
                    CAST({NOW_MS} - MIN(CASE WHEN state = 'in_progress' AND live_until > {NOW_MS}
                                        THEN claimed_at END) AS SIGNED),
                    COUNT(CASE WHEN state = 'in_progress' AND live_until <= {NOW_MS} THEN 1 END)
               FROM {table}"
        );
        let row = self
            .inner
            .core
            .timed(
                "mysql: stats",
                sqlx::query(AssertSqlSafe(sql)).fetch_one(&self.inner.pool),
            )
            .await?;
        let count = |i: usize| -> Result<u64, StoreError> {
            let n: i64 = row
                .try_get(i)
                .map_err(|e| StoreError::Corrupt(format!("mysql: stats: {e}")))?;
            Ok(u64::try_from(n).unwrap_or(0))
        };
        let oldest: Option<i64> = row
            .try_get(3)
            .map_err(|e| StoreError::Corrupt(format!("mysql: stats: {e}")))?;
        Ok(StoreStats::new(
            count(0)?,
            count(1)?,
            Some(count(2)?),
            oldest.map(super::super::from_millis),
        )
        .with_expired_unclaimed(Some(count(4)?)))
    }

    /// [`MySqlStore::purge_expired`].
    async fn purge_expired(&self, batch: u32) -> Result<u64, StoreError> {
        MySqlStore::purge_expired(self, batch).await
    }
}
