//! The relay's side of the SQLite outbox.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use herald_core::message::{from_micros, to_micros};
use herald_core::store::{OUTBOX_COLUMNS, RawRow};
use herald_core::{
    Claim, DestinationStats, Error, Identifier, Lease, OutboxRow, OutboxStore, RejectionOutcome,
    Result,
};
use sqlx::{AssertSqlSafe, Row, SqlitePool};

use crate::error::db;

/// The outbox of a SQLite database, as the relay sees it.
///
/// SQLite has one writer at a time; claims run in `BEGIN IMMEDIATE` transactions so that two
/// relays (even in two processes) never see a key as free at the same time.
#[derive(Clone)]
pub struct SqliteOutbox {
    pool: SqlitePool,
    sql: Arc<Sql>,
}

struct Sql {
    table: Identifier,
    dead: Identifier,
    claim: String,
    complete: String,
    release: String,
    reject: String,
    dead_letter: String,
    delete_one: String,
    stats: String,
    dead_stats: String,
}

impl Sql {
    fn new(table: &Identifier) -> Result<Sql> {
        let dead = table.with_suffix("_dead_letter")?;
        let t = table.as_str();
        let cols = "id, message_id, kind, message_type, source, destination, ordering_key, headers, content_type, \
                    CAST(payload AS BLOB) AS payload, created_at, attempts";
        Ok(Sql {
            // Head-of-key claiming: a row is free if unleased (or its lease expired) and no row
            // of its key is under a live lease; the busy keys are read once per claim through
            // the partial index `<table>_leased_idx`. Taking rows in id order keeps the claimed
            // rows of each key a prefix of that key's pending rows.
            claim: format!(
                "UPDATE \"{t}\" SET lease_owner = ?1, lease_token = ?2, lease_until = ?3 \
                 WHERE id IN (SELECT o.id FROM \"{t}\" o \
                   WHERE (o.lease_until IS NULL OR o.lease_until < ?4) \
                     AND (o.ordering_key IS NULL OR o.ordering_key NOT IN (SELECT e.ordering_key FROM \"{t}\" e \
                          WHERE e.lease_until >= ?4 AND e.ordering_key IS NOT NULL)) \
                   ORDER BY o.id LIMIT ?5) \
                 RETURNING {cols}"
            ),
            complete: format!(
                "DELETE FROM \"{t}\" WHERE lease_token = ?1 AND id IN (SELECT value FROM json_each(?2))"
            ),
            release: format!(
                "UPDATE \"{t}\" SET lease_owner = NULL, lease_token = NULL, lease_until = NULL, last_error = ?3 \
                 WHERE lease_token = ?1 AND id IN (SELECT value FROM json_each(?2))"
            ),
            reject: format!(
                "UPDATE \"{t}\" SET attempts = attempts + 1, last_error = ?3, \
                 lease_owner = NULL, lease_token = NULL, lease_until = ?4 \
                 WHERE id = ?1 AND lease_token = ?2 RETURNING attempts"
            ),
            // A dead letter keeps its outbox id, unless a producer wrote the id column itself
            // and reused one an earlier dead letter has: then it takes the next free id, so the
            // move cannot fail (and stop the relay) on that row.
            dead_letter: format!(
                "INSERT INTO \"{dead}\" (id, message_id, kind, message_type, source, destination, ordering_key, \
                 headers, content_type, payload, created_at, attempts, reason) \
                 SELECT CASE WHEN EXISTS (SELECT 1 FROM \"{dead}\" d WHERE d.id = ?1) \
                 THEN (SELECT MAX(MAX(d.id), ?1) + 1 FROM \"{dead}\" d) ELSE id END, \
                 message_id, kind, message_type, source, destination, ordering_key, headers, \
                 content_type, payload, created_at, attempts, ?2 FROM \"{t}\" WHERE id = ?1"
            ),
            delete_one: format!("DELETE FROM \"{t}\" WHERE id = ?1"),
            stats: format!(
                // Any value may sit in a SQLite column: destinations are read as bytes, times only
                // where they are integers, so one odd row cannot make `herald status` fail.
                "SELECT CAST(destination AS BLOB) AS destination, COUNT(*) AS n, \
                 MIN(CASE WHEN typeof(created_at) = 'integer' THEN created_at END) AS oldest \
                 FROM \"{t}\" GROUP BY CAST(destination AS BLOB)"
            ),
            dead_stats: format!(
                "SELECT CAST(destination AS BLOB) AS destination, COUNT(*) AS n FROM \"{dead}\" \
                 GROUP BY CAST(destination AS BLOB)"
            ),
            table: table.clone(),
            dead,
        })
    }
}

