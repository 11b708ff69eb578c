//! Creating herald's tables.

use herald_core::{Identifier, Result};
use sqlx::SqlitePool;

/// The migration SQL, with the default table name `herald_outbox`.
pub const MIGRATION: &str = include_str!("../migrations/0001_herald.sql");

/// Creates the outbox (named `table`), its dead-letter table (`<table>_dead_letter`) and the inbox
/// (`<table>_inbox`) if they do not exist. Idempotent.
pub async fn migrate(pool: &SqlitePool, table: &Identifier) -> Result<()> {
    // Derived names are validated too: a 60-character table name would overflow them.
    table.with_suffix("_dead_letter")?;
    let sql = MIGRATION.replace("herald_outbox", table.as_str());
    let mut tx = pool
        .begin()
        .await
        .map_err(|e| crate::error::db("starting the migration", e))?;
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

pub(crate) fn only_comments(s: &str) -> bool {
    s.lines()
        .all(|l| l.trim().is_empty() || l.trim().starts_with("--"))
}
