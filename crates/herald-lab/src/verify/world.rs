//! The workload's database side: aggregates versioned under their row lock, a ground-truth ledger
//! written in the same transaction as the message, and the consumer's effects table. The same
//! SQL runs on PostgreSQL and SQLite (`$n` placeholders work on both).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use herald::{Identifier, Message};
use sqlx::AssertSqlSafe;

use herald::connect::Database;

/// Runs `$body` with `$pool` bound to whichever pool `$db` holds.
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Database::Postgres($pool) => $body,
            Database::Sqlite($pool) => $body,
            Database::MySql($pool) => $body,
        }
    };
}

/// Table names of one mode's run.
#[derive(Clone)]
pub struct Tables {
    /// Prefix of the workload's own tables.
    pub prefix: String,
    /// The outbox (also the fallback storage in fallback mode).
    pub outbox: Identifier,
}

impl Tables {
    pub fn new(prefix: &str) -> Result<Tables> {
        Ok(Tables {
            prefix: prefix.to_owned(),
            outbox: Identifier::new(&format!("{prefix}_outbox"))?,
        })
    }

    fn aggregates(&self) -> String {
        format!("{}_aggregates", self.prefix)
    }
    fn ledger(&self) -> String {
        format!("{}_ledger", self.prefix)
    }
    fn effects(&self) -> String {
        format!("{}_effects", self.prefix)
    }
}

/// The message's key and version, read back from its payload.
pub fn key_seq(m: &Message) -> (String, u64) {
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
    (
        v["agg"].as_str().unwrap_or_default().to_owned(),
        v["version"].as_u64().unwrap_or(0),
    )
}

/// The event announcing that aggregate `agg` reached `version`.
pub fn event(topic: &str, agg: &str, version: i64) -> Message {
    let payload = serde_json::json!({ "agg": agg, "version": version });
    Message::raw_event(topic, "AggregateBumped", payload.to_string().into_bytes())
        .with_key(agg)
        .with_source("/herald/verify")
}

/// Creates herald's tables and the workload's, and the `keys` aggregates.
pub async fn setup(db: &Database, t: &Tables, keys: usize) -> Result<()> {
    herald::connect::migrate(db, &t.outbox).await?;
    let serial = match db {
        Database::Postgres(_) => "BIGSERIAL PRIMARY KEY",
        Database::Sqlite(_) => "INTEGER PRIMARY KEY AUTOINCREMENT",
        Database::MySql(_) => unreachable!("verify refuses MySQL at start-up"),
    };
    let ddl = [
        format!(
            "CREATE TABLE {} (id TEXT PRIMARY KEY, version BIGINT NOT NULL)",
            t.aggregates()
        ),
        format!(
            "CREATE TABLE {} (message_id TEXT PRIMARY KEY, agg TEXT NOT NULL, version BIGINT NOT NULL)",
            t.ledger()
        ),
        format!(
            "CREATE TABLE {} (seq {serial}, message_id TEXT NOT NULL, agg TEXT NOT NULL, version BIGINT NOT NULL)",
            t.effects()
        ),
    ];
    for sql in ddl {
        on_pool!(db, p => { sqlx::query(AssertSqlSafe(sql)).execute(p).await?; });
    }
    let insert = format!(
        "INSERT INTO {} (id, version) VALUES ($1, 0)",
        t.aggregates()
    );
    for k in 0..keys {
        on_pool!(db, p => { sqlx::query(AssertSqlSafe(insert.as_str())).bind(agg_name(k)).execute(p).await?; });
    }
    Ok(())
}

/// Drops everything `setup` created (PostgreSQL; the SQLite file goes with its directory).
pub async fn teardown(db: &Database, t: &Tables) {
    if let Database::Postgres(p) = db {
        let o = &t.outbox;
        for table in [
            t.aggregates(),
            t.ledger(),
            t.effects(),
            format!("{o}"),
            format!("{o}_dead_letter"),
            format!("{o}_inbox"),
            format!("{o}_inbox_version"),
            format!("{o}_consumer_dead_letter"),
            format!("{o}_migrations"),
        ] {
            let _ = sqlx::query(AssertSqlSafe(format!(
                "DROP TABLE IF EXISTS {table} CASCADE"
            )))
            .execute(p)
            .await;
        }
    }
}

/// The name of aggregate `k`.
pub fn agg_name(k: usize) -> String {
    format!("agg-{k:03}")
}

/// What one business transaction is asked to do.
#[derive(Clone, Copy)]
pub struct Plan {
    /// Keep the transaction open this long before deciding (commits land out of id order).
    pub hold: Option<Duration>,
    /// Roll back instead of committing.
    pub rollback: bool,
}

