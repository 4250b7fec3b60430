//! The table: its validated name and every statement, rendered once. The table name is the
//! only text interpolated into SQL; everything else is a bound parameter.

use std::sync::Arc;

use idem_core::StoreError;

/// The longest accepted table name (without schema), so that derived index names stay under
/// PostgreSQL's 63-byte identifier limit.
const MAX_TABLE_LEN: usize = 48;

use super::super::config_error;

/// A validated table name and its quoted SQL form.
pub(super) struct Table {
    /// As configured (`name` or `schema.name`); also the notification channel.
    pub(super) display: String,
    /// Quoted for SQL: `"name"` or `"schema"."name"`.
    pub(super) quoted: String,
    /// The bare table name, for the index name.
    pub(super) name: String,
}

impl Table {
    pub(super) fn parse(s: &str) -> Result<Table, StoreError> {
        let parts: Vec<&str> = s.split('.').collect();
        // The whole name is also the notification channel: at most 63 bytes.
        if parts.len() > 2
            || !parts
                .iter()
                .all(|p| super::super::is_identifier(p, MAX_TABLE_LEN))
            || s.len() > 63
        {
            return Err(config_error(
                "postgres: the table name must be `name` or `schema.name` of ASCII letters, digits \
                 and `_`, not starting with a digit, at most 48 bytes each and 63 in all",
            ));
        }
        Ok(Table {
            display: s.to_owned(),
            quoted: parts
                .iter()
                .map(|p| format!("\"{p}\""))
                .collect::<Vec<_>>()
                .join("."),
            name: parts.last().map_or_else(String::new, |p| (*p).to_owned()),
        })
    }
}

/// Every statement, rendered once with the quoted table name. Parameters are bound.
#[derive(Clone)]
pub(super) struct Statements {
    pub(super) create_table: String,
    pub(super) create_index: String,
    /// Adds the claim-time columns to a table of the first layout.
    pub(super) add_columns: String,
    pub(super) claim: Arc<str>,
    pub(super) complete: Arc<str>,
    pub(super) release: Arc<str>,
    pub(super) renew: Arc<str>,
    pub(super) get: Arc<str>,
    pub(super) lease: Arc<str>,
    pub(super) remove: Arc<str>,
    pub(super) purge: Arc<str>,
}

