//! herald on MySQL 8 and MariaDB 10.6+: the outbox writer, the relay's outbox store, the inbox,
//! and migrations. Tables are InnoDB; claims use `FOR UPDATE SKIP LOCKED`. The algorithms are
//! herald-sql's, written once; this crate is MySQL's [`Dialect`].
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
//! writer.enqueue(&mut tx, &Message::raw_event("orders", "OrderPlaced", b"{}".to_vec())).await?;
//! tx.commit().await.expect("commit");
//! # Ok(()) }
//! ```

mod dialect;
mod migrate;

pub use dialect::MySqlDialect;
pub use herald_sql::{Dialect, Handler};
pub use migrate::{MIGRATION, migrate};

/// The relay's side of a MySQL or MariaDB outbox (see [`MySqlDialect`] for its claim).
pub type MySqlOutbox = herald_sql::SqlOutbox<MySqlDialect>;
/// Writes messages into the outbox in the caller's transaction.
pub type MySqlOutboxWriter = herald_sql::OutboxWriter<MySqlDialect>;
/// Fallback storage in a MySQL outbox table.
pub type MySqlPark = herald_sql::Park<MySqlDialect>;
/// Records handled message ids in the caller's transaction.
pub type MySqlInbox = herald_sql::Inbox<MySqlDialect>;
/// The consumer's database side on MySQL, wrapping a [`Handler`]`<sqlx::MySql>`.
pub type MySqlApplier<H> = herald_sql::Applier<MySqlDialect, H>;