impl SqliteOutbox {
    /// The outbox in `table`. Checks that the table and its dead-letter table exist with the
    /// documented columns, so a typo fails at start-up rather than at the first claim.
    pub async fn new(pool: SqlitePool, table: Identifier) -> Result<SqliteOutbox> {
        let sql = Sql::new(&table)?;
        check_columns(&pool, &sql.table, &OUTBOX_COLUMNS).await?;
        check_columns(&pool, &sql.dead, &["id", "reason", "payload"]).await?;
        Ok(SqliteOutbox {
            pool,
            sql: Arc::new(sql),
        })
    }

    /// The pool this outbox uses.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn move_to_dead_letters(
        &self,
        tx: &mut sqlx::SqliteConnection,
        seq: i64,
        reason: &str,
    ) -> Result<()> {
        sqlx::query(AssertSqlSafe(self.sql.dead_letter.as_str()))
            .bind(seq)
            .bind(reason)
            .execute(&mut *tx)
            .await
            .map_err(dead_letter_error)?;
        sqlx::query(AssertSqlSafe(self.sql.delete_one.as_str()))
            .bind(seq)
            .execute(&mut *tx)
            .await
            .map_err(dead_letter_error)?;
        Ok(())
    }
}

pub(crate) async fn check_columns(
    pool: &SqlitePool,
    table: &Identifier,
    columns: &[&str],
) -> Result<()> {
    let rows = sqlx::query("SELECT name FROM pragma_table_info(?1)")
        .bind(table.as_str())
        .fetch_all(pool)
        .await
        .map_err(|e| db("reading the table's columns", e))?;
    if rows.is_empty() {
        return Err(Error::Schema {
            table: table.to_string(),
            detail: "no such table".to_owned(),
        });
    }
    let have: Vec<String> = rows.iter().map(|r| r.get::<String, _>(0)).collect();
    let missing: Vec<&str> = columns
        .iter()
        .copied()
        .filter(|c| !have.iter().any(|h| h == c))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Schema {
            table: table.to_string(),
            detail: format!("missing columns: {}", missing.join(", ")),
        });
    }
    Ok(())
}

fn json_ids(seqs: &[i64]) -> String {
    serde_json::to_string(seqs).expect("a list of integers serialises")
}

fn raw_row(r: &sqlx::sqlite::SqliteRow) -> std::result::Result<RawRow, sqlx::Error> {
    Ok(RawRow {
        seq: r.try_get("id")?,
        message_id: r.try_get("message_id")?,
        kind: r.try_get("kind")?,
        message_type: r.try_get("message_type")?,
        source: r.try_get("source")?,
        destination: r.try_get("destination")?,
        ordering_key: r.try_get("ordering_key")?,
        headers: r.try_get("headers")?,
        content_type: r.try_get("content_type")?,
        payload: r.try_get("payload")?,
        created_at_micros: r.try_get("created_at")?,
        attempts: r.try_get("attempts")?,
    })
}