/// Where the producer's transaction got to.
pub enum Step {
    /// Failed before a version was assigned: no message exists.
    NoMessage,
    /// The message exists with this version; the transaction's outcome follows.
    Done(Box<Message>, i64, herald_testkit::Outcome),
}

/// What the transaction does with its message besides the ledger row.
#[derive(Clone, Copy)]
pub enum Carry<'a> {
    /// Writes it into the outbox (herald's way).
    Outbox,
    /// Publishes it before committing (publish-then-save).
    PublishFirst(&'a InTx),
    /// Nothing: it is published after the commit, if at all.
    Nothing,
}

/// What publish-then-save runs inside the transaction, after the message is built: it answers
/// whether to go on (true) or roll back (false).
pub type InTx = Arc<
    dyn Fn(Message) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
        + Send
        + Sync,
>;

/// One business transaction: bump the aggregate under its row lock, write the ledger row, and
/// (outbox mode) the outbox row, or run `in_tx` (publish-then-save) before deciding.
pub async fn transact(
    db: &Database,
    t: &Tables,
    topic: &str,
    agg: &str,
    carry: Carry<'_>,
    plan: Plan,
    crashed: &std::sync::atomic::AtomicBool,
) -> Step {
    use herald_testkit::Outcome;
    let bump = format!(
        "UPDATE {} SET version = version + 1 WHERE id = $1 RETURNING version",
        t.aggregates()
    );
    let ledger = format!(
        "INSERT INTO {} (message_id, agg, version) VALUES ($1, $2, $3)",
        t.ledger()
    );
    macro_rules! body {
        ($pool:expr, $writer:expr) => {{
            let Ok(mut tx) = $pool.begin().await else {
                return Step::NoMessage;
            };
            let version: i64 = match sqlx::query_scalar(AssertSqlSafe(bump.as_str()))
                .bind(agg)
                .fetch_one(&mut *tx)
                .await
            {
                Ok(v) => v,
                Err(_) => return Step::NoMessage,
            };
            let msg = event(topic, agg, version);
            let rolled_back = |m: Message| Step::Done(Box::new(m), version, Outcome::RolledBack);
            if sqlx::query(AssertSqlSafe(ledger.as_str()))
                .bind(msg.id.to_string())
                .bind(agg)
                .bind(version)
                .execute(&mut *tx)
                .await
                .is_err()
            {
                return rolled_back(msg);
            }
            match carry {
                Carry::Outbox => {
                    if $writer.enqueue(&mut tx, &msg).await.is_err() {
                        return rolled_back(msg);
                    }
                }
                Carry::PublishFirst(publish) => {
                    if !publish(msg.clone()).await {
                        let _ = tx.rollback().await;
                        return rolled_back(msg);
                    }
                }
                Carry::Nothing => {}
            }
            if let Some(hold) = plan.hold {
                tokio::time::sleep(hold).await;
            }
            // A crash between publish and commit (publish-then-save) leaves the transaction
            // to be rolled back by the server.
            let died = matches!(carry, Carry::PublishFirst(_))
                && crashed.load(std::sync::atomic::Ordering::SeqCst);
            if plan.rollback || died {
                let _ = tx.rollback().await;
                return rolled_back(msg);
            }
            match tx.commit().await {
                Ok(()) => Step::Done(Box::new(msg), version, Outcome::Committed),
                // The commit was sent; whether it landed is for the ledger to say.
                Err(_) => Step::Done(Box::new(msg), version, Outcome::Unknown),
            }
        }};
    }
    match db {
        Database::Postgres(p) => body!(p, herald::postgres::PgOutboxWriter::new(&t.outbox)),
        Database::Sqlite(p) => body!(p, herald::sqlite::SqliteOutboxWriter::new(&t.outbox)),
        Database::MySql(_) => unreachable!("verify refuses MySQL at start-up"),
    }
}

/// Message ids in the ledger: what committed.
pub async fn ledger_ids(db: &Database, t: &Tables) -> Result<HashSet<uuid::Uuid>> {
    let sql = format!("SELECT message_id FROM {}", t.ledger());
    let ids: Vec<String> =
        on_pool!(db, p => sqlx::query_scalar(AssertSqlSafe(sql)).fetch_all(p).await?);
    Ok(ids.iter().filter_map(|s| s.parse().ok()).collect())
}

