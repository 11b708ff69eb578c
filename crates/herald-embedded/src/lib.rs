//! herald's zero-server transport: a durable log and queue in a local SQLite file.
//!
//! Publishing appends to the log in one transaction per batch; the commit (with
//! `synchronous=FULL`) is the broker's confirmation. Events are read by every subscribing service
//! from its own offset (so a service can start late and still get every event). Commands go to a
//! queue that must have an owner: a service registers as owner by subscribing, and a command sent
//! to a queue nobody owns is rejected instead of silently dropped.
//!
//! Each service reads a destination through one subscriber at a time; competing consumers and
//! visibility timeouts belong to a later version.
//!
//! ```no_run
//! # async fn example() -> herald_core::Result<()> {
//! use herald_core::{Message, Subscription, Transport};
//! let broker = herald_embedded::EmbeddedTransport::open("sqlite://broker.db").await?;
//! let mut sub = broker.subscribe(&Subscription::events("orders", "email-service")).await?;
//! broker.publish(&[Message::event("orders", "OrderPlaced", b"{}".to_vec())]).await;
//! let delivery = sub.next().await?;
//! sub.ack(&delivery).await?;
//! # Ok(()) }
//! ```

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::message::{from_micros, to_micros};
use herald_core::store::RawRow;
use herald_core::{Delivery, Error, Kind, Message, Result, Subscriber, Subscription, Transport};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, SqliteConnection};

const SCHEMA: &str = include_str!("schema.sql");

fn db(context: &str, e: sqlx::Error) -> Error {
    let transient = matches!(e, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut)
        || matches!(&e, sqlx::Error::Database(d) if d.code().and_then(|c| c.parse::<i64>().ok()).is_some_and(|c| matches!(c & 0xff, 5 | 6)));
    Error::Database {
        context: format!("embedded broker: {context}"),
        transient,
        source: Box::new(e),
    }
}

/// The embedded broker, stored in one SQLite file.
#[derive(Clone)]
pub struct EmbeddedTransport {
    pool: SqlitePool,
    location: String,
}

impl EmbeddedTransport {
    /// Opens (creating if needed) the broker file at `url` (`sqlite://path` or `sqlite::memory:`).
    pub async fn open(url: &str) -> Result<EmbeddedTransport> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| {
                Error::config(format!(
                    "embedded broker URL is not a valid SQLite URL: {e}"
                ))
            })?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5));
        let location = opts.get_filename().display().to_string();
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(|e| db("opening the broker file", e))?;
        for statement in SCHEMA.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
                .execute(&pool)
                .await
                .map_err(|e| db("creating the broker tables", e))?;
        }
        Ok(EmbeddedTransport { pool, location })
    }

    /// Number of messages in the log for `destination`.
    pub async fn log_len(&self, destination: &str) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM herald_log WHERE destination = ?1")
            .bind(destination)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| db("counting the log", e))?;
        Ok(n as u64)
    }

    /// How many messages of `destination` the group `service` has not acknowledged yet.
    pub async fn lag(&self, destination: &str, service: &str) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM herald_log WHERE destination = ?1 AND seq > \
             COALESCE((SELECT acked FROM herald_group_offset WHERE grp = ?2 AND destination = ?1), 0)",
        )
        .bind(destination)
        .bind(service)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| db("reading a group's lag", e))?;
        Ok(n as u64)
    }

    async fn append(&self, conn: &mut SqliteConnection, m: &Message) -> Result<()> {
        if m.kind == Kind::Command {
            let owned: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM herald_queue_owner WHERE queue = ?1")
                    .bind(&m.destination)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(|e| db("looking up the command's owner", e))?;
            if owned.is_none() {
                return Err(Error::rejected(format!(
                    "no service owns command queue {:?}: a command needs its owner to subscribe first",
                    m.destination
                )));
            }
        }
        sqlx::query(
            "INSERT INTO herald_log (destination, kind, message_id, message_type, source, ordering_key, headers, \
             content_type, payload, created_at, published_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .bind(&m.destination)
        .bind(m.kind.as_str())
        .bind(m.id.to_string())
        .bind(&m.message_type)
        .bind(&m.source)
        .bind(m.ordering_key.as_deref())
        .bind(serde_json::to_string(&m.headers).expect("a string map serialises"))
        .bind(&m.content_type)
        .bind(&m.payload)
        .bind(m.created_at_micros())
        .bind(to_micros(std::time::SystemTime::now()))
        .execute(&mut *conn)
        .await
        .map_err(|e| db("appending to the log", e))?;
        Ok(())
    }
}

