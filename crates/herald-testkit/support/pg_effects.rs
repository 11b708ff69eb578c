// The consumer side of the inbox and consumer suites on PostgreSQL, in a schema of its own
// (included with `#[path]`, so the testkit itself links no database driver).

use herald_postgres::PgDialect;
use herald_testkit::sql_effects::SqlEffects;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

#[path = "pg_schema.rs"]
mod pg_schema;

pub type PgEffects = SqlEffects<PgDialect>;

pub async fn open() -> PgEffects {
    let schema = pg_schema::create("herald_consumer_test").await;
    let opts: PgConnectOptions = pg_schema::server_url().parse().unwrap();
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