/// Committed messages neither applied nor dead-lettered yet.
pub async fn pending(db: &Database, t: &Tables) -> Result<i64> {
    let o = &t.outbox;
    let sql = format!(
        "SELECT COUNT(*) FROM {l} l WHERE NOT EXISTS (SELECT 1 FROM {e} e WHERE e.message_id = l.message_id) \
         AND NOT EXISTS (SELECT 1 FROM {o}_dead_letter d WHERE CAST(d.message_id AS TEXT) = l.message_id) \
         AND NOT EXISTS (SELECT 1 FROM {o}_consumer_dead_letter c WHERE CAST(c.message_id AS TEXT) = l.message_id)",
        l = t.ledger(),
        e = t.effects()
    );
    Ok(on_pool!(db, p => sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(p).await?))
}

/// Rows still in the outbox (or the fallback storage).
pub async fn outbox_depth(db: &Database, t: &Tables) -> Result<i64> {
    let sql = format!("SELECT COUNT(*) FROM {}", t.outbox);
    Ok(on_pool!(db, p => sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(p).await?))
}

/// Applied effects in the order they were committed: (message id, aggregate, version).
pub async fn effects(db: &Database, t: &Tables) -> Result<Vec<(uuid::Uuid, String, u64)>> {
    let sql = format!(
        "SELECT message_id, agg, version FROM {} ORDER BY seq",
        t.effects()
    );
    let rows: Vec<(String, String, i64)> =
        on_pool!(db, p => sqlx::query_as(AssertSqlSafe(sql)).fetch_all(p).await?);
    Ok(rows
        .into_iter()
        .filter_map(|(id, a, v)| Some((id.parse().ok()?, a, v as u64)))
        .collect())
}

/// Dead letters on both sides, with their reasons.
pub async fn dead_letters(db: &Database, t: &Tables) -> Result<Vec<(uuid::Uuid, String)>> {
    let o = &t.outbox;
    let sql = format!(
        "SELECT CAST(message_id AS TEXT), reason FROM {o}_dead_letter \
         UNION ALL SELECT CAST(message_id AS TEXT), reason FROM {o}_consumer_dead_letter WHERE message_id IS NOT NULL"
    );
    let rows: Vec<(String, String)> =
        on_pool!(db, p => sqlx::query_as(AssertSqlSafe(sql)).fetch_all(p).await?);
    Ok(rows
        .into_iter()
        .filter_map(|(id, r)| Some((id.parse().ok()?, r)))
        .collect())
}

/// The consumer's handler: records the effect in the inbox transaction.
pub struct Effects {
    insert: String,
}

impl Effects {
    pub fn new(t: &Tables) -> Effects {
        Effects {
            insert: format!(
                "INSERT INTO {} (message_id, agg, version) VALUES ($1, $2, $3)",
                t.effects()
            ),
        }
    }
}

#[async_trait::async_trait]
impl<DB: herald::sql::SqlDb> herald::sql::Handler<DB> for Effects {
    async fn handle(&self, tx: &mut DB::Connection, m: &Message) -> Result<(), herald::BoxError> {
        let (agg, version) = key_seq(m);
        herald::sql::Stmt::<DB>::new(&self.insert)
            .text(&m.id.to_string())
            .text(&agg)
            .int(version as i64)
            .execute(tx)
            .await?;
        Ok(())
    }
}

/// The durability settings in force, as `name=value` pairs.
pub async fn durability(db: &Database) -> Vec<String> {
    let mut out = Vec::new();
    match db {
        Database::Postgres(p) => {
            for name in [
                "synchronous_commit",
                "fsync",
                "full_page_writes",
                "autovacuum",
            ] {
                let v: Result<String, _> =
                    sqlx::query_scalar(AssertSqlSafe(format!("SHOW {name}")))
                        .fetch_one(p)
                        .await;
                out.push(format!(
                    "postgres {name}={}",
                    v.unwrap_or_else(|_| "?".into())
                ));
            }
        }
        Database::Sqlite(p) => {
            let sync: Result<i64, _> = sqlx::query_scalar("PRAGMA synchronous").fetch_one(p).await;
            let journal: Result<String, _> =
                sqlx::query_scalar("PRAGMA journal_mode").fetch_one(p).await;
            let sync = match sync {
                Ok(0) => "OFF".to_owned(),
                Ok(1) => "NORMAL".to_owned(),
                Ok(2) => "FULL".to_owned(),
                Ok(3) => "EXTRA".to_owned(),
                _ => "?".to_owned(),
            };
            out.push(format!("sqlite synchronous={sync}"));
            out.push(format!(
                "sqlite journal_mode={}",
                journal.unwrap_or_else(|_| "?".into())
            ));
        }
        Database::MySql(_) => unreachable!("verify refuses MySQL at start-up"),
    }
    out
}
