//! The consumer's database side: the inbox, the handler's transaction, the consumers' dead
//! letters and their replay. The apply-once algorithm, written once for every database.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::consumer::{Applied, Apply, Replay};
use herald_core::store::RawRow;
use herald_core::{BoxError, Error, Identifier, Message, Result};
use sqlx::Pool;

use crate::Dialect;
use crate::db::{SqlDb, Stmt};
use crate::dialect::VersionCheck;
use crate::error::{db, handler_error};
use crate::inbox::Inbox;

/// A consumer's handler: runs inside the inbox transaction, so its writes (including outbox
/// messages it sends next) commit together with the inbox record, or not at all.
#[async_trait]
pub trait Handler<DB: sqlx::Database>: Send + Sync + 'static {
    /// Applies `message`. Return an error to roll back; the consumer retries, then dead-letters.
    /// A database error anywhere in the error's `source()` chain counts as a database error
    /// (an outage is waited out, not parked): return the sqlx error with `?`, or wrapped in an
    /// error whose `source()` it is (`anyhow`'s `.context(..)` is one). A bare `anyhow::Error`
    /// turned into a `BoxError` hides the error it holds, so it counts as the handler's own.
    async fn handle(
        &self,
        tx: &mut DB::Connection,
        message: &Message,
    ) -> std::result::Result<(), BoxError>;

    /// Called once when the handler is installed in an [`Applier`] for outbox `table`: a handler
    /// that sends messages (a [`Router`](crate::Router)) writes them into that outbox, beside
    /// the inbox, in the same transaction. Nothing to do for most handlers.
    fn bind_outbox(&mut self, table: &Identifier) -> Result<()> {
        let _ = table;
        Ok(())
    }
}

/// [`Apply`] over a database, wrapping a [`Handler`].
pub struct Applier<D: Dialect, H> {
    pool: Pool<D::DB>,
    handler: H,
    version_header: Option<String>,
    inbox: Inbox<D>,
    sql: Arc<Sql>,
    dialect: PhantomData<fn() -> D>,
}

struct Sql {
    version: VersionCheck,
    dead_letter: String,
    dead_letter_raw: String,
    replays: String,
    replay_failed: String,
    delete_dead: String,
    purge: String,
}

impl<D: Dialect, H: Handler<D::DB>> Applier<D, H> {
    /// A consumer database side using the tables `migrate` created beside outbox `table`.
    pub fn new(pool: Pool<D::DB>, table: &Identifier, mut handler: H) -> Result<Applier<D, H>> {
        handler.bind_outbox(table)?;
        let q = |suffix: &str| table.with_suffix(suffix).map(|t| D::quote(&t));
        let inbox = q("_inbox")?;
        let versions = q("_inbox_version")?;
        let dead = q("_consumer_dead_letter")?;
        let r = |sql: String| D::render(&sql);
        let version = match D::version_check(&versions) {
            VersionCheck::Upsert(s) => VersionCheck::Upsert(r(s)),
            VersionCheck::ReadThenWrite { read, write } => VersionCheck::ReadThenWrite {
                read: r(read),
                write: r(write),
            },
        };
        let sql = Sql {
            version,
            dead_letter: r(format!(
                "INSERT INTO {dead} (consumer, message_id, kind, message_type, source, destination, ordering_key, \
                 headers, content_type, payload, created_at, attempts, reason) \
                 VALUES (?, {id}, ?, ?, ?, ?, ?, {headers}, ?, ?, {created}, ?, ?)",
                id = D::uuid_param("?"),
                headers = D::json_param("?"),
                created = D::time_from_micros("?"),
            )),
            dead_letter_raw: r(format!(
                "INSERT INTO {dead} (consumer, destination, payload, attempts, reason) VALUES (?, ?, ?, 1, ?)"
            )),
            replays: r(format!(
                "SELECT id, {message_id} AS message_id, kind, message_type, source, destination, ordering_key, \
                 {headers} AS headers, content_type, {payload} AS payload, {created} AS created_at, attempts \
                 FROM {dead} WHERE consumer = ? AND {marked} AND message_id IS NOT NULL \
                 ORDER BY id LIMIT ?",
                message_id = D::select_text("message_id"),
                headers = D::select_text("headers"),
                payload = D::select_bytes("payload"),
                created = D::select_micros("created_at"),
                marked = D::is_set("replay_requested"),
            )),
            replay_failed: r(format!(
                "UPDATE {dead} SET replay_requested = NOT {yes}, attempts = attempts + 1, \
                 reason = {reason} WHERE id = ?",
                yes = D::true_literal(),
                reason = D::concat(&D::concat("reason", "' | replay failed: '"), "?"),
            )),
            delete_dead: r(format!("DELETE FROM {dead} WHERE id = ?")),
            purge: r(D::delete_limited(
                &inbox,
                &format!("processed_at < {}", D::now_plus_micros("?")),
            )),
        };
        Ok(Applier {
            pool,
            handler,
            version_header: None,
            inbox: Inbox::new(table)?,
            sql: Arc::new(sql),
            dialect: PhantomData,
        })
    }

