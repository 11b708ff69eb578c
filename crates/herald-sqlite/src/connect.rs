//! Opening SQLite databases with the settings herald's guarantees need.

use std::str::FromStr;
use std::time::Duration;

use herald_core::{Error, Result};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

/// Connect options for `url` (`sqlite:path` or `sqlite://path`): created if missing, WAL journal,
/// `synchronous=FULL` (a committed outbox row survives power loss), 5 s busy timeout.
///
/// `synchronous` is a per-connection setting: the application's own connections must use these
/// options too, or a commit the relay already published could be lost in a crash.
pub fn connect_options(url: &str) -> Result<SqliteConnectOptions> {
    let opts = SqliteConnectOptions::from_str(url)
        .map_err(|e| Error::config(format!("database URL is not a valid SQLite URL: {e}")))?;
    Ok(opts
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(5)))
}

/// A pool over `url` with [`connect_options`].
pub async fn connect(url: &str) -> Result<SqlitePool> {
    let opts = connect_options(url)?;
    SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(opts)
        .await
        .map_err(|e| herald_sql::db::<crate::SqliteDialect>("opening the SQLite database", e))
}
