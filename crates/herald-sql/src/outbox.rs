//! The relay's side of the outbox: reads of held partitions, fenced marks, rejections, dead
//! letters and statistics. The heartbeats are in `membership.rs`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::membership::{Heartbeat, Holdings, RelayStatus};
use herald_core::message::from_micros;
use herald_core::store::{OUTBOX_COLUMNS, RawRow, with_dead_letters};
use herald_core::{
    Claim, DestinationStats, Error, Identifier, Lease, OutboxRow, OutboxStore, RejectionOutcome,
    Result,
};
use sqlx::{Connection, Pool};

use crate::Dialect;
use crate::db::{SqlDb, Stmt, lossy_text};
use crate::error::{db, dead_letter_error};
use crate::membership::MemberSql;

type Conn<D> = <<D as Dialect>::DB as sqlx::Database>::Connection;
type DbRow<D> = <<D as Dialect>::DB as sqlx::Database>::Row;

/// An outbox row that cannot be decoded: its id and the reason.
pub type Undecodable = (i64, String);

/// The outbox of a database, as the relay sees it: heartbeats, reads, marks, releases,
/// rejections, dead letters and statistics.
pub struct SqlOutbox<D: Dialect> {
    pool: Pool<D::DB>,
    sql: Arc<Sql>,
}

impl<D: Dialect> Clone for SqlOutbox<D> {
    fn clone(&self) -> Self {
        SqlOutbox {
            pool: self.pool.clone(),
            sql: self.sql.clone(),
        }
    }
}

struct Sql {
    table: Identifier,
    quoted: String,
    columns: String,
    /// The read, up to where a partition condition may follow.
    read_head: String,
    read_tail: String,
    members: MemberSql,
    /// Locks the incarnation's row against a takeover, or finds it taken over.
    fence_check: String,
    release_head: String,
    complete_head: String,
    reject: String,
    attempts: String,
    dead_letter: String,
    delete_one: String,
    stats: String,
    dead_stats: String,
}

impl<D: Dialect> SqlOutbox<D> {
    /// The outbox in `table`. Checks that the table and its dead-letter table exist with the
    /// documented columns, so a typo fails at start-up rather than at the first claim.
    pub async fn new(pool: Pool<D::DB>, table: Identifier) -> Result<SqlOutbox<D>> {
        let dead_id = table.with_suffix("_dead_letter")?;
        check_columns::<D>(&pool, &table, &OUTBOX_COLUMNS).await?;
        check_columns::<D>(&pool, &dead_id, &["id", "reason", "payload"]).await?;
        let members = MemberSql::new::<D>(&pool, &table).await?;
        let t = D::quote(&table);
        let dead = D::quote(&dead_id);
        let fence = members.fence();
        let r = |s: String| D::render(&s);
        // Nothing in a claim may fail for one row: every column is read as text, bytes or an
        // integer and decoded in Rust, row by row (`RawRow::decode`), so one odd row becomes
        // that row's dead-letter reason, not an error of the whole claim.
        let columns = format!(
            "id, {message_id} AS message_id, kind, message_type, source, destination, ordering_key, \
             {headers} AS headers, content_type, {payload} AS payload, {created} AS created_at, attempts",
            message_id = D::select_text("message_id"),
            headers = D::select_text("headers"),
            payload = D::select_bytes("payload"),
            created = D::select_micros("created_at"),
        );
        // Rows waiting out a retry delay (`lease_until` ahead, within the cap) are skipped, and so
        // is every row of their key; a `lease_until` beyond the cap was not written by a relay.
        let now = D::now();
        let cap = D::now_plus_micros("?");
        let read_head = format!(
            "SELECT {columns} FROM {t} o \
             WHERE (o.lease_until IS NULL OR o.lease_until < {now} OR o.lease_until > {cap}) \
               AND (o.ordering_key IS NULL OR o.ordering_key NOT IN (SELECT e.ordering_key FROM {t} e \
                    WHERE e.lease_until >= {now} AND e.lease_until <= {cap} AND e.ordering_key IS NOT NULL))"
        );
        let sql = Sql {
            read_head,
            read_tail: " ORDER BY o.id LIMIT ?".to_owned(),
            columns,
            fence_check: r(members.fence_select()),
            complete_head: D::complete_head(&t, &fence),
            release_head: D::release_head(&t, &fence),
            reject: r(format!(
                "UPDATE {t} SET attempts = attempts + 1, last_error = ?, lease_until = {until} WHERE id = ? AND {fence}",
                until = D::now_plus_micros("?"),
            )),
            attempts: r(format!("SELECT attempts FROM {t} WHERE id = ?")),
            // A dead letter keeps its outbox id, unless a producer wrote the id column itself
            // and reused one an earlier dead letter has: then it takes the next free id, so the
            // move cannot fail (and stop the relay) on that row.
            dead_letter: r(format!(
                "INSERT INTO {dead} (id, message_id, kind, message_type, source, destination, ordering_key, \
                 headers, content_type, payload, created_at, attempts, reason) \
                 SELECT CASE WHEN EXISTS (SELECT 1 FROM {dead} d WHERE d.id = o.id) \
                 THEN (SELECT {next} + 1 FROM {dead} d) ELSE o.id END, \
                 o.message_id, o.kind, o.message_type, o.source, o.destination, o.ordering_key, o.headers, \
                 o.content_type, o.payload, o.created_at, o.attempts, ? FROM {t} o WHERE o.id = ?",
                next = D::greatest("MAX(d.id)", "o.id"),
            )),
            delete_one: r(format!("DELETE FROM {t} WHERE id = ?")),
            // Destinations are read whatever their type, times only where they fit, so one odd
            // row cannot make `herald status` fail.
            stats: r(format!(
                "SELECT {dest} AS destination, COUNT(*) AS n, {oldest} AS oldest FROM {t} GROUP BY {dest}",
                dest = D::group_text("destination"),
                oldest = D::min_micros("created_at"),
            )),
            dead_stats: r(format!(
                "SELECT {dest} AS destination, COUNT(*) AS n FROM {dead} GROUP BY {dest}",
                dest = D::group_text("destination"),
            )),
            quoted: t,
            table,
            members,
        };
        Ok(SqlOutbox {
            pool,
            sql: Arc::new(sql),
        })
    }

