//! The outbox-store conformance suite on the real PostgreSQL server (a fresh schema per test).
//!
//! Needs PostgreSQL at `HERALD_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`).

use std::sync::Arc;

use async_trait::async_trait;
use herald_core::{Error, Identifier, Message, OutboxStore, Result};
use herald_postgres::{PgOutbox, migrate};
use herald_testkit::sql_store;
use herald_testkit::suite::{OpenTransaction, StoreHarness};

type D = herald_postgres::PgDialect;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool};

fn url() -> String {
    std::env::var("HERALD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

struct Postgres {
    pool: PgPool,
    schema: String,
    table: Identifier,
}

async fn harness() -> Postgres {
    let schema = herald_testkit::unique("herald_test");
    let admin = PgPool::connect(&url())
        .await
        .expect("PostgreSQL must be running for these tests (see .ci/run)");
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let opts: PgConnectOptions = url().parse().unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(6)
        .connect_with(opts.options([("search_path", schema.as_str())]))
        .await
        .unwrap();
    let table = Identifier::new("herald_outbox").unwrap();
    migrate(&pool, &table).await.unwrap();
    Postgres {
        pool,
        schema,
        table,
    }
}

fn e(err: sqlx::Error) -> Error {
    Error::unavailable("postgres", err)
}

#[async_trait]
impl StoreHarness for Postgres {
    async fn store(&self) -> Arc<dyn OutboxStore> {
        sql_store::store::<D>(&self.pool, &self.table).await
    }

    fn server(&self) -> Option<std::net::SocketAddr> {
        let url = url::Url::parse(&url()).ok()?;
        let host = url.host_str()?.to_owned();
        let port = url.port().unwrap_or(5432);
        std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
            .ok()?
            .next()
    }

    async fn store_at(&self, addr: std::net::SocketAddr) -> Option<Arc<dyn OutboxStore>> {
        let opts: PgConnectOptions = url().parse().ok()?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(2))
            .connect_with(
                opts.host(&addr.ip().to_string())
                    .port(addr.port())
                    .options([("search_path", self.schema.as_str())]),
            )
            .await
            .ok()?;
        Some(sql_store::store::<D>(&pool, &self.table).await)
    }

    async fn enqueue(&self, messages: &[Message], commit: bool) -> Result<()> {
        sql_store::enqueue::<D>(&self.pool, &self.table, messages, commit).await
    }

    async fn enqueue_open(&self, message: &Message) -> Result<Box<dyn OpenTransaction>> {
        sql_store::enqueue_open::<D>(&self.pool, &self.table, message).await
    }

    async fn insert_plain(&self, dest: &str, kind: &str, key: &str, payload: &[u8]) -> Result<()> {
        sql_store::insert_plain::<D>(&self.pool, dest, kind, key, payload).await
    }

    async fn insert_raw(&self, r: &herald_testkit::poison::RawInsert) -> Result<()> {
        let sql = herald_testkit::poison::insert_sql(
            |n| match n {
                1 => "$1::uuid".to_owned(),
                6 => "$6::jsonb".to_owned(),
                n => format!("${n}"),
            },
            "gen_random_uuid()",
        );
        herald_testkit::bind_raw_insert!(sqlx::query(AssertSqlSafe(sql)), r)
            .execute(&self.pool)
            .await
            .map_err(e)?;
        Ok(())
    }

    async fn insert_native(
        &self,
        case: herald_testkit::poison::NativePoison,
        destination: &str,
    ) -> Result<bool> {
        use herald_testkit::poison::NativePoison as N;
        let created_at = match case {
            N::InfiniteTime => "infinity",
            N::FarFutureTime => "294276-01-01",
            N::ReusedDeadLetterId => {
                sqlx::query("INSERT INTO herald_outbox (id, message_type, destination, headers, payload) \
                             SELECT MAX(id), 'T', $1, '[1]', '\\x00' FROM herald_outbox_dead_letter")
                    .bind(destination)
                    .execute(&self.pool)
                    .await
                    .map_err(e)?;
                return Ok(true);
            }
            _ => return Ok(false),
        };
        sqlx::query("INSERT INTO herald_outbox (message_type, destination, payload, created_at) VALUES ('T', $1, '\\x00', $2::timestamptz)")
            .bind(destination)
            .bind(created_at)
            .execute(&self.pool)
            .await
            .map_err(e)?;
        Ok(true)
    }

    async fn insert_undecodable(&self, destination: &str) -> Result<()> {
        sql_store::insert_undecodable::<D>(&self.pool, destination).await
    }

    async fn dead_letter_reasons(&self) -> Result<Vec<(String, String)>> {
        sql_store::dead_letter_reasons::<D>(&self.pool).await
    }

    async fn cleanup(&self) {
        let _ = sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA \"{}\" CASCADE",
            self.schema
        )))
        .execute(&self.pool)
        .await;
        self.pool.close().await;
    }
}

