//! herald on SQLite: the outbox writer, the relay's outbox store, the inbox, and migrations.
//!
//! ```no_run
//! # async fn example() -> herald_core::Result<()> {
//! use herald_core::{Identifier, Message};
//! use herald_sqlite::{SqliteOutboxWriter, connect, migrate};
//!
//! let pool = connect("sqlite://app.db").await?;
//! let table = Identifier::new("herald_outbox")?;
//! migrate(&pool, &table).await?;
//! let writer = SqliteOutboxWriter::new(&table);
//! let mut tx = pool.begin().await.expect("begin");
//! // ... the business change, in `tx` ...
//! writer.enqueue(&mut tx, &Message::event("orders", "OrderPlaced", b"{}".to_vec())).await?;
//! tx.commit().await.expect("commit");
//! # Ok(()) }
//! ```

mod connect;
mod consumer;
mod error;
mod inbox;
mod migrate;
mod outbox;
mod writer;

pub use connect::{connect, connect_options};
pub use consumer::{SqliteApplier, SqliteHandler};
pub use inbox::SqliteInbox;
pub use migrate::{MIGRATION, migrate};
pub use outbox::SqliteOutbox;
pub use writer::{SqliteOutboxWriter, SqlitePark};