/// A text column read as bytes, shown lossily when it is not UTF-8 (`NULL` shows as empty).
fn lossy(r: &sqlx::sqlite::SqliteRow, column: &str) -> String {
    r.try_get::<Option<Vec<u8>>, _>(column)
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// A unique violation while moving a row to the dead letters can only be two relays giving a
/// reused id the same fresh one at once: retrying picks another, so it is transient here (a
/// permanent error would stop the relay).
fn dead_letter_error(e: sqlx::Error) -> Error {
    let collided = e
        .as_database_error()
        .is_some_and(|d| d.is_unique_violation());
    db("dead-lettering an outbox row", e).transient_if(collided)
}

#[async_trait]
impl OutboxStore for SqliteOutbox {
    async fn claim(&self, owner: &str, max: usize, lease: Duration) -> Result<Claim> {
        let lease_handle = Lease::start(lease);
        let now = to_micros(SystemTime::now());
        let until = now + lease.as_micros() as i64;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| db("starting a claim", e))?;
        let rows = sqlx::query(AssertSqlSafe(self.sql.claim.as_str()))
            .bind(owner)
            .bind(lease_handle.token)
            .bind(until)
            .bind(now)
            .bind(max as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| db("claiming outbox rows", e))?;
        let mut claimed: Vec<OutboxRow> = Vec::with_capacity(rows.len());
        let mut parked = 0;
        for r in &rows {
            // A row that cannot be read is parked with the reason, not dropped and not retried.
            let seq: i64 = r.get("id");
            match raw_row(r)
                .map_err(|e| e.to_string())
                .and_then(RawRow::decode)
            {
                Ok(row) => claimed.push(row),
                Err(reason) => {
                    tracing::warn!(seq, %reason, "outbox row cannot be decoded; dead-lettering it");
                    self.move_to_dead_letters(
                        &mut tx,
                        seq,
                        &format!("cannot decode outbox row: {reason}"),
                    )
                    .await?;
                    parked += 1;
                }
            }
        }
        tx.commit().await.map_err(|e| db("committing a claim", e))?;
        claimed.sort_by_key(|r| r.seq);
        Ok(Claim {
            lease: lease_handle,
            rows: claimed,
            parked,
        })
    }

    async fn complete(&self, lease: &Lease, seqs: &[i64]) -> Result<u64> {
        let done = sqlx::query(AssertSqlSafe(self.sql.complete.as_str()))
            .bind(lease.token)
            .bind(json_ids(seqs))
            .execute(&self.pool)
            .await
            .map_err(|e| db("marking outbox rows published", e))?;
        Ok(done.rows_affected())
    }

    async fn release(&self, lease: &Lease, seqs: &[i64], reason: &str) -> Result<u64> {
        let done = sqlx::query(AssertSqlSafe(self.sql.release.as_str()))
            .bind(lease.token)
            .bind(json_ids(seqs))
            .bind(reason)
            .execute(&self.pool)
            .await
            .map_err(|e| db("releasing outbox rows", e))?;
        Ok(done.rows_affected())
    }

    async fn record_rejection(
        &self,
        lease: &Lease,
        seq: i64,
        reason: &str,
        max_attempts: u32,
        retry_after: Duration,
    ) -> Result<RejectionOutcome> {
        let retry_at = to_micros(SystemTime::now()) + retry_after.as_micros() as i64;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| db("recording a rejection", e))?;
        let attempts: Option<i64> = sqlx::query_scalar(AssertSqlSafe(self.sql.reject.as_str()))
            .bind(seq)
            .bind(lease.token)
            .bind(reason)
            .bind(retry_at)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| db("recording a rejection", e))?;
        let outcome = match attempts {
            None => RejectionOutcome::LeaseLost,
            Some(n) if n >= i64::from(max_attempts) => {
                self.move_to_dead_letters(&mut tx, seq, reason).await?;
                RejectionOutcome::DeadLettered
            }
            Some(_) => RejectionOutcome::WillRetry,
        };
        tx.commit()
            .await
            .map_err(|e| db("recording a rejection", e))?;
        Ok(outcome)
    }

    async fn stats(&self) -> Result<Vec<DestinationStats>> {
        let pending = sqlx::query(AssertSqlSafe(self.sql.stats.as_str()))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db("reading outbox depth", e))?;
        let dead = sqlx::query(AssertSqlSafe(self.sql.dead_stats.as_str()))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db("reading dead letters", e))?;
        let out: Vec<DestinationStats> = pending
            .iter()
            .map(|r| DestinationStats {
                destination: lossy(r, "destination"),
                pending: r.get::<i64, _>("n") as u64,
                oldest: r
                    .try_get::<Option<i64>, _>("oldest")
                    .ok()
                    .flatten()
                    .map(from_micros),
                dead_letters: 0,
            })
            .collect();
        let dead = dead
            .iter()
            .map(|r| (lossy(r, "destination"), r.get::<i64, _>("n") as u64));
        Ok(herald_core::store::with_dead_letters(out, dead))
    }

    async fn durability_warnings(&self) -> Result<Vec<String>> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| db("checking durability settings", e))?;
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| db("checking durability settings", e))?;
        let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| db("checking durability settings", e))?;
        let mut warnings = Vec::new();
        if sync < 2 {
            warnings.push(format!(
                "SQLite synchronous={} on the relay's connection: a commit can be lost on power failure after the relay \
                 published it (a phantom event). Open every connection with synchronous=FULL \
                 (herald_sqlite::connect_options does).",
                ["OFF", "NORMAL"][sync.clamp(0, 1) as usize]
            ));
        }
        if !journal.eq_ignore_ascii_case("wal") {
            warnings.push(format!(
                "SQLite journal_mode={journal}: the relay's polling blocks writers; use WAL (herald_sqlite::connect_options does)."
            ));
        }
        Ok(warnings)
    }
}
