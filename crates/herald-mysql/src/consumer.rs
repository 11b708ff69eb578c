//! The consumer's database side on MySQL: inbox, handler transaction, dead letters.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::consumer::{Applied, Apply, Replay};
use herald_core::store::RawRow;
use herald_core::{BoxError, Error, Identifier, Message, Result};
use sqlx::{AssertSqlSafe, MySqlConnection, MySqlPool, Row};

use crate::error::db;

/// A consumer's handler: runs inside the inbox transaction, so its writes (including outbox
/// messages it sends next) commit together with the inbox record, or not at all.
#[async_trait]
pub trait MySqlHandler: Send + Sync + 'static {
    /// Applies `message`. Return an error to roll back; the consumer retries, then dead-letters.
    async fn handle(
        &self,
        tx: &mut MySqlConnection,
        message: &Message,
    ) -> std::result::Result<(), BoxError>;
}

/// [`Apply`] for MySQL and MariaDB, wrapping a [`MySqlHandler`].
pub struct MySqlApplier<H> {
    pool: MySqlPool,
    handler: H,
    version_header: Option<String>,
    sql: Arc<Sql>,
}

struct Sql {
    inbox: String,
    version_read: String,
    version_write: String,
    dead_letter: String,
    dead_letter_raw: String,
    replays: String,
    replay_failed: String,
    delete_dead: String,
    purge: String,
}

impl<H: MySqlHandler> MySqlApplier<H> {
    /// A consumer database side using the tables `herald migrate` created beside outbox `table`.
    pub fn new(pool: MySqlPool, table: &Identifier, handler: H) -> Result<MySqlApplier<H>> {
        let inbox = table.with_suffix("_inbox")?;
        let version = table.with_suffix("_inbox_version")?;
        let dead = table.with_suffix("_consumer_dead_letter")?;
        let cols = "consumer, message_id, kind, message_type, source, destination, ordering_key, headers, content_type, \
                    payload, created_at, attempts, reason";
        let sql = Sql {
            inbox: crate::inbox::inbox_insert(&inbox),
            version_read: format!(
                "SELECT version FROM `{version}` WHERE consumer = ? AND ordering_key = ? FOR UPDATE"
            ),
            version_write: format!(
                "INSERT INTO `{version}` (consumer, ordering_key, version) VALUES (?, ?, ?) \
                 ON DUPLICATE KEY UPDATE version = GREATEST(version, VALUES(version))"
            ),
            dead_letter: format!(
                "INSERT INTO `{dead}` ({cols}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, \
                 TIMESTAMPADD(MICROSECOND, ?, '1970-01-01 00:00:00'), ?, ?)"
            ),
            dead_letter_raw: format!(
                "INSERT INTO `{dead}` (consumer, destination, payload, attempts, reason) VALUES (?, ?, ?, 1, ?)"
            ),
            replays: format!(
                "SELECT id, message_id, kind, message_type, source, destination, ordering_key, headers, content_type, \
                 payload, TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', created_at) AS created_at, attempts \
                 FROM `{dead}` WHERE consumer = ? AND replay_requested AND message_id IS NOT NULL ORDER BY id LIMIT ?"
            ),
            replay_failed: format!(
                "UPDATE `{dead}` SET replay_requested = FALSE, attempts = attempts + 1, \
                 reason = CONCAT(reason, ' | replay failed: ', ?) WHERE id = ?"
            ),
            delete_dead: format!("DELETE FROM `{dead}` WHERE id = ?"),
            purge: format!(
                "DELETE FROM `{inbox}` WHERE processed_at < TIMESTAMPADD(MICROSECOND, -?, UTC_TIMESTAMP(6)) LIMIT ?"
            ),
        };
        Ok(MySqlApplier {
            pool,
            handler,
            version_header: None,
            sql: Arc::new(sql),
        })
    }

    /// Skips messages whose `header` (an integer version) is not newer than the last version
    /// applied for their ordering key. Messages without the header or a key are always applied.
    pub fn skip_stale_versions(mut self, header: impl Into<String>) -> MySqlApplier<H> {
        self.version_header = Some(header.into());
        self
    }

    async fn newer_version(
        &self,
        conn: &mut MySqlConnection,
        consumer: &str,
        key: &str,
        version: i64,
    ) -> Result<bool> {
        let last: Option<i64> = sqlx::query_scalar(AssertSqlSafe(self.sql.version_read.as_str()))
            .bind(consumer)
            .bind(key)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| db("checking the message's version", e))?;
        if last.is_some_and(|last| last >= version) {
            return Ok(false);
        }
        sqlx::query(AssertSqlSafe(self.sql.version_write.as_str()))
            .bind(consumer)
            .bind(key)
            .bind(version)
            .execute(&mut *conn)
            .await
            .map_err(|e| db("recording the message's version", e))?;
        Ok(true)
    }
}

/// A handler error caused by a lost database connection is an outage, not poison.
fn handler_error(e: BoxError) -> Error {
    match e.downcast::<sqlx::Error>() {
        Ok(sqlx_err) => db("running the handler", *sqlx_err),
        Err(other) => Error::Handler { source: other },
    }
}

