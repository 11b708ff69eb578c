// A fresh PostgreSQL schema for one test, on the test server (included with `#[path]`, so the
// testkit itself links no database driver).
#![allow(dead_code)]

use sqlx::{AssertSqlSafe, PgPool};

/// The test server (`HERALD_TEST_POSTGRES`; `.ci/run` starts it).
pub fn server_url() -> String {
    std::env::var("HERALD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Creates a schema named `<prefix>_<random>` and returns its name.
pub async fn create(prefix: &str) -> String {
    let schema = herald_testkit::unique(prefix);
    let admin = PgPool::connect(&server_url())
        .await
        .expect("PostgreSQL must be running (see .ci/run)");
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    schema
}

/// A URL whose connections use `schema` as their search path.
pub fn url_of(schema: &str) -> String {
    format!("{}?options[search_path]={schema}", server_url())
}

/// Drops `schema` and everything in it, through `pool`.
pub async fn drop_schema(pool: &PgPool, schema: &str) {
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE")))
        .execute(pool)
        .await
        .unwrap();
}
