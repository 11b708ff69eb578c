//! The relay's side of the PostgreSQL outbox.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::message::{from_micros, micros_from_epoch_text};
use herald_core::store::{OUTBOX_COLUMNS, RawRow};
use herald_core::{
    Claim, DestinationStats, Error, Identifier, Lease, OutboxRow, OutboxStore, RejectionOutcome,
    Result,
};
use sqlx::{AssertSqlSafe, PgPool, Row};

use crate::error::db;

/// The outbox of a PostgreSQL database, as the relay sees it.
///
/// A claim is one short transaction: it takes a transaction-scoped advisory lock (so claims by
/// several relays are serialised and cannot both see a key as free), leases rows with
/// head-of-key claiming, and commits. Publishing happens outside any transaction; marking deletes
/// the rows if the lease token still matches.
#[derive(Clone)]
pub struct PgOutbox {
    pool: PgPool,
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
    stats: String,
    dead_stats: String,
}

impl Sql {
    fn new(table: &Identifier) -> Result<Sql> {
        let dead = table.with_suffix("_dead_letter")?;
        let t = table.as_str();
        // Nothing in the claim may fail for one row: every column is read as text or bytes
        // (casts that cannot fail) and decoded in Rust, row by row. A `created_at` of
        // 'infinity' or in the year 294276 becomes that row's dead-letter reason, not an
        // error of the whole claim. (`::numeric` and `isfinite` keep it so on PostgreSQL 13,
        // where extract returns a double that prints as `1e-05` and cannot cast infinity.)
        let cols = "id, message_id::text AS message_id, kind, message_type, source, destination, ordering_key, \
                    headers::text AS headers, content_type, payload, \
                    CASE WHEN isfinite(created_at) THEN extract(epoch FROM created_at)::numeric::text \
                    ELSE created_at::text END AS created_at, attempts";
        Ok(Sql {
            // Head-of-key claiming (see herald_core::store): free rows in id order whose key has no
            // row under a live lease. The leased keys are read once per claim (a hashed subplan
            // over the small partial index `<table>_leased_idx`), not once per candidate row: a
            // per-row probe of the key index walked every dead entry of the key's published rows
            // and cost 50 ms per claim half-way through a 100k drain (0.5 ms now).
            claim: format!(
                "UPDATE \"{t}\" SET lease_owner = $1, lease_token = $2, lease_until = now() + $3 * interval '1 microsecond' \
                 WHERE id IN (SELECT o.id FROM \"{t}\" o \
                   WHERE (o.lease_until IS NULL OR o.lease_until < now()) \
                     AND (o.ordering_key IS NULL OR o.ordering_key NOT IN (SELECT e.ordering_key FROM \"{t}\" e \
                          WHERE e.lease_until >= now() AND e.ordering_key IS NOT NULL)) \
                   ORDER BY o.id LIMIT $4) \
                 RETURNING {cols}"
            ),
            // `set_config(.., true)` in a one-row join turns off the commit's fsync wait for this
            // statement's implicit transaction only (see `claim`).
            complete: format!(
                "DELETE FROM \"{t}\" o USING (SELECT set_config('synchronous_commit', 'off', true)) s \
                 WHERE o.lease_token = $1 AND o.id = ANY($2)"
            ),
            release: format!(
                "UPDATE \"{t}\" o SET lease_owner = NULL, lease_token = NULL, lease_until = NULL, last_error = $3 \
                 FROM (SELECT set_config('synchronous_commit', 'off', true)) s \
                 WHERE o.lease_token = $1 AND o.id = ANY($2)"
            ),
            reject: format!(
                "UPDATE \"{t}\" SET attempts = attempts + 1, last_error = $3, \
                 lease_owner = NULL, lease_token = NULL, lease_until = now() + $4 * interval '1 microsecond' \
                 WHERE id = $1 AND lease_token = $2 RETURNING attempts"
            ),
            // A dead letter keeps its outbox id, unless a producer wrote the id column itself
            // and reused one an earlier dead letter has: then it takes the next free id, so the
            // move cannot fail (and stop the relay) on that row.
            dead_letter: format!(
                "WITH moved AS (DELETE FROM \"{t}\" WHERE id = $1 RETURNING *) \
                 INSERT INTO \"{dead}\" (id, message_id, kind, message_type, source, destination, ordering_key, \
                 headers, content_type, payload, created_at, attempts, reason) \
                 SELECT CASE WHEN EXISTS (SELECT 1 FROM \"{dead}\" d WHERE d.id = moved.id) \
                 THEN (SELECT GREATEST(MAX(d.id), moved.id) + 1 FROM \"{dead}\" d) ELSE moved.id END, \
                 message_id, kind, message_type, source, destination, ordering_key, headers, \
                 content_type, payload, created_at, attempts, $2 FROM moved"
            ),
            stats: format!(
                "SELECT destination, COUNT(*) AS n, CASE WHEN isfinite(MIN(created_at)) THEN extract(epoch FROM MIN(created_at))::numeric::text END AS oldest \
                 FROM \"{t}\" GROUP BY destination"
            ),
            dead_stats: format!(
                "SELECT destination, COUNT(*) AS n FROM \"{dead}\" GROUP BY destination"
            ),
            table: table.clone(),
            dead,
        })
    }
}

impl PgOutbox {
    /// The outbox in `table` (in the connection's current schema). Checks that the table and its
    /// dead-letter table exist with the documented columns.
    pub async fn new(pool: PgPool, table: Identifier) -> Result<PgOutbox> {
        let sql = Sql::new(&table)?;
        check_columns(&pool, &sql.table, &OUTBOX_COLUMNS).await?;
        check_columns(&pool, &sql.dead, &["id", "reason", "payload"]).await?;
        Ok(PgOutbox {
            pool,
            sql: Arc::new(sql),
        })
    }

