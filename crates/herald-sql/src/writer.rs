//! Writing messages into the outbox, inside the application's transaction.

use std::marker::PhantomData;
use std::sync::Arc;

use herald_core::{Error, Identifier, Kind, Message, Result};
use sqlx::Pool;

use crate::Dialect;
use crate::db::{SqlDb, Stmt};
use crate::error::db;

type Conn<D> = <<D as Dialect>::DB as sqlx::Database>::Connection;

/// Inserts messages into the outbox. Takes the caller's connection (usually `&mut *tx` of an open
/// transaction), never a pool: the message commits or rolls back with the business change. It
/// runs one `INSERT` and nothing else: no DDL (which would commit the caller's transaction on
/// MySQL), no `NOTIFY`, no locks beyond the new row.
pub struct OutboxWriter<D> {
    insert: Arc<str>,
    dialect: PhantomData<fn() -> D>,
}

impl<D> Clone for OutboxWriter<D> {
    fn clone(&self) -> Self {
        OutboxWriter {
            insert: self.insert.clone(),
            dialect: PhantomData,
        }
    }
}

impl<D> std::fmt::Debug for OutboxWriter<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxWriter")
            .field("insert", &self.insert)
            .finish()
    }
}

impl<D: Dialect> OutboxWriter<D> {
    /// A writer for the outbox table `table`.
    pub fn new(table: &Identifier) -> OutboxWriter<D> {
        let sql = format!(
            "INSERT INTO {t} (message_id, kind, message_type, source, destination, ordering_key, headers, \
             content_type, payload, created_at) VALUES ({id}, ?, ?, ?, ?, ?, {headers}, ?, ?, {created}){returning}",
            t = D::quote(table),
            id = D::uuid_param("?"),
            headers = D::json_param("?"),
            created = D::time_from_micros("?"),
            returning = if D::RETURNING_ID { " RETURNING id" } else { "" },
        );
        OutboxWriter {
            insert: D::render(&sql).into(),
            dialect: PhantomData,
        }
    }

    /// Adds `message` to the outbox in the caller's transaction. Returns the row's sequence number.
    /// Fails with [`Error::Unpublishable`], writing nothing, if the message breaks a CloudEvents
    /// rule ([`Message::check_cloudevents`]).
    pub async fn enqueue(&self, conn: &mut Conn<D>, message: &Message) -> Result<i64> {
        // Refuse here what the relay would dead-letter: the producer hears of it at once.
        message.check_cloudevents().map_err(Error::unpublishable)?;
        // The caller's trace context, and the cause when a handler sends this (see
        // `herald_core::trace::stamp`, which copies only values the relay accepts).
        let stamped = herald_core::trace::stamp(message);
        let headers = serde_json::to_string(stamped.as_ref().unwrap_or(&message.headers))
            .map_err(|e| Error::unpublishable(format!("headers do not serialise as JSON: {e}")))?;
        let stmt = Stmt::<D::DB>::new(&self.insert)
            .text(&message.id.to_string())
            .text(message.kind.as_str())
            .text(&message.message_type)
            .text(&message.source)
            .text(&message.destination)
            .opt_text(message.ordering_key.as_deref())
            .text(&headers)
            .text(&message.content_type)
            .bytes(&message.payload)
            .int(message.created_at_micros());
        let what = "inserting into the outbox";
        if D::RETURNING_ID {
            let row = stmt
                .fetch_optional(conn)
                .await
                .map_err(|e| db::<D>(what, e))?
                .ok_or_else(|| Error::unavailable(what, "the insert returned no id"))?;
            <D::DB as SqlDb>::get_i64(&row, "id").map_err(|e| db::<D>(what, e))
        } else {
            let done = stmt.execute(conn).await.map_err(|e| db::<D>(what, e))?;
            D::last_insert_id(&done)
                .ok_or_else(|| Error::unavailable(what, "the database returned no id"))
        }
    }

    /// Publishes an event (to whoever subscribes to its topic), in the caller's transaction.
    /// Refuses a command: send those to their owner with [`send`](Self::send).
    pub async fn publish(&self, conn: &mut Conn<D>, event: &Message) -> Result<i64> {
        if event.kind != Kind::Event {
            return Err(Error::config(
                "publish takes an event; send a command with send()",
            ));
        }
        self.enqueue(conn, event).await
    }

    /// Sends a command to the queue of the one service that owns it, in the caller's transaction.
    /// The relay dead-letters it (after retries) if no owner has declared the queue.
    pub async fn send(&self, conn: &mut Conn<D>, command: &Message) -> Result<i64> {
        if command.kind != Kind::Command {
            return Err(Error::config(
                "send takes a command; publish an event with publish()",
            ));
        }
        self.enqueue(conn, command).await
    }
}

/// Fallback storage in an outbox table: parks messages the broker did not confirm, in a
/// transaction of its own, for a [`Relay`](herald_core::Relay) on that table to retry. See
/// [`herald_core::fallback`] for what fallback storage does not guarantee.
pub struct Park<D: Dialect> {
    pool: Pool<D::DB>,
    writer: OutboxWriter<D>,
}

impl<D: Dialect> Clone for Park<D> {
    fn clone(&self) -> Self {
        Park {
            pool: self.pool.clone(),
            writer: self.writer.clone(),
        }
    }
}

impl<D: Dialect> Park<D> {
    /// Parks into the outbox table `table` (created by `migrate`).
    pub fn new(pool: Pool<D::DB>, table: &Identifier) -> Park<D> {
        Park {
            pool,
            writer: OutboxWriter::new(table),
        }
    }
}

#[async_trait::async_trait]
impl<D: Dialect> herald_core::Park for Park<D> {
    async fn park(&self, messages: &[Message]) -> Result<()> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| db::<D>("parking messages", e))?;
        for m in messages {
            self.writer.enqueue(&mut tx, m).await?;
        }
        tx.commit()
            .await
            .map_err(|e| db::<D>("committing parked messages", e))
    }
}
