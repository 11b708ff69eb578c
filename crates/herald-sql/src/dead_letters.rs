//! The dead-letter tables, for an operator (`herald dlq`, `herald status`): list, show, replay
//! and purge, on the relay's side (`<table>_dead_letter`) and the consumers' side
//! (`<table>_consumer_dead_letter`). Written once; values are read whatever a producer managed
//! to store (any value may sit in a SQLite column), so a report never fails on one odd row.

use std::marker::PhantomData;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use herald_core::message::to_micros;
use herald_core::{Error, Identifier, Result};
use sqlx::{Connection, Pool};

use crate::Dialect;
use crate::db::{SqlDb, Stmt};
use crate::error::db;

/// Which dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The relay's (`<table>_dead_letter`): refused by the broker, unpublishable, undecodable.
    Relay,
    /// The consumers' (`<table>_consumer_dead_letter`): a handler kept failing, or undecodable.
    Consumer,
}

/// Which dead letters an operation applies to; conditions combine with AND.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this id.
    pub id: Option<i64>,
    /// Only this destination (topic or queue).
    pub destination: Option<String>,
    /// Only this message type.
    pub message_type: Option<String>,
    /// Only this consumer (consumer side only).
    pub consumer: Option<String>,
    /// Only dead letters parked more than this long ago.
    pub older_than: Option<Duration>,
    /// Only dead letters parked less than this long ago.
    pub newer_than: Option<Duration>,
    /// At most this many (list); `None` for all.
    pub limit: Option<u64>,
}

/// One dead letter, as a list shows it.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Its side.
    pub side: Side,
    /// Its id in its table.
    pub id: i64,
    /// The consumer (service) that parked it; empty on the relay's side.
    pub consumer: String,
    /// Topic or queue.
    pub destination: String,
    /// Message type.
    pub message_type: String,
    /// Ordering key, empty if none.
    pub key: String,
    /// Attempts made.
    pub attempts: i64,
    /// When it was parked, microseconds since the epoch (0 if unreadable).
    pub parked_at_micros: i64,
    /// Why.
    pub reason: String,
}

/// One dead letter in full.
#[derive(Debug, Clone)]
pub struct Detail {
    /// What a list shows.
    pub summary: Summary,
    /// The message id (empty for an undecodable delivery).
    pub message_id: String,
    /// `event` or `command`.
    pub kind: String,
    /// CloudEvents source.
    pub source: String,
    /// Headers as stored (JSON).
    pub headers: String,
    /// Content type.
    pub content_type: String,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Dead-letter administration over any database, for the CLI's `Box<dyn DeadLetterAdmin>`.
#[async_trait]
pub trait DeadLetterAdmin: Send + Sync {
    /// Dead letters of `side` matching `filter`, in id order.
    async fn list(&self, side: Side, filter: &Filter) -> Result<Vec<Summary>>;
    /// Dead letter `id` of `side`, if it exists.
    async fn show(&self, side: Side, id: i64) -> Result<Option<Detail>>;
    /// Replays dead letter `id`: a relay-side one goes back into the outbox (in one transaction
    /// with its removal), a consumer-side one is marked for its consumer to apply again.
    /// Returns `false` if it cannot be replayed (gone, or an undecodable delivery).
    async fn replay(&self, side: Side, id: i64) -> Result<bool>;
    /// Deletes the dead letters of `side` matching `filter`; returns how many.
    async fn purge(&self, side: Side, filter: &Filter) -> Result<u64>;
    /// How many dead letters `side` holds.
    async fn count(&self, side: Side) -> Result<u64>;
}

/// [`DeadLetterAdmin`] for the tables beside outbox `table`.
pub struct DeadLetters<D: Dialect> {
    pool: Pool<D::DB>,
    outbox: String,
    relay: String,
    consumer: String,
    dialect: PhantomData<fn() -> D>,
}

impl<D: Dialect> DeadLetters<D> {
    /// The dead letters beside outbox `table`.
    pub fn new(pool: Pool<D::DB>, table: &Identifier) -> Result<DeadLetters<D>> {
        Ok(DeadLetters {
            outbox: D::quote(table),
            relay: D::quote(&table.with_suffix("_dead_letter")?),
            consumer: D::quote(&table.with_suffix("_consumer_dead_letter")?),
            pool,
            dialect: PhantomData,
        })
    }

    fn table(&self, side: Side) -> &str {
        match side {
            Side::Relay => &self.relay,
            Side::Consumer => &self.consumer,
        }
    }

