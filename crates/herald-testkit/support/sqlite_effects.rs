// Shared by the transport test files that run the consumer suite against SQLite (included with
// `#[path]`, so the testkit itself needs no database dependency).

use std::sync::Arc;

use async_trait::async_trait;
use herald_core::{Apply, BoxError, Identifier, Message};
use herald_sqlite::{Handler, SqliteApplier, connect, migrate};
use sqlx::{Row, SqliteConnection, SqlitePool};
use uuid::Uuid;

pub struct SqliteEffects {
    pub pool: SqlitePool,
    pub dir: std::path::PathBuf,
    table: Identifier,
}

struct Effects {
    service: String,
    fail_key: Option<String>,
}

#[async_trait]
impl Handler<sqlx::Sqlite> for Effects {
    async fn handle(&self, tx: &mut SqliteConnection, m: &Message) -> Result<(), BoxError> {
        if m.ordering_key.is_some() && m.ordering_key == self.fail_key {
            return Err(format!(
                "test handler refuses key {}",
                m.ordering_key.as_deref().unwrap_or_default()
            )
            .into());
        }
        sqlx::query("INSERT INTO effects (service, message_id, ordering_key) VALUES (?1, ?2, ?3)")
            .bind(&self.service)
            .bind(m.id.to_string())
            .bind(m.ordering_key.as_deref())
            .execute(tx)
            .await?;
        Ok(())
    }
}

impl SqliteEffects {
    pub async fn new() -> SqliteEffects {
        let dir = std::env::temp_dir().join(herald_testkit::unique("herald-consumer-test"));
        std::fs::create_dir_all(&dir).unwrap();
        let pool = connect(&format!("sqlite://{}/app.db", dir.display()))
            .await
            .unwrap();
        let table = Identifier::new("herald_outbox").unwrap();
        migrate(&pool, &table).await.unwrap();
        sqlx::query("CREATE TABLE effects (seq INTEGER PRIMARY KEY AUTOINCREMENT, service TEXT NOT NULL, message_id TEXT NOT NULL, ordering_key TEXT)")
            .execute(&pool)
            .await
            .unwrap();
        SqliteEffects { pool, dir, table }
    }

    pub fn applier(&self, service: &str, fail_key: Option<&str>) -> Arc<dyn Apply> {
        let handler = Effects {
            service: service.to_owned(),
            fail_key: fail_key.map(str::to_owned),
        };
        Arc::new(SqliteApplier::new(self.pool.clone(), &self.table, handler).unwrap())
    }

    pub fn versioned_applier(&self, service: &str, header: &str) -> Arc<dyn Apply> {
        let handler = Effects {
            service: service.to_owned(),
            fail_key: None,
        };
        Arc::new(
            SqliteApplier::new(self.pool.clone(), &self.table, handler)
                .unwrap()
                .skip_stale_versions(header),
        )
    }

    pub async fn request_replay(&self, service: &str) {
        sqlx::query("UPDATE herald_outbox_consumer_dead_letter SET replay_requested = true WHERE consumer = ?1")
            .bind(service)
            .execute(&self.pool)
            .await
            .unwrap();
    }

    pub async fn effects(&self, service: &str) -> Vec<(Uuid, Option<String>)> {
        let rows = sqlx::query(
            "SELECT message_id, ordering_key FROM effects WHERE service = ?1 ORDER BY seq",
        )
        .bind(service)
        .fetch_all(&self.pool)
        .await
        .unwrap();
        rows.iter()
            .map(|r| (Uuid::parse_str(r.get::<&str, _>(0)).unwrap(), r.get(1)))
            .collect()
    }

    pub async fn dead_letters(&self, service: &str) -> Vec<(Option<Uuid>, String, i64)> {
        let rows = sqlx::query("SELECT message_id, reason, attempts FROM herald_outbox_consumer_dead_letter WHERE consumer = ?1 ORDER BY id")
            .bind(service)
            .fetch_all(&self.pool)
            .await
            .unwrap();
        rows.iter()
            .map(|r| {
                (
                    r.get::<Option<&str>, _>(0)
                        .map(|s| Uuid::parse_str(s).unwrap()),
                    r.get(1),
                    r.get(2),
                )
            })
            .collect()
    }

    pub async fn cleanup(&self) {
        self.pool.close().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[async_trait]
impl herald_testkit::inbox_suite::InboxHarness for SqliteEffects {
    fn applier(&self, service: &str, fail_key: Option<&str>) -> Arc<dyn Apply> {
        SqliteEffects::applier(self, service, fail_key)
    }
    fn versioned_applier(&self, service: &str, header: &str) -> Arc<dyn Apply> {
        SqliteEffects::versioned_applier(self, service, header)
    }
    async fn effects(&self, service: &str) -> Vec<(Uuid, Option<String>)> {
        SqliteEffects::effects(self, service).await
    }
    async fn dead_letters(&self, service: &str) -> Vec<(Option<Uuid>, String, i64)> {
        SqliteEffects::dead_letters(self, service).await
    }
    async fn request_replay(&self, service: &str) {
        SqliteEffects::request_replay(self, service).await
    }
    async fn cleanup(&self) {
        SqliteEffects::cleanup(self).await
    }
}
