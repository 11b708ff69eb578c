//! The relay's side of the MySQL outbox.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::message::from_micros;
use herald_core::store::{OUTBOX_COLUMNS, RawRow};
use herald_core::{
    Claim, DestinationStats, Error, Identifier, Lease, OutboxRow, OutboxStore, RejectionOutcome,
    Result,
};
use sqlx::mysql::MySqlRow;
use sqlx::{AssertSqlSafe, MySqlConnection, MySqlPool, Row};

use crate::error::db;

/// The outbox of a MySQL or MariaDB database, as the relay sees it.
///
/// A claim is one short `READ COMMITTED` transaction:
///
/// 1. read the keys that are busy (a row under a live lease or waiting out a retry delay);
/// 2. lock the first free rows of the other keys in id order with `FOR UPDATE SKIP LOCKED`, so a
///    claim never waits behind an application transaction still inserting rows, nor behind
///    another relay's claim;
/// 3. check that each taken row is the head of its key: a lower-id committed row of the key that
///    step 2 skipped (locked by someone else at that moment) holds the key's later rows back;
/// 4. write the lease and commit.
///
/// Step 3 is what keeps per-key order without serialising claims: two relays can claim at the
/// same time, and neither can take a key's second row while its first is free or in flight.
/// Publishing happens outside any transaction; marking deletes the rows if the lease token still
/// matches.
#[derive(Clone)]
pub struct MySqlOutbox {
    pool: MySqlPool,
    sql: Arc<Sql>,
}

struct Sql {
    table: Identifier,
    dead: Identifier,
    busy: String,
    candidates: String,
    complete: String,
    release: String,
    dead_letter: String,
    delete_one: String,
    reject: String,
    attempts: String,
    stats: String,
    dead_stats: String,
}

const COLS: &str = "id, message_id, kind, message_type, source, destination, ordering_key, headers, content_type, \
                    payload, TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', created_at) AS created_at, attempts";

impl Sql {
    fn new(table: &Identifier) -> Result<Sql> {
        let dead = table.with_suffix("_dead_letter")?;
        let t = table.as_str();
        Ok(Sql {
            busy: format!(
                "SELECT DISTINCT ordering_key FROM `{t}` \
                 WHERE lease_until >= UTC_TIMESTAMP(6) AND ordering_key IS NOT NULL"
            ),
            candidates: format!(
                "SELECT {COLS} FROM `{t}` WHERE (lease_until IS NULL OR lease_until < UTC_TIMESTAMP(6)) {{busy}} \
                 ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED"
            ),
            complete: format!("DELETE FROM `{t}` WHERE lease_token = ?"),
            release: format!(
                "UPDATE `{t}` SET lease_owner = NULL, lease_token = NULL, lease_until = NULL, last_error = ? \
                 WHERE lease_token = ?"
            ),
            // A dead letter keeps its outbox id, unless a producer wrote the id column itself
            // and reused one an earlier dead letter has: then it takes the next free id, so the
            // move cannot fail (and stop the relay) on that row.
            dead_letter: format!(
                "INSERT INTO `{dead}` (id, message_id, kind, message_type, source, destination, ordering_key, \
                 headers, content_type, payload, created_at, attempts, reason) \
                 SELECT CASE WHEN EXISTS (SELECT 1 FROM `{dead}` d WHERE d.id = o.id) \
                 THEN (SELECT GREATEST(MAX(d.id), o.id) + 1 FROM `{dead}` d) ELSE o.id END, \
                 message_id, kind, message_type, source, destination, ordering_key, headers, \
                 content_type, payload, created_at, attempts, ? FROM `{t}` o WHERE o.id = ?"
            ),
            delete_one: format!("DELETE FROM `{t}` WHERE id = ?"),
            reject: format!(
                "UPDATE `{t}` SET attempts = attempts + 1, last_error = ?, lease_owner = NULL, lease_token = NULL, \
                 lease_until = TIMESTAMPADD(MICROSECOND, ?, UTC_TIMESTAMP(6)) WHERE id = ? AND lease_token = ?"
            ),
            attempts: format!("SELECT attempts FROM `{t}` WHERE id = ?"),
            stats: format!(
                "SELECT destination, COUNT(*) AS n, \
                 TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', MIN(created_at)) AS oldest \
                 FROM `{t}` GROUP BY destination"
            ),
            dead_stats: format!(
                "SELECT destination, COUNT(*) AS n FROM `{dead}` GROUP BY destination"
            ),
            table: table.clone(),
            dead,
        })
    }
}

