//! herald's tables on SQLite, as versioned migrations.

use herald_core::{Identifier, Result};
use herald_sql::Migration;
use sqlx::SqlitePool;

use crate::SqliteDialect;

/// The first migration's SQL, with the default table name `herald_outbox`.
pub const MIGRATION: &str = include_str!("../migrations/0001_herald.sql");

pub(crate) const MIGRATIONS: &[Migration] =
    &herald_sql::migrate_versions(MIGRATION, include_str!("../migrations/0002_partitions.sql"));

/// Creates or upgrades the outbox (named `table`), its dead-letter table (`<table>_dead_letter`),
/// the inbox and the consumers' dead letters. Each migration runs once, in a `BEGIN IMMEDIATE`
/// transaction with its record in `<table>_migrations`. Returns the versions applied.
pub async fn migrate(pool: &SqlitePool, table: &Identifier) -> Result<Vec<i64>> {
    herald_sql::migrate::<SqliteDialect>(pool, table).await
}
