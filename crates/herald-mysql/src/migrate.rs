//! Creating herald's tables.

use herald_core::{Identifier, Result};
use sqlx::MySqlPool;

use crate::error::db;

/// The migration SQL, with the default table name `herald_outbox`.
pub const MIGRATION: &str = include_str!("../migrations/0001_herald.sql");

/// Creates the outbox (named `table`), its dead-letter table (`<table>_dead_letter`), the inbox
/// (`<table>_inbox`, `<table>_inbox_version`) and the consumers' dead letters
/// (`<table>_consumer_dead_letter`) in the connection's database, if they do not exist.
///
/// Idempotent. MySQL commits implicitly around every DDL statement, so this runs on a pooled
/// connection of its own, never inside an application transaction; a named lock
/// (`GET_LOCK('herald-migrate')`) keeps concurrent migrations from colliding.
pub async fn migrate(pool: &MySqlPool, table: &Identifier) -> Result<()> {
    table.with_suffix("_consumer_dead_letter")?;
    let sql = MIGRATION.replace("herald_outbox", table.as_str());
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| db("starting the migration", e))?;
    let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK('herald-migrate', 60)")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| db("locking for the migration", e))?;
    if locked != Some(1) {
        return Err(herald_core::Error::Timeout {
            what: "waiting for another `herald migrate` to finish (named lock herald-migrate)"
                .to_owned(),
            after: std::time::Duration::from_secs(60),
        });
    }
    let mut outcome = Ok(());
    for statement in sql
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty() && !only_comments(s))
    {
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
            .execute(&mut *conn)
            .await
        {
            outcome = Err(db("running the migration", e));
            break;
        }
    }
    let _ = sqlx::query("DO RELEASE_LOCK('herald-migrate')")
        .execute(&mut *conn)
        .await;
    outcome
}

fn only_comments(s: &str) -> bool {
    s.lines()
        .all(|l| l.trim().is_empty() || l.trim().starts_with("--"))
}
