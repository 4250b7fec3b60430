//! Durable steps on SQLite: the steps table and its statements, rendered once. The table
//! names are the only text interpolated into SQL; everything else is a bound parameter.

use std::sync::Arc;
use std::time::Duration;

use idem_core::{FencingToken, Key, StepRecord, StoreError};
use sqlx::{AssertSqlSafe, SqliteConnection};

use super::super::steps::STEPS_SUFFIX;
use super::{millis, now_ms};

/// The steps table and every statement on it.
#[derive(Clone)]
pub(super) struct StepStatements {
    /// The steps table's name.
    pub(super) name: String,
    pub(super) create_table: String,
    pub(super) create_index: String,
    pub(super) put: Arc<str>,
    pub(super) clear: Arc<str>,
    pub(super) held: Arc<str>,
    pub(super) load: Arc<str>,
    /// The steps of a call (run with the record's removal, in one transaction).
    pub(super) remove: Arc<str>,
    pub(super) purge: Arc<str>,
}

impl StepStatements {
    /// `table`: the records table's validated name.
    pub(super) fn new(table: &str) -> StepStatements {
        let t = format!("\"{table}\"");
        let name = format!("{table}{STEPS_SUFFIX}");
        let s = format!("\"{name}\"");
        let held =
            format!("SELECT 1 FROM {t} WHERE key = ?1 AND token = ?2 AND state = 'in_progress'");
        StepStatements {
            create_table: format!(
                "CREATE TABLE IF NOT EXISTS {s} (
                    key BLOB NOT NULL CHECK (length(key) = 32),
                    name TEXT NOT NULL,
                    occurrence INTEGER NOT NULL CHECK (occurrence >= 0),
                    status INTEGER NOT NULL,
                    value BLOB NOT NULL,
                    expires_at INTEGER NOT NULL,
                    PRIMARY KEY (key, name, occurrence)
                ) WITHOUT ROWID"
            ),
            create_index: format!(
                "CREATE INDEX IF NOT EXISTS \"{name}_expires\" ON {s} (expires_at)"
            ),
            // ?1 key, ?2 token, ?3 name, ?4 occurrence, ?5 status, ?6 value, ?7 expires at.
            // One statement under SQLite's write lock (taken before it reads): the record is
            // checked and the step written with no other writer in between. One row changed
            // when written (an upsert that updates counts one, even unchanged); none when
            // fenced.
            put: format!(
                "INSERT INTO {s} (key, name, occurrence, status, value, expires_at)
                 SELECT ?1, ?3, ?4, ?5, ?6, ?7 WHERE EXISTS ({held})
                 ON CONFLICT (key, name, occurrence) DO UPDATE SET
                    status = excluded.status,
                    value = excluded.value,
                    expires_at = excluded.expires_at"
            )
            .into(),
            // ?1 key, ?2 token, ?3 name, ?4 occurrence. No row changed: fenced or absent (the
            // caller tells them apart with `held`).
            clear: format!(
                "DELETE FROM {s} WHERE key = ?1 AND name = ?3 AND occurrence = ?4
                   AND EXISTS ({held})"
            )
            .into(),
            // ?1 key, ?2 token.
            held: held.clone().into(),
            // ?1 key, ?2 now.
            load: format!(
                "SELECT name, occurrence, status, value FROM {s}
                  WHERE key = ?1 AND expires_at > ?2"
            )
            .into(),
            // ?1 key.
            remove: format!("DELETE FROM {s} WHERE key = ?1").into(),
            // ?1 now, ?2 batch.
            purge: format!(
                "DELETE FROM {s} WHERE (key, name, occurrence) IN (
                    SELECT key, name, occurrence FROM {s} WHERE expires_at <= ?1
                     ORDER BY expires_at LIMIT ?2
                 )"
            )
            .into(),
            name,
        }
    }

    /// Runs the fenced step write on `conn` (a pooled connection, or the caller's
    /// transaction): rows written, 0 when fenced.
    pub(super) async fn put_on(
        &self,
        conn: &mut SqliteConnection,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(AssertSqlSafe(Arc::clone(&self.put)))
            .bind(&key.0[..])
            .bind(token.as_i64())
            .bind(step.id.name.as_str())
            .bind(i64::from(step.id.occurrence))
            .bind(i64::from(step.status.code()))
            .bind(&step.value[..])
            .bind(now_ms().saturating_add(millis(ttl)))
            .execute(conn)
            .await?;
        Ok(done.rows_affected())
    }

    /// The message of a failed step operation.
    pub(super) fn fail(&self, what: &str, e: sqlx::Error) -> StoreError {
        super::super::steps::fail(what, &self.name, e)
    }
}

impl super::SqliteStore {
    /// The fenced step write on `conn` (the caller's transaction, for
    /// `TransactionalStore::put_step_in`), with the store's limits: rows written, 0 when
    /// fenced.
    pub(crate) async fn put_step_on(
        &self,
        conn: &mut SqliteConnection,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<u64, StoreError> {
        self.inner.core.check_size(&step.value)?;
        super::super::steps::check_name("sqlite", &step.id)?;
        let steps = &self.inner.steps;
        steps
            .put_on(conn, key, token, step, ttl)
            .await
            .map_err(|e| steps.fail("sqlite: put step in transaction", e))
    }
}
