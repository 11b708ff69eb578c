//! herald on MySQL 8 and MariaDB 10.6+: the outbox writer, the relay's outbox store, the inbox,
//! and migrations. Tables are InnoDB; claims use `FOR UPDATE SKIP LOCKED`.
//!
//! ```no_run
//! # async fn example() -> herald_core::Result<()> {
//! use herald_core::{Identifier, Message};
//! use herald_mysql::{MySqlOutboxWriter, migrate};
//!
//! let pool = sqlx::MySqlPool::connect("mysql://root@127.0.0.1/test").await.expect("connect");
//! let table = Identifier::new("herald_outbox")?;
//! migrate(&pool, &table).await?; // DDL: once, at deployment, never inside a transaction
//! let writer = MySqlOutboxWriter::new(&table);
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

pub use consumer::{MySqlApplier, MySqlHandler};
pub use inbox::MySqlInbox;
pub use migrate::{MIGRATION, migrate};
pub use outbox::MySqlOutbox;
pub use writer::{MySqlOutboxWriter, MySqlPark};
