//! Transactional-mode harnesses for the three SQL stores: each owns a store on its own table
//! and a business table (`id`, `k`, `mark`; no unique constraint, so a second execution
//! shows as a second row) that bodies write to inside the transaction.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use idem_core::{async_trait, StoreError};
use idem_testkit::transactional::{TxHarness, TxOf};
use sqlx::AssertSqlSafe;

fn db(e: sqlx::Error) -> StoreError {
    StoreError::backend("business table", e)
}

#[cfg(feature = "postgres")]
pub mod pg {
    use super::*;
    use idem_stores::PostgresStore;
    use sqlx::postgres::{PgPool, PgPoolOptions};

    /// A PostgreSQL store and a business table.
    pub struct PgHarness {
        pub store: PostgresStore,
        pub pool: PgPool,
        pub table: String,
        pub biz: String,
    }

    impl PgHarness {
        /// Tables named `<tag>`-unique; `max` pooled connections.
        pub async fn new(url: &str, tag: &str, max: u32) -> PgHarness {
            crate::sql_common::pg_drop_stale_tables(url).await;
            let table = crate::sql_common::unique_table(tag);
            let biz = crate::sql_common::unique_table(&format!("{tag}_biz"));
            let h = PgHarness::open(url, &table, &biz, max).await;
            h.store.migrate().await.expect("migrate");
            sqlx::query(AssertSqlSafe(format!(
                "CREATE TABLE \"{biz}\" (id BIGSERIAL PRIMARY KEY, k TEXT NOT NULL, \
                 mark TEXT NOT NULL)"
            )))
            .execute(&h.pool)
            .await
            .expect("create business table");
            h
        }

        /// On tables that exist.
        pub async fn open(url: &str, table: &str, biz: &str, max: u32) -> PgHarness {
            let pool = PgPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(std::time::Duration::from_secs(20))
                .connect(url)
                .await
                .expect("connect to IDEM_TEST_POSTGRES_URL");
            let store = PostgresStore::builder()
                .pool(pool.clone())
                .table(table)
                .build()
                .expect("store");
            PgHarness {
                store,
                pool,
                table: table.to_owned(),
                biz: biz.to_owned(),
            }
        }

        /// One business row, committed on its own (the non-transactional body).
        pub async fn insert_plain(&self, key: &str, mark: &str) -> Result<(), StoreError> {
            let sql = format!("INSERT INTO \"{}\" (k, mark) VALUES ($1, $2)", self.biz);
            sqlx::query(AssertSqlSafe(sql))
                .bind(key)
                .bind(mark)
                .execute(&self.pool)
                .await
                .map_err(db)?;
            Ok(())
        }

        /// Every business row: (key, mark).
        pub async fn all_rows(&self) -> Vec<(String, String)> {
            let sql = format!("SELECT k, mark FROM \"{}\" ORDER BY id", self.biz);
            sqlx::query_as(AssertSqlSafe(sql))
                .fetch_all(&self.pool)
                .await
                .expect("read business rows")
        }
    }

    #[async_trait]
    impl TxHarness for PgHarness {
        type Store = PostgresStore;

        fn store(&self) -> &PostgresStore {
            &self.store
        }

        async fn insert(
            &self,
            tx: &mut TxOf<Self>,
            key: &str,
            mark: &str,
        ) -> Result<(), StoreError> {
            let sql = format!("INSERT INTO \"{}\" (k, mark) VALUES ($1, $2)", self.biz);
            sqlx::query(AssertSqlSafe(sql))
                .bind(key)
                .bind(mark)
                .execute(&mut **tx)
                .await
                .map_err(db)?;
            Ok(())
        }

        async fn rows(&self, key: &str) -> Vec<String> {
            let sql = format!("SELECT mark FROM \"{}\" WHERE k = $1 ORDER BY id", self.biz);
            sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(key)
                .fetch_all(&self.pool)
                .await
                .expect("read business rows")
        }

