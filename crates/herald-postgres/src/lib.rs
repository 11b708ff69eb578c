//! herald on PostgreSQL: the outbox writer, the relay's outbox store, the inbox, and migrations.
//! The algorithms are herald-sql's, written once; this crate is PostgreSQL's [`Dialect`]: its
//! claim, its SQL, its error classes and its durability checks.
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
//! writer.enqueue(&mut tx, &Message::raw_event("orders", "OrderPlaced", b"{}".to_vec())).await?;
//! tx.commit().await.expect("commit");
//! # Ok(()) }
//! ```

mod dialect;
mod migrate;

pub use dialect::PgDialect;
pub use herald_sql::{Dialect, Handler};
pub use migrate::{MIGRATION, migrate};

/// The relay's side of a PostgreSQL outbox. A claim is one short transaction: it takes a
/// transaction-scoped advisory lock (so claims by several relays are serialised and cannot both
/// see a key as free), leases rows with head-of-key claiming, and commits. Publishing happens
/// outside any transaction; marking deletes the rows if the lease token still matches.
pub type PgOutbox = herald_sql::SqlOutbox<PgDialect>;
/// Writes messages into the outbox in the caller's transaction.
pub type PgOutboxWriter = herald_sql::OutboxWriter<PgDialect>;
/// Fallback storage in a PostgreSQL outbox table.
pub type PgPark = herald_sql::Park<PgDialect>;
/// Records handled message ids in the caller's transaction.
pub type PgInbox = herald_sql::Inbox<PgDialect>;
/// The consumer's database side on PostgreSQL, wrapping a [`Handler`]`<sqlx::Postgres>`.
pub type PgApplier<H> = herald_sql::Applier<PgDialect, H>;
