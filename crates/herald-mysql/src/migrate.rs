//! herald's tables on MySQL and MariaDB, as versioned migrations.

use herald_core::{Identifier, Result};
use herald_sql::Migration;
use sqlx::MySqlPool;

use crate::MySqlDialect;

/// The first migration's SQL, with the default table name `herald_outbox`.
pub const MIGRATION: &str = include_str!("../migrations/0001_herald.sql");

pub(crate) const MIGRATIONS: &[Migration] =
    &herald_sql::migrate_versions(MIGRATION, include_str!("../migrations/0002_partitions.sql"));

/// Creates or upgrades the outbox (named `table`), its dead-letter table (`<table>_dead_letter`),
/// the inbox (`<table>_inbox`, `<table>_inbox_version`) and the consumers' dead letters
/// (`<table>_consumer_dead_letter`) in the connection's database. Returns the versions applied.
///
/// MySQL commits implicitly around every DDL statement, so this runs on a pooled connection of
/// its own, never inside an application transaction; a named lock (`GET_LOCK('herald-migrate')`)
/// keeps concurrent runs apart, and each migration is recorded in `<table>_migrations` once all
/// its statements (each idempotent) ran.
pub async fn migrate(pool: &MySqlPool, table: &Identifier) -> Result<Vec<i64>> {
    herald_sql::migrate::<MySqlDialect>(pool, table).await
}