        async fn cleanup(&self) {
            for t in [&self.table, &self.biz] {
                let sql = format!("DROP TABLE IF EXISTS \"{t}\", \"{t}_steps\"");
                let _ = sqlx::query(AssertSqlSafe(sql)).execute(&self.pool).await;
            }
        }
    }
}

#[cfg(feature = "mysql")]
pub mod my {
    use super::*;
    use idem_stores::MySqlStore;
    use sqlx::mysql::{MySqlPool, MySqlPoolOptions};

    /// A MySQL / MariaDB store and a business table.
    pub struct MyHarness {
        pub store: MySqlStore,
        pub pool: MySqlPool,
        pub table: String,
        pub biz: String,
    }

    impl MyHarness {
        /// Tables named `<tag>`-unique; `max` pooled connections.
        pub async fn new(url: &str, tag: &str, max: u32) -> MyHarness {
            let table = crate::sql_common::unique_table(tag);
            let biz = crate::sql_common::unique_table(&format!("{tag}_biz"));
            let h = MyHarness::open(url, &table, &biz, max).await;
            h.store.migrate().await.expect("migrate");
            sqlx::query(AssertSqlSafe(format!(
                "CREATE TABLE `{biz}` (id BIGINT AUTO_INCREMENT PRIMARY KEY, \
                 k VARCHAR(200) NOT NULL, mark VARCHAR(200) NOT NULL) ENGINE=InnoDB"
            )))
            .execute(&h.pool)
            .await
            .expect("create business table");
            h
        }

        /// On tables that exist.
        pub async fn open(url: &str, table: &str, biz: &str, max: u32) -> MyHarness {
            let pool = MySqlPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(std::time::Duration::from_secs(20))
                .connect(url)
                .await
                .expect("connect to IDEM_TEST_MYSQL_URL");
            let store = MySqlStore::builder()
                .pool(pool.clone())
                .table(table)
                .build()
                .expect("store");
            MyHarness {
                store,
                pool,
                table: table.to_owned(),
                biz: biz.to_owned(),
            }
        }

        /// One business row, committed on its own (the non-transactional body).
        pub async fn insert_plain(&self, key: &str, mark: &str) -> Result<(), StoreError> {
            let sql = format!("INSERT INTO `{}` (k, mark) VALUES (?, ?)", self.biz);
            sqlx::query(AssertSqlSafe(sql))
                .bind(key)
                .bind(mark)
                .execute(&self.pool)
                .await
                .map_err(db)?;
            Ok(())
        }

        /// Every business row: (key, mark).
        pub async fn all_rows(&self) -> Vec<(String, String)> {
            let sql = format!("SELECT k, mark FROM `{}` ORDER BY id", self.biz);
            sqlx::query_as(AssertSqlSafe(sql))
                .fetch_all(&self.pool)
                .await
                .expect("read business rows")
        }
    }

    #[async_trait]
    impl TxHarness for MyHarness {
        type Store = MySqlStore;

        fn store(&self) -> &MySqlStore {
            &self.store
        }

        async fn insert(
            &self,
            tx: &mut TxOf<Self>,
            key: &str,
            mark: &str,
        ) -> Result<(), StoreError> {
            let sql = format!("INSERT INTO `{}` (k, mark) VALUES (?, ?)", self.biz);
            sqlx::query(AssertSqlSafe(sql))
                .bind(key)
                .bind(mark)
                .execute(&mut **tx)
                .await
                .map_err(db)?;
            Ok(())
        }

        async fn rows(&self, key: &str) -> Vec<String> {
            let sql = format!("SELECT mark FROM `{}` WHERE k = ? ORDER BY id", self.biz);
            sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(key)
                .fetch_all(&self.pool)
                .await
                .expect("read business rows")
        }

        async fn cleanup(&self) {
            for t in [&self.table, &self.biz] {
                let sql = format!("DROP TABLE IF EXISTS `{t}`, `{t}_steps`");
                let _ = sqlx::query(AssertSqlSafe(sql)).execute(&self.pool).await;
            }
        }
    }
}