impl Statements {
    pub(super) fn new(table: &Table) -> Statements {
        let t = &table.quoted;
        let ms = "* interval '1 millisecond'";
        let lease_ms = remaining_ms("lease_until");
        let expires_ms = remaining_ms("expires_at");
        Statements {
            create_table: format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    key BYTEA PRIMARY KEY CHECK (octet_length(key) = 32),
                    state TEXT NOT NULL CHECK (state IN ('in_progress', 'completed')),
                    token BIGINT NOT NULL,
                    attempt INTEGER NOT NULL DEFAULT 1,
                    fingerprint BYTEA,
                    value BYTEA,
                    lease_until TIMESTAMPTZ,
                    expires_at TIMESTAMPTZ NOT NULL,
                    claimed_at TIMESTAMPTZ,
                    renewals INTEGER
                )"
            ),
            add_columns: format!(
                "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS claimed_at TIMESTAMPTZ,
                                 ADD COLUMN IF NOT EXISTS renewals INTEGER"
            ),
            create_index: format!(
                "CREATE INDEX IF NOT EXISTS \"{}_expires_at\" ON {t} (expires_at)",
                table.name
            ),
            // $1 key, $2 token, $3 fingerprint, $4 lease ms, $5 grace ms.
            // `existing` reads the live row in the statement's snapshot: if there is one that is
            // not ours, it is the answer and nothing is written (a replay takes no lock and no
            // WAL flush). Otherwise the upsert inserts, takes over the expired row, or restarts
            // the lease of our own live claim (a retried claim whose first reply was lost),
            // atomically under the row lock. It may also find a row committed after our
            // snapshot that is live and not ours: then no branch returns a row, nothing was
            // written, and the claim runs again.
            claim: format!(
                "WITH existing AS (
                    SELECT state, fingerprint, value,
                           state = 'in_progress' AND token = $2 AS own,
                           {lease_ms} AS lease_ms,
                           {expires_ms} AS expires_ms
                      FROM {t}
                     WHERE key = $1
                       AND CASE WHEN state = 'in_progress' THEN lease_until > now()
                                ELSE expires_at > now() END
                ),
                claimed AS (
                    INSERT INTO {t} AS r
                        (key, state, token, attempt, fingerprint, value, lease_until, expires_at,
                         claimed_at, renewals)
                    SELECT $1, 'in_progress', $2, 1, $3, NULL,
                           now() + $4::float8 {ms}, now() + ($4 + $5)::float8 {ms}, now(), 0
                     WHERE NOT EXISTS (SELECT 1 FROM existing WHERE NOT own)
                    ON CONFLICT (key) DO UPDATE SET
                        state = 'in_progress',
                        token = EXCLUDED.token,
                        attempt = CASE WHEN r.state = 'in_progress' AND r.token = EXCLUDED.token
                                           THEN r.attempt
                                       WHEN r.state = 'in_progress' THEN r.attempt + 1
                                       ELSE 1 END,
                        fingerprint = EXCLUDED.fingerprint,
                        value = NULL,
                        lease_until = EXCLUDED.lease_until,
                        expires_at = EXCLUDED.expires_at,
                        claimed_at = CASE WHEN r.state = 'in_progress' AND r.token = EXCLUDED.token
                                              THEN r.claimed_at ELSE EXCLUDED.claimed_at END,
                        renewals = CASE WHEN r.state = 'in_progress' AND r.token = EXCLUDED.token
                                            THEN r.renewals ELSE 0 END
                    WHERE (r.state = 'in_progress'
                           AND (r.lease_until <= now() OR r.token = EXCLUDED.token))
                       OR (r.state = 'completed' AND r.expires_at <= now())
                    RETURNING r.attempt
                )
                SELECT true AS acquired,
                       c.attempt > 1 AND NOT EXISTS (SELECT 1 FROM existing) AS taken_over,
                       NULL::text AS state, NULL::bytea AS fingerprint, NULL::bytea AS value,
                       NULL::bigint AS lease_ms, NULL::bigint AS expires_ms
                  FROM claimed c
                UNION ALL
                SELECT false, false, e.state, e.fingerprint, e.value, e.lease_ms, e.expires_ms
                  FROM existing e
                 WHERE NOT e.own"
            )
            .into(),
            // $1 key, $2 token, $3 value, $4 ttl ms, $5 channel, $6 key hex.
            // One row when the record is now completed under $2: by this statement (which
            // also notifies the waiters), or already, by an earlier attempt whose reply was
            // lost (the second branch reads the snapshot from before the update, and leaves
            // the stored value as it is). No row: fenced.
            complete: format!(
                "WITH done AS (
                    UPDATE {t} SET state = 'completed', value = $3, lease_until = NULL,
                                   expires_at = now() + $4::float8 {ms}
                     WHERE key = $1 AND token = $2 AND state = 'in_progress'
                    RETURNING key
                )
                SELECT 1 AS ok FROM done WHERE pg_notify($5, $6) IS NOT NULL
                UNION ALL
                SELECT 1 FROM {t} WHERE key = $1 AND token = $2 AND state = 'completed'"
            )
            .into(),
            // $1 key, $2 token, $3 channel, $4 key hex. Deletes only our own claim; anything
            // else is left as it is (and the release still succeeds).
            release: format!(
                "WITH gone AS (
                    DELETE FROM {t} WHERE key = $1 AND token = $2 AND state = 'in_progress'
                    RETURNING key
                )
                SELECT pg_notify($3, $4) FROM gone"
            )
            .into(),
            // $1 key, $2 token, $3 lease ms, $4 grace ms.
            // A renewal commits without waiting for the WAL flush (`synchronous_commit`
            // off for its own transaction only): it needs no durability — a server that
            // crashes loses at most renewals that the holder, which cannot reach the store
            // meanwhile anyway, sends again every lease/3 — and an fsync queued behind a busy
            // disk would otherwise delay the renewal past a short lease.
            renew: format!(
                "UPDATE {t} SET lease_until = now() + $3::float8 {ms},
                                expires_at = now() + ($3 + $4)::float8 {ms},
                                renewals = renewals + 1
                  FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
                  WHERE key = $1 AND token = $2 AND state = 'in_progress'
                RETURNING 1"
            )
            .into(),
            get: format!(
                "SELECT state, token, fingerprint, value, {expires_ms} AS expires_ms,
                        {lease_ms} AS lease_ms,
                        FLOOR(EXTRACT(EPOCH FROM (now() - claimed_at)) * 1000)::bigint AS age_ms,
                        renewals::bigint AS renewals
                   FROM {t}
                  WHERE key = $1
                    AND CASE WHEN state = 'in_progress' THEN lease_until > now()
                             ELSE expires_at > now() END"
            )
            .into(),
            lease: format!(
                "SELECT {lease_ms} FROM {t}
                  WHERE key = $1 AND state = 'in_progress' AND lease_until > now()"
            )
            .into(),
            // $1 key, $2 channel, $3 key hex.
            remove: format!(
                "WITH gone AS (DELETE FROM {t} WHERE key = $1 RETURNING key)
                SELECT pg_notify($2, $3) FROM gone"
            )
            .into(),
            // $1 batch. SKIP LOCKED: a row a claim is taking over right now is not ours.
            purge: format!(
                "DELETE FROM {t} WHERE key IN (
                    SELECT key FROM {t} WHERE expires_at <= now()
                     ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED
                ) AND expires_at <= now()"
            )
            .into(),
        }
    }
}

/// Milliseconds from the database's `now()` to the timestamp `column`, rounded up, never
/// negative.
fn remaining_ms(column: &str) -> String {
    format!("GREATEST(0, CEIL(EXTRACT(EPOCH FROM ({column} - now())) * 1000))::bigint")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_identifiers() {
        for ok in ["idem_records", "app.idem", "_x1", "T"] {
            assert!(Table::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "a-b",
            "a\"b",
            "a;drop table x",
            "a.b.c",
            ".a",
            "a.",
            "x y",
            "é",
            &"a".repeat(49),
            &format!("{}.{}", "a".repeat(40), "b".repeat(40)),
        ] {
            assert!(Table::parse(bad).is_err(), "{bad:?}");
        }
        let t = Table::parse("app.idem").map_err(|e| e.to_string());
        assert_eq!(t.map(|t| t.quoted), Ok("\"app\".\"idem\"".to_owned()));
    }
}