    /// The pool this outbox uses.
    pub fn pool(&self) -> &Pool<D::DB> {
        &self.pool
    }

    /// The outbox table.
    pub fn table(&self) -> &Identifier {
        &self.sql.table
    }

    /// The outbox table, quoted for this database.
    pub fn quoted_table(&self) -> &str {
        &self.sql.quoted
    }

    /// The select list of a read, for [`decode_rows`](Self::decode_rows).
    pub fn claim_columns(&self) -> &str {
        &self.sql.columns
    }

    /// Decodes rows selected with [`claim_columns`](Self::claim_columns): the rows, and the
    /// id and reason of each that cannot be decoded (for the dead letters).
    pub fn decode_rows(rows: &[DbRow<D>]) -> Result<(Vec<OutboxRow>, Vec<Undecodable>)> {
        let mut good = Vec::with_capacity(rows.len());
        let mut bad = Vec::new();
        for r in rows {
            let seq = <D::DB as SqlDb>::get_i64(r, "id")
                .map_err(|e| db::<D>("reading an outbox row's id", e))?;
            let row = D::read_micros(r, "created_at")
                .and_then(|t| t.ok_or_else(|| "created_at is NULL".to_owned()))
                .and_then(|t| raw_row::<D>(r, t))
                .and_then(RawRow::decode);
            match row {
                Ok(row) => good.push(row),
                Err(reason) => bad.push((seq, reason)),
            }
        }
        good.sort_by_key(|r| r.seq);
        Ok((good, bad))
    }

    /// Whether incarnation `token` still stands (not taken over, not stopped). It takes no lock:
    /// a relay paused inside a transaction must not hold up another relay's takeover.
    pub async fn still_holds(&self, conn: &mut Conn<D>, token: i64) -> Result<bool> {
        let row = Stmt::<D::DB>::new(&self.sql.fence_check)
            .int(token)
            .fetch_optional(conn)
            .await
            .map_err(|e| db::<D>("checking this relay was not taken over", e))?;
        Ok(row.is_some())
    }

    pub(crate) fn members(&self) -> &MemberSql {
        &self.sql.members
    }

    /// Moves row `seq` to the dead letters with `reason`, in the caller's transaction.
    pub async fn move_to_dead_letters(
        &self,
        conn: &mut Conn<D>,
        seq: i64,
        reason: &str,
    ) -> Result<()> {
        Stmt::<D::DB>::new(&self.sql.dead_letter)
            .text(reason)
            .int(seq)
            .execute(&mut *conn)
            .await
            .map_err(dead_letter_error::<D>)?;
        Stmt::<D::DB>::new(&self.sql.delete_one)
            .int(seq)
            .execute(conn)
            .await
            .map_err(dead_letter_error::<D>)?;
        Ok(())
    }