/// `?, ?, ?` for `n` values.
fn marks(n: usize) -> String {
    vec!["?"; n].join(", ")
}

impl MySqlOutbox {
    /// The outbox in `table` (in the connection's database). Checks that the table and its
    /// dead-letter table exist with the documented columns and are transactional (InnoDB): a
    /// MyISAM outbox would keep the rows of rolled-back transactions.
    pub async fn new(pool: MySqlPool, table: Identifier) -> Result<MySqlOutbox> {
        let sql = Sql::new(&table)?;
        check_table(&pool, &sql.table, &OUTBOX_COLUMNS).await?;
        check_table(&pool, &sql.dead, &["id", "reason", "payload"]).await?;
        Ok(MySqlOutbox {
            pool,
            sql: Arc::new(sql),
        })
    }

    /// The pool this outbox uses.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    async fn move_to_dead_letters(
        &self,
        conn: &mut MySqlConnection,
        seq: i64,
        reason: &str,
    ) -> Result<()> {
        sqlx::query(AssertSqlSafe(self.sql.dead_letter.as_str()))
            .bind(reason)
            .bind(seq)
            .execute(&mut *conn)
            .await
            .map_err(dead_letter_error)?;
        sqlx::query(AssertSqlSafe(self.sql.delete_one.as_str()))
            .bind(seq)
            .execute(&mut *conn)
            .await
            .map_err(dead_letter_error)?;
        Ok(())
    }

    /// Of the locked candidate rows (in id order), the keys whose rows must be held back from
    /// some id on, because a committed row of the key with a lower id was not among them.
    async fn blocked_from(
        &self,
        conn: &mut MySqlConnection,
        candidates: &[(i64, Option<String>)],
    ) -> Result<HashMap<String, i64>> {
        let keys: Vec<&str> = {
            let mut k: Vec<&str> = candidates
                .iter()
                .filter_map(|(_, k)| k.as_deref())
                .collect();
            k.sort_unstable();
            k.dedup();
            k
        };
        let Some(max_id) = candidates.iter().map(|(id, _)| *id).max() else {
            return Ok(HashMap::new());
        };
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let t = &self.sql.table;
        let sql = format!(
            "SELECT ordering_key, MIN(id) FROM `{t}` WHERE id < ? AND ordering_key IN ({}) AND id NOT IN ({}) \
             GROUP BY ordering_key",
            marks(keys.len()),
            marks(candidates.len())
        );
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(max_id);
        for k in &keys {
            q = q.bind(*k);
        }
        for (id, _) in candidates {
            q = q.bind(*id);
        }
        let rows = q
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| db("checking claimed rows are the heads of their keys", e))?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
            .collect())
    }

    /// Runs `head` (a statement ending in `WHERE lease_token = ?`) for `seqs`, returning the rows
    /// touched: the ones still under `lease`.
    /// Runs `head` (ending in `WHERE lease_token = ?`) for `seqs`; `set`, if any, is bound before
    /// the token (a value the statement's `SET` takes).
    async fn by_lease(
        &self,
        head: &str,
        what: &str,
        set: Option<&str>,
        lease: &Lease,
        seqs: &[i64],
    ) -> Result<u64> {
        if seqs.is_empty() {
            return Ok(0);
        }
        let sql = format!("{head} AND id IN ({})", marks(seqs.len()));
        let mut q = sqlx::query(AssertSqlSafe(sql));
        if let Some(value) = set {
            q = q.bind(value);
        }
        q = q.bind(lease.token);
        for s in seqs {
            q = q.bind(*s);
        }
        let done = q.execute(&self.pool).await.map_err(|e| db(what, e))?;
        Ok(done.rows_affected())
    }
}

