//! SQL stores on sqlx: PostgreSQL, MySQL/MariaDB and SQLite, one cargo feature each.

#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;
/// Transactional mode (issue 13): `TransactionalStore` for the three stores.
pub mod transactional;

/// A table-name part every backend accepts: ASCII letters, digits and `_`, not starting with a
/// digit, 1 to `max_len` bytes. Table names are the only text interpolated into SQL.
pub(crate) fn is_identifier(part: &str, max_len: usize) -> bool {
    !part.is_empty()
        && part.len() <= max_len
        && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !part.as_bytes()[0].is_ascii_digit()
}

/// A configuration mistake (bad URL or table name), as a store error.
pub(crate) fn config_error(message: impl Into<String>) -> idem_core::StoreError {
    let message = message.into();
    idem_core::StoreError::backend(
        message.clone(),
        std::io::Error::new(std::io::ErrorKind::InvalidInput, message),
    )
}
