//! MySQL's SQL: backquoted names, `TIMESTAMPADD` times, duplicate-key inbox inserts, the
//! `CRC32` partitions and the durability checks.

use std::time::Duration;

use async_trait::async_trait;
use herald_core::{Error, Identifier, Result};
use herald_sql::{Dialect, Migration, SqlOutbox, VersionCheck, db, is_connection_error};
use sqlx::mysql::{MySqlDatabaseError, MySqlRow};
use sqlx::{MySql, MySqlConnection, Row};

/// MySQL's and MariaDB's [`Dialect`]. The relay's write transactions run at `READ COMMITTED`,
/// so a heartbeat's re-read under the partitions' row locks sees what other relays committed.
#[derive(Debug, Clone, Copy, Default)]
pub struct MySqlDialect;

/// Server error numbers that mean "try again": deadlock (1213), lock wait timeout (1205), too many
/// connections (1040), server shutdown (1053), connection killed (1927, MariaDB), query
/// interrupted (1317), read-only during a failover (1290, 1836), idle disconnect (4031, MySQL).
const TRANSIENT: [u16; 9] = [1213, 1205, 1040, 1053, 1927, 1317, 1290, 1836, 4031];

#[async_trait]
impl Dialect for MySqlDialect {
    type DB = MySql;
    const NAME: &'static str = "MySQL";
    const TRANSACTIONAL_DDL: bool = false;
    const RETURNING_ID: bool = false;
    /// READ COMMITTED: the claim's locking read takes no gap locks (producers' inserts never
    /// wait on a claim), its plain reads see the latest commits, and the dead-letter move's reads
    /// of the dead-letter table (for a reused id) do not gap-lock, which made two relays
    /// dead-lettering at once deadlock under REPEATABLE READ.
    const BEFORE_WRITE_TX: Option<&'static str> =
        Some("SET TRANSACTION ISOLATION LEVEL READ COMMITTED");

    fn quote(ident: &Identifier) -> String {
        format!("`{ident}`")
    }

    fn is_transient(e: &sqlx::Error) -> bool {
        is_connection_error(e)
            || e.as_database_error()
                .and_then(|d| d.try_downcast_ref::<MySqlDatabaseError>())
                .is_some_and(|m| TRANSIENT.contains(&m.number()))
    }

    fn is_unique_violation(e: &sqlx::Error) -> bool {
        matches!(e, sqlx::Error::Database(d)
            if d.try_downcast_ref::<MySqlDatabaseError>().is_some_and(|m| m.number() == 1062))
    }

    fn rows_affected(r: &sqlx::mysql::MySqlQueryResult) -> u64 {
        r.rows_affected()
    }

    fn last_insert_id(r: &sqlx::mysql::MySqlQueryResult) -> Option<i64> {
        i64::try_from(r.last_insert_id()).ok()
    }

    fn time_from_micros(param: &str) -> String {
        format!("TIMESTAMPADD(MICROSECOND, {param}, '1970-01-01 00:00:00')")
    }

    fn now_plus_micros(param: &str) -> String {
        format!("TIMESTAMPADD(MICROSECOND, {param}, UTC_TIMESTAMP(6))")
    }

    fn now() -> String {
        "UTC_TIMESTAMP(6)".to_owned()
    }

    fn partition_of(n: u32) -> Option<String> {
        Some(format!(
            "(CASE WHEN o.ordering_key IS NULL THEN o.id & 2147483647 ELSE CRC32(o.ordering_key) END) % {n}"
        ))
    }

    fn select_micros(col: &str) -> String {
        format!("TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', {col})")
    }

    fn read_micros(row: &MySqlRow, col: &str) -> std::result::Result<Option<i64>, String> {
        row.try_get::<Option<i64>, _>(col)
            .map_err(|e| e.to_string())
    }

    fn cast_int(col: &str) -> String {
        format!("CAST({col} AS SIGNED)")
    }

    fn concat(a: &str, b: &str) -> String {
        format!("CONCAT({a}, {b})")
    }