    /// ` WHERE ...` for `f` on `side`, and its values in bind order.
    fn condition(&self, side: Side, f: &Filter) -> Result<(String, Vec<Value>)> {
        let mut conds: Vec<String> = Vec::new();
        let mut vals = Vec::new();
        if let Some(id) = f.id {
            conds.push("id = ?".into());
            vals.push(Value::Int(id));
        }
        for (col, v) in [
            ("destination", &f.destination),
            ("message_type", &f.message_type),
        ] {
            if let Some(v) = v {
                conds.push(format!("{col} = ?"));
                vals.push(Value::Text(v.clone()));
            }
        }
        if let Some(c) = &f.consumer {
            if side == Side::Relay {
                return Err(Error::config(
                    "a consumer filter only applies to the consumer side",
                ));
            }
            conds.push("consumer = ?".into());
            vals.push(Value::Text(c.clone()));
        }
        let now = to_micros(SystemTime::now());
        // Clamped to 1000-01-01, the earliest time every database stores (PostgreSQL refuses
        // times before 4713 BC, MySQL turns times before the year 1000 into NULL); nothing is
        // dead-lettered before it, so the filter means the same.
        let before = |d: &Duration| {
            now.saturating_sub(i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
                .max(-30_610_224_000_000_000)
        };
        if let Some(d) = &f.older_than {
            conds.push(format!("dead_lettered_at < {}", D::time_from_micros("?")));
            vals.push(Value::Int(before(d)));
        }
        if let Some(d) = &f.newer_than {
            conds.push(format!("dead_lettered_at >= {}", D::time_from_micros("?")));
            vals.push(Value::Int(before(d)));
        }
        let clause = if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        };
        Ok((clause, vals))
    }

    async fn conn(&self, what: &str) -> Result<sqlx::pool::PoolConnection<D::DB>> {
        self.pool.acquire().await.map_err(|e| db::<D>(what, e))
    }
}

enum Value {
    Text(String),
    Int(i64),
}

fn bind<DB: SqlDb>(mut stmt: Stmt<DB>, vals: &[Value]) -> Stmt<DB> {
    for v in vals {
        stmt = match v {
            Value::Text(s) => stmt.text(s),
            Value::Int(i) => stmt.int(*i),
        };
    }
    stmt
}

/// A column read as text whatever it holds; bytes that are not UTF-8 are shown lossily and
/// flagged.
fn text<DB: SqlDb>(row: &DB::Row, col: &str) -> String {
    if let Ok(Some(s)) = DB::get_opt_text(row, col) {
        return s;
    }
    match DB::get_raw_bytes(row, col) {
        Some(b) => match String::from_utf8(b) {
            Ok(s) => s,
            Err(e) => format!(
                "{} [not UTF-8: {} bytes, shown lossily]",
                String::from_utf8_lossy(e.as_bytes()),
                e.as_bytes().len()
            ),
        },
        None => String::new(),
    }
}

#[async_trait]
impl<D: Dialect> DeadLetterAdmin for DeadLetters<D> {
    async fn list(&self, side: Side, filter: &Filter) -> Result<Vec<Summary>> {
        let what = "listing dead letters";
        let (clause, vals) = self.condition(side, filter)?;
        let consumer = if side == Side::Relay {
            "''"
        } else {
            "consumer"
        };
        let limit = filter.limit.map_or(String::new(), |n| {
            format!(" LIMIT {}", n.clamp(1, i64::MAX as u64))
        });
        let sql = D::render(&format!(
            "SELECT id, {consumer} AS consumer, destination, message_type, COALESCE(ordering_key, '') AS k, \
             {attempts} AS attempts, {at} AS parked_at, reason FROM {table}{clause} ORDER BY id{limit}",
            attempts = D::cast_int("attempts"),
            at = D::select_micros("dead_lettered_at"),
            table = self.table(side),
        ));
        let mut conn = self.conn(what).await?;
        let rows = bind(Stmt::<D::DB>::new(&sql), &vals)
            .fetch_all(&mut conn)
            .await
            .map_err(|e| db::<D>(what, e))?;
        Ok(rows.iter().map(|r| summary::<D>(side, r)).collect())
    }

