//! Creating herald's tables.

use herald_core::{Identifier, Result};
use sqlx::PgPool;

/// The migration SQL, with the default table name `herald_outbox`.
pub const MIGRATION: &str = include_str!("../migrations/0001_herald.sql");

/// Creates the outbox (named `table`), its dead-letter table (`<table>_dead_letter`) and the inbox
/// (`<table>_inbox`) in the connection's current schema, if they do not exist. Idempotent; runs in
/// one transaction under an advisory lock so concurrent migrations do not collide.
pub async fn migrate(pool: &PgPool, table: &Identifier) -> Result<()> {
    table.with_suffix("_dead_letter")?;
    let sql = MIGRATION.replace("herald_outbox", table.as_str());
    let mut tx = pool
        .begin()
        .await
        .map_err(|e| crate::error::db("starting the migration", e))?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('herald-migrate'))")
        .execute(&mut *tx)
        .await
        .map_err(|e| crate::error::db("locking for the migration", e))?;
    for statement in sql
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty() && !only_comments(s))
    {
        sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
            .execute(&mut *tx)
            .await
            .map_err(|e| crate::error::db("running the migration", e))?;
    }
    tx.commit()
        .await
        .map_err(|e| crate::error::db("committing the migration", e))
}

fn only_comments(s: &str) -> bool {
    s.lines()
        .all(|l| l.trim().is_empty() || l.trim().starts_with("--"))
}
