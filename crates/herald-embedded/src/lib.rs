//! herald's zero-server transport: a durable log and queue in a local SQLite file.
//!
//! Publishing appends to the log in one transaction per batch; the commit (with
//! `synchronous=FULL`) is the broker's confirmation. Events are read by every subscribing service
//! from its own offset (so a service can start late and still get every event). Commands go to a
//! queue that must have an owner: a service registers as owner by subscribing, and a command sent
//! to a queue nobody owns is rejected instead of silently dropped.
//!
//! Every consumer group (a service, or a command queue's owner) keeps a committed offset below
//! which everything is acknowledged, and a table of deliveries in flight above it. Instances of
//! one service compete: each delivery goes to one of them and becomes visible again if it is not
//! acknowledged within the visibility timeout (30 s by default). A message delivered more than
//! `max_deliveries` times (10 by default) without an acknowledgement is moved to the broker's
//! dead-letter table. A group can be rewound to replay the log from a sequence or a time.
//!
//! ```no_run
//! # async fn example() -> herald_core::Result<()> {
//! use herald_core::{Message, Subscription, Transport};
//! let broker = herald_embedded::EmbeddedTransport::open("sqlite://broker.db").await?;
//! let mut sub = broker.subscribe(&Subscription::events("orders", "email-service")).await?;
//! broker.publish(&[Message::raw_event("orders", "OrderPlaced", b"{}".to_vec())]).await;
//! let delivery = sub.next().await?;
//! sub.ack(delivery.tag()).await?;
//! # Ok(()) }
//! ```

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
pub use herald_core::ReplayFrom;
use herald_core::message::{from_micros, to_micros};
use herald_core::store::RawRow;
use herald_core::{
    Delivery, Error, Kind, Message, Received, Result, Subscriber, Subscription, Transport,
    Undecodable,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, SqliteConnection};

const SCHEMA: &str = include_str!("schema.sql");

/// A sqlx error of the broker's file, classified as herald-sqlite classifies it (one rule for
/// both: busy and locked databases, lost connections and pool timeouts are transient).
fn db(context: &str, e: sqlx::Error) -> Error {
    use herald_sqlite::Dialect;
    Error::Database {
        context: format!("embedded broker: {context}"),
        transient: herald_sqlite::SqliteDialect::is_transient(&e),
        source: Box::new(e),
    }
}

/// The embedded broker, stored in one SQLite file.
#[derive(Clone)]
pub struct EmbeddedTransport {
    pool: SqlitePool,
    /// Connections for consumers' bookkeeping (deliveries in flight, acknowledgements) with
    /// `synchronous=NORMAL`: losing the last of those in a power failure only means a redelivery,
    /// which the consumer's inbox absorbs, so they need not wait for an fsync each.
    consumer_pool: SqlitePool,
    location: String,
    visibility_timeout: Duration,
    max_deliveries: u32,
}

