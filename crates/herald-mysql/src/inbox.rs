//! The consumer's inbox on MySQL: each message's effect applied once.

use herald_core::{Identifier, Result};
use sqlx::{AssertSqlSafe, MySqlConnection};
use uuid::Uuid;

/// Records handled message ids in the caller's transaction.
#[derive(Debug, Clone)]
pub struct MySqlInbox {
    insert: String,
}

impl MySqlInbox {
    /// The inbox created by `herald migrate` beside outbox `table` (`<table>_inbox`).
    pub fn new(table: &Identifier) -> Result<MySqlInbox> {
        let inbox = table.with_suffix("_inbox")?;
        Ok(MySqlInbox {
            insert: inbox_insert(&inbox),
        })
    }

    /// Records that `consumer` handles `message_id` in the caller's transaction. Returns `false`
    /// if it already did: the caller skips the handler and acknowledges the duplicate. A second
    /// transaction recording the same id concurrently waits on the first's row lock and then sees
    /// the duplicate key, so two instances never both apply one message.
    pub async fn record(
        &self,
        conn: &mut MySqlConnection,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<bool> {
        record(conn, &self.insert, consumer, message_id).await
    }
}

/// A plain `INSERT`, not `INSERT IGNORE`: IGNORE would also turn a too-long consumer name into a
/// silent truncation. A duplicate key (error 1062) does not abort a MySQL transaction, so it is
/// caught and read as "already handled".
pub(crate) fn inbox_insert(inbox: &Identifier) -> String {
    format!("INSERT INTO `{inbox}` (consumer, message_id) VALUES (?, ?)")
}

pub(crate) async fn record(
    conn: &mut MySqlConnection,
    insert: &str,
    consumer: &str,
    message_id: Uuid,
) -> Result<bool> {
    match sqlx::query(AssertSqlSafe(insert))
        .bind(consumer)
        .bind(message_id.to_string())
        .execute(conn)
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if crate::error::is_duplicate_key(&e) => Ok(false),
        Err(e) => Err(crate::error::db("recording a message in the inbox", e)),
    }
}