    async fn show(&self, side: Side, id: i64) -> Result<Option<Detail>> {
        let what = "reading a dead letter";
        let consumer = if side == Side::Relay {
            "''"
        } else {
            "consumer"
        };
        let sql = D::render(&format!(
            "SELECT id, {consumer} AS consumer, COALESCE({message_id}, '') AS message_id, kind, message_type, \
             source, destination, COALESCE(ordering_key, '') AS k, {headers} AS headers, content_type, \
             payload, {attempts} AS attempts, reason, {at} AS parked_at FROM {table} WHERE id = ?",
            message_id = D::select_text("message_id"),
            headers = D::select_text("headers"),
            attempts = D::cast_int("attempts"),
            at = D::select_micros("dead_lettered_at"),
            table = self.table(side),
        ));
        let mut conn = self.conn(what).await?;
        let row = Stmt::<D::DB>::new(&sql)
            .int(id)
            .fetch_optional(&mut conn)
            .await
            .map_err(|e| db::<D>(what, e))?;
        Ok(row.map(|r| Detail {
            summary: summary::<D>(side, &r),
            message_id: text::<D::DB>(&r, "message_id"),
            kind: text::<D::DB>(&r, "kind"),
            source: text::<D::DB>(&r, "source"),
            headers: text::<D::DB>(&r, "headers"),
            content_type: text::<D::DB>(&r, "content_type"),
            payload: <D::DB as SqlDb>::get_raw_bytes(&r, "payload").unwrap_or_default(),
        }))
    }

    async fn replay(&self, side: Side, id: i64) -> Result<bool> {
        let what = "replaying a dead letter";
        let mut conn = self.conn(what).await?;
        match side {
            Side::Relay => {
                // One transaction per dead letter: a replay interrupted half-way leaves each row
                // either still parked or back in the outbox, never lost.
                let insert = D::render(&format!(
                    "INSERT INTO {outbox} (message_id, kind, message_type, source, destination, ordering_key, \
                     headers, content_type, payload, created_at) SELECT message_id, kind, message_type, source, \
                     destination, ordering_key, headers, content_type, payload, created_at FROM {dead} WHERE id = ?",
                    outbox = self.outbox,
                    dead = self.relay,
                ));
                let delete = D::render(&format!("DELETE FROM {} WHERE id = ?", self.relay));
                let mut tx = conn.begin().await.map_err(|e| db::<D>(what, e))?;
                let copied = Stmt::<D::DB>::new(&insert)
                    .int(id)
                    .execute(&mut tx)
                    .await
                    .map_err(|e| db::<D>(what, e))?;
                Stmt::<D::DB>::new(&delete)
                    .int(id)
                    .execute(&mut tx)
                    .await
                    .map_err(|e| db::<D>(what, e))?;
                tx.commit().await.map_err(|e| db::<D>(what, e))?;
                Ok(D::rows_affected(&copied) == 1)
            }
            Side::Consumer => {
                let mark = D::render(&format!(
                    "UPDATE {} SET replay_requested = {} WHERE id = ? AND message_id IS NOT NULL",
                    self.consumer,
                    D::true_literal()
                ));
                let done = Stmt::<D::DB>::new(&mark)
                    .int(id)
                    .execute(&mut conn)
                    .await
                    .map_err(|e| db::<D>(what, e))?;
                Ok(D::rows_affected(&done) == 1)
            }
        }
    }

    async fn purge(&self, side: Side, filter: &Filter) -> Result<u64> {
        let what = "purging dead letters";
        let (clause, vals) = self.condition(side, filter)?;
        let sql = D::render(&format!("DELETE FROM {}{clause}", self.table(side)));
        let mut conn = self.conn(what).await?;
        let done = bind(Stmt::<D::DB>::new(&sql), &vals)
            .execute(&mut conn)
            .await
            .map_err(|e| db::<D>(what, e))?;
        Ok(D::rows_affected(&done))
    }

    async fn count(&self, side: Side) -> Result<u64> {
        let what = "counting dead letters";
        let sql = format!("SELECT COUNT(*) AS n FROM {}", self.table(side));
        let mut conn = self.conn(what).await?;
        let row = Stmt::<D::DB>::new(&sql)
            .fetch_optional(&mut conn)
            .await
            .map_err(|e| db::<D>(what, e))?;
        Ok(row
            .and_then(|r| <D::DB as SqlDb>::get_i64(&r, "n").ok())
            .map_or(0, |n| n.max(0) as u64))
    }
}

fn summary<D: Dialect>(side: Side, r: &<D::DB as sqlx::Database>::Row) -> Summary {
    Summary {
        side,
        id: <D::DB as SqlDb>::get_i64(r, "id").unwrap_or_default(),
        consumer: text::<D::DB>(r, "consumer"),
        destination: text::<D::DB>(r, "destination"),
        message_type: text::<D::DB>(r, "message_type"),
        key: text::<D::DB>(r, "k"),
        attempts: <D::DB as SqlDb>::get_opt_i64(r, "attempts")
            .ok()
            .flatten()
            .unwrap_or_default(),
        parked_at_micros: D::read_micros(r, "parked_at")
            .ok()
            .flatten()
            .unwrap_or_default(),
        reason: text::<D::DB>(r, "reason"),
    }
}