/// A consumer group's position, for `herald status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLag {
    /// The group: a service name, or `queue:<name>` for a command queue's owner.
    pub group: String,
    /// The topic or queue.
    pub destination: String,
    /// Messages after the group's committed offset.
    pub lag: u64,
    /// Messages the broker parked after too many unacknowledged deliveries.
    pub dead: u64,
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
            .connect_with(opts.clone())
            .await
            .map_err(|e| db("opening the broker file", e))?;
        let consumer_pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.synchronous(SqliteSynchronous::Normal))
            .await
            .map_err(|e| db("opening the broker file", e))?;
        for statement in SCHEMA.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
                .execute(&pool)
                .await
                .map_err(|e| db("creating the broker tables", e))?;
        }
        Ok(EmbeddedTransport {
            pool,
            consumer_pool,
            location,
            visibility_timeout: Duration::from_secs(30),
            max_deliveries: 10,
        })
    }

    /// How long a delivery stays invisible to other consumers of its group before it is delivered
    /// again if not acknowledged. Default 30 s.
    pub fn with_visibility_timeout(mut self, timeout: Duration) -> EmbeddedTransport {
        self.visibility_timeout = timeout;
        self
    }

    /// Deliveries without acknowledgement after which a message is parked. Default 10.
    pub fn with_max_deliveries(mut self, n: u32) -> EmbeddedTransport {
        self.max_deliveries = n.max(1);
        self
    }

    /// Rewinds `group` on `destination`: everything from `from` on is delivered again. Deliveries
    /// in flight are forgotten. The consumer's inbox keeps already-applied effects from being
    /// applied twice.
    pub async fn replay(&self, group: &str, destination: &str, from: ReplayFrom) -> Result<i64> {
        let first: i64 = match from {
            ReplayFrom::Seq(n) => (n as i64).max(1),
            ReplayFrom::Time(t) => sqlx::query_scalar(
                "SELECT COALESCE(MIN(seq), (SELECT COALESCE(MAX(seq), 0) + 1 FROM herald_log)) FROM herald_log \
                 WHERE destination = ?1 AND published_at >= ?2",
            )
            .bind(destination)
            .bind(to_micros(t))
            .fetch_one(&self.pool)
            .await
            .map_err(|e| db("finding the replay's start", e))?,
        };
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| db("starting a replay", e))?;
        sqlx::query("DELETE FROM herald_inflight WHERE grp = ?1 AND destination = ?2")
            .bind(group)
            .bind(destination)
            .execute(&mut *tx)
            .await
            .map_err(|e| db("rewinding a group", e))?;
        sqlx::query(
            "INSERT INTO herald_group_offset (grp, destination, acked, handed) VALUES (?1, ?2, ?3, ?3) \
             ON CONFLICT (grp, destination) DO UPDATE SET acked = ?3, handed = ?3",
        )
        .bind(group)
        .bind(destination)
        .bind(first - 1)
        .execute(&mut *tx)
        .await
        .map_err(|e| db("rewinding a group", e))?;
        tx.commit().await.map_err(|e| db("rewinding a group", e))?;
        Ok(first)
    }

    /// Every consumer group with its lag and parked messages.
    pub async fn groups(&self) -> Result<Vec<GroupLag>> {
        let rows = sqlx::query(
            "SELECT g.grp, g.destination, \
               (SELECT COUNT(*) FROM herald_log l WHERE l.destination = g.destination AND l.seq > g.acked) AS lag, \
               (SELECT COUNT(*) FROM herald_dead d WHERE d.grp = g.grp AND d.destination = g.destination) AS dead \
             FROM herald_group_offset g ORDER BY g.grp, g.destination",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db("reading consumer groups", e))?;
        Ok(rows
            .iter()
            .map(|r| GroupLag {
                group: r.get(0),
                destination: r.get(1),
                lag: r.get::<i64, _>(2) as u64,
                dead: r.get::<i64, _>(3) as u64,
            })
            .collect())
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

    async fn append(&self, conn: &mut SqliteConnection, m: &Message) -> Result<()> {
        self.validate(m)?;
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
        // A new group starts at the beginning of the log: a service that subscribes late still
        // gets every event that is kept.
        sqlx::query(
            "INSERT INTO herald_group_offset (grp, destination, acked, handed) VALUES (?1, ?2, 0, 0) ON CONFLICT DO NOTHING",
        )
        .bind(&group)
        .bind(&subscription.destination)
        .execute(&self.pool)
        .await
        .map_err(|e| db("creating the consumer group", e))?;
        let fetcher = Arc::new(Fetcher {
            pool: self.consumer_pool.clone(),
            group: group.clone(),
            destination: subscription.destination.clone(),
            batch: subscription.prefetch.clamp(1, 16),
            visibility: self.visibility_timeout,
            max_deliveries: self.max_deliveries,
        });
        Ok(Box::new(EmbeddedSubscriber {
            pool: self.consumer_pool.clone(),
            group,
            destination: subscription.destination.clone(),
            fetcher,
            buffer: std::collections::VecDeque::new(),
            pending: None,
            idle: Duration::from_millis(1),
        }))
    }

    async fn durability_warnings(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    async fn replay(&self, subscription: &Subscription, from: ReplayFrom) -> Result<()> {
        EmbeddedTransport::replay(
            self,
            &group_of(subscription),
            &subscription.destination,
            from,
        )
        .await
        .map(|_| ())
    }

    /// `SELECT 1` on the log's database.
    async fn check(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| db("checking the log", e))
    }

    async fn lag(&self, subscription: &Subscription) -> Result<Option<u64>> {
        let group = group_of(subscription);
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM herald_log WHERE destination = ?1 AND seq > \
             COALESCE((SELECT acked FROM herald_group_offset WHERE grp = ?2 AND destination = ?1), 0)",
        )
        .bind(&subscription.destination)
        .bind(group)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| db("reading a group's lag", e))?;
        Ok(Some(n as u64))
    }

    fn redelivery_delay(&self) -> Duration {
        self.visibility_timeout
    }

    fn describe(&self) -> String {
        format!("embedded {}", self.location)
    }
}

