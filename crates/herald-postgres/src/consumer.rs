//! The consumer's database side on PostgreSQL: inbox, handler transaction, dead letters.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::consumer::{Applied, Apply, Replay};
use herald_core::store::RawRow;
use herald_core::{BoxError, Error, Identifier, Message, Result};
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};

use crate::error::db;

/// A consumer's handler: runs inside the inbox transaction, so its writes (including outbox
/// messages it sends next) commit together with the inbox record, or not at all.
#[async_trait]
pub trait PgHandler: Send + Sync + 'static {
    /// Applies `message`. Return an error to roll back; the consumer retries, then dead-letters.
    async fn handle(
        &self,
        tx: &mut PgConnection,
        message: &Message,
    ) -> std::result::Result<(), BoxError>;
}

/// [`Apply`] for PostgreSQL, wrapping a [`PgHandler`].
pub struct PgApplier<H> {
    pool: PgPool,
    handler: H,
    version_header: Option<String>,
    sql: Arc<Sql>,
}

struct Sql {
    inbox: String,
    version: String,
    dead_letter: String,
    dead_letter_raw: String,
    replays: String,
    replay_failed: String,
    delete_dead: String,
    purge: String,
}

impl<H: PgHandler> PgApplier<H> {
    /// A consumer database side using the tables `herald migrate` created beside outbox `table`.
    pub fn new(pool: PgPool, table: &Identifier, handler: H) -> Result<PgApplier<H>> {
        let inbox = table.with_suffix("_inbox")?;
        let version = table.with_suffix("_inbox_version")?;
        let dead = table.with_suffix("_consumer_dead_letter")?;
        let cols = "consumer, message_id, kind, message_type, source, destination, ordering_key, headers, content_type, \
                    payload, created_at, attempts, reason";
        let sql = Sql {
            inbox: format!(
                "INSERT INTO \"{inbox}\" (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
            ),
            version: format!(
                "INSERT INTO \"{version}\" AS v (consumer, ordering_key, version) VALUES ($1, $2, $3) \
                 ON CONFLICT (consumer, ordering_key) DO UPDATE SET version = excluded.version \
                 WHERE v.version < excluded.version RETURNING version"
            ),
            dead_letter: format!(
                "INSERT INTO \"{dead}\" ({cols}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, \
                 'epoch'::timestamptz + $11 * interval '1 microsecond', $12, $13)"
            ),
            dead_letter_raw: format!(
                "INSERT INTO \"{dead}\" (consumer, destination, payload, attempts, reason) VALUES ($1, $2, $3, 1, $4)"
            ),
            replays: format!(
                "SELECT id, message_id::text AS message_id, kind, message_type, source, destination, ordering_key, \
                 headers::text AS headers, content_type, payload, \
                 (extract(epoch FROM created_at) * 1000000)::bigint AS created_at, attempts \
                 FROM \"{dead}\" WHERE consumer = $1 AND replay_requested AND message_id IS NOT NULL ORDER BY id LIMIT $2"
            ),
            replay_failed: format!(
                "UPDATE \"{dead}\" SET replay_requested = false, attempts = attempts + 1, \
                 reason = reason || ' | replay failed: ' || $2 WHERE id = $1"
            ),
            delete_dead: format!("DELETE FROM \"{dead}\" WHERE id = $1"),
            purge: format!(
                "DELETE FROM \"{inbox}\" WHERE ctid IN (SELECT ctid FROM \"{inbox}\" \
                 WHERE processed_at < now() - $1 * interval '1 microsecond' LIMIT $2)"
            ),
        };
        Ok(PgApplier {
            pool,
            handler,
            version_header: None,
            sql: Arc::new(sql),
        })
    }

    /// Skips messages whose `header` (an integer version) is not newer than the last version
    /// applied for their ordering key. Messages without the header or a key are always applied.
    pub fn skip_stale_versions(mut self, header: impl Into<String>) -> PgApplier<H> {
        self.version_header = Some(header.into());
        self
    }

    async fn delete_dead(&self, conn: &mut PgConnection, replay_of: Option<i64>) -> Result<()> {
        if let Some(id) = replay_of {
            sqlx::query(AssertSqlSafe(self.sql.delete_dead.as_str()))
                .bind(id)
                .execute(conn)
                .await
                .map_err(|e| db("removing a replayed dead letter", e))?;
        }
        Ok(())
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
impl<H: PgHandler> Apply for PgApplier<H> {
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
        let fresh = sqlx::query(AssertSqlSafe(self.sql.inbox.as_str()))
            .bind(consumer)
            .bind(message.id)
            .execute(&mut *tx)
            .await
            .map_err(|e| db("recording a message in the inbox", e))?
            .rows_affected()
            == 1;
        let outcome = if !fresh {
            Applied::Duplicate
        } else if let Some(version) = self.version_of(message)? {
            let key = message.ordering_key.as_deref().unwrap_or_default();
            let newer: Option<i64> = sqlx::query_scalar(AssertSqlSafe(self.sql.version.as_str()))
                .bind(consumer)
                .bind(key)
                .bind(version)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| db("checking the message's version", e))?;
            if newer.is_some() {
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
        self.delete_dead(&mut tx, replay_of).await?;
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
            .bind(m.id)
            .bind(m.kind.as_str())
            .bind(&m.message_type)
            .bind(&m.source)
            .bind(&m.destination)
            .bind(m.ordering_key.as_deref())
            .bind(serde_json::to_string(&m.headers).expect("a string map serialises"))
            .bind(&m.content_type)
            .bind(&m.payload)
            .bind(m.created_at_micros() as f64)
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
                message_id: r.get("message_id"),
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
            .bind(id)
            .bind(reason)
            .execute(&self.pool)
            .await
            .map_err(|e| db("recording a failed replay", e))?;
        Ok(())
    }

    async fn purge_inbox(&self, retention: Duration, batch: usize) -> Result<u64> {
        let done = sqlx::query(AssertSqlSafe(self.sql.purge.as_str()))
            .bind(retention.as_micros() as f64)
            .bind(batch as i64)
            .execute(&self.pool)
            .await
            .map_err(|e| db("purging the inbox", e))?;
        Ok(done.rows_affected())
    }
}

impl<H> PgApplier<H> {
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
