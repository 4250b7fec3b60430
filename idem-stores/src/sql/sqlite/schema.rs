//! The table: its validated name and every statement, rendered once. The table name is the
//! only text interpolated into SQL; everything else is a bound parameter.

use std::sync::Arc;

use idem_core::StoreError;

/// The longest accepted table name.
const MAX_TABLE_LEN: usize = 48;

use super::super::config_error;

pub(super) fn parse_table(s: &str) -> Result<String, StoreError> {
    if super::super::is_identifier(s, MAX_TABLE_LEN) {
        Ok(s.to_owned())
    } else {
        Err(config_error(
            "sqlite: the table name must be ASCII letters, digits and `_`, not starting with a \
             digit, at most 48 bytes",
        ))
    }
}

/// Every statement, rendered once with the quoted table name. Parameters are bound.
#[derive(Clone)]
pub(super) struct Statements {
    pub(super) create_table: String,
    pub(super) create_index: String,
    /// Adds the claim-time columns to a table of the first layout (each answers "duplicate
    /// column" when it has them).
    pub(super) add_columns: [String; 2],
    pub(super) claim: Arc<str>,
    pub(super) live: Arc<str>,
    pub(super) complete: Arc<str>,
    pub(super) release: Arc<str>,
    pub(super) renew: Arc<str>,
    pub(super) get: Arc<str>,
    pub(super) lease: Arc<str>,
    pub(super) remove: Arc<str>,
    pub(super) purge: Arc<str>,
}

impl Statements {
    pub(super) fn new(name: &str) -> Statements {
        let t = format!("\"{name}\"");
        let live = live_at("?4");
        // The same, over the conflicting row in DO UPDATE.
        let live_r = "CASE WHEN r.state = 'in_progress' THEN r.lease_until > ?4 \
                      ELSE r.expires_at > ?4 END";
        Statements {
            create_table: format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    key BLOB PRIMARY KEY NOT NULL CHECK (length(key) = 32),
                    state TEXT NOT NULL CHECK (state IN ('in_progress', 'completed')),
                    token INTEGER NOT NULL,
                    attempt INTEGER NOT NULL DEFAULT 1,
                    fingerprint BLOB,
                    value BLOB,
                    lease_until INTEGER,
                    expires_at INTEGER NOT NULL,
                    claimed_at INTEGER,
                    renewals INTEGER
                )"
            ),
            add_columns: [
                format!("ALTER TABLE {t} ADD COLUMN claimed_at INTEGER"),
                format!("ALTER TABLE {t} ADD COLUMN renewals INTEGER"),
            ],
            create_index: format!(
                "CREATE INDEX IF NOT EXISTS \"{name}_expires_at\" ON {t} (expires_at)"
            ),
            // ?1 key, ?2 token, ?3 fingerprint, ?4 now, ?5 lease until, ?6 expires at.
            // One statement under SQLite's write lock: insert unless a live record that is not
            // our own claim holds the key; an expired record (completed past its TTL, or a
            // claim whose lease passed) conflicts and is replaced, and our own live claim (a
            // retried claim whose first reply was lost) gets its lease restarted. A row comes
            // back only when this claim holds the key; with another live record nothing is
            // written (no page is dirtied, no sync).
            claim: format!(
                "INSERT INTO {t} AS r
                    (key, state, token, attempt, fingerprint, value, lease_until, expires_at,
                     claimed_at, renewals)
                 SELECT ?1, 'in_progress', ?2, 1, ?3, NULL, ?5, ?6, ?4, 0
                  WHERE NOT EXISTS (
                      SELECT 1 FROM {t} WHERE key = ?1 AND {live}
                         AND NOT (state = 'in_progress' AND token = ?2)
                  )
                 ON CONFLICT (key) DO UPDATE SET
                    state = 'in_progress',
                    token = excluded.token,
                    attempt = CASE WHEN r.state = 'in_progress' AND r.token = excluded.token
                                       THEN r.attempt
                                   WHEN r.state = 'in_progress' THEN r.attempt + 1
                                   ELSE 1 END,
                    fingerprint = excluded.fingerprint,
                    value = NULL,
                    lease_until = excluded.lease_until,
                    expires_at = excluded.expires_at,
                    claimed_at = CASE WHEN r.state = 'in_progress' AND r.token = excluded.token
                                          THEN r.claimed_at ELSE excluded.claimed_at END,
                    renewals = CASE WHEN r.state = 'in_progress' AND r.token = excluded.token
                                        THEN r.renewals ELSE 0 END
                  WHERE NOT ({live_r})
                     OR (r.state = 'in_progress' AND r.token = excluded.token)
                 RETURNING attempt"
            )
            .into(),
            // ?1 key, ?2 now.
            live: format!(
                "SELECT state, token, attempt, fingerprint, value, lease_until, expires_at FROM {t}
                  WHERE key = ?1 AND {}",
                live_at("?2")
            )
            .into(),
            // ?1 key, ?2 token, ?3 value, ?4 expires at. Matches the record in progress under
            // ?2, which it completes, and the record already completed under ?2 (an earlier
            // attempt whose reply was lost), which it leaves as it is: one row either way, none
            // when fenced. (SET expressions read the row as it was.)
            complete: format!(
                "UPDATE {t} SET value = CASE WHEN state = 'completed' THEN value ELSE ?3 END,
                                expires_at = CASE WHEN state = 'completed' THEN expires_at
                                                  ELSE ?4 END,
                                lease_until = NULL,
                                state = 'completed'
                  WHERE key = ?1 AND token = ?2"
            )
            .into(),
            // Deletes only our own claim; anything else is left as it is.
            release: format!(
                "DELETE FROM {t} WHERE key = ?1 AND token = ?2 AND state = 'in_progress'"
            )
            .into(),
            // ?1 key, ?2 token, ?3 lease until, ?4 expires at.
            renew: format!(
                "UPDATE {t} SET lease_until = ?3, expires_at = ?4, renewals = renewals + 1
                  WHERE key = ?1 AND token = ?2 AND state = 'in_progress'"
            )
            .into(),
            // ?1 key, ?2 now.
            get: format!(
                "SELECT state, token, fingerprint, value, expires_at,
                        claimed_at, lease_until, renewals FROM {t}
                  WHERE key = ?1
                    AND CASE WHEN state = 'in_progress' THEN lease_until > ?2
                             ELSE expires_at > ?2 END"
            )
            .into(),
            lease: format!(
                "SELECT lease_until FROM {t}
                  WHERE key = ?1 AND state = 'in_progress' AND lease_until > ?2"
            )
            .into(),
            remove: format!("DELETE FROM {t} WHERE key = ?1").into(),
            // ?1 now, ?2 batch.
            purge: format!(
                "DELETE FROM {t} WHERE key IN (
                    SELECT key FROM {t} WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2
                 )"
            )
            .into(),
        }
    }
}

/// The condition "the record is live at `now`" (in progress under its lease, or completed and
/// unexpired), over the bare column names.
fn live_at(now: &str) -> String {
    format!("CASE WHEN state = 'in_progress' THEN lease_until > {now} ELSE expires_at > {now} END")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_identifiers() {
        assert!(parse_table("idem_records").is_ok());
        for bad in ["", "1a", "a.b", "a\"b", "a;b", "x y", &"a".repeat(49)] {
            assert!(parse_table(bad).is_err(), "{bad:?}");
        }
    }
}