    /// A plain `INSERT`, not `INSERT IGNORE`: IGNORE would also turn a too-long consumer name
    /// into a silent truncation. A duplicate key (error 1062) does not abort a MySQL
    /// transaction, so it is caught and read as "already handled".
    fn inbox_insert(inbox: &str) -> String {
        format!("INSERT INTO {inbox} (consumer, message_id) VALUES (?, ?)")
    }

    fn version_check(versions: &str) -> VersionCheck {
        VersionCheck::ReadThenWrite {
            read: format!(
                "SELECT version FROM {versions} WHERE consumer = ? AND ordering_key = ? FOR UPDATE"
            ),
            write: format!(
                "INSERT INTO {versions} (consumer, ordering_key, version) VALUES (?, ?, ?) \
                 ON DUPLICATE KEY UPDATE version = GREATEST(version, VALUES(version))"
            ),
        }
    }

    fn delete_limited(table: &str, condition: &str) -> String {
        format!("DELETE FROM {table} WHERE {condition} LIMIT ?")
    }

    /// The columns, after checking the table is transactional (InnoDB): a MyISAM outbox would
    /// keep the rows of rolled-back transactions.
    async fn table_columns(
        conn: &mut MySqlConnection,
        table: &Identifier,
    ) -> Result<Option<Vec<String>>> {
        let engine: Option<Option<String>> = sqlx::query_scalar(
            "SELECT ENGINE FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
        )
        .bind(table.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| db::<Self>("reading the table's engine", e))?;
        let Some(engine) = engine else {
            return Ok(None);
        };
        let engine = engine.unwrap_or_default();
        if !engine.eq_ignore_ascii_case("InnoDB") {
            return Err(Error::Schema {
                table: table.to_string(),
                detail: format!(
                    "the table uses the {engine} engine, which is not transactional: rows of rolled-back \
                     transactions would be published. Convert it with ALTER TABLE `{table}` ENGINE = InnoDB"
                ),
            });
        }
        let have: Vec<String> = sqlx::query_scalar(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
        )
        .bind(table.as_str())
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| db::<Self>("reading the table's columns", e))?;
        Ok(Some(have))
    }

    async fn durability_warnings(outbox: &SqlOutbox<Self>) -> Result<Vec<String>> {
        let row = sqlx::query(
            "SELECT CAST(@@innodb_flush_log_at_trx_commit AS SIGNED), CAST(@@sync_binlog AS SIGNED), \
             CAST(@@log_bin AS SIGNED)",
        )
        .fetch_one(outbox.pool())
        .await
        .map_err(|e| db::<Self>("checking durability settings", e))?;
        let (flush, sync_binlog, log_bin): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let mut warnings = Vec::new();
        if flush != 1 {
            warnings.push(format!(
                "MySQL innodb_flush_log_at_trx_commit={flush}: a transaction the relay already published can vanish \
                 in a server crash (a phantom event). Set innodb_flush_log_at_trx_commit=1."
            ));
        }
        if log_bin == 1 && sync_binlog != 1 {
            warnings.push(format!(
                "MySQL sync_binlog={sync_binlog} with the binary log on: after a crash or a failover to a replica, \
                 a transaction the relay already published can be missing (a phantom event). Set sync_binlog=1."
            ));
        }
        Ok(warnings)
    }

    fn migrations() -> &'static [Migration] {
        crate::migrate::MIGRATIONS
    }

    fn migrations_table(name: &str) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {name} (version BIGINT PRIMARY KEY, description VARCHAR(255) NOT NULL, \
             applied_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE = InnoDB"
        )
    }

    async fn lock_migrations(conn: &mut MySqlConnection) -> Result<()> {
        let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK('herald-migrate', 60)")
            .fetch_one(conn)
            .await
            .map_err(|e| db::<Self>("locking for the migration", e))?;
        if locked != Some(1) {
            return Err(Error::Timeout {
                what: "waiting for another `herald migrate` to finish (named lock herald-migrate)"
                    .to_owned(),
                after: Duration::from_secs(60),
            });
        }
        Ok(())
    }

    async fn unlock_migrations(conn: &mut MySqlConnection) {
        let _ = sqlx::query("DO RELEASE_LOCK('herald-migrate')")
            .execute(conn)
            .await;
    }
}
