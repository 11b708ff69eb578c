//! The consumer's inbox on PostgreSQL: each message's effect applied once.

use herald_core::{Identifier, Result};
use sqlx::{AssertSqlSafe, PgConnection};
use uuid::Uuid;

/// Records handled message ids in the caller's transaction.
#[derive(Debug, Clone)]
pub struct PgInbox {
    insert: String,
}

impl PgInbox {
    /// The inbox created by `herald migrate` beside outbox `table` (`<table>_inbox`).
    pub fn new(table: &Identifier) -> Result<PgInbox> {
        let inbox = table.with_suffix("_inbox")?;
        Ok(PgInbox {
            insert: format!(
                "INSERT INTO \"{inbox}\" (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
            ),
        })
    }

    /// Records that `consumer` handles `message_id` in the caller's transaction. Returns `false`
    /// if it already did: the caller skips the handler and acknowledges the duplicate. A second
    /// transaction recording the same id concurrently waits for the first and then sees the
    /// conflict, so two instances never both apply one message.
    pub async fn record(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<bool> {
        let done = sqlx::query(AssertSqlSafe(self.insert.as_str()))
            .bind(consumer)
            .bind(message_id)
            .execute(conn)
            .await
            .map_err(|e| crate::error::db("recording a message in the inbox", e))?;
        Ok(done.rows_affected() == 1)
    }
}
