//! The outbox-store conformance suite on MySQL/MariaDB (a fresh database per test), and the
//! MySQL-specific checks: schema errors, a non-transactional table refused, durability settings,
//! and that the writer runs no DDL in the caller's transaction.
//!
//! Needs the server at `HERALD_TEST_MYSQL` (default `mysql://root@127.0.0.1:3306/test`).

#[path = "../../herald-testkit/support/mysql_effects.rs"]
#[allow(dead_code)]
mod effects;

use std::sync::Arc;

use async_trait::async_trait;
use herald_core::{Error, Identifier, Message, OutboxStore, Result};
use herald_mysql::{MySqlOutbox, MySqlOutboxWriter, migrate};
use herald_testkit::sql_store;
use herald_testkit::suite::{OpenTransaction, StoreHarness};

type D = herald_mysql::MySqlDialect;
use sqlx::AssertSqlSafe;
use sqlx::MySqlPool;

struct MySql {
    pool: MySqlPool,
    database: String,
    table: Identifier,
}

async fn harness() -> MySql {
    let (pool, database) = effects::fresh_database("herald_test", 6).await;
    let table = Identifier::new("herald_outbox").unwrap();
    migrate(&pool, &table).await.unwrap();
    MySql {
        pool,
        database,
        table,
    }
}

fn e(err: sqlx::Error) -> Error {
    Error::unavailable("mysql", err)
}

#[async_trait]
impl StoreHarness for MySql {
    async fn store(&self) -> Arc<dyn OutboxStore> {
        sql_store::store::<D>(&self.pool, &self.table).await
    }

    fn server(&self) -> Option<std::net::SocketAddr> {
        let url = url::Url::parse(&effects::mysql_url()).ok()?;
        let host = url.host_str()?.to_owned();
        let port = url.port().unwrap_or(3306);
        std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
            .ok()?
            .next()
    }

    async fn store_at(&self, addr: std::net::SocketAddr) -> Option<Arc<dyn OutboxStore>> {
        let opts: sqlx::mysql::MySqlConnectOptions = effects::mysql_url().parse().ok()?;
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(2))
            .connect_with(
                opts.host(&addr.ip().to_string())
                    .port(addr.port())
                    .database(&self.database),
            )
            .await
            .ok()?;
        Some(sql_store::store::<D>(&pool, &self.table).await)
    }

    async fn enqueue(&self, messages: &[Message], commit: bool) -> Result<()> {
        sql_store::enqueue::<D>(&self.pool, &self.table, messages, commit).await
    }

    async fn enqueue_open(&self, message: &Message) -> Result<Box<dyn OpenTransaction>> {
        sql_store::enqueue_open::<D>(&self.pool, &self.table, message).await
    }

    async fn insert_plain(&self, dest: &str, kind: &str, key: &str, payload: &[u8]) -> Result<()> {
        sql_store::insert_plain::<D>(&self.pool, dest, kind, key, payload).await
    }

    async fn insert_raw(&self, r: &herald_testkit::poison::RawInsert) -> Result<()> {
        let sql = herald_testkit::poison::insert_sql(|_| "?".to_owned(), "UUID()");
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
        if case != herald_testkit::poison::NativePoison::ReusedDeadLetterId {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO herald_outbox (id, message_type, destination, headers, payload) \
             SELECT MAX(id), 'T', ?, '[1]', x'00' FROM herald_outbox_dead_letter",
        )
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

    async fn cleanup(&self) {
        effects::drop_database(&self.pool, &self.database).await;
    }
}

herald_testkit::store_suite!(harness());

/// A table name with SQL in it is refused before any SQL runs; a missing table, a table missing
/// columns and a non-transactional (MyISAM) table are reported with what to do about them.
#[tokio::test]
async fn bad_tables_fail_clearly() {
    let h = harness().await;
    let err = Identifier::new("outbox`; DROP TABLE x;--")
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not allowed"), "{err}");
    let err = MySqlOutbox::new(h.pool.clone(), Identifier::new("no_such_outbox").unwrap())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no_such_outbox") && err.contains("herald migrate"),
        "{err}"
    );
    sqlx::query("CREATE TABLE half_outbox (id BIGINT PRIMARY KEY, payload BLOB) ENGINE = InnoDB")
        .execute(&h.pool)
        .await
        .unwrap();
    let err = MySqlOutbox::new(h.pool.clone(), Identifier::new("half_outbox").unwrap())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("missing columns: message_id"), "{err}");
    let myisam = Identifier::new("myisam_outbox").unwrap();
    migrate(&h.pool, &myisam).await.unwrap();
    sqlx::query("ALTER TABLE myisam_outbox ENGINE = MyISAM")
        .execute(&h.pool)
        .await
        .unwrap();
    let err = MySqlOutbox::new(h.pool.clone(), myisam)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("MyISAM") && err.contains("not transactional"),
        "{err}"
    );
    h.cleanup().await;
}

/// The relay warns when the server could lose a commit it already published.
#[tokio::test]
async fn durability_settings_are_checked() {
    let h = harness().await;
    let warnings = h.store().await.durability_warnings().await.unwrap();
    let flush: i64 = sqlx::query_scalar("SELECT CAST(@@innodb_flush_log_at_trx_commit AS SIGNED)")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(
        warnings
            .iter()
            .any(|w| w.contains("innodb_flush_log_at_trx_commit")),
        flush != 1,
        "innodb_flush_log_at_trx_commit={flush}: {warnings:?}"
    );
    h.cleanup().await;
}

/// The writer adds one row to the caller's transaction and nothing else: rolled back, the
/// transaction leaves no trace; while it is open, another session sees nothing (no implicit
/// commit, as DDL would cause); `migrate` twice changes nothing.
#[tokio::test]
async fn writer_runs_no_ddl_in_the_callers_transaction() {
    let h = harness().await;
    migrate(&h.pool, &h.table).await.unwrap();
    let writer = MySqlOutboxWriter::new(&h.table);
    let mut tx = h.pool.begin().await.unwrap();
    let m = Message::raw_event("t", "E", b"{}".to_vec());
    writer.enqueue(&mut tx, &m).await.unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM herald_outbox")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(seen, 0, "an open transaction's row must not be visible");
    tx.rollback().await.unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM herald_outbox")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(seen, 0, "rolled back: nothing left");
    let err = writer
        .publish(
            &mut h.pool.acquire().await.unwrap(),
            &Message::raw_command("q", "C", vec![]),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("send()"), "{err}");
    h.cleanup().await;
}