    /// Skips messages whose `header` (an integer version) is not newer than the last version
    /// applied for their ordering key. Messages without the header or a key are always applied.
    pub fn skip_stale_versions(mut self, header: impl Into<String>) -> Applier<D, H> {
        self.version_header = Some(header.into());
        self
    }

    /// Whether `version` is newer than the last one applied for `key`, recording it if so.
    async fn newer_version(
        &self,
        conn: &mut <D::DB as sqlx::Database>::Connection,
        consumer: &str,
        key: &str,
        version: i64,
    ) -> Result<bool> {
        let what = "checking the message's version";
        match &self.sql.version {
            VersionCheck::Upsert(sql) => Ok(Stmt::<D::DB>::new(sql)
                .text(consumer)
                .text(key)
                .int(version)
                .fetch_optional(conn)
                .await
                .map_err(|e| db::<D>(what, e))?
                .is_some()),
            VersionCheck::ReadThenWrite { read, write } => {
                let last = Stmt::<D::DB>::new(read)
                    .text(consumer)
                    .text(key)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(|e| db::<D>(what, e))?;
                if let Some(row) = last {
                    let last =
                        <D::DB as SqlDb>::get_i64(&row, "version").map_err(|e| db::<D>(what, e))?;
                    if last >= version {
                        return Ok(false);
                    }
                }
                Stmt::<D::DB>::new(write)
                    .text(consumer)
                    .text(key)
                    .int(version)
                    .execute(conn)
                    .await
                    .map_err(|e| db::<D>("recording the message's version", e))?;
                Ok(true)
            }
        }
    }
}

impl<D: Dialect, H> Applier<D, H> {
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
                    reason: format!("header {header:?} is not an integer version: {e}"),
                }),
        }
    }

    fn replay_row(
        &self,
        r: &<D::DB as sqlx::Database>::Row,
    ) -> std::result::Result<RawRow, String> {
        let created_at = D::read_micros(r, "created_at")?.unwrap_or_default();
        crate::outbox::raw_row::<D>(r, created_at)
    }
}