async fn check_table(pool: &MySqlPool, table: &Identifier, columns: &[&str]) -> Result<()> {
    let engine: Option<Option<String>> = sqlx::query_scalar(
        "SELECT ENGINE FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
    )
    .bind(table.as_str())
    .fetch_optional(pool)
    .await
    .map_err(|e| db("reading the table's engine", e))?;
    let Some(engine) = engine else {
        return Err(Error::Schema {
            table: table.to_string(),
            detail: "no such table in the connection's database".to_owned(),
        });
    };
    let engine = engine.unwrap_or_default();
    if !engine.eq_ignore_ascii_case("InnoDB") {
        return Err(Error::Schema {
            table: table.to_string(),
            detail: format!(
                "the table uses the {engine} engine, which is not transactional: rows of rolled-back \
                 transactions would be published. Convert it with ALTER TABLE `{table}` ENGINE = InnoDB"
            ),
        });
    }
    let have: Vec<String> = sqlx::query_scalar(
        "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
    )
    .bind(table.as_str())
    .fetch_all(pool)
    .await
    .map_err(|e| db("reading the table's columns", e))?;
    let missing: Vec<&str> = columns
        .iter()
        .copied()
        .filter(|c| !have.iter().any(|h| h.eq_ignore_ascii_case(c)))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Schema {
            table: table.to_string(),
            detail: format!("missing columns: {}", missing.join(", ")),
        });
    }
    Ok(())
}

