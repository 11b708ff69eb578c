//! Versioned migrations: each database's migration files, applied in order, each recorded in
//! `<table>_migrations` so it runs once.

use herald_core::{Error, Identifier, Result};
use sqlx::{Connection, Pool};

use crate::Dialect;
use crate::db::{SqlDb, Stmt};
use crate::error::db;

/// One migration: a version (applied in increasing order), a description and its SQL, written
/// for the default table name `herald_outbox` (every `herald_outbox` in it names the configured
/// table, so the file also runs as-is in any migration tool).
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Applied in increasing order, recorded once applied.
    pub version: i64,
    /// What it does, recorded with it.
    pub description: &'static str,
    /// Statements separated by `;`.
    pub sql: &'static str,
}

impl Migration {
    /// The statements of this migration for outbox `table`.
    pub fn statements(&self, table: &Identifier) -> Vec<String> {
        self.sql
            .replace("herald_outbox", table.as_str())
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty() && !only_comments(s))
            .map(str::to_owned)
            .collect()
    }
}

/// The versions every database has, in order, from each version's SQL file: the descriptions
/// live here once, the SQL in each backend crate's `migrations/` directory.
pub const fn versions(v1: &'static str, v2: &'static str) -> [Migration; 2] {
    [
        Migration {
            version: 1,
            description: "outbox, dead letters, inbox, consumer dead letters",
            sql: v1,
        },
        Migration {
            version: 2,
            description: "relays and partitions (heartbeats, takeover)",
            sql: v2,
        },
    ]
}

fn only_comments(s: &str) -> bool {
    s.lines()
        .all(|l| l.trim().is_empty() || l.trim().starts_with("--"))
}

/// Creates or upgrades herald's tables beside outbox `table`: the outbox, its dead letters, the
/// inbox and the consumers' dead letters. Applies, in order, each of the dialect's migrations not
/// yet recorded in `<table>_migrations`, under a lock that keeps concurrent runs apart; where the
/// database has transactional DDL each migration commits with its record. Returns the versions
/// applied (empty when everything was up to date). Idempotent.
pub async fn migrate<D: Dialect>(pool: &Pool<D::DB>, table: &Identifier) -> Result<Vec<i64>> {
    // Derived names are validated up front: a long table name would overflow them.
    table.with_suffix("_consumer_dead_letter")?;
    let record = D::quote(&table.with_suffix("_migrations")?);
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| db::<D>("starting the migration", e))?;
    if D::TRANSACTIONAL_DDL {
        let mut tx = conn
            .begin_with(D::MIGRATION_BEGIN)
            .await
            .map_err(|e| db::<D>("starting the migration", e))?;
        D::lock_migrations(&mut tx).await?;
        let applied = apply_all::<D>(&mut tx, table, &record).await?;
        tx.commit()
            .await
            .map_err(|e| db::<D>("committing the migration", e))?;
        Ok(applied)
    } else {
        D::lock_migrations(&mut conn).await?;
        let outcome = apply_all::<D>(&mut conn, table, &record).await;
        D::unlock_migrations(&mut conn).await;
        outcome
    }
}

async fn apply_all<D: Dialect>(
    conn: &mut <D::DB as sqlx::Database>::Connection,
    table: &Identifier,
    record: &str,
) -> Result<Vec<i64>> {
    let run = |what: &'static str| move |e| db::<D>(what, e);
    Stmt::<D::DB>::new(&D::migrations_table(record))
        .execute(&mut *conn)
        .await
        .map_err(run("creating the migrations table"))?;
    let done: Vec<i64> = Stmt::<D::DB>::new(&format!("SELECT version FROM {record}"))
        .fetch_all(&mut *conn)
        .await
        .map_err(run("reading the applied migrations"))?
        .iter()
        .map(|r| <D::DB as SqlDb>::get_i64(r, "version"))
        .collect::<std::result::Result<_, _>>()
        .map_err(run("reading the applied migrations"))?;
    // Records without the tables (dropped by hand, or a half-finished teardown): applying
    // nothing would leave the outbox missing, so the record is discarded and everything runs
    // again (every migration is idempotent).
    let done = if !done.is_empty() && D::table_columns(&mut *conn, table).await?.is_none() {
        tracing::warn!(%table, "migrations are recorded but the outbox table is missing; applying them again");
        Stmt::<D::DB>::new(&format!("DELETE FROM {record}"))
            .execute(&mut *conn)
            .await
            .map_err(run("discarding a stale migration record"))?;
        Vec::new()
    } else {
        done
    };
    let known = D::migrations();
    if let Some(newer) = done
        .iter()
        .find(|v| !known.iter().any(|m| m.version == **v))
    {
        return Err(Error::Schema {
            table: table.to_string(),
            detail: format!(
                "migration {newer} was applied by a newer herald; this one knows up to {}",
                known.iter().map(|m| m.version).max().unwrap_or(0)
            ),
        });
    }
    let insert = D::render(&format!(
        "INSERT INTO {record} (version, description) VALUES (?, ?)"
    ));
    let mut applied = Vec::new();
    for m in known.iter().filter(|m| !done.contains(&m.version)) {
        for statement in m.statements(table) {
            Stmt::<D::DB>::new(&statement)
                .execute(&mut *conn)
                .await
                .map_err(|e| {
                    db::<D>(
                        &format!("running migration {} ({})", m.version, m.description),
                        e,
                    )
                })?;
        }
        Stmt::<D::DB>::new(&insert)
            .int(m.version)
            .text(m.description)
            .execute(&mut *conn)
            .await
            .map_err(run("recording a migration"))?;
        applied.push(m.version);
    }
    Ok(applied)
}
