// Shared by the test files that run the inbox and consumer suites against MySQL or MariaDB
// (included with `#[path]`, so the testkit itself needs no database dependency). Each harness
// works in a database of its own, dropped by `cleanup`.

use std::sync::Arc;

use async_trait::async_trait;
use herald_core::{Apply, BoxError, Identifier, Message};
use herald_mysql::{Handler, MySqlApplier, migrate};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{AssertSqlSafe, MySqlConnection, MySqlPool, Row};
use uuid::Uuid;

pub fn mysql_url() -> String {
    std::env::var("HERALD_TEST_MYSQL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

/// A fresh database on the test server and a pool on it.
pub async fn fresh_database(prefix: &str, connections: u32) -> (MySqlPool, String) {
    let name = herald_testkit::unique(prefix);
    let admin = MySqlPool::connect(&mysql_url())
        .await
        .expect("MySQL/MariaDB must be running for these tests (see .ci/run)");
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE `{name}`")))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let opts: MySqlConnectOptions = mysql_url().parse().unwrap();
    let pool = MySqlPoolOptions::new()
        .max_connections(connections)
        .connect_with(opts.database(&name))
        .await
        .unwrap();
    (pool, name)
}

pub async fn drop_database(pool: &MySqlPool, name: &str) {
    let _ = sqlx::query(AssertSqlSafe(format!("DROP DATABASE `{name}`")))
        .execute(pool)
        .await;
    pool.close().await;
}

pub struct MySqlEffects {
    pub pool: MySqlPool,
    database: String,
    table: Identifier,
}

struct Effects {
    service: String,
    fail_key: Option<String>,
}

#[async_trait]
impl Handler<sqlx::MySql> for Effects {
    async fn handle(&self, tx: &mut MySqlConnection, m: &Message) -> Result<(), BoxError> {
        if m.ordering_key.is_some() && m.ordering_key == self.fail_key {
            return Err(format!(
                "test handler refuses key {}",
                m.ordering_key.as_deref().unwrap_or_default()
            )
            .into());
        }
        sqlx::query("INSERT INTO effects (service, message_id, ordering_key) VALUES (?, ?, ?)")
            .bind(&self.service)
            .bind(m.id.to_string())
            .bind(m.ordering_key.as_deref())
            .execute(tx)
            .await?;
        Ok(())
    }
}

impl MySqlEffects {
    pub async fn new() -> MySqlEffects {
        let (pool, database) = fresh_database("herald_consumer_test", 8).await;
        let table = Identifier::new("herald_outbox").unwrap();
        migrate(&pool, &table).await.unwrap();
        sqlx::query("CREATE TABLE effects (seq BIGINT AUTO_INCREMENT PRIMARY KEY, service VARCHAR(255) NOT NULL, message_id CHAR(36) NOT NULL, ordering_key VARCHAR(255)) ENGINE = InnoDB")
            .execute(&pool)
            .await
            .unwrap();
        MySqlEffects {
            pool,
            database,
            table,
        }
    }

    pub fn applier(&self, service: &str, fail_key: Option<&str>) -> Arc<dyn Apply> {
        let handler = Effects {
            service: service.to_owned(),
            fail_key: fail_key.map(str::to_owned),
        };
        Arc::new(MySqlApplier::new(self.pool.clone(), &self.table, handler).unwrap())
    }

    pub fn versioned_applier(&self, service: &str, header: &str) -> Arc<dyn Apply> {
        let handler = Effects {
            service: service.to_owned(),
            fail_key: None,
        };
        Arc::new(
            MySqlApplier::new(self.pool.clone(), &self.table, handler)
                .unwrap()
                .skip_stale_versions(header),
        )
    }

    pub async fn request_replay(&self, service: &str) {
        sqlx::query("UPDATE herald_outbox_consumer_dead_letter SET replay_requested = TRUE WHERE consumer = ?")
            .bind(service)
            .execute(&self.pool)
            .await
            .unwrap();
    }

    pub async fn effects(&self, service: &str) -> Vec<(Uuid, Option<String>)> {
        let rows = sqlx::query(
            "SELECT message_id, ordering_key FROM effects WHERE service = ? ORDER BY seq",
        )
        .bind(service)
        .fetch_all(&self.pool)
        .await
        .unwrap();
        rows.iter()
            .map(|r| (Uuid::parse_str(&r.get::<String, _>(0)).unwrap(), r.get(1)))
            .collect()
    }

    pub async fn dead_letters(&self, service: &str) -> Vec<(Option<Uuid>, String, i64)> {
        let rows = sqlx::query("SELECT message_id, reason, CAST(attempts AS SIGNED) FROM herald_outbox_consumer_dead_letter WHERE consumer = ? ORDER BY id")
            .bind(service)
            .fetch_all(&self.pool)
            .await
            .unwrap();
        rows.iter()
            .map(|r| {
                (
                    r.get::<Option<String>, _>(0)
                        .map(|s| Uuid::parse_str(&s).unwrap()),
                    r.get(1),
                    r.get(2),
                )
            })
            .collect()
    }

    pub async fn cleanup(&self) {
        drop_database(&self.pool, &self.database).await;
    }
}

#[async_trait]
impl herald_testkit::inbox_suite::InboxHarness for MySqlEffects {
    fn applier(&self, service: &str, fail_key: Option<&str>) -> Arc<dyn Apply> {
        MySqlEffects::applier(self, service, fail_key)
    }
    fn versioned_applier(&self, service: &str, header: &str) -> Arc<dyn Apply> {
        MySqlEffects::versioned_applier(self, service, header)
    }
    async fn effects(&self, service: &str) -> Vec<(Uuid, Option<String>)> {
        MySqlEffects::effects(self, service).await
    }
    async fn dead_letters(&self, service: &str) -> Vec<(Option<Uuid>, String, i64)> {
        MySqlEffects::dead_letters(self, service).await
    }
    async fn request_replay(&self, service: &str) {
        MySqlEffects::request_replay(self, service).await
    }
    async fn cleanup(&self) {
        MySqlEffects::cleanup(self).await
    }
}
