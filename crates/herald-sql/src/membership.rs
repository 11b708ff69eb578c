//! Relay heartbeats and partition ownership in `<table>_relays` and `<table>_partitions` (see
//! [`herald_core::membership`] for the protocol).
//!
//! A steady heartbeat is one single-row `UPDATE` (the renewal) and one read of the partitions.
//! Only a change (a relay joining, leaving or dying) takes the partitions' lock, in a short
//! transaction that re-reads them, marks dead owners taken over and assigns their partitions.

use std::collections::BTreeMap;

use herald_core::membership::{
    Heartbeat, Holdings, PartitionOwner, RelayInfo, RelayState, RelayStatus, Takeover, plan,
};
use herald_core::message::from_micros;
use herald_core::{Error, Identifier, Result};
use sqlx::Pool;

use crate::Dialect;
use crate::db::{SqlDb, Stmt, lossy_text};
use crate::error::db;
use crate::outbox::SqlOutbox;

type Conn<D> = <<D as Dialect>::DB as sqlx::Database>::Connection;

/// How long an ended relay's row is kept for `herald status` (microseconds).
const KEEP_ENDED_MICROS: i64 = 24 * 3600 * 1_000_000;

/// The membership statements of one outbox, rendered once.
pub(crate) struct MemberSql {
    relays: String,
    renew: String,
    join: String,
    forget: String,
    release: String,
    state: String,
    lock: String,
    mark: String,
    victim: String,
    assign: String,
    leave_parts: String,
    leave_relay: String,
    list: String,
    owners: String,
}

impl MemberSql {
    /// Checks that both tables exist (a relay cannot run on an outbox migrated before
    /// partitions existed) and renders the statements.
    pub(crate) async fn new<D: Dialect>(
        pool: &Pool<D::DB>,
        table: &Identifier,
    ) -> Result<MemberSql> {
        let relays_id = table.with_suffix("_relays")?;
        let parts_id = table.with_suffix("_partitions")?;
        for (t, cols) in [
            (
                &relays_id,
                &["incarnation", "relay_id", "expires_at", "taken_over_by"][..],
            ),
            (&parts_id, &["part", "owner", "since"][..]),
        ] {
            let mut conn = pool
                .acquire()
                .await
                .map_err(|e| db::<D>("reading the table's columns", e))?;
            let have = D::table_columns(&mut conn, t).await?;
            let missing = match &have {
                None => true,
                Some(have) => cols
                    .iter()
                    .any(|c| !have.iter().any(|h| h.eq_ignore_ascii_case(c))),
            };
            if missing {
                return Err(Error::Schema {
                    table: t.to_string(),
                    detail: "missing or incomplete: run `herald migrate` (relays now share the outbox by partitions)"
                        .to_owned(),
                });
            }
        }
        let r = D::quote(&relays_id);
        let p = D::quote(&parts_id);
        let now = D::now();
        let later = D::now_plus_micros("?");
        let live = |a: &str| {
            format!(
                "{a}.taken_over_by IS NULL AND {a}.stopped_at IS NULL AND {a}.expires_at >= {now}"
            )
        };
        let sm = |c: &str| D::select_micros(c);
        let x = |s: String| D::render(&s);
        Ok(MemberSql {
            renew: x(format!(
                "UPDATE {r} SET heartbeat_at = {now}, expires_at = {later} \
                 WHERE incarnation = ? AND taken_over_by IS NULL AND stopped_at IS NULL"
            )),
            join: x(format!(
                "INSERT INTO {r} (incarnation, relay_id, host, pid, started_at, heartbeat_at, expires_at) \
                 VALUES (?, ?, ?, ?, {now}, {now}, {later})"
            )),
            forget: x(format!(
                "DELETE FROM {r} WHERE expires_at < {later} \
                 AND incarnation NOT IN (SELECT q.owner FROM {p} q WHERE q.owner IS NOT NULL)"
            )),
            release: format!("UPDATE {p} SET owner = NULL, since = NULL WHERE owner = ? AND "),
            state: x(format!(
                "SELECT {part} AS part, p.owner AS owner, \
                 {alive} AS live, (SELECT COUNT(*) FROM {r} l WHERE {live_l}) AS live_relays \
                 FROM {p} p LEFT JOIN {r} r ON r.incarnation = p.owner ORDER BY p.part",
                part = D::cast_int("p.part"),
                alive = D::cast_int(&format!(
                    "CASE WHEN r.incarnation IS NOT NULL AND {} THEN 1 ELSE 0 END",
                    live("r")
                )),
                live_l = live("l"),
            )),
            lock: format!("SELECT part FROM {p}{}", D::FOR_UPDATE),
            mark: x(format!(
                "UPDATE {r} SET taken_over_by = ?, taken_over_at = {now} \
                 WHERE incarnation = ? AND taken_over_by IS NULL AND stopped_at IS NULL AND expires_at < {now}"
            )),
            victim: x(format!(
                "SELECT relay_id, {ended} AS ended FROM {r} WHERE incarnation = ?",
                ended = D::cast_int(
                    "CASE WHEN taken_over_by IS NOT NULL OR stopped_at IS NOT NULL THEN 1 ELSE 0 END"
                ),
            )),
            assign: format!("UPDATE {p} SET owner = ?, since = {now} WHERE "),
            leave_parts: x(format!(
                "UPDATE {p} SET owner = NULL, since = NULL WHERE owner = ?"
            )),
            leave_relay: x(format!(
                "UPDATE {r} SET stopped_at = {now}, expires_at = {now} WHERE incarnation = ?"
            )),
            list: x(format!(
                "SELECT r.incarnation AS incarnation, r.relay_id AS relay_id, r.host AS host, \
                 {pid} AS pid, {started} AS started_at, {beat} AS heartbeat_at, {stopped} AS stopped_at, \
                 {taken} AS taken_over_at, t.relay_id AS taken_by, {alive} AS live \
                 FROM {r} r LEFT JOIN {r} t ON t.incarnation = r.taken_over_by ORDER BY r.incarnation",
                pid = D::cast_int("r.pid"),
                started = sm("r.started_at"),
                beat = sm("r.heartbeat_at"),
                stopped = sm("r.stopped_at"),
                taken = sm("r.taken_over_at"),
                alive = D::cast_int(&format!("CASE WHEN {} THEN 1 ELSE 0 END", live("r"))),
            )),
            owners: x(format!(
                "SELECT {part} AS part, owner FROM {p} WHERE owner IS NOT NULL",
                part = D::cast_int("part"),
            )),
            relays: r,
        })
    }