#[cfg(feature = "sqlite")]
pub mod lite {
    use super::*;
    use idem_stores::SqliteStore;

    /// A SQLite store on a file (an in-memory database has one connection, which an open
    /// transaction would hold) and a business table.
    pub struct LiteHarness {
        pub store: SqliteStore,
        pub table: String,
        pub biz: String,
    }

    impl LiteHarness {
        /// Tables named `<tag>`-unique in the file at `path`.
        pub async fn new(path: &std::path::Path, tag: &str) -> LiteHarness {
            let table = crate::sql_common::unique_table(tag);
            let biz = crate::sql_common::unique_table(&format!("{tag}_biz"));
            let h = LiteHarness::open(path, &table, &biz).await;
            h.store.migrate().await.expect("migrate");
            sqlx::query(AssertSqlSafe(format!(
                "CREATE TABLE IF NOT EXISTS \"{biz}\" (id INTEGER PRIMARY KEY AUTOINCREMENT, \
                 k TEXT NOT NULL, mark TEXT NOT NULL)"
            )))
            .execute(h.store.pool())
            .await
            .expect("create business table");
            h
        }

        /// On tables that exist.
        pub async fn open(path: &std::path::Path, table: &str, biz: &str) -> LiteHarness {
            let store = SqliteStore::builder()
                .url(format!("sqlite://{}", path.display()))
                .table(table)
                .durable(false)
                .connect()
                .await
                .expect("open the database file");
            LiteHarness {
                store,
                table: table.to_owned(),
                biz: biz.to_owned(),
            }
        }

        /// One business row, committed on its own (the non-transactional body).
        pub async fn insert_plain(&self, key: &str, mark: &str) -> Result<(), StoreError> {
            let sql = format!("INSERT INTO \"{}\" (k, mark) VALUES (?, ?)", self.biz);
            sqlx::query(AssertSqlSafe(sql))
                .bind(key)
                .bind(mark)
                .execute(self.store.pool())
                .await
                .map_err(db)?;
            Ok(())
        }

        /// Every business row: (key, mark).
        pub async fn all_rows(&self) -> Vec<(String, String)> {
            let sql = format!("SELECT k, mark FROM \"{}\" ORDER BY id", self.biz);
            sqlx::query_as(AssertSqlSafe(sql))
                .fetch_all(self.store.pool())
                .await
                .expect("read business rows")
        }
    }

    #[async_trait]
    impl TxHarness for LiteHarness {
        type Store = SqliteStore;

        fn store(&self) -> &SqliteStore {
            &self.store
        }

        async fn insert(
            &self,
            tx: &mut TxOf<Self>,
            key: &str,
            mark: &str,
        ) -> Result<(), StoreError> {
            let sql = format!("INSERT INTO \"{}\" (k, mark) VALUES (?, ?)", self.biz);
            sqlx::query(AssertSqlSafe(sql))
                .bind(key)
                .bind(mark)
                .execute(&mut **tx)
                .await
                .map_err(db)?;
            Ok(())
        }

        async fn rows(&self, key: &str) -> Vec<String> {
            let sql = format!("SELECT mark FROM \"{}\" WHERE k = ? ORDER BY id", self.biz);
            sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(key)
                .fetch_all(self.store.pool())
                .await
                .expect("read business rows")
        }

        /// A deferred `BEGIN`: the caller's transaction takes SQLite's write lock at its first
        /// write, after idem's claim.
        async fn begin_caller(&self) -> Result<TxOf<Self>, StoreError> {
            self.store
                .pool()
                .begin()
                .await
                .map(idem_stores::SqliteTx::from)
                .map_err(|e| StoreError::backend("begin", e))
        }

        fn concurrent_writers(&self) -> bool {
            false
        }

        async fn cleanup(&self) {
            for t in [&self.table, &self.biz] {
                let sql = format!("DROP TABLE IF EXISTS \"{t}\", \"{t}_steps\"");
                let _ = sqlx::query(AssertSqlSafe(sql))
                    .execute(self.store.pool())
                    .await;
            }
        }
    }
}
