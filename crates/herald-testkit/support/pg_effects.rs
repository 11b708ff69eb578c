// Shared by the transport test files that run the consumer suite against PostgreSQL (included
// with `#[path]`, so the testkit itself needs no database dependency).

use std::sync::Arc;

use async_trait::async_trait;
use herald_core::{Apply, BoxError, Identifier, Message};
use herald_postgres::{Handler, PgApplier, migrate};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};
use uuid::Uuid;

pub struct PgEffects {
    pub pool: PgPool,
    schema: String,
    table: Identifier,
}

struct Effects {
    service: String,
    fail_key: Option<String>,
}

#[async_trait]
impl Handler<sqlx::Postgres> for Effects {
    async fn handle(&self, tx: &mut PgConnection, m: &Message) -> Result<(), BoxError> {
        if m.ordering_key.is_some() && m.ordering_key == self.fail_key {
            return Err(format!(
                "test handler refuses key {}",
                m.ordering_key.as_deref().unwrap_or_default()
            )
            .into());
        }
        sqlx::query("INSERT INTO effects (service, message_id, ordering_key) VALUES ($1, $2, $3)")
            .bind(&self.service)
            .bind(m.id)
            .bind(m.ordering_key.as_deref())
            .execute(tx)
            .await?;
        Ok(())
    }
}

impl PgEffects {
    pub async fn new() -> PgEffects {
        let url = std::env::var("HERALD_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let schema = herald_testkit::unique("herald_consumer_test");
        let admin = PgPool::connect(&url)
            .await
            .expect("PostgreSQL must be running (see .ci/run)");
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let opts: PgConnectOptions = url.parse().unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(opts.options([("search_path", schema.as_str())]))
            .await
            .unwrap();
        let table = Identifier::new("herald_outbox").unwrap();
        migrate(&pool, &table).await.unwrap();
        sqlx::query("CREATE TABLE effects (seq BIGSERIAL PRIMARY KEY, service TEXT NOT NULL, message_id UUID NOT NULL, ordering_key TEXT)")
            .execute(&pool)
            .await
            .unwrap();
        PgEffects {
            pool,
            schema,
            table,
        }
    }

    pub fn applier(&self, service: &str, fail_key: Option<&str>) -> Arc<dyn Apply> {
        let handler = Effects {
            service: service.to_owned(),
            fail_key: fail_key.map(str::to_owned),
        };
        Arc::new(PgApplier::new(self.pool.clone(), &self.table, handler).unwrap())
    }

    pub fn versioned_applier(&self, service: &str, header: &str) -> Arc<dyn Apply> {
        let handler = Effects {
            service: service.to_owned(),
            fail_key: None,
        };
        Arc::new(
            PgApplier::new(self.pool.clone(), &self.table, handler)
                .unwrap()
                .skip_stale_versions(header),
        )
    }

    pub async fn request_replay(&self, service: &str) {
        sqlx::query("UPDATE herald_outbox_consumer_dead_letter SET replay_requested = true WHERE consumer = $1")
            .bind(service)
            .execute(&self.pool)
            .await
            .unwrap();
    }

    pub async fn effects(&self, service: &str) -> Vec<(Uuid, Option<String>)> {
        let rows = sqlx::query(
            "SELECT message_id, ordering_key FROM effects WHERE service = $1 ORDER BY seq",
        )
        .bind(service)
        .fetch_all(&self.pool)
        .await
        .unwrap();
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    pub async fn dead_letters(&self, service: &str) -> Vec<(Option<Uuid>, String, i64)> {
        let rows = sqlx::query(
            "SELECT message_id, reason, attempts::bigint FROM herald_outbox_consumer_dead_letter WHERE consumer = $1 ORDER BY id",
        )
        .bind(service)
        .fetch_all(&self.pool)
        .await
        .unwrap();
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    pub async fn cleanup(&self) {
        let _ = sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA \"{}\" CASCADE",
            self.schema
        )))
        .execute(&self.pool)
        .await;
        self.pool.close().await;
    }
}

#[async_trait]
impl herald_testkit::inbox_suite::InboxHarness for PgEffects {
    fn applier(&self, service: &str, fail_key: Option<&str>) -> Arc<dyn Apply> {
        PgEffects::applier(self, service, fail_key)
    }
    fn versioned_applier(&self, service: &str, header: &str) -> Arc<dyn Apply> {
        PgEffects::versioned_applier(self, service, header)
    }
    async fn effects(&self, service: &str) -> Vec<(Uuid, Option<String>)> {
        PgEffects::effects(self, service).await
    }
    async fn dead_letters(&self, service: &str) -> Vec<(Option<Uuid>, String, i64)> {
        PgEffects::dead_letters(self, service).await
    }
    async fn request_replay(&self, service: &str) {
        PgEffects::request_replay(self, service).await
    }
    async fn cleanup(&self) {
        PgEffects::cleanup(self).await
    }
}
