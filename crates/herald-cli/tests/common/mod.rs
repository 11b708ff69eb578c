//! Where the real servers are, for the process-level tests (`.ci/run` starts them), and a
//! schema of herald's tables to run the binary against.
#![allow(dead_code)]

use std::process::Command;

use sqlx::PgPool;

#[allow(unused_imports)]
pub use herald_testkit::unique;

#[path = "../../../herald-testkit/support/pg_schema.rs"]
mod pg_schema;

/// PostgreSQL (`HERALD_TEST_POSTGRES`).
pub fn pg_url() -> String {
    pg_schema::server_url()
}

/// RabbitMQ (`HERALD_TEST_AMQP`).
pub fn amqp_url() -> String {
    std::env::var("HERALD_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// MariaDB or MySQL (`HERALD_TEST_MYSQL`), without a database in the path.
#[allow(dead_code)]
pub fn mysql_server() -> String {
    std::env::var("HERALD_TEST_MYSQL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
        .rsplit_once('/')
        .map(|(server, _)| server.to_owned())
        .unwrap_or_default()
}

/// NATS with JetStream (`HERALD_TEST_NATS`).
#[allow(dead_code)]
pub fn nats_url() -> String {
    std::env::var("HERALD_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A fresh schema with herald's tables, a pool in it, and the URL the binary should use.
pub struct Db {
    pub pool: PgPool,
    pub schema: String,
    pub url: String,
}

impl Db {
    pub async fn new() -> Db {
        let schema = pg_schema::create("herald_cli_test").await;
        let url = pg_schema::url_of(&schema);
        let pool = PgPool::connect(&url).await.unwrap();
        let out = herald(&["migrate", "--database", &url]).output().unwrap();
        assert!(
            out.status.success(),
            "migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Db { pool, schema, url }
    }

    /// Inserts rows exactly as the README documents for non-Rust producers.
    pub async fn insert_plain(&self, topic: &str, keys: usize, per_key: usize) {
        for round in 0..per_key {
            let mut tx = self.pool.begin().await.unwrap();
            for k in 0..keys {
                sqlx::query(
                    "INSERT INTO herald_outbox (message_type, destination, ordering_key, payload) \
                     VALUES ('OrderPlaced', $1, $2, convert_to($3, 'UTF8'))",
                )
                .bind(topic)
                .bind(format!("key-{k}"))
                .bind(format!("{{\"seq\":{round}}}"))
                .execute(&mut *tx)
                .await
                .unwrap();
            }
            tx.commit().await.unwrap();
        }
    }

    pub async fn pending(&self) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM herald_outbox")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub async fn drop(self) {
        pg_schema::drop_schema(&self.pool, &self.schema).await;
        self.pool.close().await;
    }
}

pub fn herald(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_herald"));
    c.args(args)
        .env("HERALD_LOG", "warn")
        .env_remove("HERALD_DATABASE_URL")
        .env_remove("HERALD_BROKER_URL");
    c
}

pub fn relay(db: &Db, extra: &[&str]) -> Command {
    let mut args = vec!["relay", "--database", &db.url];
    let broker = amqp_url();
    args.extend(["--broker", broker.as_str()]);
    args.extend(extra);
    herald(&args)
}

/// `GET path` on `addr` over HTTP/1.0 (no chunking); the status and the body. `None` when
/// nothing listens yet or the answer is cut short.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
