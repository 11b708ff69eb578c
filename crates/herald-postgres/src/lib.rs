//! herald on PostgreSQL: the outbox writer, the relay's outbox store, the inbox, and migrations.
//!
//! ```no_run
//! # async fn example() -> herald_core::Result<()> {
//! use herald_core::{Identifier, Message};
//! use herald_postgres::{PgOutboxWriter, migrate};
//!
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/test").await.expect("connect");
//! let table = Identifier::new("herald_outbox")?;
//! migrate(&pool, &table).await?;
//! let writer = PgOutboxWriter::new(&table);
//! let mut tx = pool.begin().await.expect("begin");
//! // ... the business change, in `tx` ...
//! writer.enqueue(&mut tx, &Message::event("orders", "OrderPlaced", b"{}".to_vec())).await?;
//! tx.commit().await.expect("commit");
//! # Ok(()) }
//! ```

mod consumer;
mod error;
mod inbox;
mod migrate;
mod outbox;
mod writer;

pub use consumer::{PgApplier, PgHandler};
pub use inbox::PgInbox;
pub use migrate::{MIGRATION, migrate};
pub use outbox::PgOutbox;
pub use writer::{PgOutboxWriter, PgPark};
