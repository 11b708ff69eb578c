//! The PostgreSQL consumer side: stale versions, inbox retention, concurrent duplicates.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::consumer::{Applied, Apply};
use herald_core::{BoxError, Identifier, Message};
use herald_postgres::{PgApplier, PgHandler, migrate};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgConnection, PgPool};

struct Count;

#[async_trait]
impl PgHandler for Count {
    async fn handle(&self, tx: &mut PgConnection, m: &Message) -> Result<(), BoxError> {
        sqlx::query("INSERT INTO applied (message_id) VALUES ($1)")
            .bind(m.id)
            .execute(tx)
            .await?;
        Ok(())
    }
}

async fn setup() -> (PgPool, Identifier, String) {
    let url = std::env::var("HERALD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = herald_testkit::unique("herald_applier");
    let admin = PgPool::connect(&url).await.unwrap();
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
        .execute(&admin)
        .await
        .unwrap();
    let opts: PgConnectOptions = url.parse().unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(opts.options([("search_path", schema.as_str())]))
        .await
        .unwrap();
    let table = Identifier::new("herald_outbox").unwrap();
    migrate(&pool, &table).await.unwrap();
    sqlx::query("CREATE TABLE applied (message_id UUID NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    (pool, table, schema)
}

async fn teardown(pool: PgPool, schema: String) {
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE")))
        .execute(&pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn stale_versions_are_skipped_per_key() {
    let (pool, table, schema) = setup().await;
    let a = PgApplier::new(pool.clone(), &table, Count)
        .unwrap()
        .skip_stale_versions("version");
    let v = |key: &str, v: &str| {
        Message::event("products", "ProductChanged", b"{}".to_vec())
            .with_key(key)
            .with_header("version", v)
    };
    assert_eq!(
        a.apply("svc", &v("p1", "2"), None).await.unwrap(),
        Applied::Done
    );
    assert_eq!(
        a.apply("svc", &v("p1", "1"), None).await.unwrap(),
        Applied::Stale
    );
    assert_eq!(
        a.apply("svc", &v("p2", "1"), None).await.unwrap(),
        Applied::Done
    );
    assert_eq!(
        a.apply("svc", &v("p1", "3"), None).await.unwrap(),
        Applied::Done
    );
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM applied")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied, 3);
    teardown(pool, schema).await;
}

/// Two instances applying the same message at the same moment: one applies, the other waits on
/// the inbox row and then sees a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_apply_once() {
    let (pool, table, schema) = setup().await;
    let a = Arc::new(PgApplier::new(pool.clone(), &table, Count).unwrap());
    for _ in 0..20 {
        let m = Message::event("t", "E", vec![]);
        let (x, y) = tokio::join!(a.apply("svc", &m, None), a.apply("svc", &m, None));
        let mut outcomes = [x.unwrap(), y.unwrap()];
        outcomes.sort_by_key(|o| *o == Applied::Duplicate);
        assert_eq!(outcomes, [Applied::Done, Applied::Duplicate]);
    }
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM applied")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied, 20);
    teardown(pool, schema).await;
}

#[tokio::test]
async fn inbox_retention_purges_in_batches() {
    let (pool, table, schema) = setup().await;
    let a = PgApplier::new(pool.clone(), &table, Count).unwrap();
    for _ in 0..5 {
        a.apply("svc", &Message::event("t", "E", vec![]), None)
            .await
            .unwrap();
    }
    assert_eq!(
        a.purge_inbox(Duration::from_secs(3600), 10).await.unwrap(),
        0
    );
    assert_eq!(a.purge_inbox(Duration::ZERO, 2).await.unwrap(), 2);
    assert_eq!(a.purge_inbox(Duration::ZERO, 10).await.unwrap(), 3);
    teardown(pool, schema).await;
}
