//! Durable steps on MySQL / MariaDB: the steps table and its statements, built once. The
//! table names are the only text interpolated into SQL (validated identifiers, quoted);
//! everything else is a bound parameter.

use std::time::Duration;

use idem_core::{FencingToken, Key, StepRecord, StoreError};
use sqlx::{AssertSqlSafe, MySqlConnection};

use super::super::steps::STEPS_SUFFIX;
use super::{ms, Sql, NOW_MS};

/// MySQL's longest identifier.
const MAX_IDENTIFIER: usize = 64;

/// The steps table and every statement on it.
#[derive(Debug)]
pub(super) struct StepStatements {
    /// The steps table as named in messages (`name_steps` or `database.name_steps`).
    pub(super) display: String,
    pub(super) create: Sql,
    pub(super) put: Sql,
    /// Whether the record is in progress under a token, by a locking read (inside a
    /// transaction: the newest committed version, whatever the isolation level).
    pub(super) held_in: Sql,
    pub(super) clear: Sql,
    pub(super) load: Sql,
    /// The call's record and its steps, in one statement.
    pub(super) remove: Sql,
    pub(super) purge: Sql,
}

/// The steps table of the records table `table` (a validated `name` or `database.name`):
/// `name_steps`, in the same database. A name too long for the suffix (MySQL identifiers
/// have at most 64 bytes) keeps its first 41 bytes and a hash of the whole name.
fn steps_table(table: &str) -> String {
    let (database, name) = match table.rsplit_once('.') {
        Some((database, name)) => (Some(database), name),
        None => (None, table),
    };
    let name = if name.len() + STEPS_SUFFIX.len() <= MAX_IDENTIFIER {
        format!("{name}{STEPS_SUFFIX}")
    } else {
        // FNV-1a: stable across versions and platforms (the name is stored in databases).
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        // Identifiers are ASCII: byte slicing is exact.
        format!("{}_{hash:016x}{STEPS_SUFFIX}", &name[..41])
    };
    match database {
        Some(database) => format!("{database}.{name}"),
        None => name,
    }
}

impl StepStatements {
    /// `table` is the records table as configured (already validated).
    pub(super) fn new(table: &str, records: &str) -> StepStatements {
        let display = steps_table(table);
        let s = display
            .split('.')
            .map(|p| format!("`{p}`"))
            .collect::<Vec<_>>()
            .join(".");
        let t = records;
        StepStatements {
            // The name is bytes (VARBINARY): compared exactly, whatever the server's
            // collation ("Charge" and "charge" are two steps).
            create: format!(
                "CREATE TABLE IF NOT EXISTS {s} ( \
                   k BINARY(32) NOT NULL, \
                   name VARBINARY(512) NOT NULL, \
                   occurrence INT UNSIGNED NOT NULL, \
                   status TINYINT UNSIGNED NOT NULL, \
                   value MEDIUMBLOB NOT NULL, \
                   expires_at BIGINT NOT NULL, \
                   PRIMARY KEY (k, name, occurrence), \
                   KEY idem_steps_expires_at (expires_at) \
                 ) ENGINE=InnoDB"
            )
            .into(),
            // Binds: name, occurrence, status, value, ttl ms, key, token.
            // The record is read with a locking read (the newest committed version, locked
            // for share until the statement commits): a takeover or completion waits for the
            // step write, or the step write waits for them and finds another token. No row
            // selected: fenced, nothing written. Affected rows: 1 inserted, 2 replaced, and
            // for a replacement by an identical row 1 with CLIENT_FOUND_ROWS (which sqlx
            // asks for) or 0 without it (told from fenced by the caller).
            put: format!(
                "INSERT INTO {s} (k, name, occurrence, status, value, expires_at) \
                 SELECT r.k, ?, ?, ?, ?, {NOW_MS} + ? FROM {t} r \
                  WHERE r.k = ? AND r.token = ? AND r.state = 'in_progress' \
                 LOCK IN SHARE MODE \
                 ON DUPLICATE KEY UPDATE status = VALUES(status), value = VALUES(value), \
                   expires_at = VALUES(expires_at)"
            )
            .into(),
            // Binds: key, token.
            held_in: format!(
                "SELECT 1 FROM {t} WHERE k = ? AND token = ? AND state = 'in_progress' \
                 LOCK IN SHARE MODE"
            )
            .into(),
            // Binds: key, name, occurrence, token. Deletes the step row only if the record is
            // in progress under the token; no row affected is fenced or absent (the caller
            // tells them apart).
            clear: format!(
                "DELETE s FROM {s} s JOIN {t} r ON r.k = s.k \
                  WHERE s.k = ? AND s.name = ? AND s.occurrence = ? \
                    AND r.token = ? AND r.state = 'in_progress'"
            )
            .into(),
            // Binds: key.
            load: format!(
                "SELECT name, CAST(occurrence AS SIGNED) AS occurrence, \
                        CAST(status AS SIGNED) AS status, value \
                   FROM {s} WHERE k = ? AND expires_at > {NOW_MS}"
            )
            .into(),
            // Binds: key. One multi-table statement: the record if there is one, and its
            // steps if there are any (a released call has steps and no record).
            remove: format!(
                "DELETE r, s FROM (SELECT CAST(? AS BINARY(32)) AS k) AS x \
                   LEFT JOIN {t} r ON r.k = x.k \
                   LEFT JOIN {s} s ON s.k = x.k"
            )
            .into(),
            // Binds: batch.
            purge: format!(
                "DELETE FROM {s} WHERE expires_at < {NOW_MS} ORDER BY expires_at LIMIT ?"
            )
            .into(),
            display,
        }
    }