struct EmbeddedSubscriber {
    pool: SqlitePool,
    group: String,
    destination: String,
    fetcher: Arc<Fetcher>,
    buffer: std::collections::VecDeque<Received>,
    /// A fetch in progress. It runs as its own task so that dropping `next()` half-way (a
    /// `select!` choosing another branch) cannot lose deliveries that its transaction already
    /// handed out: the next call collects them.
    pending: Option<tokio::task::JoinHandle<Result<Vec<Received>>>>,
    idle: Duration,
}

struct Fetcher {
    pool: SqlitePool,
    group: String,
    destination: String,
    batch: u16,
    visibility: Duration,
    max_deliveries: u32,
}

impl Fetcher {
    /// Takes up to `batch` deliveries for this group: first those whose visibility timeout passed
    /// (redeliveries), then new ones from the log. One `BEGIN IMMEDIATE` transaction, so two
    /// competing subscribers never take the same delivery.
    async fn fill(&self) -> Result<Vec<Received>> {
        let mut out = Vec::new();
        let now = to_micros(std::time::SystemTime::now());
        let visible_at = now + self.visibility.as_micros() as i64;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| db("taking deliveries", e))?;
        let expired = sqlx::query(
            "SELECT seq, deliveries FROM herald_inflight WHERE grp = ?1 AND destination = ?2 AND acked = 0 \
             AND visible_at <= ?3 ORDER BY seq LIMIT ?4",
        )
        .bind(&self.group)
        .bind(&self.destination)
        .bind(now)
        .bind(i64::from(self.batch))
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| db("looking for expired deliveries", e))?;
        let mut taken: Vec<(i64, bool)> = Vec::new();
        for r in &expired {
            let (seq, deliveries): (i64, i64) = (r.get(0), r.get(1));
            if deliveries >= i64::from(self.max_deliveries) {
                // Delivered over and over and never acknowledged: its consumers crash on it.
                sqlx::query(
                    "INSERT OR IGNORE INTO herald_dead (grp, destination, seq, deliveries, reason, dead_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .bind(&self.group)
                .bind(&self.destination)
                .bind(seq)
                .bind(deliveries)
                .bind(format!("delivered {deliveries} times without an acknowledgement"))
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(|e| db("parking a message", e))?;
                sqlx::query("UPDATE herald_inflight SET acked = 1 WHERE grp = ?1 AND destination = ?2 AND seq = ?3")
                    .bind(&self.group)
                    .bind(&self.destination)
                    .bind(seq)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| db("parking a message", e))?;
                continue;
            }
            sqlx::query(
                "UPDATE herald_inflight SET visible_at = ?4, deliveries = deliveries + 1 \
                 WHERE grp = ?1 AND destination = ?2 AND seq = ?3",
            )
            .bind(&self.group)
            .bind(&self.destination)
            .bind(seq)
            .bind(visible_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| db("redelivering", e))?;
            taken.push((seq, true));
        }
        let room = i64::from(self.batch) - taken.len() as i64;
        if room > 0 {
            let fresh: Vec<i64> = sqlx::query_scalar(
                "SELECT seq FROM herald_log WHERE destination = ?1 AND seq > \
                 (SELECT handed FROM herald_group_offset WHERE grp = ?2 AND destination = ?1) ORDER BY seq LIMIT ?3",
            )
            .bind(&self.destination)
            .bind(&self.group)
            .bind(room)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| db("reading the log", e))?;
            for seq in &fresh {
                sqlx::query(
                    "INSERT INTO herald_inflight (grp, destination, seq, visible_at, deliveries) VALUES (?1, ?2, ?3, ?4, 1)",
                )
                .bind(&self.group)
                .bind(&self.destination)
                .bind(seq)
                .bind(visible_at)
                .execute(&mut *tx)
                .await
                .map_err(|e| db("recording a delivery", e))?;
                taken.push((*seq, false));
            }
            if let Some(last) = fresh.last() {
                sqlx::query("UPDATE herald_group_offset SET handed = ?3 WHERE grp = ?1 AND destination = ?2")
                    .bind(&self.group)
                    .bind(&self.destination)
                    .bind(last)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| db("recording a delivery", e))?;
            }
        }
        // Read the messages inside the same transaction, and only then commit: if this future is
        // dropped before the commit, nothing was handed out; after it, nothing awaits before the
        // deliveries are in the buffer.
        taken.sort_by_key(|(seq, _)| *seq);
        let seqs: Vec<i64> = taken.iter().map(|(seq, _)| *seq).collect();
        let rows = sqlx::query(
            "SELECT seq, message_id, kind, message_type, source, destination, ordering_key, headers, content_type, \
             payload, created_at FROM herald_log WHERE seq IN (SELECT value FROM json_each(?1)) ORDER BY seq",
        )
        .bind(serde_json::to_string(&seqs).expect("integers serialise"))
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| db("reading the log", e))?;
        tx.commit().await.map_err(|e| db("taking deliveries", e))?;
        for (r, (seq, redelivered)) in rows.iter().zip(taken) {
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
            let body = raw.payload.clone();
            out.push(match raw.decode() {
                Ok(row) => Received::Message(Delivery {
                    message: row.message,
                    redelivered,
                    tag: seq as u64,
                }),
                Err(reason) => Received::Undecodable(Undecodable {
                    tag: seq as u64,
                    reason,
                    body,
                }),
            });
        }
        Ok(out)
    }
}

