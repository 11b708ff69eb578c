//! herald on SQLite: the outbox writer, the relay's outbox store, the inbox, and migrations.
//! The algorithms are herald-sql's, written once; this crate is SQLite's [`Dialect`]: its
//! claim, its SQL, its error classes and its durability checks.
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
//! writer.enqueue(&mut tx, &Message::raw_event("orders", "OrderPlaced", b"{}".to_vec())).await?;
//! tx.commit().await.expect("commit");
//! # Ok(()) }
//! ```

mod connect;
mod dialect;
mod migrate;

pub use connect::{connect, connect_options};
pub use dialect::SqliteDialect;
pub use herald_sql::{Dialect, Handler};
pub use migrate::{MIGRATION, migrate};

/// The relay's side of a SQLite outbox. SQLite has one writer at a time; claims run in
/// `BEGIN IMMEDIATE` transactions so that two relays (even in two processes) never see a key as
/// free at the same time.
pub type SqliteOutbox = herald_sql::SqlOutbox<SqliteDialect>;
/// Writes messages into the outbox in the caller's transaction.
pub type SqliteOutboxWriter = herald_sql::OutboxWriter<SqliteDialect>;
/// Fallback storage in a SQLite outbox table.
pub type SqlitePark = herald_sql::Park<SqliteDialect>;
/// Records handled message ids in the caller's transaction.
pub type SqliteInbox = herald_sql::Inbox<SqliteDialect>;
/// The consumer's database side on SQLite, wrapping a [`Handler`]`<sqlx::Sqlite>`.
pub type SqliteApplier<H> = herald_sql::Applier<SqliteDialect, H>;