    /// The pool this outbox uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn move_to_dead_letters(
        &self,
        conn: &mut sqlx::PgConnection,
        seq: i64,
        reason: &str,
    ) -> Result<()> {
        sqlx::query(AssertSqlSafe(self.sql.dead_letter.as_str()))
            .bind(seq)
            .bind(reason)
            .execute(conn)
            .await
            .map_err(dead_letter_error)?;
        Ok(())
    }
}

async fn check_columns(pool: &PgPool, table: &Identifier, columns: &[&str]) -> Result<()> {
    let have: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1",
    )
    .bind(table.as_str())
    .fetch_all(pool)
    .await
    .map_err(|e| db("reading the table's columns", e))?;
    if have.is_empty() {
        return Err(Error::Schema {
            table: table.to_string(),
            detail: "no such table in the current schema".to_owned(),
        });
    }
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

fn raw_row(r: &sqlx::postgres::PgRow) -> std::result::Result<RawRow, String> {
    let created_at: String = r.try_get("created_at").map_err(|e| e.to_string())?;
    let created_at_micros = micros_from_epoch_text(&created_at)?;
    raw_columns(r, created_at_micros).map_err(|e| e.to_string())
}

fn raw_columns(
    r: &sqlx::postgres::PgRow,
    created_at_micros: i64,
) -> std::result::Result<RawRow, sqlx::Error> {
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
        created_at_micros,
        attempts: r.try_get("attempts")?,
    })
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
impl OutboxStore for PgOutbox {
    async fn claim(&self, owner: &str, max: usize, lease: Duration) -> Result<Claim> {
        let handle = Lease::start(lease);
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| db("starting a claim", e))?;
        // The relay's own commits need no fsync: a lost claim means the rows are claimed again,
        // a lost mark means the message is published again (a duplicate, never a loss). Only the
        // application's commits must be durable, and they are untouched.
        sqlx::query(
            "SELECT set_config('synchronous_commit', 'off', true), \
             pg_advisory_xact_lock(hashtext(current_schema() || '.' || $1))",
        )
        .bind(self.sql.table.as_str())
        .execute(&mut *tx)
        .await
        .map_err(|e| db("serialising claims", e))?;
        let rows = sqlx::query(AssertSqlSafe(self.sql.claim.as_str()))
            .bind(owner)
            .bind(handle.token)
            .bind(lease.as_micros() as f64)
            .bind(max as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| db("claiming outbox rows", e))?;
        let mut claimed: Vec<OutboxRow> = Vec::with_capacity(rows.len());
        let mut parked = 0;
        for r in &rows {
            let seq: i64 = r.get("id");
            match raw_row(r).and_then(RawRow::decode) {
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
            lease: handle,
            rows: claimed,
            parked,
        })
    }

    async fn complete(&self, lease: &Lease, seqs: &[i64]) -> Result<u64> {
        let done = sqlx::query(AssertSqlSafe(self.sql.complete.as_str()))
            .bind(lease.token)
            .bind(seqs)
            .execute(&self.pool)
            .await
            .map_err(|e| db("marking outbox rows published", e))?;
        Ok(done.rows_affected())
    }

    async fn release(&self, lease: &Lease, seqs: &[i64], reason: &str) -> Result<u64> {
        let done = sqlx::query(AssertSqlSafe(self.sql.release.as_str()))
            .bind(lease.token)
            .bind(seqs)
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
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| db("recording a rejection", e))?;
        let attempts: Option<i32> = sqlx::query_scalar(AssertSqlSafe(self.sql.reject.as_str()))
            .bind(seq)
            .bind(lease.token)
            .bind(reason)
            .bind(retry_after.as_micros() as f64)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| db("recording a rejection", e))?;
        let outcome = match attempts {
            None => RejectionOutcome::LeaseLost,
            Some(n) if n as i64 >= i64::from(max_attempts) => {
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
                destination: r.get("destination"),
                pending: r.get::<i64, _>("n") as u64,
                oldest: r
                    .get::<Option<String>, _>("oldest")
                    .and_then(|t| micros_from_epoch_text(&t).ok())
                    .map(from_micros),
                dead_letters: 0,
            })
            .collect();
        let dead = dead
            .iter()
            .map(|r| (r.get("destination"), r.get::<i64, _>("n") as u64));
        Ok(herald_core::store::with_dead_letters(out, dead))
    }

    async fn durability_warnings(&self) -> Result<Vec<String>> {
        let sync: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| db("checking durability settings", e))?;
        let fsync: String = sqlx::query_scalar("SELECT current_setting('fsync')")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| db("checking durability settings", e))?;
        let mut warnings = Vec::new();
        if sync == "off" {
            warnings.push(format!(
                "PostgreSQL synchronous_commit={sync}: a transaction the relay already published can vanish in a \
                 server crash (a phantom event). Set synchronous_commit=on for the application's role."
            ));
        }
        if fsync == "off" {
            warnings.push(
                "PostgreSQL fsync=off: committed outbox rows (and published events' transactions) can be lost in a \
                 crash. Turn fsync on."
                    .to_owned(),
            );
        }
        // Not a durability setting, but the outbox is a queue: every published row is deleted,
        // and without vacuum the dead rows pile up and every claim walks them.
        let autovacuum: String = sqlx::query_scalar("SELECT current_setting('autovacuum')")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| db("checking durability settings", e))?;
        if autovacuum == "off" {
            warnings.push(format!(
                "PostgreSQL autovacuum=off: the outbox's published (deleted) rows are never vacuumed, so the table \
                 and its indexes grow and claims slow down. Turn autovacuum on, or run VACUUM \"{}\" regularly.",
                self.sql.table
            ));
        }
        Ok(warnings)
    }
}
