// Shared by the test files that run the inbox and consumer suites against MySQL or MariaDB
// (included with `#[path]`, so the testkit itself needs no database dependency). Each harness
// works in a database of its own, dropped by `cleanup`.

use herald_mysql::MySqlDialect;
use herald_testkit::sql_effects::SqlEffects;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{AssertSqlSafe, MySqlPool};

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

#[allow(dead_code)] // used by the store suite, not by every file that includes this one
pub async fn drop_database(pool: &MySqlPool, name: &str) {
    let _ = sqlx::query(AssertSqlSafe(format!("DROP DATABASE `{name}`")))
        .execute(pool)
        .await;
    pool.close().await;
}

pub type MySqlEffects = SqlEffects<MySqlDialect>;

pub async fn open() -> MySqlEffects {
    let (pool, database) = fresh_database("herald_consumer_test", 8).await;
    SqlEffects::new(
        pool,
        "CREATE TABLE effects (seq BIGINT AUTO_INCREMENT PRIMARY KEY, service VARCHAR(255) NOT NULL, \
         message_id CHAR(36) NOT NULL, ordering_key VARCHAR(255)) ENGINE = InnoDB",
        Some(format!("DROP DATABASE `{database}`")),
        None,
    )
    .await
}