    /// Runs `head` (ending in `WHERE lease_token = ?`) for `seqs`; `set`, if any, is bound
    /// before the token (the value the statement's `SET` takes).
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
        let sql = D::render(&format!("{head} AND {}", D::id_in("id", seqs.len())));
        let mut stmt = Stmt::<D::DB>::new(&sql);
        if let Some(value) = set {
            stmt = stmt.text(value);
        }
        stmt = D::bind_ids(stmt.int(lease.token), seqs);
        let mut conn = self.pool.acquire().await.map_err(|e| db::<D>(what, e))?;
        let done = stmt
            .execute(&mut conn)
            .await
            .map_err(|e| db::<D>(what, e))?;
        Ok(D::rows_affected(&done))
    }

    /// Begins one of the relay's write transactions on `conn` (after the dialect's
    /// [`BEFORE_WRITE_TX`](Dialect::BEFORE_WRITE_TX), if any).
    pub async fn begin<'c>(
        conn: &'c mut Conn<D>,
        what: &str,
    ) -> Result<sqlx::Transaction<'c, D::DB>> {
        if let Some(before) = D::BEFORE_WRITE_TX {
            Stmt::<D::DB>::new(before)
                .execute(&mut *conn)
                .await
                .map_err(|e| db::<D>(what, e))?;
        }
        conn.begin().await.map_err(|e| db::<D>(what, e))
    }

    /// Begins a transaction that reads, then writes what it read
    /// ([`LOCKING_BEGIN`](Dialect::LOCKING_BEGIN) where the database needs it).
    pub async fn begin_locking<'c>(
        conn: &'c mut Conn<D>,
        what: &str,
    ) -> Result<sqlx::Transaction<'c, D::DB>> {
        match D::LOCKING_BEGIN {
            Some(begin) => conn.begin_with(begin).await.map_err(|e| db::<D>(what, e)),
            None => Self::begin(conn, what).await,
        }
    }

    /// The read of [`OutboxStore::claim`] for `lease`'s partitions.
    fn read_sql(&self, lease: &Lease, excluded: usize) -> Option<String> {
        let skip = if excluded == 0 {
            String::new()
        } else {
            format!(" AND NOT ({})", D::id_in("o.id", excluded))
        };
        let parts = match &lease.partitions {
            None => String::new(),
            Some(p) => {
                // A dialect without a hash has one partition, which is then always "all".
                let of = D::partition_of(lease.of)?;
                let list: Vec<String> = p.iter().map(u32::to_string).collect();
                format!(" AND {of} IN ({})", list.join(", "))
            }
        };
        Some(D::render(&format!(
            "{}{skip}{parts}{}",
            self.sql.read_head, self.sql.read_tail
        )))
    }
}

/// Reads a row selected with the outbox's columns; a value of the wrong type is the row's
/// reason. `created_at_micros` is the row's time, read by the caller (it decides what a `NULL`
/// means).
pub(crate) fn raw_row<D: Dialect>(
    r: &DbRow<D>,
    created_at_micros: i64,
) -> std::result::Result<RawRow, String> {
    let e = |e: sqlx::Error| e.to_string();
    type S<D> = <D as Dialect>::DB;
    Ok(RawRow {
        seq: <S<D> as SqlDb>::get_i64(r, "id").map_err(e)?,
        message_id: <S<D> as SqlDb>::get_text(r, "message_id").map_err(e)?,
        kind: <S<D> as SqlDb>::get_text(r, "kind").map_err(e)?,
        message_type: <S<D> as SqlDb>::get_text(r, "message_type").map_err(e)?,
        source: <S<D> as SqlDb>::get_text(r, "source").map_err(e)?,
        destination: <S<D> as SqlDb>::get_text(r, "destination").map_err(e)?,
        ordering_key: <S<D> as SqlDb>::get_opt_text(r, "ordering_key").map_err(e)?,
        headers: <S<D> as SqlDb>::get_text(r, "headers").map_err(e)?,
        content_type: <S<D> as SqlDb>::get_text(r, "content_type").map_err(e)?,
        payload: <S<D> as SqlDb>::get_bytes(r, "payload").map_err(e)?,
        created_at_micros,
        attempts: <S<D> as SqlDb>::get_i32(r, "attempts").map_err(e)?,
    })
}

/// Checks that `table` exists with `columns`.
async fn check_columns<D: Dialect>(
    pool: &Pool<D::DB>,
    table: &Identifier,
    columns: &[&str],
) -> Result<()> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| db::<D>("reading the table's columns", e))?;
    let Some(have) = D::table_columns(&mut conn, table).await? else {
        return Err(Error::Schema {
            table: table.to_string(),
            detail: "no such table in the connection's current schema or database".to_owned(),
        });
    };
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

#[async_trait]
impl<D: Dialect> OutboxStore for SqlOutbox<D> {
    async fn heartbeat(&self, beat: &Heartbeat<'_>) -> Result<Holdings> {
        crate::membership::heartbeat(self, beat).await
    }

    async fn leave(&self, incarnation: i64) -> Result<()> {
        crate::membership::leave(self, incarnation).await
    }

    async fn relays(&self) -> Result<Vec<RelayStatus>> {
        crate::membership::relays(self).await
    }

