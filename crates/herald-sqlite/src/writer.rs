//! Writing messages into the SQLite outbox, inside the application's transaction.

use herald_core::{Error, Identifier, Kind, Message, Result};
use sqlx::{AssertSqlSafe, SqliteConnection};

/// Inserts messages into the outbox. Takes the caller's connection (usually `&mut *tx` of an open
/// transaction), never a pool: the message commits or rolls back with the business change.
#[derive(Debug, Clone)]
pub struct SqliteOutboxWriter {
    insert: String,
}

impl SqliteOutboxWriter {
    /// A writer for the outbox table `table`.
    pub fn new(table: &Identifier) -> SqliteOutboxWriter {
        SqliteOutboxWriter {
            insert: format!(
                "INSERT INTO \"{table}\" (message_id, kind, message_type, source, destination, ordering_key, headers, \
                 content_type, payload, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
            ),
        }
    }

    /// Adds `message` to the outbox in the caller's transaction. Returns the row's sequence number.
    /// Fails with [`herald_core::Error::Unpublishable`], writing nothing, if the message breaks a
    /// CloudEvents rule ([`Message::check_cloudevents`]).
    pub async fn enqueue(&self, conn: &mut SqliteConnection, message: &Message) -> Result<i64> {
        // Refuse here what the relay would dead-letter: the producer hears of it at once.
        message
            .check_cloudevents()
            .map_err(herald_core::Error::unpublishable)?;
        let headers = serde_json::to_string(&message.headers).expect("a string map serialises");
        let done = sqlx::query(AssertSqlSafe(self.insert.as_str()))
            .bind(message.id.to_string())
            .bind(message.kind.as_str())
            .bind(&message.message_type)
            .bind(&message.source)
            .bind(&message.destination)
            .bind(message.ordering_key.as_deref())
            .bind(headers)
            .bind(&message.content_type)
            .bind(&message.payload)
            .bind(message.created_at_micros())
            .execute(conn)
            .await
            .map_err(|e| crate::error::db("inserting into the outbox", e))?;
        Ok(done.last_insert_rowid())
    }

    /// Publishes an event (to whoever subscribes to its topic), in the caller's transaction.
    /// Refuses a command: send those to their owner with [`send`](Self::send).
    pub async fn publish(&self, conn: &mut SqliteConnection, event: &Message) -> Result<i64> {
        if event.kind != Kind::Event {
            return Err(Error::config(
                "publish takes an event; send a command with send()",
            ));
        }
        self.enqueue(conn, event).await
    }

    /// Sends a command to the queue of the one service that owns it, in the caller's transaction.
    /// The relay dead-letters it (after retries) if no owner has declared the queue.
    pub async fn send(&self, conn: &mut SqliteConnection, command: &Message) -> Result<i64> {
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
#[derive(Debug, Clone)]
pub struct SqlitePark {
    pool: sqlx::SqlitePool,
    writer: SqliteOutboxWriter,
}

impl SqlitePark {
    /// Parks into the outbox table `table` (created by [`migrate`](crate::migrate)).
    pub fn new(pool: sqlx::SqlitePool, table: &Identifier) -> SqlitePark {
        SqlitePark {
            pool,
            writer: SqliteOutboxWriter::new(table),
        }
    }
}

#[async_trait::async_trait]
impl herald_core::Park for SqlitePark {
    async fn park(&self, messages: &[Message]) -> Result<()> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| crate::error::db("parking messages", e))?;
        for m in messages {
            self.writer.enqueue(&mut tx, m).await?;
        }
        tx.commit()
            .await
            .map_err(|e| crate::error::db("committing parked messages", e))
    }
}
