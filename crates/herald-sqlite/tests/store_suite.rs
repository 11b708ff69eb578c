//! The outbox-store conformance suite on SQLite (a fresh database file per test).

use std::sync::Arc;

use async_trait::async_trait;
use herald_core::{Identifier, Message, OutboxStore, Result};
use herald_sqlite::{connect, migrate};
use herald_testkit::sql_store;
use herald_testkit::suite::{OpenTransaction, StoreHarness};

type D = herald_sqlite::SqliteDialect;
use sqlx::AssertSqlSafe;
use sqlx::SqlitePool;

struct Sqlite {
    pool: SqlitePool,
    table: Identifier,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn harness() -> Sqlite {
    let dir = std::env::temp_dir().join(herald_testkit::unique("herald-sqlite-test"));
    std::fs::create_dir_all(&dir).unwrap();
    let pool = connect(&format!("sqlite://{}/app.db", dir.display()))
        .await
        .unwrap();
    let table = Identifier::new("herald_outbox").unwrap();
    migrate(&pool, &table).await.unwrap();
    Sqlite {
        pool,
        table,
        _dir: TempDir(dir),
    }
}

fn e(err: sqlx::Error) -> herald_core::Error {
    herald_core::Error::unavailable("sqlite", err)
}

#[async_trait]
impl StoreHarness for Sqlite {
    async fn store(&self) -> Arc<dyn OutboxStore> {
        sql_store::store::<D>(&self.pool, &self.table).await
    }

    async fn enqueue(&self, messages: &[Message], commit: bool) -> Result<()> {
        sql_store::enqueue::<D>(&self.pool, &self.table, messages, commit).await
    }

    fn concurrent_writers(&self) -> bool {
        // SQLite has one writer at a time: a transaction cannot take a lower id and commit after
        // another one, so commit order is id order.
        false
    }

    async fn enqueue_open(&self, message: &Message) -> Result<Box<dyn OpenTransaction>> {
        sql_store::enqueue_open::<D>(&self.pool, &self.table, message).await
    }

    async fn insert_plain(&self, dest: &str, kind: &str, key: &str, payload: &[u8]) -> Result<()> {
        sql_store::insert_plain::<D>(&self.pool, dest, kind, key, payload).await
    }

    async fn insert_raw(&self, r: &herald_testkit::poison::RawInsert) -> Result<()> {
        let sql =
            herald_testkit::poison::insert_sql(|n| format!("?{n}"), "lower(hex(randomblob(16)))");
        herald_testkit::bind_raw_insert!(sqlx::query(AssertSqlSafe(sql)), r)
            .execute(&self.pool)
            .await
            .map_err(e)?;
        Ok(())
    }

    async fn insert_native(
        &self,
        case: herald_testkit::poison::NativePoison,
        destination: &str,
    ) -> Result<bool> {
        use herald_testkit::poison::NativePoison as N;
        let sql = match case {
            N::InvalidUtf8Text => {
                "INSERT INTO herald_outbox (message_type, destination, payload) VALUES (CAST(x'c3fffe' AS TEXT), ?1, x'00')"
            }
            N::BlobInTextColumn => {
                "INSERT INTO herald_outbox (message_type, destination, ordering_key, payload) VALUES ('T', ?1, x'00ff', x'00')"
            }
            N::TextInIntegerColumn => {
                "INSERT INTO herald_outbox (message_type, destination, payload, created_at) VALUES ('T', ?1, x'00', 'yesterday')"
            }
            N::ReusedDeadLetterId => {
                "INSERT INTO herald_outbox (id, message_type, destination, headers, payload) \
                 SELECT MAX(id), 'T', ?1, '[1]', x'00' FROM herald_outbox_dead_letter"
            }
            _ => return Ok(false),
        };
        sqlx::query(sql)
            .bind(destination)
            .execute(&self.pool)
            .await
            .map_err(e)?;
        Ok(true)
    }

    async fn insert_undecodable(&self, destination: &str) -> Result<()> {
        sql_store::insert_undecodable::<D>(&self.pool, destination).await
    }

    async fn dead_letter_reasons(&self) -> Result<Vec<(String, String)>> {
        sql_store::dead_letter_reasons::<D>(&self.pool).await
    }
}

herald_testkit::store_suite!(harness());

/// `herald status` on values a producer can store in SQLite: a destination written as a BLOB is
/// the same destination as its text, and a REAL `created_at` does not hide the oldest integer
/// time.
#[tokio::test]
async fn stats_group_destinations_by_bytes_and_read_only_integer_times() {
    let h = harness().await;
    for sql in [
        "INSERT INTO herald_outbox (message_type, destination, payload, created_at) VALUES ('T', 'orders', x'00', 1700000000000000)",
        "INSERT INTO herald_outbox (message_type, destination, payload, created_at) VALUES ('T', CAST('orders' AS BLOB), x'00', 1600000000000000)",
        "INSERT INTO herald_outbox (message_type, destination, payload, created_at) VALUES ('T', 'orders', x'00', 1500000000000000.5)",
    ] {
        sqlx::query(sql).execute(&h.pool).await.unwrap();
    }
    let stats = h.store().await.stats().await.unwrap();
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert_eq!(stats[0].destination, "orders");
    assert_eq!(stats[0].pending, 3);
    assert_eq!(
        stats[0].oldest,
        Some(herald_core::message::from_micros(1_600_000_000_000_000)),
        "the oldest integer time, not the REAL"
    );
}
