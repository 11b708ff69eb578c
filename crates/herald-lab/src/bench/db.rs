//! The benchmark's database side: business rows, outbox rows, and PostgreSQL's own counters.

use std::sync::atomic::{AtomicI64, Ordering};

use anyhow::Result;
use herald::{Identifier, Message};

use herald::connect::Database;

/// The database under test, with the business table and the outbox writer.
pub struct BenchDb {
    pub db: Database,
    pub table: Identifier,
    pub schema: Option<String>,
    next_id: AtomicI64,
}

/// PostgreSQL counters read before and after a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct PgCounters {
    pub wal_bytes: i64,
    pub xact_commit: i64,
    pub tup_inserted: i64,
    pub tup_updated: i64,
    pub tup_deleted: i64,
}

impl BenchDb {
    pub async fn new(db: Database, schema: Option<String>) -> Result<BenchDb> {
        let table = Identifier::new("herald_outbox")?;
        herald::connect::migrate(&db, &table).await?;
        let ddl = "CREATE TABLE bench_orders (id BIGINT PRIMARY KEY, amount BIGINT NOT NULL, note TEXT NOT NULL)";
        match &db {
            Database::Postgres(p) => {
                sqlx::query(ddl).execute(p).await?;
            }
            Database::Sqlite(p) => {
                sqlx::query(ddl).execute(p).await?;
            }
            Database::MySql(_) => unreachable!("the bench refuses MySQL at start-up"),
        }
        Ok(BenchDb {
            db,
            table,
            schema,
            next_id: AtomicI64::new(1),
        })
    }

    /// One business transaction: an order row, and the event if `event` is given.
    pub async fn business(&self, event: Option<&Message>) -> Result<()> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match &self.db {
            Database::Postgres(p) => {
                let mut tx = p.begin().await?;
                sqlx::query("INSERT INTO bench_orders (id, amount, note) VALUES ($1, $2, 'benchmark order')")
                    .bind(id)
                    .bind(id % 1000)
                    .execute(&mut *tx)
                    .await?;
                if let Some(m) = event {
                    herald::postgres::PgOutboxWriter::new(&self.table)
                        .enqueue(&mut tx, m)
                        .await?;
                }
                tx.commit().await?;
            }
            Database::Sqlite(p) => {
                let mut tx = p.begin().await?;
                sqlx::query("INSERT INTO bench_orders (id, amount, note) VALUES (?1, ?2, 'benchmark order')")
                    .bind(id)
                    .bind(id % 1000)
                    .execute(&mut *tx)
                    .await?;
                if let Some(m) = event {
                    herald::sqlite::SqliteOutboxWriter::new(&self.table)
                        .enqueue(&mut tx, m)
                        .await?;
                }
                tx.commit().await?;
            }
            Database::MySql(_) => unreachable!("the bench refuses MySQL at start-up"),
        }
        Ok(())
    }

    /// Fills the outbox with `messages`, 1,000 per transaction.
    pub async fn prefill(&self, messages: &[Message]) -> Result<()> {
        for chunk in messages.chunks(1000) {
            match &self.db {
                Database::Postgres(p) => {
                    let w = herald::postgres::PgOutboxWriter::new(&self.table);
                    let mut tx = p.begin().await?;
                    for m in chunk {
                        w.enqueue(&mut tx, m).await?;
                    }
                    tx.commit().await?;
                }
                Database::Sqlite(p) => {
                    let w = herald::sqlite::SqliteOutboxWriter::new(&self.table);
                    let mut tx = p.begin().await?;
                    for m in chunk {
                        w.enqueue(&mut tx, m).await?;
                    }
                    tx.commit().await?;
                }
                Database::MySql(_) => unreachable!("the bench refuses MySQL at start-up"),
            }
        }
        Ok(())
    }

    pub async fn pg_counters(&self) -> Result<Option<PgCounters>> {
        let Database::Postgres(p) = &self.db else {
            return Ok(None);
        };
        // Make this backend's statistics visible before reading them.
        let _ = sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(p)
            .await;
        let (wal_bytes,): (i64,) =
            sqlx::query_as("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
                .fetch_one(p)
                .await?;
        let (xact_commit, tup_inserted, tup_updated, tup_deleted): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(p)
        .await?;
        Ok(Some(PgCounters {
            wal_bytes,
            xact_commit,
            tup_inserted,
            tup_updated,
            tup_deleted,
        }))
    }

    /// Dead tuples of the outbox table right now (PostgreSQL).
    pub async fn dead_tuples(&self) -> Result<Option<i64>> {
        let Database::Postgres(p) = &self.db else {
            return Ok(None);
        };
        let n: Option<i64> = sqlx::query_scalar(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'herald_outbox' AND schemaname = current_schema()",
        )
        .fetch_optional(p)
        .await?;
        Ok(n)
    }

    /// (table bytes, index bytes) of the outbox (PostgreSQL).
    pub async fn outbox_size(&self) -> Result<Option<(i64, i64)>> {
        let Database::Postgres(p) = &self.db else {
            return Ok(None);
        };
        let sizes: (i64, i64) = sqlx::query_as(
            "SELECT pg_table_size('herald_outbox'), pg_indexes_size('herald_outbox')",
        )
        .fetch_one(p)
        .await?;
        Ok(Some(sizes))
    }

    /// Durability settings in force, for the report.
    pub async fn settings(&self) -> Result<String> {
        Ok(match &self.db {
            Database::Postgres(p) => {
                let v: String = sqlx::query_scalar("SHOW server_version")
                    .fetch_one(p)
                    .await?;
                let sc: String = sqlx::query_scalar("SHOW synchronous_commit")
                    .fetch_one(p)
                    .await?;
                let fs: String = sqlx::query_scalar("SHOW fsync").fetch_one(p).await?;
                format!("PostgreSQL {v}, synchronous_commit={sc}, fsync={fs}")
            }
            Database::Sqlite(p) => {
                let v: String = sqlx::query_scalar("SELECT sqlite_version()")
                    .fetch_one(p)
                    .await?;
                let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
                    .fetch_one(p)
                    .await?;
                let jm: String = sqlx::query_scalar("PRAGMA journal_mode")
                    .fetch_one(p)
                    .await?;
                format!("SQLite {v}, journal_mode={jm}, synchronous={sync} (2 = FULL)")
            }
            Database::MySql(_) => unreachable!("the bench refuses MySQL at start-up"),
        })
    }

    pub async fn teardown(&self) {
        if let (Database::Postgres(p), Some(schema)) = (&self.db, &self.schema) {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA \"{schema}\" CASCADE"
            )))
            .execute(p)
            .await;
        }
    }
}
