//! Durable steps on PostgreSQL: the steps table and its statements, rendered once. The table
//! names are the only text interpolated into SQL; everything else is a bound parameter.

use std::sync::Arc;
use std::time::Duration;

use idem_core::{FencingToken, Key, StepId, StepRecord, StoreError};
use sqlx::{AssertSqlSafe, PgConnection, Row};

use super::super::steps::STEPS_SUFFIX;
use super::schema::Table;

/// The steps table and every statement on it.
#[derive(Clone)]
pub(super) struct StepStatements {
    /// The steps table as named in messages (`name_steps` or `schema.name_steps`).
    pub(super) display: String,
    pub(super) create_table: String,
    pub(super) create_index: String,
    pub(super) put: Arc<str>,
    pub(super) clear: Arc<str>,
    pub(super) load: Arc<str>,
    /// The call's record and its steps, in one statement.
    pub(super) remove: Arc<str>,
    pub(super) purge: Arc<str>,
}

impl StepStatements {
    pub(super) fn new(table: &Table) -> StepStatements {
        let t = &table.quoted;
        let name = format!("{}{STEPS_SUFFIX}", table.name);
        // `schema.name` keeps its schema: `"schema"."name_steps"`.
        let (s, display) = match table.display.rsplit_once('.') {
            Some((schema, _)) => (
                format!("\"{schema}\".\"{name}\""),
                format!("{schema}.{name}"),
            ),
            None => (format!("\"{name}\""), name.clone()),
        };
        // Held: the call's record in progress under the token, locked for share until the
        // statement's transaction commits. A takeover, a completion or a removal (which update
        // or delete that row) waits for the step write, and the step write waits for them:
        // in READ COMMITTED the locked row is read again in its newest committed version, so
        // a record taken over meanwhile no longer matches.
        let held = format!(
            "SELECT 1 FROM {t} WHERE key = $1 AND token = $2 AND state = 'in_progress' FOR SHARE"
        );
        StepStatements {
            // Names of at most 48 bytes (the records table's limit) keep the index name
            // (`<name>_steps_expires`) under PostgreSQL's 63.
            create_table: format!(
                "CREATE TABLE IF NOT EXISTS {s} (
                    key BYTEA NOT NULL CHECK (octet_length(key) = 32),
                    name BYTEA NOT NULL,  -- UTF-8 bytes: a name may hold any character, NUL included
                    occurrence BIGINT NOT NULL CHECK (occurrence >= 0),
                    status SMALLINT NOT NULL,
                    value BYTEA NOT NULL,
                    expires_at TIMESTAMPTZ NOT NULL,
                    PRIMARY KEY (key, name, occurrence)
                )"
            ),
            create_index: format!(
                "CREATE INDEX IF NOT EXISTS \"{name}_expires\" ON {s} (expires_at)"
            ),
            // $1 key, $2 token, $3 name, $4 occurrence, $5 status, $6 value, $7 ttl ms.
            // One row affected when written (inserted, or replaced: PostgreSQL counts an
            // upsert that updates as one row even when nothing changes); none when fenced.
            // The expiry counts from the statement's time (also inside a transaction).
            put: format!(
                "WITH held AS ({held})
                INSERT INTO {s} AS s (key, name, occurrence, status, value, expires_at)
                SELECT $1, $3, $4, $5, $6,
                       statement_timestamp() + $7::float8 * interval '1 millisecond'
                  FROM held
                ON CONFLICT (key, name, occurrence) DO UPDATE SET
                    status = EXCLUDED.status,
                    value = EXCLUDED.value,
                    expires_at = EXCLUDED.expires_at"
            )
            .into(),
            // $1 key, $2 token, $3 name, $4 occurrence. One row: 1 when the record is held
            // (the step row, if any, is deleted), 0 when fenced.
            clear: format!(
                "WITH held AS ({held}),
                gone AS (
                    DELETE FROM {s} WHERE key = $1 AND name = $3 AND occurrence = $4
                       AND EXISTS (SELECT 1 FROM held)
                )
                SELECT count(*) AS held FROM held"
            )
            .into(),
            // $1 key.
            load: format!(
                "SELECT name, occurrence, status::int8 AS status, value FROM {s}
                  WHERE key = $1 AND expires_at > now()"
            )
            .into(),
            // $1 key, $2 channel, $3 key hex. The record (notifying its waiters) and its steps.
            remove: format!(
                "WITH gone AS (DELETE FROM {t} WHERE key = $1 RETURNING key),
                steps_gone AS (DELETE FROM {s} WHERE key = $1)
                SELECT pg_notify($2, $3) FROM gone"
            )
            .into(),
            // $1 batch. SKIP LOCKED: a row being written right now is not ours.
            purge: format!(
                "DELETE FROM {s} WHERE (key, name, occurrence) IN (
                    SELECT key, name, occurrence FROM {s} WHERE expires_at <= now()
                     ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED
                ) AND expires_at <= now()"
            )
            .into(),
            display,
        }
    }

    /// Runs the fenced step write on `conn` (a pooled connection, or the caller's
    /// transaction): rows written, 0 when fenced.
    pub(super) async fn put_on(
        &self,
        conn: &mut PgConnection,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(AssertSqlSafe(Arc::clone(&self.put)))
            .bind(&key.0[..])
            .bind(token.as_i64())
            .bind(step.id.name.as_bytes())
            .bind(i64::from(step.id.occurrence))
            .bind(i16::from(step.status.code()))
            .bind(&step.value[..])
            .bind(super::millis(ttl))
            .execute(conn)
            .await?;
        Ok(done.rows_affected())
    }

    /// Runs the fenced step removal on `conn`: whether the record was held.
    pub(super) async fn clear_on(
        &self,
        conn: &mut PgConnection,
        key: &Key,
        token: FencingToken,
        id: &StepId,
    ) -> Result<bool, sqlx::Error> {
        let held: i64 = sqlx::query(AssertSqlSafe(Arc::clone(&self.clear)))
            .bind(&key.0[..])
            .bind(token.as_i64())
            .bind(id.name.as_bytes())
            .bind(i64::from(id.occurrence))
            .fetch_one(conn)
            .await?
            .try_get("held")?;
        Ok(held > 0)
    }

    /// The message of a failed step operation.
    pub(super) fn fail(&self, what: &str, e: sqlx::Error) -> StoreError {
        super::super::steps::fail(what, &self.display, e)
    }
}

