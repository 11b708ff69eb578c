//! herald's tables on PostgreSQL, as versioned migrations.

use herald_core::{Identifier, Result};
use herald_sql::Migration;
use sqlx::PgPool;

use crate::PgDialect;

/// The first migration's SQL, with the default table name `herald_outbox`.
pub const MIGRATION: &str = include_str!("../migrations/0001_herald.sql");

pub(crate) const MIGRATIONS: &[Migration] =
    &herald_sql::migrate_versions(MIGRATION, include_str!("../migrations/0002_partitions.sql"));

/// Creates or upgrades the outbox (named `table`), its dead-letter table (`<table>_dead_letter`),
/// the inbox (`<table>_inbox`, `<table>_inbox_version`) and the consumers' dead letters
/// (`<table>_consumer_dead_letter`) in the connection's current schema. Each migration runs once,
/// in a transaction with its record in `<table>_migrations`, under an advisory lock so
/// concurrent runs do not collide. Returns the versions applied.
pub async fn migrate(pool: &PgPool, table: &Identifier) -> Result<Vec<i64>> {
    herald_sql::migrate::<PgDialect>(pool, table).await
}
