//! The consumer's inbox on SQLite: each message's effect applied once.

use herald_core::{Identifier, Result};
use sqlx::{AssertSqlSafe, SqliteConnection};
use uuid::Uuid;

/// Records handled message ids in the caller's transaction.
#[derive(Debug, Clone)]
pub struct SqliteInbox {
    insert: String,
}

impl SqliteInbox {
    /// The inbox created by `herald migrate` beside outbox `table` (`<table>_inbox`).
    pub fn new(table: &Identifier) -> Result<SqliteInbox> {
        let inbox = table.with_suffix("_inbox")?;
        Ok(SqliteInbox {
            insert: format!(
                "INSERT INTO \"{inbox}\" (consumer, message_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING"
            ),
        })
    }

    /// Records that `consumer` handles `message_id` in the caller's transaction. Returns `false`
    /// if it already did: the caller skips the handler and acknowledges the duplicate.
    pub async fn record(
        &self,
        conn: &mut SqliteConnection,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<bool> {
        let done = sqlx::query(AssertSqlSafe(self.insert.as_str()))
            .bind(consumer)
            .bind(message_id.to_string())
            .execute(conn)
            .await
            .map_err(|e| crate::error::db("recording a message in the inbox", e))?;
        Ok(done.rows_affected() == 1)
    }
}
