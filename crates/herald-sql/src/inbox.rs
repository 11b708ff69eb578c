//! The consumer's inbox: each message's effect applied once.

use std::marker::PhantomData;
use std::sync::Arc;

use herald_core::{Identifier, Result};
use uuid::Uuid;

use crate::Dialect;
use crate::db::Stmt;
use crate::error::db;

/// Records handled message ids in the caller's transaction.
pub struct Inbox<D> {
    insert: Arc<str>,
    dialect: PhantomData<fn() -> D>,
}

impl<D> Clone for Inbox<D> {
    fn clone(&self) -> Self {
        Inbox {
            insert: self.insert.clone(),
            dialect: PhantomData,
        }
    }
}

impl<D> std::fmt::Debug for Inbox<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("insert", &self.insert)
            .finish()
    }
}

impl<D: Dialect> Inbox<D> {
    /// The inbox created by `migrate` beside outbox `table` (`<table>_inbox`).
    pub fn new(table: &Identifier) -> Result<Inbox<D>> {
        let inbox = table.with_suffix("_inbox")?;
        Ok(Inbox {
            insert: D::render(&D::inbox_insert(&D::quote(&inbox))).into(),
            dialect: PhantomData,
        })
    }

    /// Records that `consumer` handles `message_id` in the caller's transaction. Returns `false`
    /// if it already did: the caller skips the handler and acknowledges the duplicate. A second
    /// transaction recording the same id concurrently waits for the first (on its row lock) and
    /// then sees the conflict, so two instances never both apply one message.
    pub async fn record(
        &self,
        conn: &mut <D::DB as sqlx::Database>::Connection,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<bool> {
        match Stmt::<D::DB>::new(&self.insert)
            .text(consumer)
            .text(&message_id.to_string())
            .execute(conn)
            .await
        {
            Ok(done) => Ok(D::rows_affected(&done) == 1),
            Err(e) if D::is_unique_violation(&e) => Ok(false),
            Err(e) => Err(db::<D>("recording a message in the inbox", e)),
        }
    }
}
