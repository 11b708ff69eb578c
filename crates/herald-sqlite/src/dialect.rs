//! SQLite's SQL: integer microsecond times, JSON id lists, one partition (a single writer needs
//! no more) and the durability checks.

use async_trait::async_trait;
use herald_core::{Identifier, Result};
use herald_sql::{Dialect, Migration, SqlOutbox, Stmt, db, is_connection_error};
use sqlx::{Row, Sqlite};

/// SQLite's [`Dialect`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SqliteDialect;

/// The database clock in microseconds since the epoch, as the migration's defaults write it.
const NOW_MICROS: &str = "CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)";

#[async_trait]
impl Dialect for SqliteDialect {
    type DB = Sqlite;
    const NAME: &'static str = "SQLite";
    const TRANSACTIONAL_DDL: bool = true;
    const RETURNING_ID: bool = false;
    const MIGRATION_BEGIN: &'static str = "BEGIN IMMEDIATE";
    const LOCKING_BEGIN: Option<&'static str> = Some("BEGIN IMMEDIATE");
    const FOR_UPDATE: &'static str = "";

    /// Lost connections, pool timeouts and busy or locked databases (`SQLITE_BUSY`,
    /// `SQLITE_LOCKED` and their extended codes).
    fn is_transient(e: &sqlx::Error) -> bool {
        is_connection_error(e)
            || e.as_database_error()
                .and_then(|d| d.code())
                .and_then(|c| c.parse::<i64>().ok())
                .is_some_and(|c| matches!(c & 0xff, 5 | 6))
    }

    fn rows_affected(r: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        r.rows_affected()
    }

    fn last_insert_id(r: &sqlx::sqlite::SqliteQueryResult) -> Option<i64> {
        Some(r.last_insert_rowid())
    }

    fn time_from_micros(param: &str) -> String {
        param.to_owned()
    }

    fn now_plus_micros(param: &str) -> String {
        format!("({NOW_MICROS} + {param})")
    }

    fn now() -> String {
        NOW_MICROS.to_owned()
    }

    /// SQLite has no hash function in SQL, and one writer: one partition.
    fn partition_of(_n: u32) -> Option<String> {
        None
    }

    fn select_micros(col: &str) -> String {
        col.to_owned()
    }

    /// Any value may sit in a SQLite column: one that is not an integer is the row's error.
    fn read_micros(
        row: &sqlx::sqlite::SqliteRow,
        col: &str,
    ) -> std::result::Result<Option<i64>, String> {
        row.try_get::<Option<i64>, _>(col)
            .map_err(|_| format!("{col} is not an integer of microseconds since the epoch"))
    }

    /// Only integer times: MIN over a column holding a REAL as well would pick it.
    fn min_micros(col: &str) -> String {
        format!("MIN(CASE WHEN typeof({col}) = 'integer' THEN {col} END)")
    }

    /// By bytes: a BLOB and a TEXT of the same characters are one destination.
    fn group_text(col: &str) -> String {
        format!("CAST({col} AS BLOB)")
    }

    fn select_bytes(col: &str) -> String {
        format!("CAST({col} AS BLOB)")
    }

    fn greatest(a: &str, b: &str) -> String {
        format!("MAX({a}, {b})")
    }