fn raw_row(r: &MySqlRow) -> std::result::Result<RawRow, sqlx::Error> {
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
impl OutboxStore for MySqlOutbox {
    async fn claim(&self, owner: &str, max: usize, lease: Duration) -> Result<Claim> {
        use sqlx::Connection;
        let handle = Lease::start(lease);
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| db("starting a claim", e))?;
        // READ COMMITTED: the locking read takes no gap locks (producers' inserts never wait on
        // a claim) and the plain reads see the latest commits.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *conn)
            .await
            .map_err(|e| db("starting a claim", e))?;
        let mut tx = conn.begin().await.map_err(|e| db("starting a claim", e))?;
        let busy: Vec<String> = sqlx::query_scalar(AssertSqlSafe(self.sql.busy.as_str()))
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| db("reading the keys in flight", e))?;
        let filter = if busy.is_empty() {
            String::new()
        } else {
            format!(
                "AND (ordering_key IS NULL OR ordering_key NOT IN ({}))",
                marks(busy.len())
            )
        };
        let sql = self.sql.candidates.replace("{busy}", &filter);
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for k in &busy {
            q = q.bind(k);
        }
        let rows = q
            .bind(max as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| db("claiming outbox rows", e))?;
        let candidates: Vec<(i64, Option<String>)> = rows
            .iter()
            .map(|r| (r.get("id"), r.try_get("ordering_key").ok().flatten()))
            .collect();
        let blocked = self.blocked_from(&mut tx, &candidates).await?;
        let mut claimed: Vec<OutboxRow> = Vec::with_capacity(rows.len());
        let mut parked = 0;
        for (r, (seq, key)) in rows.iter().zip(&candidates) {
            if let Some(from) = key.as_ref().and_then(|k| blocked.get(k))
                && seq > from
            {
                continue;
            }
            match raw_row(r)
                .map_err(|e| e.to_string())
                .and_then(RawRow::decode)
            {
                Ok(row) => claimed.push(row),
                Err(reason) => {
                    tracing::warn!(seq, %reason, "outbox row cannot be decoded; dead-lettering it");
                    self.move_to_dead_letters(
                        &mut tx,
                        *seq,
                        &format!("cannot decode outbox row: {reason}"),
                    )
                    .await?;
                    parked += 1;
                }
            }
        }
        if !claimed.is_empty() {
            let sql = format!(
                "UPDATE `{}` SET lease_owner = ?, lease_token = ?, \
                 lease_until = TIMESTAMPADD(MICROSECOND, ?, UTC_TIMESTAMP(6)) WHERE id IN ({})",
                self.sql.table,
                marks(claimed.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql))
                .bind(owner)
                .bind(handle.token)
                .bind(lease.as_micros() as i64);
            for row in &claimed {
                q = q.bind(row.seq);
            }
            q.execute(&mut *tx)
                .await
                .map_err(|e| db("leasing outbox rows", e))?;
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
        self.by_lease(
            &self.sql.complete,
            "marking outbox rows published",
            None,
            lease,
            seqs,
        )
        .await
    }

    async fn release(&self, lease: &Lease, seqs: &[i64], reason: &str) -> Result<u64> {
        let what = "releasing outbox rows";
        self.by_lease(&self.sql.release, what, Some(reason), lease, seqs)
            .await
    }

    async fn record_rejection(
        &self,
        lease: &Lease,
        seq: i64,
        reason: &str,
        max_attempts: u32,
        retry_after: Duration,
    ) -> Result<RejectionOutcome> {
        use sqlx::Connection;
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| db("recording a rejection", e))?;
        // READ COMMITTED, as for claims: the dead-letter move reads the dead-letter table (for a
        // reused id), and under REPEATABLE READ those reads take gap locks that make two relays
        // dead-lettering at once deadlock on the insert.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *conn)
            .await
            .map_err(|e| db("recording a rejection", e))?;
        let mut tx = conn
            .begin()
            .await
            .map_err(|e| db("recording a rejection", e))?;
        let touched = sqlx::query(AssertSqlSafe(self.sql.reject.as_str()))
            .bind(reason)
            .bind(retry_after.as_micros() as i64)
            .bind(seq)
            .bind(lease.token)
            .execute(&mut *tx)
            .await
            .map_err(|e| db("recording a rejection", e))?
            .rows_affected();
        let outcome = if touched == 0 {
            RejectionOutcome::LeaseLost
        } else {
            let attempts: i32 = sqlx::query_scalar(AssertSqlSafe(self.sql.attempts.as_str()))
                .bind(seq)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| db("recording a rejection", e))?;
            if i64::from(attempts) >= i64::from(max_attempts) {
                self.move_to_dead_letters(&mut tx, seq, reason).await?;
                RejectionOutcome::DeadLettered
            } else {
                RejectionOutcome::WillRetry
            }
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
                oldest: r.get::<Option<i64>, _>("oldest").map(from_micros),
                dead_letters: 0,
            })
            .collect();
        let dead = dead
            .iter()
            .map(|r| (r.get("destination"), r.get::<i64, _>("n") as u64));
        Ok(herald_core::store::with_dead_letters(out, dead))
    }

    async fn durability_warnings(&self) -> Result<Vec<String>> {
        let row = sqlx::query(
            "SELECT CAST(@@innodb_flush_log_at_trx_commit AS SIGNED), CAST(@@sync_binlog AS SIGNED), \
             CAST(@@log_bin AS SIGNED)",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|e| db("checking durability settings", e))?;
        let (flush, sync_binlog, log_bin): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let mut warnings = Vec::new();
        if flush != 1 {
            warnings.push(format!(
                "MySQL innodb_flush_log_at_trx_commit={flush}: a transaction the relay already published can vanish \
                 in a server crash (a phantom event). Set innodb_flush_log_at_trx_commit=1."
            ));
        }
        if log_bin == 1 && sync_binlog != 1 {
            warnings.push(format!(
                "MySQL sync_binlog={sync_binlog} with the binary log on: after a crash or a failover to a replica, \
                 a transaction the relay already published can be missing (a phantom event). Set sync_binlog=1."
            ));
        }
        Ok(warnings)
    }
}
