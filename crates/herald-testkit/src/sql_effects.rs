//! The consumer side of the inbox and consumer suites on any SQL database, written once over
//! herald-sql's dialects: a handler that records an effect row per message in the inbox
//! transaction, and the queries the suites check. Each backend's test support only opens an
//! isolated database (a schema, a database, a file) and names what to drop afterwards.

use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use herald_core::{Apply, BoxError, Identifier, Message};
use herald_sql::{Applier, Dialect, Handler, SqlDb, Stmt};
use sqlx::Pool;
use uuid::Uuid;

use crate::inbox_suite::InboxHarness;

/// An isolated database with herald's tables and an `effects` table.
pub struct SqlEffects<D: Dialect> {
    /// The pool on the isolated database.
    pub pool: Pool<D::DB>,
    table: Identifier,
    cleanup_sql: Option<String>,
    cleanup_dir: Option<std::path::PathBuf>,
}

struct Effects<D> {
    service: String,
    fail_key: Option<String>,
    insert: String,
    dialect: PhantomData<fn() -> D>,
}

#[async_trait]
impl<D: Dialect> Handler<D::DB> for Effects<D> {
    async fn handle(
        &self,
        tx: &mut <D::DB as sqlx::Database>::Connection,
        m: &Message,
    ) -> Result<(), BoxError> {
        if m.ordering_key.is_some() && m.ordering_key == self.fail_key {
            return Err(format!(
                "test handler refuses key {}",
                m.ordering_key.as_deref().unwrap_or_default()
            )
            .into());
        }
        Stmt::<D::DB>::new(&self.insert)
            .text(&self.service)
            .text(&m.id.to_string())
            .opt_text(m.ordering_key.as_deref())
            .execute(tx)
            .await?;
        Ok(())
    }
}

impl<D: Dialect> SqlEffects<D> {
    /// Migrates herald's tables into `pool` and creates the effects table with `effects_ddl`
    /// (columns `seq` auto-increment, `service`, `message_id`, `ordering_key`). `cleanup_sql`
    /// (run on the pool) and `cleanup_dir` (removed) undo what the caller created.
    pub async fn new(
        pool: Pool<D::DB>,
        effects_ddl: &str,
        cleanup_sql: Option<String>,
        cleanup_dir: Option<std::path::PathBuf>,
    ) -> SqlEffects<D> {
        let table = Identifier::new("herald_outbox").expect("a valid name");
        herald_sql::migrate::<D>(&pool, &table)
            .await
            .expect("migrate");
        let mut conn = pool.acquire().await.expect("a connection");
        Stmt::<D::DB>::new(effects_ddl)
            .execute(&mut conn)
            .await
            .expect("create the effects table");
        drop(conn);
        SqlEffects {
            pool,
            table,
            cleanup_sql,
            cleanup_dir,
        }
    }

    /// The directory the caller created for this harness (SQLite), if any.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.cleanup_dir.as_deref()
    }

    fn handler(&self, service: &str, fail_key: Option<&str>) -> Effects<D> {
        Effects {
            service: service.to_owned(),
            fail_key: fail_key.map(str::to_owned),
            insert: D::render(&format!(
                "INSERT INTO effects (service, message_id, ordering_key) VALUES (?, {}, ?)",
                D::uuid_param("?")
            )),
            dialect: PhantomData,
        }
    }

    async fn rows(&self, sql: &str, service: &str) -> Vec<<D::DB as sqlx::Database>::Row> {
        let mut conn = self.pool.acquire().await.expect("a connection");
        Stmt::<D::DB>::new(&D::render(sql))
            .text(service)
            .fetch_all(&mut conn)
            .await
            .expect("query")
    }
}

#[async_trait]
impl<D: Dialect> InboxHarness for SqlEffects<D> {
    fn applier(&self, service: &str, fail_key: Option<&str>) -> Arc<dyn Apply> {
        let handler = self.handler(service, fail_key);
        Arc::new(Applier::<D, _>::new(self.pool.clone(), &self.table, handler).expect("applier"))
    }

    fn versioned_applier(&self, service: &str, header: &str) -> Arc<dyn Apply> {
        let handler = self.handler(service, None);
        Arc::new(
            Applier::<D, _>::new(self.pool.clone(), &self.table, handler)
                .expect("applier")
                .skip_stale_versions(header),
        )
    }

    async fn effects(&self, service: &str) -> Vec<(Uuid, Option<String>)> {
        let sql = format!(
            "SELECT {} AS message_id, ordering_key FROM effects WHERE service = ? ORDER BY seq",
            D::select_text("message_id")
        );
        self.rows(&sql, service)
            .await
            .iter()
            .map(|r| {
                let id = <D::DB as SqlDb>::get_text(r, "message_id").expect("message_id");
                (
                    Uuid::parse_str(&id).expect("a UUID"),
                    <D::DB as SqlDb>::get_opt_text(r, "ordering_key").expect("ordering_key"),
                )
            })
            .collect()
    }

    async fn dead_letters(&self, service: &str) -> Vec<(Option<Uuid>, String, i64)> {
        let sql = format!(
            "SELECT {} AS message_id, reason, {} AS attempts FROM herald_outbox_consumer_dead_letter \
             WHERE consumer = ? ORDER BY id",
            D::select_text("message_id"),
            D::cast_int("attempts")
        );
        self.rows(&sql, service)
            .await
            .iter()
            .map(|r| {
                (
                    <D::DB as SqlDb>::get_opt_text(r, "message_id")
                        .expect("message_id")
                        .map(|s| Uuid::parse_str(&s).expect("a UUID")),
                    <D::DB as SqlDb>::get_text(r, "reason").expect("reason"),
                    <D::DB as SqlDb>::get_i64(r, "attempts").expect("attempts"),
                )
            })
            .collect()
    }

    async fn request_replay(&self, service: &str) {
        let sql = format!(
            "UPDATE herald_outbox_consumer_dead_letter SET replay_requested = {} WHERE consumer = ?",
            D::true_literal()
        );
        let mut conn = self.pool.acquire().await.expect("a connection");
        Stmt::<D::DB>::new(&D::render(&sql))
            .text(service)
            .execute(&mut conn)
            .await
            .expect("mark for replay");
    }

    async fn cleanup(&self) {
        if let Some(sql) = &self.cleanup_sql
            && let Ok(mut conn) = self.pool.acquire().await
        {
            let _ = Stmt::<D::DB>::new(sql).execute(&mut conn).await;
        }
        self.pool.close().await;
        if let Some(dir) = &self.cleanup_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
