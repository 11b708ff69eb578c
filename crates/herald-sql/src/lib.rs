//! herald's storage written once over sqlx: the outbox writer, the relay's side of the outbox,
//! the inbox and the consumer's apply-once transaction, and versioned migrations.
//!
//! Each database crate (`herald-postgres`, `herald-mysql`, `herald-sqlite`) implements
//! [`Dialect`] (placeholders, time arithmetic, upserts, error classification, its partition hash
//! and its durability checks) and names the generic types: `PgOutbox` is `SqlOutbox<Postgres>`, and so
//! on. Nothing here knows a database by name.

mod applier;
mod db;
pub mod dead_letters;
mod dialect;
mod error;
mod inbox;
mod membership;
mod migrate;
mod outbox;
mod router;
mod writer;

pub use applier::{Applier, Handler};
pub use db::{SqlDb, Stmt, lossy_text};
pub use dead_letters::{DeadLetterAdmin, DeadLetters};
pub use dialect::{Dialect, VersionCheck};
pub use error::{db, handler_error, is_connection_error};
pub use inbox::Inbox;
pub use migrate::{Migration, migrate, versions as migrate_versions};
pub use outbox::SqlOutbox;
pub use router::{Bound, Context, Handle, Router, Statement, Unknown};
pub use writer::{OutboxWriter, Park};