#[async_trait]
impl<H: MySqlHandler> Apply for MySqlApplier<H> {
    async fn apply(
        &self,
        consumer: &str,
        message: &Message,
        replay_of: Option<i64>,
    ) -> Result<Applied> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| db("starting the inbox transaction", e))?;
        let fresh = crate::inbox::record(&mut tx, &self.sql.inbox, consumer, message.id).await?;
        let outcome = if !fresh {
            Applied::Duplicate
        } else if let Some(version) = self.version_of(message)? {
            let key = message.ordering_key.as_deref().unwrap_or_default();
            if self.newer_version(&mut tx, consumer, key, version).await? {
                Applied::Done
            } else {
                Applied::Stale
            }
        } else {
            Applied::Done
        };
        if outcome == Applied::Done
            && let Err(e) = self.handler.handle(&mut tx, message).await
        {
            let _ = tx.rollback().await;
            return Err(handler_error(e));
        }
        if outcome == Applied::Duplicate && replay_of.is_none() {
            let _ = tx.rollback().await;
            return Ok(outcome);
        }
        if let Some(id) = replay_of {
            sqlx::query(AssertSqlSafe(self.sql.delete_dead.as_str()))
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(|e| db("removing a replayed dead letter", e))?;
        }
        tx.commit()
            .await
            .map_err(|e| db("committing the inbox transaction", e))?;
        Ok(outcome)
    }

    async fn dead_letter(
        &self,
        consumer: &str,
        m: &Message,
        reason: &str,
        attempts: u32,
    ) -> Result<()> {
        sqlx::query(AssertSqlSafe(self.sql.dead_letter.as_str()))
            .bind(consumer)
            .bind(m.id.to_string())
            .bind(m.kind.as_str())
            .bind(&m.message_type)
            .bind(&m.source)
            .bind(&m.destination)
            .bind(m.ordering_key.as_deref())
            .bind(serde_json::to_string(&m.headers).expect("a string map serialises"))
            .bind(&m.content_type)
            .bind(&m.payload)
            .bind(m.created_at_micros())
            .bind(attempts as i32)
            .bind(reason)
            .execute(&self.pool)
            .await
            .map_err(|e| db("dead-lettering a message", e))?;
        Ok(())
    }

    async fn dead_letter_undecodable(
        &self,
        consumer: &str,
        destination: &str,
        body: &[u8],
        reason: &str,
    ) -> Result<()> {
        sqlx::query(AssertSqlSafe(self.sql.dead_letter_raw.as_str()))
            .bind(consumer)
            .bind(destination)
            .bind(body)
            .bind(format!("cannot decode: {reason}"))
            .execute(&self.pool)
            .await
            .map_err(|e| db("dead-lettering an undecodable delivery", e))?;
        Ok(())
    }

    async fn replays(&self, consumer: &str, max: usize) -> Result<Vec<Replay>> {
        let rows = sqlx::query(AssertSqlSafe(self.sql.replays.as_str()))
            .bind(consumer)
            .bind(max as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db("reading dead letters to replay", e))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: i64 = r.get("id");
            let raw = RawRow {
                seq: id,
                message_id: r.get::<Option<String>, _>("message_id").unwrap_or_default(),
                kind: r.get("kind"),
                message_type: r.get("message_type"),
                source: r.get("source"),
                destination: r.get("destination"),
                ordering_key: r.get("ordering_key"),
                headers: r.get("headers"),
                content_type: r.get("content_type"),
                payload: r.get("payload"),
                created_at_micros: r.get::<Option<i64>, _>("created_at").unwrap_or_default(),
                attempts: r.get("attempts"),
            };
            match raw.decode() {
                Ok(row) => out.push(Replay {
                    id,
                    message: row.message,
                }),
                Err(reason) => self.replay_failed(id, &reason).await?,
            }
        }
        Ok(out)
    }

    async fn replay_failed(&self, id: i64, reason: &str) -> Result<()> {
        sqlx::query(AssertSqlSafe(self.sql.replay_failed.as_str()))
            .bind(reason)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| db("recording a failed replay", e))?;
        Ok(())
    }

    async fn purge_inbox(&self, retention: Duration, batch: usize) -> Result<u64> {
        let done = sqlx::query(AssertSqlSafe(self.sql.purge.as_str()))
            .bind(retention.as_micros() as i64)
            .bind(batch as i64)
            .execute(&self.pool)
            .await
            .map_err(|e| db("purging the inbox", e))?;
        Ok(done.rows_affected())
    }
}

impl<H> MySqlApplier<H> {
    fn version_of(&self, m: &Message) -> Result<Option<i64>> {
        let (Some(header), Some(_)) = (&self.version_header, &m.ordering_key) else {
            return Ok(None);
        };
        match m.header(header) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<i64>()
                .map(Some)
                .map_err(|e| Error::Decode {
                    reason: format!("header {header:?} = {v:?} is not an integer version: {e}"),
                }),
        }
    }
}