#[async_trait]
impl Transport for EmbeddedTransport {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<()>> {
        // One transaction for the batch; a rejected command is left out and reported, the rest
        // commit. The commit is the confirmation for every message that made it in.
        let mut tx = match self.pool.begin_with("BEGIN IMMEDIATE").await {
            Ok(tx) => tx,
            Err(e) => {
                let e = db("starting a publish", e);
                let transient = e.is_transient();
                let reason = e.chain();
                return batch
                    .iter()
                    .map(|_| {
                        Err(if transient {
                            Error::unavailable("embedded broker", reason.clone())
                        } else {
                            Error::rejected(reason.clone())
                        })
                    })
                    .collect();
            }
        };
        let mut results = Vec::with_capacity(batch.len());
        for m in batch {
            results.push(self.append(&mut tx, m).await);
        }
        if let Err(e) = tx.commit().await {
            let reason = db("committing a publish", e).chain();
            return batch
                .iter()
                .map(|_| Err(Error::unavailable("embedded broker", reason.clone())))
                .collect();
        }
        results
    }

    async fn subscribe(&self, subscription: &Subscription) -> Result<Box<dyn Subscriber>> {
        // Commands: every instance of the owning service shares the queue's single group.
        let group = match subscription.kind {
            Kind::Event => subscription.service.clone(),
            Kind::Command => {
                sqlx::query("INSERT INTO herald_queue_owner (queue, service) VALUES (?1, ?2) ON CONFLICT DO NOTHING")
                    .bind(&subscription.destination)
                    .bind(&subscription.service)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| db("registering the command queue's owner", e))?;
                format!("queue:{}", subscription.destination)
            }
        };
        let acked: i64 = sqlx::query_scalar(
            "SELECT COALESCE((SELECT acked FROM herald_group_offset WHERE grp = ?1 AND destination = ?2), 0)",
        )
        .bind(&group)
        .bind(&subscription.destination)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| db("reading the group's offset", e))?;
        Ok(Box::new(EmbeddedSubscriber {
            pool: self.pool.clone(),
            group,
            destination: subscription.destination.clone(),
            cursor: acked,
            acked,
            buffer: std::collections::VecDeque::new(),
            prefetch: subscription.prefetch.max(1),
            idle: Duration::from_millis(1),
        }))
    }

    async fn durability_warnings(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    fn describe(&self) -> String {
        format!("embedded {}", self.location)
    }
}

struct EmbeddedSubscriber {
    pool: SqlitePool,
    group: String,
    destination: String,
    /// Highest sequence handed out.
    cursor: i64,
    /// Highest sequence acknowledged (committed offset).
    acked: i64,
    buffer: std::collections::VecDeque<Delivery>,
    prefetch: u16,
    idle: Duration,
}

impl EmbeddedSubscriber {
    async fn fill(&mut self) -> Result<()> {
        let rows = sqlx::query(
            "SELECT seq, message_id, kind, message_type, source, destination, ordering_key, headers, content_type, \
             payload, created_at FROM herald_log WHERE destination = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )
        .bind(&self.destination)
        .bind(self.cursor)
        .bind(i64::from(self.prefetch))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db("reading the log", e))?;
        for r in rows {
            let seq: i64 = r.get("seq");
            self.cursor = seq;
            let raw = RawRow {
                seq,
                message_id: r.get("message_id"),
                kind: r.get("kind"),
                message_type: r.get("message_type"),
                source: r.get("source"),
                destination: r.get("destination"),
                ordering_key: r.get("ordering_key"),
                headers: r.get("headers"),
                content_type: r.get("content_type"),
                payload: r.get("payload"),
                created_at_micros: r.get("created_at"),
                attempts: 0,
            };
            let message = raw
                .decode()
                .map_err(|reason| Error::Decode { reason })?
                .message;
            self.buffer.push_back(Delivery {
                redelivered: false,
                tag: seq as u64,
                message,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Subscriber for EmbeddedSubscriber {
    async fn next(&mut self) -> Result<Delivery> {
        loop {
            if let Some(d) = self.buffer.pop_front() {
                self.idle = Duration::from_millis(1);
                return Ok(d);
            }
            self.fill().await?;
            if self.buffer.is_empty() {
                tokio::time::sleep(self.idle).await;
                self.idle = (self.idle * 2).min(Duration::from_millis(50));
            }
        }
    }

    async fn ack(&mut self, delivery: &Delivery) -> Result<()> {
        let seq = delivery.tag as i64;
        if seq <= self.acked {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO herald_group_offset (grp, destination, acked) VALUES (?1, ?2, ?3) \
             ON CONFLICT (grp, destination) DO UPDATE SET acked = MAX(acked, excluded.acked)",
        )
        .bind(&self.group)
        .bind(&self.destination)
        .bind(seq)
        .execute(&self.pool)
        .await
        .map_err(|e| db("committing the group's offset", e))?;
        self.acked = seq;
        Ok(())
    }

    async fn nack(&mut self, delivery: &Delivery) -> Result<()> {
        // Rewind so this delivery and everything after it come again, in order.
        self.cursor = (delivery.tag as i64 - 1).max(self.acked);
        self.buffer.clear();
        Ok(())
    }
}

/// Publication time of a log entry, for tools.
pub fn published_at(micros: i64) -> std::time::SystemTime {
    from_micros(micros)
}