impl super::PostgresStore {
    /// The fenced step write on `conn` (the caller's transaction, for
    /// `TransactionalStore::put_step_in`), with the store's limits: rows written, 0 when
    /// fenced.
    pub(crate) async fn put_step_on(
        &self,
        conn: &mut PgConnection,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<u64, StoreError> {
        self.inner.core.check_size(&step.value)?;
        super::super::steps::check_name("postgres", &step.id)?;
        let steps = &self.inner.steps;
        steps
            .put_on(conn, key, token, step, ttl)
            .await
            .map_err(|e| steps.fail("postgres: put step in transaction", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steps_table_sits_beside_the_records_table() {
        let plain = Table::parse("idem_records").map(|t| StepStatements::new(&t).display);
        assert_eq!(plain.ok().as_deref(), Some("idem_records_steps"));
        let longest = "a".repeat(48);
        let s = Table::parse(&format!("app.{longest}")).map(|t| StepStatements::new(&t));
        let s = s.ok();
        assert_eq!(
            s.as_ref().map(|s| s.display.clone()),
            Some(format!("app.{longest}_steps"))
        );
        assert!(s.is_some_and(|s| s
            .create_table
            .contains(&format!("\"app\".\"{longest}_steps\""))));
        // The index name fits PostgreSQL's 63 bytes.
        assert!(format!("{longest}_steps_expires").len() <= 63);
    }
}