herald_testkit::store_suite!(harness());

/// A table name with SQL in it is refused before any SQL runs; a missing table is reported with
/// what to do about it.
#[tokio::test]
async fn bad_table_names_and_missing_tables_fail_clearly() {
    let h = harness().await;
    let err = Identifier::new("outbox\"; DROP TABLE x;--")
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not allowed"), "{err}");
    let err = PgOutbox::new(h.pool.clone(), Identifier::new("no_such_outbox").unwrap())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no_such_outbox") && err.contains("herald migrate"),
        "{err}"
    );
    sqlx::query("CREATE TABLE half_outbox (id BIGSERIAL PRIMARY KEY, payload BYTEA)")
        .execute(&h.pool)
        .await
        .unwrap();
    let err = PgOutbox::new(h.pool.clone(), Identifier::new("half_outbox").unwrap())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("missing columns: message_id"), "{err}");
    h.cleanup().await;
}

/// The relay warns when the database could lose a commit it already published.
#[tokio::test]
async fn durability_settings_are_checked() {
    let h = harness().await;
    let store = h.store().await;
    let warnings = store.durability_warnings().await.unwrap();
    assert!(
        !warnings
            .iter()
            .any(|w| w.contains("synchronous_commit") || w.contains("fsync")),
        "this server runs synchronous_commit=on and fsync=on: {warnings:?}"
    );
    // autovacuum cannot be changed per session: the warning must match the server's setting.
    let autovacuum: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(
        warnings.iter().any(|w| w.contains("autovacuum=off")),
        autovacuum == "off",
        "autovacuum={autovacuum}: {warnings:?}"
    );
    // A session that turned synchronous_commit off, as an application role might.
    let opts: PgConnectOptions = url().parse().unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts.options([
            ("search_path", h.schema.as_str()),
            ("synchronous_commit", "off"),
        ]))
        .await
        .unwrap();
    let store = PgOutbox::new(pool, h.table.clone()).await.unwrap();
    let warnings = store.durability_warnings().await.unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("synchronous_commit=off")),
        "{warnings:?}"
    );
    h.cleanup().await;
}

/// `migrate` upgrades an outbox created by an earlier version (it had an `(ordering_key, id)`
/// index and a unique `message_id`, which every insert paid for and nothing reads any more), and
/// running it again changes nothing.
#[tokio::test]
async fn migrate_upgrades_an_older_outbox_and_is_idempotent() {
    let h = harness().await;
    let t = h.table.as_str();
    sqlx::query(AssertSqlSafe(format!(
        "CREATE INDEX {t}_key_idx ON {t} (ordering_key, id)"
    )))
    .execute(&h.pool)
    .await
    .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "ALTER TABLE {t} ADD CONSTRAINT {t}_message_id_key UNIQUE (message_id)"
    )))
    .execute(&h.pool)
    .await
    .unwrap();
    // An outbox from before versioned migrations has no record of them.
    sqlx::query(AssertSqlSafe(format!("DROP TABLE {t}_migrations")))
        .execute(&h.pool)
        .await
        .unwrap();
    assert_eq!(migrate(&h.pool, &h.table).await.unwrap(), vec![1, 2]);
    assert_eq!(
        migrate(&h.pool, &h.table).await.unwrap(),
        Vec::<i64>::new(),
        "a second run applies nothing"
    );
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = current_schema() AND tablename = $1 ORDER BY 1",
    )
    .bind(t)
    .fetch_all(&h.pool)
    .await
    .unwrap();
    assert_eq!(
        indexes,
        vec![format!("{t}_leased_idx"), format!("{t}_pkey")],
        "only the primary key and the partial index on leased rows remain"
    );
    h.cleanup().await;
}