#[async_trait]
impl<D: Dialect, H: Handler<D::DB>> Apply for Applier<D, H> {
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
            .map_err(|e| db::<D>("starting the inbox transaction", e))?;
        let fresh = self.inbox.record(&mut tx, consumer, message.id).await?;
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
            && let Err(e) = caught(self.handler.handle(&mut tx, message)).await
        {
            let _ = tx.rollback().await;
            return Err(handler_error::<D>(e));
        }
        if outcome == Applied::Duplicate && replay_of.is_none() {
            let _ = tx.rollback().await;
            return Ok(outcome);
        }
        if let Some(id) = replay_of {
            Stmt::<D::DB>::new(&self.sql.delete_dead)
                .int(id)
                .execute(&mut tx)
                .await
                .map_err(|e| db::<D>("removing a replayed dead letter", e))?;
        }
        tx.commit()
            .await
            .map_err(|e| db::<D>("committing the inbox transaction", e))?;
        Ok(outcome)
    }

    async fn dead_letter(
        &self,
        consumer: &str,
        m: &Message,
        reason: &str,
        attempts: u32,
    ) -> Result<()> {
        let what = "dead-lettering a message";
        let headers = serde_json::to_string(&m.headers)
            .map_err(|e| Error::unavailable(what, format!("headers do not serialise: {e}")))?;
        let mut conn = self.pool.acquire().await.map_err(|e| db::<D>(what, e))?;
        Stmt::<D::DB>::new(&self.sql.dead_letter)
            .text(consumer)
            .text(&m.id.to_string())
            .text(m.kind.as_str())
            .text(&m.message_type)
            .text(&m.source)
            .text(&m.destination)
            .opt_text(m.ordering_key.as_deref())
            .text(&headers)
            .text(&m.content_type)
            .bytes(&m.payload)
            .int(m.created_at_micros())
            .int(i64::from(attempts))
            .text(reason)
            .execute(&mut conn)
            .await
            .map_err(|e| db::<D>(what, e))?;
        Ok(())
    }

    async fn dead_letter_undecodable(
        &self,
        consumer: &str,
        destination: &str,
        body: &[u8],
        reason: &str,
    ) -> Result<()> {
        let what = "dead-lettering an undecodable delivery";
        let mut conn = self.pool.acquire().await.map_err(|e| db::<D>(what, e))?;
        Stmt::<D::DB>::new(&self.sql.dead_letter_raw)
            .text(consumer)
            .text(destination)
            .bytes(body)
            .text(&format!("cannot decode: {reason}"))
            .execute(&mut conn)
            .await
            .map_err(|e| db::<D>(what, e))?;
        Ok(())
    }

    async fn replays(&self, consumer: &str, max: usize) -> Result<Vec<Replay>> {
        let what = "reading dead letters to replay";
        let mut conn = self.pool.acquire().await.map_err(|e| db::<D>(what, e))?;
        let rows = Stmt::<D::DB>::new(&self.sql.replays)
            .text(consumer)
            .int(max as i64)
            .fetch_all(&mut conn)
            .await
            .map_err(|e| db::<D>(what, e))?;
        drop(conn);
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let id = <D::DB as SqlDb>::get_i64(r, "id").map_err(|e| db::<D>(what, e))?;
            match self.replay_row(r).and_then(RawRow::decode) {
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
        let what = "recording a failed replay";
        let mut conn = self.pool.acquire().await.map_err(|e| db::<D>(what, e))?;
        Stmt::<D::DB>::new(&self.sql.replay_failed)
            .text(reason)
            .int(id)
            .execute(&mut conn)
            .await
            .map_err(|e| db::<D>(what, e))?;
        Ok(())
    }

    async fn purge_inbox(&self, retention: Duration, batch: usize) -> Result<u64> {
        let what = "purging the inbox";
        let mut conn = self.pool.acquire().await.map_err(|e| db::<D>(what, e))?;
        let back = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
        let done = Stmt::<D::DB>::new(&self.sql.purge)
            .int(-back)
            .int(batch as i64)
            .execute(&mut conn)
            .await
            .map_err(|e| db::<D>(what, e))?;
        Ok(D::rows_affected(&done))
    }
}

/// A handler that panics fails like one that returns an error (retried, then parked with the
/// panic's message) instead of taking the consumer down; the transaction is rolled back.
async fn caught(
    handled: impl std::future::Future<Output = std::result::Result<(), BoxError>>,
) -> std::result::Result<(), BoxError> {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(handled).catch_unwind().await {
        Ok(done) => done,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            Err(format!(
                "the handler panicked: {}",
                what.chars().take(200).collect::<String>()
            )
            .into())
        }
    }
}
