//! Durable steps on the SQL stores: what the three databases share. Each store keeps its
//! calls' step records in a second table beside its records table, `<table>_steps`, with the
//! primary key (record key, step name, occurrence); its module `steps` holds the statements.
//!
//! Every step write is ONE statement that inserts or replaces the step row only while the
//! records table holds the call in progress under the writer's token, and locks that record
//! row for share until it commits: a takeover (which updates the record row) waits for the
//! step write to commit and then sees it, or the step write waits for the takeover and finds
//! another token (fenced). No step is ever written by a holder after its claim was taken over.

use idem_core::{StepId, StepRecord, StepStatus, StoreError};

/// The longest step name the SQL stores keep, in bytes (the name is part of the steps table's
/// primary key; MySQL's index keys are bounded). The same on the three databases, so that a
/// program tested on SQLite runs on MySQL.
pub(crate) const MAX_STEP_NAME: usize = 512;

/// The suffix of the steps table's name.
pub(crate) const STEPS_SUFFIX: &str = "_steps";

/// Refuses a step name over [`MAX_STEP_NAME`] bytes, before any round trip.
pub(crate) fn check_name(db: &str, id: &StepId) -> Result<(), StoreError> {
    if id.name.len() > MAX_STEP_NAME {
        let message = format!(
            "{db}: the step name {:?}... is {} bytes; the SQL stores keep names of at most \
             {MAX_STEP_NAME} bytes",
            id.name.chars().take(32).collect::<String>(),
            id.name.len()
        );
        return Err(StoreError::backend(
            message.clone(),
            std::io::Error::new(std::io::ErrorKind::InvalidInput, message),
        ));
    }
    Ok(())
}

/// A step record from a row's columns.
pub(crate) fn record(
    db: &str,
    name: String,
    occurrence: i64,
    status: i64,
    value: Vec<u8>,
) -> Result<StepRecord, StoreError> {
    let occurrence = u32::try_from(occurrence).map_err(|_| {
        StoreError::Corrupt(format!(
            "{db}: step {name:?} has the occurrence {occurrence}"
        ))
    })?;
    let status = u8::try_from(status)
        .ok()
        .and_then(StepStatus::from_code)
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "{db}: step {name:?}#{occurrence} has the unknown status {status}"
            ))
        })?;
    Ok(StepRecord::new(
        StepId::new(name, occurrence),
        status,
        value,
    ))
}

/// A sqlx error of a step operation as a store error: a missing steps table says how to
/// create it (the records table may exist from before durable steps).
pub(crate) fn fail(what: &str, steps_table: &str, e: sqlx::Error) -> StoreError {
    if super::is_missing_table(&e) {
        return StoreError::backend(
            format!(
                "{what}: the steps table {steps_table:?} does not exist: call the store's \
                 migrate() once at start-up (or run its DDL in your migrations); migrate() \
                 adds it beside a records table of an earlier version"
            ),
            e,
        );
    }
    StoreError::backend(what.to_owned(), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_refused() {
        assert!(check_name("t", &StepId::new("a".repeat(MAX_STEP_NAME), 0)).is_ok());
        let e = check_name("t", &StepId::new("é".repeat(MAX_STEP_NAME), 0));
        assert!(matches!(e, Err(StoreError::Backend { .. })), "{e:?}");
    }

    #[test]
    fn rows_decode() {
        let r = record("t", "charge".into(), 3, 2, b"v".to_vec()).map_err(|e| e.to_string());
        assert_eq!(
            r,
            Ok(StepRecord::new(
                StepId::new("charge", 3),
                StepStatus::Done,
                b"v".to_vec()
            ))
        );
        for (occurrence, status) in [(-1, 2), (1 << 40, 2), (0, 0), (0, 9), (0, 300)] {
            assert!(matches!(
                record("t", "x".into(), occurrence, status, vec![]),
                Err(StoreError::Corrupt(_))
            ));
        }
    }
}