    /// The condition that the incarnation bound at its `?` stands: the fence of every mark.
    pub(crate) fn fence(&self) -> String {
        format!(
            "EXISTS (SELECT 1 FROM {} r WHERE r.incarnation = ? AND r.taken_over_by IS NULL AND r.stopped_at IS NULL)",
            self.relays
        )
    }

    /// A select that returns a row if the incarnation bound at its `?` stands.
    pub(crate) fn fence_select(&self) -> String {
        format!(
            "SELECT incarnation FROM {} r WHERE r.incarnation = ? AND r.taken_over_by IS NULL AND r.stopped_at IS NULL",
            self.relays
        )
    }
}

fn micros(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Every partition with its owner, and the number of live relays.
async fn state<D: Dialect>(
    sql: &MemberSql,
    conn: &mut Conn<D>,
) -> Result<(Vec<PartitionOwner>, u32)> {
    let what = "reading partition owners";
    let rows = Stmt::<D::DB>::new(&sql.state)
        .fetch_all(conn)
        .await
        .map_err(|e| db::<D>(what, e))?;
    let mut parts = Vec::with_capacity(rows.len());
    let mut live = 0;
    for r in &rows {
        let get = |c: &str| <D::DB as SqlDb>::get_i64(r, c).map_err(|e| db::<D>(what, e));
        parts.push(PartitionOwner {
            partition: u32::try_from(get("part")?).unwrap_or(u32::MAX),
            owner: <D::DB as SqlDb>::get_opt_i64(r, "owner").map_err(|e| db::<D>(what, e))?,
            owner_live: get("live")? == 1,
        });
        live = u32::try_from(get("live_relays")?).unwrap_or(u32::MAX);
    }
    // Every relay must hash keys the same way: exactly the partitions 0..n-1.
    if parts.is_empty()
        || parts
            .iter()
            .enumerate()
            .any(|(i, p)| p.partition as usize != i)
    {
        return Err(Error::Schema {
            table: "partitions".to_owned(),
            detail: format!(
                "the partitions table must hold exactly the parts 0 to n-1 (it holds {} rows that are not); \
                 restore the rows migration 2 inserted (16 on PostgreSQL and MySQL, one on SQLite)",
                parts.len()
            ),
        });
    }
    Ok((parts, live))
}

pub(crate) async fn heartbeat<D: Dialect>(
    outbox: &SqlOutbox<D>,
    beat: &Heartbeat<'_>,
) -> Result<Holdings> {
    let sql = outbox.members();
    let what = "heart-beating";
    let me = beat.incarnation;
    let mut conn = outbox
        .pool()
        .acquire()
        .await
        .map_err(|e| db::<D>(what, e))?;
    let ttl = micros(beat.ttl);
    if beat.joining {
        Stmt::<D::DB>::new(&sql.forget)
            .int(-KEEP_ENDED_MICROS)
            .execute(&mut conn)
            .await
            .map_err(|e| db::<D>("forgetting relays that ended a day ago", e))?;
        let info = beat.relay;
        Stmt::<D::DB>::new(&sql.join)
            .int(me)
            .text(&info.relay_id)
            .text(&info.host)
            .int(i64::from(info.pid))
            .int(ttl)
            .execute(&mut conn)
            .await
            .map_err(|e| db::<D>("registering the relay", e))?;
    } else {
        let done = Stmt::<D::DB>::new(&sql.renew)
            .int(ttl)
            .int(me)
            .execute(&mut conn)
            .await
            .map_err(|e| db::<D>(what, e))?;
        if D::rows_affected(&done) == 0 {
            return Ok(Holdings::default());
        }
    }
    if !beat.release.is_empty() {
        let ids: Vec<i64> = beat.release.iter().map(|p| i64::from(*p)).collect();
        let stmt = D::render(&format!("{}{}", sql.release, D::id_in("part", ids.len())));
        D::bind_ids(Stmt::<D::DB>::new(&stmt).int(me), &ids)
            .execute(&mut conn)
            .await
            .map_err(|e| db::<D>("releasing partitions", e))?;
    }
    let (mut parts, mut live) = state::<D>(sql, &mut conn).await?;
    let mut took_over = Vec::new();
    if !plan(me, &parts, live).acquire.is_empty() {
        // The renewal stands even if taking partitions fails (a lock held by a relay paused
        // inside its own takeover): report what is held, try again next time.
        match take::<D>(sql, &mut conn, me, beat.ttl, &mut took_over).await {
            Ok(()) => {}
            Err(e) => tracing::warn!(
                error = %e.chain(),
                "could not take partitions this heartbeat; trying again at the next"
            ),
        }
        (parts, live) = state::<D>(sql, &mut conn).await?;
    }
    let p = plan(me, &parts, live);
    Ok(Holdings {
        alive: true,
        partitions: parts.len() as u32,
        held: parts
            .iter()
            .filter(|p| p.owner == Some(me))
            .map(|p| p.partition)
            .collect(),
        surplus: p.surplus,
        live_relays: live,
        took_over,
    })
}

/// Takes free partitions and those of silent relays, up to the fair share, in one locked
/// transaction.
async fn take<D: Dialect>(
    sql: &MemberSql,
    conn: &mut Conn<D>,
    me: i64,
    ttl: std::time::Duration,
    took_over: &mut Vec<Takeover>,
) -> Result<()> {
    {
        let what = "taking partitions";
        let mut tx = SqlOutbox::<D>::begin_locking(conn, what).await?;
        let wait_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(50);
        if let Some(bound) = D::bound_waits(wait_ms) {
            Stmt::<D::DB>::new(&bound)
                .execute(&mut tx)
                .await
                .map_err(|e| db::<D>("bounding lock waits", e))?;
        }
        Stmt::<D::DB>::new(&sql.lock)
            .fetch_all(&mut tx)
            .await
            .map_err(|e| db::<D>("locking the partitions", e))?;
        let (now_parts, now_live) = state::<D>(sql, &mut tx).await?;
        let mut by_owner: BTreeMap<Option<i64>, Vec<u32>> = BTreeMap::new();
        for (part, owner) in plan(me, &now_parts, now_live).acquire {
            by_owner.entry(owner).or_default().push(part);
        }
        for (owner, wanted) in by_owner {
            if let Some(victim) = owner {
                // The decisive step: either this marks the silent relay taken over (and its
                // renewals fail from now on), or its renewal came first and it keeps them.
                Stmt::<D::DB>::new(&sql.mark)
                    .int(me)
                    .int(victim)
                    .execute(&mut tx)
                    .await
                    .map_err(|e| db::<D>("marking a silent relay taken over", e))?;
                let row = Stmt::<D::DB>::new(&sql.victim)
                    .int(victim)
                    .fetch_optional(&mut tx)
                    .await
                    .map_err(|e| db::<D>(what, e))?;
                let from = match &row {
                    None => String::new(),
                    Some(r) => {
                        if <D::DB as SqlDb>::get_i64(r, "ended").map_err(|e| db::<D>(what, e))? != 1
                        {
                            continue;
                        }
                        lossy_text::<D::DB>(r, "relay_id")
                    }
                };
                took_over.push(Takeover {
                    from,
                    incarnation: victim,
                    partitions: wanted.clone(),
                });
            }
            let ids: Vec<i64> = wanted.iter().map(|p| i64::from(*p)).collect();
            let stmt = D::render(&format!("{}{}", sql.assign, D::id_in("part", ids.len())));
            D::bind_ids(Stmt::<D::DB>::new(&stmt).int(me), &ids)
                .execute(&mut tx)
                .await
                .map_err(|e| db::<D>(what, e))?;
        }
        tx.commit().await.map_err(|e| db::<D>(what, e))?;
    }
    Ok(())
}

pub(crate) async fn leave<D: Dialect>(outbox: &SqlOutbox<D>, incarnation: i64) -> Result<()> {
    let sql = outbox.members();
    let what = "releasing the relay's partitions";
    let mut conn = outbox
        .pool()
        .acquire()
        .await
        .map_err(|e| db::<D>(what, e))?;
    let mut tx = SqlOutbox::<D>::begin(&mut conn, what).await?;
    for stmt in [&sql.leave_parts, &sql.leave_relay] {
        Stmt::<D::DB>::new(stmt)
            .int(incarnation)
            .execute(&mut tx)
            .await
            .map_err(|e| db::<D>(what, e))?;
    }
    tx.commit().await.map_err(|e| db::<D>(what, e))
}

pub(crate) async fn relays<D: Dialect>(outbox: &SqlOutbox<D>) -> Result<Vec<RelayStatus>> {
    let sql = outbox.members();
    let what = "reading the relays";
    let mut conn = outbox
        .pool()
        .acquire()
        .await
        .map_err(|e| db::<D>(what, e))?;
    let mut held: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
    for r in Stmt::<D::DB>::new(&sql.owners)
        .fetch_all(&mut conn)
        .await
        .map_err(|e| db::<D>(what, e))?
    {
        let part = <D::DB as SqlDb>::get_i64(&r, "part").map_err(|e| db::<D>(what, e))?;
        if let Some(owner) =
            <D::DB as SqlDb>::get_opt_i64(&r, "owner").map_err(|e| db::<D>(what, e))?
        {
            held.entry(owner).or_default().push(part as u32);
        }
    }
    let rows = Stmt::<D::DB>::new(&sql.list)
        .fetch_all(&mut conn)
        .await
        .map_err(|e| db::<D>(what, e))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let int = |c: &str| <D::DB as SqlDb>::get_i64(r, c).map_err(|e| db::<D>(what, e));
        let time = |c: &str| D::read_micros(r, c).ok().flatten().map(from_micros);
        let incarnation = int("incarnation")?;
        let state = if int("live")? == 1 {
            RelayState::Live
        } else if let Some(at) = time("stopped_at") {
            RelayState::Stopped { at: Some(at) }
        } else if let Some(at) = time("taken_over_at") {
            RelayState::TakenOver {
                by: lossy_text::<D::DB>(r, "taken_by"),
                at: Some(at),
            }
        } else {
            RelayState::Silent
        };
        out.push(RelayStatus {
            relay: RelayInfo {
                relay_id: lossy_text::<D::DB>(r, "relay_id"),
                host: lossy_text::<D::DB>(r, "host"),
                pid: u32::try_from(int("pid")?).unwrap_or(0),
            },
            incarnation,
            started_at: time("started_at"),
            heartbeat_at: time("heartbeat_at"),
            state,
            partitions: {
                let mut p = held.remove(&incarnation).unwrap_or_default();
                p.sort_unstable();
                p
            },
        });
    }
    out.sort_by_key(|s| s.started_at);
    Ok(out)
}