#[async_trait]
impl Subscriber for EmbeddedSubscriber {
    async fn next(&mut self) -> Result<Received> {
        loop {
            if let Some(d) = self.buffer.pop_front() {
                self.idle = Duration::from_millis(1);
                return Ok(d);
            }
            if self.pending.is_none() {
                let fetcher = self.fetcher.clone();
                self.pending = Some(tokio::spawn(async move { fetcher.fill().await }));
            }
            let fetched = self.pending.as_mut().expect("a fetch is pending").await;
            self.pending = None;
            let fetched =
                fetched.map_err(|e| Error::unavailable("embedded broker", e.to_string()))??;
            self.buffer.extend(fetched);
            if self.buffer.is_empty() {
                tokio::time::sleep(self.idle).await;
                self.idle = (self.idle * 2).min(Duration::from_millis(50));
            }
        }
    }

    async fn ack(&mut self, tag: u64) -> Result<()> {
        // Mark the delivery done, then move the group's committed offset up over every
        // contiguous acknowledged delivery.
        let seq = tag as i64;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| db("acknowledging", e))?;
        sqlx::query(
            "UPDATE herald_inflight SET acked = 1 WHERE grp = ?1 AND destination = ?2 AND seq = ?3",
        )
        .bind(&self.group)
        .bind(&self.destination)
        .bind(seq)
        .execute(&mut *tx)
        .await
        .map_err(|e| db("acknowledging", e))?;
        sqlx::query(
            "UPDATE herald_group_offset SET acked = COALESCE( \
               (SELECT MIN(seq) - 1 FROM herald_inflight WHERE grp = ?1 AND destination = ?2 AND acked = 0), handed) \
             WHERE grp = ?1 AND destination = ?2",
        )
        .bind(&self.group)
        .bind(&self.destination)
        .execute(&mut *tx)
        .await
        .map_err(|e| db("committing the group's offset", e))?;
        sqlx::query(
            "DELETE FROM herald_inflight WHERE grp = ?1 AND destination = ?2 AND acked = 1 AND seq <= \
             (SELECT acked FROM herald_group_offset WHERE grp = ?1 AND destination = ?2)",
        )
        .bind(&self.group)
        .bind(&self.destination)
        .execute(&mut *tx)
        .await
        .map_err(|e| db("committing the group's offset", e))?;
        tx.commit().await.map_err(|e| db("acknowledging", e))
    }

    async fn nack(&mut self, tag: u64) -> Result<()> {
        // Visible again at once, to this subscriber or a competing one.
        sqlx::query("UPDATE herald_inflight SET visible_at = 0 WHERE grp = ?1 AND destination = ?2 AND seq = ?3")
            .bind(&self.group)
            .bind(&self.destination)
            .bind(tag as i64)
            .execute(&self.pool)
            .await
            .map_err(|e| db("giving a delivery back", e))?;
        Ok(())
    }
}

/// The consumer group of a subscription: the service for events, `queue:<name>` for commands
/// (every instance of the owner shares it).
fn group_of(s: &Subscription) -> String {
    match s.kind {
        Kind::Event => s.service.clone(),
        Kind::Command => format!("queue:{}", s.destination),
    }
}

/// Publication time of a log entry, for tools.
pub fn published_at(micros: i64) -> std::time::SystemTime {
    from_micros(micros)
}