    fn true_literal() -> &'static str {
        "1"
    }

    fn id_in(col: &str, _n: usize) -> String {
        format!("{col} IN (SELECT value FROM json_each(?))")
    }

    fn bind_ids(stmt: Stmt<Sqlite>, ids: &[i64]) -> Stmt<Sqlite> {
        let json = serde_json::to_string(ids).unwrap_or_else(|_| "[]".to_owned());
        stmt.text(&json)
    }

    fn delete_limited(table: &str, condition: &str) -> String {
        format!(
            "DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE {condition} LIMIT ?)"
        )
    }

    async fn table_columns(
        conn: &mut sqlx::SqliteConnection,
        table: &Identifier,
    ) -> Result<Option<Vec<String>>> {
        let rows = sqlx::query("SELECT name FROM pragma_table_info(?1)")
            .bind(table.as_str())
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| db::<Self>("reading the table's columns", e))?;
        let have: Vec<String> = rows
            .iter()
            .filter_map(|r| r.try_get::<String, _>(0).ok())
            .collect();
        Ok((!have.is_empty()).then_some(have))
    }

    async fn durability_warnings(outbox: &SqlOutbox<Self>) -> Result<Vec<String>> {
        let what = "checking durability settings";
        let mut conn = outbox
            .pool()
            .acquire()
            .await
            .map_err(|e| db::<Self>(what, e))?;
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| db::<Self>(what, e))?;
        let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| db::<Self>(what, e))?;
        let mut warnings = Vec::new();
        if sync < 2 {
            warnings.push(format!(
                "SQLite synchronous={} on the relay's connection: a commit can be lost on power failure after the relay \
                 published it (a phantom event). Open every connection with synchronous=FULL \
                 (herald_sqlite::connect_options does).",
                ["OFF", "NORMAL"][sync.clamp(0, 1) as usize]
            ));
        }
        if !journal.eq_ignore_ascii_case("wal") {
            warnings.push(format!(
                "SQLite journal_mode={journal}: the relay's polling blocks writers; use WAL (herald_sqlite::connect_options does)."
            ));
        }
        Ok(warnings)
    }

    fn migrations() -> &'static [Migration] {
        crate::migrate::MIGRATIONS
    }

    fn migrations_table(name: &str) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {name} (version INTEGER PRIMARY KEY, description TEXT NOT NULL, \
             applied_at INTEGER NOT NULL DEFAULT ({NOW_MICROS}))"
        )
    }

    async fn lock_migrations(_conn: &mut sqlx::SqliteConnection) -> Result<()> {
        // `BEGIN IMMEDIATE` (MIGRATION_BEGIN) already holds the database's write lock.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use herald_core::Error;
    use herald_sql::handler_error;

    use super::SqliteDialect;

    /// A handler's own error type wrapping the database error it hit.
    #[derive(Debug)]
    struct Wrapped(sqlx::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("saving the confirmation")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_database_error_anywhere_in_a_handlers_chain_is_an_outage_not_poison() {
        let wrapped = handler_error::<SqliteDialect>(Box::new(Wrapped(sqlx::Error::PoolTimedOut)));
        assert!(
            matches!(
                wrapped,
                Error::Database {
                    transient: true,
                    ..
                }
            ),
            "{wrapped:?}"
        );
        let bare = handler_error::<SqliteDialect>(Box::new(sqlx::Error::PoolClosed));
        assert!(bare.is_transient(), "{bare:?}");
        // anyhow with context, as a handler written with `.context(..)?` returns it. (A bare
        // `anyhow::Error` boxed by `?` hides the error it holds; see `Handler`.)
        let context: herald_core::BoxError = anyhow::Error::from(sqlx::Error::PoolTimedOut)
            .context("saving the confirmation")
            .into();
        assert!(handler_error::<SqliteDialect>(context).is_transient());
        let own = handler_error::<SqliteDialect>("the card was declined".into());
        assert!(matches!(own, Error::Handler { .. }), "{own:?}");
        assert!(!own.is_transient());
        let permanent = handler_error::<SqliteDialect>(Box::new(Wrapped(sqlx::Error::RowNotFound)));
        assert!(
            matches!(
                permanent,
                Error::Database {
                    transient: false,
                    ..
                }
            ),
            "a database error that retrying cannot fix is not an outage: {permanent:?}"
        );
        // herald's own errors keep the class they were given where they failed (a statement
        // through the handler's context, say); decode errors, wrapped or not, park at once.
        let unavailable = handler_error::<SqliteDialect>(Box::new(Error::unavailable(
            "the broker",
            "connection reset",
        )));
        assert!(unavailable.is_transient(), "{unavailable:?}");
        let decode = || Error::Decode {
            reason: "not an OrderPlaced".into(),
        };
        assert!(matches!(
            handler_error::<SqliteDialect>(Box::new(decode())),
            Error::Decode { .. }
        ));
        let wrapped: herald_core::BoxError = anyhow::Error::from(decode())
            .context("reading the order")
            .into();
        let wrapped = handler_error::<SqliteDialect>(wrapped);
        assert!(matches!(wrapped, Error::Decode { .. }), "{wrapped:?}");
    }
}
