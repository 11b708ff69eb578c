// The consumer side of the inbox and consumer suites on PostgreSQL, in a schema of its own
// (included with `#[path]`, so the testkit itself links no database driver).

use herald_postgres::PgDialect;
use herald_testkit::sql_effects::SqlEffects;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool};

pub type PgEffects = SqlEffects<PgDialect>;

pub async fn open() -> PgEffects {
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
    SqlEffects::new(
        pool,
        "CREATE TABLE effects (seq BIGSERIAL PRIMARY KEY, service TEXT NOT NULL, message_id UUID NOT NULL, ordering_key TEXT)",
        Some(format!("DROP SCHEMA \"{schema}\" CASCADE")),
        None,
    )
    .await
}
