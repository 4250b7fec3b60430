//! SQL stores on sqlx: PostgreSQL, MySQL/MariaDB and SQLite, one cargo feature each.

#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;
