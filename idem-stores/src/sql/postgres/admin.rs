//! [`StoreAdmin`] for [`PostgresStore`]: counts by state in one statement on the database's
//! clock, and the store's own purge.

use idem_core::{async_trait, StoreAdmin, StoreError, StoreStats};
use sqlx::{AssertSqlSafe, Row};

use super::super::from_millis;
use super::schema::Table;
use super::PostgresStore;

#[async_trait]
impl StoreAdmin for PostgresStore {
    /// Counts the table's rows by state on the database's clock (`now()`): live claims, live
    /// completed records, and rows past `expires_at` that the sweep has not deleted yet; the
    /// age of the oldest live claim, and the claims whose lease passed with nobody taking them
    /// over. One sequential scan: for operators, not for the hot path. A claim written before
    /// the table had `claimed_at` has no age.
    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let table = Table::parse(&self.inner.core.table)?;
        let sql = format!(
            "SELECT COUNT(CASE WHEN state = 'in_progress' AND lease_until > now() THEN 1 END),
                    COUNT(CASE WHEN state = 'completed' AND expires_at > now() THEN 1 END),
                    COUNT(CASE WHEN expires_at <= now() THEN 1 END),
                    FLOOR(EXTRACT(EPOCH FROM (now() - MIN(CASE
                        WHEN state = 'in_progress' AND lease_until > now() THEN claimed_at END)))
                        * 1000)::bigint,
                    COUNT(CASE WHEN state = 'in_progress' AND lease_until <= now() THEN 1 END)
               FROM {}",
            table.quoted
        );
        let row = self
            .inner
            .core
            .timed(
                "postgres: stats",
                sqlx::query(AssertSqlSafe(sql)).fetch_one(&self.inner.pool),
            )
            .await?;
        let count = |i: usize| -> Result<u64, StoreError> {
            let n: i64 = row
                .try_get(i)
                .map_err(|e| StoreError::Corrupt(format!("postgres: stats: {e}")))?;
            Ok(u64::try_from(n).unwrap_or(0))
        };
        let oldest: Option<i64> = row
            .try_get(3)
            .map_err(|e| StoreError::Corrupt(format!("postgres: stats: {e}")))?;
        Ok(StoreStats::new(
            count(0)?,
            count(1)?,
            Some(count(2)?),
            oldest.map(from_millis),
        )
        .with_expired_unclaimed(Some(count(4)?)))
    }

    /// [`PostgresStore::purge_expired`].
    async fn purge_expired(&self, batch: u32) -> Result<u64, StoreError> {
        PostgresStore::purge_expired(self, batch).await
    }
}