    /// Runs the fenced step write on `conn` (a pooled connection, or the caller's
    /// transaction): the rows affected (see `put`).
    pub(super) async fn put_on(
        &self,
        conn: &mut MySqlConnection,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(AssertSqlSafe(self.put.clone()))
            .bind(step.id.name.as_bytes())
            .bind(step.id.occurrence)
            .bind(step.status.code())
            .bind(&step.value[..])
            .bind(ms(ttl))
            .bind(&key.0[..])
            .bind(token.as_i64())
            .execute(conn)
            .await?;
        Ok(done.rows_affected())
    }

    /// The message of a failed step operation.
    pub(super) fn fail(&self, what: &str, e: sqlx::Error) -> StoreError {
        super::super::steps::fail(what, &self.display, e)
    }
}

impl super::MySqlStore {
    /// The fenced step write on `conn` (the caller's transaction, for
    /// `TransactionalStore::put_step_in`), with the store's limits. `Ok(false)`: fenced.
    pub(crate) async fn put_step_on(
        &self,
        conn: &mut MySqlConnection,
        key: &Key,
        token: FencingToken,
        step: &StepRecord,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.core.check_size(&step.value)?;
        super::super::steps::check_name("mysql", &step.id)?;
        let steps = &self.inner.steps;
        let what = "mysql: put step in transaction";
        let written = steps
            .put_on(&mut *conn, key, token, step, ttl)
            .await
            .map_err(|e| steps.fail(what, e))?;
        if written > 0 {
            return Ok(true);
        }
        // 0 rows: fenced, or an identical row on a connection without CLIENT_FOUND_ROWS.
        let held = sqlx::query(AssertSqlSafe(steps.held_in.clone()))
            .bind(&key.0[..])
            .bind(token.as_i64())
            .fetch_optional(conn)
            .await
            .map_err(|e| steps.fail(what, e))?;
        Ok(held.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steps_table_sits_beside_the_records_table() {
        assert_eq!(steps_table("idem_records"), "idem_records_steps");
        assert_eq!(steps_table("app.idem"), "app.idem_steps");
        let fits = "a".repeat(58);
        assert_eq!(steps_table(&fits), format!("{fits}_steps"));
        let long = "b".repeat(64);
        let other = format!("{}c", "b".repeat(63));
        let (a, b) = (steps_table(&long), steps_table(&other));
        assert_eq!(a.len(), MAX_IDENTIFIER);
        assert_ne!(a, b, "two long names share their first bytes");
        assert!(a.starts_with(&"b".repeat(41)) && a.ends_with("_steps"));
        assert_eq!(steps_table(&format!("db.{long}")), format!("db.{a}"));
    }
}