    async fn claim(
        &self,
        lease: &Lease,
        max: usize,
        hold_cap: Duration,
        exclude: &[i64],
    ) -> Result<Claim> {
        let what = "reading outbox rows";
        if lease.partitions.as_ref().is_some_and(Vec::is_empty) {
            return Ok(Claim::default());
        }
        let Some(sql) = self.read_sql(lease, exclude.len()) else {
            return Err(Error::config(format!(
                "{} has one partition, but the relay asked for some of several",
                D::NAME
            )));
        };
        let cap = i64::try_from(hold_cap.as_micros()).unwrap_or(i64::MAX);
        let mut conn = self.pool.acquire().await.map_err(|e| db::<D>(what, e))?;
        let mut stmt = Stmt::<D::DB>::new(&sql).int(cap).int(cap);
        if !exclude.is_empty() {
            stmt = D::bind_ids(stmt, exclude);
        }
        let rows = stmt
            .int(i64::try_from(max).unwrap_or(i64::MAX))
            .fetch_all(&mut conn)
            .await
            .map_err(|e| db::<D>(what, e))?;
        // Decoding needs no transaction unless a row must be parked.
        let (good, bad) = Self::decode_rows(&rows)?;
        let mut parked = 0;
        if !bad.is_empty() {
            let what = "dead-lettering undecodable outbox rows";
            let mut tx = Self::begin(&mut conn, what).await?;
            if self.still_holds(&mut tx, lease.token).await? {
                for (seq, reason) in &bad {
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
            tx.commit().await.map_err(|e| db::<D>(what, e))?;
        }
        Ok(Claim { rows: good, parked })
    }

    async fn complete(&self, lease: &Lease, seqs: &[i64]) -> Result<u64> {
        let what = "marking outbox rows published";
        self.by_lease(&self.sql.complete_head, what, None, lease, seqs)
            .await
    }

    async fn release(&self, lease: &Lease, seqs: &[i64], reason: &str) -> Result<u64> {
        let what = "releasing outbox rows";
        self.by_lease(&self.sql.release_head, what, Some(reason), lease, seqs)
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
        let what = "recording a rejection";
        let mut conn = self.pool.acquire().await.map_err(|e| db::<D>(what, e))?;
        let mut tx = Self::begin(&mut conn, what).await?;
        let delay = i64::try_from(retry_after.as_micros()).unwrap_or(i64::MAX);
        let touched = Stmt::<D::DB>::new(&self.sql.reject)
            .text(reason)
            .int(delay)
            .int(seq)
            .int(lease.token)
            .execute(&mut tx)
            .await
            .map_err(|e| db::<D>(what, e))?;
        let outcome = if D::rows_affected(&touched) == 0 {
            RejectionOutcome::LeaseLost
        } else {
            let row = Stmt::<D::DB>::new(&self.sql.attempts)
                .int(seq)
                .fetch_optional(&mut tx)
                .await
                .map_err(|e| db::<D>(what, e))?;
            let attempts = match row {
                Some(r) => {
                    <D::DB as SqlDb>::get_i32(&r, "attempts").map_err(|e| db::<D>(what, e))?
                }
                None => 0,
            };
            if i64::from(attempts) >= i64::from(max_attempts) {
                self.move_to_dead_letters(&mut tx, seq, reason).await?;
                RejectionOutcome::DeadLettered
            } else {
                RejectionOutcome::WillRetry
            }
        };
        tx.commit().await.map_err(|e| db::<D>(what, e))?;
        Ok(outcome)
    }

    async fn stats(&self) -> Result<Vec<DestinationStats>> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| db::<D>("reading outbox depth", e))?;
        let pending = Stmt::<D::DB>::new(&self.sql.stats)
            .fetch_all(&mut conn)
            .await
            .map_err(|e| db::<D>("reading outbox depth", e))?;
        let dead = Stmt::<D::DB>::new(&self.sql.dead_stats)
            .fetch_all(&mut conn)
            .await
            .map_err(|e| db::<D>("reading dead letters", e))?;
        let count = |r: &DbRow<D>| {
            <D::DB as SqlDb>::get_i64(r, "n")
                .map(|n| n.max(0) as u64)
                .map_err(|e| db::<D>("reading outbox depth", e))
        };
        let mut out = Vec::with_capacity(pending.len());
        for r in &pending {
            out.push(DestinationStats {
                destination: lossy_text::<D::DB>(r, "destination"),
                pending: count(r)?,
                oldest: D::read_micros(r, "oldest").ok().flatten().map(from_micros),
                dead_letters: 0,
            });
        }
        let mut dead_counts = Vec::with_capacity(dead.len());
        for r in &dead {
            dead_counts.push((lossy_text::<D::DB>(r, "destination"), count(r)?));
        }
        Ok(with_dead_letters(out, dead_counts))
    }

    async fn durability_warnings(&self) -> Result<Vec<String>> {
        D::durability_warnings(self).await
    }
}
